"""Each barycenter loss against a direct per-sample formula on random tensors."""
from __future__ import annotations

import math

import pytest
import torch
from basicsr.losses import build_loss

from baryir_plugin.losses import BROLoss, IRCLoss, MWBLoss, PotentialLoss, TransportCostLoss

torch.manual_seed(0)
B, SHAPE = 6, (8, 3, 2)


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _cos(a, b):
    a, b = a.flatten(), b.flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize('cost', ['rms', 'l2', 'squared_l2'])
def test_transport_cost_and_mwb(cost):
    z, zb, f, lam = _rand(B, *SHAPE), _rand(B, *SHAPE), _rand(B), torch.rand(B, dtype=torch.float64)

    def c(i):
        d = (z[i] - zb[i]).flatten()
        return {'rms': math.sqrt(float((d ** 2).mean())), 'l2': math.sqrt(float((d ** 2).sum())),
                'squared_l2': float((d ** 2).mean())}[cost]

    expected_cost = sum(float(lam[i]) * c(i) for i in range(B)) / B
    expected_mwb = sum(float(lam[i]) * (c(i) - float(f[i])) for i in range(B)) / B
    assert TransportCostLoss(cost=cost)(z, zb, lam).item() == pytest.approx(expected_cost, rel=1e-10)
    assert MWBLoss(cost=cost, loss_weight=0.5)(z, zb, f, lam).item() == pytest.approx(0.5 * expected_mwb, rel=1e-10)
    per_sample = MWBLoss(cost=cost, reduction='none')(z, zb, f)
    assert per_sample.shape == (B,) and per_sample[2].item() == pytest.approx(c(2) - float(f[2]), rel=1e-10)


@pytest.mark.parametrize('congruence_on', ['batch', 'last'])
def test_potential_loss(congruence_on):
    f, cong, lam = _rand(B), _rand(B), torch.rand(B, dtype=torch.float64)
    penalty = (sum(float(x) ** 2 for x in cong) / B) if congruence_on == 'batch' else float(cong[-1]) ** 2
    expected = sum(float(lam[i] * f[i]) for i in range(B)) / B + 10 * penalty
    assert PotentialLoss(congruence_on=congruence_on)(f, cong, lam).item() == pytest.approx(expected, rel=1e-10)
    assert PotentialLoss(congruence_weight=0)(f, cong).item() == pytest.approx(float(f.mean()), rel=1e-10)


@pytest.mark.parametrize('include_self', [True, False])
def test_irc_against_per_sample_formula(include_self):
    s = _rand(B, *SHAPE)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    lam = torch.rand(B, dtype=torch.float64)
    tau = 0.07
    terms = []
    for i in range(B):
        js = [j for j in range(B) if include_self or j != i]
        pos = [j for j in js if labels[j] == labels[i]]
        if not pos:
            terms.append(0.0)
            continue
        num = sum(math.exp(_cos(s[i], s[j]) / tau) for j in pos)
        den = sum(math.exp(_cos(s[i], s[j]) / tau) for j in js)
        terms.append(-math.log(num / den))
    expected = sum(float(lam[i]) * terms[i] for i in range(B)) / B
    loss = IRCLoss(include_self=include_self)(s, labels, lam)
    assert loss.item() == pytest.approx(expected, rel=1e-8)
    if not include_self:
        assert terms[3] == 0.0  # label 2 has no other positive


def test_irc_gradients_stay_finite_without_positives():
    s = _rand(3, 4).requires_grad_()
    IRCLoss(include_self=False)(s, torch.tensor([0, 1, 2])).backward()
    assert torch.isfinite(s.grad).all()


def test_irc_with_a_gathered_bank_matches_the_full_batch():
    s, labels = _rand(B, 5), torch.tensor([0, 1, 0, 1, 1, 0])
    full = IRCLoss(reduction='none')(s, labels)
    part = IRCLoss(reduction='none')(s[2:4], labels[2:4], bank=s, bank_labels=labels, offset=2)
    assert torch.allclose(part, full[2:4])
    full_ex = IRCLoss(reduction='none', include_self=False)(s, labels)
    part_ex = IRCLoss(reduction='none', include_self=False)(s[2:4], labels[2:4], bank=s, bank_labels=labels, offset=2)
    assert torch.allclose(part_ex, full_ex[2:4])


@pytest.mark.parametrize('power', [1, 2])
def test_bro_against_per_sample_formula(power):
    zb, s, lam = _rand(B, *SHAPE), _rand(B, *SHAPE), torch.rand(B, dtype=torch.float64)
    terms = [sum(abs(_cos(zb[i], s[j])) ** power for j in range(B)) for i in range(B)]
    expected = sum(float(lam[i]) * terms[i] for i in range(B)) / B
    assert BROLoss(power=power)(zb, s, lam).item() == pytest.approx(expected, rel=1e-8)


def test_options_are_validated_and_registered():
    with pytest.raises(ValueError, match='cost'):
        MWBLoss(cost='l1')
    with pytest.raises(ValueError, match='power'):
        BROLoss(power=3)
    with pytest.raises(ValueError, match='tau'):
        IRCLoss(tau=0)
    with pytest.raises(ValueError, match='congruence_on'):
        PotentialLoss(congruence_on='first')
    for name in ('MWBLoss', 'PotentialLoss', 'IRCLoss', 'BROLoss', 'TransportCostLoss'):
        assert type(build_loss({'type': name})).__name__ == name


@pytest.mark.parametrize('cost', ['rms', 'l2'])
def test_square_root_costs_have_a_finite_gradient_where_z_equals_z_bary(cost):
    """sqrt has an infinite derivative at 0: at z == zB the gradient used to be 0 * inf = NaN."""
    z = _rand(3, *SHAPE).requires_grad_()
    zb = z.detach().clone()
    zb[1] += 0.5  # one sample away from its barycenter latent, two on it
    zb_var = zb.clone().requires_grad_()
    MWBLoss(cost=cost)(z, zb_var, torch.zeros(3)).backward()
    for grad in (z.grad, zb_var.grad):
        assert torch.isfinite(grad).all()
        assert grad[0].abs().max() == 0 and grad[2].abs().max() == 0 and grad[1].abs().max() > 0
    assert TransportCostLoss(cost=cost, reduction='none')(z, zb)[0].item() < 1e-11


def test_bro_mean_over_the_bank_does_not_grow_with_the_batch():
    zb, s = _rand(4, *SHAPE), _rand(4, *SHAPE)
    twice_zb, twice_s = torch.cat([zb, zb]), torch.cat([s, s])  # the same samples, a batch twice as large
    summed, mean = BROLoss(), BROLoss(bank_reduction='mean')
    assert summed(twice_zb, twice_s).item() == pytest.approx(2 * summed(zb, s).item(), rel=1e-10)
    assert mean(twice_zb, twice_s).item() == pytest.approx(mean(zb, s).item(), rel=1e-10)
    assert mean(zb, s).item() == pytest.approx(summed(zb, s).item() / 4, rel=1e-10)
    with pytest.raises(ValueError, match='bank_reduction'):
        BROLoss(bank_reduction='max')
