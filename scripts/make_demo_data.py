#!/usr/bin/env python
"""Build the demo data set: a small, deterministic all-in-one restoration set from photos that ship
inside scikit-image (no download), degraded five ways: Gaussian noise (added on the fly in training),
rain streaks, haze, motion blur and low light. The layout, and what happens to an existing ``--out``
(only an earlier demo set is replaced, and only its own files), are described in
baryir_plugin/data/demo.py, the library behind this command.

    python scripts/make_demo_data.py --out datasets/demo            # the README's demo (seconds)
    python scripts/make_demo_data.py --out DIR --preset tiny --lmdb  # what the tests use
    python scripts/make_demo_data.py --out DIR --val-photos CLEAN_DIR [CLEAN_DIR ...] --val-crop 128

With ``--val-photos`` the validation sets are centre crops of your own clean images (every image of each
folder, degraded the same five ways) instead of the two bundled crops; the training set is unchanged, so
a network trained on the demo can be validated on many more images (``basicsr test -opt
options/test_baryir_demo.yml`` after pointing its datasets at DIR/val).
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = 'scripts/make_demo_data.py'


def main(argv=None) -> int:
    from baryir_plugin.data.checks import ToolParser, non_negative_int, positive_int
    from baryir_plugin.data.demo import PAIRED, PRESETS, VAL_CROP, build, input_psnr, val_photos_from

    parser = ToolParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='datasets/demo',
                        help='output folder (the files of an earlier demo set there are replaced; any other '
                             'folder, or one holding other files too, is refused)')
    parser.add_argument('--preset', choices=sorted(PRESETS), default='demo')
    parser.add_argument('--lmdb', action='store_true', help='also write BasicSR LMDB twins')
    parser.add_argument('--seed', type=non_negative_int, default=0)
    parser.add_argument('--val-photos', nargs='+', metavar='DIR',
                        help='folders of clean images: their centre crops become the validation sets')
    parser.add_argument('--val-crop', type=positive_int,
                        help=f'side of the centre crops taken with --val-photos (default {VAL_CROP})')
    args = parser.parse_args(argv)
    if args.val_crop is not None and not args.val_photos:
        parser.error('--val-crop needs --val-photos (the bundled validation crops have their own sizes)')
    # every image is read and checked before anything under --out is replaced
    val_photos = val_photos_from(args.val_photos, args.val_crop or VAL_CROP) if args.val_photos else None
    counts = build(args.out, args.preset, args.lmdb, args.seed, val_photos=val_photos)
    print(f"wrote {counts['train']} training tiles x 5 degradations and {counts['val']} validation images x 5 "
          f"to {args.out}{' (+ LMDB)' if args.lmdb else ''}")
    print('validation inputs, PSNR against GT (what a restoration must beat):')
    for kind in ('noise',) + PAIRED:
        print(f'  {kind:9s} {input_psnr(os.path.join(args.out, "val", kind)):6.2f} dB')
    return 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main

    sys.exit(guarded_main(PROG, main))
