"""Bad data ends in one clear line: every unreadable image, unpaired or mismatched file, impossible crop,
missing folder, empty set or oversized batch names the file or option and the fix, with exit status 1
and no traceback, in `basicsr train`, `basicsr test` and the dataset tools.

Every command runs in this process on a copy of the tiny demo set (tests/conftest.py), broken on purpose;
training stops at its first batch or before (the batch holds the whole training set, so the broken
image is always read).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch
import yaml

import baryir_plugin.cli
from baryir_plugin.errors import DataError, OptionError, guarded_main

from .bad_input import assert_clean_error, run_inprocess
from .conftest import OPTIONS, load_script
from .fake_tree import make_fake_tree

TRAIN = 'basicsr train'
TEST = 'basicsr test'
RAIN = 'datasets/tiny/train/rain'
VAL = 'datasets/tiny/val/noise'


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture()
def project(tmp_path, tiny_dataset) -> Path:
    """A project folder with its own copy of the tiny set (folders and LMDBs), free to break."""
    shutil.copytree(tiny_dataset, tmp_path / 'datasets' / 'tiny')
    return tmp_path


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> str:
    """Untrained weights of the tests' tiny BaryIR, for `basicsr test`."""
    from basicsr.utils.registry import ARCH_REGISTRY

    net_opt = dict(yaml.safe_load((OPTIONS / 'test_baryir.yml').read_text())['network_g'])
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    path = tmp_path_factory.mktemp('weights') / 'net_g.pth'
    torch.save({'params': net.state_dict()}, path)
    return str(path)


def _options(project: Path, base: str, edit: Callable[[dict], None]) -> str:
    opt = yaml.safe_load((OPTIONS / base).read_text())
    edit(opt)
    path = project / f'bad_{base}'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def run_train(project: Path, edit: Callable[[dict], None] = lambda opt: None,
              base: str = 'train_srmodel_baryir.yml', workers: int = 0):
    """`basicsr train` of one iteration whose first batch is the whole training set (no validation)."""
    def short(opt: dict) -> None:
        opt.pop('val', None)
        opt['datasets'].pop('val', None)
        opt['train']['total_iter'] = 1
        train_set = opt['datasets']['train']
        train_set.update(num_worker_per_gpu=workers, dataset_enlarge_ratio=1,
                         batch_size_per_gpu=4 if train_set['type'] != 'AllInOneDataset' else 16)
        edit(opt)

    path = _options(project, base, short)
    return run_inprocess(baryir_plugin.cli.basicsr_main, ['train', '-opt', path], cwd=project)


def run_test(project: Path, checkpoint: str, edit: Callable[[dict], None] = lambda opt: None):
    """`basicsr test` of the tiny noisy validation pair set."""
    def weights(opt: dict) -> None:
        opt['path']['pretrain_network_g'] = checkpoint
        edit(opt)

    path = _options(project, 'test_baryir.yml', weights)
    return run_inprocess(baryir_plugin.cli.basicsr_main, ['test', '-opt', path], cwd=project)


def _set(key: str = 'train', **values) -> Callable[[dict], None]:
    return lambda opt: opt['datasets'][key].update(values)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == 'zero-byte':
        path.write_bytes(b'')
    elif how == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    elif how == 'not-an-image':
        path.write_text('this is a text file, not an image\n')
    else:
        raise ValueError(how)


_WHY = {'zero-byte': 'is empty (0 bytes)', 'truncated': 'is a truncated PNG', 'not-an-image': 'does not decode'}


def _no_models(project: Path) -> None:
    assert not list(project.glob('experiments/*/models/*.pth')), 'a network was saved although nothing was trained'


# ------------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize('how, side', [('zero-byte', 'gt'), ('truncated', 'lq'), ('not-an-image', 'gt')])
def test_train_paired_image_dataset_names_an_unreadable_image(project, how, side):
    path = project / RAIN / side / 'coffee_00.png'
    _damage(path, how)
    line = assert_clean_error(run_train(project), TRAIN, f'{RAIN}/{side}/coffee_00.png', _WHY[how], 'datasets.train',
                              'replace the file')
    assert f'{side.upper()} image' in line
    _no_models(project)


def test_train_unreadable_image_in_a_loader_worker(project):
    """The message survives PyTorch's re-raise in the main process of an error in a worker process."""
    _damage(project / RAIN / 'lq' / 'astronaut_01.png', 'zero-byte')
    assert_clean_error(run_train(project, workers=2), TRAIN, f'{RAIN}/lq/astronaut_01.png', 'is empty (0 bytes)',
                       'datasets.train (tiny_train)')


def test_train_unreadable_image_with_cpu_prefetch_does_not_hang(project):
    _damage(project / RAIN / 'gt' / 'coffee_01.png', 'not-an-image')
    assert_clean_error(run_train(project, _set(prefetch_mode='cpu')), TRAIN, f'{RAIN}/gt/coffee_01.png',
                       'does not decode')


def test_train_file_listed_in_meta_info_file_but_missing(project):
    (project / 'meta.txt').write_text('coffee_00.png (48,48,3)\nzebra.png (48,48,3)\n')
    assert_clean_error(run_train(project, _set(meta_info_file='meta.txt', batch_size_per_gpu=2)), TRAIN,
                       f'{RAIN}/gt/zebra.png', "line 2 of meta_info_file 'meta.txt'", 'does not exist')


def test_train_lmdb_key_missing_from_the_data(project):
    for side in ('gt', 'lq'):
        with open(project / RAIN / f'{side}.lmdb' / 'meta_info.txt', 'a') as f:
            f.write('zebra.png (48,48,3) 1\n')
    out = run_train(project, _set(batch_size_per_gpu=5), base='train_srmodel_baryir_lmdb.yml', workers=1)
    assert_clean_error(out, TRAIN, "key 'zebra'", f'{RAIN}/', '.lmdb', 'rebuild the LMDB')


def test_train_crop_larger_than_an_image(project):
    assert_clean_error(run_train(project, _set(gt_size=64)), TRAIN, 'gt_size 64 is larger than', f'{RAIN}/gt/', '48x48',
                       'lower gt_size to at most 48')


def test_train_lq_and_gt_of_different_sizes(project):
    lq = project / RAIN / 'lq' / 'coffee_01.png'
    cv2.imwrite(str(lq), cv2.imread(str(lq))[:40, :40])
    assert_clean_error(run_train(project), TRAIN, f'{RAIN}/lq/coffee_01.png', f'{RAIN}/gt/coffee_01.png', '40x40',
                       '48x48', 'must be the same size')


def test_train_gt_without_its_lq(project):
    (project / RAIN / 'lq' / 'astronaut_00.png').unlink()
    assert_clean_error(run_train(project), TRAIN, f'{RAIN}/gt/astronaut_00.png', 'has no LQ partner',
                       f'{RAIN}/lq/astronaut_00.png', 'datasets.train')


def test_train_empty_training_folders(project):
    for side in ('gt', 'lq'):
        for path in (project / RAIN / side).iterdir():
            path.unlink()
    assert_clean_error(run_train(project), TRAIN, 'datasets.train (tiny_train)', 'empty', f'{RAIN}/lq', f'{RAIN}/gt')
    _no_models(project)


@pytest.mark.parametrize('option, value', [('dataroot_gt', 'datasets/elsewhere/gt'), ('meta_info_file', 'meta.txt')])
def test_train_path_option_that_does_not_exist(project, option, value):
    assert_clean_error(run_train(project, _set(**{option: value})), TRAIN, f'datasets.train.{option}', repr(value),
                       'does not exist')


def test_train_runs_total_iter_when_the_batch_does_not_divide_the_set(project):
    """4 pairs, batch 3: one iteration per epoch (the partial batch is dropped), not the two BasicSR counts, so
    4 iterations take 4 epochs; BasicSR alone stopped after 3 and still said "End of training"."""
    def edit(opt: dict) -> None:
        opt['train']['total_iter'] = 4
        opt['datasets']['train']['batch_size_per_gpu'] = 3
        opt['logger']['save_checkpoint_freq'] = 100

    out = run_train(project, edit)
    assert out.status == 0, out.err[-3000:]
    log = '\n'.join(p.read_text() for p in sorted(project.glob('experiments/*/train_*.log')))
    assert 'iterations take 4 epoch(s)' in log
    assert re.search(r'epoch:\s*3, iter:\s*4,', log), log[-2000:]


def test_train_batch_larger_than_the_training_set(project):
    out = run_train(project, _set(batch_size_per_gpu=5))
    assert_clean_error(out, TRAIN, 'datasets.train.batch_size_per_gpu', 'a batch of 5', 'the 4 training sample(s)',
                       'at most 4')
    assert 'End of training' not in out.text
    _no_models(project)


# ------------------------------------------------------------------------------------------------ all-in-one

def _stem_matched_rain(opt: dict) -> None:
    opt['datasets']['train']['sources'][1]['type'] = 'StemMatchedPairedDataset'


def test_train_noise_source_names_an_empty_clean_image(project):
    _damage(project / 'datasets/tiny/train/clean/coffee_01.png', 'zero-byte')
    assert_clean_error(run_train(project, base='train_baryir_model.yml'), TRAIN,
                       'datasets/tiny/train/clean/coffee_01.png', 'is empty (0 bytes)',
                       'datasets.train.sources[0] (tiny_all_in_one/noise)')


def test_train_stem_matched_source_names_a_truncated_image_from_a_worker(project):
    _damage(project / RAIN / 'gt' / 'coffee_00.png', 'truncated')
    out = run_train(project, _stem_matched_rain, base='train_baryir_model.yml', workers=1)
    assert_clean_error(out, TRAIN, f'{RAIN}/gt/coffee_00.png', 'truncated PNG', 'datasets.train.sources[1]')


def test_train_stem_matched_lq_without_its_gt(project):
    (project / RAIN / 'gt' / 'coffee_01.png').unlink()
    assert_clean_error(run_train(project, _stem_matched_rain, base='train_baryir_model.yml'), TRAIN,
                       f'{RAIN}/lq/coffee_01.png', 'no GT for LQ', 'datasets.train.sources[1]')


def test_train_source_with_a_missing_folder(project):
    def edit(opt: dict) -> None:
        opt['datasets']['train']['sources'][1]['dataroot_lq'] = 'datasets/tiny/train/snow/lq'

    assert_clean_error(run_train(project, edit, base='train_baryir_model.yml'), TRAIN,
                       'datasets.train.sources[1].dataroot_lq', 'datasets/tiny/train/snow/lq', 'does not exist')


def test_train_all_in_one_batch_larger_than_its_samples(project):
    # noise: 4 images x 2 sigmas, rain: 4 pairs x repeat 2 -> 16 samples
    assert_clean_error(run_train(project, _set(batch_size_per_gpu=17), base='train_baryir_model.yml'), TRAIN,
                       'datasets.train.batch_size_per_gpu', 'a batch of 17', 'the 16 training sample(s)')


# ------------------------------------------------------------------------------------------------ basicsr test

@pytest.mark.parametrize('how, side', [('zero-byte', 'gt'), ('truncated', 'lq'), ('not-an-image', 'lq')])
def test_test_names_an_unreadable_image(project, checkpoint, how, side):
    _damage(project / VAL / side / 'rocket.png', how)
    assert_clean_error(run_test(project, checkpoint), TEST, f'{VAL}/{side}/rocket.png', _WHY[how],
                       'datasets.test_1 (tiny_val)')


def test_test_lmdb_key_missing_from_the_data(project, checkpoint):
    for side in ('gt', 'lq'):
        with open(project / VAL / f'{side}.lmdb' / 'meta_info.txt', 'a') as f:
            f.write('zebra.png (29,51,3) 1\n')
    edit = _set('test_1', dataroot_gt=f'{VAL}/gt.lmdb', dataroot_lq=f'{VAL}/lq.lmdb', io_backend={'type': 'lmdb'})
    assert_clean_error(run_test(project, checkpoint, edit), TEST, "key 'zebra'", f'{VAL}/gt.lmdb', 'not stored')


def test_test_lmdb_read_as_a_folder(project, checkpoint):
    assert_clean_error(run_test(project, checkpoint, _set('test_1', dataroot_lq=f'{VAL}/lq.lmdb')), TEST,
                       'datasets.test_1.dataroot_lq', 'is an LMDB', 'io_backend: {type: lmdb}')


def test_test_lq_smaller_than_its_gt_is_not_scored_against_a_crop(project, checkpoint):
    gt = cv2.imread(str(project / VAL / 'gt' / 'chelsea.png'))
    cv2.imwrite(str(project / VAL / 'gt' / 'chelsea.png'), cv2.resize(gt, (48, 48)))
    cv2.imwrite(str(project / VAL / 'lq' / 'chelsea.png'), cv2.resize(gt, (40, 40)))
    out = run_test(project, checkpoint)
    assert_clean_error(out, TEST, f'{VAL}/lq/chelsea.png', f'{VAL}/gt/chelsea.png', 'is 40x40', 'is 48x48')
    assert not list(project.glob('results/*/metrics/*.csv')), 'a metrics report was written'


def test_test_lq_without_its_gt(project, checkpoint):
    (project / VAL / 'gt' / 'rocket.png').unlink()
    assert_clean_error(run_test(project, checkpoint), TEST, f'{VAL}/lq/rocket.png', 'has no GT partner',
                       'datasets.test_1')


def test_test_empty_folder(project, checkpoint):
    for side in ('gt', 'lq'):
        for path in (project / VAL / side).iterdir():
            path.unlink()
    out = run_test(project, checkpoint)
    assert_clean_error(out, TEST, 'datasets.test_1 (tiny_val)', 'empty', f'{VAL}/lq')
    assert 'Testing tiny_val' not in out.text


def test_test_missing_folder(project, checkpoint):
    assert_clean_error(run_test(project, checkpoint, _set('test_1', dataroot_lq='datasets/tiny/val/nowhere')), TEST,
                       'datasets.test_1.dataroot_lq', 'datasets/tiny/val/nowhere', 'does not exist')


def test_test_single_image_dataset(project, checkpoint):
    """An LQ-only set cannot be scored; without metrics a corrupt image is named. The paired set's dataroot_gt,
    left in the entry, would be ignored: it is named."""
    retyped = _set('test_1', type='SingleImageDataset', dataroot_lq=f'{VAL}/lq')
    assert_clean_error(run_test(project, checkpoint, retyped), TEST, 'datasets.test_1.dataroot_gt',
                       'not read by SingleImageDataset', 'remove it')

    def lq_only(opt: dict) -> None:
        retyped(opt)
        for key in ('dataroot_gt', 'filename_tmpl'):
            opt['datasets']['test_1'].pop(key)

    shutil.rmtree(project / 'results')  # BasicSR archives an earlier run's folder by the second: one per second
    assert_clean_error(run_test(project, checkpoint, lq_only), TEST, 'datasets.test_1', 'SingleImageDataset',
                       'val.metrics')

    def no_metrics(opt: dict) -> None:
        lq_only(opt)
        opt['val'].pop('metrics')

    _damage(project / VAL / 'lq' / 'chelsea.png', 'truncated')
    assert_clean_error(run_test(project, checkpoint, no_metrics), TEST, f'{VAL}/lq/chelsea.png', 'truncated PNG')


# ------------------------------------------------------------------------------------------------ dataset options

@pytest.mark.parametrize('index, typo, meant', [(1, 'repat', 'repeat'), (0, 'sigma', 'sigmas')])
def test_train_typo_in_a_source_option(project, index, typo, meant):
    """A misspelt key of an AllInOneDataset source (repeat would fall back to 1, sigma be ignored) is named."""
    def edit(opt: dict) -> None:
        opt['datasets']['train']['sources'][index][typo] = 2

    assert_clean_error(run_train(project, edit, base='train_baryir_model.yml'), TRAIN,
                       f'datasets.train.sources[{index}].{typo}', f'did you mean {meant!r}')


def test_train_typo_in_a_loader_option(project):
    assert_clean_error(run_train(project, _set(dataset_enlarge_ration=2)), TRAIN,
                       'datasets.train.dataset_enlarge_ration', "did you mean 'dataset_enlarge_ratio'")
    _no_models(project)


def test_test_typo_in_a_dataset_option(project, checkpoint):
    assert_clean_error(run_test(project, checkpoint, _set('test_1', filename_tmp='{}_x4')), TEST,
                       'datasets.test_1.filename_tmp', "did you mean 'filename_tmpl'")


def test_unknown_dataset_options_by_kind_of_type(monkeypatch):
    from basicsr.data.paired_image_dataset import PairedImageDataset

    from baryir_plugin.data import checks

    paired = {'name': 'v', 'type': 'PairedImageDataset', 'phase': 'val', 'dataroot_gt': 'gt', 'dataroot_lq': 'lq'}
    with pytest.raises(OptionError, match=r"datasets\.val\.filename_tmp .*did you mean 'filename_tmpl'"):
        checks.check_dataset_keys(dict(paired, filename_tmp='{}'), 'datasets.val')
    with pytest.raises(OptionError, match=r'datasets\.val\.colour_jitter is not an option of PairedImageDataset '
                                          r'\(PairedImageDataset reads dataroot_gt'):
        checks.check_dataset_keys(dict(paired, colour_jitter=True), 'datasets.val')
    with pytest.raises(OptionError, match=r'sources\[1\]\.batch_size_per_gpu: .* move it to datasets\.train'):
        checks.check_dataset_keys(dict(paired, batch_size_per_gpu=2), 'datasets.train.sources[1]', source=True)
    checks.check_dataset_keys(dict(paired, phase='train', batch_size_per_gpu=2, manual_seed=0), 'datasets.train')
    warned: list[str] = []
    monkeypatch.setattr(checks, '_warn', warned.append)
    # BasicSR's other datasets: an unknown key is a warning, a near miss still an error
    esrgan = dict(paired, type='RealESRGANPairedDataset')
    checks.check_dataset_keys(dict(esrgan, colour_jitter=True), 'datasets.val')
    with pytest.raises(OptionError, match="did you mean 'gt_size'"):
        checks.check_dataset_keys(dict(esrgan, gt_sise=32), 'datasets.val')
    # a dataset type of another plugin: without a key list only a near miss of a loader option is named
    third_party = type('ThirdPartyDataset', (PairedImageDataset,), {'__module__': 'other_plugin.data'})
    monkeypatch.setattr(checks, '_dataset_class', lambda kind: third_party)
    checks.check_dataset_keys(dict(paired, type='ThirdPartyDataset', anything=1), 'datasets.val')
    with pytest.raises(OptionError, match="did you mean 'batch_size_per_gpu'"):
        checks.check_dataset_keys(dict(paired, type='ThirdPartyDataset', batch_size_per_gpus=1), 'datasets.train')
    third_party.option_keys = ('dataroot_gt', 'dataroot_lq', 'io_backend')  # with one: unknown keys warn
    checks.check_dataset_keys(dict(paired, type='ThirdPartyDataset', colour_jitter=1), 'datasets.val')
    checks.check_dataset_keys(dict(paired, type='ThirdPartyDataset', batch_size_per_gpu=1), 'datasets.val')
    assert [m.split(' ')[0] for m in warned] == ['datasets.val.colour_jitter', 'datasets.val.colour_jitter',
                                                 'datasets.val.batch_size_per_gpu']
    assert 'reads it for datasets.train only' in warned[-1]


@pytest.mark.parametrize('option, value, needle', [('gt_size', 32.5, 'must be an integer >= 1'),
                                                   ('use_rot', 'yes', 'must be true or false'),
                                                   ('dataset_enlarge_ratio', 0, 'must be an integer >= 1')])
def test_train_option_of_the_wrong_type(project, option, value, needle):
    """gt_size: 32.5 ended in a TypeError inside basicsr/data/transforms.py."""
    assert_clean_error(run_train(project, _set(**{option: value})), TRAIN, f'datasets.train.{option}', needle,
                       repr(value))


def test_train_prefetch_mode(project, monkeypatch):
    from baryir_plugin.data import checks

    assert_clean_error(run_train(project, _set(prefetch_mode='gpu')), TRAIN, 'datasets.train.prefetch_mode',
                       "got 'gpu'", 'cpu', 'cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert_clean_error(run_train(project, _set(prefetch_mode='cuda', pin_memory=True)), TRAIN,
                       'datasets.train.prefetch_mode', 'cuda needs a CUDA GPU')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    entry = {'name': 't', 'type': 'PairedImageDataset', 'phase': 'train', 'prefetch_mode': 'cuda'}
    with pytest.raises(OptionError, match=r'datasets\.train\.prefetch_mode: cuda needs pin_memory: true'):
        checks.check_dataset_values(entry, 'datasets.train')
    checks.check_dataset_values(dict(entry, pin_memory=True), 'datasets.train')


# ------------------------------------------------------------------------------------------------ LMDB files

def test_train_lmdb_meta_info_with_garbage_lines(project):
    (project / RAIN / 'gt.lmdb' / 'meta_info.txt').write_text('garbage line\n\n')
    out = run_train(project, base='train_srmodel_baryir_lmdb.yml')
    assert_clean_error(out, TRAIN, 'datasets.train.dataroot_gt', f"'{RAIN}/gt.lmdb/meta_info.txt'", 'is malformed',
                       "line 1 reads 'garbage line'", "'<key>.png (h,w,c) <compress>'")


def test_lmdb_meta_info_lines_are_checked(tiny_dataset, tmp_path):
    from baryir_plugin.data import layout

    lmdb = shutil.copytree(tiny_dataset / 'train' / 'rain' / 'gt.lmdb', tmp_path / 'gt.lmdb')
    good = (lmdb / 'meta_info.txt').read_text()
    assert layout.lmdb_keys(str(lmdb)) == ['astronaut_00', 'astronaut_01', 'coffee_00', 'coffee_01']
    for text, needle in ((good + '\n', 'line 5 is empty'), ('coffee_00.png 48 48 3 1\n', "line 1 reads 'coffee_00"),
                         (good.replace('.png', ''), 'line 1 reads')):
        (lmdb / 'meta_info.txt').write_text(text)
        with pytest.raises(DataError, match=needle):
            layout.lmdb_keys(str(lmdb))


@pytest.mark.parametrize('how', ['zero-byte', 'truncated'])
def test_train_broken_lmdb_data_file(project, how):
    """A truncated data.mdb killed the process with SIGBUS (exit 135, no message); it is named before it is read."""
    data = project / RAIN / 'gt.lmdb' / 'data.mdb'
    data.write_bytes(b'' if how == 'zero-byte' else data.read_bytes()[:5000])
    out = run_train(project, base='train_srmodel_baryir_lmdb.yml')
    assert_clean_error(out, TRAIN, 'datasets.train.dataroot_gt', f"the LMDB '{RAIN}/gt.lmdb'", 'truncated or corrupt',
                       'rebuild it with scripts/make_lmdb.py')


def test_lmdb_reader_checks_the_file_before_mapping_it(tiny_dataset, tmp_path, monkeypatch):
    import lmdb as lmdb_module

    from baryir_plugin.data import checks

    folder = shutil.copytree(tiny_dataset / 'train' / 'rain' / 'gt.lmdb', tmp_path / 'gt.lmdb')
    data = folder / 'data.mdb'
    whole = data.read_bytes()
    assert checks.lmdb_problem(str(folder)) is None
    for size in (0, 100, 4096, 5000, 12288, len(whole) - 1):  # every one SIGBUSes or fails inside lmdb unchecked
        data.write_bytes(whole[:size])
        with pytest.raises(DataError, match=r"the LMDB '.*gt\.lmdb' is truncated or corrupt"):
            checks.CheckedFileClient('lmdb', db_paths=[str(folder)], client_keys=['gt'])
    data.write_bytes(whole)
    client = checks.CheckedFileClient('lmdb', db_paths=[str(folder)], client_keys=['gt'])
    assert len(client.get('coffee_00', 'gt')) > 0

    def fail(*args, **kwargs):
        raise lmdb_module.CorruptedError(f'{folder}: MDB_CORRUPTED: Located page was wrong type')

    monkeypatch.setattr(lmdb_module, 'open', fail)
    with pytest.raises(DataError, match=r"gt\.lmdb' is truncated or corrupt \(it cannot be opened: .*MDB_CORRUPTED"):
        checks.CheckedFileClient('lmdb', db_paths=[str(folder)], client_keys=['gt'])


# ------------------------------------------------------------------------------------------------ metrics, names

@pytest.mark.parametrize('height, width', [(3, 5), (1, 1)])
def test_test_stock_model_metric_without_a_value(project, checkpoint, height, width):
    """SRModel printed `# ssim: nan` for a set holding an image smaller than SSIM's 11x11 window."""
    for side in ('gt', 'lq'):
        path = project / VAL / side / 'chelsea.png'
        cv2.imwrite(str(path), cv2.imread(str(path))[:height, :width])
    out = run_test(project, checkpoint)
    assert_clean_error(out, TEST, 'datasets.test_1 (tiny_val)', 'ssim of image', f'{VAL}/lq/chelsea.png',
                       f'({width}x{height}, WxH) is nan', '11x11', 'model_type: BaryIRModel', 'val.metrics.ssim')
    assert 'ssim: nan' not in out.text


def test_metric_check_leaves_baryir_validation_alone():
    import basicsr.metrics
    import basicsr.models.sr_model

    import baryir_plugin.models.validation as validation

    assert validation.calculate_metric is basicsr.metrics.calculate_metric  # reports per image (unavailable)
    assert getattr(basicsr.models.sr_model.calculate_metric, '_baryir_checked', False)


def test_test_two_sets_of_one_name(project, checkpoint):
    """The second set's restored images overwrote the first's in results/<run>/visualization/<name>/."""
    def edit(opt: dict) -> None:
        opt['datasets']['test_2'] = dict(opt['datasets']['test_1'])

    out = run_test(project, checkpoint, edit)
    assert_clean_error(out, TEST, 'datasets.test_1 and datasets.test_2', "both named 'tiny_val'", 'visualization',
                       'a name of its own')
    assert not list(project.glob('results/*/visualization/*/*.png'))


def test_validation_sets_of_one_name():
    from baryir_plugin.data import checks

    entry = {'type': 'PairedImageDataset', 'name': 'a'}
    opt = {'is_train': True, 'datasets': {'train': dict(entry), 'val': dict(entry), 'val_2': dict(entry, name='b')}}
    checks.check_unique_names(opt)  # the training set may share its name with a validation set
    opt['datasets']['val_3'] = dict(entry, name='b')
    with pytest.raises(OptionError, match=r"datasets\.val_2 and datasets\.val_3 are both named 'b': validation"):
        checks.check_unique_names(opt)


# ------------------------------------------------------------------------------------------------ dataset tools

def _tool(name: str) -> Callable[[list], int]:
    module = load_script(name)
    return lambda argv: guarded_main(module.PROG, module.main, argv)


@pytest.fixture(scope='module')
def fake_tree(tmp_path_factory) -> Path:
    return make_fake_tree(tmp_path_factory.mktemp('fake') / 'datasets', groups=['3deg-train'])


def _copy(tree: Path, dest: Path) -> Path:
    shutil.copytree(tree, dest)
    return dest


CHECK, LMDB, DEMO = 'scripts/check_datasets.py', 'scripts/make_lmdb.py', 'scripts/make_demo_data.py'


def test_check_datasets_missing_root(tmp_path):
    out = run_inprocess(_tool('check_datasets'), ['--root', 'no_such_root'], cwd=tmp_path)
    assert_clean_error(out, CHECK, "--root 'no_such_root' does not exist")


def test_check_datasets_corrupt_image(fake_tree, tmp_path):
    root = _copy(fake_tree, tmp_path / 'datasets')
    _damage(root / 'train/rain/lq/rain-2.png', 'truncated')
    out = run_inprocess(_tool('check_datasets'), ['--root', str(root), '--group', '3deg-train', '--workers', '1'])
    assert_clean_error(out, CHECK, '1 of 3 selected set(s)', 'train/rain', 'train/rain/lq/rain-2.png', 'truncated PNG')
    assert 'FAIL train/rain' in out.out  # the report is printed first
    # the progress bar ends its line: the error line is a line of its own, not the bar's remainder
    assert any(line.startswith(f'{CHECK}: error:') for line in out.err.split('\n')), repr(out.err[-300:])
    assert 'decoding' in out.err


def test_check_datasets_broken_lmdb(fake_tree, tmp_path):
    """A truncated data.mdb and a malformed meta_info.txt are reported (and the first never opened: SIGBUS)."""
    lmdb_root = tmp_path / 'lmdb'
    assert run_inprocess(_tool('make_lmdb'), ['--root', str(fake_tree), '--out', str(lmdb_root), '--sets',
                                              'train/noise', 'train/rain']).status == 0
    data = lmdb_root / 'train/noise.lmdb/data.mdb'
    data.write_bytes(data.read_bytes()[:5000])
    (lmdb_root / 'train/rain/gt.lmdb/meta_info.txt').write_text('garbage line\n')
    out = run_inprocess(_tool('check_datasets'), ['--root', str(lmdb_root), '--sets', 'train/noise', 'train/rain',
                                                  '--workers', '1'])
    assert_clean_error(out, CHECK, '2 of 2 selected set(s)', 'train/noise.lmdb is truncated or corrupt',
                       'is malformed: line 1')


@pytest.mark.parametrize('argv, needle', [(['--workers', '0'], 'must be at least 1'),
                                          (['--sets', 'train/snow'], 'unknown set')])
def test_check_datasets_bad_flags(fake_tree, argv, needle):
    out = run_inprocess(_tool('check_datasets'), ['--root', str(fake_tree), *argv])
    assert_clean_error(out, CHECK, needle, status=2)


def test_make_lmdb_missing_folder_and_folder_without_images(fake_tree, tmp_path):
    root = _copy(fake_tree, tmp_path / 'datasets')
    shutil.rmtree(root / 'train/haze/gt')
    for path in (root / 'train/rain/gt').iterdir():
        path.unlink()
    out = run_inprocess(_tool('make_lmdb'), ['--root', str(root), '--out', str(tmp_path / 'lmdb'),
                                             '--group', '3deg-train'])
    line = assert_clean_error(out, LMDB, 'nothing written', 'train/rain/gt: no images',
                              'train/haze/gt: folder not found')
    assert 'rain' in line and not (tmp_path / 'lmdb').exists()


def test_make_lmdb_corrupt_image(fake_tree, tmp_path):
    root = _copy(fake_tree, tmp_path / 'datasets')
    _damage(root / 'train/noise/test_002.png', 'zero-byte')
    out = run_inprocess(_tool('make_lmdb'), ['--root', str(root), '--out', str(tmp_path / 'lmdb'),
                                             '--sets', 'train/noise'])
    assert_clean_error(out, LMDB, '1 unreadable image(s)', 'train/noise/test_002.png', 'is empty (0 bytes)')
    assert not (tmp_path / 'lmdb').exists()


def test_make_lmdb_output_exists(fake_tree, tmp_path):
    (tmp_path / 'lmdb/train/rain/lq.lmdb').mkdir(parents=True)
    out = run_inprocess(_tool('make_lmdb'), ['--root', str(fake_tree), '--out', str(tmp_path / 'lmdb'),
                                             '--sets', 'train/rain'])
    assert_clean_error(out, LMDB, 'exist already', 'lq.lmdb', '--overwrite')


@pytest.mark.parametrize('argv, needle', [(['--workers', '0'], 'must be at least 1'),
                                          (['--compress-level', '12'], '--compress-level')])
def test_make_lmdb_bad_flags(fake_tree, tmp_path, argv, needle):
    out = run_inprocess(_tool('make_lmdb'), ['--root', str(fake_tree), '--out', str(tmp_path / 'lmdb'), *argv])
    assert_clean_error(out, LMDB, needle, status=2)


def test_make_demo_data_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / 'my_photos'
    mine.mkdir()
    (mine / 'holiday.jpg').write_bytes(b'precious')
    out = run_inprocess(_tool('make_demo_data'), ['--out', str(mine), '--preset', 'tiny'])
    assert_clean_error(out, DEMO, repr(str(mine)), 'not a demo set', 'holiday.jpg', 'nothing was written')
    assert (mine / 'holiday.jpg').read_bytes() == b'precious'
    (tmp_path / 'a_file').write_text('x')
    out = run_inprocess(_tool('make_demo_data'), ['--out', str(tmp_path / 'a_file'), '--preset', 'tiny'])
    assert_clean_error(out, DEMO, 'is a file')


def test_make_demo_data_bad_seed(tmp_path):
    out = run_inprocess(_tool('make_demo_data'), ['--out', str(tmp_path / 'demo'), '--seed', '-1'])
    assert_clean_error(out, DEMO, '--seed', 'must be at least 0', status=2)
    assert not (tmp_path / 'demo').exists()


def test_make_demo_data_never_deletes_files_it_did_not_write(tmp_path):
    """A demo folder holding a user's notes and weights was replaced wholesale."""
    from baryir_plugin.data import demo
    out = tmp_path / 'demo'
    demo.build(str(out), preset='tiny')
    (out / 'NOTES.txt').write_text('my notes')
    (out / 'val' / 'custom').mkdir()
    (out / 'val' / 'custom' / 'my_weights.pth').write_bytes(b'weights')
    before = sorted(p for p in out.rglob('*'))
    result = run_inprocess(_tool('make_demo_data'), ['--out', str(out), '--preset', 'tiny'])
    assert_clean_error(result, DEMO, repr(str(out)), '2 file(s) this script did not write', 'NOTES.txt',
                       'val/custom/my_weights.pth', 'nothing was deleted')
    assert sorted(p for p in out.rglob('*')) == before and (out / 'NOTES.txt').read_text() == 'my notes'
    # a marker of an older run (no list of files): only files of the script's layout are its own
    (out / demo.MARKER).write_text('written by scripts/make_demo_data.py\n')
    result = run_inprocess(_tool('make_demo_data'), ['--out', str(out), '--preset', 'tiny'])
    assert_clean_error(result, DEMO, 'NOTES.txt', 'val/custom/my_weights.pth')
    for path in (out / 'NOTES.txt', out / 'val' / 'custom' / 'my_weights.pth'):
        path.unlink()
    (out / 'val' / 'rain' / 'gt' / 'extra.png').write_bytes(b'png')  # the layout's: replaced with the set
    demo.build(str(out), preset='tiny')
    assert not (out / 'val' / 'rain' / 'gt' / 'extra.png').exists() and (out / 'val' / 'custom').is_dir()
    assert 'train/clean/coffee_00.png' in demo.read_manifest(str(out))


def test_make_demo_data_replaces_its_own_output(tmp_path):
    from baryir_plugin.data import demo
    first = demo.build(str(tmp_path / 'demo'), preset='tiny')
    assert demo.build(str(tmp_path / 'demo'), preset='tiny') == first
    assert (tmp_path / 'demo' / demo.MARKER).is_file()


def test_make_demo_data_bad_validation_photos(tmp_path):
    """--val-photos: a missing folder, one without images, an image smaller than the crop, an unreadable one,
    and --val-crop alone are one line each, found before --out is written."""
    out = tmp_path / 'demo'
    photos = tmp_path / 'photos'
    photos.mkdir()
    result = run_inprocess(_tool('make_demo_data'), ['--out', str(out), '--val-photos', str(tmp_path / 'none')])
    assert_clean_error(result, DEMO, '--val-photos', 'no such folder', status=2)
    result = run_inprocess(_tool('make_demo_data'), ['--out', str(out), '--val-photos', str(photos)])
    assert_clean_error(result, DEMO, '--val-photos', 'holds no images')
    assert cv2.imwrite(str(photos / 'small.png'), np.zeros((20, 30, 3), np.uint8))
    result = run_inprocess(_tool('make_demo_data'), ['--out', str(out), '--val-photos', str(photos), '--val-crop', '24'])
    assert_clean_error(result, DEMO, 'small.png', '20x30', 'smaller than --val-crop 24', 'smaller --val-crop')
    (photos / 'small.png').unlink()
    (photos / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'0' * 20)
    result = run_inprocess(_tool('make_demo_data'), ['--out', str(out), '--val-photos', str(photos)])
    assert_clean_error(result, DEMO, 'broken.png', 'replace or remove the file')
    result = run_inprocess(_tool('make_demo_data'), ['--out', str(out), '--val-crop', '64'])
    assert_clean_error(result, DEMO, '--val-crop needs --val-photos', status=2)
    assert not out.exists()
