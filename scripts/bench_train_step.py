#!/usr/bin/env python
"""Time BaryIRModel training iterations and their peak memory, for each potential-step mode.

Each mode runs in its own process (so peak memory is its own): a BaryIRModel at the given network
config, K sources and random batches of the given size and crop; ``--warmup`` iterations are discarded,
then the median (and min/max) of ``--iters`` timed iterations is reported. Peak memory is
torch.cuda.max_memory_allocated on a GPU and the process's peak resident set size on the CPU.

    python scripts/bench_train_step.py                       # default BaryIR (dim 48), batch 3, crop 128
    python scripts/bench_train_step.py --dim 8 --num-blocks 1 1 1 1 --batch 4 --crop 64 --iters 10
    python scripts/bench_train_step.py --device cuda --bf16  # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MODES = ('reuse', 'recompute')


def _machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    text = (f'{platform.node()} | {cpu} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | '
            f'python {platform.python_version()} | torch {torch.__version__}')
    if device == 'cuda':
        text += f' | {torch.cuda.get_device_name()}'
    return text


def _run_mode(args: argparse.Namespace) -> dict:
    import torch

    import baryir_plugin  # noqa: F401
    from baryir_plugin.models.baryir_model import BaryIRModel

    k = args.sources
    names = [f'source{i}' for i in range(k)]
    BaryIRModel._source_stats = lambda self: (names, [1] * k, names)  # no dataset: K balanced sources
    opt = {
        'name': 'bench', 'model_type': 'BaryIRModel', 'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1,
        'num_gpu': 1 if args.device == 'cuda' else 0, 'scale': 1,
        'datasets': {'train': {'type': 'AllInOneDataset'}},
        'network_g': {'type': 'BaryIR', 'dim': args.dim, 'num_blocks': args.num_blocks,
                      'num_refinement_blocks': args.num_refinement_blocks, 'num_bary_blocks': args.num_bary_blocks},
        'network_potential': {'type': 'BarycenterPotentials', 'num_potentials': k, 'in_channels': 8 * args.dim,
                              'patch_size': args.crop},
        'path': {'models': '.', 'training_states': '.'},
        'train': {'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}, 'potential_step': args.mode,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [10 ** 9], 'gamma': 0.1}},
    }
    model = BaryIRModel(opt)
    device = model.device
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict:
        gt = torch.rand(args.batch, 3, args.crop, args.crop, generator=gen)
        ids = torch.arange(args.batch) % k
        return {'lq': (gt + 0.1 * torch.randn(gt.shape, generator=gen)).clamp(0, 1), 'gt': gt,
                'source_id': ids, 'degradation_id': ids}

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times = []
    for i in range(args.warmup + args.iters):
        model.feed_data(batch())
        sync()
        start = time.perf_counter()
        with autocast:
            model.optimize_parameters(i + 1)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {'mode': args.mode, 'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
            'peak_mib': peak, 'params_g': sum(p.numel() for p in model.net_g.parameters()),
            'params_potential': sum(p.numel() for p in model.net_potential.parameters()),
            'machine': _machine(device.type)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dim', type=int, default=48)
    parser.add_argument('--num-blocks', type=int, nargs=4, default=[4, 6, 6, 8])
    parser.add_argument('--num-refinement-blocks', type=int, default=4)
    parser.add_argument('--num-bary-blocks', type=int, default=None)
    parser.add_argument('--sources', type=int, default=3, help='K, the number of degradation sources')
    parser.add_argument('--batch', type=int, default=3)
    parser.add_argument('--crop', type=int, default=128)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast around the training step')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument('--mode', choices=MODES, help=argparse.SUPPRESS)  # internal: one mode, JSON out
    args = parser.parse_args(argv)

    if args.mode:
        print(json.dumps(_run_mode(args)))
        return 0
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, os.path.abspath(__file__), '--mode', mode] + [a for a in (argv or sys.argv[1:])
                                                                               if a != '--modes' and a not in MODES]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f'machine: {rows[0]["machine"]}')
    print(f'config: dim {args.dim}, blocks {args.num_blocks}, refinement {args.num_refinement_blocks}, '
          f'T blocks {args.num_bary_blocks or "num_blocks[3]"}, K {args.sources}, batch {args.batch}, crop {args.crop}, '
          f'{args.device}{" bf16" if args.bf16 else ""}; params net_g {rows[0]["params_g"]:,}, potentials '
          f'{rows[0]["params_potential"]:,}; {args.warmup} warm-up + {args.iters} timed iterations')
    print(f'{"potential step":<16}{"median s/iter":>14}{"min":>9}{"max":>9}{"peak MiB":>11}')
    for r in rows:
        print(f'{r["mode"]:<16}{r["median_s"]:>14.3f}{r["min_s"]:>9.3f}{r["max_s"]:>9.3f}{r["peak_mib"]:>11.0f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
