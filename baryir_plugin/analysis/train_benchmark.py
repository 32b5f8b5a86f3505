"""Time BaryIRModel training iterations in one training mode (scripts/bench_train_step.py, scripts/gpu_check.py).

A mode is a ``+``-joined list of tokens, each a training option; the empty mode ``base`` is float32,
``potential_step: recompute``, contiguous memory format, no compilation and no checkpointing, the
defaults. Tokens:

    reuse          potential_step: reuse (no second forward)
    cl             use_channels_last
    bf16 | fp16    use_amp with amp_bf16 true | false (fp16 with loss scaling)
    compile        use_compile
    ckpt           train.checkpointing: true (every Restormer stage, one block per recomputed run)
    ckpt-full-res  train.checkpointing on the full-resolution stages (encoder1, decoder1, refinement)
    foreach        foreach: true for both RMSprop optimizers
    unguarded      train.nonfinite: ignore (no check of the losses and gradients for NaN/inf)

e.g. ``bf16+cl+reuse``. The data are random batches of K balanced sources, so no dataset is read.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional

import torch

from .machine import machine_line, peak_memory_mib

FULL_RESOLUTION_STAGES = ['encoder1', 'decoder1', 'refinement']
_TOKENS = {
    'reuse': ({}, {'potential_step': 'reuse'}),
    'cl': ({'use_channels_last': True}, {}),
    'bf16': ({'use_amp': True, 'amp_bf16': True}, {}),
    'fp16': ({'use_amp': True, 'amp_bf16': False}, {}),
    'compile': ({'use_compile': True}, {}),
    'ckpt': ({}, {'checkpointing': True}),
    'ckpt-full-res': ({}, {'checkpointing': {'stages': FULL_RESOLUTION_STAGES, 'every': 1}}),
    'foreach': ({}, {'foreach': True}),
    'unguarded': ({}, {'nonfinite': 'ignore'}),
}


def mode_options(mode: str) -> tuple[dict, dict]:
    """(top-level options, train options) of a mode such as ``bf16+cl+reuse`` (``base``: none)."""
    tokens = [] if mode in ('', 'base') else mode.split('+')
    unknown = [t for t in tokens if t not in _TOKENS]
    if unknown:
        raise ValueError(f'unknown mode token(s) {unknown} in {mode!r}; tokens: {sorted(_TOKENS)} (or base).')
    if {'bf16', 'fp16'} <= set(tokens):
        raise ValueError(f'mode {mode!r} asks for both bf16 and fp16.')
    if {'ckpt', 'ckpt-full-res'} <= set(tokens):
        raise ValueError(f'mode {mode!r} asks for two checkpointing presets.')
    top, train = {}, {}
    for t in tokens:
        top.update(_TOKENS[t][0])
        train.update(_TOKENS[t][1])
    return top, train


@dataclasses.dataclass
class BenchConfig:
    """The network and batch of a benchmark (defaults: the default BaryIR, batch 3, crop 128, K 3)."""
    dim: int = 48
    num_blocks: tuple = (4, 6, 6, 8)
    num_refinement_blocks: int = 4
    num_bary_blocks: Optional[int] = None
    sources: int = 3
    batch: int = 3
    crop: int = 128
    device: str = 'cpu'

    def describe(self) -> str:
        return (f'dim {self.dim}, blocks {list(self.num_blocks)}, refinement {self.num_refinement_blocks}, '
                f'T blocks {self.num_bary_blocks or "num_blocks[3]"}, K {self.sources}, batch {self.batch}, '
                f'crop {self.crop}, {self.device}')


def model_options(config: BenchConfig, mode: str) -> dict:
    """BaryIRModel options of a mode (no dataset: the model is given K balanced sources)."""
    top, train = mode_options(mode)
    foreach = train.pop('foreach', None)
    rmsprop = {'type': 'RMSprop', 'lr': 1e-4, 'alpha': 0.99, 'eps': 1e-8}
    if foreach:
        rmsprop['foreach'] = True
    opt = {
        'name': 'bench', 'model_type': 'BaryIRModel', 'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1,
        'num_gpu': 1 if config.device == 'cuda' else 0, 'scale': 1,
        'datasets': {'train': {'type': 'AllInOneDataset'}},
        'network_g': {'type': 'BaryIR', 'dim': config.dim, 'num_blocks': list(config.num_blocks),
                      'num_refinement_blocks': config.num_refinement_blocks,
                      'num_bary_blocks': config.num_bary_blocks},
        'network_potential': {'type': 'BarycenterPotentials', 'num_potentials': config.sources,
                              'in_channels': 8 * config.dim, 'patch_size': config.crop},
        'path': {'models': '.', 'training_states': '.'},
        'train': {'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}, 'optim_g': dict(rmsprop),
                  'optim_potential': dict(rmsprop),
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [10 ** 9], 'gamma': 0.1}, **train},
        **top,
    }
    return opt


def build_model(config: BenchConfig, mode: str):
    """A BaryIRModel for ``mode`` that trains on K balanced sources without reading a dataset."""
    import baryir_plugin  # noqa: F401  (registries and BasicSR patches)
    from baryir_plugin.models.baryir_model import BaryIRModel

    names = [f'source{i}' for i in range(config.sources)]

    class BenchModel(BaryIRModel):
        def _source_stats(self):
            return names, [1] * len(names), names

    return BenchModel(model_options(config, mode))


def random_batches(config: BenchConfig, seed: int = 0):
    """An endless stream of random (lq, gt) batches with every source represented in turn."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        gt = torch.rand(config.batch, 3, config.crop, config.crop, generator=gen)
        ids = torch.arange(config.batch) % config.sources
        yield {'lq': (gt + 0.1 * torch.randn(gt.shape, generator=gen)).clamp(0, 1), 'gt': gt,
               'source_id': ids, 'degradation_id': ids}


def run_mode(config: BenchConfig, mode: str, warmup: int = 2, iters: int = 5) -> dict:
    """Median (min, max) seconds of ``iters`` training iterations after ``warmup``, and peak memory.

    Call it in a fresh process per mode for a peak memory of that mode alone (the CPU figure is the
    process's peak resident set size)."""
    model = build_model(config, mode)
    device = model.device
    batches = random_batches(config)

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize()

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times, finite = [], True
    for i in range(warmup + iters):
        model.feed_data(next(batches))
        sync()
        start = time.perf_counter()
        model.optimize_parameters(i + 1)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    log = model.get_current_log()
    finite = all(v == v and abs(v) != float('inf') for v in log.values())
    return {'mode': mode, 'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
            'peak_mib': peak_memory_mib(device.type), 'finite': finite,
            'params_g': sum(p.numel() for p in model.net_g.parameters()),
            'params_potential': sum(p.numel() for p in model.net_potential.parameters()),
            'compiled': model.speed.compile, 'machine': machine_line(device.type)}
