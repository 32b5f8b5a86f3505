#!/usr/bin/env python
"""Check that the real training and benchmark sets are where the option files expect them, complete and readable.

The layout (folders, pairing rules, expected counts) is baryir_plugin/data/layout.py, explained in
docs/datasets.md. For every set of the selected groups this reports:

- present / missing (a folder ``F`` may also be given as its LMDB twin ``F.lmdb`` from scripts/make_lmdb.py),
- LQ and GT image counts against the expected ones (a difference is a WARN; ``--strict`` makes it fail),
- pairing: every LQ file has its GT by the set's ``lq_to_gt`` rule; GT stems shared by two files; GT
  images that no LQ uses are counted (RESIDE has clear images without hazy versions: not an error),
- unreadable images: every file is decoded with cv2.imdecode (and JPEG/PNG files must end with their
  end marker, so a truncated file is caught even by decoders that pad it), in a thread pool,
- pairs whose LQ and GT sizes differ,
- LMDB twins whose meta_info.txt is malformed or whose data.mdb is truncated or corrupt (checked before the LMDB
  is opened).

Exit status 0 when every selected set is present and has no problem (WARNs allowed unless --strict),
1 otherwise, with a summary naming each failing set and its first offending files and a last line
``scripts/check_datasets.py: error: ...`` with each failing set's first problem. A bad flag is one line
with exit status 2; ``--debug`` adds the traceback of an error.

    python scripts/check_datasets.py --root datasets                          # everything
    python scripts/check_datasets.py --root datasets --group 3deg-train 3deg-test
    python scripts/check_datasets.py --root datasets_lmdb --group 5deg-train  # the LMDB twins
    python scripts/check_datasets.py --root datasets --quick --json report.json   # names only, no decoding
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2

from baryir_plugin.data.checks import ToolParser, inspect_image, lmdb_problem, positive_int
from baryir_plugin.data.layout import (GROUPS, SETS_BY_KEY, DatasetSet, compile_rule, gt_stem, list_images,
                                       lmdb_keys, select, stem)
from baryir_plugin.errors import DataError, UsageError, guarded_main

PROG = 'scripts/check_datasets.py'

EXAMPLES = 20  # offending names kept per problem kind (JSON); the table shows the first


# ---------------------------------------------------------------------------------------------------
# Listing a folder or its LMDB twin
# ---------------------------------------------------------------------------------------------------

class Listing:
    """The images of one layout folder: the folder itself, or else its ``.lmdb`` twin.

    Attributes:
        folder: the layout folder (relative to the root).
        path: what was found, as the user wrote the root (``datasets/train/rain/lq`` or ``...lq.lmdb``).
        backend: 'disk', 'lmdb' or None (neither exists).
        names: file names (disk) or keys (LMDB), sorted.
        error: why an LMDB cannot be read at all (a malformed meta_info.txt, a truncated or corrupt data.mdb,
            checked without opening it), else None; its images are then not read.
    """

    def __init__(self, root: str, folder: str) -> None:
        self.folder = folder
        plain, twin = os.path.join(root, folder), os.path.join(root, folder + '.lmdb')
        self._env = None
        self._lock = threading.Lock()
        self.error: str | None = None
        if os.path.isdir(plain) and not plain.endswith('.lmdb'):
            self.backend, self.path, self.names = 'disk', plain, list_images(plain)
        elif os.path.isfile(os.path.join(twin, 'meta_info.txt')):
            self.backend, self.path, self.names = 'lmdb', twin, []
            try:
                self.names = sorted(lmdb_keys(twin))
            except DataError as err:
                self.error = str(err)
            problem = None if self.error else lmdb_problem(twin)
            if problem:  # opening it could kill the process (SIGBUS on a truncated file)
                self.names = []
                self.error = (f'the LMDB {twin} is truncated or corrupt ({problem}); rebuild it with '
                              'scripts/make_lmdb.py')
        else:
            self.backend, self.path, self.names = None, plain, []

    def stem_of(self, name: str) -> str:
        return name if self.backend == 'lmdb' else stem(name)

    def display(self, name: str) -> str:
        """How a file is named in messages: its path, or ``<lmdb>[key]``."""
        return os.path.join(self.path, name) if self.backend == 'disk' else f'{self.path}[{name}]'

    def read(self, name: str) -> bytes | None:
        if self.backend == 'disk':
            with open(os.path.join(self.path, name), 'rb') as f:
                return f.read()
        with self._lock:  # decoding threads share one environment; py-lmdb refuses a second open
            if self._env is None:
                import lmdb  # a dependency of basicsr; imported here so folder-only checks never need it

                self._env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, max_readers=256)
        with self._env.begin(write=False) as txn:
            return txn.get(name.encode('ascii', errors='replace'))

    def close(self) -> None:
        # py-lmdb refuses to open an environment twice in one process: release it for later readers
        if self._env is not None:
            self._env.close()
            self._env = None


# ---------------------------------------------------------------------------------------------------
# Checking sets
# ---------------------------------------------------------------------------------------------------

# Plain classes, not dataclasses: tests load this script without registering it in sys.modules, which
# dataclasses need to resolve postponed annotations.
class Problem:
    """One kind of problem of a set: how many, a first example (with file names), more examples."""

    def __init__(self, kind: str, count: int, message: str, examples: list[str] | None = None) -> None:
        self.kind, self.count, self.message, self.examples = kind, count, message, examples or []


class SetReport:
    """The result for one set; ``status`` is OK, WARN, FAIL or MISSING."""

    def __init__(self, dataset_set: DatasetSet) -> None:
        self.set = dataset_set
        self.status = 'OK'
        self.lq: int | None = None
        self.gt: int | None = None
        self.backend: str | None = None
        self.problems: list[Problem] = []  # make the set FAIL / MISSING
        self.warnings: list[Problem] = []  # count differences (FAIL under --strict)
        self.notes: list[str] = []

    def first_problem(self) -> str:
        first = (self.problems or self.warnings or [None])[0]
        return first.message if first else (f'note: {self.notes[0]}' if self.notes else '')

    def as_json(self) -> dict:
        s = self.set
        return {'key': s.key, 'name': s.name, 'groups': list(s.groups), 'kind': s.kind, 'status': self.status,
                'backend': self.backend, 'lq': self.lq, 'gt': self.gt, 'expected_lq': s.expected_lq,
                'expected_gt': s.expected_gt, 'lq_to_gt': list(s.lq_to_gt) if s.lq_to_gt else None,
                'problems': [vars(p) for p in self.problems], 'warnings': [vars(p) for p in self.warnings],
                'notes': self.notes, 'source': s.source}


def _problem(kind: str, items: list[str], what: str) -> Problem:
    return Problem(kind, len(items), f'{len(items)} {what}: {items[0]}', items[:EXAMPLES])


def _duplicates(listing: Listing) -> list[str]:
    seen: dict[str, str] = {}
    dups = []
    for name in listing.names:
        s = listing.stem_of(name)
        if s in seen:
            dups.append(f'{listing.display(seen[s])} and {listing.display(name)} share the stem {s!r}')
        seen[s] = name
    return dups


def check(root: str, sets: list[DatasetSet], decode: bool = True, workers: int | None = None,
          strict: bool = False, progress: bool = True) -> list[SetReport]:
    """Check ``sets`` under ``root``; returns one report per set, in order.

    Args:
        root: the dataset root (``datasets`` or an LMDB tree such as ``datasets_lmdb``).
        sets: layout entries to check (baryir_plugin.data.layout.select).
        decode: decode every image (catches corrupt files, measures sizes); False checks names only.
        workers: decoding threads (default: twice the CPU count, at most 32).
        strict: count differences fail the set instead of warning.
        progress: show a tqdm bar on stderr while decoding.
    """
    listings: dict[str, Listing] = {}
    for s in sets:
        for folder in s.folders:
            if folder not in listings:
                listings[folder] = Listing(root, folder)

    # decode every image of every present folder once (CDD-11's clear/ serves 11 sets)
    shapes: dict[tuple[str, str], tuple[int, int] | None] = {}
    errors: dict[tuple[str, str], str] = {}
    if decode:
        jobs = [(lst, name) for lst in listings.values() if lst.backend for name in lst.names]

        def run(job: tuple[Listing, str]) -> tuple[tuple[int, int] | None, str | None]:
            lst, name = job
            try:
                buf = lst.read(name)
            except OSError as err:
                return None, f'cannot be read ({err.strerror or err})'
            except Exception as err:  # noqa: BLE001 (lmdb.Error: a damaged LMDB; named with the image)
                if type(err).__module__ != 'lmdb':
                    raise
                return None, f'cannot be read from the LMDB ({" ".join(str(err).split())}; rebuild it)'
            if buf is None:
                return None, 'is listed in meta_info.txt but not stored in the LMDB'
            return inspect_image(buf)

        workers = workers or min(32, 2 * (os.cpu_count() or 1))
        bar = None
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = pool.map(run, jobs)
                if progress:
                    from tqdm import tqdm

                    # left on its own line when closed, so that what follows (an error line) starts a line
                    bar = tqdm(total=len(jobs), unit='img', desc='decoding', file=sys.stderr, leave=True)
                for (lst, name), (shape, error) in zip(jobs, results):
                    shapes[(lst.folder, name)] = shape
                    if error:
                        errors[(lst.folder, name)] = error
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for lst in listings.values():
                lst.close()

    reports = []
    for s in sets:
        reports.append(_check_set(s, listings, shapes, errors, strict))
    return reports


def _check_set(s: DatasetSet, listings: dict[str, Listing], shapes: dict, errors: dict,
               strict: bool) -> SetReport:
    report = SetReport(s)
    gt = listings[s.gt]
    lq = listings[s.lq] if s.lq else None
    absent = [lst for lst in ([lq] if lq else []) + [gt] if lst.backend is None]
    if absent:
        report.status = 'MISSING'
        report.problems.append(Problem('missing', len(absent), f'folder {absent[0].path} not found (nor its .lmdb '
                                       f'twin); get {s.name}: {s.source}', [lst.path for lst in absent]))
        return report
    report.backend = gt.backend if lq is None or lq.backend == gt.backend else f'{lq.backend}+{gt.backend}'
    report.gt = len(gt.names)
    report.lq = len(lq.names) if lq else len(gt.names)
    for lst in ([lq] if lq else []) + [gt]:
        if lst.error:
            report.problems.append(Problem('broken_lmdb', 1, lst.error, [lst.path]))
            continue
        if not lst.names:
            report.problems.append(Problem('empty', 1, f'no images in {lst.path}'))
        dups = _duplicates(lst)
        if dups:
            report.problems.append(_problem('duplicate_stem', dups, 'files with one stem (ambiguous pairing; '
                                            'LMDB keys would collide)'))
    for lst in ([lq] if lq else []) + [gt]:
        bad = [f'{lst.display(n)} {errors[(lst.folder, n)]}' for n in lst.names if (lst.folder, n) in errors]
        if bad:
            report.problems.append(_problem('unreadable', bad, 'unreadable image(s)'))

    if lq is not None and not (lq.error or gt.error):  # a damaged LMDB is named above; its keys are unknown
        rule = compile_rule(s.lq_to_gt, f'layout {s.key}')
        rule_text = f'rule lq_to_gt {list(s.lq_to_gt)}' if s.lq_to_gt else 'same stem'
        gt_by_stem = {gt.stem_of(n): n for n in gt.names}
        used: set[str] = set()
        no_gt, mismatched = [], []
        for name in lq.names:
            target = gt_stem(lq.stem_of(name), rule)
            if target not in gt_by_stem:
                no_gt.append(f'{lq.display(name)} -> GT stem {target!r} ({rule_text}) not in {gt.path}')
                continue
            used.add(target)
            gt_name = gt_by_stem[target]
            a, b = shapes.get((lq.folder, name)), shapes.get((gt.folder, gt_name))
            if a and b and a != b:
                mismatched.append(f'{lq.display(name)} is {a[1]}x{a[0]} but {gt.display(gt_name)} is {b[1]}x{b[0]}')
        if no_gt:
            report.problems.append(_problem('no_gt', no_gt, 'LQ image(s) without GT'))
        if mismatched:
            report.problems.append(_problem('size_mismatch', mismatched, 'pair(s) of different sizes'))
        unused = len(gt_by_stem) - len(used)
        if unused:
            report.notes.append(f'{unused} GT image(s) used by no LQ image')

    counts = [('images' if lq is None else 'LQ', report.lq, s.expected_lq)]
    if lq is not None:
        counts.append(('GT', report.gt, s.expected_gt))
    off = [f'{label} {count} (expected {expected})' for label, count, expected in counts
           if expected is not None and count != expected]
    if off:
        report.warnings.append(Problem('count', len(off), f'count differs: {", ".join(off)}'))
    if report.problems:
        report.status = 'FAIL'
    elif report.warnings:
        report.status = 'FAIL' if strict else 'WARN'
    return report


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------

def _expected(s: DatasetSet) -> str:
    if s.kind == 'clean':
        return '-' if s.expected_lq is None else str(s.expected_lq)
    lq = '-' if s.expected_lq is None else str(s.expected_lq)
    gt = '-' if s.expected_gt is None else str(s.expected_gt)
    return lq if lq == gt else f'{lq}/{gt}'


def _count(n: int | None) -> str:
    return '-' if n is None else str(n)


def format_table(reports: list[SetReport], width: int = 100) -> str:
    """The report table: set, group, lq, gt, expected, status, first problem."""
    rows = [('set', 'group', 'lq', 'gt', 'expected', 'status', 'first problem')]
    for r in reports:
        rows.append((r.set.key, ','.join(r.set.groups), _count(r.lq), _count(r.gt if r.set.kind == 'paired' else None),
                     _expected(r.set), r.status, r.first_problem()))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = []
    for row in rows:
        first = row[6] if len(row[6]) <= width else row[6][:width - 3] + '...'
        lines.append('  '.join(c.ljust(w) if i < 2 else c.rjust(w) if i < 5 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row[:6], widths))) + '  ' + first)
    return '\n'.join(lines)


def format_summary(reports: list[SetReport], strict: bool) -> tuple[bool, str]:
    """(ok, text): ok when no selected set is missing or broken (and, with strict, none warns)."""
    by_status = {k: [r for r in reports if r.status == k] for k in ('OK', 'WARN', 'FAIL', 'MISSING')}
    ok = not by_status['FAIL'] and not by_status['MISSING']
    head = ', '.join(f'{len(v)} {k}' for k, v in by_status.items() if v)
    lines = [f'{len(reports)} set(s) checked: {head}.']
    for r in by_status['WARN']:
        lines.append(f'WARN {r.set.key} ({r.set.name}): ' + '; '.join(w.message for w in r.warnings))
    if by_status['WARN'] and not strict:
        lines.append('(a count different from the expected one is a warning, not an error; --strict makes it one)')
    bad = by_status['MISSING'] + by_status['FAIL']
    if bad:
        lines.append(f'FAILED: {len(bad)} selected set(s) missing or broken:')
        for r in bad:
            lines.append(f'  {r.status} {r.set.key} ({r.set.name}):')
            for p in r.problems + (r.warnings if strict else []):
                lines.append(f'    - {p.message}')
                lines.extend(f'        {e}' for e in p.examples[1:5])
                if p.count > 5:
                    lines.append(f'        ... {p.count - 5} more (the first {EXAMPLES} in --json)')
        lines.append('Fix the files named above (layout and sources: docs/datasets.md), or check only the groups '
                     'you have with --group.')
    else:
        lines.append('All selected sets are present and readable.')
    return ok, '\n'.join(lines)


def failure_line(reports: list[SetReport], strict: bool) -> str:
    """The one-line error for the sets that are missing or broken: each set's first problem."""
    bad = [r for r in reports if r.status in ('MISSING', 'FAIL')]
    parts = []
    for r in bad[:3]:
        first = (r.problems or (r.warnings if strict else []) or [Problem('', 0, r.status)])[0]
        what = f'folder {first.examples[0]} not found' if first.kind == 'missing' and first.examples else first.message
        parts.append(f'{r.set.key}: {what}')
    more = f'; and {len(bad) - 3} more set(s)' if len(bad) > 3 else ''
    return (f'{len(bad)} of {len(reports)} selected set(s) missing or broken: {"; ".join(parts)}{more} (the report '
            'above lists them all; layout and sources: docs/datasets.md).')


def main(argv: list[str] | None = None) -> int:
    """Check the selected sets; raises DataError (after the report) when one is missing or broken."""
    parser = ToolParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default='datasets', help='dataset root (default: datasets)')
    parser.add_argument('--group', nargs='+', choices=GROUPS, help='groups to check (default: all sets)')
    parser.add_argument('--sets', nargs='+', metavar='KEY',
                        help=f'sets to check, e.g. {", ".join(list(SETS_BY_KEY)[:3])}')
    parser.add_argument('--quick', action='store_true', help='names, counts and pairing only; do not decode images')
    parser.add_argument('--strict', action='store_true', help='a count different from the expected one fails')
    parser.add_argument('--workers', type=positive_int, default=None,
                        help='decoding threads (default: 2 x CPUs, max 32)')
    parser.add_argument('--json', metavar='OUT', help='also write the full report as JSON')
    args = parser.parse_args(argv)
    try:
        sets = select(args.group, args.sets)
    except ValueError as err:
        raise UsageError(f'--sets: {err}') from None
    if not os.path.isdir(args.root):
        what = 'is a file, not a folder' if os.path.exists(args.root) else 'does not exist'
        raise DataError(f'--root {args.root!r} {what} (relative to {os.getcwd()}); give the dataset root laid out as '
                        'docs/datasets.md describes.')
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f'--json {args.json!r}: its folder does not exist; create it or write the report elsewhere.')
    if hasattr(cv2, 'utils') and hasattr(cv2.utils, 'logging'):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # corrupt files are reported below
    reports = check(args.root, sets, decode=not args.quick, workers=args.workers, strict=args.strict)
    print(format_table(reports))
    for r in reports:
        for note in r.notes:
            print(f'note: {r.set.key}: {note}')
    if args.quick:
        print('note: --quick: images were not decoded, so corrupt files and size mismatches were not checked')
    ok, summary = format_summary(reports, args.strict)
    print(summary)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'root': args.root, 'ok': ok, 'strict': args.strict,
                       'sets': [r.as_json() for r in reports]}, f, indent=2)
    if not ok:
        sys.stdout.flush()
        raise DataError(failure_line(reports, args.strict))
    return 0


if __name__ == '__main__':
    sys.exit(guarded_main(PROG, main))
