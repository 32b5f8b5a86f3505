"""How much memory a forward takes, so that an image too large for it is tiled before it fails.

On a GPU the answer comes from trying (an out-of-memory error is caught and the image retried in smaller
tiles). On the CPU an allocation that does not fit is not an error but the kernel's OOM killer, so the
peak is planned instead: the same forward runs on the meta device (shapes only: no computation, no
memory) while every tensor it creates is counted for as long as it lives.
"""
from __future__ import annotations

import gc
import weakref
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ['MARGIN', 'available_bytes', 'measure_peak_increase', 'planned_peak']

_CLEAR_REFS = '/proc/self/clear_refs'
_STATUS = '/proc/self/status'


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def measure_peak_increase(fn: Callable[[], object]) -> Optional[int]:
    """Bytes by which the resident set's peak during ``fn()`` exceeds the resident set before it (Linux;
    None elsewhere). Used by the tests and benchmarks to check :func:`planned_peak`."""
    gc.collect()
    if not _reset_peak():
        return None
    before = _status_kib('VmRSS')
    fn()
    peak = _status_kib('VmHWM')
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors an operation creates while they are alive (views share their
    storage's count); ``peak`` is the most alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [references, bytes]

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                entry = self._storages.get(key)
                if entry is None:
                    self._storages[key] = [1, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                else:
                    entry[0] += 1
                weakref.finalize(t, self._release, key)
        return out


# The tensors counted on the meta device are what the operations return; the kernels' own buffers and the
# allocator's slack are not. Measured resident peaks were 1.3-2.0 times the count for whole forwards (BaryIR,
# dim 8 and 48, 256 and 384 pixels square) and 1.0 for streamed ones (dim 8, 512 and 1024), hence the margin.
MARGIN = 2.0


def planned_peak(run: Callable[[torch.Tensor], object], shape: tuple[int, ...]) -> int:
    """Bytes ``run`` (a function of a meta-device input built like the real one) is planned to need on an
    input of ``shape``: the peak of its live tensors on the meta device (no computation, no memory), times
    :data:`MARGIN`."""
    mode = _LiveTensorBytes()
    with torch.no_grad(), mode:
        run(torch.empty(shape, device='meta'))
    return int(mode.peak * MARGIN)
