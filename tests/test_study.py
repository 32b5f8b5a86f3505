"""scripts/study_barycenter_map.py end to end at a smoke budget: two arms that really differ (with and
without the barycenter map), both evaluated on real images, one table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from baryir_plugin.data import demo

from .conftest import REPO, shared_path


def test_study_trains_both_arms_and_tabulates_real_sets(tmp_path, tiny_dataset):
    data = shared_path('data')
    cmd = [sys.executable, str(REPO / 'scripts' / 'study_barycenter_map.py'), '--data-root', str(data),
           '--iters', '2', '--sources', 'noise', 'rain', '--sets', 'McMaster_sigma50',
           '--demo-data', str(tiny_dataset), '--out', str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, 'OMP_NUM_THREADS': '2'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with_t = torch.load(tmp_path / 'experiments' / 'study_with_T' / 'models' / 'net_g_latest.pth', weights_only=True)
    without_t = torch.load(tmp_path / 'experiments' / 'study_without_T' / 'models' / 'net_g_latest.pth',
                           weights_only=True)
    assert any(k.startswith('bary_map.') for k in with_t['params'])
    assert not any(k.startswith('bary_map.') for k in without_t['params'])
    assert (tmp_path / 'experiments' / 'study_with_T' / 'models' / 'net_potential_latest.pth').is_file()

    table = (tmp_path / 'study_barycenter_map.md').read_text()
    assert '| set | split | metric | input | with T | without T |' in table
    rows = {tuple(c.strip() for c in line.strip('|').split('|')[:3]): line for line in table.splitlines()
            if line.startswith('| ') and not line.startswith('| set')}
    # Y-channel rows are left out of the table (they are in the JSON); no other set was evaluated
    assert set(rows) == {('McMaster_sigma50', 'out', 'psnr (higher better)'),
                         ('McMaster_sigma50', 'out', 'ssim (higher better)')}
    summaries = json.loads((tmp_path / 'study_barycenter_map.json').read_text())['summaries']
    for arm in ('with T', 'without T'):
        psnr = summaries[arm]['McMaster_sigma50']['metrics']['psnr']
        assert psnr['input_mean'] < 16.0  # sigma 50 noise
        cell = f'{psnr["mean"]:.2f}'
        assert cell in rows[('McMaster_sigma50', 'out', 'psnr (higher better)')]
        assert summaries[arm]['McMaster_sigma50']['images'] == 18
        assert 'psnr_y' in summaries[arm]['McMaster_sigma50']['metrics']


def test_study_on_the_demo_validation_sets_needs_no_data_root(tmp_path, tiny_dataset):
    """--eval demo: both arms scored on the demo's own validation sets (blur and low light included), the
    input column equal to make_demo_data's own input PSNR of that folder."""
    cmd = [sys.executable, str(REPO / 'scripts' / 'study_barycenter_map.py'), '--eval', 'demo', '--iters', '2',
           '--sources', 'noise', 'blur', '--sets', 'demo_blur', '--demo-data', str(tiny_dataset), '--out', str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, 'OMP_NUM_THREADS': '2'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / 'study_barycenter_map.md').read_text()
    assert 'evaluated on demo' in table
    rows = [line for line in table.splitlines() if line.startswith('| demo_')]
    assert [line.split('|')[1:4] for line in rows] == [[' demo_blur ', ' in ', ' psnr (higher better) '],
                                                       [' demo_blur ', ' in ', ' ssim (higher better) ']]
    summaries = json.loads((tmp_path / 'study_barycenter_map.json').read_text())['summaries']
    expected_input = demo.input_psnr(str(tiny_dataset / 'val' / 'blur'))
    for arm in ('with T', 'without T'):
        blur = summaries[arm]['demo_blur']
        assert blur['images'] == 2
        assert abs(blur['metrics']['psnr']['input_mean'] - expected_input) < 1e-6


def test_study_shared_evaluation_without_data_root_names_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'study_barycenter_map.py'), '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert '--data-root' in proc.stderr and '--eval demo' in proc.stderr
