"""DA-RCOT's loss terms: every term of the reference's training step on one batch (through DARCOTModel's own
step code), gradient norms included; and the terms' definitions on small cases."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from basicsr.models import build_model

from baryir_plugin.losses import FourierResidualLoss, FROTCostLoss, ResidualContrastiveLoss, WGANGPLoss, frot_cost
from baryir_plugin.official import (DARCOT_UNUSED_MODULES, convert_official, load_official, map_darcot_key,
                                    module_state_dict)

from .conftest import OPTIONS, shared_path

REL = 1e-5  # loss scalars
GRAD_REL = 1e-4  # gradient norms
SCORE_REL = 1e-4  # means of critic scores, relative to the scores' mean magnitude


def _abs(value, want) -> float:
    value, want = (float(torch.as_tensor(v).detach()) for v in (value, want))
    return abs(value - want)


def _rel(value, want) -> float:
    return _abs(value, want) / max(abs(float(torch.as_tensor(want).detach())), 1e-30)


def _model_opt(workdir: Path, net_g: dict, net_pot: dict) -> dict:
    opt = yaml.safe_load((OPTIONS / 'train_darcot_model.yml').read_text())
    opt.update(dist=False, rank=0, world_size=1, is_train=True, num_gpu=0, auto_resume=False)
    for phase, data_opt in opt['datasets'].items():
        data_opt['phase'] = phase.split('_')[0]
        data_opt['scale'] = 1
    exp = workdir / 'experiments' / opt['name']
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'), log=str(exp),
                       training_states=str(exp / 'training_states'), visualization=str(exp / 'visualization'))
    opt['network_g'] = dict(net_g['baryir_config'])
    opt['network_potential'] = dict(net_pot['baryir_config'])
    return opt


@pytest.fixture()
def reference_step(workdir, monkeypatch):
    """DARCOTModel holding the fixture's converted weights, fed the fixture's batch."""
    root = shared_path('fixtures', 'darcot_small')
    ckpt = root / 'official_format_checkpoint.pt'
    net_g, net_pot = convert_official(str(ckpt))
    batch = torch.load(root / 'expected_outputs.pt', weights_only=True)['loss_batch']
    monkeypatch.chdir(workdir)
    model = build_model(_model_opt(workdir, net_g, net_pot))
    model.get_bare_model(model.net_g).load_state_dict(net_g['params'])
    model.get_bare_model(model.net_potential).load_state_dict(net_pot['params'])
    assert model.source_names == ['noise', 'rain']
    de_id = batch['de_id']  # fine ids: 0-2 noise (sigma 15/25/50), 3 derain
    # the noise-vs-other decision is the source's, by name: samples of 'noise' (source 0), then 'rain'
    source = torch.where(de_id < 3, 0, 1)
    model.feed_data({'lq': batch['degraded'], 'gt': batch['target'], 'source_id': source, 'degradation_id': de_id})
    reference = module_state_dict(load_official(str(ckpt))['Tnet'])  # the reference's parameter names
    return model, batch, reference


def test_potential_steps_match_the_reference(reference_step, monkeypatch):
    model, batch, _ = reference_step
    pot = model.get_bare_model(model.net_potential)
    recorded = []

    def record_step(*args, **kwargs):  # the gradients each optimizer step would apply; no step taken
        recorded.append({n: (None if p.grad is None else p.grad.norm().item()) for n, p in pot.named_parameters()})
    monkeypatch.setattr(model.optimizer_potential, 'step', record_step)
    gp = model.cri_gp
    monkeypatch.setattr(gp, 'forward', lambda critic, real, fake, alpha=None: WGANGPLoss.forward(
        gp, critic, real, fake, batch['gp_alpha']))
    with torch.no_grad():  # the model's own no-grad forward of T is the reference's T(x) ...
        assert (model.get_bare_model(model.net_g)(batch['degraded']) - batch['F_step_restored']).abs().max() <= 1e-4
    # ... and the F-step terms are checked on the reference's T(x) itself: L_F is a difference of two
    # critic means that cancel to ~3 % of the scores, so T's float32 rounding (~3e-5) would move it by
    # ~1e-4 relative, whatever the port. For the same reason the critic means are judged against the size
    # of the scores they average (~3e-2), not against themselves (~1e-3): two machines' float32
    # convolution kernels differ by ~1e-5 of a score, ~5e-4 of such a mean; a wrong term or sign is off by
    # the whole scale.
    with torch.no_grad():
        scale = torch.cat([pot(batch['F_step_restored']), pot(batch['target'])]).abs().mean().item()
    losses = model.potential_step(batch['F_step_restored'])  # the critic step, then the penalty step
    assert _abs(losses['l_critic'], batch['F_train_loss']) <= SCORE_REL * scale
    assert _abs(-losses['f_target'], batch['F_real_loss']) <= SCORE_REL * scale
    assert _rel(losses['l_gp'], batch['gp_loss']) <= REL
    assert _rel(losses['gp_grad_norm'], batch['gp_grad_l2norm'].mean()) <= REL
    assert len(recorded) == 2, 'two optimizer steps of F per update: the critic loss, then the penalty'
    for grads, want in ((recorded[0], batch['F_train_loss_grad_norms']), (recorded[1], batch['gp_loss_grad_norms'])):
        for name, value in want.items():
            if value is None:
                assert grads[name] is None, f'{name} gets no gradient from the penalty in the reference'
            elif value == 0:
                assert grads[name] < 1e-6, name
            else:
                assert _rel(grads[name], value) <= GRAD_REL, (name, grads[name], value)
    with torch.no_grad():
        assert _abs(pot(batch['F_step_restored']).mean(), batch['F_fake_loss']) <= SCORE_REL * scale


def test_transport_step_matches_the_reference(reference_step):
    model, batch, reference = reference_step
    model._set_potential_grad(False)
    total, losses, scores = model.transport_losses(paired=True)
    assert (model.output - batch['T_restored']).abs().max() <= 1e-4
    assert (scores - batch['T_potential']).abs().max() <= 1e-5
    assert _rel(losses['l_cost'], batch['mse_loss']) <= REL
    assert _rel(losses['l_fourier'], batch['fourier_res_penalty']) <= REL
    assert _rel(losses['l_ctr'], 0.1 * batch['contrastive_loss']) <= REL
    assert _rel(losses['l_pix'], batch['Sigma'] * batch['l1']) <= REL
    assert _rel(total, batch['T_train_loss_paired']) <= REL
    total.backward()
    ours = dict(model.get_bare_model(model.net_g).named_parameters())
    sums: dict[str, float] = {}
    for key in reference:
        module, mapped = key.split('.', 1)[0], map_darcot_key(key)
        if mapped is not None and ours[mapped].grad is not None:
            sums[module] = sums.get(module, 0.0) + ours[mapped].grad.double().pow(2).sum().item()
    want = batch['T_train_loss_paired_grad_norms']
    assert set(sums) == set(want)
    for module, value in want.items():
        assert _rel(math.sqrt(sums[module]), value) <= GRAD_REL, (module, math.sqrt(sums[module]), value)
    assert sorted(batch['T_modules_without_grad']) == sorted(DARCOT_UNUSED_MODULES)

    unpaired, terms, _ = model.transport_losses(paired=False)
    assert _rel(unpaired, batch['T_train_loss_unpaired']) <= REL
    assert 'l_pix' not in terms and 'l_ctr' not in terms  # the reference drops both without pairs


def test_contrastive_pair_terms_match_the_reference(reference_step):
    model, batch, _ = reference_step
    with torch.no_grad():
        _, _, _, (dense, _, _) = model.net_g(batch['degraded'], return_intermediates=True)
    pos, neg = ResidualContrastiveLoss().pair_terms(dense, batch['de_id'])
    assert _rel(pos, batch['contrastive_pos']) <= REL and _rel(neg, batch['contrastive_neg']) <= REL


# ------------------------------------------------------------------------------------------------
def test_cost_variants():
    r = torch.zeros(2, 1, 2, 2)
    r[0] = 2.0  # sample 0: RMS 2, norm 4; sample 1: zero
    assert frot_cost(r, 'batch_rms').item() == pytest.approx(math.sqrt(2.0))  # sqrt(mean of 4,4,4,4,0,0,0,0)
    assert frot_cost(r, 'per_sample_rms').item() == pytest.approx(1.0)
    assert frot_cost(r, 'l2').item() == pytest.approx(2.0)
    assert FROTCostLoss('l2', loss_weight=3.0)(r).item() == pytest.approx(6.0)
    r.requires_grad_(True)
    frot_cost(r, 'per_sample_rms').backward()
    assert torch.isfinite(r.grad).all()  # the zero sample's sqrt has a zero gradient, not NaN
    with pytest.raises(ValueError, match='FROT cost'):
        frot_cost(r, 'rms')


def test_fourier_term_takes_the_noise_norm_where_told_and_sums_over_the_batch():
    torch.manual_seed(0)
    r = torch.randn(3, 3, 8, 12)
    loss = FourierResidualLoss()
    norms = loss.norms(r)
    rms = r.flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(norms['l2'], math.sqrt(8 * 12) * rms, rtol=1e-5)  # Parseval, unnormalised FFT
    is_noise = torch.tensor([True, False, True])
    want = norms['l2'][0] + norms['l1'][1] + norms['l2'][2]
    assert loss(r, is_noise).item() == pytest.approx(want.item(), rel=1e-6)
    assert FourierResidualLoss(reduction='mean')(r, is_noise).item() == pytest.approx(want.item() / 3, rel=1e-6)
    assert FourierResidualLoss(noise_norm='l1')(r, is_noise).item() == pytest.approx(norms['l1'].sum().item(), rel=1e-6)


def test_elementwise_contrastive_is_the_pairwise_formula():
    torch.manual_seed(0)
    emb = torch.randn(5, 4, 2, 2)
    labels = torch.tensor([0, 0, 1, 2, 1])
    z = torch.nn.functional.normalize(emb.flatten(1), dim=1)
    want = 0.0
    for i in range(5):
        for j in range(i + 1, 5):
            sign = -1 if labels[i] == labels[j] else 1
            want += torch.exp(sign * z[i] * z[j] / 0.07).mean().item()
    assert ResidualContrastiveLoss(loss_weight=1.0)(emb, labels).item() == pytest.approx(want, rel=1e-6)
    assert ResidualContrastiveLoss()(emb, labels).item() == pytest.approx(0.1 * want, rel=1e-6)
    assert ResidualContrastiveLoss()(emb[:1], labels[:1]).item() == 0.0  # a batch of one: no pairs


def test_infonce_prefers_aligned_positives():
    torch.manual_seed(0)
    base = torch.randn(2, 16)
    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.stack([base[0], base[0] + 0.01, base[1], base[1] + 0.01])
    crossed = torch.stack([base[0], base[1], base[1] + 0.01, base[0] + 0.01])
    loss = ResidualContrastiveLoss(mode='infonce', loss_weight=1.0)
    assert loss(aligned, labels) < 0.01 < loss(crossed, labels)
    assert loss(aligned, torch.tensor([0, 1, 2, 3])).item() == 0.0  # no positives anywhere


def test_gradient_penalty_of_a_linear_critic():
    weight = torch.randn(3, 4, 4)

    def critic(x):
        return (x * weight).flatten(1).sum(1)
    real, fake = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    gp, norms = WGANGPLoss()(critic, real, fake)
    assert torch.allclose(norms, weight.norm().expand(2))  # the gradient of a linear critic is its weight
    assert gp.item() == pytest.approx(10 * (weight.norm().item() - 1) ** 2, rel=1e-5)
