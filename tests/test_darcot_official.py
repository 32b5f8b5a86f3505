"""`baryir convert-official` on DA-RCOT's release format: our format out, the unused modules dropped, nothing
executed and every class outside the release's list refused by name."""
from __future__ import annotations

import os
import pickle
import sys
import types

import pytest
import torch

from baryir_plugin import cli
from baryir_plugin.archs import DARCOT, DARCOTPotential
from baryir_plugin.errors import CheckpointError
from baryir_plugin.official import (DARCOT_UNUSED_MODULES, UnsafeCheckpointError, convert_official, load_official,
                                    map_darcot_key, module_state_dict)

from .bad_input import assert_clean_error, run_inprocess
from .conftest import shared_path

TOL = 1e-4


def _fixture():
    root = shared_path('fixtures', 'darcot_small')
    return root / 'official_format_checkpoint.pt', torch.load(root / 'expected_outputs.pt', weights_only=True)


def _build(entry: dict, cls):
    net = cls(**{k: v for k, v in entry['baryir_config'].items() if k != 'type'}).eval()
    net.load_state_dict(entry['params'], strict=True)
    return net


def test_convert_official_writes_our_format(tmp_path):
    ckpt, expected = _fixture()
    out = tmp_path / 'darcot_small.pth'
    outcome = run_inprocess(cli.main, ['convert-official', str(ckpt), str(out)])
    assert outcome.status == 0, outcome.err
    assert 'type: DARCOT' in outcome.out and 'type: DARCOTPotential' in outcome.out
    net_g = torch.load(out, weights_only=True)  # plain tensors: no pickled code left
    net_pot = torch.load(tmp_path / 'darcot_small_potential.pth', weights_only=True)
    assert set(net_g) == set(net_pot) == {'params', 'baryir_config'}
    assert net_g['baryir_config']['type'] == 'DARCOT' and net_pot['baryir_config']['type'] == 'DARCOTPotential'
    with torch.no_grad():
        restored = _build(net_g, DARCOT)(expected['input'])
        scores = _build(net_pot, DARCOTPotential)(expected['potential_inputs'])
    assert (restored - expected['restored']).abs().max() <= TOL
    assert (scores - expected['potential_outputs']).abs().max() <= TOL


def test_the_unused_modules_are_dropped_and_every_other_tensor_kept():
    ckpt, _ = _fixture()
    release = load_official(str(ckpt))
    official = module_state_dict(release['Tnet'])
    net_g, net_pot = convert_official(str(ckpt))
    dropped = {k.split('.', 1)[0] for k in official} - {k.split('.', 1)[0] for k in official if map_darcot_key(k)}
    assert dropped == set(DARCOT_UNUSED_MODULES) and len(DARCOT_UNUSED_MODULES) == 13
    kept = [k for k in official if map_darcot_key(k) is not None]
    assert len(net_g['params']) == len(kept)
    for key in kept:
        assert torch.equal(net_g['params'][map_darcot_key(key)], official[key]), key
    # the converted tensors own their memory (the release shares one storage)
    storages = {t.untyped_storage().data_ptr() for t in net_g['params'].values()}
    assert len(storages) == len(net_g['params'])
    assert set(net_pot['params']) == set(module_state_dict(release['Fnet']))


def test_key_map():
    assert map_darcot_key('patch_embed.proj.weight') == 'embed.weight'
    assert map_darcot_key('noise_level3.norm1.body.weight') == 'fuse_block.norm1.weight'
    assert map_darcot_key('resreduce_noise_level3.weight') == 'regm.fuse_proj.weight'
    assert map_darcot_key('reduce_noise_level3.weight') == 'fuse_proj.weight'
    assert map_darcot_key('reslatent.0.attn.temperature') == 'regm.latent.0.attn.temperature'
    assert map_darcot_key('up4_3.body.0.weight') == 'up3.conv.weight'
    for module in DARCOT_UNUSED_MODULES:
        assert map_darcot_key(f'{module}.weight') is None
    with pytest.raises(KeyError, match='prompt1'):
        map_darcot_key('prompt1.linear_layer.weight')


def test_infer_reads_a_release_file_directly():
    from baryir_plugin.inference.weights import read_weights

    ckpt, _ = _fixture()
    weights = read_weights(str(ckpt))
    assert weights.kind == 'official release' and weights.options['type'] == 'DARCOT'


def _release_module(monkeypatch, **classes):
    """A fake `model_res` module, so that torch.save pickles objects under its class names."""
    fake = types.ModuleType('model_res')
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__, cls.__name__ = 'model_res', name, name
        setattr(fake, name, cls)
    monkeypatch.setitem(sys.modules, 'model_res', fake)
    return fake


def test_a_class_outside_the_release_is_refused_by_name(tmp_path, monkeypatch):
    fake = _release_module(monkeypatch, MRCNet=type('MRCNet', (), {}), Backdoor=type('Backdoor', (), {}))
    tnet = fake.MRCNet()
    tnet.hook = fake.Backdoor()
    path = tmp_path / 'evil.pth'
    torch.save({'epoch': 1, 'Tnet': tnet, 'Fnet': None}, path)
    with pytest.raises(UnsafeCheckpointError, match="model_res.Backdoor"):
        load_official(str(path))


def test_a_torch_layer_the_release_does_not_use_is_refused_by_name(tmp_path, monkeypatch):
    fake = _release_module(monkeypatch, MRCNet=type('MRCNet', (torch.nn.Module,), {}))
    tnet = fake.MRCNet()
    tnet.act = torch.nn.ReLU()
    path = tmp_path / 'relu.pth'
    torch.save({'epoch': 1, 'Tnet': tnet}, path)
    with pytest.raises(UnsafeCheckpointError, match=r'torch\.nn\.modules\.activation\.ReLU'):
        load_official(str(path))


def test_code_in_a_release_file_is_never_run(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    path = tmp_path / 'evil.pth'
    torch.save({'epoch': 1, 'Tnet': Payload(), 'Fnet': None}, path)
    outcome = run_inprocess(cli.main, ['convert-official', str(path), str(tmp_path / 'out.pth')])
    assert_clean_error(outcome, 'baryir convert-official', str(path), 'system')
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()

    class Frame:  # a release class name whose reduction calls pickle.loads
        def __reduce__(self):
            return (pickle.loads, (b'cos\nsystem\n(S"true"\ntR.',))
    _release_module(monkeypatch, MRCNet=Frame)
    torch.save({'epoch': 1, 'Tnet': Frame()}, path)
    with pytest.raises(UnsafeCheckpointError, match='pickle.loads'):
        load_official(str(path))


def test_other_backbones_of_the_release_are_named(tmp_path, monkeypatch):
    fake = _release_module(monkeypatch, MRCNet=type('MRCNet', (torch.nn.Module,), {}))
    tnet = fake.MRCNet()
    tnet.decoder = False
    path = tmp_path / 'nodecoder.pth'
    torch.save({'epoch': 1, 'Tnet': tnet}, path)
    with pytest.raises(CheckpointError, match='decoder=False'):
        convert_official(str(path))
