#!/usr/bin/env python
"""Build a small, deterministic paired restoration set from photos that ship inside scikit-image.

scikit-image (a dependency of basicsr) bundles a handful of real photographs, so the demo needs no
download. Each photo is cut into GT images and degraded with additive Gaussian noise (sigma 25 on
the uint8 image, clipped and truncated as in the reference's denoising source). Output, in
BasicSR's paired-folder layout (names pair by file name):

    OUT/train/{gt,lq}/*.png     OUT/val/{gt,lq}/*.png

``--lmdb`` also writes the LMDB twins (``OUT/train/gt.lmdb`` ...) with basicsr.utils.lmdb_util.
Validation images deliberately have sizes that are not multiples of 8.

    python scripts/make_demo_data.py --out datasets/demo            # the README's demo
    python scripts/make_demo_data.py --out DIR --preset tiny --lmdb  # what the tests use
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import cv2
import numpy as np

PRESETS = {
    # train: (photo, crop side) tiles; val: (photo, height, width)
    'demo': {'train_photos': ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry'),
             'train_size': 128, 'tiles_per_photo': 6, 'val': (('retina', 100, 124), ('camera', 92, 116))},
    'tiny': {'train_photos': ('astronaut', 'coffee'), 'train_size': 48, 'tiles_per_photo': 2,
             'val': (('chelsea', 36, 44), ('rocket', 29, 51))},
}
SIGMA = 25


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as uint8 BGR (H, W, 3)."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3][..., ::-1])  # RGB -> BGR for cv2
    if img.dtype != np.uint8:
        raise ValueError(f'skimage.data.{name} is {img.dtype}, expected uint8')
    return img


def add_gaussian_noise(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """noisy = uint8(clip(clean + N(0, 1) * sigma, 0, 255)), truncating like the reference."""
    noisy = clean.astype(np.float32) + rng.standard_normal(clean.shape).astype(np.float32) * sigma
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _tiles(img: np.ndarray, size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = img.shape[:2]
    scale = max(size * 2 / min(h, w), 1e-6)
    if scale < 1:  # shrink large photos so a tile holds a real structure, not a flat patch
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
    out = []
    for _ in range(count):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        out.append(img[y:y + size, x:x + size])
    return out


def _write_pair(root: str, name: str, gt: np.ndarray, lq: np.ndarray) -> None:
    for sub, img in (('gt', gt), ('lq', lq)):
        path = os.path.join(root, sub, f'{name}.png')
        if not cv2.imwrite(path, img):
            raise OSError(f'could not write {path}')


def _basicsr():
    import baryir_plugin  # noqa: F401  (compat patches before basicsr is imported)
    import basicsr
    return basicsr


def input_psnr(split_dir: str) -> float:
    """Mean PSNR (RGB, crop_border 0, BasicSR's function) of the degraded inputs against their GT."""
    _basicsr()
    from basicsr.metrics import calculate_psnr

    names = sorted(os.listdir(os.path.join(split_dir, 'gt')))
    return float(np.mean([calculate_psnr(cv2.imread(os.path.join(split_dir, 'lq', n)),
                                         cv2.imread(os.path.join(split_dir, 'gt', n)), crop_border=0)
                          for n in names]))


def _make_lmdb(folder: str) -> None:
    _basicsr()
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    names = sorted(f for f in os.listdir(folder) if f.endswith('.png'))
    keys = [os.path.splitext(f)[0] for f in names]  # BasicSR reads keys up to the first dot
    make_lmdb_from_imgs(folder, folder + '.lmdb', names, keys, multiprocessing_read=False)


def build(out: str, preset: str = 'demo', lmdb: bool = False, seed: int = 0) -> dict:
    """Write the dataset under ``out`` (replacing it) and return the number of pairs per split."""
    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed)
    if os.path.isdir(out):
        shutil.rmtree(out)
    counts = {}
    for split in ('train', 'val'):
        for sub in ('gt', 'lq'):
            os.makedirs(os.path.join(out, split, sub))
    n = 0
    for photo in cfg['train_photos']:
        for i, gt in enumerate(_tiles(load_photo(photo), cfg['train_size'], cfg['tiles_per_photo'], rng)):
            _write_pair(os.path.join(out, 'train'), f'{photo}_{i:02d}', gt, add_gaussian_noise(gt, SIGMA, rng))
            n += 1
    counts['train'] = n
    for photo, h, w in cfg['val']:
        img = load_photo(photo)
        y, x = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        gt = np.ascontiguousarray(img[y:y + h, x:x + w])
        _write_pair(os.path.join(out, 'val'), photo, gt, add_gaussian_noise(gt, SIGMA, rng))
    counts['val'] = len(cfg['val'])
    if lmdb:
        for split in ('train', 'val'):
            for sub in ('gt', 'lq'):
                _make_lmdb(os.path.join(out, split, sub))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='datasets/demo', help='output folder (replaced if it exists)')
    parser.add_argument('--preset', choices=sorted(PRESETS), default='demo')
    parser.add_argument('--lmdb', action='store_true', help='also write BasicSR LMDB twins')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    counts = build(args.out, args.preset, args.lmdb, args.seed)
    print(f"wrote {counts['train']} training and {counts['val']} validation pairs to {args.out}"
          f"{' (+ LMDB)' if args.lmdb else ''}")
    print(f"validation inputs: PSNR {input_psnr(os.path.join(args.out, 'val')):.2f} dB against GT "
          '(what a restoration must beat)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
