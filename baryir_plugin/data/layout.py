"""The on-disk layout of the real training and benchmark sets, as data (docs/datasets.md explains it).

One :class:`DatasetSet` per set, keyed by its folder under the dataset root (``ROOT``, by default
``datasets``). scripts/check_datasets.py, scripts/make_lmdb.py, the option files and the tests all read
this table, so a path or a pairing rule is changed here and nowhere else.

Pairing rules (``lq_to_gt``) are ``[PATTERN, REPLACEMENT]`` for Python's ``re.sub``, applied to the LQ
file *stem* (name without extension) to give the GT stem; the extensions may differ (SOTS: ``.jpg``
-> ``.png``). No rule means the same stem. Several LQ files may map to one GT (RESIDE OTS).

LMDB twins (scripts/make_lmdb.py) mirror the tree: folder ``F`` becomes ``F.lmdb`` (``train/noise`` ->
``train/noise.lmdb``, ``train/rain/lq`` -> ``train/rain/lq.lmdb``) with the file stems as keys.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

DEFAULT_ROOT = 'datasets'
GROUPS = ('3deg-train', '5deg-train', '3deg-test', '5deg-test', 'ood')
# Files with other extensions (Thumbs.db, README.txt, ...) are not images of a set and are skipped.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')

Rule = tuple[str, str]
RAIN_RULE: Rule = ('^rain-', 'norain-')
RESIDE_RULE: Rule = ('^([^_]+)_.*$', r'\1')
OHAZE_RULE: Rule = ('_hazy$', '_GT')
LOLV2_RULE: Rule = ('^low', 'normal')

CDD11_TYPES = ('haze', 'haze_rain', 'haze_snow', 'low', 'low_haze', 'low_haze_rain', 'low_haze_snow', 'low_rain',
               'low_snow', 'rain', 'snow')


@dataclass(frozen=True)
class DatasetSet:
    """One set of the layout.

    Attributes:
        key: the set's folder relative to the root, e.g. ``train/haze`` (unique).
        name: human name, e.g. ``RESIDE OTS``.
        groups: groups among :data:`GROUPS` the set belongs to.
        kind: ``paired`` (LQ and GT folders) or ``clean`` (one folder; the degradation is synthesised).
        degradation: noise, rain, haze, blur, lowlight, jpeg, underwater or mixed.
        gt: folder of the GT (paired) or clean (clean) images, relative to the root.
        lq: folder of the LQ images relative to the root (None for clean sets).
        lq_to_gt: the pairing rule (None: same stem).
        expected_lq: number of LQ images (paired) or images (clean); None when it is not fixed.
        expected_gt: number of GT images of a paired set; None when it is not fixed.
        source: where the set comes from (paper / release), and what to put where.
        folders: (lq, gt) or (gt,), derived; the LMDB twin of folder ``F`` is ``F.lmdb``.
    """

    key: str
    name: str
    groups: tuple[str, ...]
    kind: str
    degradation: str
    gt: str
    lq: str | None = None
    lq_to_gt: Rule | None = None
    expected_lq: int | None = None
    expected_gt: int | None = None
    source: str = ''
    folders: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in ('paired', 'clean'):
            raise ValueError(f'layout: {self.key}: kind must be paired or clean, got {self.kind!r}')
        if (self.kind == 'paired') != (self.lq is not None):
            raise ValueError(f'layout: {self.key}: paired sets need an lq folder, clean sets must not have one')
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f'layout: {self.key}: unknown groups {sorted(unknown)}; choose from {GROUPS}')
        object.__setattr__(self, 'folders', (self.gt,) if self.lq is None else (self.lq, self.gt))


def _paired(key: str, name: str, groups: Sequence[str], degradation: str, expected: int | None, source: str,
            rule: Rule | None = None, expected_gt: int | None | str = 'same') -> DatasetSet:
    return DatasetSet(key=key, name=name, groups=tuple(groups), kind='paired', degradation=degradation,
                      lq=f'{key}/lq', gt=f'{key}/gt', lq_to_gt=rule, expected_lq=expected,
                      expected_gt=expected if expected_gt == 'same' else expected_gt, source=source)


TRAIN_3 = ('3deg-train', '5deg-train')
TEST_3 = ('3deg-test', '5deg-test')

SETS: tuple[DatasetSet, ...] = (
    # ---- training ----
    DatasetSet('train/noise', 'BSD400 + WED', TRAIN_3, 'clean', 'noise', gt='train/noise', expected_lq=5144,
               source='BSD400 (Martin et al., ICCV 2001; the 400 training images of DnCNN, Zhang et al., TIP 2017) '
                      '+ Waterloo Exploration Database (WED, Ma et al., TIP 2017, 4,744 images), all in one flat '
                      'folder; Gaussian noise is added on the fly'),
    _paired('train/rain', 'Rain100L (train)', TRAIN_3, 'rain', 200, rule=RAIN_RULE,
            source='Rain100L training pairs (Yang et al., CVPR 2017, "Deep joint rain detection and removal"), '
                   'lq rain-<n>.png, gt norain-<n>.png'),
    _paired('train/haze', 'RESIDE OTS', TRAIN_3, 'haze', 72135, rule=RESIDE_RULE, expected_gt=None,
            source='RESIDE Outdoor Training Set (Li et al., TIP 2019, "Benchmarking single-image dehazing and '
                   'beyond"): hazy <id>_<A>_<beta>.jpg in lq, clear <id>.jpg in gt (many hazy per clear image)'),
    _paired('train/blur', 'GoPro (train)', ('5deg-train',), 'blur', 2103,
            source='GoPro training set (Nah et al., CVPR 2017), scene folders flattened to <scene>_<frame>.png '
                   '(blur/ -> lq, sharp/ -> gt)'),
    _paired('train/lowlight', 'LOL-v1 our485', ('5deg-train',), 'lowlight', 485,
            source='LOL-v1 our485 (Wei et al., BMVC 2018, "Deep Retinex decomposition"): low/ -> lq, high/ -> gt'),
    # ---- in-distribution benchmarks ----
    DatasetSet('test/noise/BSD68', 'CBSD68', TEST_3, 'clean', 'noise', gt='test/noise/BSD68', expected_lq=68,
               source='CBSD68, the colour version of the 68 BSD test images (Martin et al., ICCV 2001; Roth and '
                      'Black, CVPR 2005); noise is added at test time with a fixed seed'),
    _paired('test/rain/Rain100L', 'Rain100L (test)', TEST_3, 'rain', 100, rule=RAIN_RULE,
            source='Rain100L test pairs (Yang et al., CVPR 2017)'),
    _paired('test/haze/SOTS_outdoor', 'SOTS outdoor', TEST_3, 'haze', 500, rule=RESIDE_RULE,
            source='RESIDE Synthetic Objective Testing Set, outdoor (Li et al., TIP 2019): hazy <id>_<a>_<b>.jpg '
                   'in lq, clear <id>.png in gt'),
    _paired('test/blur/GoPro', 'GoPro (test)', ('5deg-test',), 'blur', 1111,
            source='GoPro test set (Nah et al., CVPR 2017), flattened like the training set'),
    _paired('test/lowlight/LOL_eval15', 'LOL-v1 eval15', ('5deg-test',), 'lowlight', 15,
            source='LOL-v1 eval15 (Wei et al., BMVC 2018): low/ -> lq, high/ -> gt'),
    # ---- out of distribution ----
    _paired('test/rain/Rain100H', 'Rain100H', ('ood',), 'rain', 100, rule=RAIN_RULE,
            source='Rain100H test pairs (Yang et al., CVPR 2017)'),
    _paired('test/haze/O-HAZE', 'O-HAZE', ('ood',), 'haze', 45, rule=OHAZE_RULE,
            source='O-HAZE (Ancuti et al., CVPR Workshops 2018): NN_outdoor_hazy.jpg in lq, NN_outdoor_GT.jpg in gt'),
    _paired('test/rain/SPANet', 'SPA-Data (SPANet) test', ('ood',), 'rain', 1000,
            source='real rain test pairs of SPA-Data (Wang et al., CVPR 2019, "Spatial attentive single-image '
                   'deraining"). The release names a rainy image and its clean image differently: rename the files '
                   'so that each pair has the same name in lq/ and gt/'),
    _paired('test/lowlight/LOL-v2-real', 'LOL-v2 real (test)', ('ood',), 'lowlight', 100, rule=LOLV2_RULE,
            source='LOL-v2 Real_captured test (Yang et al., TIP 2021): Low/low<n>.png -> lq, '
                   'Normal/normal<n>.png -> gt'),
    DatasetSet('test/jpeg/BSDS500', 'BSDS500', ('ood',), 'clean', 'jpeg', gt='test/jpeg/BSDS500',
               source='Berkeley Segmentation Data Set 500 (Arbelaez et al., TPAMI 2011), clean images; JPEG '
                      'quality 10 is applied at test time'),
    _paired('test/underwater/UIEB', 'UIEB', ('ood',), 'underwater', None, expected_gt=None,
            source='UIEB (Li et al., TIP 2020, "An underwater image enhancement benchmark"): raw-890 -> lq, '
                   'reference-890 -> gt, same names'),
) + tuple(
    DatasetSet(f'test/mixed/CDD-11/{kind}', f'CDD-11 {kind}', ('ood',), 'paired', 'mixed',
               lq=f'test/mixed/CDD-11/{kind}', gt='test/mixed/CDD-11/clear',
               source='CDD-11 test split (Guo et al., ECCV 2024, "OneRestore"): one folder per composite '
                      'degradation, each paired by name with clear/')
    for kind in CDD11_TYPES)

SETS_BY_KEY: dict[str, DatasetSet] = {s.key: s for s in SETS}


def select(groups: Iterable[str] | None = None, keys: Iterable[str] | None = None) -> list[DatasetSet]:
    """Sets in any of ``groups`` plus the sets named in ``keys``, in table order.

    Args:
        groups: group names among :data:`GROUPS`; None (and no keys) selects every set.
        keys: set keys (``train/rain``, ``test/mixed/CDD-11/haze``, ...).

    Raises:
        ValueError: an unknown group or key (the message lists the valid ones).
    """
    groups = list(groups or [])
    keys = list(keys or [])
    bad_groups = [g for g in groups if g not in GROUPS]
    if bad_groups:
        raise ValueError(f'unknown group(s) {bad_groups}; choose from {list(GROUPS)}')
    bad_keys = [k for k in keys if k.strip('/') not in SETS_BY_KEY]
    if bad_keys:
        raise ValueError(f'unknown set(s) {bad_keys}; the sets are {list(SETS_BY_KEY)}')
    if not groups and not keys:
        return list(SETS)
    wanted = {k.strip('/') for k in keys}
    return [s for s in SETS if s.key in wanted or set(s.groups) & set(groups)]


# ---------------------------------------------------------------------------------------------------
# Naming: how file names become stems and LQ stems become GT stems (shared by datasets and tools).
# ---------------------------------------------------------------------------------------------------

def is_image(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith('.') and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str) -> list[str]:
    """Sorted image file names directly in ``folder`` (no recursion: the layout is flat)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and is_image(e.name))


def stem(name: str) -> str:
    """File name without its last extension (``0001_0.8_0.2.jpg`` -> ``0001_0.8_0.2``)."""
    return os.path.splitext(os.path.basename(name))[0]


def compile_rule(rule: Sequence[str] | None, where: str = 'lq_to_gt') -> tuple[re.Pattern, str] | None:
    """Validate a ``[PATTERN, REPLACEMENT]`` rule and compile its pattern.

    Args:
        rule: None / empty for "same stem", else two strings for ``re.sub``.
        where: what to name in error messages (the dataset and option).

    Raises:
        ValueError: not two strings, or the pattern does not compile.
    """
    if rule is None or (isinstance(rule, (list, tuple)) and len(rule) == 0):
        return None
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and all(isinstance(r, str) for r in rule)):
        raise ValueError(f"{where}: expected [PATTERN, REPLACEMENT] (two strings for re.sub on the LQ stem), got "
                         f"{rule!r}; e.g. lq_to_gt: ['^rain-', 'norain-'].")
    try:
        return re.compile(rule[0]), rule[1]
    except re.error as err:
        raise ValueError(f'{where}: pattern {rule[0]!r} is not a valid regular expression ({err}).') from None


def gt_stem(lq_stem: str, rule: tuple[re.Pattern, str] | None) -> str:
    """The GT stem of an LQ stem under a compiled rule (:func:`compile_rule`); None rule = same stem."""
    return lq_stem if rule is None else rule[0].sub(rule[1], lq_stem)


# meta_info.txt of a BasicSR LMDB: one line per image, as basicsr.utils.lmdb_util writes it
META_INFO_FORMAT = '<key>.png (h,w,c) <compress>'
_META_LINE = re.compile(r'^(?P<name>\S(?:.*\S)?) \((?P<h>\d+),(?P<w>\d+),(?P<c>\d+)\) (?P<level>\d+)$')


def meta_info_names(lmdb_path: str) -> list[str]:
    """The image names (``<key>.png``) a BasicSR LMDB lists in its ``meta_info.txt``, every line checked.

    Raises:
        FileNotFoundError: ``lmdb_path`` has no ``meta_info.txt`` (not a BasicSR LMDB).
        DataError: a line does not read ``<key>.png (h,w,c) <compress>`` (names the file and the line).
    """
    from ..errors import DataError

    meta = os.path.join(lmdb_path, 'meta_info.txt')
    if not os.path.isfile(meta):
        raise FileNotFoundError(f'{lmdb_path!r} is not a BasicSR LMDB: {meta!r} is missing (build it with '
                                'scripts/make_lmdb.py).')
    fix = (f"every line must read '{META_INFO_FORMAT}' (e.g. 'rain-1.png (48,48,3) 1'), as BasicSR's LMDB writer "
           'makes it. Fix or remove the line, or rebuild the LMDB with scripts/make_lmdb.py.')
    try:
        with open(meta, encoding='utf-8') as fin:
            lines = fin.read().split('\n')
    except UnicodeDecodeError:
        raise DataError(f'the meta_info.txt {meta!r} of the LMDB is malformed: it is not UTF-8 text; {fix}') from None
    if lines and lines[-1] == '':
        lines.pop()  # the newline that ends the last line
    names = []
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip('\r')
        match = _META_LINE.match(line)
        name = match.group('name') if match else ''
        if not match or not is_image(name):
            shown = 'is empty' if not line.strip() else f'reads {line[:80]!r}'
            raise DataError(f'the meta_info.txt {meta!r} of the LMDB is malformed: line {number} {shown}; {fix}')
        names.append(name)
    return names


def lmdb_keys(lmdb_path: str) -> list[str]:
    """The keys of a BasicSR LMDB, read from its ``meta_info.txt`` (lines ``<key>.png (h,w,c) level``).

    Unlike BasicSR's ``paths_from_lmdb`` (which keeps the text before the first dot), keys that contain
    dots (RESIDE's ``0001_0.8_0.2``) are kept whole: only the trailing image extension is dropped.

    Raises:
        FileNotFoundError: ``lmdb_path`` has no ``meta_info.txt`` (not a BasicSR LMDB).
        DataError: a malformed line (see :func:`meta_info_names`).
    """
    return [name[:-len(os.path.splitext(name)[1])] for name in meta_info_names(lmdb_path)]
