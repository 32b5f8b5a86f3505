"""BaryIRModel and AllInOneDataset: the training step, lambdas, exact resume, DDP."""
from __future__ import annotations

import json
import re
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from basicsr.data import build_dataset
from basicsr.models import build_model

from baryir_plugin.data import demo
from baryir_plugin.models import barycenter_weights

from .conftest import OPTIONS, REPO, copy_for_resume, run

MODEL_YML = OPTIONS / 'train_baryir_model.yml'


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


def _batch(opt: dict) -> dict:
    dataset = build_dataset(opt['datasets']['train'])
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    for batch in loader:
        if len(set(batch['source_id'].tolist())) == 2:
            return batch
    raise AssertionError('no batch with both sources')


def _snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module, prefix: str = '') -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if k.startswith(prefix))


def test_lambda_modes():
    counts = [100, 300]
    assert torch.allclose(barycenter_weights(counts, 'proportional'), torch.tensor([0.25, 0.75]))
    assert torch.allclose(barycenter_weights(counts, 'inverse'), torch.tensor([0.75, 0.25]))
    assert torch.allclose(barycenter_weights(counts, 'uniform'), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match='lambda_mode'):
        barycenter_weights(counts, 'softmax')
    with pytest.raises(ValueError, match='positive'):
        barycenter_weights([0, 3])


def test_all_in_one_dataset_sources_labels_and_counts(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    ds = build_dataset(opt['datasets']['train'])
    assert ds.source_names == ['noise', 'rain']
    assert ds.source_counts == [4 * 2, 4 * 2]  # 4 clean tiles x 2 sigmas; 4 rain pairs x repeat 2
    assert ds.degradation_names == ['noise_15', 'noise_50', 'rain']
    assert ds.source_index('rain') == 1
    with pytest.raises(KeyError, match="no source named 'snow'"):
        ds.source_index('snow')
    seen = Counter((int(s['source_id']), int(s['degradation_id'])) for s in (ds[i] for i in range(len(ds))))
    assert seen == {(0, 0): 4, (0, 1): 4, (1, 2): 8}
    sample = ds[0]
    assert sample['lq'].shape == sample['gt'].shape == (3, 32, 32)


def test_all_in_one_dataset_options_are_checked(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)['datasets']['train']
    bad = dict(opt, sources=[opt['sources'][0], dict(opt['sources'][0])])
    with pytest.raises(ValueError, match="'noise' appears twice"):
        build_dataset(bad)
    with pytest.raises(ValueError, match='needs `name` and `type`'):
        build_dataset(dict(opt, sources=[{'type': 'PairedImageDataset'}]))
    with pytest.raises(ValueError, match='non-empty list'):
        build_dataset(dict(opt, sources=[]))


def test_noise_source_matches_the_reference_formula_and_is_fixed_at_test_time(workdir):
    import numpy as np

    from baryir_plugin.data import gaussian_noise
    clean = np.full((4, 4, 3), 250, np.uint8)
    noisy = gaussian_noise(clean, np.random.default_rng(0), 25)
    expected = np.clip(250 + np.random.default_rng(0).standard_normal((4, 4, 3)).astype(np.float32) * 25, 0, 255)
    assert np.array_equal(noisy, expected.astype(np.uint8))  # clip, then truncate
    opt = {'name': 'n', 'type': 'GaussianNoiseDataset', 'phase': 'val', 'sigmas': [25],
           'dataroot_gt': str(workdir / 'datasets' / 'tiny' / 'train' / 'clean')}
    a, b = build_dataset(opt), build_dataset(opt)
    assert torch.equal(a[1]['lq'], b[1]['lq']) and not torch.equal(a[1]['lq'], a[1]['gt'])


def test_dihedral_augmentation_covers_all_eight_including_identity(workdir):
    import random

    opt = {'name': 'n', 'type': 'GaussianNoiseDataset', 'phase': 'train', 'sigmas': [0], 'gt_size': 48,
           'use_hflip': True, 'use_rot': True, 'dataroot_gt': str(workdir / 'datasets' / 'tiny' / 'train' / 'clean')}
    ds = build_dataset(opt)
    base = build_dataset(dict(opt, phase='val'))[0]['gt']  # 48x48 tile = the whole image, no crop freedom
    variants = [base.rot90(k, dims=(1, 2)) for k in range(4)]
    variants += [v.flip(2) for v in variants]
    random.seed(0)
    seen = set()
    for _ in range(80):
        out = ds[0]['gt']
        seen.add(next(i for i, v in enumerate(variants) if torch.equal(out, v)))
    assert seen == set(range(8))


def test_channel_permute_applies_one_colour_order_to_both_images(workdir):
    import itertools
    import random

    rain = str(workdir / 'datasets' / 'tiny' / 'train' / 'rain')
    opt = {'name': 'mix', 'type': 'AllInOneDataset', 'phase': 'train', 'gt_size': 48, 'use_hflip': False,
           'use_rot': False, 'io_backend': {'type': 'disk'}, 'channel_permute': True,
           'sources': [{'name': 'rain', 'type': 'PairedImageDataset', 'dataroot_gt': f'{rain}/gt',
                        'dataroot_lq': f'{rain}/lq', 'filename_tmpl': '{}'}]}
    base = build_dataset(dict(opt, phase='val'))[0]  # 48x48 tiles: no crop freedom, no flips
    assert torch.equal(build_dataset(dict(opt, channel_permute=False))[0]['lq'], base['lq'])
    ds = build_dataset(opt)
    orders = [list(p) for p in itertools.permutations(range(3))]
    random.seed(0)
    seen = set()
    for _ in range(60):
        sample = ds[0]
        order = next(i for i, p in enumerate(orders) if torch.equal(sample['gt'], base['gt'][p]))
        assert torch.equal(sample['lq'], base['lq'][orders[order]])  # the same order for the pair
        seen.add(order)
    assert seen == set(range(6))
    with pytest.raises(ValueError, match='channel_permute needs 3-channel'):
        build_dataset(dict(opt, color='y'))[0]


def test_training_step_updates_the_right_networks(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    model = build_model(opt)
    assert [type(o).__name__ for o in model.optimizers] == ['RMSprop', 'RMSprop']
    assert len(model.schedulers) == 2
    assert torch.allclose(model.lambdas, torch.tensor([0.5, 0.5]))
    model.feed_data(_batch(opt))

    g0, p0 = _snapshot(model.net_g), _snapshot(model.net_potential)
    losses = model.network_step()
    assert {'l_pix', 'l_mwb', 'l_irc', 'l_bro', 'transport_cost'} <= set(losses)
    assert _changed(g0, model.net_g, 'bary_map.') and _changed(g0, model.net_g, 'encoder1.')
    assert _changed(g0, model.net_g, 'latent.')
    assert not _changed(p0, model.net_potential), 'the network step must not move the potentials'

    g1 = _snapshot(model.net_g)
    losses = model.potential_step()
    assert set(losses) == {'l_potential', 'l_congruence', 'congruence'}
    assert _changed(p0, model.net_potential, 'fc1_weight') and _changed(p0, model.net_potential, 'conv_weight')
    assert not _changed(g1, model.net_g), 'the potential step must not move the network'

    model.optimize_parameters(1)
    log = model.get_current_log()
    assert {'l_pix', 'l_mwb', 'l_potential', 'f_noise', 'f_rain'} <= set(log)
    assert all(isinstance(v, float) for v in log.values())


def test_without_sources_one_potential_and_irc_skipped(workdir, monkeypatch, caplog):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    opt['datasets']['train'] = dict(opt['datasets']['val'], phase='train', gt_size=32, use_hflip=True,
                                    use_rot=True, batch_size_per_gpu=2, name='plain',
                                    dataroot_gt='datasets/tiny/train/rain/gt', dataroot_lq='datasets/tiny/train/rain/lq')
    opt['network_potential']['num_potentials'] = 1
    model = build_model(opt)
    assert model.source_names == ['all'] and model.cri_irc is None
    ds = build_dataset(opt['datasets']['train'])
    model.feed_data(next(iter(torch.utils.data.DataLoader(ds, batch_size=2))))
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert 'l_irc' not in log and 'l_mwb' in log

    opt['network_potential']['num_potentials'] = 3
    with pytest.raises(ValueError, match='num_potentials is 3 but the training data has 1 source'):
        build_model(opt)


def test_reuse_mode_skips_the_second_forward(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir, potential_step='reuse')
    model = build_model(opt)
    model.feed_data(_batch(opt))
    calls = []
    model.net_g.register_forward_hook(lambda *a: calls.append(1))
    model.optimize_parameters(1)
    assert len(calls) == 1
    opt = _opt(workdir, potential_step='recompute')
    model = build_model(opt)
    model.feed_data(_batch(opt))
    calls.clear()
    model.net_g.register_forward_hook(lambda *a: calls.append(1))
    model.optimize_parameters(1)
    assert len(calls) == 2


_DRIVER = textwrap.dedent('''
    import json, sys
    import baryir_plugin
    from baryir_plugin.models.baryir_model import BaryIRModel
    from baryir_plugin.cli import main

    record = sys.argv[1]  # sys.argv is rewritten for BasicSR's option parser
    original = BaryIRModel.optimize_parameters
    def recording(self, current_iter):
        original(self, current_iter)
        with open(record, 'a') as f:
            f.write(json.dumps({'iter': current_iter, **self.get_current_log()}) + '\\n')
    BaryIRModel.optimize_parameters = recording
    sys.exit(main(sys.argv[2:]))
''')


def _losses(path: Path) -> dict[int, dict]:
    return {r['iter']: r for r in map(json.loads, path.read_text().splitlines())}


def test_resume_reproduces_the_uninterrupted_run(workdir, tmp_path):
    """6 iterations straight vs. stop after 2 and --auto_resume: iterations 3-6 (mid-epoch resume and
    an epoch boundary: 16 samples, batch 3 -> 5 iterations per epoch) give the same losses."""
    driver = tmp_path / 'driver.py'
    driver.write_text(_DRIVER)
    straight = tmp_path / 'straight.jsonl'
    run([sys.executable, str(driver), str(straight), 'train', '-opt', str(MODEL_YML)], cwd=workdir)

    resumed_dir = copy_for_resume(workdir, tmp_path / 'resumed')
    src = workdir / 'experiments' / 'baryir_model_tiny'
    resumed = tmp_path / 'resumed.jsonl'
    run([sys.executable, str(driver), str(resumed), 'train', '-opt', str(MODEL_YML), '--auto_resume'], cwd=resumed_dir)

    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [3, 4, 5, 6]
    for it in (3, 4, 5, 6):
        for key, value in a[it].items():
            assert b[it][key] == pytest.approx(value, abs=1e-5), f'iter {it} {key}: {b[it][key]} vs {value}'
    state = torch.load(src / 'training_states' / '2.state', weights_only=True)
    assert len(state['optimizers']) == 2 and len(state['schedulers']) == 2
    assert state['source_names'] == ['noise', 'rain'] and len(state['rng']) == 1


_RANK_DRIVER = textwrap.dedent('''
    import os, sys, torch
    import baryir_plugin
    from baryir_plugin.models.baryir_model import BaryIRModel
    from baryir_plugin.cli import main

    folder = sys.argv[1]  # every rank writes its own copy of both networks at each save
    original = BaryIRModel.save
    def save(self, epoch, current_iter):
        original(self, epoch, current_iter)
        nets = {name: {k: v.detach().cpu().clone() for k, v in self.get_bare_model(net).state_dict().items()}
                for name, net in (('net_g', self.net_g), ('net_potential', self.net_potential))}
        torch.save(nets, os.path.join(folder, f"{current_iter}_rank{os.environ['RANK']}.pt"))
    BaryIRModel.save = save
    sys.exit(main(sys.argv[2:]))
''')


def test_demo_config_under_torchrun_gloo(tmp_path):
    demo.build(str(tmp_path / 'datasets' / 'demo'), preset='demo')
    driver, ranks = tmp_path / 'driver.py', tmp_path / 'ranks'
    driver.write_text(_RANK_DRIVER)
    ranks.mkdir()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver), str(ranks),
           'train', '-opt', str(REPO / 'options' / 'train_baryir_demo.yml'), '--launcher', 'pytorch', '--force_yml',
           'train:total_iter=4', 'logger:save_checkpoint_freq=2', 'logger:print_freq=1',
           'train:gather_embeddings=true', 'name=demo_ddp']
    run(cmd, cwd=tmp_path, timeout=600)
    # Each rank trains on its own samples, so the ranks stay equal only if both networks' gradients
    # (restoration network and potentials) are averaged across them at every step.
    saved = {(it, r): torch.load(ranks / f'{it}_rank{r}.pt', weights_only=True) for it in (2, 4) for r in (0, 1)}
    for it in (2, 4):
        for net in ('net_g', 'net_potential'):
            for key, value in saved[it, 0][net].items():
                assert torch.equal(value, saved[it, 1][net][key]), f'{net}.{key} differs between ranks at iter {it}'
    for net in ('net_g', 'net_potential'):
        assert any(not torch.equal(v, saved[4, 0][net][k]) for k, v in saved[2, 0][net].items()), f'{net} did not train'
    exp = tmp_path / 'experiments' / 'demo_ddp'
    log = '\n'.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'World size (gpu number): 2' in log
    assert re.search(r'iter:\s+4,.*l_irc', log)
    # final validation on the five demo sets, then their average (rank 0 alone validates)
    sets = re.findall(r'Validation (demo_val_\w+)\n\t # psnr: ([0-9.]+)', log)
    assert [name for name, _ in sets] == [f'demo_val_{s}' for s in ('noise', 'rain', 'haze', 'blur', 'lowlight')]
    average = re.findall(r'Validation average\n\t # psnr: ([0-9.]+)', log)
    assert len(average) == 1
    assert float(average[0]) == pytest.approx(np.mean([float(v) for _, v in sets]), abs=2e-4)
    inputs = [float(v) for v in re.findall(r'Inputs of demo_val_\w+: psnr: ([0-9.]+)', log)]
    assert float(re.search(r'Inputs of average: psnr: ([0-9.]+)', log).group(1)) == pytest.approx(
        np.mean(inputs), abs=2e-4)
    assert {'net_g_latest.pth', 'net_potential_latest.pth', 'net_potential_4.pth'} <= {
        p.name for p in (exp / 'models').iterdir()}
    state = torch.load(exp / 'training_states' / '4.state', weights_only=True)
    assert len(state['rng']) == 2  # one random state per rank


def test_test_mode_builds_only_the_restoration_network():
    opt = yaml.safe_load((REPO / 'options' / 'test_baryir_demo.yml').read_text())
    opt.update(dist=False, rank=0, world_size=1, is_train=False, num_gpu=0)
    opt['path']['pretrain_network_g'] = None
    model = build_model(opt)
    assert type(model).__name__ == 'BaryIRModel' and not hasattr(model, 'net_potential')
    model.feed_data({'lq': torch.rand(1, 3, 29, 51)})
    model.test()
    assert model.output.shape == (1, 3, 29, 51)


def test_demo_test_file_restores_the_network_the_demo_trains():
    train = yaml.safe_load((REPO / 'options' / 'train_baryir_demo.yml').read_text())
    test = yaml.safe_load((REPO / 'options' / 'test_baryir_demo.yml').read_text())
    assert test['network_g'] == train['network_g']
    assert test['path']['pretrain_network_g'] == f'experiments/{train["name"]}/models/net_g_latest.pth'
    potentials, data = train['network_potential'], train['datasets']['train']
    assert potentials['num_potentials'] == len(data['sources'])
    assert potentials['in_channels'] == 8 * train['network_g']['dim']
    assert potentials['patch_size'] == data['gt_size']


def test_potential_log_skips_sources_missing_from_the_batch(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    model = build_model(opt)
    both = _batch(opt)
    only = {k: v[both['source_id'] == 0] for k, v in both.items() if torch.is_tensor(v)}
    model.feed_data(only)
    model.optimize_parameters(1)
    assert np.isnan(model.get_current_log()['f_rain'])  # no rain sample seen yet: not a number, not 0
    model.feed_data(both)
    with torch.no_grad():
        z_bary = model.net_g(model.lq, return_latents=True)[2]
        scores = model.net_potential(z_bary, model.source_id)
    expected = scores[model.source_id == 1].mean()
    model.optimize_parameters(2)
    assert model.get_current_log()['f_rain'] == pytest.approx(float(expected), abs=1e-6)
    model.feed_data(only)
    model.optimize_parameters(3)
    log = model.get_current_log()
    assert log['f_rain'] == pytest.approx(float(expected), abs=1e-6)  # kept, not reset to 0
    assert not np.isnan(log['f_noise'])


def test_log_is_the_interval_mean_read_once(workdir, monkeypatch):
    """The step keeps its loss values on the device; get_current_log averages them over the interval."""
    monkeypatch.chdir(workdir)
    opt = _opt(workdir)
    model = build_model(opt)
    model.feed_data(_batch(opt))
    seen = []
    original = model.network_step

    def recording():
        losses = original()
        seen.append(float(losses['l_pix']))
        return losses
    model.network_step = recording
    for it in (1, 2, 3):
        model.optimize_parameters(it)
    assert all(torch.is_tensor(v) for v in model.interval_log.sums.values())
    assert model.get_current_log()['l_pix'] == pytest.approx(sum(seen) / 3, rel=1e-6)
    assert not model.interval_log  # emptied by the read
