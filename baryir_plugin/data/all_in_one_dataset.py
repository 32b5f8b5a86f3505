"""A mixture of K degradation sources for all-in-one training."""
from __future__ import annotations

import bisect
import copy
import itertools
import random
from typing import Any

import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from ..errors import OptionError
from . import checks
from .seeding import SeededDraws

# Options every source inherits from the AllInOneDataset entry unless it sets its own.
_SHARED_KEYS = ('phase', 'scale', 'gt_size', 'use_hflip', 'use_rot', 'io_backend', 'mean', 'std', 'color',
                'filename_tmpl')
_OWN_KEYS = ('name', 'repeat', 'labels')


@DATASET_REGISTRY.register()
class AllInOneDataset(SeededDraws, data.Dataset):
    """K degradation sources in one dataset; each sample says which source and fine degradation it is.

    Options (YAML):
        sources: list of source entries. Each is the options of any registered BasicSR dataset
            (``type: PairedImageDataset`` on disk or LMDB, ``type: GaussianNoiseDataset`` for clean
            images with on-the-fly noise, ...) plus
              name: the source's name (unique; the index of the source's potential and lambda),
              repeat: how many times the source is repeated per epoch (default 1),
              labels: fine degradation labels (default: the source's own ``degradation_names`` if it has
                      them, e.g. one per noise sigma, else ``[name]``).
        gt_size, use_hflip, use_rot, io_backend, mean, std, filename_tmpl: shared by every source unless
            it sets its own. In the train phase each source crops at random (aligned LQ/GT crop) and
            applies all 8 dihedral transforms (identity included, unlike the reference).
        channel_permute: train phase only: also shuffle the colour channels of each pair (one of the 6
            orders, the same for lq and gt). Default false. It multiplies the colours a small set of photos
            offers, for degradations that treat the channels alike (noise, rain, haze, blur, low light);
            leave it off where the channels differ physically (underwater colour casts) or when
            ``mean``/``std`` normalise per channel.
        manual_seed: the run's seed (BasicSR's top-level ``manual_seed``, copied here by the compat
            patches; set it yourself when you build the dataset outside BasicSR's training pipeline).
            With it, a training sample indexed by the plugin's sampler (a ``SampleIndex``, which carries
            the epoch) draws its crop, flips, noise and channel order from a hash of (seed, epoch,
            slot): fresh draws every epoch, and the same draws whatever the number of loader workers,
            ``persistent_workers`` or a resume. A plain integer index draws from the global streams.

    Every sample gets ``source_id`` (index in ``source_names``) and ``degradation_id`` (index in
    ``degradation_names``). ``source_counts`` are the per-source sample counts after repeats, from which
    BaryIRModel derives the barycenter weights (it rebuilds the dataset from the same options: only
    file lists are read).
    """

    provides_sources = True  # BaryIRModel reads source_names / source_counts / degradation_names
    # the options it reads (checked when it is built: an unknown one is an error); sources are checked against
    # their own type's options plus _OWN_KEYS
    option_keys = ('sources', 'channel_permute', 'manual_seed') + _SHARED_KEYS

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        # sources are datasets.<entry>.sources[i] in messages
        self.where = checks.current_where() or f'datasets.{opt.get("phase", "train")}'
        entries = opt.get('sources')
        if not isinstance(entries, list) or not entries:
            raise OptionError(f'{self.where} (AllInOneDataset {opt.get("name", "unnamed")}): option `sources` must be '
                              'a non-empty list of dataset entries, each with a `name` and a `type`.')
        self.source_names: list[str] = []
        self.sources: list[data.Dataset] = []
        self.repeats: list[int] = []
        self.degradation_names: list[str] = []
        self._label_ids: list[list[int]] = []  # per source: its local label index -> global degradation id
        self.channel_permute = bool(opt.get('channel_permute', False)) and opt.get('phase') == 'train'
        who = f'AllInOneDataset ({opt.get("name", "unnamed")})'
        self._read_seed(opt, who)
        for i, entry in enumerate(entries):
            self._add_source(i, entry)
        self.source_counts = [len(ds) * r for ds, r in zip(self.sources, self.repeats)]
        self._ends = list(itertools.accumulate(self.source_counts))  # end index of each source
        logger = get_root_logger()
        for name, ds, r, n in zip(self.source_names, self.sources, self.repeats, self.source_counts):
            logger.info(f'AllInOneDataset source {name!r}: {len(ds)} samples x {r} = {n}')

    def _add_source(self, i: int, entry: Any) -> None:
        where = f'{self.where}.sources[{i}]'
        if not isinstance(entry, dict) or 'type' not in entry or 'name' not in entry:
            raise OptionError(f'AllInOneDataset: {where} needs `name` and `type` (a registered BasicSR dataset), '
                              f'got {entry!r}.')
        name = str(entry['name'])
        if name in self.source_names:
            raise OptionError(f'AllInOneDataset: {where}: source name {name!r} appears twice; names must be unique.')
        checks.check_dataset_keys(entry, where, own=_OWN_KEYS, source=True)
        repeat = entry.get('repeat', 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise OptionError(f'AllInOneDataset: {where} ({name}) repeat must be an integer >= 1, got {repeat!r}.')
        sub = {k: copy.deepcopy(v) for k, v in entry.items() if k not in _OWN_KEYS}
        reads, _ = checks.dataset_option_keys(entry['type'])  # None: not known, so every shared option is passed
        for key in _SHARED_KEYS:
            if key not in sub and key in self.opt and (reads is None or key in reads or key in checks.ENTRY_KEYS):
                sub[key] = copy.deepcopy(self.opt[key])
        sub.setdefault('scale', 1)
        sub['name'] = f'{self.opt.get("name", "all_in_one")}/{name}'
        dataset = checks.build_checked(sub, where=where)  # names where.dataroot_* etc.; refuses an empty source
        labels = entry.get('labels') or getattr(dataset, 'degradation_names', None) or [name]
        ids = []
        for label in labels:
            label = str(label)
            if label not in self.degradation_names:
                self.degradation_names.append(label)
            ids.append(self.degradation_names.index(label))
        self.source_names.append(name)
        self.sources.append(dataset)
        self.repeats.append(repeat)
        self._label_ids.append(ids)

    def source_index(self, name: str) -> int:
        """Index of a source by name (the index of its potential and barycenter weight)."""
        try:
            return self.source_names.index(name)
        except ValueError:
            raise KeyError(f'AllInOneDataset: no source named {name!r}; sources are {self.source_names}.') from None

    def _permute_channels(self, sample: dict, source: int) -> None:
        """One random order of the colour channels (1 of 6, python's ``random``), the same for lq and gt."""
        if sample['lq'].shape[0] != 3 or sample['gt'].shape[0] != 3:
            raise OptionError(f'AllInOneDataset ({self.opt.get("name", "unnamed")}): channel_permute needs 3-channel '
                              f'images, but source {self.source_names[source]!r} gives lq {tuple(sample["lq"].shape)} '
                              f'and gt {tuple(sample["gt"].shape)}; turn channel_permute off for Y-channel or grey '
                              'data.')
        order = torch.tensor(random.sample(range(3), 3))
        sample['lq'], sample['gt'] = sample['lq'][order], sample['gt'][order]

    def __len__(self) -> int:
        return self._ends[-1]

    def _sample(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        source = bisect.bisect_right(self._ends, index)
        start = self._ends[source - 1] if source else 0
        dataset = self.sources[source]
        sample = dict(dataset[(index - start) % len(dataset)])
        local = int(sample.pop('degradation', 0))
        ids = self._label_ids[source]
        if local >= len(ids):
            raise OptionError(f'AllInOneDataset: source {self.source_names[source]!r} returned degradation {local} '
                              f'but has only {len(ids)} labels {ids}; set its `labels` option.')
        if self.channel_permute:
            self._permute_channels(sample, source)
        sample['source_id'] = torch.tensor(source)
        sample['degradation_id'] = torch.tensor(ids[local])
        return sample
