"""The paper recipes and benchmark test files: they parse with BasicSR's own option parser, follow the
dataset layout of docs/datasets.md, and build the full model and every dataset on a synthetic tree."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from basicsr.data import build_dataset
from basicsr.models import build_model
from basicsr.utils.options import parse_options

from baryir_plugin.cli import resolve_data_root
from baryir_plugin.data.layout import SETS, select
from baryir_plugin.models.baryir_model import BaryIRModel

from .conftest import REPO, shared_path
from .fake_tree import make_fake_tree

OPTIONS = REPO / 'options'
RECIPES = {'3deg': ['noise', 'rain', 'haze'], '5deg': ['noise', 'rain', 'haze', 'blur', 'lowlight']}
LAYOUT_FOLDERS = {f'datasets/{f}': s for s in SETS for f in s.folders}


def _parse(path: Path, root: Path, monkeypatch, is_train: bool) -> dict:
    """BasicSR's own parse_options on a file, relative paths resolved from ``root``."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(path)])
    opt, _ = parse_options(str(root), is_train=is_train)
    return opt


def _dataset_entries(opt: dict):
    for key, entry in opt['datasets'].items():
        for source in entry.get('sources', [entry]):
            yield key, source


@pytest.fixture(scope='module')
def fake_root(tmp_path_factory) -> Path:
    """A project folder whose datasets/ follows the layout (images large enough for 128 crops)."""
    root = tmp_path_factory.mktemp('recipes')
    make_fake_tree(root / 'datasets', size=(136, 132))
    return root


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_recipe_paths_and_rules_follow_the_layout(recipe):
    opt = yaml.safe_load((OPTIONS / f'train_baryir_{recipe}.yml').read_text())
    sources = opt['datasets']['train']['sources']
    assert [s['name'] for s in sources] == RECIPES[recipe]
    assert opt['network_potential']['num_potentials'] == len(sources)
    assert opt['network_potential']['in_channels'] == 8 * opt['network_g']['dim']
    assert opt['network_potential']['patch_size'] == opt['datasets']['train']['gt_size'] == 128
    for _, entry in _dataset_entries(opt):
        for key in ('dataroot_lq', 'dataroot_gt'):
            if key in entry:
                layout_set = LAYOUT_FOLDERS.get(entry[key])
                assert layout_set is not None, f'{recipe}: {entry[key]} is not a folder of docs/datasets.md'
                if entry.get('lq_to_gt') or layout_set.lq_to_gt:
                    assert tuple(entry['lq_to_gt']) == tuple(layout_set.lq_to_gt), entry['name']


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_recipe_schedule_matches_the_reference_epochs(recipe):
    """Iterations = epochs x samples per epoch / batch, from the sources' reference sizes and repeats."""
    opt = yaml.safe_load((OPTIONS / f'train_baryir_{recipe}.yml').read_text())
    train = opt['datasets']['train']
    sizes = {s.key.split('/')[1]: s.expected_lq for s in select([f'{recipe}-train'])}
    per_epoch = sum(sizes[s['name']] * len(s.get('sigmas', [1])) * s.get('repeat', 1) for s in train['sources'])
    iters_per_epoch = per_epoch // train['batch_size_per_gpu']
    epochs, decay = {'3deg': (56, 50), '5deg': (57, 31)}[recipe]
    assert opt['train']['total_iter'] == epochs * iters_per_epoch
    assert opt['train']['scheduler']['milestones'] == [decay * iters_per_epoch]
    assert opt['val']['val_freq'] == iters_per_epoch
    for key in ('optim_g', 'optim_potential'):
        assert opt['train'][key] == {'type': 'RMSprop', 'lr': 1e-4, 'alpha': 0.99, 'eps': 1e-8}


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_lmdb_twin_differs_only_in_storage(recipe):
    disk = yaml.safe_load((OPTIONS / f'train_baryir_{recipe}.yml').read_text())
    lmdb = yaml.safe_load((OPTIONS / f'train_baryir_{recipe}_lmdb.yml').read_text())
    assert lmdb['datasets']['train']['io_backend'] == {'type': 'lmdb'}
    for d, l in zip(disk['datasets']['train']['sources'], lmdb['datasets']['train']['sources']):
        for key in ('dataroot_lq', 'dataroot_gt'):
            if key in d:
                folder = d[key][len('datasets/'):]
                assert d[key] in LAYOUT_FOLDERS and l[key] == f'datasets_lmdb/{folder}.lmdb'  # make_lmdb's output
                l[key] = d[key]
    lmdb['datasets']['train']['io_backend'] = disk['datasets']['train']['io_backend']
    lmdb['name'] = disk['name']
    assert lmdb == disk


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_recipe_builds_full_model_and_datasets_on_a_layout_tree(recipe, fake_root, monkeypatch):
    opt = _parse(OPTIONS / f'train_baryir_{recipe}.yml', fake_root, monkeypatch, is_train=True)
    train = build_dataset(copy.deepcopy(opt['datasets']['train']))
    assert train.source_names == RECIPES[recipe]
    for i, name in enumerate(train.source_names):
        sample = train[sum(train.source_counts[:i])]  # the first sample of source i
        assert sample['source_id'].item() == i
        assert sample['lq'].shape == sample['gt'].shape == (3, 128, 128), name
    assert build_dataset(copy.deepcopy(opt['datasets']['val'])).__len__() > 0
    torch.manual_seed(0)
    model = build_model(opt)  # the full default network, both optimizers and schedulers
    assert sum(p.numel() for p in model.net_g.parameters()) == 53_549_774
    assert model.source_names == RECIPES[recipe]
    assert torch.allclose(model.lambdas.sum(), torch.tensor(1.0))
    assert [type(o).__name__ for o in model.optimizers] == ['RMSprop', 'RMSprop']
    assert [s.milestones for s in model.schedulers] == [{opt['train']['scheduler']['milestones'][0]: 1}] * 2


@pytest.mark.parametrize('name', ['3deg', '5deg', 'ood'])
def test_benchmark_test_files_build_every_set_on_a_layout_tree(name, fake_root, monkeypatch):
    path = OPTIONS / f'test_baryir_{name}.yml'
    raw = yaml.safe_load(path.read_text())
    trained = yaml.safe_load((OPTIONS / 'train_baryir_5deg.yml').read_text())
    assert raw['network_g'] == trained['network_g']  # tests the network the recipes train
    opt = _parse(path, fake_root, monkeypatch, is_train=False)
    for _, entry in _dataset_entries(opt):
        for key in ('dataroot_lq', 'dataroot_gt'):
            if key in entry:
                assert entry[key].replace(os.sep, '/').split('datasets/', 1)[1] in {f for s in SETS for f in s.folders}
        for metric in entry.get('metrics', []):
            assert metric in opt['val']['metrics'], (entry['name'], metric)
        dataset = build_dataset(copy.deepcopy(entry))
        sample = dataset[0]
        assert sample['lq'].shape == sample['gt'].shape, entry['name']
    names = [e['name'] for _, e in _dataset_entries(opt)]
    assert len(names) == len(set(names))
    average = BaryIRModel._set_average(opt, is_train=False).names  # val.average names real sets
    assert average == ([n for n in names if n.startswith('CDD-11_')] if name == 'ood' else names)
    assert len(average) == (11 if name == 'ood' else 5)


def test_shared_data_test_file_builds_every_real_set(tmp_path):
    data = shared_path('data')
    resolved = Path(resolve_data_root(str(OPTIONS / 'test_baryir_shared_data.yml'), str(data), str(tmp_path)))
    opt = yaml.safe_load(resolved.read_text())
    sizes = {}
    for entry in opt['datasets'].values():
        entry['phase'] = 'test'
        entry.setdefault('scale', 1)
        sizes[entry['name']] = len(build_dataset(entry))
    assert sizes == {'Rain100L': 100, 'CBSD68_sigma15': 68, 'CBSD68_sigma25': 68, 'CBSD68_sigma50': 68,
                     'Rain100H': 100, 'CBSD68_sigma60': 68, 'CBSD68_sigma75': 68, 'Kodak24_sigma25': 24,
                     'Kodak24_sigma50': 24, 'McMaster_sigma25': 18, 'McMaster_sigma50': 18, 'RNI15': 15}
    assert BaryIRModel._set_average(opt, is_train=False).names == [
        'Rain100L', 'CBSD68_sigma15', 'CBSD68_sigma25', 'CBSD68_sigma50']
