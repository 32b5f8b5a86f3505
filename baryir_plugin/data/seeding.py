"""Random draws of a training sample as a pure function of (run seed, epoch, slot).

BasicSR seeds every DataLoader worker with ``num_workers * rank + worker_id + manual_seed`` and starts
fresh workers each epoch, so every epoch replays the same streams (the same noise, crops, flips and
colour orders for the same position), and the draws of a sample depend on how many samples its worker
drew before it, which the number of workers and a resume change. Here the training sampler hands out
:class:`SampleIndex` objects, dataset indices that also carry the epoch and the sample's slot in the
(enlarged) epoch; a dataset that sees one reseeds Python's ``random``, NumPy's global generator and
torch's CPU generator for that one sample from a hash of (seed, epoch, slot). Plain integer indices (a
dataset used with any other sampler) keep the global streams, as before.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..errors import OptionError


class SampleIndex(int):
    """A dataset index that also says in which epoch it is drawn and its slot in that epoch.

    The slot is the sampler's value before BasicSR's ``% len(dataset)`` (an entry of the epoch's
    permutation of ``range(total_size)``: unique within an epoch over all ranks and over the repeats of
    ``dataset_enlarge_ratio``), so a sample repeated in one epoch still gets fresh draws. It travels with
    the index to the loader workers (pickled with its epoch and slot); a dataset attribute would not,
    since persistent workers keep their own copy of the dataset.
    """

    epoch: int
    slot: int

    def __new__(cls, index: int, epoch: int, slot: int) -> 'SampleIndex':
        obj = super().__new__(cls, index)
        obj.epoch, obj.slot = int(epoch), int(slot)
        return obj

    def __reduce__(self):
        return SampleIndex, (int(self), self.epoch, self.slot)

    def __repr__(self) -> str:
        return f'SampleIndex({int(self)}, epoch={self.epoch}, slot={self.slot})'


def check_seed(opt: dict, who: str) -> int | None:
    """The dataset option ``manual_seed`` (the run's seed; the resume_state compat patch copies BasicSR's
    top-level ``manual_seed`` there), checked; None when absent."""
    seed = opt.get('manual_seed')
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f'{who}: manual_seed must be a non-negative integer (the run seed that fixes every '
                         f'training sample\'s random draws), got {seed!r}; set the top-level manual_seed instead.')
    return int(seed)


def sample_seeds(seed: int, epoch: int, slot: int) -> tuple[int, np.ndarray, int]:
    """Seeds for Python's ``random``, NumPy's global generator and torch's CPU generator.

    SeedSequence hashes the triple, so neighbouring epochs and slots give unrelated streams, and the
    three generators get different words of the hash.
    """
    words = np.random.SeedSequence([seed, epoch, slot]).generate_state(10, np.uint32)
    python_seed = int.from_bytes(words[:4].tobytes(), 'little')
    torch_seed = int(words[8]) | int(words[9]) << 32
    return python_seed, words[4:8], torch_seed


class SeededDraws:
    """Mixin of the plugin's datasets: ``__getitem__`` draws sample ``index`` (``_sample``, written by the
    dataset) inside :func:`sample_draws` with the seed :meth:`_read_seed` took from the options."""

    seed: int | None = None

    def _read_seed(self, opt: dict, who: str) -> None:
        """The run's seed from ``opt`` (train phase only: evaluation sets fix their own draws)."""
        self.seed = check_seed(opt, who) if opt.get('phase') == 'train' else None

    def __getitem__(self, index: int) -> dict:
        with sample_draws(self.seed, index):
            return self._sample(index)

    def _sample(self, index: int) -> dict:
        raise NotImplementedError


@contextlib.contextmanager
def sample_draws(seed: int | None, index: Any) -> Iterator[None]:
    """Within the block, the global random streams are those of the sample ``index`` (a SampleIndex) of
    the run with ``seed``; without a seed or an epoch (a plain int index) nothing changes.

    In the main process (no loader workers) the caller's states are restored afterwards, so the training
    loop's own streams are the same whatever the loader does. Workers need no restore: every sample
    reseeds them. BasicSR's ``prefetch_mode: cpu`` without workers loads in a thread of the main
    process, which shares these streams with the training step; the draws stay exact as long as the
    step draws no CPU random numbers meanwhile (BaryIRModel draws none).
    """
    if seed is None or not isinstance(index, SampleIndex):
        yield
        return
    in_main = get_worker_info() is None
    if in_main:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    python_seed, numpy_seed, torch_seed = sample_seeds(seed, index.epoch, index.slot)
    random.seed(python_seed)
    np.random.seed(numpy_seed)
    torch.default_generator.manual_seed(torch_seed)  # CPU only: torch.manual_seed would also reseed CUDA
    try:
        yield
    finally:
        if in_main:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
