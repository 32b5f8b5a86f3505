"""A tiny synthetic copy of the real dataset layout (baryir_plugin/data/layout.py) for tests.

Every folder of the selected sets gets 2-3 small images named as in the real sets (rain-<n>/norain-<n>,
RESIDE's several ``<id>_<A>_<beta>.jpg`` per clear ``<id>``, O-HAZE's _hazy/_GT, LOL-v2's low/normal,
flattened GoPro names, ...), so datasets, the checker and make_lmdb can be exercised without the data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from baryir_plugin.data.degradations import degrade, gaussian_noise
from baryir_plugin.data.layout import (LOLV2_RULE, OHAZE_RULE, RAIN_RULE, RESIDE_RULE, DatasetSet, compile_rule,
                                       gt_stem, select, stem)

# names of clean sets and of same-name pairs, per set key (others: 001.png, 002.png, 003.png)
_CLEAN_NAMES = {'train/noise': ['test_001.png', 'test_002.png', '00001.bmp'],  # BSD400 + WED style
                'test/jpeg/BSDS500': ['2018.jpg', '3063.jpg']}
_SAME_NAMES = {'train/blur': ['GOPR0372_07_00_000047.png', 'GOPR0372_07_00_000048.png', 'GOPR0884_11_00_000001.png'],
               'test/blur/GoPro': ['GOPR0384_11_00_000001.png', 'GOPR0410_11_00_000002.png'],
               'train/lowlight': ['2.png', '5.png', '22.png'], 'test/lowlight/LOL_eval15': ['1.png', '22.png']}


def _pairs(s: DatasetSet) -> list[tuple[str, str]]:
    """(lq name, gt name) pairs of a paired set, following its rule."""
    rule = tuple(s.lq_to_gt) if s.lq_to_gt else None
    if rule == RAIN_RULE:
        return [(f'rain-{i}.png', f'norain-{i}.png') for i in (1, 2, 3)]
    if rule == RESIDE_RULE:  # many hazy per clear; SOTS keeps jpg hazy with png clear
        gt_ext = '.jpg' if s.key.startswith('train/') else '.png'
        return [(f'{i}_{a}_{b}.jpg', f'{i}{gt_ext}') for i, a, b in
                (('0001', '0.8', '0.2'), ('0001', '1', '0.16'), ('0002', '0.9', '0.08'))]
    if rule == OHAZE_RULE:
        return [(f'{i:02d}_outdoor_hazy.jpg', f'{i:02d}_outdoor_GT.jpg') for i in (1, 2)]
    if rule == LOLV2_RULE:
        return [(f'low{i:05d}.png', f'normal{i:05d}.png') for i in (690, 691)]
    if rule is not None:
        raise ValueError(f'fake_tree: no naming for the rule {rule} of {s.key}; add it here.')
    names = _SAME_NAMES.get(s.key, ['001.png', '002.png'] if s.degradation == 'mixed' else ['001.png', '002.png',
                                                                                            '003.png'])
    return [(n, n) for n in names]


def _clean_image(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour image (uint8 BGR), so crops and JPEG behave as on photos, not on white noise."""
    h, w = size
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _lq_image(gt: np.ndarray, degradation: str, rng: np.random.Generator) -> np.ndarray:
    if degradation in ('rain', 'haze', 'blur', 'lowlight'):
        return degrade(gt, degradation, rng)
    return gaussian_noise(gt, rng, 25.0)


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f'could not write {path}')


def make_fake_tree(root: Path, groups: Sequence[str] | None = None, size: tuple[int, int] = (40, 36),
                   seed: int = 0) -> Path:
    """Write a synthetic tree following the layout under ``root`` and return ``root``.

    Args:
        root: the dataset root to write (created; existing files of the same names are overwritten).
        groups: layout groups to write (None: every set).
        size: (height, width) of every image.
        seed: seed of the random images.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    gts: dict[str, np.ndarray] = {}  # shared GT folders (CDD-11 clear/) are written once
    for s in select(groups):
        if s.kind == 'clean':
            for name in _CLEAN_NAMES.get(s.key, ['001.png', '002.png', '003.png']):
                _write(root / s.gt / name, _clean_image(size, rng))
            continue
        rule = compile_rule(s.lq_to_gt)
        for lq_name, gt_name in _pairs(s):
            assert gt_stem(stem(lq_name), rule) == stem(gt_name), (s.key, lq_name, gt_name)
            gt_path = os.path.join(s.gt, gt_name)
            if gt_path not in gts:
                gts[gt_path] = _clean_image(size, rng)
                _write(root / gt_path, gts[gt_path])
            _write(root / s.lq / lq_name, _lq_image(gts[gt_path], s.degradation, rng))
    return root
