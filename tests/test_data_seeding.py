"""Per-sample random draws of the training data: fresh every epoch, independent of the loader workers,
exact on resume."""
from __future__ import annotations

import pickle
import random
import sys
from pathlib import Path

import basicsr.train
import numpy as np
import pytest
import torch
import yaml
from basicsr.data import build_dataloader, build_dataset
from basicsr.data.data_sampler import EnlargedSampler

from baryir_plugin import compat
from baryir_plugin.data import SampleIndex

from .conftest import OPTIONS, copy_for_resume, run
from .test_baryir_model import _DRIVER, _losses

MODEL_YML = OPTIONS / 'train_baryir_model.yml'
SEED = 7


def _train_data(**overrides) -> dict:
    """The train set of the model tests (noise on the fly + rain pairs, crop 32 of 48x48 tiles, all 8
    dihedral transforms), with channel permutation, as BasicSR hands it to build_dataset."""
    data_opt = yaml.safe_load(MODEL_YML.read_text())['datasets']['train']
    data_opt.update(phase='train', scale=1, channel_permute=True, manual_seed=SEED)
    data_opt.update(overrides)
    return data_opt


def _sampler(dataset, num_replicas: int = 1, rank: int = 0, ratio: int = 1):
    """The sampler BasicSR's train pipeline builds (EnlargedSampler, as the resume_position patch has it)."""
    return basicsr.train.EnlargedSampler(dataset, num_replicas, rank, ratio)


def _epochs(data_opt: dict, epochs=(0, 1)) -> dict[int, dict[int, torch.Tensor]]:
    """{epoch: {slot: lq and gt stacked}} through BasicSR's build_dataloader and the plugin's sampler."""
    dataset = build_dataset(data_opt)
    sampler = _sampler(dataset)
    loader = build_dataloader(dataset, data_opt, num_gpu=0, dist=False, sampler=sampler, seed=SEED)
    out = {}
    for epoch in epochs:
        sampler.set_epoch(epoch)
        slots = [i.slot for i in sampler]
        pairs = torch.cat([torch.stack([b['lq'], b['gt']], 1) for b in loader])
        out[epoch] = dict(zip(slots, pairs))  # drop_last: the last slots of the epoch have no batch
    return out


def test_sample_index_is_an_int_that_pickles_with_its_epoch_and_slot():
    index = SampleIndex(3, epoch=2, slot=19)
    assert index == 3 and hash(index) == hash(3) and [0, 1, 2, 3][index] == 3
    for copy in (pickle.loads(pickle.dumps(index)), pickle.loads(pickle.dumps([index]))[0]):
        assert type(copy) is SampleIndex and (int(copy), copy.epoch, copy.slot) == (3, 2, 19)


def test_sampler_keeps_basicsr_order_with_unique_slots(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    dataset = build_dataset(_train_data())
    n = len(dataset)
    ranks = []
    for rank in (0, 1):
        ours, theirs = _sampler(dataset, 2, rank, ratio=3), EnlargedSampler(dataset, 2, rank, ratio=3)
        ours.set_epoch(4)
        theirs.set_epoch(4)
        indices = list(ours)
        assert [int(i) for i in indices] == list(theirs)
        assert all(i.epoch == 4 and i.slot % n == i for i in indices)
        ranks.append([i.slot for i in indices])
    slots = ranks[0] + ranks[1]
    assert sorted(slots) == list(range(3 * n))  # every slot once over the ranks and the enlarge repeats
    # the same image at two slots of one epoch (dataset_enlarge_ratio) gets its own draws at each
    assert not torch.equal(dataset[SampleIndex(0, 4, 0)]['lq'], dataset[SampleIndex(0, 4, n)]['lq'])


def test_draws_are_fresh_every_epoch_and_the_same_whatever_the_workers(workdir, monkeypatch):
    """(epoch, slot) fixes a sample's noise, crop, flips and channel order: 0 workers, 2 workers and 2
    persistent workers give the same samples; two epochs give different ones for every index."""
    monkeypatch.chdir(workdir)
    inline = _epochs(_train_data(num_worker_per_gpu=0))
    workers = _epochs(_train_data(num_worker_per_gpu=2))
    persistent = _epochs(_train_data(num_worker_per_gpu=2, persistent_workers=True))
    n = len(build_dataset(_train_data()))
    for epoch in (0, 1):
        assert len(inline[epoch]) == n - n % 3
        for other in (workers, persistent):
            assert inline[epoch].keys() == other[epoch].keys()
            for slot, pair in inline[epoch].items():
                assert torch.equal(pair, other[epoch][slot]), f'epoch {epoch} slot {slot}'
    common = inline[0].keys() & inline[1].keys()
    assert len(common) >= n - 2
    for slot in common:  # lq differs (noise, crop, flips or colours); the gt crop at least in most
        assert not torch.equal(inline[0][slot][0], inline[1][slot][0]), f'slot {slot} repeats its draws'
    assert sum(not torch.equal(inline[0][s][1], inline[1][s][1]) for s in common) >= len(common) - 1


def test_a_sample_in_the_main_process_leaves_the_global_streams_alone(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    dataset = build_dataset(_train_data())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = dataset[SampleIndex(2, epoch=1, slot=2)]
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    again = dataset[SampleIndex(2, epoch=1, slot=2)]
    assert torch.equal(first['lq'], again['lq']) and torch.equal(first['gt'], again['gt'])
    # a plain index (any other sampler) draws from the global streams, as BasicSR's datasets do
    random.seed(1)
    np.random.seed(1)
    plain = dataset[2]
    assert random.getstate() != before[0]
    random.seed(1)
    np.random.seed(1)
    assert torch.equal(dataset[2]['lq'], plain['lq'])
    unseeded = build_dataset(_train_data(manual_seed=None))  # no seed: the global streams too
    random.seed(1)
    np.random.seed(1)
    assert torch.equal(unseeded[SampleIndex(2, epoch=1, slot=2)]['lq'], plain['lq'])


@pytest.mark.parametrize('kind', ['GaussianNoiseDataset', 'StemMatchedPairedDataset', 'JPEGCompressionDataset'])
def test_the_plugin_datasets_seed_their_draws_as_train_sets(workdir, kind):
    tiny = workdir / 'datasets' / 'tiny' / 'train'
    opt = {'name': kind, 'type': kind, 'phase': 'train', 'gt_size': 32, 'manual_seed': SEED,
           'dataroot_gt': str(tiny / 'clean')}
    if kind == 'GaussianNoiseDataset':
        opt.update(sigmas=[25])
    elif kind == 'StemMatchedPairedDataset':
        opt.update(dataroot_gt=str(tiny / 'rain' / 'gt'), dataroot_lq=str(tiny / 'rain' / 'lq'))
    dataset = build_dataset(opt)
    a, b = dataset[SampleIndex(1, epoch=0, slot=1)], dataset[SampleIndex(1, epoch=0, slot=1)]
    assert torch.equal(a['lq'], b['lq']) and torch.equal(a['gt'], b['gt'])
    assert not torch.equal(a['lq'], dataset[SampleIndex(1, epoch=1, slot=1)]['lq'])


def test_the_seed_reaches_the_train_set_and_loader_options_are_checked(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    train = _train_data()
    del train['manual_seed']
    opt = {'name': 'x', 'auto_resume': False, 'manual_seed': 11, 'path': {'resume_state': None},
           'datasets': {'train': train, 'val': {'name': 'v'}}}
    assert compat._load_resume_state(opt) is None
    assert opt['datasets']['train']['manual_seed'] == 11 and 'manual_seed' not in opt['datasets']['val']
    for bad in (-1, 1.5, True, 'seven'):
        with pytest.raises(ValueError, match='manual_seed must be a non-negative integer'):
            build_dataset(_train_data(manual_seed=bad))
    checks = [({'train': {'persistent_workers': True, 'num_worker_per_gpu': 0}}, 'set num_worker_per_gpu > 0'),
              ({'val': {'persistent_workers': True}}, 'datasets.val.persistent_workers'),
              ({'train': {'pin_memory': 'yes'}}, 'datasets.train.pin_memory must be true or false')]
    for datasets, message in checks:
        with pytest.raises(ValueError, match=message):
            compat.check_loader_options({'datasets': datasets})


def test_resume_with_loader_workers_reproduces_the_uninterrupted_run(workdir, tmp_path):
    """Two loader workers: 6 iterations straight vs. stop after 2 and --auto_resume (with persistent
    workers) give the same losses for iterations 3-6 (16 samples, batch 3: a mid-epoch resume and an
    epoch boundary at 5); a run without workers gives the same losses as the one with them."""
    driver = tmp_path / 'driver.py'
    driver.write_text(_DRIVER)

    def train(cwd: Path, record: Path, *force: str, resume: bool = False) -> dict[int, dict]:
        cmd = [sys.executable, str(driver), str(record), 'train', '-opt', str(MODEL_YML)]
        run(cmd + ['--auto_resume'] * resume + ['--force_yml', 'val:val_freq=1000', *force], cwd=cwd)
        return _losses(record)

    straight = train(workdir, tmp_path / 'straight.jsonl', 'datasets:train:num_worker_per_gpu=2')
    resumed_dir = copy_for_resume(workdir, tmp_path / 'resumed')
    resumed = train(resumed_dir, tmp_path / 'resumed.jsonl', 'datasets:train:num_worker_per_gpu=2',
                    'datasets:train:persistent_workers=true', resume=True)
    inline_dir = tmp_path / 'inline'
    inline_dir.mkdir()
    (inline_dir / 'datasets').symlink_to(workdir / 'datasets')
    inline = train(inline_dir, tmp_path / 'inline.jsonl', 'datasets:train:num_worker_per_gpu=0')

    assert sorted(straight) == sorted(inline) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [3, 4, 5, 6]
    for other, iters in ((resumed, (3, 4, 5, 6)), (inline, (1, 2, 3, 4, 5, 6))):
        for it in iters:
            assert straight[it].keys() == other[it].keys()
            for key, value in straight[it].items():
                assert other[it][key] == pytest.approx(value, abs=1e-5, nan_ok=True), \
                    f'iter {it} {key}: {other[it][key]} vs {value}'
