"""``baryir complexity``: parameters by group, MACs (mmengine), latency/memory, JSON, and its bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from baryir_plugin import cli
from baryir_plugin.analysis import complexity
from baryir_plugin.archs import BaryIR, BarycenterPotentials
from baryir_plugin.archs.restormer_blocks import Attention

from .bad_input import assert_clean_error, run_inprocess
from .conftest import DEMO_NETWORK, REPO, shared_path

DEMO_OPT = str(REPO / 'options' / 'train_baryir_demo.yml')
# options/train_baryir_demo.yml's network_potential
DEMO_POTENTIALS = {'type': 'BarycenterPotentials', 'num_potentials': 5, 'in_channels': 64, 'patch_size': 48}
PROG = 'baryir complexity'


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is fastest, and steady on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _demo_net(**changes) -> BaryIR:
    options = {k: v for k, v in DEMO_NETWORK.items() if k != 'type'}
    return BaryIR(**{**options, **changes}).eval().requires_grad_(False)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _complexity(argv, cwd=None):
    outcome = run_inprocess(cli.main, ['complexity', *map(str, argv)], cwd=cwd)
    assert outcome.status == 0, outcome.text[-3000:]
    return outcome


# --------------------------------------------------------------------------------------------------
def test_option_file_groups_macs_and_json(tmp_path):
    out = tmp_path / 'report' / 'complexity.json'
    outcome = _complexity(['-opt', DEMO_OPT, '--size', 48, 48, '--no-latency', '--json', out])
    report = json.loads(out.read_text())
    total = _params(_demo_net())
    groups = report['parameters']['groups']
    assert [g['name'] for g in groups] == [name for name, _ in complexity.BARYIR_GROUPS]
    assert report['parameters']['total'] == total == sum(g['parameters'] for g in groups)
    assert all(g['present'] and g['parameters'] > 0 for g in groups)
    macs = report['macs']
    assert macs['total'] > 0 and macs['outside_groups'] == 0
    assert sum(macs['groups'].values()) == macs['total']
    assert macs['by_operator']['matmul'] > 0 and macs['not_counted']  # elementwise ops are listed, not hidden
    pots = report['potentials']
    assert 'network_potential' in pots['source']
    assert pots['parameters'] == _params(BarycenterPotentials(**{k: v for k, v in DEMO_POTENTIALS.items()
                                                                  if k != 'type'}))
    assert pots['latent'] == [64, 6, 6] and pots['macs'] > 0 and not pots['note']
    assert report['latency'] is None and report['memory'] is None and report['journal'] is not None
    text = outcome.out
    assert f'**{total:,}**' in text and 'barycenter map T' in text and 'machine: ' in text
    assert 'Not counted by mmengine' in text and 'aten::softmax' in text and f'wrote {out}' in text
    assert 'not measured (--no-latency)' in text


def test_weights_with_potentials_beside_them_and_latency(tmp_path, demo_checkpoint):
    """A training run's folder: net_potential_<iter>.pth beside net_g_<iter>.pth is found and named."""
    weights = tmp_path / 'net_g_5.pth'
    shutil.copy(demo_checkpoint, weights)
    pots = BarycenterPotentials(**{k: v for k, v in DEMO_POTENTIALS.items() if k != 'type'})
    torch.save({'params': pots.state_dict(), 'baryir_config': DEMO_POTENTIALS}, tmp_path / 'net_potential_5.pth')
    out = tmp_path / 'c.json'
    outcome = _complexity(['--weights', weights, '--size', 32, 40, '--warmup', 0, '--runs', 1, '--json', out])
    report = json.loads(out.read_text())
    assert 'net_potential_5.pth' in report['potentials']['source']
    assert report['potentials']['parameters'] == _params(pots)
    assert '6x6 latent, not 4x5' in report['potentials']['note']  # built for 48x48 crops
    assert report['parameters']['total'] == _params(_demo_net())
    assert report['latency']['runs'] == 1 and report['latency']['median_s'] > 0
    assert report['bary_map_latency']['median_s'] > 0 and report['bary_map_latent'] == [64, 4, 5]
    memory = report['memory']
    assert 'error' not in memory, memory
    assert memory['peak_mib'] >= memory['before_mib'] > 0 and memory['forward_mib'] >= 0
    assert 'network, one image' in outcome.out and 'Peak memory of one forward' in outcome.out
    assert 'net_g_5.pth' in outcome.out


def test_weights_without_potentials_say_none_were_found(tmp_path, demo_checkpoint):
    weights = tmp_path / 'model.pth'
    shutil.copy(demo_checkpoint, weights)
    outcome = _complexity(['--weights', weights, '--size', 16, 16, '--no-latency'])
    assert 'potentials: none found' in outcome.out and '--potentials FILE' in outcome.out
    # ... and convert-official's naming, <stem>_potential.pth, is found too
    pots = BarycenterPotentials(**{k: v for k, v in DEMO_POTENTIALS.items() if k != 'type'})
    torch.save({'params': pots.state_dict()}, tmp_path / 'model_potential.pth')  # no options: from the shapes
    outcome = _complexity(['--weights', weights, '--size', 16, 16, '--no-latency'])
    assert 'model_potential.pth, beside the weights' in outcome.out and "the weights' shapes" in outcome.out


def test_release_file_counts_its_own_potentials():
    release = shared_path('fixtures', 'reference_small', 'official_format_checkpoint.pt')
    outcome = _complexity(['--weights', release, '--size', 32, 32, '--no-latency'])
    assert f'potentials: the release file {release}' in outcome.out
    assert '| potentials (training only) | 3 branches |' in outcome.out


# --------------------------------------------------------------------------------------------------
def test_macs_grow_fourfold_and_attention_matmuls_are_counted():
    net = _demo_net()
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, key=name: shapes.__setitem__(key, (mod, inp[0].shape)))
             for name, m in net.named_modules() if isinstance(m, Attention)]
    small = complexity.count_macs(net, (torch.rand(1, 3, 16, 16),))
    for h in hooks:
        h.remove()
    # MDTA: q k^T and attn v, each B * C * (C / heads) * H * W multiply-accumulates
    expected = sum(2 * b * c * (c // mod.num_heads) * hh * ww for mod, (b, c, hh, ww) in shapes.values())
    assert len(shapes) > 10 and small.by_operator['matmul'] == expected
    large = complexity.count_macs(net, (torch.rand(1, 3, 32, 32),))
    assert large.total / small.total == pytest.approx(4.0, rel=0.01)
    groups, _ = complexity.count_parameters(net)
    assert complexity.group_macs(groups, large) == 0 and all(g.macs > 0 for g in groups)


def test_vit_barycenter_map_attention_is_counted():
    net = _demo_net(bary_map_type='vit')
    macs = complexity.count_macs(net, (torch.rand(1, 3, 64, 64),))
    # latent 64 channels, 8x8 tokens, 8 heads of 8: q k^T + attn v
    assert macs.by_operator['scaled_dot_product_attention'] == 8 * 64 * 64 * (8 + 8)


def test_every_parameter_lands_in_exactly_one_group():
    for changes in ({}, {'embedding_mode': 'original'}, {'bary_map_type': 'mlp'}):
        net = _demo_net(**changes)
        groups, total = complexity.count_parameters(net)
        assert sum(g.parameters for g in groups) == total == _params(net)
    groups, _ = complexity.count_parameters(_demo_net(embedding_mode='original'))
    absent = {g.name for g in groups if not g.present}
    assert absent == {'barycenter map T', 'residual decoder'}

    class Extended(BaryIR):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra_head = nn.Conv2d(3, 3, 1)

    with pytest.raises(RuntimeError, match='extra_head'):
        complexity.count_parameters(Extended(**{k: v for k, v in DEMO_NETWORK.items() if k != 'type'}))
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 3, 3))
    groups, total = complexity.count_parameters(other)
    assert [(g.name, g.parameters) for g in groups] == [('network', total)]


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('argv, prog, status, needles', [
    (['-opt', 'missing.yml'], PROG, 1, ['missing.yml', 'no such file']),
    ([], PROG, 2, ['-opt FILE.yml', '--weights CKPT']),
    (['-opt', DEMO_OPT, '--size', '0', '32'], PROG, 2, ['--size 0 32', 'positive']),
    (['-opt', DEMO_OPT, '--size', '32'], 'baryir complexity', 2, ['--size', 'expected 2 arguments']),
    (['-opt', DEMO_OPT, '--runs', '0'], 'baryir complexity', 2, ['--runs', 'at least 1']),
    (['-opt', DEMO_OPT, '--device', 'tpu'], PROG, 2, ["--device 'tpu'"]),
    (['--weights', 'nowhere.pth'], PROG, 1, ['nowhere.pth', 'no such file']),
], ids=['missing-opt', 'no-network', 'zero-size', 'one-size', 'zero-runs', 'bad-device', 'missing-weights'])
def test_bad_inputs_are_one_line(tmp_path, argv, prog, status, needles):
    outcome = run_inprocess(cli.main, ['complexity', *argv], cwd=tmp_path)
    assert_clean_error(outcome, prog, *needles, status=status)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    outcome = run_inprocess(cli.main, ['complexity', '-opt', DEMO_OPT, '--device', 'cuda'], cwd=tmp_path)
    assert_clean_error(outcome, PROG, '--device cuda', 'no CUDA device', status=2)


def test_bad_potentials_and_json_folder_are_one_line(tmp_path, demo_checkpoint):
    outcome = run_inprocess(cli.main, ['complexity', '--weights', str(demo_checkpoint), '--potentials',
                                       str(demo_checkpoint), '--no-latency', '--size', '16', '16'], cwd=tmp_path)
    assert_clean_error(outcome, PROG, '--potentials', 'not barycenter potentials', status=1)
    outcome = run_inprocess(cli.main, ['complexity', '-opt', DEMO_OPT, '--no-latency', '--json', str(tmp_path)],
                            cwd=tmp_path)
    assert_clean_error(outcome, PROG, '--json', 'is a folder', status=2)
