"""The demo data set (baryir_plugin.data.demo): training tiles at two scales, and validation that does not move."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from baryir_plugin.data import demo

KINDS = ('rain', 'haze', 'blur', 'lowlight')


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*.png'))}


def test_native_tiles_are_crops_at_the_photos_resolution_and_leave_the_rest_unchanged(tmp_path, monkeypatch):
    tiny = demo.PRESETS['tiny']
    assert tiny['native_tiles_per_photo'] == 0
    monkeypatch.setitem(demo.PRESETS, 'tiny_native', {**tiny, 'native_tiles_per_photo': 2})
    plain = demo.build(str(tmp_path / 'plain'), preset='tiny')
    native = demo.build(str(tmp_path / 'native'), preset='tiny_native')
    photos = tiny['train_photos']
    assert native['train'] == plain['train'] + 2 * len(photos)

    before, after = _files(tmp_path / 'plain'), _files(tmp_path / 'native')
    added = sorted(set(after) - set(before))
    assert not set(before) - set(after)
    assert len(added) == 2 * len(photos) * (1 + 2 * len(KINDS))  # clean + (gt, lq) per paired kind
    # the shrunk tiles and every validation image come out byte-identical: the native tiles draw from
    # their own random stream
    assert all(after[name] == data for name, data in before.items())

    size = tiny['train_size']
    for photo in photos:
        full = demo.load_photo(photo)
        for i in range(2):
            name = f'{photo}_n{i:02d}.png'
            tile = cv2.imread(str(tmp_path / 'native' / 'train' / 'clean' / name))
            assert tile.shape == (size, size, 3)
            # a crop of the photo at its own resolution: the best match in the photo is exact
            _, _, (x, y), _ = cv2.minMaxLoc(cv2.matchTemplate(full, tile, cv2.TM_SQDIFF))
            assert np.array_equal(full[y:y + size, x:x + size], tile)
            for kind in KINDS:
                pair = tmp_path / 'native' / 'train' / kind
                gt, lq = cv2.imread(str(pair / 'gt' / name)), cv2.imread(str(pair / 'lq' / name))
                assert np.array_equal(gt, tile)
                assert lq.shape == gt.shape and not np.array_equal(lq, gt)
