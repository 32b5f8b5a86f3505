"""DARCOTModel: the update order, pairing, a batch of one, bad options, checkpoints, the recipes, and the
real `basicsr train` command (train, validate, save, resume; two gloo processes)."""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from basicsr.data import build_dataset
from basicsr.models import build_model

import baryir_plugin.cli
from baryir_plugin.data import demo
from baryir_plugin.data.layout import select
from baryir_plugin.models.darcot_model import DARCOTModel, default_noise_sources

from .bad_input import assert_clean_error, run_inprocess
from .conftest import OPTIONS, REPO, bin_path, run

MODEL_YML = OPTIONS / 'train_darcot_model.yml'
ONE_THREAD = {'OMP_NUM_THREADS': '1'}


def _opt(workdir: Path, **train_overrides) -> dict:
    """The YAML as BasicSR's parse_options would hand it to build_model (single process, CPU)."""
    opt = yaml.safe_load(MODEL_YML.read_text())
    opt.update(dist=False, rank=0, world_size=1, is_train=True, num_gpu=0, auto_resume=False)
    for phase, data_opt in opt['datasets'].items():
        data_opt['phase'] = phase.split('_')[0]
        data_opt['scale'] = 1
    exp = workdir / 'experiments' / opt['name']
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'), log=str(exp),
                       training_states=str(exp / 'training_states'), visualization=str(exp / 'visualization'))
    opt['train'].update(train_overrides)
    return opt


def _batch(opt: dict, size: int = 4) -> dict:
    dataset = build_dataset(opt['datasets']['train'])
    torch.manual_seed(0)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=True):
        if size == 1 or len(set(batch['source_id'].tolist())) == 2:
            return batch
    raise AssertionError('no batch with both sources')


def _snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def _steps(model) -> list[str]:
    """Record which optimizer steps, in order (wrapping step: the updates still happen)."""
    order = []
    for name in ('optimizer_g', 'optimizer_potential'):
        optimizer = getattr(model, name)
        original = optimizer.step

        def step(*args, _name=name, _original=original, **kwargs):
            order.append(_name)
            return _original(*args, **kwargs)
        optimizer.step = step
    return order


def test_defaults_are_the_reference_and_the_steps_run_in_its_order(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    for key in ('optim_g', 'optim_potential'):
        opt['train'].pop(key)  # the defaults
    model = build_model(opt)
    assert [type(o).__name__ for o in model.optimizers] == ['RMSprop', 'RMSprop']
    lr_t, lr_f = model.get_current_learning_rate()
    assert (lr_t, lr_f) == (5e-5, 1e-4)  # lr_T = lr_F / 2
    assert model.optimizer_potential.defaults['alpha'] == 0.99 and model.optimizer_potential.defaults['eps'] == 1e-8
    assert len(model.schedulers) == 2
    assert model.is_noise_source.tolist() == [True, False]  # by the sources' names: noise, rain
    model.feed_data(_batch(opt))
    order = _steps(model)
    g0, p0 = _snapshot(model.net_g), _snapshot(model.net_potential)
    losses = model.potential_step()
    assert order == ['optimizer_potential', 'optimizer_potential']  # critic loss, then the penalty
    assert _changed(p0, model.net_potential) and not _changed(g0, model.net_g)
    p1 = _snapshot(model.net_potential)
    losses.update(model.transport_step())
    assert order[2:] == ['optimizer_g']
    assert _changed(g0, model.net_g) and not _changed(p1, model.net_potential)
    assert {'l_critic', 'l_gp', 'l_transport', 'l_cost', 'l_fourier', 'l_ctr', 'l_pix'} <= set(losses)
    order.clear()
    model.optimize_parameters(1)
    assert order == ['optimizer_potential', 'optimizer_potential', 'optimizer_g']
    for _ in range(3):  # the schedule steps both together: the ratio holds
        model.update_learning_rate(4)
    lr_t, lr_f = model.get_current_learning_rate()
    assert lr_t == pytest.approx(lr_f / 2)
    log = model.get_current_log()
    assert {'l_critic', 'l_pix', 'f_noise', 'f_rain'} <= set(log) and all(isinstance(v, float) for v in log.values())


def test_summed_penalty_and_reused_forward(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir, gp_mode='summed', potential_step='reuse')
    model = build_model(opt)
    model.feed_data(_batch(opt))
    order = _steps(model)
    calls = []
    model.net_g.register_forward_hook(lambda *a: calls.append(1))
    model.optimize_parameters(1)
    assert order == ['optimizer_potential', 'optimizer_g'] and len(calls) == 1
    opt = _opt(workdir, potential_step='recompute', potential_iters=2)
    model = build_model(opt)
    model.feed_data(_batch(opt))
    order = _steps(model)
    calls = []
    model.get_bare_model(model.net_g).register_forward_hook(lambda *a: calls.append(1))
    model.optimize_parameters(1)
    assert order == ['optimizer_potential'] * 4 + ['optimizer_g'] and len(calls) == 2


def test_pairing_options(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir, pairing='unpaired', unpaired_shuffle=True)
    model = build_model(opt)
    model.feed_data(_batch(opt))
    losses = model.transport_step(paired=model.is_paired(1))
    assert 'l_pix' not in losses and 'l_ctr' not in losses and 'l_fourier' in losses
    assert sorted(model.potential_targets(False).flatten(1).sum(1).tolist()) == pytest.approx(
        sorted(model.gt.flatten(1).sum(1).tolist()))  # the same targets, in another order
    model = build_model(_opt(workdir, pairing='unpaired', unpaired_contrastive=True))
    model.feed_data(_batch(opt))
    assert 'l_ctr' in model.transport_step(paired=False)
    # first_n: the first pairnum samples of every epoch (16 samples, batch 3: 5 iterations per epoch)
    model = build_model(_opt(workdir, pairing='first_n', pairnum=6))
    assert [model.is_paired(i) for i in range(1, 12)] == [True, True, False, False, False] * 2 + [True]


def test_a_batch_of_one_trains(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    model = build_model(opt)
    model.feed_data(_batch(opt, size=1))
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert log['l_ctr'] == 0.0 and np.isfinite(log['l_transport'])


def test_noise_sources_by_name():
    assert default_noise_sources(['denoise_25', 'rain', 'Gaussian_Noise', 'haze']) == ['denoise_25', 'Gaussian_Noise']


def test_weights_holding_nan_are_never_saved(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    model = build_model(_opt(workdir))
    with torch.no_grad():
        next(model.get_bare_model(model.net_g).parameters()).fill_(float('nan'))
    model.save(0, 2)
    assert not list((workdir / 'experiments').rglob('*.pth')) and not list((workdir / 'experiments').rglob('*.state'))


def test_test_mode_builds_only_the_transport_map():
    opt = yaml.safe_load((REPO / 'options' / 'test_darcot_demo.yml').read_text())
    opt.update(dist=False, rank=0, world_size=1, is_train=False, num_gpu=0)
    opt['path']['pretrain_network_g'] = None
    model = build_model(opt)
    assert type(model).__name__ == 'DARCOTModel' and not hasattr(model, 'net_potential')
    model.feed_data({'lq': torch.rand(1, 3, 29, 51)})
    model.test()
    assert model.output.shape == (1, 3, 29, 51)
    train = yaml.safe_load((REPO / 'options' / 'train_darcot_demo.yml').read_text())
    assert opt['network_g'] == train['network_g']
    assert yaml.safe_load((REPO / 'options' / 'test_darcot_demo.yml').read_text())['path']['pretrain_network_g'] == \
        f'experiments/{train["name"]}/models/net_g_latest.pth'
    baryir = yaml.safe_load((REPO / 'options' / 'train_baryir_demo.yml').read_text())
    assert train['datasets'] == baryir['datasets'] and train['manual_seed'] == baryir['manual_seed']  # same budget
    assert train['train']['total_iter'] == baryir['train']['total_iter']


# ------------------------------------------------------------------------------------------------
# bad options: one line naming the option and the fix, before any work
BAD = [
    ('train.pairing', 'paird', ['train.pairing', "did you mean 'paired'"]),
    ('train.gp_mode', 'joint', ['train.gp_mode must be one of', "'joint'"]),
    ('train.sigma', '1e-4', ['train.sigma must be a number', '!!float']),
    ('train.potential_iter', 1, ['train.potential_iter', "did you mean 'potential_iters'"]),
    ('train.pairnum', 10, ['train.pairnum is set but train.pairing', 'first_n']),
    ('train.contrastive_opt', {'type': 'ResidualContrastiveLoss', 'temperature': 0.1},
     ['train.contrastive_opt.temperature', 'ResidualContrastiveLoss']),
    ('train.cost_opt', {'type': 'FROTCostLoss', 'cost': 'rms'}, ['FROTCostLoss', 'cost']),
    ('train.noise_sources', ['snow'], ['train.noise_sources', "'snow'"]),
    ('network_g.condition', 'prompt', ['DARCOT', 'condition must be one of']),
    ('network_g.conditon', 'none', ['network_g.conditon', "did you mean 'condition'"]),
    ('network_potential.patch_size', 64, ['network_potential.patch_size is 64', 'gt_size is 32']),
    ('network_potential', None, ['network_potential is missing', 'DARCOTPotential']),
    ('train.irc_opt', {'type': 'IRCLoss'}, ['train.irc_opt is not an option of DARCOTModel']),
]


@pytest.mark.parametrize('option, value, needles', BAD, ids=[c[0] for c in BAD])
def test_bad_option_is_one_line(workdir, option, value, needles):
    opt = yaml.safe_load(MODEL_YML.read_text())
    *parents, last = option.split('.')
    node = opt
    for key in parents:
        node = node[key]
    if value is None:
        node.pop(last)
    else:
        node[last] = value
    path = workdir / 'bad.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    outcome = run_inprocess(baryir_plugin.cli.basicsr_main, ['train', '-opt', path.name], cwd=workdir)
    assert_clean_error(outcome, 'basicsr train', *needles)


def test_contrastive_needs_the_second_pass(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    opt['network_g']['condition'] = 'none'
    with pytest.raises(ValueError, match="contrastive_opt needs the residual embedding"):
        build_model(opt)
    opt['train']['contrastive_opt'] = None
    assert build_model(opt).cri_ctr is None


# ------------------------------------------------------------------------------------------------
# the recipes
RECIPES = {'3deg': (['noise', 'rain', 'haze'], 50), '5deg': (['noise', 'rain', 'haze', 'blur', 'lowlight'], 55)}


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_recipe_values_are_the_reference(recipe):
    opt = yaml.safe_load((REPO / 'options' / f'train_darcot_{recipe}.yml').read_text())
    names, epochs = RECIPES[recipe]
    train_data = opt['datasets']['train']
    assert [s['name'] for s in train_data['sources']] == names
    assert train_data['gt_size'] == opt['network_potential']['patch_size'] == 128 and train_data['batch_size_per_gpu'] == 2
    sizes = {s.key.split('/')[1]: s.expected_lq for s in select([f'{recipe}-train'])}
    per_epoch = sum(sizes[s['name']] * len(s.get('sigmas', [1])) * s.get('repeat', 1)
                    for s in train_data['sources']) // 2  # BasicSR drops the last incomplete batch
    train = opt['train']
    assert train['total_iter'] == epochs * per_epoch
    assert train['scheduler'] == {'type': 'MultiStepLR', 'milestones': [15 * per_epoch, 30 * per_epoch, 45 * per_epoch],
                                  'gamma': 0.1}
    assert opt['val']['val_freq'] == per_epoch
    assert train['optim_g'] == {'type': 'RMSprop', 'lr': 5e-5, 'alpha': 0.99, 'eps': 1e-8}
    assert train['optim_potential'] == {'type': 'RMSprop', 'lr': 1e-4, 'alpha': 0.99, 'eps': 1e-8}
    assert train['pixel_opt']['loss_weight'] == 1e4 and train['sigma'] == 1.0
    assert train['gp_opt']['loss_weight'] == 10 and train['contrastive_opt']['loss_weight'] == 0.1
    noise = train_data['sources'][0]
    assert noise['repeat'] == 5 and noise['sigmas'] == ([15, 25, 50] if recipe == '3deg' else [25])
    test = yaml.safe_load((REPO / 'options' / f'test_darcot_{recipe}.yml').read_text())
    assert test['network_g'] == opt['network_g']
    assert test['path']['pretrain_network_g'] == f'experiments/{opt["name"]}/models/net_g_latest.pth'


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_recipe_builds_the_full_model_on_a_layout_tree(recipe, tmp_path, monkeypatch):
    from basicsr.utils.options import parse_options

    from .fake_tree import make_fake_tree
    make_fake_tree(tmp_path / 'datasets', size=(136, 132))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(REPO / 'options' / f'train_darcot_{recipe}.yml')])
    opt, _ = parse_options(str(tmp_path), is_train=True)
    from baryir_plugin.options_check import check_options
    check_options(copy.deepcopy(opt), 'recipe')  # what `basicsr train` checks first
    torch.manual_seed(0)
    model = build_model(opt)
    assert sum(p.numel() for p in model.net_g.parameters()) == 49_927_630
    assert sum(p.numel() for p in model.net_potential.parameters()) == 30_588_609
    assert model.source_names == RECIPES[recipe][0] and model.is_noise_source.tolist()[0] is True
    assert [s.milestones for s in model.schedulers] == [
        {m: 1 for m in opt['train']['scheduler']['milestones']}] * 2


# ------------------------------------------------------------------------------------------------
# `basicsr train` itself
def _log(exp: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(exp.glob('train_*.log')))


def test_basicsr_train_validates_saves_and_resumes(workdir):
    basicsr = bin_path('basicsr')
    run([basicsr, 'train', '-opt', str(MODEL_YML)], cwd=workdir, env=ONE_THREAD)
    exp = workdir / 'experiments' / 'darcot_model_tiny'
    models = {p.name for p in (exp / 'models').iterdir()}
    assert {'net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth', 'net_potential_4.pth', 'net_potential_latest.pth'} <= models
    log = _log(exp)
    assert re.search(r'Validation tiny_val_noise\n\t # psnr: [0-9.]+', log)
    assert re.search(r'iter:\s+4,.*l_critic.*l_gp.*l_transport.*l_cost.*l_fourier.*l_ctr.*l_pix', log)
    state = torch.load(exp / 'training_states' / '4.state', weights_only=True)
    assert state['iter'] == 4 and len(state['optimizers']) == 2 and len(state['schedulers']) == 2
    assert state['source_names'] == ['noise', 'rain'] and len(state['rng']) == 1
    saved = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)
    assert saved['baryir_config']['type'] == 'DARCOT' and 'regm.latent.0.attn.temperature' in saved['params']

    run([basicsr, 'train', '-opt', str(MODEL_YML), '--auto_resume', '--force_yml', 'train:total_iter=6'],
        cwd=workdir, env=ONE_THREAD)
    log = _log(exp)
    assert 'Resuming training from epoch: 0, iter: 4.' in log
    assert re.search(r'iter:\s+6,', log) and (exp / 'training_states' / '6.state').is_file()


def test_demo_config_under_torchrun_gloo(tmp_path):
    demo.build(str(tmp_path / 'datasets' / 'demo'), preset='demo')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'baryir_plugin',
           'train', '-opt', str(REPO / 'options' / 'train_darcot_demo.yml'), '--launcher', 'pytorch', '--force_yml',
           'train:total_iter=4', 'logger:save_checkpoint_freq=2', 'logger:print_freq=1', 'name=darcot_ddp',
           'train:potential_step=recompute']
    run(cmd, cwd=tmp_path, timeout=600)
    exp = tmp_path / 'experiments' / 'darcot_ddp'
    log = _log(exp)
    assert 'World size (gpu number): 2' in log
    assert re.search(r'iter:\s+4,.*l_gp', log)
    sets = re.findall(r'Validation (demo_val_\w+)\n\t # psnr: ([0-9.]+)', log)
    assert [name for name, _ in sets] == [f'demo_val_{s}' for s in ('noise', 'rain', 'haze', 'blur', 'lowlight')]
    assert len(re.findall(r'Validation average\n\t # psnr: ([0-9.]+)', log)) == 1
    assert {'net_g_latest.pth', 'net_potential_latest.pth', 'net_g_4.pth'} <= {p.name for p in (exp / 'models').iterdir()}
    state = torch.load(exp / 'training_states' / '4.state', weights_only=True)
    assert len(state['rng']) == 2  # one random state per rank


def test_ranks_stay_equal_under_gloo(tmp_path):
    """Each rank trains on its own samples: both networks stay equal across ranks only if every step's
    gradients (the critic's, the hand-averaged penalty's, the transport map's) are averaged."""
    driver = tmp_path / 'driver.py'
    driver.write_text(_RANK_DRIVER)
    ranks = tmp_path / 'ranks'
    ranks.mkdir()
    demo.build(str(tmp_path / 'datasets' / 'tiny'), preset='tiny')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver), str(ranks),
           'train', '-opt', str(MODEL_YML), '--launcher', 'pytorch', '--force_yml', 'train:total_iter=2',
           'val:val_freq=100', 'name=darcot_ranks']
    run(cmd, cwd=tmp_path, timeout=600)
    saved = {r: torch.load(ranks / f'2_rank{r}.pt', weights_only=True) for r in (0, 1)}
    for net in ('net_g', 'net_potential'):
        for key, value in saved[0][net].items():
            assert torch.equal(value, saved[1][net][key]), f'{net}.{key} differs between ranks'


_RANK_DRIVER = '''
import os, sys, torch
import baryir_plugin
from baryir_plugin.models.darcot_model import DARCOTModel
from baryir_plugin.cli import main

folder = sys.argv[1]
original = DARCOTModel.save
def save(self, epoch, current_iter):
    original(self, epoch, current_iter)
    nets = {name: {k: v.detach().cpu().clone() for k, v in self.get_bare_model(net).state_dict().items()}
            for name, net in (('net_g', self.net_g), ('net_potential', self.net_potential))}
    torch.save(nets, os.path.join(folder, f"{current_iter}_rank{os.environ['RANK']}.pt"))
DARCOTModel.save = save
sys.exit(main(sys.argv[2:]))
'''
