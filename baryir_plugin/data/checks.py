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
  ``basicsr.test``: ``dataroot_*`` and ``meta_info_file`` must exist (checked before building, from file
  lists only), a built dataset must not be empty, and a training batch must fit in the samples of one
  process. ``basicsr.train.create_train_val_dataloader``: the number of epochs counts the partial batches
  the loader drops, so training runs ``train.total_iter`` iterations (BasicSR's count can stop short).
- ``PrefetchGenerator`` (``prefetch_mode: cpu``): an error in its loading thread reaches the training loop
  instead of leaving it waiting forever.

The plugin's own datasets call the same functions (:func:`read_image`, :func:`check_pair`,
:func:`check_crop`, :func:`build_checked`). Messages are one line, so that they survive PyTorch's re-raise
of an exception from a DataLoader worker (``errors.one_line`` takes the last line of the worker's
traceback).
"""
from __future__ import annotations

import argparse
import contextvars
import functools
import importlib
import math
import os
import sys
import threading
from typing import Any, Callable, Optional

import cv2
import numpy as np
from basicsr.utils import FileClient

from ..errors import DataError, OptionError, UsageError, did_you_mean

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


class CheckedFileClient(FileClient):
    """BasicSR's FileClient whose ``get`` names what is missing (a file, or an LMDB key and its folder) and
    returns :class:`ImageBytes`, so that a decoding error can name the file too."""

    def __init__(self, backend: str = 'disk', **kwargs) -> None:
        super().__init__(backend, **kwargs)
        self._lmdb_of: dict[str, str] = {}
        if backend == 'lmdb':
            keys = kwargs.get('client_keys', 'default')
            keys = [keys] if isinstance(keys, str) else list(keys)
            paths = kwargs.get('db_paths')
            paths = [paths] if isinstance(paths, str) else list(paths or [])
            self._lmdb_of = {str(k): str(p) for k, p in zip(keys, paths)}

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
    with open(os.path.join(folder, 'meta_info.txt')) as fin:
        return [line.split('.')[0] for line in fin]


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
    """Before a dataset is built: its type is registered, the options BasicSR's own types need are there,
    and ``dataroot_gt``/``dataroot_lq``/``meta_info_file`` exist (folders or LMDBs as ``io_backend`` says)."""
    from basicsr.utils.registry import DATASET_REGISTRY

    kind = opt.get('type')
    if kind is None:
        raise OptionError(f'{where}.type is missing; name a dataset class, e.g. type: PairedImageDataset.')
    known = list(DATASET_REGISTRY.keys())
    if kind not in DATASET_REGISTRY and f'{kind}_basicsr' not in DATASET_REGISTRY:
        raise OptionError(f'{where}.type: no dataset type {kind!r}{did_you_mean(kind, known)}; the registered types '
                          f'are {sorted(known)}.')
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
    check_dataset_options(dataset_opt, where)
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


def _wrap_build(original: Callable) -> Callable:
    if getattr(original, '_baryir_checked', False):
        return original

    @functools.wraps(original)
    def build_dataset(dataset_opt):
        return build_checked(dataset_opt, build=original)

    build_dataset._baryir_checked = True
    return build_dataset


def _wrap_loader(original: Callable) -> Callable:
    if getattr(original, '_baryir_checked', False):
        return original

    @functools.wraps(original)
    def build_dataloader(dataset, dataset_opt, num_gpu=1, dist=False, sampler=None, seed=None):
        check_batch(dataset, dataset_opt, num_gpu, dist, sampler)
        return original(dataset, dataset_opt, num_gpu=num_gpu, dist=dist, sampler=sampler, seed=seed)

    build_dataloader._baryir_checked = True
    return build_dataloader


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


# --------------------------------------------------------------------------------------------------
# the dataset tools' command lines
class ToolParser(argparse.ArgumentParser):
    """argparse for the dataset tools: a bad flag is one UsageError line (exit status 2) behind
    ``errors.guarded_main``, not argparse's usage block."""

    def error(self, message: str):
        raise UsageError(f'{message} (see {self.prog} --help)')


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be at least 0, got {value}')
    return value
