"""Which parts of a BaryIR training iteration need float32 under mixed precision: measured, per region.

For one batch and one set of weights, the restoration step's loss terms and gradients and the potential
step's loss and gradients are computed in float32 (the reference), then under autocast with every
float32 region of ``baryir_plugin.archs.precision`` kept, with each region in turn left to low
precision, and with none kept. Each variant is reported as its relative error against float32 (scripts/
amp_sensitivity.py prints the table; docs/training-speed.md holds the measured one). The norm of a
gradient's error is set by its largest elements; an optimizer that divides by a running RMS (Adam,
RMSprop) moves every element by about its learning rate, so the network's gradient is also judged per
element: the median of |error| / |float32| and the share of elements whose sign flips.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from baryir_plugin.archs.precision import FP32_REGIONS, set_fp32_regions

from .train_benchmark import BenchConfig, build_model, random_batches

TERMS = ('l_pix', 'l_mwb', 'l_irc', 'l_bro', 'transport_cost', 'potential', 'congruence')


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().flatten(), reference.detach().double().flatten()
    if not torch.isfinite(value).all():
        return math.inf
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def _per_element(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(median relative error, share of sign flips) over the elements where ``reference`` is non-zero."""
    nonzero = reference != 0
    value, reference = value[nonzero], reference[nonzero]
    if not torch.isfinite(value).all():
        return math.inf, math.inf
    rel = ((value - reference).abs() / reference.abs()).float()
    flips = (value.sign() != reference.sign()).double().mean()
    return float(rel.median()), float(flips)


def _grads(module: torch.nn.Module, scale: float) -> torch.Tensor:
    parts = [p.grad.detach().double().flatten() / scale if p.grad is not None else torch.zeros(p.numel(),
             dtype=torch.float64, device=p.device) for p in module.parameters()]
    return torch.cat(parts)


def measure_iteration(model, dtype, scale: float) -> dict[str, torch.Tensor]:
    """Loss terms and gradients of one restoration step and one potential evaluation on ``model``'s
    current batch, under autocast to ``dtype`` (None: float32); the losses are multiplied by ``scale``
    before backward and the gradients divided by it again, as a GradScaler does for fp16."""
    model.speed.use_amp = dtype is not None
    if dtype is not None:
        model.speed.amp_dtype = dtype
    model.net_g.zero_grad(set_to_none=True)
    model.net_potential.zero_grad(set_to_none=True)
    for p in model.net_potential.parameters():
        p.requires_grad_(False)
    total, losses, (cost, potential, z_bary) = model.network_losses()
    (total * scale).backward()
    out = {k: v.detach() for k, v in losses.items()}
    out['transport_cost'] = cost.detach()
    out['grad_network'] = _grads(model.net_g, scale)
    for p in model.net_potential.parameters():
        p.requires_grad_(True)
    l_pot, congruence = model.potential_losses(z_bary.detach(), with_congruence=True)
    (l_pot * scale).backward()
    out['potential'] = potential.detach()  # f_k(i)(zB_i) as the restoration step scored it
    out['congruence'] = congruence.detach()
    out['grad_potentials'] = _grads(model.net_potential, scale)
    return out


def sensitivity(config: BenchConfig, dtypes: Iterable[torch.dtype] = (torch.bfloat16,),
                fp16_scale: float = 2.0 ** 16) -> list[dict]:
    """Rows (dtype, float32 regions kept, relative error of each term and of both gradients, and the
    network gradient's per-element median relative error and share of sign flips)."""
    torch.manual_seed(0)
    model = build_model(config, 'base')
    model.feed_data(next(random_batches(config)))
    set_fp32_regions(FP32_REGIONS)
    reference = measure_iteration(model, None, 1.0)
    variants = [('all', FP32_REGIONS)] + [(f'all but {r}', tuple(x for x in FP32_REGIONS if x != r))
                                          for r in FP32_REGIONS] + [('none', ())]
    rows = []
    try:
        for dtype in dtypes:
            scale = fp16_scale if dtype == torch.float16 else 1.0
            for label, regions in variants:
                set_fp32_regions(regions)
                got = measure_iteration(model, dtype, scale)
                row = {'dtype': str(dtype).replace('torch.', ''), 'fp32': label}
                for key in TERMS + ('grad_network', 'grad_potentials'):
                    if key in reference:
                        row[key] = _relative(got[key], reference[key])
                row['grad_median'], row['grad_sign_flips'] = _per_element(got['grad_network'],
                                                                          reference['grad_network'])
                rows.append(row)
    finally:
        set_fp32_regions(FP32_REGIONS)
    return rows
