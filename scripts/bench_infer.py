#!/usr/bin/env python
"""Speed and memory of ``baryir infer``'s restoration (the same code path): whole image, exact streamed
tiles and blended tiles, measured in one run with the order rotated every round.

Per mode: the median seconds of ``--runs`` restorations after ``--warmup``, seconds per megapixel, the
peak memory of one restoration (CPU: the rise of the resident set's high-water mark; GPU:
max_memory_allocated) and the largest difference from the whole-image result (images in [0, 1]).

    python scripts/bench_infer.py --network demo --size 1024 1024
    python scripts/bench_infer.py --network default --size 512 512 --runs 2
    python scripts/bench_infer.py --weights net_g_latest.pth --image photo.png --tile 256
"""
from __future__ import annotations

import statistics
import sys
import time

PROG = 'scripts/bench_infer.py'
NETWORKS = {
    'demo': {'type': 'BaryIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
             'heads': [1, 2, 4, 8], 'num_bary_blocks': 1},
    'default': {'type': 'BaryIR'},
}


def parse_args(argv=None):
    from baryir_plugin.analysis.flags import non_negative_int, positive_int, tool_parser
    from baryir_plugin.analysis.machine import check_device

    p = tool_parser(PROG, __doc__)
    p.add_argument('--network', choices=sorted(NETWORKS), default='demo',
                   help='demo (dim 8) or default (dim 48) BaryIR with seeded weights (speed does not depend on them)')
    p.add_argument('--weights', default=None, help='a weights file instead of --network')
    p.add_argument('--image', default=None, help='an image file (default: the astronaut photo of scikit-image)')
    p.add_argument('--size', type=positive_int, nargs=2, default=[1024, 1024], metavar=('H', 'W'),
                   help='the photo resized to H x W (ignored with --image)')
    p.add_argument('--tile', type=positive_int, default=256, help='tile side of the tiled modes')
    p.add_argument('--overlap', type=non_negative_int, default=32, help='overlap of the blended tiles')
    p.add_argument('--modes', nargs='+', choices=('whole', 'exact', 'blend'), default=['whole', 'exact', 'blend'])
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32')
    p.add_argument('--warmup', type=non_negative_int, default=1)
    p.add_argument('--runs', type=positive_int, default=3)
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    args = p.parse_args(argv)
    check_device(args.device)
    return args


def _image(args):
    import cv2
    import numpy as np

    if args.image:
        from baryir_plugin.inference.images import read_picture
        return read_picture(args.image).rgb
    from baryir_plugin.data.demo import load_photo
    h, w = args.size
    bgr = cv2.resize(load_photo('astronaut'), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(bgr[..., ::-1].astype(np.float32) / 255)


def _network(args, device):
    import torch

    from baryir_plugin.inference.weights import build_network, load_network

    if args.weights:
        loaded = load_network(args.weights, device=device, log=lambda _: None)
        return loaded.net, loaded.options, args.weights
    torch.manual_seed(0)
    options = NETWORKS[args.network]
    net = build_network(options, f'--network {args.network}').eval().requires_grad_(False).to(device)
    return net, options, f'{args.network} BaryIR (seeded weights)'


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from baryir_plugin.analysis import machine_line
    from baryir_plugin.inference.infer import Restorer
    from baryir_plugin.inference.memory import measure_peak_increase

    device = torch.device(args.device)
    net, options, label = _network(args, device)
    rgb = _image(args)
    megapixels = rgb.shape[0] * rgb.shape[1] / 1e6
    restorers = {
        'whole': Restorer(net, options, device, args.precision, tile=0),
        'exact': Restorer(net, options, device, args.precision, tile=args.tile),
        'blend': Restorer(net, options, device, args.precision, tile=args.tile, tile_mode='blend',
                          overlap=args.overlap),
    }
    modes = list(args.modes)
    on_gpu = device.type == 'cuda'
    times = {m: [] for m in modes}
    outputs, peaks = {}, {}
    for m in modes:  # warm-up, and one restoration to measure memory and the result
        for _ in range(args.warmup):
            restorers[m].restore(rgb)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
            outputs[m] = restorers[m].restore(rgb)
            peaks[m] = torch.cuda.max_memory_allocated(device)
        else:
            peaks[m] = measure_peak_increase(lambda: outputs.__setitem__(m, restorers[m].restore(rgb)))
    for r in range(args.runs):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            if on_gpu:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            restorers[m].restore(rgb)
            if on_gpu:
                torch.cuda.synchronize(device)
            times[m].append(time.perf_counter() - start)
    params = sum(p.numel() for p in net.parameters())
    print(f'machine: {machine_line(args.device)}')
    print(f'{label}, {params:,} parameters; image {rgb.shape[1]}x{rgb.shape[0]} ({megapixels:.2f} MP); '
          f'{args.precision} on {args.device}; tiles {args.tile} px (blend overlap {args.overlap}); median of '
          f'{args.runs} after {args.warmup} warm-up, order rotated')
    base = modes[0]
    print(f'| mode | s / image | s / MP | x time | peak memory | x memory | max abs diff vs {base} |')
    print('|---|--:|--:|--:|--:|--:|--:|')
    rows = []
    for m in modes:
        med = statistics.median(times[m])
        diff = float(np.abs(outputs[m] - outputs[base]).max())
        peak = peaks[m]
        ratio_mem = f'{peak / peaks[base]:.2f}' if peak and peaks[base] else '-'
        mem = f'{peak / 2**20:,.0f} MiB' if peak is not None else 'n/a'
        print(f'| {m} | {med:.3f} | {med / megapixels:.3f} | {med / statistics.median(times[base]):.2f} | {mem} | '
              f'{ratio_mem} | {diff:.1e} |')
        rows.append({'mode': m, 'seconds': times[m], 'median_s': med, 's_per_mp': med / megapixels,
                     'peak_bytes': peak, 'max_abs_diff': diff})
    if args.json:
        from baryir_plugin.models.validation_report import write_json
        write_json(args.json, {'machine': machine_line(args.device), 'network': label, 'parameters': params,
                               'size': list(rgb.shape[:2]), 'tile': args.tile, 'overlap': args.overlap,
                               'precision': args.precision, 'rows': rows})
    return 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main
    sys.exit(guarded_main(PROG, main))
