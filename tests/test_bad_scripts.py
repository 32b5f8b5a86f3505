"""Bad flags and inputs of the benchmark and study scripts: each ends in one ``scripts/<name>.py: error:`` line
that names the flag, exit status 2 (a flag) or 1 (an input, a failed child command), no traceback, and is
found before any work starts. Most run in this process (``main`` behind ``guarded_main``); one per kind of
entry point runs as a real process."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from baryir_plugin.errors import BaryIRError, guarded_main

from .bad_input import assert_clean_error, run_inprocess, run_subprocess
from .conftest import REPO, load_script

SCRIPTS = ('bench_inference', 'bench_train_step', 'amp_sensitivity', 'gpu_check', 'study_barycenter_map',
           'bench_data')
TINY = ['--dim', '8', '--num-blocks', '1', '1', '1', '1', '--num-refinement-blocks', '1']


@pytest.fixture(scope='module')
def scripts():
    return {name: load_script(name) for name in SCRIPTS}


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv('BARYIR_DEBUG', raising=False)


def _run(scripts, name, argv, cwd=None):
    prog = f'scripts/{name}.py'
    return run_inprocess(lambda a: guarded_main(prog, scripts[name].main, a), argv, cwd=cwd), prog


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)


def _one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)


@pytest.mark.parametrize('name, argv, needles', [
    ('bench_inference', ['--dim', '0'], ['--dim', 'at least 1']),
    ('bench_inference', ['--dim', '7'], ['--dim 7', 'even', '--dim 8']),
    ('bench_inference', ['--size', '-4', '16'], ['--size', 'at least 1', '-4']),
    ('bench_inference', ['--device', 'gpu'], ['--device', "'gpu'", 'cpu, cuda or cuda:N']),
    ('bench_inference', ['--iters', '0'], ['--iters', 'at least 1']),
    ('bench_inference', ['--warmup', '-1'], ['--warmup', 'at least 0']),
    ('bench_inference', ['--num-blocks', '1', '0', '1', '1'], ['--num-blocks']),
    ('bench_train_step', ['--batch', '0'], ['--batch', 'at least 1']),
    ('bench_train_step', ['--sources', '0'], ['--sources', 'at least 1']),
    ('bench_train_step', ['--crop', '8'], ['--crop 8', 'multiple of 8 and at least 16', '--crop 16']),
    ('bench_train_step', ['--crop', '12'], ['--crop 12', '--crop 16']),
    ('bench_train_step', ['--iters', '0'], ['--iters']),
    ('bench_train_step', ['--modes', 'base', 'turbo'], ['--modes', "'turbo'"]),
    ('amp_sensitivity', ['--crop', '0'], ['--crop', 'at least 1']),
    ('amp_sensitivity', ['--crop', '20'], ['--crop 20', '--crop 24']),
    ('amp_sensitivity', ['--dim', '5'], ['--dim 5']),
    ('gpu_check', ['--device', 'cpu', '--budget-s', '-1'], ['--budget-s', 'greater than 0', '-1']),
    ('gpu_check', ['--device', 'cpu', '--budget-s', '0'], ['--budget-s']),
    ('gpu_check', ['--device', 'cpu', '--budget-s', 'soon'], ['--budget-s', "'soon' is not a number"]),
    ('gpu_check', ['--device', 'cpu', '--demo-seeds', '1', '-2'], ['--demo-seeds', 'at least 0']),
    ('gpu_check', ['--device', 'cpu', '--modes', 'turbo'], ['--modes', "'turbo'"]),
    ('gpu_check', ['--device', 'cpu', '--demo-val-photos', 'no/such/photos'],
     ['--demo-val-photos no/such/photos', 'no such folder']),
    ('bench_data', ['--workers', '0', '-1'], ['--workers', 'at least 0']),
    ('bench_data', ['--step-ms', '0'], ['--step-ms']),
    ('study_barycenter_map', ['--eval', 'demo', '--iters', '0'], ['--iters', 'at least 1']),
    ('study_barycenter_map', ['--eval', 'demo', '--dim', '7'], ['--dim 7', 'even']),
    ('study_barycenter_map', ['--eval', 'demo', '--sources', 'noise', 'snow'], ['--sources', "'snow'", 'noise rain']),
    ('study_barycenter_map', ['--eval', 'demo', '--sources', 'rain', 'noise'], ['--sources', 'in the order']),
    ('study_barycenter_map', ['--eval', 'demo', '--sets', 'Kodak24'], ['--sets', "'Kodak24'", 'demo_noise']),
    ('study_barycenter_map', [], ['--eval shared needs --data-root', '--eval demo']),
    ('study_barycenter_map', ['--bogus'], ['unrecognized arguments: --bogus']),
])
def test_bad_flags_are_one_usage_line(scripts, tmp_path, name, argv, needles):
    extra = ['--out', str(tmp_path / 'out')] if name in ('gpu_check', 'study_barycenter_map') else []
    outcome, prog = _run(scripts, name, argv + extra, cwd=tmp_path)
    assert_clean_error(outcome, prog, *needles, status=2)
    assert not (tmp_path / 'out').exists()  # nothing ran, nothing was written


@pytest.mark.parametrize('name, argv', [
    ('bench_inference', ['--device', 'cuda']),
    ('bench_inference', ['--device', 'cuda:1']),
    ('bench_train_step', ['--device', 'cuda']),
    ('amp_sensitivity', ['--device', 'cuda']),
    ('gpu_check', ['--device', 'cuda']),
])
def test_cuda_without_a_gpu_names_the_flag(scripts, tmp_path, monkeypatch, name, argv):
    _no_cuda(monkeypatch)
    outcome, prog = _run(scripts, name, argv + (['--out', str(tmp_path / 'o')] if name == 'gpu_check' else []))
    line = assert_clean_error(outcome, prog, f'--device {argv[1]}', 'no CUDA device', status=2)
    assert ('--device cpu --quick' if name == 'gpu_check' else 'use --device cpu') in line


def test_a_cuda_index_the_machine_lacks(scripts, monkeypatch):
    _one_gpu(monkeypatch)
    outcome, prog = _run(scripts, 'bench_inference', ['--device', 'cuda:7'])
    assert_clean_error(outcome, prog, '--device cuda:7', 'sees 1 CUDA device', 'cuda:0', status=2)


def test_output_paths_are_checked_before_the_run(scripts, tmp_path):
    (tmp_path / 'afile').write_text('x')
    outcome, prog = _run(scripts, 'bench_train_step', TINY + ['--json', str(tmp_path)])
    assert_clean_error(outcome, prog, '--json', 'is a folder', status=2)
    outcome, prog = _run(scripts, 'gpu_check', ['--device', 'cpu', '--out', str(tmp_path / 'afile' / 'x')])
    assert_clean_error(outcome, prog, '--out', 'is a file, not a folder', status=2)
    for flag in ('--out', '--demo-data'):
        outcome, prog = _run(scripts, 'study_barycenter_map', ['--eval', 'demo', flag, 'afile'], cwd=tmp_path)
        assert_clean_error(outcome, prog, f'{flag} afile', 'is a file, not a folder', status=2)


def test_gpu_check_reads_the_validation_photos_before_any_check(scripts, tmp_path):
    """A photo the demo check could not use is named at once, with the fix gpu_check offers (no --val-crop)."""
    import cv2
    import numpy as np

    for folder, write in (('corrupt', lambda p: p.write_bytes(b'not an image')),
                          ('small', lambda p: cv2.imwrite(str(p), np.zeros((64, 96, 3), np.uint8)))):
        (tmp_path / folder).mkdir()
        write(tmp_path / folder / 'a.png')
    outcome, prog = _run(scripts, 'gpu_check', ['--device', 'cpu', '--demo-val-photos', 'corrupt'], cwd=tmp_path)
    assert_clean_error(outcome, prog, 'corrupt/a.png', 'does not decode', status=2)
    outcome, prog = _run(scripts, 'gpu_check', ['--device', 'cpu', '--demo-val-photos', 'small'], cwd=tmp_path)
    line = assert_clean_error(outcome, prog, '--demo-val-photos: small/a.png is 64x96',
                              'smaller than the 128-pixel crop', 'remove the image', status=2)
    assert '--val-crop' not in line
    assert not (tmp_path / 'gpu_check_out').exists()


def test_study_names_a_data_root_that_is_not_a_folder(tmp_path):
    """A real process: the message has the script's prefix (it used to be a bare line)."""
    cmd = [sys.executable, str(REPO / 'scripts' / 'study_barycenter_map.py'), '--data-root', 'nope', '--out', 'o']
    outcome = run_subprocess(cmd, cwd=tmp_path, timeout=120)
    assert_clean_error(outcome, 'scripts/study_barycenter_map.py', "--data-root 'nope'", '--eval demo', status=1)


def test_bench_inference_bad_device_in_a_real_process(tmp_path):
    cmd = [sys.executable, str(REPO / 'scripts' / 'bench_inference.py'), '--device', 'gpu']
    outcome = run_subprocess(cmd, cwd=tmp_path, timeout=120)
    assert_clean_error(outcome, 'scripts/bench_inference.py', "--device 'gpu'", status=2)


def test_study_names_a_failed_child_command_once(scripts, tmp_path):
    """make_demo_data refuses a folder that is not a demo set: its own line, then one line of the study
    naming the command, no CalledProcessError traceback."""
    occupied = tmp_path / 'occupied'
    occupied.mkdir()
    (occupied / 'notes.txt').write_text('mine')
    outcome, prog = _run(scripts, 'study_barycenter_map', ['--eval', 'demo', '--demo-data', 'occupied', '--out', 'o'],
                         cwd=tmp_path)
    assert_clean_error(outcome, prog, 'make_demo_data.py --out', 'failed with exit status 1', 'error line above',
                       '--demo-data', status=1)
    assert len(outcome.error_lines('scripts/make_demo_data.py')) == 1
    assert outcome.err.index('scripts/make_demo_data.py: error:') < outcome.err.index(f'{prog}: error:')


def test_study_passes_on_the_training_error_and_names_the_command(scripts, tmp_path):
    """basicsr train fails on a demo folder without images: its error line is shown (not the whole log),
    then the study's one line with the command and the log."""
    (tmp_path / 'fake' / 'train').mkdir(parents=True)
    outcome, prog = _run(scripts, 'study_barycenter_map', ['--eval', 'demo', '--demo-data', 'fake', '--iters', '1',
                                                           '--out', 'o'], cwd=tmp_path)
    assert_clean_error(outcome, prog, '`basicsr train -opt', 'train_study_with_T.yml', 'study_with_T_train.out',
                       status=1)
    assert len(outcome.error_lines('basicsr train')) == 1 and 'dataroot_gt' in outcome.error_lines('basicsr train')[0]


def test_bench_train_step_passes_on_a_failed_mode(scripts, capsys):
    """A mode's process that printed its own error line: that line is the run's one line; one that was
    killed without a word gets a line that names the mode."""
    script = scripts['bench_train_step']
    prog = 'scripts/bench_train_step.py'
    failed = subprocess.CompletedProcess(['x'], 1, '', f'{prog}: error: out of memory; lower --batch.\n')
    assert script._child_failed('bf16', failed) == 1
    err = capsys.readouterr().err
    assert '[bf16] failed' in err and err.count(f'{prog}: error:') == 1
    killed = subprocess.CompletedProcess(['x'], -9, '', '')
    with pytest.raises(BaryIRError, match=r'mode ckpt: its process was killed by signal 9 .*--modes ckpt'):
        script._child_failed('ckpt', killed)
