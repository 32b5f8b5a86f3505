"""The demo data set: a small, deterministic all-in-one restoration set built from photos that ship inside
scikit-image.

scikit-image (a dependency of basicsr) bundles a handful of real photographs, so the demo needs no
download. The photos are cut into tiles and degraded five ways (baryir_plugin.data.degradations):
Gaussian noise (added on the fly during training by GaussianNoiseDataset), rain streaks, haze by the
atmospheric scattering model, motion blur and low light. Layout (BasicSR's paired-folder convention,
names pair by file name):

    OUT/train/clean/*.png                         clean tiles for the on-the-fly noise source
    OUT/train/{rain,haze,blur,lowlight}/{gt,lq}/  training pairs
    OUT/val/{noise,rain,haze,blur,lowlight}/{gt,lq}/   validation pairs (noise: sigma 25, fixed seed)

``--val-photos DIR ...`` (:func:`val_photos_from`) takes the validation ground truths from the user's
own clean images instead: a ``--val-crop`` square (128 by default) from the centre of every image in the
folders, named ``<folder>_<stem>.png``, degraded the same five ways. The training set is byte-identical
either way (its random stream is drawn first), so a network trained on the demo can be validated on many
more images than the two bundled crops, whose figures move by tenths of a dB with rounding alone
(docs/training-speed.md).

``--lmdb`` also writes LMDB twins beside every gt/lq/clean folder (``gt.lmdb`` ...) with
basicsr.utils.lmdb_util. Validation images have sizes that are not multiples of 8. Training tiles come
from other photos than the validation images, at two scales: photos shrunk so that a tile holds
structure, and the photos' own resolution, where a tile also holds smooth areas and flat colour (like
the validation crops).

``scripts/make_demo_data.py`` is its command; :func:`build` (which the tests and benchmarks call) and
:func:`input_psnr` are the library.

An existing ``--out`` is written only when it is empty or holds an earlier demo set (the marker file
``.baryir-demo-data`` this script writes there, with the list of the files it wrote); any other folder is
refused, so a mistyped ``--out`` never deletes data. A re-run deletes only the files of that list, and
refuses (deleting nothing) when the folder also holds files the script did not write; for a marker
without a list (an older run, or an interrupted one) only files of the layout above count as its own.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from .. import errors

MARKER = '.baryir-demo-data'  # written into --out: an earlier demo set may be replaced
_MARKER_HEAD = ('written by scripts/make_demo_data.py; when it runs again it deletes the files listed below, and '
                'nothing else\n')
_MANIFEST = 'files:'
_LMDB_FILES = ('data.mdb', 'lock.mdb', 'meta_info.txt')
PAIRED = ('rain', 'haze', 'blur', 'lowlight')
PRESETS = {
    # train: photos cut into tiles of train_size; val: (photo, height, width) centre crops
    # native_tiles_per_photo: more tiles cut at the photo's own resolution (smooth areas, gradients, flat
    # colour, as in the validation crops), drawn from a second random stream (seed, 1)
    'demo': {'train_photos': ('astronaut', 'chelsea', 'coffee', 'retina', 'hubble_deep_field', 'immunohistochemistry',
                              'motorcycle_left', 'coins', 'moon', 'brick', 'grass', 'gravel'),
             'train_size': 96, 'tiles_per_photo': 8, 'native_tiles_per_photo': 8,
             'val': (('rocket', 140, 108), ('camera', 92, 116))},
    'tiny': {'train_photos': ('astronaut', 'coffee'), 'train_size': 48, 'tiles_per_photo': 2,
             'native_tiles_per_photo': 0, 'val': (('chelsea', 36, 44), ('rocket', 29, 51))},
}
VAL_SIGMA = 25
VAL_CROP = 128  # side of the centre crops of --val-photos


def _layout_folder(parts: list[str]) -> bool:
    """Whether a folder (path parts under ``out``) is one of the image folders the script writes."""
    if parts == ['train', 'clean']:
        return True
    kinds = {'train': PAIRED, 'val': ('noise',) + PAIRED}
    return len(parts) == 3 and parts[2] in ('gt', 'lq') and parts[1] in kinds.get(parts[0], ())


def is_layout_file(rel: str) -> bool:
    """Whether a file (path relative to ``out``, with /) is one of those the script writes: a .png of an image
    folder, or a file of the LMDB twin of one."""
    *folder, name = rel.split('/')
    if name.endswith('.png') and not name.startswith('.'):
        return _layout_folder(folder)
    return (name in _LMDB_FILES and bool(folder) and folder[-1].endswith('.lmdb')
            and _layout_folder(folder[:-1] + [folder[-1][:-len('.lmdb')]]))


def read_manifest(out: str) -> set[str] | None:
    """The files an earlier run listed in its marker (paths relative to ``out``), or None when the marker has no
    list (an older or interrupted run)."""
    try:
        with open(os.path.join(out, MARKER), encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if _MANIFEST not in lines:
        return None
    return {line for line in lines[lines.index(_MANIFEST) + 1:] if line.strip()}


def _files_under(out: str) -> list[str]:
    """Every file under ``out`` except the marker (paths relative to it, with /); a link counts as a file."""
    found = []
    for folder, dirs, files in os.walk(out):
        rel = os.path.relpath(folder, out).replace(os.sep, '/')
        prefix = '' if rel == '.' else f'{rel}/'
        found += [f'{prefix}{d}' for d in dirs if os.path.islink(os.path.join(folder, d))]
        found += [f'{prefix}{f}' for f in files if prefix or f != MARKER]
    return sorted(found)


def check_out(out: str) -> list[str]:
    """``out`` may be written: absent, empty, or an earlier demo set (its marker) holding only the files that run
    wrote. Returns those files (relative to ``out``), which :func:`build` deletes.

    Raises:
        DataError: ``out`` is a file, a folder that is no demo set, or a demo set holding other files too
            (nothing is deleted).
    """
    if not os.path.exists(out):
        return []
    if not os.path.isdir(out):
        raise errors.DataError(f'--out {out!r} is a file; give a folder for the demo set.')
    entries = set(os.listdir(out))
    if entries and MARKER not in entries:
        shown = ', '.join(sorted(entries)[:3]) + (', ...' if len(entries) > 3 else '')
        raise errors.DataError(f'--out {out!r} exists and is not a demo set written by this script (it holds '
                               f'{shown}); nothing was written. Choose another --out, or remove the folder yourself.')
    manifest = read_manifest(out)
    ours, foreign = [], []
    for rel in _files_under(out):
        mine = rel in manifest if manifest is not None else is_layout_file(rel)
        (ours if mine else foreign).append(rel)
    if foreign:
        shown = ', '.join(foreign[:5]) + (f', ... ({len(foreign)} in all)' if len(foreign) > 5 else '')
        raise errors.DataError(f'--out {out!r} holds a demo set, but also {len(foreign)} file(s) this script did not '
                               f'write: {shown}; nothing was deleted or written. Move them out of the folder, or '
                               'choose another --out.')
    return ours


def _remove(out: str, files: list[str]) -> None:
    """Delete ``files`` (relative to ``out``), then the folders they leave empty (never ``out`` itself)."""
    folders = set()
    for rel in files:
        os.remove(os.path.join(out, *rel.split('/')))
        parts = rel.split('/')[:-1]
        folders.update('/'.join(parts[:i]) for i in range(1, len(parts) + 1))
    for rel in sorted(folders, key=lambda f: f.count('/'), reverse=True):
        try:
            os.rmdir(os.path.join(out, *rel.split('/')))
        except OSError:  # not empty: something else lives there
            pass


def _write_marker(out: str, files: list[str] | None = None) -> None:
    text = _MARKER_HEAD + ('' if files is None else '\n'.join([_MANIFEST, *files]) + '\n')
    with open(os.path.join(out, MARKER), 'w', encoding='utf-8') as f:
        f.write(text)


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as uint8 BGR (H, W, 3)."""
    try:
        from skimage import data
    except ImportError as err:
        raise errors.SetupError(f'scikit-image is needed for the demo photos ({err}); install it with '
                                   'pip install scikit-image.') from None

    img = data.stereo_motorcycle()[0] if name == 'motorcycle_left' else getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.dtype != np.uint8:
        raise ValueError(f'skimage.data.{name} is {img.dtype}, expected uint8')
    return np.ascontiguousarray(img[..., :3][..., ::-1])  # RGB -> BGR for cv2


def _tiles(img: np.ndarray, size: int, count: int, rng: np.random.Generator, shrink: bool = True) -> list[np.ndarray]:
    h, w = img.shape[:2]
    scale = size * 2 / min(h, w)
    if shrink and scale < 1:  # shrink large photos so a tile holds structure, not a flat patch
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
    out = []
    for _ in range(count):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        out.append(np.ascontiguousarray(img[y:y + size, x:x + size]))
    return out


def _write(path: str, img: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, img):
        raise errors.SetupError(f'{path}: could not be written; check that the folder is writable and the disk '
                                   'has space.')


def input_psnr(pair_dir: str) -> float:
    """Mean PSNR (RGB, crop_border 0, BasicSR's function) of a folder pair's lq against gt."""
    from basicsr.metrics import calculate_psnr

    names = sorted(os.listdir(os.path.join(pair_dir, 'gt')))
    return float(np.mean([calculate_psnr(cv2.imread(os.path.join(pair_dir, 'lq', n)),
                                         cv2.imread(os.path.join(pair_dir, 'gt', n)), crop_border=0)
                          for n in names]))


def _make_lmdb(folder: str) -> None:
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    names = sorted(f for f in os.listdir(folder) if f.endswith('.png'))
    keys = [os.path.splitext(f)[0] for f in names]  # BasicSR reads keys up to the first dot
    make_lmdb_from_imgs(folder, folder + '.lmdb', names, keys, multiprocessing_read=False)


def _write_training_pairs(out: str, tiles: list[tuple[str, np.ndarray]], rng: np.random.Generator) -> None:
    """Each clean tile, and its four paired degradations, under ``out/train``."""
    from .degradations import degrade

    for name, tile in tiles:
        _write(os.path.join(out, 'train', 'clean', f'{name}.png'), tile)
        for kind in PAIRED:
            _write(os.path.join(out, 'train', kind, 'gt', f'{name}.png'), tile)
            _write(os.path.join(out, 'train', kind, 'lq', f'{name}.png'), degrade(tile, kind, rng))


def _centre_crop(img: np.ndarray, h: int, w: int) -> np.ndarray:
    y, x = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(img[y:y + h, x:x + w])


def val_photos_from(folders: list[str], crop: int = VAL_CROP, flag: str = '--val-photos',
                    crop_flag: str | None = '--val-crop') -> list[tuple[str, np.ndarray]]:
    """Validation ground truths from the user's own clean images: a centre crop of ``crop`` x ``crop`` of every
    image in ``folders`` (sorted by name), as uint8 BGR, named ``<folder>_<file stem>``. ``flag`` and
    ``crop_flag`` are the command-line options the messages name (``crop_flag`` None: the command has none).

    Raises:
        UsageError / DataError: a folder is missing or holds no images, an image cannot be read or is smaller
            than the crop, or two images would get the same name.
    """
    from ..analysis.figures import list_images, read_rgb

    photos: dict[str, np.ndarray] = {}
    for folder in folders:
        prefix = os.path.basename(os.path.normpath(folder))
        for path in list_images(folder, flag):
            img = read_rgb(path)
            h, w = img.shape[:2]
            if min(h, w) < crop:
                size, fix = ((f'{crop_flag} {crop}', f'give a smaller {crop_flag} or remove') if crop_flag else
                             (f'the {crop}-pixel crop', 'remove'))
                raise errors.DataError(f'{flag}: {path} is {h}x{w}, smaller than {size}; {fix} the image from '
                                       'the folder.')
            name = f'{prefix}_{os.path.splitext(os.path.basename(path))[0]}'
            if name in photos:
                raise errors.UsageError(f'{flag}: two images would be named {name}.png (from {path}); give '
                                        'folders with distinct names and files with distinct stems.')
            bgr = np.round(_centre_crop(img, crop, crop)[..., ::-1] * 255).astype(np.uint8)
            photos[name] = np.ascontiguousarray(bgr)
    return list(photos.items())


def build(out: str, preset: str = 'demo', lmdb: bool = False, seed: int = 0,
          val_photos: list[tuple[str, np.ndarray]] | None = None) -> dict:
    """Write the dataset under ``out`` (replacing an earlier demo set there, see :func:`check_out`); returns the
    number of images per folder. ``val_photos`` ((name, uint8 BGR ground truth) pairs, e.g. from
    :func:`val_photos_from`) replace the preset's validation crops; the training set is the same either way."""
    from .degradations import degrade

    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed)
    _remove(out, check_out(out))
    os.makedirs(out, exist_ok=True)
    _write_marker(out)  # no list yet: an interrupted run is told apart by the layout
    counts: dict[str, int] = {}
    photos = {photo: load_photo(photo) for photo in cfg['train_photos']}
    tiles = [(f'{photo}_{i:02d}', tile) for photo, img in photos.items()
             for i, tile in enumerate(_tiles(img, cfg['train_size'], cfg['tiles_per_photo'], rng))]
    _write_training_pairs(out, tiles, rng)
    native_rng = np.random.default_rng([seed, 1])
    for photo, img in photos.items():
        native = _tiles(img, cfg['train_size'], cfg['native_tiles_per_photo'], native_rng, shrink=False)
        native = [(f'{photo}_n{i:02d}', tile) for i, tile in enumerate(native)]
        _write_training_pairs(out, native, native_rng)
        tiles += native
    counts['train'] = len(tiles)
    if val_photos is None:
        val_photos = []
        for photo, h, w in cfg['val']:
            val_photos.append((photo, _centre_crop(load_photo(photo), h, w)))
    for photo, gt in val_photos:
        for kind in ('noise',) + PAIRED:
            _write(os.path.join(out, 'val', kind, 'gt', f'{photo}.png'), gt)
            _write(os.path.join(out, 'val', kind, 'lq', f'{photo}.png'), degrade(gt, kind, rng))
    counts['val'] = len(val_photos)
    if lmdb:
        folders = [os.path.join(out, 'train', 'clean')]
        splits = (('train', PAIRED), ('val', ('noise',) + PAIRED))
        folders += [os.path.join(out, split, kind, sub) for split, kinds in splits for kind in kinds
                    for sub in ('gt', 'lq')]
        for folder in folders:
            _make_lmdb(folder)
    _write_marker(out, _files_under(out))  # the folder held none but its own files: all of them are this run's
    return counts
