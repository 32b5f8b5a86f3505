"""`basicsr train/test` end to end: BasicSR's stock SRModel with `network_g: {type: BaryIR}`.

Every run is a fresh process (BasicSR's logger is per process), in a working directory that holds
datasets/tiny, exactly as a user runs it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import cv2
import torch

from .conftest import OPTIONS, bin_path, run

TRAIN = str(OPTIONS / 'train_srmodel_baryir.yml')
TRAIN_LMDB = str(OPTIONS / 'train_srmodel_baryir_lmdb.yml')
TEST = str(OPTIONS / 'test_baryir.yml')
ONE_THREAD = {'OMP_NUM_THREADS': '1'}


def _log(exp_dir: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(exp_dir.glob('train_*.log')))


def _last_metrics(log: str) -> dict[str, float]:
    return {name: float(v) for name, v in re.findall(r'# (psnr|ssim): ([0-9.]+)', log)[-2:]}


def test_train_validate_save_and_auto_resume(workdir):
    basicsr = bin_path('basicsr')
    run([basicsr, 'train', '-opt', TRAIN], cwd=workdir, env=ONE_THREAD)
    exp = workdir / 'experiments' / 'srmodel_baryir_folder'
    models = {p.name for p in (exp / 'models').iterdir()}
    assert {'net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth'} <= models
    assert {p.name for p in (exp / 'training_states').iterdir()} == {'2.state', '4.state'}
    metrics = _last_metrics(_log(exp))
    assert set(metrics) == {'psnr', 'ssim'} and metrics['psnr'] > 10
    # validation images of sizes that are not multiples of 8 were restored at their own size
    for name in ('chelsea', 'rocket'):
        gt = cv2.imread(str(workdir / 'datasets' / 'tiny' / 'val' / 'noise' / 'gt' / f'{name}.png'))
        out = cv2.imread(str(exp / 'visualization' / name / f'{name}_4.png'))
        assert out.shape == gt.shape
    saved = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)
    assert 'bary_map.blocks.0.attn.temperature' in saved['params']

    run([basicsr, 'train', '-opt', TRAIN, '--auto_resume', '--force_yml', 'train:total_iter=6'],
               cwd=workdir, env=ONE_THREAD)
    log = _log(exp)
    assert 'Resuming training from epoch: 0, iter: 4.' in log
    assert re.search(r'iter:\s+5,', log) and re.search(r'iter:\s+6,', log)
    assert (exp / 'training_states' / '6.state').is_file()
    assert not list(workdir.glob('experiments/*archived*'))  # resumed in place, nothing renamed


def test_lmdb_twin_trains_through_basicsr_lmdb_backend(workdir):
    run([bin_path('basicsr'), 'train', '-opt', TRAIN_LMDB], cwd=workdir, env=ONE_THREAD)
    exp = workdir / 'experiments' / 'srmodel_baryir_lmdb'
    log = _log(exp)
    assert "'type': 'lmdb'" in log or 'type: lmdb' in log
    assert set(_last_metrics(log)) == {'psnr', 'ssim'}
    assert (exp / 'models' / 'net_g_latest.pth').is_file()


def test_torchrun_two_processes_gloo(workdir):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'baryir_plugin', 'train', '-opt', TRAIN, '--launcher', 'pytorch']
    run(cmd + ['--force_yml', 'name=ddp_gloo'], cwd=workdir, timeout=300)
    exp = workdir / 'experiments' / 'ddp_gloo'
    log = _log(exp)
    assert 'World size (gpu number): 2' in log
    assert set(_last_metrics(log)) == {'psnr', 'ssim'}
    assert (exp / 'models' / 'net_g_latest.pth').is_file() and (exp / 'training_states' / '4.state').is_file()
    # auto-resume under torchrun too
    run(cmd + ['--auto_resume', '--force_yml', 'name=ddp_gloo', 'train:total_iter=6'], cwd=workdir, timeout=300)
    assert 'Resuming training from epoch' in _log(exp)
    assert (exp / 'training_states' / '6.state').is_file()


def test_basicsr_test_writes_images_and_metrics(workdir):
    basicsr = bin_path('basicsr')
    run([basicsr, 'train', '-opt', TRAIN, '--force_yml', 'train:total_iter=2'], cwd=workdir, env=ONE_THREAD)
    run([basicsr, 'test', '-opt', TEST], cwd=workdir, env=ONE_THREAD)
    res = workdir / 'results' / 'test_baryir_tiny'
    images = sorted(p.name for p in (res / 'visualization' / 'tiny_val').iterdir())
    assert images == ['chelsea_test_baryir_tiny.png', 'rocket_test_baryir_tiny.png']
    log = '\n'.join(p.read_text() for p in res.glob('test_*.log'))
    metrics = {name: float(v) for name, v in re.findall(r'# (psnr|ssim): ([0-9.]+)', log)}
    assert set(metrics) == {'psnr', 'ssim'}


def test_missing_option_file_is_a_clear_error(tmp_path):
    proc = subprocess.run([bin_path('basicsr'), 'train', '-opt', 'nope.yml'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "-opt 'nope.yml': no such file" in proc.stderr
    assert not (tmp_path / 'experiments').exists()


def test_unknown_subcommand_and_help():
    basicsr = bin_path('basicsr')
    bad = subprocess.run([basicsr, 'fit'], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'fit'" in bad.stderr
    ok = subprocess.run([basicsr, '--help'], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and 'train,test' in ok.stdout


def test_plugin_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group='basicsr.plugins')}
    assert eps.get('baryir') == 'baryir_plugin'
    scripts = {ep.name: ep.value for ep in entry_points(group='console_scripts')}
    assert scripts.get('basicsr') == 'baryir_plugin.cli:basicsr_main'
    assert scripts.get('baryir') == 'baryir_plugin.cli:main'


def test_launcher_arguments_are_normalised(monkeypatch):
    from baryir_plugin.cli import _normalise_basicsr_args

    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert _normalise_basicsr_args(['-opt', 'a.yml', '--local-rank=1']) == ['-opt', 'a.yml', '--local_rank=1']
    assert _normalise_basicsr_args(['--local-rank', '0']) == ['--local_rank', '0']
    monkeypatch.setenv('WORLD_SIZE', '2')  # under torchrun without --launcher
    assert _normalise_basicsr_args(['-opt', 'a.yml']) == ['-opt', 'a.yml', '--launcher', 'pytorch']
    assert _normalise_basicsr_args(['-opt', 'a.yml', '--launcher', 'slurm'])[-1] == 'slurm'
