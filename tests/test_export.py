"""`baryir export-onnx` and `baryir export-safetensors` on the demo network: the ONNX graph runs at any
size and agrees with PyTorch, the safetensors file gives back the same weights and options, and bad
input is one line."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml

from baryir_plugin import cli
from baryir_plugin.checkpoints import NETWORK_OPTIONS_KEY
from baryir_plugin.errors import CheckpointError
from baryir_plugin.inference.export import looks_like_safetensors, read_safetensors, write_safetensors
from baryir_plugin.inference.weights import load_network

from .bad_input import assert_clean_error, run_inprocess
from .conftest import DEMO_NETWORK

ONNX = 'baryir export-onnx'
# Both sides compute in float32 with other kernels, so the differences are rounding: measured at
# 0.6e-6..1.2e-6 on the demo network (outputs up to about 2.4, where a float32 step is 2.4e-7).
# 1e-5 (torch.testing's float32 atol) leaves about 10x for other CPUs' kernels, and is far below
# anything visible (an 8-bit grey level is 3.9e-3).
TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def demo_onnx(demo_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp('onnx') / 'demo.onnx'
    outcome = run_inprocess(cli.main, ['export-onnx', '--weights', str(demo_checkpoint), '-o', str(out)])
    assert outcome.status == 0, outcome.text
    return out, outcome


@pytest.fixture(scope='module')
def demo_session(demo_onnx):
    import onnxruntime as ort

    return ort.InferenceSession(str(demo_onnx[0]), providers=['CPUExecutionProvider'])


@pytest.fixture(scope='module')
def demo_net(demo_checkpoint):
    return load_network(str(demo_checkpoint), log=lambda _: None).net


@pytest.mark.parametrize('shape', [(1, 3, 40, 56), (1, 3, 37, 61), (2, 3, 5, 9)],
                         ids=['multiple-of-8', 'odd-size', 'tiny-batch-2'])
def test_onnx_matches_pytorch_at_any_size(demo_session, demo_net, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    got = demo_session.run(['output'], {'input': x.numpy()})[0]
    with torch.no_grad():
        expected = demo_net(x).numpy()
    assert got.shape == expected.shape == shape
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.abs(expected - x.numpy()).max() > 1e-2  # the network does change its input


def test_onnx_export_reports_its_check_and_stores_the_options(demo_onnx):
    import onnx

    path, outcome = demo_onnx
    assert 'max abs difference' in outcome.out and '1x3x37x61' in outcome.out and '2x3x40x56' in outcome.out
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[NETWORK_OPTIONS_KEY]) == DEMO_NETWORK
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    assert not [f for f in os.listdir(path.parent) if f.endswith('.tmp')]


# --------------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize('command', ['export-onnx', 'export-safetensors'])
def test_missing_weights_file_is_one_line(tmp_path, command):
    outcome = run_inprocess(cli.main, [command, '--weights', 'nope.pth', '-o', 'out.bin'], cwd=tmp_path)
    assert_clean_error(outcome, f'baryir {command}', 'nope.pth', 'no such file')
    assert not (tmp_path / 'out.bin').exists()


@pytest.mark.parametrize('command', ['export-onnx', 'export-safetensors'])
def test_existing_output_is_kept_without_overwrite(tmp_path, demo_checkpoint, command):
    out = tmp_path / 'model.out'
    out.write_bytes(b'keep me')
    outcome = run_inprocess(cli.main, [command, '--weights', str(demo_checkpoint), '-o', str(out)])
    assert_clean_error(outcome, f'baryir {command}', str(out), '--overwrite', status=2)
    assert out.read_bytes() == b'keep me'


@pytest.mark.parametrize('command', ['export-onnx', 'export-safetensors'])
def test_output_equal_to_weights_is_refused_even_with_overwrite(tmp_path, demo_checkpoint, command):
    weights = tmp_path / 'net_g.pth'
    weights.write_bytes(demo_checkpoint.read_bytes())
    outcome = run_inprocess(cli.main, [command, '--weights', 'net_g.pth', '-o', str(weights), '--overwrite'],
                            cwd=tmp_path)
    assert_clean_error(outcome, f'baryir {command}', str(weights), '--weights file', status=2)
    assert weights.read_bytes() == demo_checkpoint.read_bytes()


def test_unsupported_opset_is_a_usage_error(tmp_path, demo_checkpoint):
    outcome = run_inprocess(cli.main, ['export-onnx', '--weights', str(demo_checkpoint), '-o', 'm.onnx',
                                       '--opset', '9'], cwd=tmp_path)
    assert_clean_error(outcome, 'baryir export-onnx', '--opset', '13..20', status=2)


def test_missing_onnxruntime_says_what_to_install(tmp_path, demo_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # the import then fails, as when not installed
    outcome = run_inprocess(cli.main, ['export-onnx', '--weights', str(demo_checkpoint), '-o', 'm.onnx'],
                            cwd=tmp_path)
    assert_clean_error(outcome, ONNX, 'pip install onnx onnxruntime')


# --------------------------------------------------------------------------------------------------
# safetensors
def test_safetensors_round_trip(tmp_path, demo_checkpoint):
    out = tmp_path / 'demo.safetensors'
    outcome = run_inprocess(cli.main, ['export-safetensors', '--weights', str(demo_checkpoint), '-o', str(out)])
    assert outcome.status == 0, outcome.text
    state, options = read_safetensors(str(out))
    saved = torch.load(demo_checkpoint, weights_only=True)
    assert options == saved[NETWORK_OPTIONS_KEY] == DEMO_NETWORK
    assert state.keys() == saved['params'].keys()
    assert all(torch.equal(state[k], v) for k, v in saved['params'].items())
    assert looks_like_safetensors(str(out)) and not looks_like_safetensors(str(demo_checkpoint))


def test_safetensors_of_a_bare_state_dict_takes_the_options_of_opt(tmp_path, demo_checkpoint):
    bare = tmp_path / 'bare.pth'
    torch.save(torch.load(demo_checkpoint, weights_only=True)['params'], bare)
    opt = tmp_path / 'net.yml'
    opt.write_text(yaml.safe_dump({'network_g': DEMO_NETWORK}))
    out = tmp_path / 'bare.safetensors'
    outcome = run_inprocess(cli.main, ['export-safetensors', '--weights', str(bare), '--opt', str(opt), '-o', str(out)])
    assert outcome.status == 0, outcome.text
    assert read_safetensors(str(out))[1] == DEMO_NETWORK


def test_broken_or_foreign_safetensors_are_checkpoint_errors(tmp_path, demo_checkpoint):
    good = tmp_path / 'good.safetensors'
    write_safetensors({'w': torch.ones(64, 64)}, None, str(good))
    assert read_safetensors(str(good))[1] is None  # weights without options: the loader asks for --opt
    data = good.read_bytes()
    truncated = tmp_path / 'truncated.safetensors'
    truncated.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / 'garbage.safetensors'
    garbage.write_bytes(b'\x10' + b'\x00' * 7 + b'{not json at all}')
    bad_options = tmp_path / 'bad_options.safetensors'
    import safetensors.torch
    bad_options.write_bytes(safetensors.torch.save({'w': torch.ones(2)}, metadata={NETWORK_OPTIONS_KEY: '[1, 2'}))
    for path, needle in ((tmp_path / 'missing.safetensors', 'no such file'), (tmp_path, 'folder'),
                         (demo_checkpoint, 'not a safetensors file'), (truncated, 'truncated'),
                         (garbage, 'cannot be read as safetensors'), (bad_options, 'not network options')):
        with pytest.raises(CheckpointError, match=needle) as info:
            read_safetensors(str(path))
        assert str(path) in str(info.value)
