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


def _photo(path: Path, h: int, w: int, seed: int, grey: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return img if not grey else np.stack([img] * 3, axis=-1)


def test_validation_from_own_photos_is_centre_crops_and_leaves_training_unchanged(tmp_path):
    """--val-photos: every image of each folder becomes one centre-cropped validation pair per set, named by
    folder and stem; the training set is the same bytes as without it (a trained demo network can be
    validated on the larger set)."""
    first, second = tmp_path / 'kodak', tmp_path / 'bsd'
    first.mkdir()
    second.mkdir()
    a = _photo(first / 'a.png', 40, 50, 0)
    _photo(first / 'b.jpg', 36, 36, 1)
    b = cv2.imread(str(first / 'b.jpg'))  # lossy: compared with the decoded file, as the tool reads it
    c = _photo(second / 'c.png', 33, 61, 2, grey=True)
    (second / 'notes.txt').write_text('not an image')
    photos = demo.val_photos_from([str(first), str(second)], crop=32)
    assert [name for name, _ in photos] == ['kodak_a', 'kodak_b', 'bsd_c']
    expected = {'kodak_a': a[4:36, 9:41], 'kodak_b': b[2:34, 2:34], 'bsd_c': c[0:32, 14:46]}
    for name, gt in photos:
        assert gt.dtype == np.uint8 and np.array_equal(gt, expected[name])

    plain = demo.build(str(tmp_path / 'plain'), preset='tiny')
    own = demo.build(str(tmp_path / 'own'), preset='tiny', val_photos=photos)
    assert (own['train'], own['val'], plain['val']) == (plain['train'], 3, len(demo.PRESETS['tiny']['val']))
    before, after = _files(tmp_path / 'plain'), _files(tmp_path / 'own')
    train = {k for k in before if k.startswith('train')}
    assert train == {k for k in after if k.startswith('train')}
    assert all(after[k] == before[k] for k in train)
    for kind in ('noise',) + KINDS:
        folder = tmp_path / 'own' / 'val' / kind
        assert sorted(p.name for p in (folder / 'gt').iterdir()) == ['bsd_c.png', 'kodak_a.png', 'kodak_b.png']
        for name, gt in photos:
            lq = cv2.imread(str(folder / 'lq' / f'{name}.png'))
            assert np.array_equal(cv2.imread(str(folder / 'gt' / f'{name}.png')), gt)
            assert lq.shape == gt.shape and not np.array_equal(lq, gt)
