"""Non-finite losses and gradients: detected every optimizer step, at the cost of one host sync.

``train.nonfinite`` (BaryIRModel):

    skip    (default) an optimizer step whose loss or gradients hold NaN/inf is not taken; the iteration
            and the non-finite terms are logged; after ``train.nonfinite_patience`` (default 10)
            consecutive iterations with a skipped step, training stops with an error that names the last
            checkpoint saved before them (no checkpoint is saved while steps are being skipped).
    stop    the first non-finite step stops training with that error.
    ignore  no check (every step is taken, as BasicSR does).

The check is one combined flag per step: the loss's finiteness and that of the gradients' L1 norm,
all-reduced (MIN) under DDP so every rank takes or skips the step together. Which terms were non-finite
is only worked out on the bad path. With fp16 loss scaling the GradScaler already skips steps with
inf/NaN gradients (that is how it finds its scale), so only the loss itself is checked there.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch
import torch.distributed as dist

from baryir_plugin.errors import OptionError, TrainingError

from .options import NONFINITE_POLICIES



def gradient_total(optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    """The L1 norm of every gradient the optimizer holds: non-finite when any gradient is (or when they
    pass float32's range, which no step survives). One fused reduction where torch offers it."""
    grads = [p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
    if not grads:
        return None
    total_norm = getattr(torch.nn.utils, 'get_total_norm', None)  # torch >= 2.6
    if total_norm is not None:
        return total_norm(grads, norm_type=1.0)
    return torch.stack([g.detach().abs().sum() for g in grads]).sum()


def latest_checkpoint(models_dir: Optional[str], label: str = 'net_g') -> Optional[tuple[int, str]]:
    """(iteration, path) of the newest ``<label>_<iter>.pth`` in ``models_dir``."""
    if not models_dir or not os.path.isdir(models_dir):
        return None
    pattern = re.compile(rf'^{re.escape(label)}_(\d+)\.pth$')
    found = [(int(m.group(1)), name) for name in os.listdir(models_dir) if (m := pattern.match(name))]
    if not found:
        return None
    it, name = max(found)
    return it, os.path.join(models_dir, name)


class NonFiniteGuard:
    """Decides, per optimizer step, whether the step is taken; counts consecutive bad iterations."""

    def __init__(self, policy: str = 'skip', patience: int = 10, models_dir: Optional[str] = None,
                 distributed: bool = False, logger=None) -> None:
        if policy not in NONFINITE_POLICIES:
            raise OptionError(f'train.nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}.')
        self.policy, self.patience = policy, int(patience)
        self.distributed = distributed
        self.logger = logger
        self.last_finite = latest_checkpoint(models_dir)  # updated by the model after each save
        self.consecutive = 0
        self.first_bad_iter: Optional[int] = None
        self.skipped_total = 0
        self._run_terms: set[str] = set()  # the non-finite terms of the current run of bad iterations
        self._events: list[tuple[str, list[str]]] = []

    @property
    def active(self) -> bool:
        return self.policy != 'ignore'

    @property
    def pending(self) -> bool:
        """Whether a step of the current iteration was skipped."""
        return bool(self._events)

    def finite(self, loss: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """One host sync: is ``loss`` finite (and, with ``optimizer``, the gradients it holds)?"""
        flag = torch.isfinite(loss.detach()).all()
        if optimizer is not None:
            total = gradient_total(optimizer)
            if total is not None:
                flag = flag & torch.isfinite(total)
        flag = flag.to(torch.int32)
        if self.distributed and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def record(self, step: str, terms: dict) -> None:
        """A skipped step of this iteration; ``terms``: the loss terms, to name the non-finite ones."""
        bad = [name for name, value in terms.items()
               if torch.is_tensor(value) and not bool(torch.isfinite(value.detach()).all())]
        self._events.append((step, bad or ['gradients']))

    def end_iteration(self, current_iter: int) -> None:
        """Log this iteration's skipped steps and stop when the policy says so."""
        events, self._events = self._events, []
        if not events:
            self.consecutive, self.first_bad_iter, self._run_terms = 0, None, set()
            return
        self.skipped_total += len(events)
        self.consecutive += 1
        if self.first_bad_iter is None:
            self.first_bad_iter = current_iter
        self._run_terms.update(t for _, ts in events for t in ts)
        what = '; '.join(f'{step} step skipped (non-finite {", ".join(terms)})' for step, terms in events)
        if self.logger is not None:
            self.logger.warning(f'Iteration {current_iter}: {what}.')
        if self.policy == 'stop' or self.consecutive >= self.patience:
            terms = sorted(self._run_terms)
            span = (f'at iteration {current_iter}' if self.consecutive == 1 else
                    f'for {self.consecutive} consecutive iterations ({self.first_bad_iter}-{current_iter})')
            if self.last_finite is None:
                last = 'no checkpoint was saved before it'
            else:
                it, path = self.last_finite
                last = f'the last checkpoint before it is {path} (iteration {it})'
            raise TrainingError(
                f'training diverged: non-finite {", ".join(terms)} {span} (train.nonfinite: {self.policy}); {last}. '
                'Lower the learning rate (train.optim_*.lr) or check the data for extreme values, then resume with '
                '--auto_resume.')

    @property
    def diverging(self) -> bool:
        """Whether the latest iterations skipped steps: weights saved now would be those of a diverging run."""
        return self.consecutive > 0

    def saved(self, current_iter: int, path: str) -> None:
        self.last_finite = (current_iter, path)
