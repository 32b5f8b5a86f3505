#!/usr/bin/env python
"""Time BaryIR inference (one forward of one image) in the default and the channels-last memory format.

The median of ``--iters`` forwards after ``--warmup`` is printed per format, with the largest output
difference between the two formats and the machine it ran on. ``val.channels_last`` in a test option
file switches BaryIRModel's inference to channels-last.

    python scripts/bench_inference.py --dim 8 --num-blocks 1 1 1 1 --size 500 500      # the demo network
    python scripts/bench_inference.py --size 321 481                                   # default BaryIR
    python scripts/bench_inference.py --device cuda --size 512 512
"""
from __future__ import annotations

import statistics
import sys
import time

PROG = 'scripts/bench_inference.py'


def parse_args(argv: list[str] | None = None):
    from baryir_plugin.analysis.flags import check_network, non_negative_int, positive_int, tool_parser
    from baryir_plugin.analysis.machine import check_device

    p = tool_parser(PROG, __doc__)
    p.add_argument('--dim', type=positive_int, default=48, help='BaryIR width (even; default 48)')
    p.add_argument('--num-blocks', type=positive_int, nargs=4, default=[4, 6, 6, 8])
    p.add_argument('--num-refinement-blocks', type=non_negative_int, default=None, help='default: num_blocks[0]')
    p.add_argument('--size', type=positive_int, nargs=2, default=[321, 481], metavar=('H', 'W'))
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--warmup', type=non_negative_int, default=1)
    p.add_argument('--iters', type=positive_int, default=3, help='timed forwards per format (>= 1)')
    args = p.parse_args(argv)
    check_device(args.device)
    check_network(args.dim, args.num_blocks, args.num_refinement_blocks)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    import baryir_plugin  # noqa: F401
    from baryir_plugin.archs import BaryIR

    torch.manual_seed(0)
    refine = args.num_refinement_blocks if args.num_refinement_blocks is not None else args.num_blocks[0]
    net = BaryIR(dim=args.dim, num_blocks=args.num_blocks, num_refinement_blocks=refine).eval().to(args.device)
    x = torch.rand(1, 3, *args.size, device=args.device)
    on_gpu = torch.device(args.device).type == 'cuda'
    outputs, rows = {}, []
    for fmt in ('contiguous', 'channels_last'):
        memory_format = getattr(torch, 'channels_last' if fmt == 'channels_last' else 'contiguous_format')
        net.to(memory_format=memory_format)
        xin = x.contiguous(memory_format=memory_format)
        times = []
        with torch.no_grad():
            for i in range(args.warmup + args.iters):
                if on_gpu:
                    torch.cuda.synchronize(args.device)
                start = time.perf_counter()
                out = net(xin)
                if on_gpu:
                    torch.cuda.synchronize(args.device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
        outputs[fmt] = out.float().cpu()
        rows.append((fmt, statistics.median(times), min(times), max(times)))
    params = sum(p.numel() for p in net.parameters())
    from baryir_plugin.analysis import machine_line
    print(f'machine: {machine_line(args.device)}')
    print(f'BaryIR dim {args.dim}, blocks {args.num_blocks}, {params:,} parameters, input 1x3x{args.size[0]}x'
          f'{args.size[1]}, device {args.device}, {args.iters} timed forwards after {args.warmup} warm-up')
    print(f'{"format":<14} {"median s":>9} {"min s":>8} {"max s":>8}')
    for fmt, med, lo, hi in rows:
        print(f'{fmt:<14} {med:9.3f} {lo:8.3f} {hi:8.3f}')
    diff = (outputs['contiguous'] - outputs['channels_last']).abs().max().item()
    print(f'speed-up {rows[0][1] / rows[1][1]:.2f}x, max |difference| {diff:.2e}')
    return 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main
    sys.exit(guarded_main(PROG, main))
