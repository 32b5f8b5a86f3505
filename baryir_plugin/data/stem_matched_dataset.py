"""Paired LQ/GT images whose names differ by a rule (Rain100L's rain-/norain-, RESIDE's many hazy per clear)."""
from __future__ import annotations

import os

import numpy as np
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import bgr2ycbcr, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data
from torchvision.transforms.functional import normalize

from ..errors import DataError, OptionError
from . import checks
from .checks import CheckedFileClient
from .layout import compile_rule, gt_stem, list_images, lmdb_keys, stem
from .seeding import SeededDraws


def open_file_client(io_backend_opt: dict) -> CheckedFileClient:
    """A BasicSR FileClient from ``io_backend`` options that names a missing file or LMDB key; datasets open
    it lazily, in each loader worker."""
    opt = dict(io_backend_opt)
    return CheckedFileClient(opt.pop('type'), **opt)


def read_image(file_client: CheckedFileClient, path: str, client_key: str, who: str = '') -> np.ndarray:
    """uint8 BGR (H, W, 3) image from a file client; grey images are expanded to 3 channels.

    Raises:
        DataError: the file / LMDB key is absent or is not a whole image (names it and says what to do).
    """
    return checks.read_image(file_client, path, client_key, who)


def clean_image_paths(root: str, io_backend_opt: dict, who: str) -> list[str]:
    """Sorted paths (disk) or keys (LMDB) of a folder / BasicSR LMDB of clean images, for datasets that make
    their LQ image on the fly. For LMDB, ``io_backend_opt`` (the dataset's own copy) gets ``db_paths`` and
    ``client_keys`` (``'gt'``).

    Raises:
        DataError: not a folder (disk) or not a BasicSR LMDB, or no images there.
    """
    if io_backend_opt.get('type') == 'lmdb':
        io_backend_opt['db_paths'] = [root]
        io_backend_opt['client_keys'] = ['gt']
        try:
            paths = sorted(lmdb_keys(root))
        except FileNotFoundError as err:
            raise DataError(f'{who}: dataroot_gt: {err}') from None
    else:
        if not os.path.isdir(root):
            raise DataError(f'{who}: dataroot_gt {root!r} is not a folder (for an LMDB set '
                            'io_backend: {type: lmdb}).')
        paths = [os.path.join(root, n) for n in list_images(root)]
    if not paths:
        raise DataError(f'{who}: the dataset is empty, no images in {root!r}; put the images there or fix '
                        'dataroot_gt.')
    return paths


def read_clean_view(file_client: CheckedFileClient, path: str, opt: dict, who: str = '') -> np.ndarray:
    """A clean uint8 BGR image as a dataset with ``opt`` sees it: in the train phase a random crop of
    ``gt_size`` with dihedral augmentation (``use_hflip``/``use_rot``, default true), else the whole image."""
    img = read_image(file_client, path, 'gt', who)
    if opt.get('phase') == 'train':
        lmdb = (opt.get('io_backend') or {}).get('type') == 'lmdb'
        shown = f'key {path!r} of the LMDB {str(opt.get("dataroot_gt"))!r}' if lmdb else repr(path)
        checks.check_crop(img.shape, opt['gt_size'], shown, who)
        img, _ = paired_random_crop(img, img, opt['gt_size'], 1, path)
        img = np.ascontiguousarray(augment(img, opt.get('use_hflip', True), opt.get('use_rot', True)))
    return img


@DATASET_REGISTRY.register()
class StemMatchedPairedDataset(SeededDraws, data.Dataset):
    """LQ/GT pairs matched by a regular-expression rule on file stems, from folders or BasicSR LMDBs.

    BasicSR's PairedImageDataset needs the same name on both sides (up to ``filename_tmpl``); the real
    sets do not: Rain100L pairs ``rain-12.png`` with ``norain-12.png`` and RESIDE OTS has many hazy
    ``0025_0.8_0.1.jpg`` per clear ``0025.jpg``. Every LQ file is one sample; its GT is the file whose
    stem is ``re.sub(PATTERN, REPLACEMENT, lq_stem)``. The extension may differ.

    Options (YAML):
        dataroot_lq: LQ folder, or ``.lmdb`` with ``io_backend: {type: lmdb}``.
        dataroot_gt: GT folder, or ``.lmdb``.
        lq_to_gt: ``[PATTERN, REPLACEMENT]`` for ``re.sub`` on the LQ stem (default: none, same stem),
            e.g. ``['^rain-', 'norain-']``, ``['^([^_]+)_.*$', '\\1']``; rules of the standard sets are in
            baryir_plugin/data/layout.py.
        io_backend: BasicSR FileClient options, ``{type: disk}`` (default) or ``{type: lmdb}``. LMDB keys
            are the stems, read from each LMDB's meta_info.txt (dots inside stems are kept).
        phase: 'train' -> aligned random crop of ``gt_size`` and dihedral augmentation; otherwise the
            whole images (which must have the same size).
        gt_size: training crop size (required when phase is train).
        use_hflip, use_rot: augmentation as in BasicSR (both true: all 8 dihedral transforms). Default true.
        mean, std: optional per-channel normalisation (torchvision ``normalize``) of both images.
        color: 'y' for the Y channel only (as PairedImageDataset).
        scale: must be 1 or absent (restoration, not super-resolution).
        filename_tmpl: accepted only as '{}' (AllInOneDataset may pass it); use ``lq_to_gt`` instead.
        manual_seed: the run's seed; as the train set itself, each crop and flip comes from (seed, epoch,
            slot) of the plugin's sampler (see AllInOneDataset).

    Returns dicts with ``lq``, ``gt`` (RGB CHW float tensors in [0, 1]), ``lq_path`` and ``gt_path``
    (file paths, or LMDB keys).
    """

    # the options it reads besides name, type, phase and scale (an unknown one is an error when it is built)
    option_keys = ('dataroot_lq', 'dataroot_gt', 'lq_to_gt', 'io_backend', 'gt_size', 'use_hflip', 'use_rot', 'mean',
                   'std', 'color', 'filename_tmpl', 'manual_seed')

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        self.who = checks.dataset_label(opt, 'StemMatchedPairedDataset')
        for key in ('dataroot_lq', 'dataroot_gt'):
            if not opt.get(key):
                raise OptionError(f'{self.who}: option {key!r} is required.')
        if opt.get('scale', 1) != 1:
            raise OptionError(f'{self.who}: scale must be 1 (restoration keeps the size), got {opt["scale"]!r}.')
        if opt.get('filename_tmpl', '{}') != '{}':
            raise OptionError(f'{self.who}: filename_tmpl {opt["filename_tmpl"]!r} is not supported; express the '
                              'name mapping as lq_to_gt: [PATTERN, REPLACEMENT].')
        if opt.get('phase') == 'train' and not opt.get('gt_size'):
            raise OptionError(f'{self.who}: option gt_size (training crop size) is required in the train phase.')
        self.rule_opt = opt.get('lq_to_gt')
        try:
            self.rule = compile_rule(self.rule_opt, f'{self.who}: lq_to_gt')
        except ValueError as err:
            raise OptionError(str(err)) from None
        self.mean = opt.get('mean')
        self.std = opt.get('std')
        self._read_seed(opt, self.who)
        # Copy: AllInOneDataset hands every source its own dict, but a plain entry must not see db_paths added.
        self.io_backend_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        self.file_client = None
        self.lq_root, self.gt_root = str(opt['dataroot_lq']), str(opt['dataroot_gt'])
        if self.io_backend_opt.get('type') == 'lmdb':
            self.io_backend_opt['db_paths'] = [self.lq_root, self.gt_root]
            self.io_backend_opt['client_keys'] = ['lq', 'gt']
            try:
                lq_items = [(k, k) for k in lmdb_keys(self.lq_root)]
                gt_index = self._index(lmdb_keys(self.gt_root), lambda k: k, 'key')
            except FileNotFoundError as err:
                raise DataError(f'{self.who}: dataroot_lq / dataroot_gt with io_backend lmdb: {err}') from None
        else:
            for key, root in (('dataroot_lq', self.lq_root), ('dataroot_gt', self.gt_root)):
                if not os.path.isdir(root):
                    raise DataError(f'{self.who}: {key} {root!r} is not a folder (for an LMDB set '
                                    'io_backend: {type: lmdb}).')
            lq_items = [(stem(n), os.path.join(self.lq_root, n)) for n in list_images(self.lq_root)]
            gt_index = {s: os.path.join(self.gt_root, n)
                        for s, n in self._index(list_images(self.gt_root), stem, 'file').items()}
        if not lq_items:
            raise DataError(f'{self.who}: the dataset is empty, no LQ images in {self.lq_root!r}; put the images '
                            'there or fix dataroot_lq.')
        self.paths: list[dict[str, str]] = []
        for lq_stem, lq_path in lq_items:
            target = gt_stem(lq_stem, self.rule)
            if target not in gt_index:
                missing = sum(gt_stem(s, self.rule) not in gt_index for s, _ in lq_items)
                rule = f'lq_to_gt {list(self.rule_opt)}' if self.rule else 'no lq_to_gt rule (same stem)'
                raise DataError(
                    f'{self.who}: no GT for LQ {lq_path!r}: {rule} gives GT stem {target!r}, which is not in '
                    f'dataroot_gt {self.gt_root!r} ({missing} of {len(lq_items)} LQ images lack a GT). Fix: set '
                    'lq_to_gt to the rule of this set (docs/datasets.md), add the missing GT images or remove '
                    'the unpaired LQ ones; scripts/check_datasets.py lists them all.')
            self.paths.append({'lq_path': lq_path, 'gt_path': gt_index[target]})

    def _index(self, names: list[str], to_stem, what: str) -> dict[str, str]:
        """stem -> name; two GT names with one stem would make the pairing ambiguous."""
        index: dict[str, str] = {}
        for name in names:
            s = to_stem(name)
            if s in index:
                raise DataError(f'{self.who}: GT {what}s {index[s]!r} and {name!r} in {self.gt_root!r} share the stem '
                                f'{s!r}, so the pairing is ambiguous; keep one of them.')
            index[s] = name
        return index

    def _display(self, path: str, root: str) -> str:
        """A file as messages name it: its path, or its key and LMDB."""
        if self.io_backend_opt.get('type') == 'lmdb':
            return f'key {path!r} of the LMDB {root!r}'
        return repr(path)

    def __len__(self) -> int:
        return len(self.paths)

    def _sample(self, index: int) -> dict:
        self.file_client = self.file_client or open_file_client(self.io_backend_opt)
        lq_path, gt_path = self.paths[index]['lq_path'], self.paths[index]['gt_path']
        img_lq = read_image(self.file_client, lq_path, 'lq', self.who)
        img_gt = read_image(self.file_client, gt_path, 'gt', self.who)
        lq_name, gt_name = self._display(lq_path, self.lq_root), self._display(gt_path, self.gt_root)
        checks.check_pair(img_lq.shape, img_gt.shape, lq_name, gt_name, self.who, scale=1)
        if self.opt.get('phase') == 'train':
            checks.check_crop(img_gt.shape, self.opt['gt_size'], gt_name, self.who)
            img_gt, img_lq = paired_random_crop(img_gt, img_lq, self.opt['gt_size'], 1, gt_path)
            img_gt, img_lq = augment([img_gt, img_lq], self.opt.get('use_hflip', True), self.opt.get('use_rot', True))
        img_gt = img_gt.astype(np.float32) / 255.0
        img_lq = img_lq.astype(np.float32) / 255.0
        if self.opt.get('color') == 'y':
            img_gt = bgr2ycbcr(img_gt, y_only=True)[..., None]
            img_lq = bgr2ycbcr(img_lq, y_only=True)[..., None]
        img_gt, img_lq = img2tensor([img_gt, img_lq], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(img_lq, self.mean, self.std, inplace=True)
            normalize(img_gt, self.mean, self.std, inplace=True)
        return {'lq': img_lq, 'gt': img_gt, 'lq_path': lq_path, 'gt_path': gt_path}
