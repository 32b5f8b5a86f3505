"""Checks of the data a run reads: every bad image, folder, pair, crop or batch is one DataError that
names the file (or the option) and the fix, raised where the problem is first seen.

BasicSR 1.4.2 reads images with ``imfrombytes`` (``cv2.imdecode``), which returns None for a truncated or
foreign file and fails on an empty one, so a bad image ends in ``AttributeError: 'NoneType' object has no
attribute 'astype'`` or a ``cv2.error`` that names no file; unpaired folders are ``assert`` statements; a
validation GT that is larger than its LQ is cropped without a word; an empty test set is "tested" (0
images) and a training set smaller than one batch trains for zero iterations and saves the untrained
network. :func:`patch` (the ``data_checks`` entry of baryir_plugin/compat.py) replaces the attributes
BasicSR looks up at call time:

- ``FileClient`` and ``imfrombytes`` in BasicSR's dataset modules: a missing file or LMDB key, an empty,
  truncated or undecodable image is a DataError naming the path (or the key and its ``.lmdb`` folder).
- ``PairedImageDataset``/``RealESRGANPairedDataset.__getitem__`` (and ``SingleImageDataset``'s): while a
  sample is read, the decoded sizes are compared: the GT must be ``scale`` times the LQ, and in training
  ``gt_size`` must fit in the image.
- ``paired_paths_from_folder``/``_lmdb``/``_meta_info_file`` in those modules: files without a partner and
  listed files that do not exist are named at construction.
- ``build_dataset``/``build_dataloader`` as bound in ``basicsr.data``, ``basicsr.train`` and
  ``basicsr.test``: every key of a dataset entry is one its type or BasicSR's pipeline reads (a typo is
  an error with the closest name, :func:`check_dataset_keys`), the values BasicSR uses unchecked
  (``gt_size``, flips, loader sizes, ``prefetch_mode``) are of the right kind, evaluation entries have
  names of their own, ``dataroot_*`` and ``meta_info_file`` must exist and an LMDB must be whole (a
  well-formed meta_info.txt; a data.mdb as long as its meta page says, read without mapping it: a truncated
  one ends in SIGBUS), all checked before building, from file lists only; a built dataset must not be
  empty, and a training batch must fit in the samples of one process.
  ``basicsr.train.create_train_val_dataloader``: the number of epochs counts the partial batches the loader
  drops, so training runs ``train.total_iter`` iterations (BasicSR's count can stop short).
- ``PrefetchGenerator`` (``prefetch_mode: cpu``): an error in its loading thread reaches the training loop
  instead of leaving it waiting forever.
- ``calculate_metric`` as bound in ``basicsr.models.sr_model`` (and the video models): a metric without a finite
  value for one image (SSIM of an image smaller than its window: NaN, which made the set's mean NaN) or one
  that fails on it is a DataError naming the image. ``basicsr.metrics.calculate_metric`` itself is left alone:
  BaryIRModel's validation reports such values unavailable per image.

The plugin's own datasets call the same functions (:func:`read_image`, :func:`check_pair`,
:func:`check_crop`, :func:`build_checked`). Messages are one line, so that they survive PyTorch's re-raise
of an exception from a DataLoader worker (``errors.one_line`` takes the last line of the worker's
traceback).
"""
from __future__ import annotations

import argparse
import contextvars
import difflib
import functools
import importlib
import math
import os
import struct
import sys
import threading
import warnings
from typing import Any, Callable, Optional

import cv2
import numpy as np
from basicsr.utils import FileClient

from ..errors import BaryIRError, DataError, OptionError, SetupError, UsageError, did_you_mean, one_line

JPEG_START = b'\xff\xd8'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_FLAGS = {'color': cv2.IMREAD_COLOR, 'grayscale': cv2.IMREAD_GRAYSCALE, 'unchanged': cv2.IMREAD_UNCHANGED}
# BasicSR's dataset modules that read images through FileClient + imfrombytes
READER_MODULES = ('paired_image_dataset', 'single_image_dataset', 'realesrgan_paired_dataset', 'realesrgan_dataset',
                  'ffhq_dataset', 'reds_dataset', 'vimeo90k_dataset')
PAIRED_MODULES = ('paired_image_dataset', 'realesrgan_paired_dataset')
# options BasicSR's own datasets read with opt[...] (a KeyError otherwise); the train phase adds _TRAIN_KEYS
_REQUIRED = {'PairedImageDataset': ('dataroot_gt', 'dataroot_lq', 'io_backend'),
             'SingleImageDataset': ('dataroot_lq', 'io_backend'),
             'RealESRGANPairedDataset': ('dataroot_gt', 'dataroot_lq', 'io_backend')}
_TRAIN_KEYS = {'PairedImageDataset': ('gt_size', 'use_hflip', 'use_rot'),
               'RealESRGANPairedDataset': ('gt_size', 'use_hflip', 'use_rot')}
# BasicSR's path listing of these types keeps only LMDB folders whose name ends with .lmdb
_LMDB_SUFFIX_TYPES = ('PairedImageDataset', 'SingleImageDataset', 'RealESRGANPairedDataset')

# (option path, label) of the dataset being built, e.g. ('datasets.train', 'datasets.train (tiny_train)')
_BUILDING: contextvars.ContextVar[Optional[tuple[str, str]]] = contextvars.ContextVar('baryir_building', default=None)
_LOCAL = threading.local()  # the sample being read in this thread (see _Reading)
_BASE_BUILD: Optional[Callable] = None  # BasicSR's own build_dataset, set by patch()


# --------------------------------------------------------------------------------------------------
# naming
def current_where() -> Optional[str]:
    """The option path (``datasets.train``, ``datasets.train.sources[1]``) of the dataset being built."""
    building = _BUILDING.get()
    return building[0] if building else None


def dataset_label(opt: dict, kind: str, where: Optional[str] = None) -> str:
    """How messages name a dataset: its option path and name, or its class and name."""
    where = where or current_where()
    name = opt.get('name', 'unnamed') if isinstance(opt, dict) else 'unnamed'
    return f'{where} ({name})' if where else f'{kind} ({name})'


def _cwd_note() -> str:
    return f'relative paths are relative to {os.getcwd()}'


class ImageSource:
    """Where an image's bytes came from: a file path, or a key of an LMDB folder."""

    def __init__(self, path: str, client_key: str = 'default', lmdb: Optional[str] = None) -> None:
        self.path, self.client_key, self.lmdb = str(path), str(client_key), lmdb

    @property
    def kind(self) -> str:
        return {'gt': 'GT', 'lq': 'LQ'}.get(self.client_key, 'the')

    def __str__(self) -> str:
        return repr(self.path) if self.lmdb is None else f'key {self.path!r} of the LMDB {self.lmdb!r}'


class ImageBytes(bytes):
    """The bytes of an image file, with the :class:`ImageSource` they were read from (``.source``)."""

    source: Optional[ImageSource] = None


# --------------------------------------------------------------------------------------------------
# decoding
def image_problem(buf) -> Optional[str]:
    """Why encoded image bytes cannot be a whole image, from the bytes alone (no decoding), or None.

    Some decoders fill a truncated image with grey instead of failing, so a JPEG must end with its
    end-of-image marker after the last scan and a PNG must hold its IEND chunk.
    """
    if buf is None:
        return 'is missing'
    if len(buf) == 0:
        return 'is empty (0 bytes)'
    data = bytes(buf) if not isinstance(buf, bytes) else buf
    if data[:2] == JPEG_START and data.rfind(b'\xff\xd9') < data.rfind(b'\xff\xda'):
        return 'is a truncated JPEG (it ends before its end-of-image marker)'
    if data[:8] == PNG_SIGNATURE and b'IEND' not in data[-1024:]:
        return 'is a truncated PNG (it has no IEND chunk)'
    return None


def decode(buf, flag: int = cv2.IMREAD_COLOR) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(image, None), or (None, why the bytes are not an image)."""
    problem = image_problem(buf)
    if problem:
        return None, problem
    try:
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), flag)
    except cv2.error as err:
        return None, f'does not decode ({" ".join(str(err).split())})'
    if img is None:
        return None, 'does not decode as an image (corrupt, or not an image file)'
    return img, None


def inspect_image(buf) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    """(height, width) of encoded image bytes, or (None, why they are unreadable)."""
    img, problem = decode(buf)
    return (img.shape[:2], None) if img is not None else (None, problem)


def unreadable(source: Any, problem: str, who: str = '') -> DataError:
    """The DataError for an image that cannot be used."""
    if isinstance(source, ImageSource):
        what = f'{source.kind} image {source}'
    else:
        what = 'an image' if source is None else f'image {source!r}'
    prefix = f'{who}: ' if who else ''
    return DataError(f'{prefix}{what} {problem}; replace the file, or remove it (and its LQ/GT partner) from the '
                     'dataset.')


def decode_or_raise(buf, flag: int = cv2.IMREAD_COLOR, source: Any = None, who: str = '') -> np.ndarray:
    img, problem = decode(buf, flag)
    if img is None:
        source = source if source is not None else getattr(buf, 'source', None)
        raise unreadable(source, problem, who or _reading_label())
    return img


# --------------------------------------------------------------------------------------------------
# LMDB files
# A data.mdb is read through a memory map: a truncated file maps, and the first read of a page past its end
# kills the process with SIGBUS (no message at all); an empty one fails with 'Bad file descriptor'. So before
# an LMDB is first opened, its size is checked against its meta page, read with plain file I/O. The offsets
# are those of LMDB's MDB_page header and MDB_meta on 64-bit builds (pgno_t and size_t of 8 bytes).
_LMDB_MAGIC = 0xBEEFC0DE
_LMDB_P_META = 0x08
_LMDB_META_END = 152  # page header (16) + magic, version, address, mapsize (24) + 2 MDB_db (96) + last_pg, txnid
_LMDB_CHECKED: dict[tuple, Optional[str]] = {}  # (path, size, mtime, inode) -> problem


def _lmdb_meta(buf: bytes) -> Optional[tuple[int, int, int]]:
    """(page size, last page number, transaction id) of an LMDB meta page, or None when it is not one."""
    if len(buf) < _LMDB_META_END:
        return None
    (flags,) = struct.unpack_from('=H', buf, 10)
    (magic,) = struct.unpack_from('=I', buf, 16)
    if magic != _LMDB_MAGIC or not flags & _LMDB_P_META:
        return None
    (psize,) = struct.unpack_from('=I', buf, 40)  # mm_psize: md_pad of the free-page DB
    last, txnid = struct.unpack_from('=QQ', buf, 136)
    if psize < 512 or psize & (psize - 1):
        return None
    return psize, last, txnid


def _lmdb_file_problem(path: str, size: int) -> Optional[str]:
    if size == 0:
        return 'its data.mdb is empty (0 bytes)'
    if struct.calcsize('P') != 8:  # another layout of the meta page: lmdb itself will tell
        return None
    try:
        with open(path, 'rb') as f:
            first = _lmdb_meta(f.read(_LMDB_META_END))
            if first is None:
                return f'its data.mdb ({size} bytes) does not start with an LMDB meta page'
            f.seek(first[0])
            second = _lmdb_meta(f.read(_LMDB_META_END))
    except OSError as err:
        return f'its data.mdb cannot be read ({err.strerror or err})'
    psize, last, _ = max((m for m in (first, second) if m is not None), key=lambda m: m[2])  # the newest
    need = (last + 1) * psize
    if size < need:
        return (f'its data.mdb is {size} bytes, but its meta page says the data runs to page {last}, {need} bytes '
                f'of {psize}-byte pages')
    return None


def lmdb_problem(folder: str) -> Optional[str]:
    """Why the ``data.mdb`` of an LMDB folder cannot be read whole (empty, truncated, not an LMDB), or None;
    plain file I/O only, never a memory map. Results are cached per file version."""
    path = os.path.join(folder, 'data.mdb')
    try:
        st = os.stat(path)
    except OSError as err:
        return f'its data.mdb cannot be read ({err.strerror or err})'
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _LMDB_CHECKED:
        _LMDB_CHECKED[key] = _lmdb_file_problem(path, st.st_size)
    return _LMDB_CHECKED[key]


def broken_lmdb(folder: str, problem: str, who: str = '') -> DataError:
    prefix = f'{who}: ' if who else ''
    return DataError(f'{prefix}the LMDB {str(folder)!r} is truncated or corrupt ({problem}); rebuild it with '
                     'scripts/make_lmdb.py.')


def check_lmdb(folder: str, who: str = '') -> None:
    """Raises a DataError naming the ``.lmdb`` folder when its ``data.mdb`` is not a complete LMDB file."""
    problem = lmdb_problem(folder)
    if problem:
        raise broken_lmdb(folder, problem, who)


def _lmdb_errors() -> tuple:
    try:
        import lmdb
    except ImportError:  # pragma: no cover (a dependency of basicsr)
        return ()
    return (lmdb.Error,)


def _lmdb_named(err: BaseException, folders: list[str]) -> str:
    """The folder an lmdb.Error is about (py-lmdb names the path in its message), else all of them."""
    text = str(err)
    named = [f for f in folders if f in text]
    return named[0] if named else ', '.join(folders) or 'the LMDB'


class CheckedFileClient(FileClient):
    """BasicSR's FileClient whose ``get`` names what is missing (a file, or an LMDB key and its folder) and
    returns :class:`ImageBytes`, so that a decoding error can name the file too."""

    def __init__(self, backend: str = 'disk', **kwargs) -> None:
        self._lmdb_of: dict[str, str] = {}
        if backend == 'lmdb':
            keys = kwargs.get('client_keys', 'default')
            keys = [keys] if isinstance(keys, str) else list(keys)
            paths = kwargs.get('db_paths')
            paths = [paths] if isinstance(paths, str) else list(paths or [])
            self._lmdb_of = {str(k): str(p) for k, p in zip(keys, paths)}
            for path in paths:  # before the memory map: a truncated data.mdb would end in SIGBUS
                check_lmdb(str(path), _reading_label())
        try:
            super().__init__(backend, **kwargs)
        except _lmdb_errors() as err:
            folder = _lmdb_named(err, list(self._lmdb_of.values()))
            raise broken_lmdb(folder, f'it cannot be opened: {one_line(err)}', _reading_label()) from None

    def get(self, filepath, client_key: str = 'default', who: str = '') -> ImageBytes:
        lmdb = self._lmdb_of.get(client_key, 'the LMDB') if self.backend == 'lmdb' else None
        source = ImageSource(filepath, client_key, lmdb)
        who = who or _reading_label()
        prefix = f'{who}: ' if who else ''
        try:
            buf = super().get(filepath, client_key)
        except FileNotFoundError:
            raise DataError(f'{prefix}{source.kind} image {source} does not exist (it was listed when the dataset '
                            'was built: moved or deleted since?); restore it, or remove it (and its partner) from '
                            'the dataset.') from None
        except (IsADirectoryError, PermissionError) as err:
            raise DataError(f'{prefix}{source.kind} image {source} cannot be read ({err.strerror}); fix the file or '
                            'remove it from the dataset.') from None
        except UnicodeEncodeError:
            raise DataError(f'{prefix}{source.kind} image {source}: LMDB keys must be ASCII; rename the file and '
                            'rebuild the LMDB.') from None
        except _lmdb_errors() as err:
            raise broken_lmdb(lmdb or 'the LMDB', f'reading {source.kind} key {str(filepath)!r} failed: '
                              f'{one_line(err)}', who) from None
        if buf is None:
            raise DataError(f'{prefix}{source.kind} image {source} is listed in its meta_info.txt but not stored in '
                            'the LMDB; rebuild the LMDB (scripts/make_lmdb.py) or remove the line.')
        out = ImageBytes(buf)
        out.source = source
        return out


def imfrombytes(content, flag: str = 'color', float32: bool = False) -> np.ndarray:
    """BasicSR's ``imfrombytes`` that raises a DataError naming the file for bytes that are not an image,
    and records the decoded size for the pair and crop checks of the sample being read."""
    if flag not in _FLAGS:
        raise ValueError(f'imfrombytes: flag must be one of {list(_FLAGS)}, got {flag!r}')
    img = decode_or_raise(content, _FLAGS[flag])
    reading = getattr(_LOCAL, 'reading', None)
    source = getattr(content, 'source', None)
    if reading is not None and source is not None:
        reading.decoded(source, img.shape)
    if float32:
        img = img.astype(np.float32) / 255.
    return img


def read_image(file_client: CheckedFileClient, path: str, client_key: str, who: str = '') -> np.ndarray:
    """uint8 BGR (H, W, 3) image through a :class:`CheckedFileClient`; grey images are expanded to 3 channels.

    Raises:
        DataError: the file or LMDB key is absent, or its bytes are not a whole image (names it).
    """
    buf = file_client.get(path, client_key, who=who)
    return decode_or_raise(buf, cv2.IMREAD_COLOR, buf.source, who)


# --------------------------------------------------------------------------------------------------
# pairs and crops
def _wxh(shape) -> str:
    return f'{shape[1]}x{shape[0]}'


def check_pair(lq_shape, gt_shape, lq: Any, gt: Any, who: str, scale: int = 1, phase: str = 'train',
               on_remainder: Optional[Callable[[str], None]] = None) -> None:
    """The GT must be ``scale`` times the LQ (WxH in the message).

    Outside training, a GT at most ``scale - 1`` pixels larger than ``scale`` x LQ is what a mod-crop leaves
    in SR benchmarks; BasicSR crops it off, and ``on_remainder`` (if given) is told.
    """
    (lh, lw), (gh, gw) = lq_shape[:2], gt_shape[:2]
    if (gh, gw) == (lh * scale, lw * scale):
        return
    remainder = scale > 1 and lh * scale <= gh < (lh + 1) * scale and lw * scale <= gw < (lw + 1) * scale
    if remainder and phase != 'train':
        if on_remainder is not None:
            on_remainder(f'{who}: GT {gt} is {_wxh(gt_shape)}, {gw - lw * scale}x{gh - lh * scale} pixels more than '
                         f'{scale} x its LQ {lq} ({_wxh(lq_shape)}); BasicSR crops the GT to {lw * scale}x{lh * scale} '
                         '(reported once per dataset).')
        return
    need = 'the same size' if scale == 1 else f'{lw * scale}x{lh * scale} ({scale} x the LQ)'
    raise DataError(f'{who}: LQ {lq} is {_wxh(lq_shape)} but its GT {gt} is {_wxh(gt_shape)} (WxH); with scale {scale} '
                    f'the GT must be {need}. Fix or remove the pair.')


def check_crop(gt_shape, gt_size, path: Any, who: str) -> None:
    """The training crop of ``gt_size`` must fit in a GT (or clean) image of ``gt_shape``."""
    h, w = gt_shape[:2]
    if h < int(gt_size) or w < int(gt_size):
        raise DataError(f'{who}: gt_size {gt_size} is larger than {path} ({w}x{h}, WxH), so no training crop fits; '
                        f'lower gt_size to at most {min(h, w)}, or remove the image (and its partner).')


class _Reading:
    """The sample a BasicSR dataset is reading in this thread: the decoded size of each of its images."""

    def __init__(self, dataset, pair: bool) -> None:
        opt = getattr(dataset, 'opt', None)
        self.dataset = dataset
        self.opt = opt if isinstance(opt, dict) else {}
        self.label = dataset_label(self.opt, type(dataset).__name__, getattr(dataset, '_baryir_where', None))
        self.pair = pair
        self.seen: dict[str, tuple[ImageSource, tuple]] = {}

    def decoded(self, source: ImageSource, shape: tuple) -> None:
        self.seen[source.client_key] = (source, shape)
        if not (self.pair and 'gt' in self.seen and 'lq' in self.seen):
            return
        (gt, gt_shape), (lq, lq_shape) = self.seen.pop('gt'), self.seen.pop('lq')
        scale = int(self.opt.get('scale', 1) or 1)
        phase = self.opt.get('phase')
        check_pair(lq_shape, gt_shape, lq, gt, self.label, scale, phase, self._warn_once)
        if phase == 'train' and self.opt.get('gt_size'):
            check_crop(gt_shape, self.opt['gt_size'], gt, self.label)

    def _warn_once(self, message: str) -> None:
        if not getattr(self.dataset, '_baryir_warned_remainder', False):
            self.dataset._baryir_warned_remainder = True
            from basicsr.utils import get_root_logger
            get_root_logger().warning(message)


def _reading_label() -> str:
    reading = getattr(_LOCAL, 'reading', None)
    return reading.label if reading is not None else ''


def _with_reading(original: Callable, pair: bool) -> Callable:
    if getattr(original, '_baryir_checked', False):
        return original

    @functools.wraps(original)
    def __getitem__(self, index):
        previous = getattr(_LOCAL, 'reading', None)
        _LOCAL.reading = _Reading(self, pair)
        try:
            return original(self, index)
        finally:
            _LOCAL.reading = previous

    __getitem__._baryir_checked = True
    return __getitem__


# --------------------------------------------------------------------------------------------------
# path lists of BasicSR's paired datasets
def _where_or(keys: tuple[str, str]) -> str:
    building = _BUILDING.get()
    return building[1] if building else f'the {keys[0]}/{keys[1]} folders'


def paired_paths_from_folder(folders, keys, filename_tmpl):
    """BasicSR's ``paired_paths_from_folder`` (same pairs, same order) that names a file without its partner
    instead of failing an ``assert``."""
    from basicsr.utils import scandir

    (input_folder, gt_folder), (input_key, gt_key) = folders, keys
    input_names = list(scandir(input_folder))
    gt_names = list(scandir(gt_folder))
    inputs = set(input_names)
    paths, wanted, missing = [], set(), []
    for gt_name in gt_names:
        basename, ext = os.path.splitext(os.path.basename(gt_name))
        input_name = f'{filename_tmpl.format(basename)}{ext}'
        wanted.add(input_name)
        if input_name not in inputs:
            missing.append((gt_name, input_name))
            continue
        paths.append({f'{input_key}_path': os.path.join(input_folder, input_name),
                      f'{gt_key}_path': os.path.join(gt_folder, gt_name)})
    where = _where_or(keys)
    tmpl = f" (filename_tmpl {filename_tmpl!r})" if filename_tmpl != '{}' else ''
    if missing:
        gt_name, input_name = missing[0]
        raise DataError(f'{where}: {gt_key.upper()} {os.path.join(gt_folder, gt_name)!r} has no {input_key.upper()} '
                        f'partner: {os.path.join(input_folder, input_name)!r} does not exist{tmpl}; '
                        f'{len(missing)} of {len(gt_names)} {gt_key.upper()} files lack one. Add the missing files or '
                        'remove the unpaired ones.')
    extra = [n for n in input_names if n not in wanted]
    if extra:
        raise DataError(f'{where}: {input_key.upper()} {os.path.join(input_folder, extra[0])!r} has no '
                        f'{gt_key.upper()} partner in {gt_folder!r}{tmpl}; {len(extra)} of {len(input_names)} '
                        f'{input_key.upper()} files lack one. Add the missing files or remove the unpaired ones.')
    return paths


def _basicsr_lmdb_keys(folder: str) -> list[str]:
    """The keys BasicSR reads from an LMDB's meta_info.txt (the text before the first dot of each line), every
    line checked first (a malformed one is named with its number and the expected format)."""
    from .layout import meta_info_names

    return [name.split('.')[0] for name in meta_info_names(folder)]


def paired_paths_from_lmdb(folders, keys):
    """BasicSR's ``paired_paths_from_lmdb`` that names a key present in one LMDB and not the other."""
    (input_folder, gt_folder), (input_key, gt_key) = folders, keys
    where = _where_or(keys)
    for folder, key in ((input_folder, input_key), (gt_folder, gt_key)):
        if not str(folder).endswith('.lmdb'):
            raise DataError(f'{where}: dataroot_{key} {folder!r} is not an LMDB folder (its name must end with .lmdb '
                            'for io_backend: {type: lmdb}); point it at the .lmdb folder or use io_backend: '
                            '{type: disk}.')
        if not os.path.isfile(os.path.join(folder, 'meta_info.txt')):
            raise DataError(f'{where}: dataroot_{key} {folder!r} has no meta_info.txt (the list of its keys); rebuild '
                            'the LMDB with scripts/make_lmdb.py.')
    input_keys, gt_keys = _basicsr_lmdb_keys(input_folder), _basicsr_lmdb_keys(gt_folder)
    gt_set, input_set = set(gt_keys), set(input_keys)
    for mine, other, mine_key, other_key, mine_folder, other_folder in (
            (input_keys, gt_set, input_key, gt_key, input_folder, gt_folder),
            (gt_keys, input_set, gt_key, input_key, gt_folder, input_folder)):
        lonely = sorted({k for k in mine if k not in other})
        if lonely:
            raise DataError(f'{where}: key {lonely[0]!r} of the {mine_key.upper()} LMDB {mine_folder!r} has no partner '
                            f'in the {other_key.upper()} LMDB {other_folder!r} ({len(lonely)} such keys); rebuild both '
                            'LMDBs from paired folders.')
    return [{f'{input_key}_path': k, f'{gt_key}_path': k} for k in sorted(input_keys)]


def paired_paths_from_meta_info_file(folders, keys, meta_info_file, filename_tmpl):
    """BasicSR's ``paired_paths_from_meta_info_file`` that checks that every listed file exists."""
    from basicsr.data import data_util

    paths = data_util.paired_paths_from_meta_info_file(folders, keys, meta_info_file, filename_tmpl)
    where = _where_or(keys)
    for line, pair in enumerate(paths, 1):
        for key in keys[::-1]:
            path = pair[f'{key}_path']
            if not os.path.isfile(path):
                raise DataError(f'{where}: {key.upper()} {path!r} (line {line} of meta_info_file {meta_info_file!r}) '
                                'does not exist; add the file or remove its line.')
    return paths


# --------------------------------------------------------------------------------------------------
# the options of a dataset entry
# BasicSR's parse_options puts phase and scale into every entry; every dataset reads name and type
ENTRY_KEYS = ('name', 'type', 'phase', 'scale')
# read by BasicSR's build_dataloader and train pipeline (and the plugin's compat patches) from the entry
LOADER_KEYS = ('batch_size_per_gpu', 'num_worker_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode',
               'num_prefetch_queue', 'pin_memory', 'persistent_workers')
# put into the train entry by the compat patches (the run's seed, the resume position); ``metrics`` (the
# val.metrics of one set) is read by BaryIRModel
PIPELINE_KEYS = ('manual_seed', 'resume_epoch', 'resume_iter', 'metrics')
# loader options BasicSR reads for the train entry only (it evaluates one image at a time, in the main process)
_TRAIN_LOADER_KEYS = ('batch_size_per_gpu', 'num_worker_per_gpu', 'dataset_enlarge_ratio')
_VIDEO_KEYS = ('dataroot_gt', 'dataroot_lq', 'io_backend', 'meta_info_file', 'num_frame', 'gt_size', 'use_hflip',
               'use_rot', 'random_reverse')
_VIDEO_TEST_KEYS = ('dataroot_gt', 'dataroot_lq', 'io_backend', 'meta_info_file', 'num_frame', 'cache_data',
                    'padding')
_REALESRGAN_KERNEL_KEYS = tuple(f'{k}{s}' for s in ('', '2') for k in (
    'blur_kernel_size', 'kernel_list', 'kernel_prob', 'blur_sigma', 'betag_range', 'betap_range', 'sinc_prob'))
# the options each of BasicSR 1.4.2's datasets reads itself (besides ENTRY_KEYS)
BASICSR_DATASET_KEYS = {
    'PairedImageDataset': ('dataroot_gt', 'dataroot_lq', 'meta_info_file', 'io_backend', 'filename_tmpl', 'gt_size',
                           'use_hflip', 'use_rot', 'mean', 'std', 'color'),
    'SingleImageDataset': ('dataroot_lq', 'meta_info_file', 'io_backend', 'mean', 'std', 'color'),
    'RealESRGANPairedDataset': ('dataroot_gt', 'dataroot_lq', 'meta_info', 'io_backend', 'filename_tmpl', 'gt_size',
                                'use_hflip', 'use_rot', 'mean', 'std'),
    'RealESRGANDataset': ('dataroot_gt', 'meta_info', 'io_backend', 'use_hflip', 'use_rot', 'final_sinc_prob')
    + _REALESRGAN_KERNEL_KEYS,
    'FFHQDataset': ('dataroot_gt', 'io_backend', 'mean', 'std', 'use_hflip'),
    'REDSDataset': _VIDEO_KEYS + ('dataroot_flow', 'val_partition', 'interval_list'),
    'REDSRecurrentDataset': _VIDEO_KEYS + ('val_partition', 'test_mode', 'interval_list'),
    'Vimeo90KDataset': _VIDEO_KEYS,
    'Vimeo90KRecurrentDataset': _VIDEO_KEYS + ('flip_sequence',),
    'VideoTestDataset': _VIDEO_TEST_KEYS,
    'VideoRecurrentTestDataset': _VIDEO_TEST_KEYS,
    'VideoTestDUFDataset': _VIDEO_TEST_KEYS + ('use_duf_downsampling',),
    'VideoTestVimeo90KDataset': ('dataroot_gt', 'dataroot_lq', 'io_backend', 'meta_info_file', 'num_frame',
                                 'cache_data'),
}
# an unknown key is an error for these (and the plugin's datasets), a warning for BasicSR's other datasets
STRICT_BASICSR_TYPES = ('PairedImageDataset', 'SingleImageDataset')
_NEAR = 0.85  # how close a key of a dataset type without a key list must be to a loader option to be a typo of it


def _dataset_class(kind: Any) -> Optional[type]:
    from basicsr.utils.registry import DATASET_REGISTRY

    if not isinstance(kind, str):
        return None
    objects = dict(iter(DATASET_REGISTRY))
    return objects.get(kind, objects.get(f'{kind}_basicsr'))


def dataset_option_keys(kind: Any) -> tuple[Optional[tuple[str, ...]], bool]:
    """(the options a dataset type reads itself besides ENTRY_KEYS, or None when they are not known; whether an
    unknown key is an error). The plugin's datasets, and any dataset class, list theirs in ``option_keys``."""
    cls = _dataset_class(kind)
    if cls is None:
        return None, False
    own = getattr(cls, 'option_keys', None)
    if own is not None:
        return tuple(own), cls.__module__.startswith('baryir_plugin.')
    if cls.__module__.startswith('basicsr.'):
        return BASICSR_DATASET_KEYS.get(cls.__name__), cls.__name__ in STRICT_BASICSR_TYPES
    return None, False


def _other_types_keys() -> frozenset:
    """The options some dataset type reads (BasicSR's lists and those of the registered types)."""
    from basicsr.utils.registry import DATASET_REGISTRY

    keys = {k for listed in BASICSR_DATASET_KEYS.values() for k in listed}
    for _, cls in DATASET_REGISTRY:
        keys.update(getattr(cls, 'option_keys', None) or ())
    return frozenset(keys)


def _warn(message: str) -> None:
    from basicsr.utils import get_root_logger
    get_root_logger().warning(message)


def check_dataset_keys(opt: dict, where: str, own: tuple[str, ...] = (), source: bool = False) -> None:
    """Every key of a dataset entry is read by its type, BasicSR's pipeline or the plugin.

    A key close to a known one is an OptionError with the closest name; another unknown key is an OptionError
    for the plugin's datasets and BasicSR's PairedImageDataset/SingleImageDataset, a logged warning for other
    types with a key list. ``own``: keys the caller reads itself (an AllInOneDataset source's ``repeat``);
    ``source``: ``opt`` is a source of an AllInOneDataset, whose loader options belong to the entry.
    """
    kind = opt.get('type')
    keys, strict = dataset_option_keys(kind)
    entry_keys = () if source else LOADER_KEYS + PIPELINE_KEYS
    allowed = set(ENTRY_KEYS) | set(own) | set(entry_keys) | set(keys or ())
    for key in opt:
        if key in allowed:
            continue
        if source and key in LOADER_KEYS + PIPELINE_KEYS:
            entry = where.rsplit('.sources[', 1)[0]
            raise OptionError(f'{where}.{key}: {key} is an option of the AllInOneDataset entry ({entry}), not of '
                              f'one of its sources; move it to {entry}.')
        if keys is None:  # a type whose options are not known: only a near miss of a loader option is named
            close = difflib.get_close_matches(str(key), LOADER_KEYS, n=1, cutoff=_NEAR)
            if close and not source:
                raise OptionError(f'{where}.{key} is not an option BasicSR reads from a dataset entry (did you mean '
                                  f'{close[0]!r}?); fix its name.')
            continue
        owner = f'an AllInOneDataset source of type {kind}' if source else kind
        if key in _other_types_keys():  # e.g. dataroot_gt left over after a change of type
            message = (f'{where}.{key} is not read by {owner} (other dataset types read it; {kind} reads '
                       f'{", ".join(keys + tuple(own))})')
            if strict:
                raise OptionError(f'{message}; remove it, or use a type that reads it.')
            _warn(f'{message}; it has no effect.')
            continue
        hint = did_you_mean(key, sorted(allowed))
        if hint or strict:
            listing = '' if hint else f' ({kind} reads {", ".join(keys + tuple(own))})'
            raise OptionError(f'{where}.{key} is not an option of {owner}{hint}{listing}; fix its name or remove it.')
        _warn(f'{where}.{key} is not an option {owner} reads (it has no effect); check its name.')
    if not source and opt.get('phase') not in (None, 'train'):
        for key in _TRAIN_LOADER_KEYS:
            if key in opt:
                _warn(f'{where}.{key} has no effect: BasicSR reads it for datasets.train only (an evaluation set '
                      'is read one image at a time); remove it.')


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# options whose value BasicSR uses without a check: an integer of at least this, or a boolean
_INTEGER_OPTIONS = {'gt_size': (1, ' (the training crop, in GT pixels)'), 'batch_size_per_gpu': (1, ''),
                    'num_worker_per_gpu': (0, ''), 'dataset_enlarge_ratio': (1, ''), 'num_prefetch_queue': (1, '')}
_BOOLEAN_OPTIONS = ('use_hflip', 'use_rot', 'pin_memory', 'persistent_workers')
PREFETCH_MODES = (None, 'cpu', 'cuda')


def check_dataset_values(opt: dict, where: str) -> None:
    """Values BasicSR uses as they are (``gt_size: 32.5`` ends in a TypeError inside its crop): integers,
    booleans and ``prefetch_mode`` (a ``cuda`` one needs a CUDA GPU and ``pin_memory: true``)."""
    reads, _ = dataset_option_keys(opt.get('type'))
    # a dataset option is checked for the types known to read it as BasicSR's datasets do; loader options always
    checked = [k for k in (*_INTEGER_OPTIONS, *_BOOLEAN_OPTIONS) if k in LOADER_KEYS or k in (reads or ())]
    for key, (low, what) in _INTEGER_OPTIONS.items():
        value = opt.get(key)
        if key in checked and value is not None and not (_is_int(value) and value >= low):
            raise OptionError(f'{where}.{key} must be an integer >= {low}{what}, got {value!r}.')
    for key in _BOOLEAN_OPTIONS:
        value = opt.get(key)
        if key in checked and value is not None and not isinstance(value, bool):
            raise OptionError(f'{where}.{key} must be true or false, got {value!r}.')
    mode = opt.get('prefetch_mode')
    if mode not in PREFETCH_MODES:
        hint = did_you_mean(mode, ['cpu', 'cuda']) if isinstance(mode, str) else ''
        raise OptionError(f'{where}.prefetch_mode must be ~ (a plain loader), cpu (a loading thread) or cuda (batches '
                          f'copied to the GPU ahead), got {mode!r}{hint}.')
    if mode == 'cuda' and opt.get('phase') == 'train':
        import torch
        if not torch.cuda.is_available():
            raise SetupError(f'{where}.prefetch_mode: cuda needs a CUDA GPU, and this machine has none that torch can '
                             'use; set prefetch_mode: cpu or ~.')
        if opt.get('pin_memory') is not True:
            raise OptionError(f'{where}.prefetch_mode: cuda needs pin_memory: true in {where} (BasicSR refuses to '
                              'prefetch to the GPU without it); add it, or set prefetch_mode: cpu or ~.')


def check_lmdb_folder(path: str, where: str) -> None:
    """An LMDB folder a dataset reads: its meta_info.txt well formed, its data.mdb complete."""
    from .layout import meta_info_names

    try:
        meta_info_names(path)
    except DataError as err:
        raise DataError(f'{where}: {err}') from None
    check_lmdb(path, where)


def check_unique_names(run_opt: dict) -> None:
    """Two evaluation entries of one option file with one ``name``: ``basicsr test`` writes both sets' images to
    ``visualization/<name>/`` (the second overwrites the first), and both report (and track) metrics under it."""
    datasets = run_opt.get('datasets')
    if not isinstance(datasets, dict):
        return
    seen: dict[Any, str] = {}
    for key, entry in datasets.items():
        if not isinstance(entry, dict) or (entry.get('phase') or str(key).split('_')[0]) == 'train':
            continue
        name = entry.get('name')
        if name not in seen:
            seen[name] = key
            continue
        if run_opt.get('is_train'):
            why = ('validation logs each set\'s metrics and keeps its best values under its name, so the two sets '
                   'would be mixed up')
        else:
            why = ('basicsr test writes each set\'s restored images to results/<run>/visualization/<name>/ and reports '
                   'its metrics under the name, so the second set would overwrite the first')
        raise OptionError(f'datasets.{seen[name]} and datasets.{key} are both named {name!r}: {why}. Give each entry '
                          f'a name of its own (e.g. name: {name}_2 in datasets.{key}).')


def check_entry_metrics(opt: dict, where: str, run_opt: Optional[dict]) -> None:
    """A dataset entry's ``metrics`` list is read by BaryIRModel only; BasicSR's models would ignore it."""
    if 'metrics' not in opt or not isinstance(run_opt, dict):
        return
    from basicsr.utils.registry import MODEL_REGISTRY
    model_type = run_opt.get('model_type')
    try:
        model = MODEL_REGISTRY.get(model_type)
    except KeyError:  # an unknown model type is named by the option checks
        return
    if not hasattr(model, '_dataset_metrics'):
        raise OptionError(f'{where}.metrics: model_type {model_type} computes every val.metrics on every set and '
                          'ignores a dataset\'s own metrics list (BaryIRModel reads it); remove it, or use '
                          'model_type: BaryIRModel.')


# --------------------------------------------------------------------------------------------------
# building datasets and loaders
def _entry_of_callers(dataset_opt: dict) -> tuple[str, Optional[dict]]:
    """(``datasets.<key>``, the run's options) for a dataset entry, found in the option dict of the caller that
    builds it (BasicSR's pipelines hand build_dataset the entry only); else (``datasets.<phase>``, None)."""
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            break
        local = frame.f_locals
        owner = local.get('self')
        for candidate in (local.get('opt'), getattr(owner, 'opt', None) if owner is not None else None):
            datasets = candidate.get('datasets') if isinstance(candidate, dict) else None
            if isinstance(datasets, dict):
                for key, entry in datasets.items():
                    if entry is dataset_opt:
                        return f'datasets.{key}', candidate
    phase = dataset_opt.get('phase')
    return (f'datasets.{phase}' if phase else f'dataset {dataset_opt.get("name", "unnamed")!r}'), None


def check_metrics_have_gt(dataset_opt: dict, where: str, run_opt: Optional[dict]) -> None:
    """An LQ-only set (SingleImageDataset) cannot be scored: BasicSR would call the metrics without a GT."""
    if dataset_opt.get('type') != 'SingleImageDataset' or not isinstance(run_opt, dict):
        return
    from basicsr.utils.registry import MODEL_REGISTRY
    try:
        if getattr(MODEL_REGISTRY.get(run_opt.get('model_type')), 'validates_without_gt', False):
            return
    except KeyError:  # an unknown model type is named by the option checks
        return
    val = run_opt.get('val')
    if isinstance(val, dict) and val.get('metrics'):
        raise OptionError(f'{where} is a SingleImageDataset (LQ images only, no GT), but val.metrics asks for '
                          f'{", ".join(map(str, val["metrics"]))} against a GT; remove val.metrics, or read the set '
                          'with PairedImageDataset and a dataroot_gt.')


def _is_lmdb(path: str) -> bool:
    return os.path.isfile(os.path.join(path, 'data.mdb'))


def check_dataset_options(opt: dict, where: str) -> None:
    """Before a dataset is built: its type is registered, its keys are known and their values of the right kind,
    the options BasicSR's own types need are there, and ``dataroot_gt``/``dataroot_lq``/``meta_info_file`` exist
    (folders, or whole LMDBs, as ``io_backend`` says)."""
    from basicsr.utils.registry import DATASET_REGISTRY

    kind = opt.get('type')
    if kind is None:
        raise OptionError(f'{where}.type is missing; name a dataset class, e.g. type: PairedImageDataset.')
    known = list(DATASET_REGISTRY.keys())
    if kind not in DATASET_REGISTRY and f'{kind}_basicsr' not in DATASET_REGISTRY:
        raise OptionError(f'{where}.type: no dataset type {kind!r}{did_you_mean(kind, known)}; the registered types '
                          f'are {sorted(known)}.')
    check_dataset_keys(opt, where)
    check_dataset_values(opt, where)
    required = _REQUIRED.get(kind, ()) + (_TRAIN_KEYS.get(kind, ()) if opt.get('phase') == 'train' else ())
    for key in required:
        if opt.get(key) is None:
            raise OptionError(f'{where}.{key} is missing; {kind} needs it.')
    backend = opt.get('io_backend')
    if backend is not None and not (isinstance(backend, dict) and backend.get('type')):
        raise OptionError(f'{where}.io_backend must be a mapping with a type, e.g. io_backend: {{type: disk}}, got '
                          f'{backend!r}.')
    lmdb = isinstance(backend, dict) and backend.get('type') == 'lmdb'
    for key in ('dataroot_gt', 'dataroot_lq'):
        if opt.get(key) is None:
            continue
        path = os.path.expanduser(str(opt[key]))
        if not os.path.exists(path):
            what = 'LMDB folder' if lmdb else 'folder'
            raise DataError(f'{where}.{key}: {what} {path!r} does not exist ({_cwd_note()}); fix the path.')
        if not os.path.isdir(path):
            raise DataError(f'{where}.{key}: {path!r} is a file, not a folder of images; fix the path.')
        if lmdb and not _is_lmdb(path):
            raise DataError(f'{where}.{key}: {path!r} is not an LMDB (no data.mdb in it); point it at an .lmdb folder '
                            '(scripts/make_lmdb.py writes them), or read the folder with io_backend: {type: disk}.')
        if lmdb and not os.path.isfile(os.path.join(path, 'meta_info.txt')):
            raise DataError(f'{where}.{key}: the LMDB {path!r} has no meta_info.txt (the list of its keys); rebuild it '
                            'with scripts/make_lmdb.py.')
        if lmdb and kind in _LMDB_SUFFIX_TYPES and not path.endswith('.lmdb'):
            raise DataError(f'{where}.{key}: {kind} reads an LMDB only from a folder whose name ends with .lmdb; '
                            f'rename {path!r}.')
        if lmdb:
            check_lmdb_folder(path, f'{where}.{key}')
        if not lmdb and _is_lmdb(path):
            raise DataError(f'{where}.{key}: {path!r} is an LMDB; set io_backend: {{type: lmdb}} in {where}, or point '
                            f'{key} at the folder of images.')
    meta = opt.get('meta_info_file')
    if kind == 'SingleImageDataset' and 'meta_info_file' in opt and meta is None and not lmdb:
        raise OptionError(f'{where}.meta_info_file is empty; SingleImageDataset opens it whenever the option is '
                          'there: give a file or remove the option.')
    if meta is not None and not lmdb and not os.path.isfile(os.path.expanduser(str(meta))):
        raise DataError(f'{where}.meta_info_file: {str(meta)!r} does not exist ({_cwd_note()}); fix the path, or '
                        'remove the option to list the folders instead.')


def check_not_empty(dataset, opt: dict, where: str) -> None:
    """A built dataset with no sample is an error: a test would report 0 images, training would not train."""
    try:
        size = len(dataset)
    except TypeError:  # an IterableDataset has no length
        return
    if size:
        return
    name = opt.get('name', 'unnamed')
    if opt.get('meta_info_file') is not None:
        raise DataError(f'{where} ({name}): meta_info_file {str(opt["meta_info_file"])!r} lists no images; fill it '
                        'or remove the option.')
    folders = [repr(str(opt[k])) for k in ('dataroot_lq', 'dataroot_gt') if opt.get(k) is not None]
    where_images = ' and '.join(folders) if folders else 'its folders'
    raise DataError(f'{where} ({name}): the dataset is empty, no images in {where_images}; put the images there or '
                    f'point {where}.dataroot_* at the folders that hold them.')


def build_checked(dataset_opt: dict, where: Optional[str] = None, build: Optional[Callable] = None):
    """``build_dataset`` with the checks above; ``where`` names the entry in messages (found from the caller's
    options when None). Datasets built meanwhile (sources of an AllInOneDataset) see it as
    :func:`current_where`."""
    if build is None:
        import basicsr.data
        build = _BASE_BUILD or basicsr.data.build_dataset
    if not isinstance(dataset_opt, dict):
        raise OptionError(f'{where or "datasets"}: a dataset entry must be a mapping of options, got {dataset_opt!r}.')
    run_opt = None
    if where is None:
        where, run_opt = _entry_of_callers(dataset_opt)
    if run_opt is not None:
        check_unique_names(run_opt)
    check_dataset_options(dataset_opt, where)
    check_entry_metrics(dataset_opt, where, run_opt)
    check_metrics_have_gt(dataset_opt, where, run_opt)
    token = _BUILDING.set((where, dataset_label(dataset_opt, str(dataset_opt.get('type')), where)))
    try:
        dataset = build(dataset_opt)
    finally:
        _BUILDING.reset(token)
    try:
        dataset._baryir_where = where  # read back in loader workers, which get a copy of the dataset
    except AttributeError:
        pass
    check_not_empty(dataset, dataset_opt, where)
    return dataset


def check_batch(dataset, dataset_opt: dict, num_gpu: int = 1, dist: bool = False, sampler=None) -> None:
    """A training batch must fit in the samples of one process: BasicSR's loader drops the last partial
    batch, so a larger batch trains zero iterations (and saves the untrained network)."""
    if dataset_opt.get('phase') != 'train':
        return
    for key in ('batch_size_per_gpu', 'num_worker_per_gpu'):
        value = dataset_opt.get(key)
        low = 1 if key == 'batch_size_per_gpu' else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(f'datasets.train.{key} must be an integer >= {low}, got {value!r}.')
    try:
        size = len(dataset)
    except TypeError:
        return
    ratio = dataset_opt.get('dataset_enlarge_ratio', 1)
    world = int(getattr(sampler, 'num_replicas', 1) or 1)
    per_rank = getattr(sampler, 'num_samples', None)
    if per_rank is None:
        per_rank = size
    per_gpu = dataset_opt['batch_size_per_gpu']
    multiplier = 1 if dist or not num_gpu else int(num_gpu)
    batch = per_gpu * multiplier
    if batch <= per_rank:
        return
    gpus = f' x {multiplier} GPUs' if multiplier > 1 else ''
    most = per_rank // multiplier
    fix = f'lower it to at most {most}, raise' if most >= 1 else 'raise'
    raise DataError(f'datasets.train.batch_size_per_gpu: a batch of {per_gpu}{gpus} is larger than the {per_rank} '
                    f'training sample(s) per process ({size} x dataset_enlarge_ratio {ratio} / {world} process(es)); '
                    f'the loader drops partial batches, so nothing would be trained. {fix[0].upper()}{fix[1:]} '
                    'dataset_enlarge_ratio, or add images.')


def _wrap_train_loaders(original: Callable) -> Callable:
    """BasicSR counts ``ceil(samples / batch)`` iterations per epoch but its loader drops the last partial
    batch, so a run whose batch does not divide the samples ends before ``train.total_iter`` (and says "End of
    training"); the number of epochs is recomputed from the loader's true length."""
    if getattr(original, '_baryir_checked', False):
        return original

    @functools.wraps(original)
    def create_train_val_dataloader(opt, logger):
        train_loader, train_sampler, val_loaders, total_epochs, total_iters = original(opt, logger)
        per_epoch = len(train_loader) if train_loader is not None else 0
        if per_epoch and math.ceil(total_iters / per_epoch) > total_epochs:
            total_epochs = math.ceil(total_iters / per_epoch)
            logger.info(f'The loader drops partial batches: {per_epoch} iteration(s) per epoch, so {total_iters} '
                        f'iterations take {total_epochs} epoch(s).')
        return train_loader, train_sampler, val_loaders, total_epochs, total_iters

    create_train_val_dataloader._baryir_checked = True
    return create_train_val_dataloader


def _wrapped_once(original: Callable, wrapper: Callable) -> Callable:
    """``wrapper`` (which calls ``original``) with ``original``'s name, unless ``original`` is already ours."""
    if getattr(original, '_baryir_checked', False):
        return original
    wrapped = functools.wraps(original)(wrapper)
    wrapped._baryir_checked = True
    return wrapped


def _wrap_build(original: Callable) -> Callable:
    return _wrapped_once(original, lambda dataset_opt: build_checked(dataset_opt, build=original))


def _wrap_loader(original: Callable) -> Callable:
    def build_dataloader(dataset, dataset_opt, num_gpu=1, dist=False, sampler=None, seed=None):
        check_batch(dataset, dataset_opt, num_gpu, dist, sampler)
        return original(dataset, dataset_opt, num_gpu=num_gpu, dist=dist, sampler=sampler, seed=seed)

    return _wrapped_once(original, build_dataloader)


# --------------------------------------------------------------------------------------------------
# metrics of BasicSR's own models
# BasicSR's models that sum ``calculate_metric`` over the images of a set (bound by ``from basicsr.metrics import
# calculate_metric``); a NaN of one image makes the set's mean NaN without a word
METRIC_MODULES = ('sr_model', 'video_base_model', 'video_recurrent_model')
_METRIC_ERRORS = (ValueError, ArithmeticError, AssertionError, IndexError, cv2.error)


def _metric_context(frame) -> tuple[str, str, str]:
    """(the set's label, the metric's val.metrics name, the image) from the validation loop calling the metric."""
    local = frame.f_locals if frame is not None else {}
    dataset = getattr(local.get('dataloader'), 'dataset', None)
    opt = getattr(dataset, 'opt', None)
    label = dataset_label(opt, type(dataset).__name__, getattr(dataset, '_baryir_where', None)) \
        if isinstance(opt, dict) else 'the evaluation set'
    name = local.get('name')
    image = None
    batch = local.get('val_data')
    if isinstance(batch, dict):
        path = batch.get('lq_path')
        image = path[0] if isinstance(path, (list, tuple)) and path else path
    image = image or local.get('img_name') or local.get('lq_path')
    return label, str(name) if name is not None else '', repr(str(image)) if image is not None else 'an image'


def _too_small(data: dict, metric_opt: dict) -> str:
    """Why an image is too small for a metric (the sizes BaryIRModel's validation knows), or ''."""
    try:
        from ..models.validation import MIN_SIDE
    except ImportError:  # pragma: no cover
        return ''
    need = MIN_SIDE.get(metric_opt.get('type'))
    img = data.get('img')
    if need is None or not hasattr(img, 'shape'):
        return ''
    crop = metric_opt.get('crop_border') or 0
    crop = crop if _is_int(crop) and crop > 0 else 0
    if min(img.shape[:2]) - 2 * crop >= need[0]:
        return ''
    after = f' after crop_border {crop}' if crop else ''
    return f': {metric_opt.get("type")} needs at least {need[0]}x{need[0]} pixels ({need[1]}){after}'


def _metric_error(data: dict, metric_opt: dict, frame, value: Optional[float],
                  error: Optional[BaseException]) -> DataError:
    label, name, image = _metric_context(frame)
    metric = name or str(metric_opt.get('type'))
    img = data.get('img')
    size = f' ({img.shape[1]}x{img.shape[0]}, WxH)' if hasattr(img, 'shape') and len(img.shape) >= 2 else ''
    if error is not None:
        why = f'cannot be computed ({type(error).__name__}: {one_line(error)}){_too_small(data, metric_opt)}'
    elif value == math.inf and str(metric_opt.get('type')).startswith('calculate_psnr'):
        why = 'is inf: the restored image equals its GT'
    else:
        why = f'is {value}{_too_small(data, metric_opt)}'
    return DataError(f'{label}: {metric} of image {image}{size} {why}; use model_type: BaryIRModel, which reports it '
                     f'unavailable for that image, or drop {metric} for this set (val.metrics.{metric}).')


def _checked_metric(original: Callable) -> Callable:
    """``calculate_metric`` whose value for one image must be a finite number: a NaN or inf (SSIM of an image
    smaller than its window, ...) or a metric that fails on an image is a DataError naming the image."""
    def calculate_metric(data, opt):
        frame = sys._getframe(1)
        try:
            with warnings.catch_warnings():  # e.g. numpy's 'Mean of empty slice': the error below says it
                warnings.simplefilter('ignore', RuntimeWarning)
                value = original(data, opt)
        except BaryIRError:
            raise
        except _METRIC_ERRORS as err:
            raise _metric_error(data, opt, frame, None, err) from err
        try:
            number = float(value)
        except Exception:  # noqa: BLE001 (not one number, e.g. a tensor of a batch: BasicSR's business)
            return value
        if not math.isfinite(number):
            raise _metric_error(data, opt, frame, number, None)
        return value

    return _wrapped_once(original, calculate_metric)


# --------------------------------------------------------------------------------------------------
# prefetch_mode: cpu
class _LoadFailed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _prefetch_run(self) -> None:
    try:
        for item in self.generator:
            self.queue.put(item)
    except Exception as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
        self.queue.put(_LoadFailed(exc))
        return
    self.queue.put(None)


def _prefetch_next(self):
    item = self.queue.get()
    if item is None:
        raise StopIteration
    if isinstance(item, _LoadFailed):
        self.queue.put(item)  # every later call fails the same way
        raise item.exc
    return item


# --------------------------------------------------------------------------------------------------
def patch() -> None:
    """Install the checks into BasicSR (idempotent); see the module docstring."""
    global _BASE_BUILD
    import basicsr.data
    import basicsr.data.prefetch_dataloader as prefetch
    import basicsr.test
    import basicsr.train

    if _BASE_BUILD is None:
        _BASE_BUILD = basicsr.data.build_dataset
    for module in (basicsr.data, basicsr.train, basicsr.test):
        module.build_dataset = _wrap_build(module.build_dataset)
        module.build_dataloader = _wrap_loader(module.build_dataloader)
    basicsr.train.create_train_val_dataloader = _wrap_train_loaders(basicsr.train.create_train_val_dataloader)
    for name in READER_MODULES:
        module = importlib.import_module(f'basicsr.data.{name}')
        module.FileClient = CheckedFileClient
        module.imfrombytes = imfrombytes
    for name in PAIRED_MODULES:
        module = importlib.import_module(f'basicsr.data.{name}')
        module.paired_paths_from_folder = paired_paths_from_folder
        module.paired_paths_from_lmdb = paired_paths_from_lmdb
        if hasattr(module, 'paired_paths_from_meta_info_file'):
            module.paired_paths_from_meta_info_file = paired_paths_from_meta_info_file
    from basicsr.data.paired_image_dataset import PairedImageDataset
    from basicsr.data.realesrgan_paired_dataset import RealESRGANPairedDataset
    from basicsr.data.single_image_dataset import SingleImageDataset

    for cls, pair in ((PairedImageDataset, True), (RealESRGANPairedDataset, True), (SingleImageDataset, False)):
        cls.__getitem__ = _with_reading(cls.__getitem__, pair)
    prefetch.PrefetchGenerator.run = _prefetch_run
    prefetch.PrefetchGenerator.__next__ = _prefetch_next
    for name in METRIC_MODULES:  # not basicsr.metrics itself: BaryIRModel's validation reports such values
        module = importlib.import_module(f'basicsr.models.{name}')
        module.calculate_metric = _checked_metric(module.calculate_metric)


# --------------------------------------------------------------------------------------------------
# the dataset tools' command lines
class ToolParser(argparse.ArgumentParser):
    """argparse for the dataset tools: a bad flag is one UsageError line (exit status 2) behind
    ``errors.guarded_main``, not argparse's usage block."""

    def error(self, message: str):
        raise UsageError(f'{message} (see {self.prog} --help)')


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < low:
        raise argparse.ArgumentTypeError(f'must be at least {low}, got {value}')
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)
