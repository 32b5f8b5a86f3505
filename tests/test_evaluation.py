"""Evaluation through `basicsr test`: per-image CSV and summary JSON, metrics equal to BasicSR's own
functions on real images (RGB and Y), the inputs' scores, no-reference sets, and the ``${data_root}``
placeholder of option files."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.metrics import calculate_psnr, calculate_ssim

from baryir_plugin.archs import BaryIR
from baryir_plugin.cli import resolve_data_root
from baryir_plugin.errors import UsageError

from .conftest import bin_path, run, shared_path

ONE_THREAD = {'OMP_NUM_THREADS': '1'}
TINY_NET = {'type': 'BaryIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
            'heads': [1, 2, 4, 8], 'num_bary_blocks': 1}
FULL_REFERENCE = {
    'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
    'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False},
    'psnr_y': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True},
    'ssim_y': {'type': 'calculate_ssim', 'crop_border': 4, 'test_y_channel': True},
}


def _link_subset(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True)
    for n in names:
        os.symlink(src / n, dst / n)
    return dst


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = BaryIR(**{k: v for k, v in TINY_NET.items() if k != 'type'})
    torch.save({'params': net.state_dict()}, path)
    return path


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
    """`basicsr test` of a tiny random BaryIR on 3 Rain100L pairs, 2 CBSD68 images (sigma 25) and 2 RNI15."""
    data = shared_path('data')
    work = tmp_path_factory.mktemp('eval')
    rain = sorted(os.listdir(data / 'Rain100L' / 'input'))[:3]
    _link_subset(data / 'Rain100L' / 'input', work / 'd' / 'rain' / 'lq', rain)
    _link_subset(data / 'Rain100L' / 'target', work / 'd' / 'rain' / 'gt', rain)
    _link_subset(data / 'CBSD68', work / 'd' / 'bsd', sorted(os.listdir(data / 'CBSD68'))[:2])
    _link_subset(data / 'RNI15', work / 'd' / 'rni', ['Bears.png', 'Dog.png'])
    opt = {
        'name': 'eval_tiny', 'model_type': 'BaryIRModel', 'scale': 1, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'test_1': {'name': 'rain3', 'type': 'PairedImageDataset', 'dataroot_lq': '${data_root}/rain/lq',
                       'dataroot_gt': '${data_root}/rain/gt', 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'},
                       'metrics': [*FULL_REFERENCE, 'lpips']},
            'test_2': {'name': 'bsd2_sigma25', 'type': 'GaussianNoiseDataset', 'dataroot_gt': '${data_root}/bsd',
                       'sigmas': [25], 'noise_seed': 0, 'io_backend': {'type': 'disk'}, 'metrics': ['psnr']},
            'test_3': {'name': 'rni2', 'type': 'SingleImageDataset', 'dataroot_lq': '${data_root}/rni',
                       'io_backend': {'type': 'disk'}},
        },
        'network_g': TINY_NET,
        'path': {'pretrain_network_g': str(_tiny_checkpoint(work / 'net_g.pth')), 'strict_load_g': True},
        'val': {'save_img': True, 'input_metrics': True,
                'metrics': {**FULL_REFERENCE,
                            'lpips': {'type': 'calculate_lpips', 'better': 'lower'},  # no local weights given
                            'niqe': {'type': 'calculate_niqe', 'crop_border': 0, 'better': 'lower'},
                            'piqe': {'type': 'calculate_piqe', 'crop_border': 0, 'better': 'lower'}}},
    }
    (work / 'eval.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    proc = run([bin_path('basicsr'), 'test', '-opt', 'eval.yml', '--data-root', 'd'], cwd=work, env=ONE_THREAD)
    return work, work / 'results' / 'eval_tiny', proc


def test_per_image_csv_matches_basicsr_metrics_on_real_images(evaluated):
    work, results, _ = evaluated
    rows = _read_csv(results / 'metrics' / 'rain3.csv')
    assert sorted(r['image'] for r in rows) == [Path(n).stem for n in sorted(os.listdir(work / 'd' / 'rain' / 'lq'))]
    for row in rows:
        name = row['image']
        restored = cv2.imread(str(results / 'visualization' / 'rain3' / f'{name}_eval_tiny.png'))
        gt = cv2.imread(str(work / 'd' / 'rain' / 'gt' / f'{name}.png'))
        lq = cv2.imread(str(work / 'd' / 'rain' / 'lq' / f'{name}.png'))
        expected = {
            'psnr': calculate_psnr(restored, gt, 0), 'ssim': calculate_ssim(restored, gt, 0),
            'psnr_y': calculate_psnr(restored, gt, 4, test_y_channel=True),
            'ssim_y': calculate_ssim(restored, gt, 4, test_y_channel=True),
        }
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-5), (name, key)
        # the Y-channel numbers are really different numbers, not a copy of the RGB ones
        assert abs(float(row['psnr_y']) - float(row['psnr'])) > 1e-3
        assert float(row['input_psnr']) == pytest.approx(calculate_psnr(lq, gt, 0), abs=1e-5)
        assert float(row['input_ssim_y']) == pytest.approx(calculate_ssim(lq, gt, 4, test_y_channel=True), abs=1e-5)


def test_summary_json_records_means_options_and_inputs(evaluated):
    _, results, proc = evaluated
    rows = _read_csv(results / 'metrics' / 'rain3.csv')
    summary = json.loads((results / 'metrics' / 'rain3.json').read_text())
    assert summary['dataset'] == 'rain3' and summary['images'] == 3
    for key in FULL_REFERENCE:
        entry = summary['metrics'][key]
        assert entry['mean'] == pytest.approx(np.mean([float(r[key]) for r in rows]), abs=1e-5)
        assert entry['input_mean'] == pytest.approx(np.mean([float(r['input_' + key]) for r in rows]), abs=1e-5)
        assert entry['crop_border'] == FULL_REFERENCE[key]['crop_border']
        assert entry['test_y_channel'] == FULL_REFERENCE[key]['test_y_channel']
    assert 'niqe' not in summary['metrics']  # the set restricted its metrics
    # LPIPS without its weight files: reported unavailable with the reason, never a number
    assert 'lpips_weights' in summary['metrics']['lpips']['unavailable'] or \
        'backbone_weights' in summary['metrics']['lpips']['unavailable']
    assert 'mean' not in summary['metrics']['lpips'] and 'lpips' not in rows[0]
    assert summary['seconds_per_image'] > 0
    # the log carries the same means BasicSR-style
    log = '\n'.join(p.read_text() for p in results.glob('test_*.log'))
    assert f"# psnr: {summary['metrics']['psnr']['mean']:.4f}" in log


def test_noise_set_is_fixed_and_no_reference_set_reports_unavailable(evaluated):
    work, results, _ = evaluated
    bsd = _read_csv(results / 'metrics' / 'bsd2_sigma25.csv')
    assert sorted(r['image'] for r in bsd) == [Path(n).stem + '_sigma25' for n in sorted(os.listdir(work / 'd' / 'bsd'))]
    # sigma 25 on the 0-255 scale: the noisy input is ~20 dB from its clean image
    assert all(19.0 < float(r['input_psnr']) < 22.0 for r in bsd)
    rni = json.loads((results / 'metrics' / 'rni2.json').read_text())
    assert rni['images'] == 2
    for key in ('niqe', 'piqe'):
        assert np.isfinite(rni['metrics'][key]['mean']) and np.isfinite(rni['metrics'][key]['input_mean'])
    for key in FULL_REFERENCE:
        assert 'needs ground truth' in rni['metrics'][key]['unavailable']
        assert 'mean' not in rni['metrics'][key]
    rows = _read_csv(results / 'metrics' / 'rni2.csv')
    assert set(rows[0]) == {'image', 'niqe', 'piqe', 'input_niqe', 'input_piqe'}  # real noisy inputs scored alone


def test_data_root_placeholder(tmp_path, monkeypatch):
    opt = tmp_path / 'x.yml'
    opt.write_text('datasets:\n  test_1:\n    dataroot_gt: ${data_root}/CBSD68\n')
    (tmp_path / 'root').mkdir()
    with pytest.raises(ValueError, match='refusing to overwrite'):
        resolve_data_root(str(opt), str(tmp_path / 'root'), str(tmp_path))
    assert '${data_root}' in opt.read_text()
    (tmp_path / 'out').mkdir()
    resolved = resolve_data_root(str(opt), str(tmp_path / 'root'), str(tmp_path / 'out'))
    assert resolved == str(tmp_path / 'out' / 'x.yml')
    loaded = yaml.safe_load(Path(resolved).read_text())
    assert loaded['datasets']['test_1']['dataroot_gt'] == (tmp_path / 'root').resolve().as_posix() + '/CBSD68'
    monkeypatch.delenv('BARYIR_DATA_ROOT', raising=False)
    with pytest.raises(UsageError, match='--data-root'):
        resolve_data_root(str(opt), None)
    with pytest.raises(UsageError, match='not a folder'):
        resolve_data_root(str(opt), str(tmp_path / 'missing'))
    monkeypatch.setenv('BARYIR_DATA_ROOT', str(tmp_path / 'root'))
    assert Path(resolve_data_root(str(opt), None)).read_text().count('/CBSD68') == 1
    plain = tmp_path / 'plain.yml'
    plain.write_text('name: a\n')
    assert resolve_data_root(str(plain), None) == str(plain)  # nothing to resolve: the file itself


def test_unknown_metric_name_in_a_dataset_entry_is_named(tmp_path, evaluated):
    work, _, _ = evaluated
    opt = yaml.safe_load((work / 'eval.yml').read_text())
    opt['name'] = 'eval_bad'
    opt['datasets'] = {'test_1': {**opt['datasets']['test_1'], 'metrics': ['psnr', 'fid']}}
    (work / 'bad.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    import subprocess
    proc = subprocess.run([bin_path('basicsr'), 'test', '-opt', 'bad.yml', '--data-root', 'd'], cwd=work,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert proc.returncode != 0
    assert "metrics ['fid'] are not defined under val.metrics" in proc.stderr
    assert not (work / 'results' / 'eval_bad' / 'metrics').exists()  # refused before any set was evaluated


def test_channels_last_inference_gives_the_same_restoration(tmp_path):
    from basicsr.models import build_model

    ckpt = _tiny_checkpoint(tmp_path / 'net_g.pth')
    x = torch.rand(1, 3, 45, 61)
    outputs = []
    for channels_last in (False, True):
        opt = {'name': 'cl', 'model_type': 'BaryIRModel', 'is_train': False, 'dist': False, 'num_gpu': 0,
               'scale': 1, 'network_g': dict(TINY_NET), 'path': {'pretrain_network_g': str(ckpt), 'strict_load_g': True},
               'val': {'channels_last': channels_last}}
        model = build_model(opt)
        model.feed_data({'lq': x})
        assert model.lq.is_contiguous(memory_format=torch.channels_last) == channels_last
        model.test()
        outputs.append(model.output)
    assert outputs[1].shape == x.shape
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)


def test_dihedral_ensemble_is_invariant_to_rotations_and_flips_of_the_input():
    from baryir_plugin.models.baryir_model import dihedral_ensemble

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)  # a random 3x3 kernel: not rotation- or flip-equivariant
    x = torch.rand(2, 3, 5, 7)  # not square: rotated views change shape
    with torch.no_grad():
        restored = dihedral_ensemble(net, x)
        assert restored.shape == x.shape
        assert (restored - net(x)).abs().max() > 1e-3  # the ensemble is not the plain forward
        for k in range(4):
            for flip in (False, True):
                def t(img):
                    img = torch.rot90(img, k, dims=(-2, -1))
                    return img.flip(-1) if flip else img
                torch.testing.assert_close(dihedral_ensemble(net, t(x)), t(restored), atol=1e-6, rtol=0)
        torch.testing.assert_close(dihedral_ensemble(torch.nn.Identity(), x), x)


def test_self_ensemble_option_restores_with_the_mean_of_eight_views(tmp_path):
    from basicsr.models import build_model

    from baryir_plugin.models.baryir_model import dihedral_ensemble

    ckpt = _tiny_checkpoint(tmp_path / 'net_g.pth')
    x = torch.rand(1, 3, 21, 30)

    def model_with(val):
        return build_model({'name': 'se', 'model_type': 'BaryIRModel', 'is_train': False, 'dist': False, 'num_gpu': 0,
                            'scale': 1, 'network_g': dict(TINY_NET),
                            'path': {'pretrain_network_g': str(ckpt), 'strict_load_g': True}, 'val': val})

    outputs = {}
    for channels_last in (False, True):
        model = model_with({'self_ensemble': True, 'channels_last': channels_last})
        model.feed_data({'lq': x})
        model.test()
        outputs[channels_last] = model.output
    model.net_g.eval()
    with torch.no_grad():
        expected = dihedral_ensemble(model.net_g, x)
        plain = model.net_g(x)
    torch.testing.assert_close(outputs[False], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[True], expected, atol=1e-5, rtol=0)
    assert (outputs[False] - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match='val.self_ensemble must be true or false'):
        model_with({'self_ensemble': 'yes'})


def test_average_over_sets_is_the_mean_of_the_set_means(evaluated):
    _, results, _ = evaluated
    metrics = results / 'metrics'
    sets = {name: json.loads((metrics / f'{name}.json').read_text())['metrics']
            for name in ('rain3', 'bsd2_sigma25', 'rni2')}
    average = json.loads((metrics / 'average.json').read_text())
    assert average['average_of'] == ['rain3', 'bsd2_sigma25', 'rni2']
    # PSNR exists on the two sets with ground truth, SSIM on rain3 only, NIQE on rni2 only
    psnr = average['metrics']['psnr']
    assert psnr['sets'] == ['rain3', 'bsd2_sigma25']
    assert psnr['mean'] == pytest.approx(np.mean([sets['rain3']['psnr']['mean'], sets['bsd2_sigma25']['psnr']['mean']]),
                                         abs=1e-9)
    assert psnr['input_mean'] == pytest.approx(
        np.mean([sets['rain3']['psnr']['input_mean'], sets['bsd2_sigma25']['psnr']['input_mean']]), abs=1e-9)
    # a set mean, not the mean over all images (3 + 2 images would weigh rain3 more)
    assert abs(psnr['mean'] - (3 * sets['rain3']['psnr']['mean'] + 2 * sets['bsd2_sigma25']['psnr']['mean']) / 5) > 1e-6
    assert average['metrics']['ssim']['sets'] == ['rain3']
    assert average['metrics']['niqe'] == {'mean': sets['rni2']['niqe']['mean'], 'sets': ['rni2'],
                                          'input_mean': sets['rni2']['niqe']['input_mean']}
    assert 'lpips' not in average['metrics']  # unavailable everywhere: no number
    log = '\n'.join(p.read_text() for p in results.glob('test_*.log'))
    assert 'psnr over 2 of them (rain3, bsd2_sigma25)' in log
    assert f"Validation average\n\t # psnr: {psnr['mean']:.4f}" in log
    assert f"Inputs of average: psnr: {psnr['input_mean']:.4f}" in log


def test_average_option_names_the_sets_and_refuses_unknown_ones():
    from baryir_plugin.models.baryir_model import BaryIRModel

    def sets(*names, train=False):
        out = {'train': {'name': 'tr'}} if train else {}
        out.update({f'{"val" if train else "test"}_{i}': {'name': n} for i, n in enumerate(names)})
        return out

    def chosen(datasets, average='default', is_train=False):
        val = {} if average == 'default' else {'average': average}
        made = BaryIRModel._set_average({'datasets': datasets, 'val': val}, is_train)
        return None if made is None else made.names

    assert chosen(sets('a', 'b')) == ['a', 'b']
    assert chosen(sets('a')) is None  # one set: its own line says it all
    assert chosen(sets('a'), True) == ['a']
    assert chosen(sets('a', 'b'), False) is None
    assert chosen(sets('a', 'b', 'c'), ['c', 'a']) == ['c', 'a']
    assert chosen(sets('a', 'b', 'a')) == ['a', 'b']  # one name, one set: the round can complete
    assert chosen(sets('a', 'b', train=True), is_train=True) == ['a', 'b']  # the training set is not validated
    with pytest.raises(ValueError, match=r"val.average: \['x'\] are not evaluation sets"):
        chosen(sets('a', 'b'), ['a', 'x'])
    with pytest.raises(ValueError, match=r"val.average: \['tr'\]"):
        chosen(sets('a', train=True), ['tr'], is_train=True)
    with pytest.raises(ValueError, match='must be true, false or a list'):
        chosen(sets('a', 'b'), 'a')
    with pytest.raises(ValueError, match="named 'average'"):
        chosen(sets('a', 'average'))
    assert chosen(sets('a', 'average'), False) is None
