"""The real-dataset layout: its checker, the LMDB builder, StemMatchedPairedDataset, JPEGCompressionDataset.

Everything runs on tests/fake_tree.py's synthetic copy of the layout (2-3 tiny images per folder).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.data import build_dataset
from basicsr.data.data_util import paired_paths_from_lmdb
from basicsr.utils import FileClient, imfrombytes

from baryir_plugin.data import layout
from baryir_plugin.data.jpeg_dataset import JPEGCompressionDataset
from baryir_plugin.data.stem_matched_dataset import StemMatchedPairedDataset
from baryir_plugin.errors import DataError, guarded_main

from .conftest import OPTIONS, REPO, bin_path, load_script, run
from .fake_tree import make_fake_tree

ONE_THREAD = {'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def project(tmp_path_factory) -> Path:
    """A project folder holding datasets/ (the whole fake layout) and datasets_lmdb/ (its training LMDBs)."""
    root = tmp_path_factory.mktemp('project')
    make_fake_tree(root / 'datasets')
    code = load_script('make_lmdb').main(['--root', str(root / 'datasets'), '--out', str(root / 'datasets_lmdb'),
                                          '--group', '5deg-train'])
    assert code == 0
    return root


def _copy_tree(project: Path, dst: Path) -> Path:
    shutil.copytree(project / 'datasets' / 'train', dst / 'train')
    return dst


# ------------------------------------------------------------------------------------------------ layout

def test_layout_table():
    keys = [s.key for s in layout.SETS]
    assert len(keys) == len(set(keys)) == 16 + 11
    assert [s.key for s in layout.select(['3deg-train'])] == ['train/noise', 'train/rain', 'train/haze']
    assert [s.key for s in layout.select(['5deg-train'])] == ['train/noise', 'train/rain', 'train/haze', 'train/blur',
                                                              'train/lowlight']
    assert [s.key for s in layout.select(['3deg-test'])] == ['test/noise/BSD68', 'test/rain/Rain100L',
                                                             'test/haze/SOTS_outdoor']
    cdd = [s for s in layout.select(['ood']) if s.degradation == 'mixed']
    assert len(cdd) == 11 and {s.gt for s in cdd} == {'test/mixed/CDD-11/clear'}
    ots = layout.SETS_BY_KEY['train/haze']
    assert (ots.expected_lq, ots.expected_gt, ots.lq, ots.gt) == (72135, None, 'train/haze/lq', 'train/haze/gt')
    rule = layout.compile_rule(ots.lq_to_gt)
    assert layout.gt_stem('0025_0.8_0.1', rule) == '0025'
    assert layout.gt_stem('rain-12', layout.compile_rule(layout.RAIN_RULE)) == 'norain-12'
    assert layout.gt_stem('01_outdoor_hazy', layout.compile_rule(layout.OHAZE_RULE)) == '01_outdoor_GT'
    assert layout.gt_stem('low00690', layout.compile_rule(layout.LOLV2_RULE)) == 'normal00690'
    with pytest.raises(ValueError, match='unknown group'):
        layout.select(['4deg-train'])
    with pytest.raises(ValueError, match=r'PATTERN, REPLACEMENT'):
        layout.compile_rule(['^rain-'])


# ------------------------------------------------------------------------------------------------ checker

def test_check_datasets_passes_on_the_fake_tree(project, capsys, tmp_path):
    check = load_script('check_datasets')
    report = tmp_path / 'report.json'
    assert check.main(['--root', str(project / 'datasets'), '--json', str(report)]) == 0
    out = capsys.readouterr().out
    assert re.search(r'^set\s+group\s+lq\s+gt\s+expected\s+status\s+first problem', out, re.M)
    for s in layout.SETS:
        assert re.search(rf'^{re.escape(s.key)}\s', out, re.M), s.key
    assert 'All selected sets are present and readable.' in out
    data = json.loads(report.read_text())
    assert data['ok'] and {r['status'] for r in data['sets']} == {'OK', 'WARN'}  # tiny counts only warn
    assert guarded_main(check.PROG, check.main, ['--root', str(project / 'datasets'), '--group', '3deg-train',
                                                 '--strict']) == 1
    # the LMDB twins check too
    assert check.main(['--root', str(project / 'datasets_lmdb'), '--group', '5deg-train']) == 0
    assert re.search(r'^train/haze\s+\S+\s+3\s+2\s', capsys.readouterr().out, re.M)


def test_check_datasets_fails_clearly_on_a_broken_tree(project, tmp_path):
    root = _copy_tree(project, tmp_path / 'datasets')
    (root / 'train/haze/gt/0001.jpg').unlink()  # two hazy images lose their clear image
    os.rename(root / 'train/rain/lq/rain-2.png', root / 'train/rain/lq/rainy-2.png')  # breaks the rain- rule
    data = (root / 'train/noise/test_002.png').read_bytes()
    (root / 'train/noise/test_002.png').write_bytes(data[:len(data) // 2])  # truncated PNG
    data = (root / 'train/haze/lq/0002_0.9_0.08.jpg').read_bytes()
    (root / 'train/haze/lq/0002_0.9_0.08.jpg').write_bytes(data[:len(data) * 3 // 4])  # truncated JPEG
    shutil.rmtree(root / 'train/blur/gt')
    gt = cv2.imread(str(root / 'train/lowlight/gt/5.png'))
    cv2.imwrite(str(root / 'train/lowlight/gt/5.png'), cv2.resize(gt, (30, 30)))

    report = tmp_path / 'report.json'
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'check_datasets.py'), '--root', str(root),
                           '--group', '5deg-train', '--json', str(report)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **ONE_THREAD})
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert 'FAILED: 5 selected set(s) missing or broken' in out
    summary = out[out.index('FAILED'):]
    assert 'MISSING train/blur (GoPro (train))' in summary and f'{root}/train/blur/gt not found' in summary
    assert re.search(r'FAIL train/rain .*\n.*LQ image\(s\) without GT: \S*train/rain/lq/rainy-2\.png', summary)
    assert "GT stem 'rainy-2'" in summary and "['^rain-', 'norain-']" in summary
    assert re.search(r"2 LQ image\(s\) without GT: \S*train/haze/lq/0001_0\.8_0\.2\.jpg -> GT stem '0001'", summary)
    assert re.search(r'unreadable image\(s\): \S*train/haze/lq/0002_0\.9_0\.08\.jpg', summary)
    assert re.search(r'FAIL train/noise .*\n.*unreadable image\(s\): \S*train/noise/test_002\.png', summary)
    assert re.search(r'pair\(s\) of different sizes: \S*train/lowlight/lq/5\.png is 36x40 but \S*gt/5\.png is 30x30',
                     summary)
    statuses = {r['key']: r['status'] for r in json.loads(report.read_text())['sets']}
    assert statuses == {'train/noise': 'FAIL', 'train/rain': 'FAIL', 'train/haze': 'FAIL', 'train/blur': 'MISSING',
                        'train/lowlight': 'FAIL'}


# ------------------------------------------------------------------------------------------------ datasets

def _stem_opt(project: Path, key: str, lmdb: bool = False, **extra) -> dict:
    s = layout.SETS_BY_KEY[key]
    base = project / ('datasets_lmdb' if lmdb else 'datasets')
    suffix = '.lmdb' if lmdb else ''
    opt = {'name': key, 'type': 'StemMatchedPairedDataset', 'phase': 'val', 'dataroot_lq': str(base / (s.lq + suffix)),
           'dataroot_gt': str(base / (s.gt + suffix)), 'io_backend': {'type': 'lmdb' if lmdb else 'disk'}}
    if s.lq_to_gt:
        opt['lq_to_gt'] = list(s.lq_to_gt)
    opt.update(extra)
    return opt


@pytest.mark.parametrize('key', ['train/haze', 'train/rain'])
def test_stem_matched_pairs_on_disk_and_lmdb(project, key):
    disk = build_dataset(_stem_opt(project, key))
    lmdb = build_dataset(_stem_opt(project, key, lmdb=True))
    assert isinstance(disk, StemMatchedPairedDataset) and len(disk) == len(lmdb) == 3
    rule = layout.compile_rule(layout.SETS_BY_KEY[key].lq_to_gt)
    pairs = [(layout.stem(p['lq_path']), layout.stem(p['gt_path'])) for p in disk.paths]
    assert pairs == [(p['lq_path'], p['gt_path']) for p in lmdb.paths]  # LMDB keys are the stems, dots kept
    assert all(layout.gt_stem(lq, rule) == gt for lq, gt in pairs)
    if key == 'train/haze':  # many-to-one: two hazy images share the clear 0001
        assert [gt for _, gt in pairs] == ['0001', '0001', '0002'] and pairs[0][0] == '0001_0.8_0.2'
    for i in range(len(disk)):
        a, b = disk[i], lmdb[i]
        assert a['lq'].shape == a['gt'].shape == (3, 40, 36) and a['lq'].dtype == torch.float32
        assert 0 <= float(a['lq'].min()) and float(a['lq'].max()) <= 1
        assert torch.equal(a['lq'], b['lq']) and torch.equal(a['gt'], b['gt'])  # LMDB stores decoded pixels


def test_stem_matched_errors_name_the_file_and_the_fix(project, tmp_path):
    root = _copy_tree(project, tmp_path / 'datasets')
    (root / 'train/rain/gt/norain-2.png').unlink()
    opt = _stem_opt(project, 'train/rain', dataroot_lq=str(root / 'train/rain/lq'),
                    dataroot_gt=str(root / 'train/rain/gt'))
    with pytest.raises(DataError) as err:
        StemMatchedPairedDataset(opt)
    msg = str(err.value)
    assert 'rain-2.png' in msg and "GT stem 'norain-2'" in msg and "['^rain-', 'norain-']" in msg
    assert '1 of 3 LQ images lack a GT' in msg and 'Fix:' in msg
    with pytest.raises(DataError, match=r"no GT for LQ .*rain-1\.png.*no lq_to_gt rule"):
        StemMatchedPairedDataset({**opt, 'lq_to_gt': None})
    shutil.copy(root / 'train/rain/gt/norain-1.png', root / 'train/rain/gt/norain-1.jpg')
    with pytest.raises(ValueError, match=r"'norain-1.jpg' and 'norain-1.png'.*share the stem|"
                                         r"'norain-1.png' and 'norain-1.jpg'.*share the stem"):
        StemMatchedPairedDataset(opt)
    with pytest.raises(ValueError, match='not a valid regular expression'):
        StemMatchedPairedDataset({**opt, 'lq_to_gt': ['(', 'x']})
    with pytest.raises(ValueError, match='scale must be 1'):
        StemMatchedPairedDataset({**opt, 'scale': 4})


def test_stem_matched_train_crop_and_all_eight_dihedral_transforms(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ('lq', 'gt'):
        (tmp_path / sub).mkdir()
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # asymmetric: all 8 transforms differ
    cv2.imwrite(str(tmp_path / 'lq' / 'rain-1.png'), img)
    cv2.imwrite(str(tmp_path / 'gt' / 'norain-1.png'), img)
    big = rng.integers(0, 256, (50, 44, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'lq' / 'rain-2.png'), big)
    cv2.imwrite(str(tmp_path / 'gt' / 'norain-2.png'), big)
    ds = StemMatchedPairedDataset({'name': 'aug', 'phase': 'train', 'gt_size': 32, 'use_hflip': True,
                                   'use_rot': True, 'dataroot_lq': str(tmp_path / 'lq'),
                                   'dataroot_gt': str(tmp_path / 'gt'), 'lq_to_gt': ['^rain-', 'norain-'],
                                   'io_backend': {'type': 'disk'}})
    seen = set()
    for _ in range(120):
        for i in range(2):
            sample = ds[i]
            assert sample['lq'].shape == sample['gt'].shape == (3, 32, 32)
            assert torch.equal(sample['lq'], sample['gt'])  # the LQ and GT crops are aligned
        seen.add(ds[0]['gt'].numpy().tobytes())
    assert len(seen) == 8


def test_jpeg_dataset_is_deterministic_and_lossy(project):
    base = {'name': 'bsds', 'type': 'JPEGCompressionDataset', 'phase': 'val',
            'dataroot_gt': str(project / 'datasets' / 'test/jpeg/BSDS500'), 'io_backend': {'type': 'disk'}}
    ds = build_dataset(base)
    assert isinstance(ds, JPEGCompressionDataset) and len(ds) == 2 and ds.quality == 10
    a, b = ds[0], ds[0]
    assert torch.equal(a['lq'], b['lq']) and a['lq'].shape == a['gt'].shape == (3, 40, 36)
    assert a['lq_path'].endswith('2018_q10.jpg') and a['gt_path'].endswith('2018.jpg')
    err10 = float((a['lq'] - a['gt']).abs().mean())
    err95 = float((build_dataset({**base, 'quality': 95})[0]['lq'] - a['gt']).abs().mean())
    assert err10 > err95 > 0  # lossy, and less so at a higher quality
    gt = cv2.imread(base['dataroot_gt'] + '/2018.jpg')
    ok, buf = cv2.imencode('.jpg', gt, [cv2.IMWRITE_JPEG_QUALITY, 10])
    expected = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255
    assert np.array_equal(a['lq'].numpy(), expected)
    train = build_dataset({**base, 'phase': 'train', 'gt_size': 32, 'use_hflip': True, 'use_rot': True})
    assert train[1]['lq'].shape == train[1]['gt'].shape == (3, 32, 32)
    noise_lmdb = build_dataset({**base, 'dataroot_gt': str(project / 'datasets_lmdb/train/noise.lmdb'),
                                'io_backend': {'type': 'lmdb'}})
    assert len(noise_lmdb) == 3 and noise_lmdb[0]['lq_path'] == '00001_q10'
    for quality in (0, 101, 'high', True, 10.5):
        with pytest.raises(ValueError, match='quality must be an integer in 1..100'):
            build_dataset({**base, 'quality': quality})


# ------------------------------------------------------------------------------------------------ make_lmdb

def test_make_lmdb_output_reads_through_basicsr(project):
    out = project / 'datasets_lmdb'
    expected = {f'{folder}.lmdb' for s in layout.select(['5deg-train']) for folder in s.folders}
    found = {str(p.relative_to(out)) for p in out.rglob('*.lmdb')}
    assert found == expected  # mirrors the tree, nothing else (no temporaries)
    paths = paired_paths_from_lmdb([str(out / 'train/blur/lq.lmdb'), str(out / 'train/blur/gt.lmdb')], ['lq', 'gt'])
    names = os.listdir(project / 'datasets/train/blur/lq')
    assert [p['lq_path'] for p in paths] == sorted(layout.stem(n) for n in names)
    client = FileClient('lmdb', db_paths=[str(out / 'train/blur/gt.lmdb')], client_keys=['gt'])
    key = paths[0]['gt_path']
    img = imfrombytes(client.get(key, 'gt'), float32=False)
    assert np.array_equal(img, cv2.imread(str(project / 'datasets/train/blur/gt' / f'{key}.png')))
    assert layout.lmdb_keys(str(out / 'train/haze/lq.lmdb')) == ['0001_0.8_0.2', '0001_1_0.16', '0002_0.9_0.08']


def test_make_lmdb_refuses_to_overwrite_and_never_leaves_a_partial_lmdb(project, tmp_path, capsys, monkeypatch):
    make_lmdb = load_script('make_lmdb')
    args = ['--root', str(project / 'datasets'), '--out', str(tmp_path / 'lmdb'), '--sets', 'train/rain']
    assert make_lmdb.main(args) == 0
    out = capsys.readouterr().out
    assert f'dataroot_lq: {tmp_path}/lmdb/train/rain/lq.lmdb' in out and 'io_backend: {type: lmdb}' in out
    data = tmp_path / 'lmdb/train/rain/lq.lmdb/data.mdb'
    before = data.stat().st_mtime_ns
    assert guarded_main(make_lmdb.PROG, make_lmdb.main, args) == 1
    err = capsys.readouterr().err
    assert 'exist already' in err and 'lq.lmdb' in err and '--overwrite' in err
    assert data.stat().st_mtime_ns == before

    # a run interrupted while writing leaves neither a final nor a temporary LMDB
    import basicsr.utils.lmdb_util as lmdb_util

    real = lmdb_util.make_lmdb_from_imgs

    def interrupted(data_path, lmdb_path, *a, **kw):
        os.makedirs(lmdb_path)
        (Path(lmdb_path) / 'data.mdb').write_bytes(b'half')
        raise KeyboardInterrupt

    monkeypatch.setattr(lmdb_util, 'make_lmdb_from_imgs', interrupted)
    new = ['--root', str(project / 'datasets'), '--out', str(tmp_path / 'lmdb'), '--sets', 'train/haze']
    with pytest.raises(KeyboardInterrupt):
        make_lmdb.main(new)
    assert not list((tmp_path / 'lmdb/train').glob('haze/*'))
    # a temporary left by a killed run is removed by the next run, which then succeeds
    (tmp_path / 'lmdb/train/haze/.lq.tmp-1.lmdb').mkdir(parents=True)
    monkeypatch.setattr(lmdb_util, 'make_lmdb_from_imgs', real)
    assert make_lmdb.main(new) == 0
    assert sorted(p.name for p in (tmp_path / 'lmdb/train/haze').iterdir()) == ['gt.lmdb', 'lq.lmdb']
    assert make_lmdb.main(args + ['--overwrite']) == 0
    assert sorted(p.name for p in (tmp_path / 'lmdb/train/rain').iterdir()) == ['gt.lmdb', 'lq.lmdb']


def test_make_lmdb_output_trains_through_basicsr_lmdb_backend(project):
    train_block = (OPTIONS / 'train_baryir_model.yml').read_text()
    train_block = train_block[train_block.index('\ntrain:\n'):train_block.index('\nval:\n')]
    assert 'total_iter: 6' in train_block
    train_block = train_block.replace('total_iter: 6', 'total_iter: 2')  # no val block: only training
    (project / 'train_lmdb.yml').write_text(textwrap.dedent('''\
        name: baryir_fake_lmdb
        model_type: BaryIRModel
        scale: 1
        num_gpu: auto
        manual_seed: 0

        datasets:
          train:
            name: fake_all_in_one
            type: AllInOneDataset
            sources:
              - name: noise
                type: GaussianNoiseDataset
                dataroot_gt: datasets_lmdb/train/noise.lmdb
                sigmas: [15, 50]
              - name: haze
                type: StemMatchedPairedDataset
                dataroot_lq: datasets_lmdb/train/haze/lq.lmdb
                dataroot_gt: datasets_lmdb/train/haze/gt.lmdb
                lq_to_gt: ['^([^_]+)_.*$', '\\1']
              - name: blur
                type: PairedImageDataset
                dataroot_lq: datasets_lmdb/train/blur/lq.lmdb
                dataroot_gt: datasets_lmdb/train/blur/gt.lmdb
            filename_tmpl: '{}'
            io_backend:
              type: lmdb
            gt_size: 32
            use_hflip: true
            use_rot: true
            num_worker_per_gpu: 0
            batch_size_per_gpu: 2
            dataset_enlarge_ratio: 1
            prefetch_mode: ~

        network_g:
          type: BaryIR
          dim: 8
          num_blocks: [1, 1, 1, 1]
          num_refinement_blocks: 1
          heads: [1, 2, 4, 8]
          num_bary_blocks: 1

        network_potential:
          type: BarycenterPotentials
          num_potentials: 3
          in_channels: 64
          patch_size: 32

        path:
          pretrain_network_g: ~
          strict_load_g: true
          resume_state: ~
        ''') + train_block.lstrip('\n') + textwrap.dedent('''
        logger:
          print_freq: 1
          save_checkpoint_freq: 2
          use_tb_logger: false
          wandb: ~
        '''))
    run([bin_path('basicsr'), 'train', '-opt', 'train_lmdb.yml'], cwd=project, env=ONE_THREAD)
    exp = project / 'experiments' / 'baryir_fake_lmdb'
    log = '\n'.join(p.read_text() for p in exp.glob('train_*.log'))
    for source, n in (('noise', 6), ('haze', 3), ('blur', 3)):  # noise: 3 images x 2 sigmas
        assert f"AllInOneDataset source '{source}': {n} samples x 1 = {n}" in log
    assert re.search(r'iter:\s+2,', log)
    assert (exp / 'models' / 'net_g_latest.pth').is_file()


@pytest.mark.parametrize('kind', ['GaussianNoiseDataset', 'JPEGCompressionDataset'])
def test_clean_image_sources_list_only_images_and_name_a_corrupt_file(tmp_path, kind):
    """Both on-the-fly sources read their clean folder the same way: other files are ignored, a file that
    does not decode is named in the error."""
    folder = tmp_path / 'clean'
    folder.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / 'a.png'), img)
    (folder / 'README.txt').write_text('not an image\n')
    (folder / 'b.png').write_bytes((folder / 'a.png').read_bytes()[:40])  # truncated PNG
    opt = {'name': 'clean', 'type': kind, 'dataroot_gt': str(folder), 'phase': 'val', 'io_backend': {'type': 'disk'}}
    if kind == 'GaussianNoiseDataset':
        opt['sigmas'] = [25]
    ds = build_dataset(opt)
    assert len(ds) == 2  # a.png and b.png, not README.txt
    sample = ds[0]
    assert torch.equal(sample['gt'], torch.from_numpy(img[..., ::-1].transpose(2, 0, 1) / 255.0).float())
    with pytest.raises(DataError, match=re.escape(str(folder / 'b.png'))):
        ds[1]
