"""Where mixed-precision training keeps float32: the parts of BaryIR whose numerics low precision breaks.

Under ``torch.autocast`` (``use_amp``) convolutions and matrix products run in bf16/fp16. Five regions
can instead be computed in float32; each is a switch so that ``scripts/amp_sensitivity.py`` can measure
what running it in low precision costs (docs/training-speed.md has the measured table that chose the
defaults):

- ``layernorm``: the channel statistics of every LayerNorm (mean, variance, rsqrt);
- ``attention``: the q/k normalisation, q k^T and softmax of the channel attention (MDTA);
- ``transport``: the transport cost c(z, zB) and its square root;
- ``potentials``: the potentials' scores and the congruence sum;
- ``contrast``: the cosine matrices of the IRC and BRO losses.

Outside autocast the switches change nothing: float32 training is unaffected.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

FP32_REGIONS = ('layernorm', 'attention', 'transport', 'potentials', 'contrast')
_kept: set[str] = set(FP32_REGIONS)


def set_fp32_regions(regions: Iterable[str]) -> None:
    """Choose the regions computed in float32 under autocast (all of them by default)."""
    regions = set(regions)
    unknown = regions - set(FP32_REGIONS)
    if unknown:
        raise ValueError(f'unknown float32 regions {sorted(unknown)}; choose from {FP32_REGIONS}.')
    _kept.clear()
    _kept.update(regions)


def fp32_regions() -> tuple[str, ...]:
    return tuple(r for r in FP32_REGIONS if r in _kept)


def in_fp32(region: str, x: torch.Tensor) -> bool:
    """True when ``region`` must run in float32 for ``x``: autocast is on for its device and the region is kept."""
    # the meta device (shape and memory planning) has no autocast
    return region in _kept and x.device.type != 'meta' and torch.is_autocast_enabled(x.device.type)


@contextlib.contextmanager
def fp32_region(region: str, x: torch.Tensor) -> Iterator[bool]:
    """Autocast switched off inside (inputs must then be cast with ``.float()``); yields whether it applies."""
    if not in_fp32(region, x):
        yield False
        return
    with torch.autocast(x.device.type, enabled=False):
        yield True
