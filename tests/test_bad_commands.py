"""The error boundary of every command: usage mistakes, unreadable option files, the environment, and
what a bug looks like (its traceback, plus a line saying so)."""
from __future__ import annotations

import errno
import sys

import pytest
import torch

from baryir_plugin import cli, errors
from baryir_plugin.errors import DataError, OptionError, run_guarded, user_message

from .bad_input import assert_clean_error, run_inprocess, run_subprocess
from .conftest import OPTIONS, REPO, bin_path

TRAIN = 'basicsr train'


def test_no_command_and_unknown_command_are_usage_errors():
    for argv in ([], ['fit']):
        outcome = run_inprocess(cli.basicsr_main, argv)
        assert outcome.status == 2 and 'usage: basicsr' in outcome.text and 'Traceback' not in outcome.text


@pytest.mark.parametrize('argv, needles', [
    (['train'], ['option file is missing', '-opt FILE.yml']),
    (['train', '-opt', 'nope.yml'], ["'nope.yml'", 'no such file']),
    (['test', '-opt', 'missing/test.yml'], ['missing/test.yml']),
    (['train', '-opt', str(OPTIONS / 'train_baryir_model.yml'), '--data-root'], ['--data-root needs a folder']),
], ids=['no-opt', 'missing-opt', 'missing-test-opt', 'data-root-without-value'])
def test_usage_errors_exit_2_with_one_line(tmp_path, argv, needles):
    outcome = run_inprocess(cli.basicsr_main, argv, cwd=tmp_path)
    assert_clean_error(outcome, f'basicsr {argv[0]}', *needles, status=2)


def test_data_root_placeholder_needs_a_root(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.DATA_ROOT_ENV, raising=False)
    opt = tmp_path / 'x.yml'
    opt.write_text('name: x\ndatasets:\n  test:\n    dataroot_gt: ${data_root}/gt\n')
    outcome = run_inprocess(cli.basicsr_main, ['test', '-opt', str(opt)], cwd=tmp_path)
    assert_clean_error(outcome, 'basicsr test', '${data_root}', '--data-root', status=2)
    outcome = run_inprocess(cli.basicsr_main, ['test', '-opt', str(opt), '--data-root', 'nowhere'], cwd=tmp_path)
    assert_clean_error(outcome, 'basicsr test', "'nowhere'", 'not a folder', status=2)


@pytest.mark.parametrize('content, needles', [
    (b'\x89PNG\r\n\x1a\n\x00\x00\xff\xfe', ['not a text file']),
    (b'name: x\n  model_type: [\n', ['bad.yml:2', 'not valid YAML']),
    (b'name: x\nname: [1, 2\n', ['bad.yml:', 'not valid YAML']),
    (b'\tname: x\n', ['bad.yml:1', 'not valid YAML']),
], ids=['binary', 'bad-indent', 'unclosed-list', 'tab'])
def test_unreadable_option_file_names_the_file(tmp_path, content, needles):
    opt = tmp_path / 'bad.yml'
    opt.write_bytes(content)
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(opt)], cwd=tmp_path)
    assert_clean_error(outcome, TRAIN, *needles)


def test_a_console_script_prints_one_line_in_a_real_process(tmp_path):
    outcome = run_subprocess([bin_path('basicsr'), 'train', '-opt', 'nope.yml'], cwd=tmp_path, timeout=120)
    assert_clean_error(outcome, TRAIN, 'nope.yml', status=2)
    outcome = run_subprocess([bin_path('baryir'), 'convert-official', 'nope.pth', 'o.pth'], cwd=tmp_path, timeout=120)
    assert_clean_error(outcome, 'baryir convert-official', 'nope.pth')


def _pipeline_raising(monkeypatch, exc: BaseException):
    def fake(kind, argv):
        raise exc
    monkeypatch.setattr(cli, 'run_pipeline', fake)


def test_a_bug_keeps_its_traceback_and_says_it_is_one(monkeypatch):
    _pipeline_raising(monkeypatch, ZeroDivisionError('division by zero'))
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', 'x.yml'])
    assert outcome.status == 1
    assert 'Traceback (most recent call last)' in outcome.err and 'ZeroDivisionError' in outcome.err
    last = outcome.err.strip().splitlines()[-1]
    assert last.startswith(f'{TRAIN}: internal error: ZeroDivisionError') and 'bug' in last


@pytest.mark.parametrize('how', ['flag', 'env'])
def test_debug_shows_the_traceback_of_an_input_error(monkeypatch, how):
    _pipeline_raising(monkeypatch, OptionError('network_g.dimm: unknown option'))
    argv = ['train', '-opt', 'x.yml'] + (['--debug'] if how == 'flag' else [])
    if how == 'env':
        monkeypatch.setenv(errors.DEBUG_ENV, '1')
    outcome = run_inprocess(cli.basicsr_main, argv)
    assert outcome.status == 1 and 'Traceback (most recent call last)' in outcome.err
    assert outcome.err.strip().splitlines()[-1] == f'{TRAIN}: error: network_g.dimm: unknown option'


def test_ctrl_c_is_one_line_and_status_130(monkeypatch):
    _pipeline_raising(monkeypatch, KeyboardInterrupt())
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', 'x.yml'])
    assert outcome.status == 130 and outcome.err.strip() == f'{TRAIN}: interrupted.'


@pytest.mark.parametrize('exc, needles', [
    (OSError(errno.ENOSPC, 'No space left on device', 'experiments/x/models/net_g_8.pth'),
     ['net_g_8.pth', 'No space left', 'free some space']),
    (FileNotFoundError(errno.ENOENT, 'No such file or directory', 'datasets/x/meta.txt'), ['datasets/x/meta.txt']),
    (PermissionError(errno.EACCES, 'Permission denied', 'results/x'), ['results/x', 'Permission denied']),
    (MemoryError(), ['out of memory', 'batch_size_per_gpu']),
    (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'), ['out of memory', 'checkpointing']),
], ids=['disk-full', 'missing-file', 'permission', 'host-memory', 'gpu-memory'])
def test_environment_errors_are_one_line(monkeypatch, exc, needles):
    _pipeline_raising(monkeypatch, exc)
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', 'x.yml'])
    assert_clean_error(outcome, TRAIN, *needles)


def test_a_broken_plugin_is_named(monkeypatch):
    import importlib.metadata

    class BrokenEntryPoint:
        name, value = 'brokenplugin', 'broken_plugin_pkg'

        def load(self):
            raise ImportError("No module named 'broken_plugin_pkg'")

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, 'entry_points',
                        lambda **kw: [BrokenEntryPoint()] if kw.get('group') == cli.PLUGIN_GROUP else real(**kw))
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(OPTIONS / 'train_baryir_model.yml')])
    assert_clean_error(outcome, TRAIN, 'brokenplugin', 'broken_plugin_pkg', 'uninstall')


def test_an_error_from_a_loader_worker_shows_the_original_message_only():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError(f'image datasets/x/{i}.png does not decode; replace it.')

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    status = None

    def work():
        next(iter(loader))

    outcome = run_inprocess(lambda argv: run_guarded('basicsr test', work), [])
    status = outcome.status
    line = assert_clean_error(outcome, 'basicsr test', 'datasets/x/0.png')
    assert status == 1 and line == 'basicsr test: error: image datasets/x/0.png does not decode; replace it.'


def test_messages_are_single_lines():
    assert user_message(OptionError('a\n  b\tc')) == 'a b c'
    assert user_message(ValueError('x')) is None  # not known to be the user's: a bug until proven otherwise
    assert errors.did_you_mean('use_ampp', ['use_amp', 'amp_bf16']) == " (did you mean 'use_amp'?)"
    assert errors.did_you_mean('zzz', ['use_amp']) == ''


@pytest.mark.parametrize('script, argv, needles, status', [
    ('bench_data', ['--root', 'no/such/root'], ['no/such/root'], 1),
    ('gpu_check', ['--fixture', 'no/such/fixture'], ['--fixture', 'no/such/fixture'], 2),
    ('bench_train_step', ['--modes', 'turbo'], ["'turbo'"], 2),
    ('bench_inference', ['--size', 'big'], ['--size'], 2),
], ids=['bench-data-root', 'gpu-check-fixture', 'bench-mode', 'bench-inference-size'])
def test_scripts_print_one_line(tmp_path, script, argv, needles, status):
    outcome = run_subprocess([sys.executable, str(REPO / 'scripts' / f'{script}.py'), *argv], cwd=tmp_path,
                             timeout=180)
    assert 'Traceback' not in outcome.text, outcome.text[-3000:]
    assert outcome.status == status, outcome.text[-3000:]
    last = outcome.err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last


# --------------------------------------------------------------------------------------------------
# the environment and the options a constructor checks itself
def _model_opt(workdir, edit) -> str:
    import yaml
    opt = yaml.safe_load((OPTIONS / 'train_baryir_model.yml').read_text())
    opt['train']['total_iter'] = 1
    opt.pop('val')
    opt['datasets'].pop('val')
    edit(opt)
    path = workdir / 'edited.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


@pytest.mark.parametrize('edit, needles, status', [
    (lambda o: o.update(num_gpu=1), ['num_gpu is 1', 'no usable CUDA GPU'], 1),
    (lambda o: o.update(manual_seed='abc'), ['manual_seed must be an integer', "'abc'"], 1),
    (lambda o: o['train']['optim_g'].update(lr=-1.0), ['train.optim_*', 'Invalid learning rate'], 1),
    (lambda o: o['train'].update(scheduler={'type': 'CosineAnnealingRestartLR', 'periods': [1],
                                            'restart_weights': [1, 1]}),
     ['train.scheduler (CosineAnnealingRestartLR)', 'same length'], 1),
], ids=['num-gpu-without-cuda', 'seed-text', 'negative-lr', 'scheduler-lengths'])
def test_options_the_constructors_refuse_are_one_line(workdir, edit, needles, status):
    if torch.cuda.is_available() and 'num_gpu is 1' in needles[0]:
        pytest.skip('this machine has a GPU')
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', _model_opt(workdir, edit)], cwd=workdir)
    assert_clean_error(outcome, TRAIN, *needles, status=status)


def test_launcher_pytorch_outside_torchrun_is_a_usage_error(workdir, monkeypatch):
    for var in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_RANK'):
        monkeypatch.delenv(var, raising=False)
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', _model_opt(workdir, lambda o: None),
                                               '--launcher', 'pytorch'], cwd=workdir)
    assert_clean_error(outcome, TRAIN, '--launcher pytorch', 'torchrun', status=2)


def test_a_flag_without_its_value_is_reported_once(workdir):
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', _model_opt(workdir, lambda o: None), '--force_yml'],
                            cwd=workdir)
    assert outcome.status == 2 and 'Traceback' not in outcome.text
    assert outcome.err.count('expected at least one argument') == 1, outcome.err


def test_a_data_root_with_yaml_characters_stays_one_path(tmp_path):
    import yaml
    root = tmp_path / 'my data #1: b'
    (root / 'gt').mkdir(parents=True)
    opt = tmp_path / 'x.yml'
    opt.write_text('name: x\ndatasets:\n  test_1:\n    dataroot_gt: ${data_root}/gt  # the clean images\n')
    (tmp_path / 'out').mkdir()
    resolved = cli.resolve_data_root(str(opt), str(root), str(tmp_path / 'out'))
    assert yaml.safe_load(open(resolved))['datasets']['test_1']['dataroot_gt'] == root.as_posix() + '/gt'


def test_an_lmdb_error_is_one_line():
    import lmdb
    try:
        lmdb.open('no/such/set.lmdb', readonly=True, lock=False)
    except lmdb.Error as e:
        assert 'no/such/set.lmdb' in user_message(e) and 'make_lmdb.py' in user_message(e)


def test_sigterm_is_one_line_and_status_143(monkeypatch):
    import os
    import signal

    def work(kind, argv):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, 'run_pipeline', work)
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', 'x.yml'])
    assert outcome.status == 143 and outcome.err.strip() == f'{TRAIN}: terminated (SIGTERM).'


def test_a_name_that_is_a_path_is_refused(workdir):
    for name in ('../victim', '..', 'a/b'):
        outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', _model_opt(workdir, lambda o: o.update(name=name))],
                                cwd=workdir)
        assert_clean_error(outcome, TRAIN, f'name {name!r} must be a plain folder name')
    assert not (workdir.parent / 'victim').exists()


def test_an_option_file_that_is_not_a_regular_file(tmp_path):
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(tmp_path)], cwd=tmp_path)
    assert_clean_error(outcome, TRAIN, 'is not a regular file', status=2)


_PRINTS_A_LOT = """
import sys
from baryir_plugin.errors import run_guarded

def work():
    for i in range(200000):
        print('row', i, 'of a long table')

sys.exit(run_guarded('baryir table', work))
"""


def test_output_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`baryir ... | head`: the reader closes the pipe; the command stops with SIGPIPE's status, silently."""
    import subprocess

    proc = subprocess.Popen([sys.executable, '-c', _PRINTS_A_LOT], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b'row 0 ')
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == '', err


def test_a_broken_pipe_elsewhere_is_still_reported(monkeypatch):
    """Only a closed stdout is quiet: a pipe to another process that breaks is an error like any other."""
    def work(kind, argv):
        raise BrokenPipeError(errno.EPIPE, 'Broken pipe')

    monkeypatch.setattr(cli, 'run_pipeline', work)
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', 'x.yml'])
    assert outcome.status not in (0, 141)
    assert 'Broken pipe' in outcome.text
