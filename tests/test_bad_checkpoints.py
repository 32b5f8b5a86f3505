"""Broken checkpoints and interrupted runs: one clear line naming the file, or a fallback to the newest
complete set; nothing that was written before is deleted or overwritten."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baryir_plugin import cli, compat
from baryir_plugin.checkpoints import find_resume_point, read_checkpoint, remove_interrupted_saves
from baryir_plugin.errors import CheckpointError

from .bad_input import assert_clean_error, run_inprocess
from .conftest import OPTIONS

CONVERT = 'baryir convert-official'
TEST_YML = OPTIONS / 'test_baryir.yml'


def _torch_file(path: Path, obj=None) -> Path:
    torch.save(obj if obj is not None else {'params': {'w': torch.zeros(64, 64)}}, path)
    return path


def _truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


class _Payload:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


# --------------------------------------------------------------------------------------------------
# baryir convert-official
def _garbage(tmp_path):
    p = tmp_path / 'release.pth'
    p.write_bytes(random.Random(4).randbytes(4096))
    return p


def _zero(tmp_path):
    p = tmp_path / 'release.pth'
    p.write_bytes(b'')
    return p


def _trunc(tmp_path):
    return _truncated(_torch_file(tmp_path / 'release.pth', {'epoch': 1, 'BaryIR': {'w': torch.zeros(256, 256)}}))


def _plain(tmp_path):
    return _torch_file(tmp_path / 'release.pth')


def _wrong_content(tmp_path):
    return _torch_file(tmp_path / 'release.pth', {'epoch': 1, 'BaryIR': {'w': torch.zeros(2)}, 'Pots': None})


def _malicious(tmp_path):
    return _torch_file(tmp_path / 'release.pth', {'epoch': 1, 'BaryIR': _Payload(), 'Pots': None})


def _text_file(tmp_path):
    p = tmp_path / 'release.pth'
    p.write_text('name: not a checkpoint\n')
    return p


@pytest.mark.parametrize('make, needle', [
    (_garbage, 'not a torch checkpoint'),
    (_zero, 'empty (0 bytes'),
    (_trunc, 'truncated or corrupt'),
    (_plain, 'not an official BaryIR release file'),
    (_wrong_content, 'not the BaryIR release this converter knows'),
    (_malicious, 'refusing to load'),
    (_text_file, 'cannot be read'),
], ids=['garbage', 'zero-byte', 'truncated', 'plain-state-dict', 'wrong-content', 'malicious', 'text'])
def test_convert_official_bad_file_is_one_line(tmp_path, make, needle):
    src = make(tmp_path)
    out = tmp_path / 'out' / 'net_g.pth'
    outcome = run_inprocess(cli.main, ['convert-official', str(src), str(out)])
    assert_clean_error(outcome, CONVERT, str(src), needle)
    assert not out.exists() and 'pwned' not in outcome.text


def test_convert_official_missing_file_and_missing_arguments(tmp_path):
    outcome = run_inprocess(cli.main, ['convert-official', str(tmp_path / 'nope.pth'), str(tmp_path / 'o.pth')])
    assert_clean_error(outcome, CONVERT, 'nope.pth', 'not found')
    usage = run_inprocess(cli.main, ['convert-official'])
    assert usage.status == 2 and 'Traceback' not in usage.text and 'required' in usage.err


def test_convert_official_debug_shows_the_traceback(tmp_path):
    src = _garbage(tmp_path)
    outcome = run_inprocess(cli.main, ['convert-official', str(src), str(tmp_path / 'o.pth'), '--debug'])
    assert outcome.status == 1
    assert 'Traceback (most recent call last)' in outcome.err
    assert outcome.err.strip().splitlines()[-1].startswith(f'{CONVERT}: error:')


# --------------------------------------------------------------------------------------------------
# path.pretrain_network_g in `basicsr test` (BasicSR's SRModel, through the load_network patch)
def _test_opt(tmp_path: Path, weights: Path, **extra) -> Path:
    import yaml
    opt = yaml.safe_load(TEST_YML.read_text())
    opt['path']['pretrain_network_g'] = str(weights)
    opt['path'].update(extra)
    out = tmp_path / 'test.yml'
    out.write_text(yaml.safe_dump(opt))
    return out


def _other_width_weights(path: Path) -> Path:
    from baryir_plugin.archs import BaryIR
    net = BaryIR(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8], num_bary_blocks=1)
    return _torch_file(path, {'params': net.state_dict()})


@pytest.mark.parametrize('make, needle', [
    (lambda p: (p.write_bytes(random.Random(2).randbytes(2048)), p)[1], 'not a torch checkpoint'),
    (lambda p: _truncated(_torch_file(p)), 'truncated or corrupt'),
    (lambda p: (p.write_bytes(b''), p)[1], 'empty (0 bytes'),
    (lambda p: _torch_file(p, {'weights': {'w': torch.zeros(1)}}), "no 'params' entry"),
    (lambda p: _torch_file(p, {'params': torch.nn.Linear(2, 2)}), 'pickled objects'),
    (_other_width_weights, 'does not fit the network'),
], ids=['garbage', 'truncated', 'zero-byte', 'no-param-key', 'pickled-module', 'other-width'])
def test_pretrained_network_that_cannot_be_loaded_is_named(workdir, make, needle):
    weights = make(workdir / 'weights.pth')
    outcome = run_inprocess(cli.basicsr_main, ['test', '-opt', str(_test_opt(workdir, weights))], cwd=workdir)
    assert_clean_error(outcome, 'basicsr test', str(weights), needle)
    assert weights.exists()


# --------------------------------------------------------------------------------------------------
# resume: explicit state, --auto_resume fallback, leftovers of interrupted saves
def _write_state(path: Path, it: int) -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    torch.save({'epoch': 0, 'iter': it, 'optimizers': [opt.state_dict()], 'schedulers': []}, path)


def _experiment(tmp_path: Path, iterations=(2, 4), networks=('g', 'potential')) -> dict:
    exp = tmp_path / 'experiments' / 'x'
    (exp / 'models').mkdir(parents=True)
    (exp / 'training_states').mkdir()
    for it in iterations:
        _write_state(exp / 'training_states' / f'{it}.state', it)
        for net in networks:
            _torch_file(exp / 'models' / f'net_{net}_{it}.pth', {'params': torch.nn.Linear(2, 2).state_dict()})
    return {'name': 'x', 'auto_resume': True, 'num_gpu': 0, 'rank': 0,
            **{f'network_{n}': {'type': 'X'} for n in networks},
            'path': {'experiments_root': str(exp), 'models': str(exp / 'models'),
                     'training_states': str(exp / 'training_states')}}


def _files(opt: dict) -> dict[str, int]:
    root = Path(opt['path']['experiments_root'])
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob('*') if p.is_file()}


@pytest.mark.parametrize('breakage, broken', [
    (lambda m, s: _truncated(s / '4.state'), '4.state'),
    (lambda m, s: (s / '4.state').write_bytes(b''), '4.state'),
    (lambda m, s: _truncated(m / 'net_g_4.pth'), 'net_g_4.pth'),
    (lambda m, s: (m / 'net_potential_4.pth').unlink(), 'net_potential_4.pth'),
    (lambda m, s: _torch_file(m / 'net_g_4.pth', {'params': {'w': torch.full((2,), float('nan'))}}), 'non-finite'),
    (lambda m, s: _torch_file(s / '4.state', {'iter': 4}), 'not a BasicSR training state'),
], ids=['truncated-state', 'empty-state', 'truncated-net', 'missing-net', 'nan-net', 'foreign-state'])
def test_auto_resume_falls_back_to_the_newest_complete_set(tmp_path, capsys, breakage, broken):
    import basicsr.train

    opt = _experiment(tmp_path)
    breakage(Path(opt['path']['models']), Path(opt['path']['training_states']))
    before = _files(opt)
    state = basicsr.train.load_resume_state(opt)
    assert state['iter'] == 2
    assert opt['path']['resume_state'].endswith('2.state')
    assert opt['path']['pretrain_network_g'].endswith('net_g_2.pth')
    out = capsys.readouterr().out.splitlines()
    warning = [ln for ln in out if 'skipping iteration 4' in ln]
    assert len(warning) == 1 and broken in warning[0]
    # nothing deleted or rewritten: iteration 4's files are set aside, out of the way of the resumed run's saves
    after = _files(opt)
    assert {k.replace('.unusable', ''): v for k, v in after.items()} == before
    assert sorted(k for k in after if k.endswith('.unusable')) == sorted(
        f'{k}.unusable' for k in before if k.endswith(('4.state', '_4.pth')))
    assert any('kept the files of the skipped iteration' in ln for ln in out)


def test_auto_resume_with_no_complete_set_is_an_error_that_keeps_the_files(tmp_path):
    import basicsr.train

    opt = _experiment(tmp_path)
    for it in (2, 4):
        _truncated(Path(opt['path']['training_states']) / f'{it}.state')
    before = _files(opt)
    with pytest.raises(CheckpointError, match=r'no complete training state .*2 found'):
        basicsr.train.load_resume_state(opt)
    assert _files(opt) == before


def test_auto_resume_without_states_starts_afresh(tmp_path):
    import basicsr.train

    opt = _experiment(tmp_path, iterations=())
    assert basicsr.train.load_resume_state(opt) is None


@pytest.mark.parametrize('content, needle', [(b'', 'empty'), (b'\x00garbage', 'not a torch checkpoint')])
def test_explicit_resume_state_that_cannot_be_read_names_the_option(tmp_path, content, needle):
    import basicsr.train

    opt = _experiment(tmp_path)
    opt['auto_resume'] = False
    bad = tmp_path / 'bad.state'
    bad.write_bytes(content)
    opt['path']['resume_state'] = str(bad)
    with pytest.raises(CheckpointError, match=f'path.resume_state .*{needle}'):
        basicsr.train.load_resume_state(opt)


def test_leftovers_of_interrupted_saves_are_removed_and_nothing_else(tmp_path):
    import basicsr.train

    opt = _experiment(tmp_path)
    models, states = Path(opt['path']['models']), Path(opt['path']['training_states'])
    leftovers = [models / '.net_g_6.pth.k2j_x9a0.tmp', states / '.6.state.abcdefgh.tmp']
    kept = [models / '.net_g_6.pth.keep', models / 'notes.tmp', models / '.hidden.tmp',
            states / '.6.state.ABCDEFGH.tmp']
    for p in leftovers + kept:
        p.write_bytes(b'partial')
    basicsr.train.load_resume_state(opt)
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)


def test_kill_during_a_save_leaves_a_temporary_file_that_the_next_start_removes(tmp_path):
    """A real SIGKILL in the middle of compat.atomic_write: the target is never half-written, and the
    temporary file it leaves is cleared on the next start."""
    target = tmp_path / 'models' / 'net_g_6.pth'
    target.parent.mkdir()
    target.write_bytes(b'previous checkpoint')
    code = ('import sys, time; from baryir_plugin.compat import atomic_write\n'
            'def slow(f):\n    f.write(b"x" * 1000); f.flush(); print("writing", flush=True); time.sleep(60)\n'
            f'atomic_write({str(target)!r}, slow)\n')
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'writing'
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p for p in target.parent.iterdir() if p.name.endswith('.tmp')]
    assert len(leftovers) == 1 and leftovers[0].name.startswith('.net_g_6.pth.')
    assert target.read_bytes() == b'previous checkpoint'
    assert remove_interrupted_saves([str(target.parent)], say=lambda m: None) == [str(leftovers[0])]
    assert [p.name for p in target.parent.iterdir()] == ['net_g_6.pth']


def test_read_checkpoint_names_the_role_and_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r'path.pretrain_network_g .*nope.pth: no such file'):
        read_checkpoint(str(tmp_path / 'nope.pth'), 'path.pretrain_network_g')
    with pytest.raises(CheckpointError, match='is a folder'):
        read_checkpoint(str(tmp_path), 'path.pretrain_network_g')


def test_find_resume_point_reads_only_complete_sets(tmp_path):
    opt = _experiment(tmp_path, iterations=(2, 4, 6))
    _truncated(Path(opt['path']['models']) / 'net_potential_6.pth')
    warnings = []
    path, state, skipped = find_resume_point(opt, opt['path']['training_states'], warn=warnings.append)
    assert state['iter'] == 4 and path.endswith('4.state') and skipped == [6]
    assert len(warnings) == 1 and 'net_potential_6.pth' in warnings[0]


def test_atomic_save_of_an_unwritable_destination_keeps_the_old_file(tmp_path):
    target = tmp_path / 'net.pth'
    target.write_bytes(b'old')

    def failing(f):
        f.write(b'new, half')
        raise OSError(28, 'No space left on device')

    with pytest.raises(OSError):
        compat.atomic_write(str(target), failing)
    assert target.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['net.pth']


# --------------------------------------------------------------------------------------------------
# more ways to point at the wrong file
def test_convert_official_never_overwrites_its_input_or_names_a_temporary_file(tmp_path):
    src = _plain(tmp_path)
    before = src.read_bytes()
    outcome = run_inprocess(cli.main, ['convert-official', str(src), str(src)])
    assert_clean_error(outcome, CONVERT, str(src), 'is the input checkpoint', status=2)
    assert src.read_bytes() == before
    folder = tmp_path / 'a_folder'
    folder.mkdir()
    outcome = run_inprocess(cli.main, ['convert-official', str(folder), str(tmp_path / 'o.pth')])
    assert_clean_error(outcome, CONVERT, 'a_folder', 'is a folder')


def test_atomic_write_names_the_target_and_keeps_the_usual_file_mode(tmp_path):
    target = tmp_path / 'out'
    target.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        compat.atomic_write(str(target), lambda f: f.write(b'x'))
    assert info.value.filename == str(target)
    old = os.umask(0o022)
    try:
        compat.atomic_write(str(tmp_path / 'w.pth'), lambda f: f.write(b'x'))
    finally:
        os.umask(old)
    assert (tmp_path / 'w.pth').stat().st_mode & 0o777 == 0o644
    below_a_file = tmp_path / 'w.pth' / 'x.pth'
    with pytest.raises(OSError) as info:
        compat.atomic_write(str(below_a_file), lambda f: f.write(b'x'))
    assert str(tmp_path / 'w.pth') in str(info.value)


def test_explicit_resume_state_needs_the_networks_of_this_experiment(tmp_path):
    import basicsr.train

    opt = _experiment(tmp_path)
    opt['auto_resume'] = False
    other = tmp_path / 'other.state'
    _write_state(other, 8)
    opt['path']['resume_state'] = str(other)
    with pytest.raises(CheckpointError, match=r'iteration 8, but its network file\(s\) .*net_g_8.pth'):
        basicsr.train.load_resume_state(opt)


def test_resuming_past_total_iter_is_an_error(tmp_path):
    import basicsr.train

    from baryir_plugin.errors import OptionError

    opt = _experiment(tmp_path)
    opt['train'] = {'total_iter': 4}
    with pytest.raises(OptionError, match='iteration 4 and train.total_iter is 4: nothing is left to train'):
        basicsr.train.load_resume_state(opt)


def test_a_training_state_given_as_network_weights_is_named(workdir):
    state = workdir / '6.state'
    _write_state(state, 6)
    outcome = run_inprocess(cli.basicsr_main, ['test', '-opt', str(_test_opt(workdir, state))], cwd=workdir)
    assert_clean_error(outcome, 'basicsr test', str(state), 'is a training state', 'path.resume_state')


def test_a_missing_ema_key_is_a_warning_not_silence(workdir):
    from baryir_plugin.archs import BaryIR
    net = BaryIR(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8], num_bary_blocks=1)
    weights = _torch_file(workdir / 'w.pth', {'params': net.state_dict()})
    outcome = run_inprocess(cli.basicsr_main,
                            ['test', '-opt', str(_test_opt(workdir, weights, param_key_g='params_ema'))], cwd=workdir)
    assert outcome.status == 0, outcome.err[-3000:]
    assert "has no 'params_ema' weights" in outcome.text and 'WARNING' in outcome.text


def test_testing_without_weights_is_an_error(workdir):
    import yaml
    opt = yaml.safe_load(TEST_YML.read_text())
    opt['path']['pretrain_network_g'] = None
    path = workdir / 'untrained.yml'
    path.write_text(yaml.safe_dump(opt))
    outcome = run_inprocess(cli.basicsr_main, ['test', '-opt', str(path)], cwd=workdir)
    assert_clean_error(outcome, 'basicsr test', 'untrained.yml', 'path.pretrain_network_g is not set')


def test_convert_official_outputs_never_overwrite_silently(tmp_path):
    src = _plain(tmp_path)
    existing = tmp_path / 'mine.pth'
    existing.write_bytes(b'my file')
    outcome = run_inprocess(cli.main, ['convert-official', str(src), str(existing)])
    assert_clean_error(outcome, CONVERT, str(existing), '--overwrite', status=2)
    assert existing.read_bytes() == b'my file'
    out = tmp_path / 'o.pth'
    outcome = run_inprocess(cli.main, ['convert-official', str(src), str(out), '--potentials-out', str(out)])
    assert_clean_error(outcome, CONVERT, '--potentials-out', 'network_g output too', status=2)


def test_a_state_of_another_model_is_named_on_resume(tmp_path):
    from basicsr.models.sr_model import SRModel

    model = SRModel.__new__(SRModel)
    model.optimizers, model.schedulers = [object()], [object()]
    with pytest.raises(CheckpointError, match='holds 2 optimizers, this SRModel has 1'):
        model.resume_training({'optimizers': [{}, {}], 'schedulers': [{}]})
