#!/usr/bin/env python
"""Write BasicSR LMDB twins of the dataset layout (docs/datasets.md), for faster training I/O.

Every folder of the selected sets becomes ``OUT/<folder>.lmdb``, written by BasicSR's own
``basicsr.utils.lmdb_util.make_lmdb_from_imgs`` (images re-encoded as PNG, keys = file stems, a
``meta_info.txt`` beside the data), mirroring the tree:

    ROOT/train/noise/*         -> OUT/train/noise.lmdb
    ROOT/train/rain/{lq,gt}/*  -> OUT/train/rain/lq.lmdb, OUT/train/rain/gt.lmdb
    ...

Each LMDB is written under a temporary hidden name in its destination folder and renamed when complete,
so an interrupted run never leaves a partial LMDB under the final name (a leftover temporary is removed
by the next run). Existing LMDBs are kept (the run stops before writing anything) unless ``--overwrite``.
Every image is decoded once before anything is written: an unreadable one (empty, truncated, not an
image) stops the run with one line naming it. A bad input is one ``scripts/make_lmdb.py: error: ...``
line (exit status 1; 2 for a bad flag).
Finally the YAML lines that read the LMDBs are printed.

    python scripts/make_lmdb.py --root datasets --out datasets_lmdb --group 3deg-train
    python scripts/make_lmdb.py --root datasets --out datasets_lmdb --sets train/blur train/lowlight --workers 8

By default the training sets (groups 3deg-train and 5deg-train) are converted: benchmark images are
read once per evaluation, so LMDBs do not pay off for them (``--group``/``--sets`` select any set).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from baryir_plugin.data.checks import ToolParser, decode, positive_int
from baryir_plugin.data.layout import GROUPS, SETS_BY_KEY, DatasetSet, list_images, select, stem
from baryir_plugin.errors import DataError, UsageError, guarded_main

PROG = 'scripts/make_lmdb.py'
DEFAULT_GROUPS = ('3deg-train', '5deg-train')


class LmdbError(DataError):
    """A problem with the input that stops the run before (or while) writing; the message says the fix."""


def _folders(sets: list[DatasetSet]) -> list[str]:
    """Distinct folders of the sets, in table order (CDD-11's clear/ serves 11 sets)."""
    seen: list[str] = []
    for s in sets:
        seen.extend(f for f in s.folders if f not in seen)
    return seen


def unreadable_images(src: str, names: list[str], workers: int | None = None) -> list[str]:
    """``<path> <why>`` for every image of ``src`` that is not a whole image (decoded as BasicSR will read it:
    cv2, unchanged depth and channels; truncated JPEG/PNG files are caught by their end markers)."""
    import cv2

    def problem(name: str) -> str | None:
        path = os.path.join(src, name)
        try:
            with open(path, 'rb') as f:
                buf = f.read()
        except OSError as err:
            return f'{path} cannot be read ({err.strerror or err})'
        img, why = decode(buf, cv2.IMREAD_UNCHANGED)
        return None if img is not None else f'{path} {why}'

    with ThreadPoolExecutor(max_workers=workers or min(16, 2 * (os.cpu_count() or 1))) as pool:
        return [p for p in pool.map(problem, names) if p]


def _one_line(problems: list[str]) -> str:
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    return 'nothing written: ' + '; '.join(problems[:3]) + more


def plan(root: str, out: str, sets: list[DatasetSet], overwrite: bool = False,
         verify: bool = True) -> list[tuple[str, str, list[str]]]:
    """Validate the inputs and outputs; returns (source folder, target .lmdb, image names) per folder.

    Everything that would make BasicSR fail mid-way (or store a broken image) is caught here, before any
    LMDB is written.

    Raises:
        LmdbError: a folder is missing or empty, two images share a stem (one LMDB key), a stem is not
            ASCII (BasicSR encodes keys as ASCII), an image is unreadable (``verify``: every image is
            decoded), or a target exists and ``overwrite`` is False. One line: the first problems.
    """
    jobs, problems, existing = [], [], []
    for folder in _folders(sets):
        src, dst = os.path.join(root, folder), os.path.join(out, folder + '.lmdb')
        if not os.path.isdir(src):
            what = 'is a file, not a folder' if os.path.exists(src) else 'not found'
            problems.append(f'{src}: folder {what} (run scripts/check_datasets.py --root {root})')
            continue
        names = list_images(src)
        if not names:
            problems.append(f'{src}: no images (files ending in .png .jpg .jpeg .bmp .tif .tiff .webp)')
            continue
        by_stem: dict[str, str] = {}
        for name in names:
            key = stem(name)
            if key in by_stem:
                problems.append(f'{src}: {by_stem[key]} and {name} would share the LMDB key {key!r}; keep one')
            elif not key.isascii():
                problems.append(f'{src}/{name}: LMDB keys must be ASCII (BasicSR encodes them so); rename the file')
            by_stem[key] = name
        if os.path.exists(dst) and not overwrite:
            existing.append(dst)
        jobs.append((src, dst, names))
    if existing:
        problems.append(f'{len(existing)} LMDB(s) exist already, e.g. {existing[0]}; pass --overwrite to replace '
                        'them, or choose another --out')
    if problems:
        raise LmdbError(_one_line(problems))
    if verify:
        bad = [p for src, _, names in jobs for p in unreadable_images(src, names)]
        if bad:
            raise LmdbError(_one_line([f'{len(bad)} unreadable image(s): {bad[0]}'] + bad[1:]) +
                            '; replace or remove them (scripts/check_datasets.py lists them all)')
    return jobs


def map_size_for(src: str, names: list[str]) -> int:
    """An LMDB map size that holds the folder re-encoded as PNG.

    BasicSR's own estimate (first image x count x 10) overflows when the first image is small (the
    folders mix sizes: BSD400 + WED). Image headers give every size cheaply; PNG at a fast compression
    level stays below 1.1x the raw pixels, and LMDB adds up to a page per value. On Linux the map is
    only reserved address space, so the margin costs no disk.
    """
    import cv2
    from PIL import Image

    def raw_bytes(name: str) -> int:
        path = os.path.join(src, name)
        try:
            with Image.open(path) as img:
                depth = 2 if ('16' in img.mode or img.mode in ('I', 'F')) else 1
                return img.width * img.height * len(img.getbands()) * depth
        except OSError:  # a format Pillow does not know: let OpenCV (which BasicSR reads with) decide
            img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if img is None:
                raise LmdbError(f'{path}: unreadable image; run scripts/check_datasets.py to find all such files') \
                    from None
            return img.nbytes

    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        total = sum(pool.map(raw_bytes, names))
    return int(total * 1.5) + len(names) * 8192 + (64 << 20)


def write_lmdb(src: str, dst: str, names: list[str], compress_level: int = 1, workers: int = 1,
               overwrite: bool = False) -> None:
    """Write one folder as ``dst`` (a ``.lmdb`` folder) through a temporary name.

    Args:
        src: image folder.
        dst: final LMDB path (must end with .lmdb).
        names: image file names in ``src`` (keys are their stems).
        compress_level: PNG compression level (0-9) of the stored images.
        workers: >1 reads the images with that many processes first (BasicSR's multiprocessing_read,
            which holds the whole folder, PNG-encoded, in memory).
        overwrite: replace an existing ``dst``.
    """
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    parent, base = os.path.split(dst)
    os.makedirs(parent or '.', exist_ok=True)
    prefix = f'.{base[:-len(".lmdb")]}.tmp-'
    for stale in glob.glob(os.path.join(glob.escape(parent or '.'), glob.escape(prefix) + '*.lmdb')):
        print(f'removing {stale} left by an interrupted run')
        shutil.rmtree(stale)
    tmp = os.path.join(parent, f'{prefix}{os.getpid()}.lmdb')  # must end with .lmdb for BasicSR
    try:
        make_lmdb_from_imgs(src, tmp, names, [stem(n) for n in names], compress_level=compress_level,
                            multiprocessing_read=workers > 1, n_thread=max(1, workers),
                            map_size=map_size_for(src, names))
        if os.path.exists(dst):
            if not overwrite:
                raise LmdbError(f'{dst} appeared while writing; pass --overwrite to replace it')
            old = os.path.join(parent, f'.{base[:-len(".lmdb")]}.old-{os.getpid()}.lmdb')
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except AttributeError as err:  # BasicSR's reader gets None from cv2.imread for an unreadable image
        raise LmdbError(f'an image in {src} could not be read ({err}); find it with scripts/check_datasets.py') \
            from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def yaml_lines(out: str, sets: list[DatasetSet]) -> str:
    """The dataset options that read the LMDBs of ``sets`` under ``out`` (paths as given in ``out``)."""
    def path(folder: str) -> str:
        return f'{out.rstrip("/")}/{folder}.lmdb'

    lines = ['# dataset options for these LMDBs (every entry also needs io_backend: {type: lmdb}):']
    for s in sets:
        lines.append(f'# {s.key} ({s.name})')
        if s.kind == 'clean':
            kind = {'noise': 'GaussianNoiseDataset', 'jpeg': 'JPEGCompressionDataset'}.get(s.degradation)
            lines.append(f'type: {kind}' if kind else '# a clean set')
            lines.append(f'dataroot_gt: {path(s.gt)}')
        else:
            lines.append('type: StemMatchedPairedDataset')
            lines.append(f'dataroot_lq: {path(s.lq)}')
            lines.append(f'dataroot_gt: {path(s.gt)}')
            if s.lq_to_gt:
                lines.append(f"lq_to_gt: ['{s.lq_to_gt[0]}', '{s.lq_to_gt[1]}']")
        lines.append('io_backend: {type: lmdb}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    """Convert the selected folders; raises LmdbError (a DataError) or UsageError for a bad input."""
    parser = ToolParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default='datasets', help='dataset root to read (default: datasets)')
    parser.add_argument('--out', required=True, help='root of the LMDB tree to write, e.g. datasets_lmdb')
    parser.add_argument('--group', nargs='+', choices=GROUPS,
                        help=f'groups to convert (default: {" ".join(DEFAULT_GROUPS)} unless --sets is given)')
    parser.add_argument('--sets', nargs='+', metavar='KEY',
                        help=f'sets to convert, e.g. {", ".join(list(SETS_BY_KEY)[:3])}')
    parser.add_argument('--compress-level', type=int, default=1, choices=range(10), metavar='0-9',
                        help='PNG compression level of the stored images (default 1: fast to decode)')
    parser.add_argument('--workers', type=positive_int, default=1,
                        help='processes reading images (default 1; N > 1 holds a whole folder in memory)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing LMDBs')
    args = parser.parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.root):
        raise UsageError('--out must differ from --root (the LMDBs mirror the tree beside the folders)')
    if not os.path.isdir(args.root):
        what = 'is a file, not a folder' if os.path.exists(args.root) else 'does not exist'
        raise LmdbError(f'--root {args.root!r} {what} (relative to {os.getcwd()}); give the dataset root laid out as '
                        'docs/datasets.md describes.')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise LmdbError(f'--out {args.out!r} is a file; give a folder for the LMDB tree.')
    groups = args.group if args.group or args.sets else list(DEFAULT_GROUPS)
    try:
        sets = select(groups, args.sets)
    except ValueError as err:
        raise UsageError(f'--sets: {err}') from None
    jobs = plan(args.root, args.out, sets, args.overwrite)
    for i, (src, dst, names) in enumerate(jobs, 1):
        print(f'[{i}/{len(jobs)}] {src} ({len(names)} images) -> {dst}', flush=True)
        if any('.' in stem(n) for n in names):
            print(f'note: some keys of {dst} contain dots; BasicSR\'s PairedImageDataset and paths_from_lmdb cut '
                  'keys at the first dot, so read it with StemMatchedPairedDataset / JPEGCompressionDataset')
        write_lmdb(src, dst, names, args.compress_level, args.workers, args.overwrite)
    print(f'\nwrote {len(jobs)} LMDB(s) under {args.out}')
    print(yaml_lines(args.out, sets))
    return 0


if __name__ == '__main__':
    sys.exit(guarded_main(PROG, main))
