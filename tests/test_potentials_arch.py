"""BarycenterPotentials: the batched evaluation equals the reference's per-sample branch stack."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from baryir_plugin.archs import BarycenterPotentials


def _branch(pots: BarycenterPotentials, k: int) -> nn.Sequential:
    """Branch k as the reference builds it: one nn.Sequential, loaded with our stacked weights."""
    c, f = pots.in_channels, pots.num_features
    seq = nn.Sequential(nn.Conv2d(c, c, 4, 4, 1, groups=pots.groups, bias=False), nn.LeakyReLU(0.2), nn.Flatten(),
                        nn.Linear(f, f // 4), nn.Linear(f // 4, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    with torch.no_grad():
        seq[0].weight.copy_(pots.conv_weight[k])
        seq[3].weight.copy_(pots.fc1_weight[k])
        seq[3].bias.copy_(pots.fc1_bias[k])
        seq[4].weight.copy_(pots.fc2_weight[k])
        seq[4].bias.copy_(pots.fc2_bias[k])
        seq[6].weight.copy_(pots.fc3_weight[k][None])
        seq[6].bias.copy_(pots.fc3_bias[k][None])
    return seq


@pytest.mark.parametrize('patch_size', [32, 64])
def test_batched_equals_per_sample_reference_loop(patch_size):
    torch.manual_seed(0)
    pots = BarycenterPotentials(num_potentials=3, in_channels=32, patch_size=patch_size, groups=4)
    z = torch.randn(5, 32, patch_size // 8, patch_size // 8)
    ids = torch.tensor([0, 2, 1, 1, 0])
    expected = torch.stack([_branch(pots, int(k))(z[i:i + 1]).squeeze() for i, k in enumerate(ids)])
    assert torch.allclose(pots(z, ids), expected, atol=1e-5)
    all_scores = pots(z)
    assert all_scores.shape == (5, 3)
    assert torch.allclose(all_scores[torch.arange(5), ids], expected, atol=1e-5)


def test_reference_layout_sizes():
    pots = BarycenterPotentials()  # K=3, 384 channels, crop 128 -> 16x16 latent -> 4x4 after the conv
    assert pots.num_features == 384 * 4 * 4
    assert pots.fc1_weight.shape == (3, 1536, 6144)
    assert pots.conv_weight.shape == (3, 384, 96, 4, 4)
    assert 0.015 < pots.conv_weight.std().item() < 0.025  # N(0, 0.02) as in the reference


def test_wrong_crop_is_refused_without_pooling_and_accepted_with_it():
    pots = BarycenterPotentials(num_potentials=2, in_channels=16, patch_size=32)
    with pytest.raises(ValueError, match='patch_size=32.*pool_size'):
        pots(torch.randn(2, 16, 6, 6))
    pooled = BarycenterPotentials(num_potentials=2, in_channels=16, pool_size=2)
    for side in (3, 6, 11):
        assert pooled(torch.randn(2, 16, side, side + 1), torch.tensor([0, 1])).shape == (2,)
    with pytest.raises(ValueError, match=r'\(B, 16, h, w\)'):
        pooled(torch.randn(2, 8, 4, 4))


def test_parameterized_congruence_holds_exactly():
    torch.manual_seed(0)
    lambdas = [0.5, 0.3, 0.2]
    pots = BarycenterPotentials(num_potentials=3, in_channels=16, pool_size=1, congruence='parameterized',
                                lambdas=lambdas)
    assert pots.conv_weight.shape[0] == 2  # K-1 free potentials
    z = torch.randn(6, 16, 4, 4)
    scores = pots(z)
    assert scores.shape == (6, 3)
    assert torch.allclose((scores * torch.tensor(lambdas)).sum(1), torch.zeros(6), atol=1e-6)
    assert torch.allclose(pots.congruence_sum(z), torch.zeros(6), atol=1e-6)
    penalty = BarycenterPotentials(num_potentials=3, in_channels=16, pool_size=1, lambdas=lambdas)
    assert penalty.congruence_sum(z).abs().max() > 1e-4  # not enforced by construction


def test_lambdas_are_validated_and_saved():
    pots = BarycenterPotentials(num_potentials=2, in_channels=8, pool_size=1)
    with pytest.raises(ValueError, match='sum'):
        pots.set_lambdas([0.7, 0.7])
    with pytest.raises(ValueError, match='2 positive weights'):
        pots.set_lambdas([1.0])
    pots.set_lambdas([0.25, 0.75])
    assert torch.equal(pots.state_dict()['lambdas'], torch.tensor([0.25, 0.75]))


def test_gradients_reach_only_the_selected_branch():
    pots = BarycenterPotentials(num_potentials=3, in_channels=8, pool_size=1)
    pots(torch.randn(2, 8, 4, 4), torch.tensor([1, 1])).sum().backward()
    grad = pots.fc3_weight.grad.abs().sum(1)
    assert grad[1] > 0 and grad[0] == 0 and grad[2] == 0
