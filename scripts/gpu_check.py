#!/usr/bin/env python
"""One-command GPU check: parity, step time and memory per training mode, kernel shares, DDP, bf16 losses,
inference.

Prints one table (a line per result) and writes gpu_check.json; designed to finish in under 8 minutes on
one GPU (``--budget-s`` caps the step-time table; later rows are marked skipped). Checks:

  parity   the reference fixture reproduced on the GPU (TF32 off and on)
  steps    median step time and peak memory: fp32 / bf16 / fp16 x channels-last x compile x checkpointing,
           default BaryIR, crop 128, batch 3 and 8
  kernels  share of CUDA time in convolution and matmul kernels (torch.profiler)
  ddp      `basicsr train --launcher pytorch` under torchrun with NCCL, world size 1
  bf16     bf16 vs float32 losses over 100 iterations from the same weights and batches
  demo     the demo recipe, 1,000 iterations, in float32, bf16 and fp16: final validation averages; the
           per-seed differences from float32 over --demo-seeds, whose 95% interval must lie within
           0.1 dB (a verdict of undecided asks for more seeds, or --demo-val-photos)
  infer    `baryir infer`'s restoration of a 2048 x 2048 image, default BaryIR: whole, exact 512-pixel
           tiles and bf16: seconds per megapixel, peak memory, difference from whole

    python scripts/gpu_check.py --out gpu_check_out --fixture ../shared/fixtures/reference_small
    python scripts/gpu_check.py --checks demo --demo-seeds 10 11 12 13 14 15 16 17 18 19 \\
        --demo-val-photos ../shared/data/Kodak24 ../shared/data/CBSD68   # precision on the demo, settled
    python scripts/gpu_check.py --device cpu --quick      # the script's own self-test, tiny network, CPU
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PROG = 'scripts/gpu_check.py'
CHECKS = ('parity', 'steps', 'kernels', 'ddp', 'bf16', 'demo', 'infer')


def parse_args(argv=None):
    from baryir_plugin.analysis.flags import non_negative_int, positive_float, tool_parser
    from baryir_plugin.analysis.machine import check_device
    from baryir_plugin.errors import UsageError

    p = tool_parser(PROG, __doc__, full_doc=True)
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    p.add_argument('--quick', action='store_true', help='tiny network and few iterations (self-test)')
    p.add_argument('--checks', nargs='+', choices=CHECKS, default=list(CHECKS))
    p.add_argument('--modes', nargs='+', help='training modes of the steps check (default: its list)')
    p.add_argument('--fixture', type=Path, help='folder of the reference fixture (expected_outputs.pt, '
                   'official_format_checkpoint.pt); the parity check is skipped without it')
    p.add_argument('--out', default=os.environ.get('OUT', 'gpu_check_out'), help='folder for gpu_check.json')
    p.add_argument('--demo-seeds', type=non_negative_int, nargs='+', default=[10],
                   help='seeds of the demo check: each precision\'s per-seed differences from float32 are '
                        'judged against 0.1 dB; n seeds take n times as long')
    p.add_argument('--demo-val-photos', nargs='+', metavar='DIR', type=Path,
                   help='folders of clean images whose centre crops replace the demo\'s two validation crops '
                        'per set (make_demo_data.py --val-photos), e.g. Kodak24 and CBSD68: 92 per set')
    p.add_argument('--budget-s', type=positive_float, default=300.0,
                   help='seconds (> 0) after which step-table rows are skipped')
    args = p.parse_args(argv)

    if args.fixture is not None and not (args.fixture / 'expected_outputs.pt').is_file():
        p.error(f'--fixture {args.fixture}: no expected_outputs.pt there; give the reference fixture folder '
                '(expected_outputs.pt, official_format_checkpoint.pt), or leave --fixture out to skip parity')
    out = Path(args.out)
    blocked = next((q for q in (out, *out.parents) if q.exists() and not q.is_dir()), None)
    if blocked is not None:
        raise UsageError(f'--out {args.out}: {blocked} is a file, not a folder; give a folder for gpu_check.json.')
    if args.demo_val_photos:  # read now, not after the other checks have run for minutes
        from baryir_plugin.data.demo import val_photos_from
        from baryir_plugin.errors import BaryIRError
        try:
            val_photos_from([str(f) for f in args.demo_val_photos], flag='--demo-val-photos', crop_flag=None)
        except BaryIRError as e:
            p.error(str(e))
    check_device(args.device, hint='run it on a GPU machine, or add --device cpu --quick for the self-test')
    from baryir_plugin.analysis import mode_options
    for mode in args.modes or []:
        try:
            mode_options(mode)
        except ValueError as e:
            p.error(f'--modes: {str(e).rstrip(".")}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from baryir_plugin.analysis.gpu_check import run
    report = run(args.checks, quick=args.quick, device=args.device, out_dir=args.out, fixture=args.fixture,
                 budget_s=args.budget_s, steps_modes=args.modes,
                 demo_seeds=tuple(args.demo_seeds), demo_val_photos=args.demo_val_photos)
    failed = [r for r in report['rows'] if r.get('ok') is False or 'error' in r]
    print(f'{PROG}: {len(report["rows"])} results, {len(failed)} failed, {report["seconds"]:.0f} s; '
          f'{os.path.join(args.out, "gpu_check.json")}')
    return 1 if failed else 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main
    sys.exit(guarded_main(PROG, main))
