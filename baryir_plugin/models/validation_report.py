"""Per-image metrics of one validation/test set: a CSV row per image and a summary JSON per set.

BasicSR's validation keeps only the mean of each metric. A benchmark table needs more: every image's
value (to find failures, to run significance tests), which metric options produced the numbers
(RGB or Y channel, crop_border), the degraded input's own scores (what a restoration must beat), and an
honest record of what could not be computed (a full-reference metric on a set without ground truth, a
metric whose weight files were not given, SSIM on an image smaller than its window) instead of a silent
zero or a NaN that poisons the mean.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from baryir_plugin.compat import atomic_write

# Metrics that score an image on its own (BasicSR passes the ground truth as img2 when it exists).
NO_REFERENCE_METRICS = frozenset({'calculate_niqe', 'calculate_piqe'})


def metric_needs_reference(metric_opt: dict) -> bool:
    return metric_opt.get('type') not in NO_REFERENCE_METRICS


def write_json(path: str, obj: dict) -> str:
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
    text = json.dumps(obj, indent=2) + '\n'
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))
    return path


class ValidationReport:
    """Collects per-image metric values of one dataset and writes ``<stem>.csv`` and ``<stem>.json``.

    Args:
        dataset_name: the set's ``name`` option.
        metric_opts: the ``val.metrics`` mapping of the YAML (name -> options with ``type``).
        with_input: also score the degraded input (columns ``input_<metric>``).
    """

    def __init__(self, dataset_name: str, metric_opts: dict, with_input: bool = False) -> None:
        self.dataset_name = dataset_name
        self.metric_opts = {name: dict(o) for name, o in (metric_opts or {}).items()}
        self.with_input = with_input
        self.rows: list[dict[str, Any]] = []
        self.unavailable: dict[str, str] = {}  # metric -> why the whole set has none
        # column (metric, or input_<metric>) -> [(image, why this image has no value)]
        self.missing: dict[str, list[tuple[str, str]]] = {}
        self._row_missing: list[dict[str, str]] = []  # per row: column -> reason
        self.seconds: list[float] = []

    def available(self, name: str) -> bool:
        return name not in self.unavailable

    def mark_unavailable(self, name: str, reason: str) -> None:
        self.unavailable.setdefault(name, reason)

    def add(self, image: str, values: dict[str, float], input_values: Optional[dict[str, float]] = None,
            seconds: Optional[float] = None, missing: Optional[dict[str, str]] = None) -> None:
        """One image's values. ``missing``: column (``<metric>`` or ``input_<metric>``) -> why this image has
        no value of it. A value that is not a finite number (NaN, inf) is recorded as missing, never kept."""
        row: dict[str, Any] = {'image': image}
        missing = dict(missing or {})
        for prefix, given in (('', values), ('input_', input_values or {})):
            for name, value in given.items():
                value = float(value)
                if math.isfinite(value):
                    row[prefix + name] = value
                else:
                    missing.setdefault(prefix + name, f'{value} (not a finite number)')
        for column, reason in missing.items():
            self.missing.setdefault(column, []).append((image, reason))
        self.rows.append(row)
        self._row_missing.append(missing)
        if seconds is not None:
            self.seconds.append(float(seconds))

    def _values(self, column: str) -> list[float]:
        return [r[column] for r in self.rows if column in r]

    def means(self, prefix: str = '') -> dict[str, float]:
        """Mean of each available metric over the images that have it (``prefix='input_'`` for the inputs'
        scores); a metric no image has is left out."""
        out = {}
        for name in self.metric_opts:
            if not self.available(name):
                continue
            vals = self._values(prefix + name)
            if vals:
                out[name] = float(np.mean(vals))
        return out

    def _reported(self, column: str) -> bool:
        """Whether a column (``<metric>`` or ``input_<metric>``) belongs to a metric reported for the set."""
        name = column[len('input_'):] if column.startswith('input_') and column not in self.metric_opts else column
        return name in self.metric_opts and self.available(name)

    def counts(self, prefix: str = '') -> dict[str, int]:
        """How many images each available metric's mean is over."""
        return {name: len(self._values(prefix + name)) for name in self.metric_opts if self.available(name)}

    def missing_summary(self) -> Optional[str]:
        """One line naming, per metric, how many images have no value of it and the first one's reason."""
        parts = []
        for column, entries in self.missing.items():
            if not self._reported(column):
                continue
            image, reason = entries[0]
            more = f' and {len(entries) - 1} more' if len(entries) > 1 else ''
            parts.append(f'{column} unavailable for {len(entries)} of {len(self.rows)} image(s) ({image}: {reason}'
                         f'{more})')
        if not parts:
            return None
        return '; '.join(parts) + '; the means are over the images that have a value.'

    def summary(self, **extra: Any) -> dict:
        metrics = {}
        means = self.means()
        input_means = self.means('input_') if self.with_input else {}
        counts = self.counts()
        input_counts = self.counts('input_') if self.with_input else {}
        for name, opt in self.metric_opts.items():
            entry = dict(opt)
            if not self.available(name):
                entry['unavailable'] = self.unavailable[name]
            elif name not in means and self.missing.get(name):
                entry['unavailable'] = f'no image of the set has a value: {self.missing[name][0][1]}'
            else:
                entry['mean'] = means.get(name)
                entry['images'] = counts.get(name, 0)
                if self.with_input:
                    entry['input_mean'] = input_means.get(name)
                    entry['input_images'] = input_counts.get(name, 0)
            if self.available(name):
                for prefix in ('', 'input_'):
                    if self.missing.get(prefix + name):
                        entry[f'{prefix}unavailable_images'] = dict(self.missing[prefix + name])
            metrics[name] = entry
        out = {'dataset': self.dataset_name, 'images': len(self.rows), 'metrics': metrics}
        if self.seconds:
            out['seconds_per_image'] = float(np.mean(self.seconds))
        out.update(extra)
        return out

    def csv_text(self) -> str:
        columns = ['image'] + [n for n in self.metric_opts if self.available(n)]
        if self.with_input:
            columns += [f'input_{n}' for n in self.metric_opts if self.available(n)]
        # per image: the columns it has no value of, and why (an empty cell in those columns)
        notes = {i: '; '.join(f'{c}: {why}' for c, why in missing.items() if c in columns)
                 for i, missing in enumerate(self._row_missing)}
        notes = {i: text for i, text in notes.items() if text}
        if notes:
            columns.append('unavailable')
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction='ignore', lineterminator='\n')
        writer.writeheader()
        for i, row in enumerate(self.rows):
            cells = {k: (f'{v:.6f}' if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
            if i in notes:
                cells['unavailable'] = notes[i]
            writer.writerow(cells)
        return buf.getvalue()

    def write(self, folder: str, stem: Optional[str] = None, **extra: Any) -> tuple[str, str]:
        """Write ``folder/<stem>.csv`` and ``folder/<stem>.json`` (stem defaults to the set's name)."""
        stem = stem or self.dataset_name.replace(os.sep, '_')
        csv_path = os.path.join(folder, f'{stem}.csv')
        json_path = os.path.join(folder, f'{stem}.json')
        atomic_write(csv_path, lambda f: f.write(self.csv_text().encode('utf-8')))
        write_json(json_path, self.summary(**extra))
        return csv_path, json_path


class SetAverage:
    """The mean over several evaluation sets of each set's mean: the "Average" column of all-in-one tables.

    Sets report one at a time (BasicSR validates its loaders in turn); a round is keyed by the iteration
    (or the test run's name) and is complete once every named set has reported in it. A metric is
    averaged over the sets that report it (a no-reference set has no PSNR), and the sets are named with
    the value, so an average over fewer sets is never mistaken for one over all of them.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._key: Any = None
        self._means: dict[str, dict[str, float]] = {}
        self._input_means: dict[str, dict[str, float]] = {}

    def add(self, key: Any, dataset_name: str, means: dict[str, float],
            input_means: Optional[dict[str, float]] = None) -> bool:
        """Record one set's means; True when this completes the round ``key``."""
        if dataset_name not in self.names:
            return False
        if key != self._key:
            self._key, self._means, self._input_means = key, {}, {}
        self._means[dataset_name] = dict(means)
        self._input_means[dataset_name] = dict(input_means or {})
        return len(self._means) == len(self.names)

    def _average(self, per_set: dict[str, dict[str, float]]) -> dict[str, tuple[float, list[str]]]:
        out: dict[str, tuple[float, list[str]]] = {}
        metrics = [m for name in self.names for m in per_set.get(name, {})]
        for metric in dict.fromkeys(metrics):  # first-seen order
            sets = [name for name in self.names if metric in per_set.get(name, {})]
            out[metric] = (float(np.mean([per_set[name][metric] for name in sets])), sets)
        return out

    def means(self) -> dict[str, tuple[float, list[str]]]:
        """metric -> (mean over the sets that report it, those sets), for the current round."""
        return self._average(self._means)

    def input_means(self) -> dict[str, tuple[float, list[str]]]:
        return self._average(self._input_means)

    def summary(self, **extra: Any) -> dict:
        inputs = self.input_means()
        metrics = {}
        for metric, (value, sets) in self.means().items():
            metrics[metric] = {'mean': value, 'sets': sets}
            if metric in inputs:
                metrics[metric]['input_mean'] = inputs[metric][0]
        out = {'average_of': self.names, 'metrics': metrics,
               'per_set': {name: self._means.get(name, {}) for name in self.names}}
        out.update(extra)
        return out

    def write(self, path: str, **extra: Any) -> str:
        return write_json(path, self.summary(**extra))
