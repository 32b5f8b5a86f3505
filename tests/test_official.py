"""Official checkpoints: parity with the authors' network, and a loader that executes nothing."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from baryir_plugin import cli
from baryir_plugin.archs import BaryIR, BarycenterPotentials
from baryir_plugin.errors import CheckpointError
from baryir_plugin.official import UnsafeCheckpointError, convert_official, load_official, map_official_key

from .bad_input import assert_clean_error, run_inprocess
from .conftest import shared_path

TOL = 1e-4


def _fixture():
    root = shared_path('fixtures', 'reference_small')
    return root / 'official_format_checkpoint.pt', torch.load(root / 'expected_outputs.pt', weights_only=True)


def _build(entry: dict, cls):
    cfg = {k: v for k, v in entry['baryir_config'].items() if k != 'type'}
    net = cls(**cfg).eval()
    net.load_state_dict(entry['params'], strict=True)
    return net


def test_parity_with_reference_outputs(tmp_path):
    ckpt, expected = _fixture()
    out = tmp_path / 'baryir_small.pth'
    assert cli.main(['convert-official', str(ckpt), str(out)]) == 0
    net_g = torch.load(out, weights_only=True)  # a plain BasicSR state dict
    net_pot = torch.load(tmp_path / 'baryir_small_potential.pth', weights_only=True)

    cfg = expected['config']
    ours = net_g['baryir_config']
    for key in ('dim', 'num_blocks', 'num_refinement_blocks', 'heads', 'ffn_expansion_factor', 'LayerNorm_type'):
        assert ours[key] == cfg[key], key
    net = _build(net_g, BaryIR)
    with torch.no_grad():
        restored, z, z_bary, residual = net(expected['input'], return_latents=True)
    for name, ours_t in (('restored', restored), ('z', z), ('z_bary', z_bary), ('residual', residual)):
        err = (ours_t - expected[name]).abs().max().item()
        assert err <= TOL, f'{name}: max abs error {err:.3g}'

    assert net_pot['baryir_config']['patch_size'] == cfg['potential_patch_size']
    assert net_pot['baryir_config']['num_potentials'] == cfg['num_potentials']
    pots = _build(net_pot, BarycenterPotentials)
    with torch.no_grad():
        scores = pots(expected['potential_inputs'], torch.arange(cfg['num_potentials']))
    assert (scores - expected['potential_outputs']).abs().max().item() <= TOL


def test_converted_weights_load_through_basicsr(tmp_path):
    from basicsr.models.base_model import BaseModel

    ckpt, expected = _fixture()
    net_g, _ = convert_official(str(ckpt))
    path = tmp_path / 'g.pth'
    torch.save(net_g, path)
    cfg = {k: v for k, v in net_g['baryir_config'].items() if k != 'type'}
    net = BaryIR(**cfg)
    BaseModel({'num_gpu': 0, 'is_train': False, 'dist': False}).load_network(net, str(path), strict=True)
    with torch.no_grad():
        assert (net.eval()(expected['input']) - expected['restored']).abs().max() <= TOL


def test_unused_reference_modules_are_dropped_and_unknown_keys_refused():
    assert map_official_key('chnl_reduce3.weight') is None
    assert map_official_key('LN.body.weight') == 'latent_norm.weight'
    assert map_official_key('noise_level3.norm1.body.bias') == 'fuse_block.norm1.bias'
    assert map_official_key('resup4_3.body.0.weight') == 'residual_decoder.up3.conv.weight'
    with pytest.raises(KeyError, match='prompt1'):
        map_official_key('prompt1.linear_layer.weight')


class _SystemCall:
    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class _Eval:
    def __reduce__(self):
        return (eval, (f'open({self.marker!r}, "w").write("x")',))


@pytest.mark.parametrize('payload_cls, refused', [(_SystemCall, 'system'), (_Eval, r'(__builtin__|builtins)\.eval')])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, payload_cls, refused):
    payload = payload_cls()
    payload.marker = str(tmp_path / 'pwned')
    path = tmp_path / 'evil.pt'
    torch.save({'epoch': 1, 'BaryIR': payload, 'Pots': None}, path)
    with pytest.raises(UnsafeCheckpointError, match=refused):
        load_official(str(path))
    outcome = run_inprocess(cli.main, ['convert-official', str(path), str(tmp_path / 'out.pth')])
    assert_clean_error(outcome, 'baryir convert-official', str(path), 'not a module class of the official release')
    assert not (tmp_path / 'pwned').exists()
    assert not (tmp_path / 'out.pth').exists()


def test_malicious_payload_inside_an_official_looking_module_is_refused(tmp_path):
    """A `model_bary` class is only a stand-in: calling it through REDUCE cannot run anything either."""

    class Frame:  # pickles as a global named after the official module
        def __reduce__(self):
            return (pickle.loads, (b'cos\nsystem\n(S"true"\ntR.',))

    Frame.__module__, Frame.__qualname__ = 'model_bary', 'BaryNet'
    path = tmp_path / 'evil.pt'
    import sys
    import types
    fake = types.ModuleType('model_bary')
    fake.BaryNet = Frame
    sys.modules['model_bary'] = fake
    try:
        torch.save({'epoch': 1, 'BaryIR': Frame()}, path)
    finally:
        del sys.modules['model_bary']
    with pytest.raises(UnsafeCheckpointError, match='_pickle.loads|pickle.loads'):
        load_official(str(path))


def test_plain_state_dict_is_not_mistaken_for_a_release_file(tmp_path):
    path = tmp_path / 'plain.pth'
    torch.save({'params': {'w': torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match='not an official BaryIR release file'):
        load_official(str(path))
    with pytest.raises(CheckpointError, match='official checkpoint not found'):
        load_official(str(tmp_path / 'missing.pt'))
