"""Bad options end in one line naming the option and the file, before any work starts; BaryIRModel reads its
options once into typed objects; a metric that has no value for one image is unavailable for that image."""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import baryir_plugin.cli
from baryir_plugin.errors import OptionError
from baryir_plugin.models.options import (BASICSR_TRAIN_KEYS, NONFINITE_POLICIES, BaryIRTrainOptions,
                                          BaryIRValOptions)
from baryir_plugin.models.validation import score_image
from baryir_plugin.models.validation_report import ValidationReport
from baryir_plugin.options_check import check_options

from .bad_input import assert_clean_error, run_inprocess
from .conftest import OPTIONS, REPO

MODEL_YML = OPTIONS / 'train_baryir_model.yml'
PROG = 'basicsr train'


def _base() -> dict:
    return yaml.safe_load(MODEL_YML.read_text())


def _write(folder: Path, opt, name: str = 'bad.yml') -> Path:
    path = folder / name
    path.write_text(opt if isinstance(opt, str) else yaml.safe_dump(opt, sort_keys=False))
    return path


def _train(workdir: Path, opt, *extra: str):
    path = _write(workdir, opt)
    return run_inprocess(baryir_plugin.cli.basicsr_main, ['train', '-opt', path.name, *extra], cwd=workdir)


def _set(opt: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split('.')
    node = opt
    for key in parents:
        node = node[key]
    if value is _DROP:
        node.pop(last)
    else:
        node[last] = value
    return opt


_DROP = object()

# (option, value (or _DROP), words the one error line must hold)
CASES = [
    ('network_g.dimm', 8, ['network_g.dimm', "did you mean 'dim'"]),
    ('network_g.dim', 'abc', ["network_g.dim must be an integer, got 'abc'"]),
    ('network_g.num_blocks', 4, ['network_g.num_blocks must be a list of integers']),
    ('network_g.type', 'BaryIRR', ['network_g.type', "did you mean 'BaryIR'"]),
    ('network_potential.num_potential', 2, ['network_potential.num_potential', "did you mean 'num_potentials'"]),
    ('network_potential', _DROP, ['network_potential is missing']),
    ('model_type', 'BaryIRModle', ['model_type', "did you mean 'BaryIRModel'"]),
    ('use_ampp', True, ['use_ampp', "did you mean 'use_amp'"]),
    ('use_amp', 'yes please', ['use_amp must be true or false']),
    ('no_such_option', 1, ['no_such_option is not an option BaryIRModel reads']),
    ('train.potential_iter', 2, ['train.potential_iter', "did you mean 'potential_iters'"]),
    ('train.nonfinite', 'sometimes', ['train.nonfinite must be one of', "'sometimes'"]),
    ('train.nonfinite_patience', 0, ['train.nonfinite_patience must be an integer >= 1']),
    ('train.potential_step', 'recompue', ['train.potential_step', "did you mean 'recompute'"]),
    ('train.barycenter_weight', '1e-4', ['train.barycenter_weight must be a number', '!!float']),
    ('train.total_iter', _DROP, ['train.total_iter is missing']),
    ('train.optim_g.type', 'RMSProp', ['train.optim_g.type', "did you mean 'RMSprop'"]),
    ('train.optim_g.alpah', 0.9, ['train.optim_g.alpah', "did you mean 'alpha'"]),
    ('train.optim_potential.lr', '1e-4', ['train.optim_potential.lr must be a number']),
    ('train.pixel_opt.type', 'L1loss', ['train.pixel_opt.type', "did you mean 'L1Loss'"]),
    ('train.pixel_opt.weight', 1.0, ['train.pixel_opt.weight', "did you mean 'loss_weight'"]),
    ('train.irc_opt', {'type': 'IRCLoss', 'temperature': 0.1}, ['train.irc_opt.temperature', 'IRCLoss']),
    ('train.scheduler.type', 'MultiStep', ['train.scheduler.type', "did you mean 'MultiStepLR'"]),
    ('train.scheduler.milestone', [3], ['train.scheduler.milestone', "did you mean 'milestones'"]),
    ('val.metrics.psnr.type', 'calculate_psrn', ['val.metrics.psnr.type', "did you mean 'calculate_psnr'"]),
    ('val.metrics.psnr.crop_bordr', 0, ['val.metrics.psnr.crop_bordr', "did you mean 'crop_border'"]),
    ('val.metrics.psnr.better', 'more', ['val.metrics.psnr.better']),
    ('val.val_frq', 2, ['val.val_frq', "did you mean 'val_freq'"]),
    ('val.self_ensemble', 'yes', ['val.self_ensemble must be true or false']),
    ('logger.print_frq', 1, ['logger.print_frq', "did you mean 'print_freq'"]),
    ('logger.use_tb_logger', _DROP, ['logger.use_tb_logger is missing']),
    ('logger', _DROP, ['logger is missing']),
    ('path.pretrain_network_g', 'models/missing.pth', ['path.pretrain_network_g', 'models/missing.pth']),
    ('path.pretrain_network_gg', None, ['path.pretrain_network_gg', "did you mean 'pretrain_network_g'"]),
    ('datasets.train.type', 'AllInOneDatset', ['datasets.train.type', "did you mean 'AllInOneDataset'"]),
    ('datasets.test_1', {'name': 'x', 'type': 'PairedImageDataset'}, ['datasets.test_1']),
    ('dist_params', {'backend': 'gloo', 'prot': 1}, ['dist_params.prot', "did you mean 'port'"]),
]


@pytest.mark.parametrize('option, value, needles', CASES, ids=[c[0] + ('-drop' if c[1] is _DROP else '')
                                                             for c in CASES])
def test_bad_option_is_one_line_naming_it_and_the_file(workdir, option, value, needles):
    outcome = _train(workdir, _set(_base(), option, value))
    assert_clean_error(outcome, PROG, 'bad.yml', *needles)
    assert not (workdir / 'experiments').exists(), 'the check must come before any work'


@pytest.mark.parametrize('text, needles', [
    ('- name: a\n- model_type: b\n', ['bad.yml', 'mapping', 'a list']),
    ('', ['bad.yml', 'empty']),
    ('model_type: BaryIRModel\nnum_gpu: 0\ndatasets: {}\npath: {}\n', ['bad.yml', 'name is missing']),
    ('name: x\nnum_gpu: 0\npath: {}\ndatasets:\n  train: 3\n', ['bad.yml', 'model_type is missing']),
    ('name: x\nmodel_type: BaryIRModel\nnum_gpu: 0\npath: {}\ndatasets:\n  train: 3\n', ['datasets.train must be']),
    ('name: x\nmodel_type: BaryIRModel\nnum_gpu: two\npath: {}\ndatasets: {train: {}}\n', ['num_gpu must be']),
])
def test_option_file_basicsr_cannot_parse(workdir, text, needles):
    assert_clean_error(_train(workdir, text), PROG, *needles)


@pytest.mark.parametrize('entry, needles', [
    ('train:nosuch:x=1', ["'train:nosuch:x=1'", 'no train:nosuch']),
    ('name', ["--force_yml 'name'", 'KEY=VALUE']),
    ('train:total_iter=[1,2', ['not a list']),
    ('datasets:train:sources:x=1', ['datasets:train:sources is a list']),
    ('a"]=1', ['is not an option name']),
    ('train:potential_iter=2', ['train.potential_iter', "did you mean 'potential_iters'", 'set by --force_yml']),
])
def test_force_yml_entries_basicsr_cannot_apply(workdir, entry, needles):
    outcome = _train(workdir, _base(), '--force_yml', entry)
    assert_clean_error(outcome, PROG, 'bad.yml', *needles)


def test_what_basicsr_parser_still_raises_is_an_option_error_naming_the_file(workdir):
    opt = _set(_base(), 'val', None)  # valid, but BasicSR's --debug mode then writes opt['val']['val_freq']
    outcome = _train(workdir, opt, '--debug')  # --debug also shows the traceback, on purpose
    assert outcome.status == 1
    line = outcome.error_lines(PROG)[-1]
    assert 'bad.yml' in line and 'BasicSR cannot read the options' in line and 'internal error' not in outcome.err


def test_constructor_errors_at_build_time_name_the_type(workdir):
    opt = _set(_base(), 'train.mwb_opt', {'type': 'MWBLoss', 'cost': 'l3'})  # a value only the loss checks
    assert_clean_error(_train(workdir, opt), PROG, 'MWBLoss', 'cost')


def test_other_models_get_warnings_for_unknown_keys_but_errors_for_near_misses(monkeypatch, caplog):
    from basicsr.utils.options import parse_options

    path = OPTIONS / 'train_srmodel_baryir.yml'
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(path)])
    opt, _ = parse_options(str(REPO), is_train=True)
    opt['train']['my_plugin_option'] = 1
    opt['some_plugin_key'] = {'a': 1}
    with caplog.at_level(logging.WARNING, logger='baryir_plugin.options'):
        warnings = check_options(opt, str(path), check_files=False)
    assert any('train.my_plugin_option' in w for w in warnings)
    assert any('some_plugin_key' in w for w in warnings)
    assert any('some_plugin_key' in r.getMessage() for r in caplog.records)
    opt['use_ampp'] = True
    with pytest.raises(OptionError, match=r"use_ampp .*did you mean 'use_amp'"):
        check_options(opt, str(path), check_files=False)


def test_every_recipe_passes_the_checks(monkeypatch, tmp_path):
    from basicsr.utils.options import parse_options

    files = sorted((REPO / 'options').glob('*.yml')) + sorted(OPTIONS.glob('*.yml'))
    assert len(files) >= 10
    for path in files:
        monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(path)])
        opt, _ = parse_options(str(tmp_path), is_train=path.name.startswith('train_'))
        assert check_options(opt, str(path), check_files=False) == [], path.name


# --------------------------------------------------------------------------------------------------
def test_train_options_defaults_and_types():
    options = BaryIRTrainOptions.from_opt({})
    assert options.nonfinite == 'skip' and options.nonfinite_patience == 10
    assert options.potential_iters == 1 and options.potential_step == 'recompute'
    assert options.optim_g == {'type': 'RMSprop', 'lr': 1e-4, 'alpha': 0.99, 'eps': 1e-8}
    assert options.irc_opt == {'type': 'IRCLoss'} and options.checkpointing is None
    assert NONFINITE_POLICIES == ('skip', 'stop', 'ignore')
    assert set(BASICSR_TRAIN_KEYS) | {'nonfinite', 'nonfinite_patience', 'potential_iters'} <= \
        BaryIRTrainOptions.known_keys()
    options = BaryIRTrainOptions.from_opt({'irc_opt': None, 'bro_opt': {}, 'gamma': 1, 'lambdas': [0.25, 0.75],
                                           'checkpointing': {'stages': ['encoder1'], 'every': 2},
                                           'nonfinite': 'stop', 'nonfinite_patience': 3, 'total_iter': 5})
    assert options.irc_opt is None and options.bro_opt == {'type': 'BROLoss'}
    assert options.gamma == 1.0 and isinstance(options.gamma, float)
    assert options.lambdas == (0.25, 0.75) and options.checkpointing == (('encoder1',), 2)
    assert (options.nonfinite, options.nonfinite_patience) == ('stop', 3)
    with pytest.raises(AttributeError):
        options.gamma = 2  # frozen: read once


@pytest.mark.parametrize('train, message', [
    ({'potential_iter': 2}, r"train.potential_iter .*did you mean 'potential_iters'"),
    ({'potential_iters': 1.5}, 'train.potential_iters must be an integer'),
    ({'potential_iters': -1}, 'train.potential_iters must be an integer >= 0'),
    ({'gather_embeddings': 'no'}, 'train.gather_embeddings must be true or false'),
    ({'lambdas': [0.5, -0.5]}, 'train.lambdas must be a list of positive numbers'),
    ({'nonfinite_patience': True}, 'train.nonfinite_patience must be an integer'),
    ({'mwb_opt': {'cost': 'rms'}}, 'train.mwb_opt.type is missing'),
    ({'irc_labels': 'sources'}, r"train.irc_labels .*did you mean 'source'"),
    ({'checkpointing': 'yes'}, 'train.checkpointing must be true, false or'),
])
def test_train_options_errors_name_the_option(train, message):
    with pytest.raises(OptionError, match=message):
        BaryIRTrainOptions.from_opt(train)


def test_val_options():
    assert BaryIRValOptions.from_opt(None, is_train=False).report is True
    assert BaryIRValOptions.from_opt({}, is_train=True).report is False
    val = BaryIRValOptions.from_opt({'average': ['a', 'b'], 'self_ensemble': True, 'save_img': False,
                                     'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}}, True)
    assert val.average == ('a', 'b') and val.self_ensemble and list(val.metrics) == ['psnr']
    with pytest.raises(OptionError, match=r"val.reprot .*did you mean 'report'"):
        BaryIRValOptions.from_opt({'reprot': True}, is_train=False)
    with pytest.raises(OptionError, match='val.average must be true, false or a list'):
        BaryIRValOptions.from_opt({'average': 3}, is_train=False)


def test_model_reads_the_typed_options(workdir, monkeypatch):
    from basicsr.models import build_model

    from .test_baryir_model import _opt
    monkeypatch.chdir(workdir)
    model = build_model(_opt(workdir, potential_step='reuse', nonfinite='ignore', irc_opt=None))
    assert isinstance(model.train_options, BaryIRTrainOptions)
    assert model.train_options.potential_step == 'reuse' and model.train_options.nonfinite == 'ignore'
    assert model.cri_irc is None and model.cri_bro is not None
    assert isinstance(model.val_options, BaryIRValOptions) and model.val_options.report is False


# --------------------------------------------------------------------------------------------------
SSIM = {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}
PSNR = {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}


@pytest.mark.parametrize('shape', [(3, 5, 3), (2000, 8, 3)])
def test_ssim_of_a_tiny_image_is_unavailable_with_the_reason(shape):
    rng = np.random.default_rng(0)
    img, ref = (rng.integers(0, 256, shape).astype(np.uint8) for _ in range(2))
    value, reason = score_image({'img': img, 'img2': ref}, SSIM)
    assert value is None and '11x11' in reason and f'{shape[0]}x{shape[1]}' in reason
    value, reason = score_image({'img': img, 'img2': ref}, PSNR)
    assert np.isfinite(value) and reason is None
    assert score_image({'img': img, 'img2': img}, PSNR) == (None, 'calculate_psnr is inf: the image equals its '
                                                            'reference')


def test_report_means_skip_images_without_a_value_and_say_so(tmp_path):
    report = ValidationReport('mixed', {'psnr': PSNR, 'ssim': SSIM}, with_input=True)
    report.add('big', {'psnr': 30.0, 'ssim': 0.9}, {'psnr': 20.0, 'ssim': 0.5})
    report.add('tiny', {'psnr': 28.0}, {'psnr': 18.0}, missing={'ssim': 'too small', 'input_ssim': 'too small'})
    report.add('odd', {'psnr': 26.0, 'ssim': float('nan')}, {'psnr': 16.0, 'ssim': 0.7})
    assert report.means() == {'psnr': pytest.approx(28.0), 'ssim': pytest.approx(0.9)}
    assert report.means('input_') == {'psnr': pytest.approx(18.0), 'ssim': pytest.approx(0.6)}
    assert report.counts() == {'psnr': 3, 'ssim': 1}
    line = report.missing_summary()
    assert 'ssim unavailable for 2 of 3 image(s) (tiny: too small and 1 more)' in line
    assert 'input_ssim unavailable for 1 of 3' in line
    csv_path, json_path = report.write(str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(csv_path).read_text())))
    assert rows[1]['ssim'] == '' and 'ssim: too small' in rows[1]['unavailable']
    assert rows[2]['ssim'] == '' and 'not a finite number' in rows[2]['unavailable'] and rows[0]['unavailable'] == ''
    summary = json.loads(Path(json_path).read_text())['metrics']
    assert summary['ssim']['mean'] == pytest.approx(0.9) and summary['ssim']['images'] == 1
    assert set(summary['ssim']['unavailable_images']) == {'tiny', 'odd'}
    assert summary['ssim']['input_images'] == 2 and summary['psnr']['images'] == 3
    assert 'unavailable_images' not in summary['psnr']
    alone = ValidationReport('tiny_only', {'ssim': SSIM})
    alone.add('tiny', {}, missing={'ssim': 'too small'})
    assert alone.means() == {} and 'too small' in alone.summary()['metrics']['ssim']['unavailable']


class _Set:
    def __init__(self, items: list, name: str) -> None:
        self.items, self.dataset = items, type('D', (), {'opt': {'name': name}})()

    def __iter__(self):
        return iter(self.items)


def test_validation_of_tiny_images_reports_ssim_unavailable_not_nan(tmp_path):
    from basicsr.models import build_model

    net = {'type': 'BaryIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
           'heads': [1, 2, 4, 8], 'num_bary_blocks': 1}
    opt = {'name': 'tiny_eval', 'model_type': 'BaryIRModel', 'is_train': False, 'dist': False, 'num_gpu': 0,
           'scale': 1, 'network_g': net, 'datasets': {'test_1': {'name': 'shapes'}},
           'path': {'pretrain_network_g': None, 'results_root': str(tmp_path), 'visualization': str(tmp_path)},
           'val': {'save_img': False, 'metrics': {'psnr': PSNR, 'ssim': SSIM}}}
    torch.manual_seed(0)
    model = build_model(opt)
    batches = [{'lq': torch.rand(1, 3, *size), 'gt': torch.rand(1, 3, *size), 'lq_path': [f'{name}.png']}
               for name, size in (('square', (24, 24)), ('sliver', (3, 5)), ('tall', (200, 8)))]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger('basicsr')  # BasicSR's logger does not propagate once set up
    logger.addHandler(handler)
    try:
        model.nondist_validation(_Set(batches, 'shapes'), 'tiny_eval', None, False)
    finally:
        logger.removeHandler(handler)
    assert np.isfinite(model.metric_results['ssim']) and np.isfinite(model.metric_results['psnr'])
    summary = json.loads((tmp_path / 'metrics' / 'shapes.json').read_text())['metrics']
    assert summary['ssim']['images'] == 1 and set(summary['ssim']['unavailable_images']) == {'sliver', 'tall'}
    assert summary['psnr']['images'] == 3
    assert '11x11' in summary['ssim']['unavailable_images']['sliver']
    warnings = [r.getMessage() for r in records if 'unavailable for 2 of 3' in r.getMessage()]
    assert len(warnings) == 1 and 'shapes' in warnings[0]


def test_a_basicsr_esrgan_config_passes_without_warnings():
    """BasicSR's own option-file style (ESRGANModel: a discriminator, GAN and perceptual losses, wandb)."""
    opt = {
        'name': 'esrgan', 'model_type': 'ESRGANModel', 'scale': 4, 'num_gpu': 1, 'manual_seed': 0,
        'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1, 'auto_resume': False,
        'datasets': {'train': {'name': 'DIV2K', 'type': 'PairedImageDataset', 'dataroot_gt': 'gt', 'dataroot_lq': 'lq',
                               'io_backend': {'type': 'disk'}, 'gt_size': 128, 'use_hflip': True, 'use_rot': True,
                               'num_worker_per_gpu': 6, 'batch_size_per_gpu': 16, 'dataset_enlarge_ratio': 100,
                               'prefetch_mode': None, 'phase': 'train', 'scale': 4},
                     'val': {'name': 'Set14', 'type': 'PairedImageDataset', 'dataroot_gt': 'gt', 'dataroot_lq': 'lq',
                             'io_backend': {'type': 'disk'}, 'phase': 'val', 'scale': 4}},
        'network_g': {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 23},
        'network_d': {'type': 'VGGStyleDiscriminator', 'num_in_ch': 3, 'num_feat': 64},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None, 'param_key_g': 'params_ema',
                 'experiments_root': 'e', 'models': 'e/m', 'training_states': 'e/t', 'log': 'e',
                 'visualization': 'e/v'},
        'train': {'ema_decay': 0.999,
                  'optim_g': {'type': 'Adam', 'lr': 1e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
                  'optim_d': {'type': 'Adam', 'lr': 1e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [50000, 100000], 'gamma': 0.5},
                  'total_iter': 400000, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1e-2, 'reduction': 'mean'},
                  'perceptual_opt': {'type': 'PerceptualLoss', 'layer_weights': {'conv5_4': 1}, 'vgg_type': 'vgg19',
                                     'use_input_norm': True, 'range_norm': False, 'perceptual_weight': 1.0,
                                     'style_weight': 0, 'criterion': 'l1'},
                  'gan_opt': {'type': 'GANLoss', 'gan_type': 'vanilla', 'real_label_val': 1.0, 'fake_label_val': 0.0,
                              'loss_weight': 5e-3},
                  'net_d_iters': 1, 'net_d_init_iters': 0},
        'val': {'val_freq': 5e3, 'save_img': True,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': False}}},
        'logger': {'print_freq': 100, 'save_checkpoint_freq': 5e3, 'use_tb_logger': True,
                   'wandb': {'project': None, 'resume_id': None}},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }
    assert check_options(opt, 'esrgan.yml') == []
    opt['train']['gan_opt']['gan_typ'] = 'vanilla'
    with pytest.raises(OptionError, match=r"^esrgan.yml: train.gan_opt.gan_typ .*did you mean 'gan_type'"):
        check_options(opt, 'esrgan.yml')
