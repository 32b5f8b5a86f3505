#!/usr/bin/env python
"""Measure which parts of a BaryIR training iteration need float32 under mixed precision.

One batch, one set of weights: every loss term and both networks' gradients in float32, then under
bf16 (or fp16) autocast with all float32 regions kept (the default), with each region left to low
precision in turn, and with none kept. Each cell is the relative error against float32 (inf: a
non-finite value); grad_median and grad_sign_flips judge the network's gradient element by element
(the median relative error, the share of elements whose sign flips). Regions:
baryir_plugin/archs/precision.py.

    python scripts/amp_sensitivity.py                        # default BaryIR, batch 3, crop 128, bf16
    python scripts/amp_sensitivity.py --dim 8 --num-blocks 1 1 1 1 --num-refinement-blocks 1 --dtypes bf16 fp16
"""
from __future__ import annotations

import sys

import torch

PROG = 'scripts/amp_sensitivity.py'
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args(argv=None):
    from baryir_plugin.analysis.flags import (check_network, check_output_file, non_negative_int, positive_int,
                                              tool_parser)
    from baryir_plugin.analysis.machine import check_device

    p = tool_parser(PROG, __doc__, full_doc=True)
    p.add_argument('--dim', type=positive_int, default=48, help='BaryIR width (even; default 48)')
    p.add_argument('--num-blocks', type=positive_int, nargs=4, default=[4, 6, 6, 8])
    p.add_argument('--num-refinement-blocks', type=non_negative_int, default=4)
    p.add_argument('--sources', type=positive_int, default=3, help='K, the number of degradation sources')
    p.add_argument('--batch', type=positive_int, default=3)
    p.add_argument('--crop', type=positive_int, default=128, help='training crop (a multiple of 8, >= 16)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--dtypes', nargs='+', choices=sorted(DTYPES), default=['bf16'])
    p.add_argument('--json', help='also write the rows to this JSON file')
    args = p.parse_args(argv)
    check_device(args.device)
    check_network(args.dim, args.num_blocks, args.num_refinement_blocks, sources=args.sources, crop=args.crop)
    check_output_file(args.json, '--json')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from baryir_plugin.analysis import BenchConfig, machine_line
    from baryir_plugin.analysis.amp_sensitivity import TERMS, sensitivity

    config = BenchConfig(dim=args.dim, num_blocks=tuple(args.num_blocks),
                         num_refinement_blocks=args.num_refinement_blocks, sources=args.sources, batch=args.batch,
                         crop=args.crop, device=args.device)
    rows = sensitivity(config, [DTYPES[d] for d in args.dtypes])
    print(f'machine: {machine_line(args.device)}')
    print(f'config: {config.describe()}; relative error against float32 (one batch, same weights)')
    cols = [c for c in TERMS + ('grad_network', 'grad_potentials', 'grad_median', 'grad_sign_flips') if c in rows[0]]
    print(f'{"dtype":<10}{"float32 regions":<22}' + ''.join(f'{c:>16}' for c in cols))
    for r in rows:
        print(f'{r["dtype"]:<10}{r["fp32"]:<22}' + ''.join(f'{r[c]:>16.2e}' for c in cols))
    if args.json:
        from baryir_plugin.models.validation_report import write_json
        write_json(args.json, {'machine': machine_line(args.device), 'config': config.describe(), 'rows': rows})
    return 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main
    sys.exit(guarded_main(PROG, main))
