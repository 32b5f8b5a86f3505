"""Training that diverges: non-finite steps are skipped and logged, a run that stays non-finite stops with
an error naming the last good checkpoint, and no checkpoint with non-finite weights is ever written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from baryir_plugin import cli
from baryir_plugin.models.numerics import NonFiniteGuard
from baryir_plugin.models.training_speed import TrainingSpeed

from .bad_input import assert_clean_error, run_inprocess
from .conftest import OPTIONS

TRAIN = 'basicsr train'
NAME = 'baryir_model_tiny'


def _opt_file(workdir: Path, lr: float = 1e-4, total_iter: int = 16, save_every: int = 4, **train) -> Path:
    opt = yaml.safe_load((OPTIONS / 'train_baryir_model.yml').read_text())
    opt['train']['optim_g']['lr'] = lr
    opt['train']['total_iter'] = total_iter
    opt['train'].update(train)
    opt['logger']['save_checkpoint_freq'] = save_every
    opt['val']['val_freq'] = 10 ** 6  # validation of a diverged network is not what is tested
    path = workdir / 'train.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def _models(workdir: Path) -> Path:
    return workdir / 'experiments' / NAME / 'models'


def _log(workdir: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted((workdir / 'experiments' / NAME).glob('train_*.log')))


def _all_saved_weights_finite(workdir: Path) -> list[str]:
    names = []
    for path in sorted(_models(workdir).glob('net_g_*.pth')):
        params = torch.load(path, weights_only=True)['params']
        assert all(torch.isfinite(t).all() for t in params.values()), f'{path.name} holds non-finite weights'
        names.append(path.name)
    return names


def _scale_inputs(monkeypatch, factor: float, only_iters=None):
    """Multiply the training inputs by ``factor`` (all iterations, or those in ``only_iters``)."""
    from baryir_plugin.models.baryir_model import BaryIRModel

    original = BaryIRModel.feed_data
    calls = {'n': 0}

    def feed(self, data):
        original(self, data)
        if self.is_train and 'gt' in data:
            calls['n'] += 1
            if only_iters is None or calls['n'] in only_iters:
                self.lq = self.lq * factor
    monkeypatch.setattr(BaryIRModel, 'feed_data', feed)


def test_a_huge_learning_rate_stops_with_an_error(workdir):
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(_opt_file(workdir, lr=1e12, save_every=1))],
                            cwd=workdir)
    line = assert_clean_error(outcome, TRAIN, 'training diverged', 'l_pix', 'train.nonfinite: skip',
                              'for 10 consecutive iterations (1-10)', 'no checkpoint was saved before it')
    assert 'train.optim_*.lr' in line
    # the first step made the weights huge: the potentials' step of iteration 1 was already non-finite, and
    # nothing was saved while steps were being skipped (net_g_latest.pth neither)
    assert not list(_models(workdir).glob('*.pth'))
    log = _log(workdir)
    assert re.findall(r'Iteration (\d+): ', log)[:3] == ['1', '2', '3']
    assert 'Iteration 1: potential step skipped (non-finite l_potential)' in log
    assert 'Not saving iteration 1' in log


def test_divergence_names_the_last_checkpoint_before_it(workdir, monkeypatch):
    _scale_inputs(monkeypatch, float('nan'), only_iters=set(range(6, 100)))
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(_opt_file(workdir, save_every=2,
                                                                               nonfinite_patience=4))], cwd=workdir)
    line = assert_clean_error(outcome, TRAIN, 'for 4 consecutive iterations (6-9)', 'net_g_4.pth', '(iteration 4)')
    assert '--auto_resume' in line
    assert _all_saved_weights_finite(workdir) == ['net_g_2.pth', 'net_g_4.pth']


def test_inputs_of_extreme_magnitude_are_caught(workdir, monkeypatch):
    _scale_inputs(monkeypatch, 1e30)
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(_opt_file(workdir, nonfinite_patience=3))],
                            cwd=workdir)
    line = assert_clean_error(outcome, TRAIN, 'training diverged', 'for 3 consecutive iterations (1-3)',
                              'no checkpoint was saved')
    assert 'l_' in line  # the terms are named
    assert not list(_models(workdir).glob('*.pth'))


def test_policy_stop_ends_at_the_first_non_finite_step(workdir, monkeypatch):
    _scale_inputs(monkeypatch, float('nan'), only_iters={6})
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(_opt_file(workdir, nonfinite='stop'))],
                            cwd=workdir)
    assert_clean_error(outcome, TRAIN, 'at iteration 6', 'train.nonfinite: stop', 'net_g_4.pth')


def test_a_transient_non_finite_batch_is_skipped_and_training_goes_on(workdir, monkeypatch):
    _scale_inputs(monkeypatch, float('inf'), only_iters={3})
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(_opt_file(workdir, total_iter=8))], cwd=workdir)
    assert outcome.status == 0, outcome.err[-3000:]
    log = _log(workdir)
    skipped = re.findall(r'Iteration (\d+): (.*)', log)
    assert [it for it, _ in skipped] == ['3'], skipped
    assert 'network step skipped (non-finite' in skipped[0][1]
    assert 'net_g_latest.pth' in _all_saved_weights_finite(workdir)


def test_policy_ignore_trains_on_but_never_saves_non_finite_weights(workdir):
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(_opt_file(workdir, lr=1e12, total_iter=6,
                                                                               save_every=3, nonfinite='ignore'))],
                            cwd=workdir)
    # the run is not a success: its result could not be saved
    assert_clean_error(outcome, TRAIN, 'training ended, but net_g_latest.pth was not saved', 'NaN/inf')
    saved = _all_saved_weights_finite(workdir)
    assert 'net_g_latest.pth' not in saved and 'net_g_6.pth' not in saved
    assert 'Not saving iteration latest (net_g_latest.pth and the rest)' in _log(workdir)
    states = {p.name for p in (workdir / 'experiments' / NAME / 'training_states').iterdir()}
    assert '6.state' not in states  # a state whose networks were refused would be an incomplete set


def test_stock_srmodel_never_saves_non_finite_weights_and_does_not_end_as_a_success(workdir):
    opt = yaml.safe_load((OPTIONS / 'train_srmodel_baryir.yml').read_text())
    opt['train']['pixel_opt']['loss_weight'] = 1e39  # inf in float32
    opt['train']['total_iter'] = 2
    opt['logger']['save_checkpoint_freq'] = 1
    opt.pop('val', None)
    opt['datasets'].pop('val', None)
    path = workdir / 'sr.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    outcome = run_inprocess(cli.basicsr_main, ['train', '-opt', str(path)], cwd=workdir)
    assert_clean_error(outcome, TRAIN, 'net_g_latest.pth was not saved', 'NaN/inf')
    models = workdir / 'experiments' / opt['name'] / 'models'
    assert not list(models.glob('*.pth'))
    assert not list((workdir / 'experiments' / opt['name'] / 'training_states').glob('*.state'))


# --------------------------------------------------------------------------------------------------
def _net_and_optimizer():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


def _sqrt_at_zero(net, x):
    with torch.no_grad():
        net.weight[0, 0] = 0.0
    return net.weight.abs().sqrt().sum()  # finite, but its gradient at 0 is infinite


@pytest.mark.parametrize('make_loss', [
    lambda net, x: net(x).sum() * float('nan'),
    lambda net, x: (net.weight * 1e38).pow(2).sum(),
    _sqrt_at_zero,
], ids=['nan-loss', 'overflowing-loss', 'infinite-gradient'])
def test_a_non_finite_step_is_not_taken(make_loss):
    net, optimizer = _net_and_optimizer()
    guard = NonFiniteGuard('skip', patience=2)
    loss = make_loss(net, torch.ones(1, 4))
    before = [p.detach().clone() for p in net.parameters()]
    taken = TrainingSpeed.step(loss, optimizer, None, guard=guard)
    assert not taken
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    guard.record('network', {'l_total': loss.detach()})
    guard.end_iteration(1)
    assert guard.consecutive == 1


def test_a_finite_step_is_taken_and_resets_the_count():
    net, optimizer = _net_and_optimizer()
    guard = NonFiniteGuard('skip', patience=2)
    guard.record('network', {'l_pix': torch.tensor(float('nan'))})
    guard.end_iteration(1)
    before = net.weight.detach().clone()
    assert TrainingSpeed.step(net(torch.ones(1, 4)).sum(), optimizer, None, guard=guard)
    assert not torch.equal(before, net.weight)
    guard.end_iteration(2)
    assert guard.consecutive == 0


def test_patience_counts_consecutive_iterations_only():
    from baryir_plugin.errors import TrainingError

    guard = NonFiniteGuard('skip', patience=3)
    for it in (1, 2):
        guard.record('network', {'l_pix': torch.tensor(float('nan'))})
        guard.end_iteration(it)
    guard.end_iteration(3)  # a good iteration in between
    for it in (4, 5):
        guard.record('network', {'l_pix': torch.tensor(float('inf'))})
        guard.end_iteration(it)
    guard.record('potential', {'l_potential': torch.tensor(1.0)})
    with pytest.raises(TrainingError, match=r'non-finite gradients, l_pix for 3 consecutive iterations \(4-6\)'):
        guard.end_iteration(6)


def test_the_check_is_one_host_sync_per_step(monkeypatch):
    net, optimizer = _net_and_optimizer()
    guard = NonFiniteGuard('skip')
    calls = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: calls.append(1) or original(self))
    assert guard.finite(net(torch.ones(1, 4)).sum(), optimizer) is True
    assert len(calls) == 1


def test_the_options_are_checked():
    from baryir_plugin.errors import OptionError

    with pytest.raises(OptionError, match='train.nonfinite'):
        NonFiniteGuard('sometimes')
