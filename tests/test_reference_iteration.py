"""One training iteration of the paper recipes' options updates both networks as the authors' trainer does.

The reference iteration below follows the authors' training loop term by term: per-sample loops, the
loss 1e4 * L1 + mean_i lambda_k(i) [c_i + 0.05 (o_i + ctr_i) - f_k(i)(zB_i)], one RMSprop step on the
network, a second forward with the updated network, an RMSprop step of the potentials on
mean_i lambda_k(i) f_k(i)(zB_i), then, after zero_grad, a second step on 10 (sum_j lambda_j f_j(zB_last))^2
with the potentials already updated. Its potentials are K separate branch modules, as the reference
builds them; the recipe's model is built from the recipe's own ``train`` section.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from basicsr.models import build_model
from torch import nn

from .conftest import REPO
from .test_baryir_model import _batch, _opt
from .test_potentials_arch import _branch

RECIPES = ('train_baryir_3deg.yml', 'train_baryir_5deg.yml', 'train_baryir_3deg_lmdb.yml', 'train_baryir_5deg_lmdb.yml')


def _recipe_train(name: str) -> dict:
    train = yaml.safe_load((REPO / 'options' / name).read_text())['train']
    train.pop('total_iter'), train.pop('scheduler')  # the first iteration's learning rate is the same
    return train


def _reference_iteration(net: nn.Module, branches: nn.ModuleList, batch: dict, lambdas: list[float],
                         sigma: float = 1e4, gamma: float = 0.05, tau: float = 0.07, lr: float = 1e-4) -> None:
    """The authors' iteration (per-sample loops, two potential steps), in place on ``net`` and ``branches``."""
    opt_net = torch.optim.RMSprop(net.parameters(), lr=lr)
    opt_pot = torch.optim.RMSprop(branches.parameters(), lr=lr)
    lq, gt = batch['lq'], batch['gt']
    source, label = batch['source_id'].tolist(), batch['degradation_id'].tolist()
    b = lq.shape[0]

    for p in branches.parameters():
        p.requires_grad_(False)
    net.zero_grad()
    out, z, zb, s = net(lq, return_latents=True)
    bary = 0
    for i in range(b):
        mse = torch.mean(torch.abs(z[i] - zb[i]) ** 2) ** 0.5
        zc = F.normalize(zb[i].reshape(-1), dim=0)
        orth = sum(torch.sum(zc * F.normalize(s[j].reshape(-1), dim=0)) ** 2 for j in range(b))
        zi = F.normalize(s[i].reshape(-1), dim=0)
        pos = neg = 0
        for j in range(b):
            sim = torch.exp(torch.sum(zi * F.normalize(s[j].reshape(-1), dim=0)) / tau)
            if label[i] == label[j]:
                pos = pos + sim
            else:
                neg = neg + sim
        contra = -torch.log(pos / (pos + neg))
        potential = branches[source[i]](zb[i:i + 1]).squeeze()
        bary = bary + lambdas[source[i]] * (mse + gamma * (orth + contra) - potential)
    (bary / b + sigma * torch.mean(torch.abs(out - gt))).backward()
    opt_net.step()

    for p in branches.parameters():
        p.requires_grad_(True)
    for p in net.parameters():
        p.requires_grad_(False)
    branches.zero_grad()
    _, _, zb, _ = net(lq, return_latents=True)
    loss = sum(lambdas[source[i]] * branches[source[i]](zb[i:i + 1]).squeeze() for i in range(b))
    (loss / b).backward()
    opt_pot.step()
    branches.zero_grad()
    congruence = sum(lambdas[k] * branches[k](zb[-1:]).squeeze() for k in range(len(branches)))
    (10 * congruence ** 2).backward()
    opt_pot.step()
    for p in net.parameters():
        p.requires_grad_(True)


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).detach().norm() / ref.detach().norm().clamp_min(1e-30))


def _updates(workdir, train: dict):
    """(model, batch, initial net_g and potentials state, our updates) for one iteration of ``train``."""
    opt = _opt(workdir)
    opt['train'].update(copy.deepcopy(train))
    model = build_model(opt)
    batch = _batch(opt)
    g0 = copy.deepcopy(model.net_g)
    p0 = copy.deepcopy(model.net_potential)
    model.feed_data(batch)
    model.optimize_parameters(1)
    return model, batch, g0, p0


def _compare(model, batch, g0, p0) -> tuple[float, float]:
    """Relative difference of our one-iteration update to the reference's: (network, potentials)."""
    branches = nn.ModuleList([_branch(p0, k) for k in range(p0.num_potentials)])
    net_ref = copy.deepcopy(g0)
    _reference_iteration(net_ref, branches, batch, [float(v) for v in model.lambdas])
    d_ours = torch.cat([(p - q).flatten() for p, q in zip(model.net_g.parameters(), g0.parameters())])
    d_ref = torch.cat([(p - q).flatten() for p, q in zip(net_ref.parameters(), g0.parameters())])
    pairs = [('conv_weight', 0), ('fc1_weight', 3), ('fc1_bias', 3), ('fc2_weight', 4), ('fc2_bias', 4),
             ('fc3_weight', 6), ('fc3_bias', 6)]
    ours, ref = [], []
    for name, layer in pairs:
        after, before = getattr(model.net_potential, name), getattr(p0, name)
        attr = 'weight' if 'weight' in name else 'bias'
        for k, branch in enumerate(branches):
            ours.append((after[k] - before[k]).flatten())
            ref.append((getattr(branch[layer], attr).flatten() - before[k].flatten()))
    return _relative(d_ours, d_ref), _relative(torch.cat(ours), torch.cat(ref))


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_iteration_updates_both_networks_as_the_reference(workdir, monkeypatch, recipe):
    monkeypatch.chdir(workdir)
    train = _recipe_train(recipe)
    assert train['potential_step'] == 'recompute' and train['congruence_step'] == 'separate'
    torch.manual_seed(0)
    net_diff, pot_diff = _compare(*_updates(workdir, train))
    assert net_diff < 1e-3, f'{recipe}: network update differs from the reference by {net_diff:.2e} (relative)'
    assert pot_diff < 1e-3, f'{recipe}: potentials update differs from the reference by {pot_diff:.2e} (relative)'


def test_other_loss_scaling_or_potential_schedule_is_a_different_update(workdir, monkeypatch):
    """The two reference details matter: w = 1e-4 with L1 weight 1 (same gradient direction) and one joint
    potential step (same objective) each move the update far from the reference's."""
    monkeypatch.chdir(workdir)
    train = _recipe_train('train_baryir_5deg.yml')
    rescaled = dict(train, barycenter_weight=1e-4, pixel_opt=dict(train['pixel_opt'], loss_weight=1.0))
    torch.manual_seed(0)
    net_diff, _ = _compare(*_updates(workdir, rescaled))
    assert net_diff > 0.1, f'rescaled loss: network update only {net_diff:.2e} from the reference'
    joint = dict(train, congruence_step='joint')
    torch.manual_seed(0)
    _, pot_diff = _compare(*_updates(workdir, joint))
    assert pot_diff > 0.1, f'joint potential step: potentials update only {pot_diff:.2e} from the reference'
