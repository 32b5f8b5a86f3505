"""DARCOT and DARCOTPotential: parity with the authors' DA-RCOT network, sizes, widths, padding, ablations."""
from __future__ import annotations

import pytest
import torch

from baryir_plugin.archs import DARCOT, DARCOTPotential
from baryir_plugin.official import convert_official

from .conftest import shared_path

TOL = 1e-4
SMALL = {'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1, 'heads': [1, 2, 4, 8]}


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope='module')
def fixture():
    root = shared_path('fixtures', 'darcot_small')
    net_g, net_pot = convert_official(str(root / 'official_format_checkpoint.pt'))
    expected = torch.load(root / 'expected_outputs.pt', weights_only=True)
    return net_g, net_pot, expected


def _build(entry: dict, cls, **extra):
    net = cls(**{k: v for k, v in entry['baryir_config'].items() if k != 'type'}, **extra).eval()
    net.load_state_dict(entry['params'], strict=True)
    return net


def test_default_sizes_are_the_reference_minus_its_unused_modules():
    torch.manual_seed(0)
    assert _params(DARCOT()) == 49_927_630  # 52,336,698 allocated by the reference, 2,409,068 never called
    assert _params(DARCOTPotential(patch_size=128)) == 30_588_609
    assert _params(DARCOTPotential(patch_size=64)) == 14_760_129
    assert _params(DARCOTPotential(patch_size=32)) == 13_752_129


@pytest.mark.parametrize('case', ['square', 'nonsquare'])
def test_parity_with_the_reference_network(fixture, case):
    net_g, _, expected = fixture
    cfg = expected['config']
    ours = net_g['baryir_config']
    for key in ('dim', 'num_blocks', 'num_refinement_blocks', 'heads', 'ffn_expansion_factor', 'LayerNorm_type'):
        assert ours[key] == cfg[key], key
    ref = expected if case == 'square' else expected['nonsquare']
    net = _build(net_g, DARCOT)
    with torch.no_grad():
        restored, first, residual, embeddings = net(ref['input'], return_intermediates=True)
        plain = net(ref['input'])
    assert torch.equal(plain, restored)
    pairs = [('first_pass', first, ref['first_pass']), ('residual', residual, ref['residual']),
             ('restored', restored, ref['restored'])]
    pairs += [(f'embedding {i}', e, r) for i, (e, r) in enumerate(zip(embeddings, ref['embeddings']))]
    for name, value, want in pairs:
        assert value.shape == want.shape, name
        err = (value - want).abs().max().item()
        assert err <= TOL, f'{name}: max abs error {err:.3g}'
    if case == 'square':
        assert (embeddings[0] - expected['returned_embedding']).abs().max() <= TOL


def test_potential_parity(fixture):
    _, net_pot, expected = fixture
    assert net_pot['baryir_config']['patch_size'] == expected['config']['potential_patch_size']
    pot = _build(net_pot, DARCOTPotential)
    with torch.no_grad():
        scores = pot(expected['potential_inputs'])
    assert scores.shape == (2,)
    assert (scores - expected['potential_outputs']).abs().max().item() <= TOL


def test_sizes_the_reference_refuses_are_padded_and_cropped_back(fixture):
    net_g, _, expected = fixture
    net = _build(net_g, DARCOT)
    h, w = expected['odd_size_input_hw']  # the reference raises on it (pixel_unshuffle)
    assert 'divisible' in expected['odd_size_error']
    with torch.no_grad():
        assert net(torch.rand(1, 3, h, w)).shape == (1, 3, h, w)
        assert net(torch.rand(2, 3, 3, 5)).shape == (2, 3, 3, 5)  # smaller than the pad: replicated


@pytest.mark.parametrize('dim', [8, 12])
def test_every_width_follows_dim(dim):
    torch.manual_seed(0)
    net = DARCOT(**dict(SMALL, dim=dim)).eval()
    x = torch.rand(2, 3, 40, 24)
    with torch.no_grad():
        out, first, residual, (dense, mid, shallow) = net(x, return_intermediates=True)
    assert out.shape == first.shape == residual.shape == x.shape
    assert dense.shape == (2, 8 * dim, 5, 3) and mid.shape == (2, 4 * dim, 10, 6) and shallow.shape == (2, 2 * dim, 20, 12)
    assert net.latent_channels == 8 * dim
    assert torch.allclose(residual, x - first)


def test_second_pass_is_conditioned_and_the_loss_reaches_the_first_pass():
    torch.manual_seed(0)
    net = DARCOT(**SMALL)
    x = torch.rand(2, 3, 16, 16)
    out, first, _, _ = net(x, return_intermediates=True)
    assert not torch.allclose(out, first)
    out.sum().backward()
    # every parameter takes part (no unused module: what DDP without find_unused_parameters needs)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())
    # the REGM runs on the (not detached) residual, so its layers see gradients through r = x - x1 too
    assert net.regm.encoder1[0].attn.temperature.grad is not None


def test_conditioning_ablations():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    sizes = {}
    for condition in ('multiscale', 'dense_only', 'none', 'first_pass_image'):
        net = DARCOT(**SMALL, condition=condition).eval()
        sizes[condition] = _params(net)
        with torch.no_grad():
            out, first, _, (dense, mid, shallow) = net(x, return_intermediates=True)
        assert out.shape == x.shape
        if condition == 'none':
            assert torch.equal(out, first) and dense is None and not hasattr(net, 'regm')
        elif condition == 'dense_only':
            assert dense is not None and mid is None and shallow is None
        else:
            assert mid is not None and shallow is not None
    assert sizes['multiscale'] == sizes['first_pass_image'] > sizes['dense_only'] > sizes['none']
    with pytest.raises(ValueError, match='condition must be one of'):
        DARCOT(**SMALL, condition='prompt')


def test_bad_inputs_are_named():
    net = DARCOT(**SMALL)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        net(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match='out_channels must equal'):
        DARCOT(**SMALL, out_channels=1)
    with pytest.raises(ValueError, match='multiple of 32'):
        DARCOTPotential(patch_size=48)
    pot = DARCOTPotential(patch_size=32, base_channels=8)
    with pytest.raises(ValueError, match='set pool_size'):
        pot(torch.rand(1, 3, 64, 64))


def test_potential_with_pooling_scores_any_crop():
    torch.manual_seed(0)
    pot = DARCOTPotential(patch_size=48, base_channels=8, pool_size=1)
    for size in ((48, 48), (40, 72)):
        assert pot(torch.rand(2, 3, *size)).shape == (2,)
    convs = [m for m in pot.features if isinstance(m, torch.nn.Conv2d)]
    assert [m.bias is not None for m in convs] == [True] * 6 + [False] * 4  # as the reference
