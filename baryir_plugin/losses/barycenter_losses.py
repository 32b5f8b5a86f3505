"""Losses of the multi-source Wasserstein-barycenter objective (BaryIR journal, Sec. III).

All losses take whole batches (no per-sample Python loops). ``weight`` is a per-sample weight, in
BaryIR the barycenter weight lambda_k(i) of each sample's source; with reduction ``'mean'`` a loss is
``loss_weight * mean_i(weight_i * term_i)``, so the terms of BaryIR journal, Eq. 13 add up exactly:

    L_net = L1 + w * mean_i lambda_k(i) [c_i + gamma (o_i + ctr_i) - f_k(i)(zB_i)]
          = L1 + w * (MWB + gamma * (BRO + IRC))        (each built with the same weights)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from baryir_plugin.archs.precision import fp32_region

COSTS = ('rms', 'l2', 'squared_l2')
REDUCTIONS = ('mean', 'sum', 'none')
BANK_REDUCTIONS = ('sum', 'mean')
_SQRT_FLOOR = 1e-24


def transport_cost(z: torch.Tensor, z_bary: torch.Tensor, cost: str = 'rms') -> torch.Tensor:
    """Per-sample cost c(z_i, zB_i), shape (B,), in float32 under autocast (see ``archs/precision.py``).

    ``rms``: sqrt(mean_{c,h,w} (z - zB)^2) (the reference); ``l2``: sqrt(sum (z - zB)^2);
    ``squared_l2``: mean (z - zB)^2, the squared distance of the W2 view normalised by the element
    count so that its scale stays comparable to ``rms``. The square roots have a zero (sub)gradient at
    z == zB instead of the NaN of d sqrt(x)/dx at 0.
    """
    if cost not in COSTS:
        raise ValueError(f'transport cost must be one of {COSTS}, got {cost!r}.')
    with fp32_region('transport', z) as upcast:
        if upcast:
            z, z_bary = z.float(), z_bary.float()
        sq = (z - z_bary).flatten(1).pow(2)
        if cost == 'squared_l2':
            return sq.mean(dim=1)
        total = sq.mean(dim=1) if cost == 'rms' else sq.sum(dim=1)
        # below _SQRT_FLOOR the clamp passes no gradient, so 0 * inf never happens; the value moves by
        # at most sqrt(_SQRT_FLOOR) = 1e-12
        return total.clamp_min(_SQRT_FLOOR).sqrt()


def _check(name: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')
    return value


def _reduce(term: torch.Tensor, weight: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if weight is not None:
        term = term * weight.to(term.dtype)
    if reduction == 'mean':
        return term.mean()
    if reduction == 'sum':
        return term.sum()
    return term


class _WeightedLoss(nn.Module):

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean') -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.reduction = _check(f'{type(self).__name__}.reduction', reduction, REDUCTIONS)

    def _out(self, term: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        return self.loss_weight * _reduce(term, weight, self.reduction)


@LOSS_REGISTRY.register()
class TransportCostLoss(_WeightedLoss):
    """The transport cost alone: loss_weight * mean_i weight_i c(z_i, zB_i).

    Args:
        loss_weight: multiplier. reduction: 'mean' | 'sum' | 'none'.
        cost: 'rms' (default, reference) | 'l2' | 'squared_l2'.
    """

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', cost: str = 'rms') -> None:
        super().__init__(loss_weight, reduction)
        self.cost = _check('TransportCostLoss.cost', cost, COSTS)

    def forward(self, z: torch.Tensor, z_bary: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._out(transport_cost(z, z_bary, self.cost), weight)


@LOSS_REGISTRY.register()
class MWBLoss(_WeightedLoss):
    """Network side of the multi-source Wasserstein-barycenter objective (BaryIR journal, Eq. 8):
    loss_weight * mean_i weight_i [c(z_i, zB_i) - f_k(i)(zB_i)], with the potentials frozen.

    Minimising it moves T(z) towards where the source's own potential is high at little transport
    cost. Args as :class:`TransportCostLoss`; ``potential`` is f_k(i)(zB_i), shape (B,).
    """

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', cost: str = 'rms') -> None:
        super().__init__(loss_weight, reduction)
        self.cost = _check('MWBLoss.cost', cost, COSTS)

    def forward(self, z: torch.Tensor, z_bary: torch.Tensor, potential: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.from_cost(transport_cost(z, z_bary, self.cost), potential, weight)

    def from_cost(self, cost: torch.Tensor, potential: torch.Tensor,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same loss from per-sample costs already computed with :func:`transport_cost` (``self.cost``)."""
        return self._out(cost - potential.to(cost.dtype), weight)


@LOSS_REGISTRY.register()
class PotentialLoss(nn.Module):
    """Potential side of the objective, with the network frozen:
    loss_weight * [mean_i weight_i f_k(i)(zB_i) + congruence_weight * penalty],
    penalty = mean_i (sum_k lambda_k f_k(zB_i))^2 over the batch (``congruence_on: batch``, default) or
    on the last sample only (``last``, as the reference). With parameterised potentials the congruence
    holds by construction: set congruence_weight to 0.

    Args:
        loss_weight: multiplier. congruence_weight: 10 in the reference.
        congruence_on: 'batch' | 'last'.
    """

    def __init__(self, loss_weight: float = 1.0, congruence_weight: float = 10.0, congruence_on: str = 'batch') -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.congruence_weight = congruence_weight
        self.congruence_on = _check('PotentialLoss.congruence_on', congruence_on, ('batch', 'last'))

    def forward(self, potential: torch.Tensor, congruence_sum: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = self.loss_weight * _reduce(potential, weight, 'mean')
        if self.congruence_weight and congruence_sum is not None:
            loss = loss + self.penalty(congruence_sum)
        return loss

    def penalty(self, congruence_sum: torch.Tensor) -> torch.Tensor:
        """loss_weight * congruence_weight * (sum_k lambda_k f_k)^2, on the batch mean or the last sample;
        the reference takes an optimizer step on this term alone (BaryIRModel's ``congruence_step``)."""
        sq = congruence_sum.to(torch.promote_types(congruence_sum.dtype, torch.float32)).pow(2)
        return self.loss_weight * self.congruence_weight * (sq.mean() if self.congruence_on == 'batch' else sq[-1])


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) of flattened rows: (B, N)."""
    with fp32_region('contrast', a) as upcast:
        if upcast:
            a, b = a.float(), b.float()
        return F.normalize(a.flatten(1), dim=1) @ F.normalize(b.flatten(1), dim=1).t()


def _self_mask(b: int, n: int, offset: int, device) -> torch.Tensor:
    """True where column j is row i itself (row i sits at column offset + i of the bank)."""
    return torch.arange(n, device=device)[None, :] == (torch.arange(b, device=device)[:, None] + offset)


@LOSS_REGISTRY.register()
class IRCLoss(_WeightedLoss):
    """Inter-residual contrastive loss (BaryIR journal, Eq. 11), supervised-contrastive over residuals s:
    ctr_i = -log( sum_{j: y_j = y_i} exp(cos(s_i, s_j)/tau) / sum_j exp(cos(s_i, s_j)/tau) ).

    Args:
        loss_weight, reduction: as usual.
        tau: temperature, 0.07.
        include_self: j runs over i itself too (reference, default); otherwise i is left out of both
            sums and samples without another positive contribute 0.

    ``forward(residual, labels, weight=None, bank=None, bank_labels=None, offset=0)``: by default the
    batch contrasts with itself; with an all-gathered ``bank`` (global batch) row i sits at column
    ``offset + i``.
    """

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', tau: float = 0.07,
                 include_self: bool = True) -> None:
        super().__init__(loss_weight, reduction)
        if tau <= 0:
            raise ValueError(f'IRCLoss.tau must be > 0, got {tau}.')
        self.tau = tau
        self.include_self = include_self

    def forward(self, residual: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bank: Optional[torch.Tensor] = None, bank_labels: Optional[torch.Tensor] = None,
                offset: int = 0) -> torch.Tensor:
        if bank is None:
            bank, bank_labels, offset = residual, labels, 0
        logits = _cosine_matrix(residual, bank) / self.tau  # (B, N)
        positive = labels.view(-1, 1) == bank_labels.view(1, -1)
        if not self.include_self:
            own = _self_mask(logits.shape[0], logits.shape[1], offset, logits.device)
            logits = logits.masked_fill(own, float('-inf'))
            positive = positive & ~own
        has_positive = positive.any(dim=1, keepdim=True)
        # rows without a positive get their own logits (ctr = 0) instead of all -inf, whose
        # logsumexp would give NaN gradients even when masked out afterwards
        pos_logits = torch.where(has_positive, logits.masked_fill(~positive, float('-inf')), logits)
        ctr = torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)
        return self._out(ctr, weight)


@LOSS_REGISTRY.register()
class BROLoss(_WeightedLoss):
    """Barycenter-residual orthogonality (BaryIR journal, Eq. 12): o_i = sum_j |cos(zB_i, s_j)|^power,
    j over the whole batch including i.

    Args:
        loss_weight, reduction: as usual.
        power: 2 (reference, squared cosine, default) or 1 (the papers).
        bank_reduction: ``'sum'`` over j (reference, default): o_i, and so gamma's weight, grows with
            the batch, and with ``gather_embeddings`` with the number of GPUs; ``'mean'`` divides by the
            number of residuals j, which keeps o_i's scale whatever the batch and world size.

    ``forward(z_bary, residual, weight=None, bank=None)``: ``bank`` replaces the residuals of the
    batch by an all-gathered set.
    """

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', power: float = 2.0,
                 bank_reduction: str = 'sum') -> None:
        super().__init__(loss_weight, reduction)
        if power not in (1, 2):
            raise ValueError(f'BROLoss.power must be 1 or 2, got {power}.')
        self.power = power
        self.bank_reduction = _check('BROLoss.bank_reduction', bank_reduction, BANK_REDUCTIONS)

    def forward(self, z_bary: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bank: Optional[torch.Tensor] = None) -> torch.Tensor:
        cos = _cosine_matrix(z_bary, residual if bank is None else bank)
        term = cos.pow(2) if self.power == 2 else cos.abs()
        term = term.sum(dim=1) if self.bank_reduction == 'sum' else term.mean(dim=1)
        return self._out(term, weight)
