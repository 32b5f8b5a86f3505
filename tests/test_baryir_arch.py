"""The BaryIR network: size, shapes, options and the registry path a YAML file takes."""
from __future__ import annotations

import pytest
import torch
from basicsr.archs import build_network

from baryir_plugin.archs import BaryIR

SMALL = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8], num_bary_blocks=1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_default_config_matches_reference_size():
    net = BaryIR()
    # the reference's 53,765,070 minus its six modules that forward never calls (215,296)
    assert _count(net) == 53_765_070 - 215_296 == 53_549_774
    assert _count(net.bary_map) == 14_370_448


@pytest.mark.parametrize('shape', [(1, 3, 37, 53), (1, 3, 8, 8), (1, 3, 300, 17), (2, 3, 3, 5)])
def test_any_size_in_same_size_out(shape):
    torch.manual_seed(0)
    net = BaryIR(**SMALL).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        out = net(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_forward_is_deterministic_and_latents_match_their_definition():
    torch.manual_seed(0)
    net = BaryIR(**SMALL).eval()
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # deterministic
        out, z, zb, s = net(x, return_latents=True)
    assert z.shape == zb.shape == s.shape == (1, 64, 4, 5)
    assert torch.allclose(s, z - zb)


@pytest.mark.parametrize('bad', [torch.rand(3, 32, 32), torch.rand(1, 1, 32, 32), torch.rand(1, 4, 8, 8),
                                 torch.rand(1, 1, 3, 32, 32)])
def test_wrong_input_names_the_expected_shape(bad):
    net = BaryIR(**SMALL)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*got'):
        net(bad)


def test_plain_call_returns_only_the_image_and_latents_on_request():
    net = BaryIR(**SMALL)
    x = torch.rand(2, 3, 16, 24)
    assert isinstance(net(x), torch.Tensor)
    out = net.forward_with_latents(x)
    assert len(out) == 4 and out[0].shape == x.shape and out[1].shape == (2, 64, 2, 3)


@pytest.mark.parametrize('dim', [8, 16, 24])
def test_every_width_follows_dim(dim):
    net = BaryIR(**{**SMALL, 'dim': dim})
    assert net.latent_norm.weight.shape == (8 * dim,)
    assert net.fuse_block.norm1.weight.shape == (16 * dim,)
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize('map_type', ['transformer', 'mlp', 'conv', 'vit'])
def test_barycenter_map_variants(map_type):
    torch.manual_seed(0)
    net = BaryIR(**{**SMALL, 'bary_map_type': map_type, 'num_bary_blocks': 2})
    assert len(net.bary_map.blocks) == 2
    out, z, zb, s = net(torch.rand(2, 3, 24, 16), return_latents=True)
    assert out.shape == (2, 3, 24, 16) and zb.shape == z.shape
    out.mean().backward()
    assert net.bary_map.blocks[0].parameters().__next__().grad is not None


def test_num_bary_blocks_defaults_follow_the_reference():
    cfg = {k: v for k, v in SMALL.items() if k != 'num_bary_blocks'}
    assert len(BaryIR(**{**cfg, 'num_blocks': [1, 1, 1, 3]}).bary_map.blocks) == 3  # = num_blocks[3]
    assert len(BaryIR(**{**cfg, 'bary_map_type': 'mlp'}).bary_map.blocks) == 2


def test_embedding_modes():
    x = torch.rand(1, 3, 16, 16)
    original = BaryIR(**SMALL, embedding_mode='original')
    assert not hasattr(original, 'bary_map') and not hasattr(original, 'residual_decoder')
    out, z, zb, s = original(x, return_latents=True)
    assert out.shape == x.shape and zb is None and s is None
    bary = BaryIR(**SMALL, embedding_mode='barycenter')
    assert hasattr(bary, 'bary_map') and not hasattr(bary, 'residual_decoder')
    assert bary.fuse_block.norm1.weight.shape == (64,)
    orig_res = BaryIR(**SMALL, embedding_mode='original+residual')
    assert orig_res.fuse_block.norm1.weight.shape == (128,)
    assert orig_res(x).shape == x.shape
    with pytest.raises(ValueError, match='embedding_mode'):
        BaryIR(**SMALL, embedding_mode='barycentre')


def test_test_time_zeroing_changes_the_output_and_is_validated():
    torch.manual_seed(0)
    net = BaryIR(**SMALL).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        full = net(x)
        net.set_zero_features('residual')
        no_res = net(x)
        net.set_zero_features('barycenter')
        no_bary = net(x)
        net.set_zero_features(None)
        again = net(x)
    assert torch.equal(full, again)
    assert not torch.allclose(full, no_res) and not torch.allclose(full, no_bary)
    with pytest.raises(ValueError, match="zero_features='residual'"):
        BaryIR(**SMALL, embedding_mode='barycenter', zero_features='residual')
    with pytest.raises(ValueError, match="zero_features='barycenter'"):
        BaryIR(**SMALL, embedding_mode='original+residual', zero_features='barycenter')


def test_residual_scale_zero_removes_the_residual_decoder_contribution():
    torch.manual_seed(0)
    net = BaryIR(**SMALL, residual_scale=0.0).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        base = net(x)
        for p in net.residual_decoder.parameters():
            p.add_(1.0)
        assert torch.equal(base, net(x))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match='num_blocks and heads need 4 entries'):
        BaryIR(num_blocks=[1, 1, 1])
    with pytest.raises(ValueError, match='out_channels must equal'):
        BaryIR(**SMALL, out_channels=1)
    with pytest.raises(ValueError, match='bary_map_type'):
        BaryIR(**SMALL, bary_map_type='unet')
    with pytest.raises(ValueError, match='LayerNorm_type'):
        BaryIR(**SMALL, LayerNorm_type='Batch')


def test_bias_free_layer_norm_variant():
    net = BaryIR(**SMALL, LayerNorm_type='BiasFree')
    assert net.latent_norm.bias is None
    assert net(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)


def test_built_through_basicsr_registry_like_a_yaml_file():
    net = build_network({'type': 'BaryIR', **SMALL})
    assert isinstance(net, BaryIR)
    pots = build_network({'type': 'BarycenterPotentials', 'num_potentials': 2, 'in_channels': 64,
                          'patch_size': 32})
    assert pots.num_potentials == 2
