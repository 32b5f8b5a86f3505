#!/usr/bin/env python
"""Measure how fast the all-in-one training loader delivers batches, per number of loader workers.

The loader is the one BasicSR's training pipeline builds: an AllInOneDataset of the demo's five sources
(Gaussian noise on the fly at sigma 15/25/50, rain, haze, blur, low light; repeats, flips, rotations,
channel permutation and dataset_enlarge_ratio as options/train_baryir_demo.yml), the plugin's sampler
(per-sample seeded draws) and basicsr.data.build_dataloader. Without ``--root`` the data is written to
a temporary folder by scripts/make_demo_data.py: the demo's photos and degradations, cut into tiles of
twice the crop (the demo's tile:crop ratio, 96:48; its own 96-pixel tiles are smaller than a 128 crop).

For each worker count the table gives the steady-state rate (``--batches`` batches timed after
``--warmup``, the median of 5 windows), the time to the first batch of a new epoch (BasicSR starts
fresh workers every epoch unless ``--persistent-workers``), and the training step a loader of that speed
keeps fed: with workers the batches are made while the step runs, so any step of at least the loader's ms
per batch waits for no data; without workers the loading is added to every step.

    python scripts/bench_data.py                                  # workers 0 1 2, crop 128, batch 3
    python scripts/bench_data.py --workers 0 2 4 8 --crop 128 --batch 8 --step-ms 250
    python scripts/bench_data.py --root datasets/demo --crop 48 --batch 8 --persistent-workers
"""
from __future__ import annotations

import itertools
import os
import statistics
import sys
import tempfile
import time

PROG = 'scripts/bench_data.py'

PAIRED = ('rain', 'haze', 'blur', 'lowlight')
SMALLEST_PHOTO_SIDE = 300  # skimage's chelsea, the smallest of the demo's training photos
WINDOWS = 5  # the timed batches are split into this many windows


def dataset_options(root: str, crop: int, batch: int, workers: int, persistent: bool, pin: bool) -> dict:
    """The train entry of options/train_baryir_demo.yml with this root, crop, batch and loader settings,
    as BasicSR hands it to build_dataset (phase and scale filled in, the run's seed copied in)."""
    sources = [{'name': 'noise', 'type': 'GaussianNoiseDataset', 'dataroot_gt': f'{root}/train/clean',
                'sigmas': [15, 25, 50]}]
    sources += [{'name': kind, 'type': 'PairedImageDataset', 'dataroot_gt': f'{root}/train/{kind}/gt',
                 'dataroot_lq': f'{root}/train/{kind}/lq', 'repeat': 3} for kind in PAIRED]
    opt = {'name': 'bench_train', 'type': 'AllInOneDataset', 'phase': 'train', 'scale': 1, 'sources': sources,
           'filename_tmpl': '{}', 'io_backend': {'type': 'disk'}, 'gt_size': crop, 'use_hflip': True,
           'use_rot': True, 'channel_permute': True, 'num_worker_per_gpu': workers, 'batch_size_per_gpu': batch,
           'dataset_enlarge_ratio': 5, 'prefetch_mode': None, 'manual_seed': 10, 'pin_memory': pin,
           'persistent_workers': persistent and workers > 0}  # the DataLoader refuses it without workers
    return opt


def build_demo(root: str, tile: int) -> None:
    from baryir_plugin.data import demo

    # the demo preset with larger tiles, so that a training crop has room to move
    demo.PRESETS['bench'] = {**demo.PRESETS['demo'], 'train_size': tile}
    demo.build(root, preset='bench')


def _split(n: int, parts: int) -> list[range]:
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class FirstIndices:
    """A sampler cut to its first ``n`` indices: the epoch ends after the timed batches, so the next
    epoch's start is measured as BasicSR meets it (after a finished epoch, nothing left in flight)."""

    def __init__(self, sampler, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n)

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def measure(opt: dict, batches: int, warmup: int) -> dict:
    """Steady-state seconds per batch and the time to the first batch of the next epoch (seconds)."""
    import basicsr.train
    from basicsr.data import build_dataloader, build_dataset

    dataset = build_dataset(opt)
    full = basicsr.train.EnlargedSampler(dataset, 1, 0, opt['dataset_enlarge_ratio'])
    if len(full) < (warmup + batches) * opt['batch_size_per_gpu']:
        from baryir_plugin.errors import UsageError
        raise UsageError(f'an epoch has {len(full) // opt["batch_size_per_gpu"]} batches, fewer than --warmup + '
                         f'--batches ({warmup + batches}); lower them.')
    sampler = FirstIndices(full, (warmup + batches) * opt['batch_size_per_gpu'])
    loader = build_dataloader(dataset, opt, num_gpu=1, dist=False, sampler=sampler, seed=opt['manual_seed'])
    sampler.set_epoch(0)
    batch_iter = iter(loader)
    for _ in range(warmup):
        next(batch_iter)
    windows = []  # the median over windows of consecutive batches: robust to a burst of other load
    for size in (len(w) for w in _split(batches, WINDOWS)):
        start = time.perf_counter()
        for _ in range(size):
            next(batch_iter)
        windows.append((time.perf_counter() - start) / size)
    per_batch = statistics.median(windows)
    for _ in batch_iter:  # the end of the epoch: fresh workers shut down, persistent ones wait
        pass
    sampler.set_epoch(1)
    start = time.perf_counter()
    next(iter(loader))
    epoch_start = time.perf_counter() - start
    return {'per_batch': per_batch, 'epoch_start': epoch_start, 'samples': len(dataset)}


def fed(workers: int, ms: float, step_ms: float | None) -> str:
    if step_ms is None:
        return f'>= {ms:.1f} ms' if workers else f'none (+{ms:.1f} ms per step)'
    if not workers:
        return f'no: +{ms:.1f} ms per step'
    return 'yes' if ms <= step_ms else f'no: waits {ms - step_ms:.1f} ms per step'


def main(argv: list[str] | None = None) -> int:
    from baryir_plugin.analysis.flags import non_negative_int, positive_float, positive_int, tool_parser

    parser = tool_parser(PROG, __doc__)
    parser.add_argument('--root', help='a folder laid out as scripts/make_demo_data.py writes it (default: build '
                                       'one in a temporary folder)')
    parser.add_argument('--workers', type=non_negative_int, nargs='+', default=[0, 1, 2],
                        help='num_worker_per_gpu values')
    parser.add_argument('--crop', type=positive_int, default=128, help='gt_size (training crop)')
    parser.add_argument('--batch', type=positive_int, default=3, help='batch_size_per_gpu')
    parser.add_argument('--batches', type=positive_int, default=100,
                        help=f'timed batches per worker count (the median rate of {WINDOWS} windows is shown)')
    parser.add_argument('--warmup', type=non_negative_int, default=4, help='batches before the timing starts')
    parser.add_argument('--tile', type=positive_int, default=None,
                        help=f'tile size of the built data (default: 2 x crop, at most {SMALLEST_PHOTO_SIDE})')
    parser.add_argument('--persistent-workers', action='store_true', help='persistent_workers: true')
    parser.add_argument('--pin-memory', action='store_true', help='pin_memory: true (pins only with a GPU)')
    parser.add_argument('--step-ms', type=positive_float, default=None,
                        help='a training step time (ms): say for each row whether the loader keeps it fed')
    args = parser.parse_args(argv)
    tile = args.tile or min(2 * args.crop, SMALLEST_PHOTO_SIDE)
    if args.root is None and not args.crop <= tile <= SMALLEST_PHOTO_SIDE:
        parser.error(f'--crop {args.crop} / --tile {tile}: the built tiles must hold the crop and fit the smallest '
                     f'demo photo ({SMALLEST_PHOTO_SIDE} px); use a smaller crop, or --root with larger images')

    import baryir_plugin  # noqa: F401  (compat patches and registrations before BasicSR builds anything)
    from basicsr.utils import get_root_logger

    get_root_logger().setLevel('WARNING')  # the datasets log every source they build
    with tempfile.TemporaryDirectory(prefix='bench_data_') as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, 'demo')
            start = time.perf_counter()
            build_demo(root, tile)
            print(f'built the demo data with {tile}-pixel tiles in {time.perf_counter() - start:.1f} s')
        rows = []
        for workers in args.workers:
            opt = dataset_options(root, args.crop, args.batch, workers, args.persistent_workers, args.pin_memory)
            rows.append((workers, measure(opt, args.batches, args.warmup)))

    from baryir_plugin.analysis import machine_line
    print(f'machine: {machine_line("cpu")}')
    print(f'loader: AllInOneDataset, 5 sources, {rows[0][1]["samples"]} samples x dataset_enlarge_ratio 5, crop '
          f'{args.crop}, batch {args.batch}, persistent_workers {args.persistent_workers}, pin_memory '
          f'{args.pin_memory}; {args.batches} batches timed after {args.warmup} (median of {WINDOWS} windows)')
    step = f'step {args.step_ms:g} ms fed' if args.step_ms is not None else 'keeps a step fed of'
    print(f'{"workers":>7} {"samples/s":>10} {"batches/s":>10} {"ms/batch":>9} {"epoch start ms":>15}  {step}')
    for workers, r in rows:
        ms = r['per_batch'] * 1e3
        print(f'{workers:>7} {args.batch / r["per_batch"]:>10.1f} {1 / r["per_batch"]:>10.2f} {ms:>9.1f} '
              f'{r["epoch_start"] * 1e3:>15.0f}  {fed(workers, ms, args.step_ms)}')
    return 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main
    sys.exit(guarded_main(PROG, main))
