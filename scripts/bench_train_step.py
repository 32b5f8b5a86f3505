#!/usr/bin/env python
"""Time BaryIRModel training iterations and their peak memory in several training modes, in one run.

Each mode runs in a fresh process (so its peak memory is its own), one after the other on the same
machine: ``--warmup`` iterations are discarded, then the median (and min/max) of ``--iters`` timed
iterations is reported, with the ratio of both to the first mode (the baseline: ``base`` = float32,
recompute, contiguous, uncompiled, no checkpointing, i.e. the defaults). Modes are ``+``-joined tokens:
reuse, cl, bf16, fp16, compile, ckpt, ckpt-full-res, foreach, unguarded (baryir_plugin/analysis/train_benchmark.py).
Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's peak resident set size on
the CPU. ``--rounds 2`` runs the modes twice, the second time in reverse order, and reports the median
over both rounds' iterations.

    python scripts/bench_train_step.py                                 # default BaryIR, batch 3, crop 128
    python scripts/bench_train_step.py --modes base reuse bf16+cl+reuse --iters 5
    python scripts/bench_train_step.py --dim 8 --num-blocks 1 1 1 1 --num-refinement-blocks 1 --crop 64
    python scripts/bench_train_step.py --device cuda --modes base bf16+cl+reuse fp16+cl+reuse --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROG = 'scripts/bench_train_step.py'
DEFAULT_MODES = ['base', 'reuse', 'cl', 'cl+reuse', 'bf16', 'bf16+cl', 'bf16+cl+reuse', 'ckpt', 'ckpt-full-res']


def _config(args: argparse.Namespace):
    from baryir_plugin.analysis import BenchConfig
    return BenchConfig(dim=args.dim, num_blocks=tuple(args.num_blocks),
                       num_refinement_blocks=args.num_refinement_blocks,
                       num_bary_blocks=args.num_bary_blocks, sources=args.sources, batch=args.batch, crop=args.crop,
                       device=args.device)


def parse_args(argv=None) -> argparse.Namespace:
    from baryir_plugin.analysis.flags import (check_network, check_output_file, non_negative_int, positive_int,
                                              tool_parser)
    from baryir_plugin.analysis.machine import check_device

    p = tool_parser(PROG, __doc__, full_doc=True)
    p.add_argument('--dim', type=positive_int, default=48, help='BaryIR width (even; default 48)')
    p.add_argument('--num-blocks', type=positive_int, nargs=4, default=[4, 6, 6, 8])
    p.add_argument('--num-refinement-blocks', type=non_negative_int, default=4)
    p.add_argument('--num-bary-blocks', type=positive_int, default=None)
    p.add_argument('--sources', type=positive_int, default=3, help='K, the number of degradation sources')
    p.add_argument('--batch', type=positive_int, default=3)
    p.add_argument('--crop', type=positive_int, default=128, help='training crop (a multiple of 8, >= 16)')
    p.add_argument('--warmup', type=non_negative_int, default=2)
    p.add_argument('--iters', type=positive_int, default=5)
    p.add_argument('--rounds', type=int, default=1, choices=(1, 2))
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--modes', nargs='+', default=DEFAULT_MODES,
                   help='modes to compare; the first is the baseline of the ratios')
    p.add_argument('--json', help='also write the rows to this JSON file')
    p.add_argument('--one-mode', help=argparse.SUPPRESS)  # internal: run one mode, print its JSON row
    args = p.parse_args(argv)
    from baryir_plugin.analysis import mode_options
    for mode in ([args.one_mode] if args.one_mode else args.modes):
        try:
            mode_options(mode)
        except ValueError as e:
            p.error(f'--modes: {str(e).rstrip(".")}')
    check_device(args.device)
    check_network(args.dim, args.num_blocks, args.num_refinement_blocks, args.num_bary_blocks, args.sources,
                  args.crop)
    check_output_file(args.json, '--json')
    return args


def _child_argv(argv: list[str], mode: str) -> list[str]:
    """This run's arguments without --modes/--json/--rounds, plus the one mode to run."""
    out, skip = [], False
    for a in argv:
        if a in ('--modes', '--json', '--rounds'):
            skip = True
            continue
        if skip and not a.startswith('--'):
            continue
        skip = False
        out.append(a)
    return out + ['--one-mode', mode]


def _child_failed(mode: str, out: subprocess.CompletedProcess) -> int:
    """Pass on the output of a mode's process that failed and return its exit status: its own error line
    (the same program name) is the one line of this run; a process that ended without one (killed, e.g. out
    of memory) gets one here."""
    from baryir_plugin.errors import BaryIRError

    print(f'[{mode}] failed:', file=sys.stderr)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    sys.stderr.flush()
    lines = out.stderr.splitlines()
    if any(ln.startswith((f'{PROG}: error:', f'{PROG}: internal error:')) for ln in lines):
        return out.returncode if out.returncode > 0 else 1
    how = (f'was killed by signal {-out.returncode}' if out.returncode < 0 else
           f'ended with exit status {out.returncode}')
    raise BaryIRError(f'mode {mode}: its process {how} without an error line (out of memory?); its output is above. '
                      f'Run it alone with --modes {mode} to see more.')


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one_mode:
        from baryir_plugin.analysis import run_mode
        print(json.dumps(run_mode(_config(args), args.one_mode, args.warmup, args.iters)))
        return 0
    order = list(args.modes) + (list(reversed(args.modes)) if args.rounds == 2 else [])
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    for mode in order:
        cmd = [sys.executable, os.path.abspath(__file__)] + _child_argv(argv, mode)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            return _child_failed(mode, out)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results[mode].append(row)
        print(f'[{mode}] {row["median_s"]:.3f} s/iter, peak {row["peak_mib"]:.0f} MiB', file=sys.stderr, flush=True)

    rows = []
    for mode in args.modes:
        runs = results[mode]
        rows.append({'mode': mode, 'median_s': statistics.median(r['median_s'] for r in runs),
                     'min_s': min(r['min_s'] for r in runs), 'max_s': max(r['max_s'] for r in runs),
                     'peak_mib': max(r['peak_mib'] for r in runs), 'finite': all(r['finite'] for r in runs),
                     'compiled': runs[0]['compiled']})
    base = rows[0]
    first = results[args.modes[0]][0]
    print(f'machine: {first["machine"]}')
    print(f'config: {_config(args).describe()}; params net_g {first["params_g"]:,}, potentials '
          f'{first["params_potential"]:,}; {args.warmup} warm-up + {args.iters} timed iterations per mode'
          f'{", 2 rounds (second in reverse order)" if args.rounds == 2 else ""}; ratios against {base["mode"]}')
    print(f'{"mode":<22}{"median s/iter":>14}{"min":>8}{"max":>8}{"x time":>8}{"peak MiB":>10}{"x mem":>7}  note')
    for r in rows:
        note = []
        if not r['finite']:
            note.append('NON-FINITE LOSS')
        if 'compile' in r['mode'] and not r['compiled']:
            note.append('compile unavailable: ran eagerly')
        print(f'{r["mode"]:<22}{r["median_s"]:>14.3f}{r["min_s"]:>8.3f}{r["max_s"]:>8.3f}'
              f'{r["median_s"] / base["median_s"]:>8.2f}{r["peak_mib"]:>10.0f}{r["peak_mib"] / base["peak_mib"]:>7.2f}'
              f'  {", ".join(note)}')
    if args.json:
        from baryir_plugin.models.validation_report import write_json
        write_json(args.json, {'machine': first['machine'], 'config': _config(args).describe(), 'rows': rows})
    return 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main
    sys.exit(guarded_main(PROG, main))
