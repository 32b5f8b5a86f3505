"""Losses of DA-RCOT's objective (DA-RCOT, TPAMI 2025, Sec. 4), batched.

The transport step minimises
    L_T = -mean_i F(T(x_i)) + sigma * [c(r) + Fourier(r) + 0.1 * ctr(e_dense)] + Sigma * mean |T(x) - y|
with r = x - T(x) (the paired loss; the unpaired one drops the last two terms), and the potential F
maximises mean F(y) - mean F(T(x)) with a WGAN gradient penalty (Gulrajani et al., 2017). Defaults are
the authors' code: a cost that is one RMS over the whole batch, per-sample Fourier norms SUMMED over the
batch, and an elementwise-product contrastive term; the paper's variants are options.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

FROT_COSTS = ('batch_rms', 'per_sample_rms', 'l2')
FOURIER_NORMS = ('l1', 'l2')
REDUCTIONS = ('sum', 'mean')
CONTRASTIVE_MODES = ('elementwise', 'infonce')
_SQRT_FLOOR = 1e-24


def _check(name: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')
    return value


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # a zero (sub)gradient at 0 instead of NaN; the value moves by at most 1e-12
    return x.clamp_min(_SQRT_FLOOR).sqrt()


def frot_cost(residual: torch.Tensor, cost: str = 'batch_rms') -> torch.Tensor:
    """The transport cost of a residual batch r = x - T(x) (B, C, H, W), a scalar.

    ``batch_rms``: sqrt(mean over B, C, H, W of r^2), one RMS over the whole batch (the reference);
    ``per_sample_rms``: mean_i sqrt(mean_{c,h,w} r_i^2); ``l2``: mean_i ||r_i||_2, the paper's
    "standard Euclidean distance" (DA-RCOT, Sec. 4.1).
    """
    _check('FROT cost', cost, FROT_COSTS)
    sq = residual.float().flatten(1).pow(2)
    if cost == 'batch_rms':
        return _sqrt(sq.mean())
    return _sqrt(sq.mean(dim=1) if cost == 'per_sample_rms' else sq.sum(dim=1)).mean()


@LOSS_REGISTRY.register()
class FROTCostLoss(nn.Module):
    """loss_weight * c(r) for the residual r = x - T(x) (see :func:`frot_cost`).

    Args:
        cost: ``'batch_rms'`` (reference), ``'per_sample_rms'`` or ``'l2'`` (the paper's wording).
        loss_weight: multiplies the cost (the model's ``sigma`` multiplies it too, as in the reference).
    """

    def __init__(self, cost: str = 'batch_rms', loss_weight: float = 1.0) -> None:
        super().__init__()
        self.cost = _check('FROTCostLoss.cost', cost, FROT_COSTS)
        self.loss_weight = loss_weight

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * frot_cost(residual, self.cost)


@LOSS_REGISTRY.register()
class FourierResidualLoss(nn.Module):
    """The Fourier residual term of DA-RCOT (Sec. 4.3): per sample, a norm of the 2-D FFT of the residual,
    ``noise_norm`` for noise samples and ``other_norm`` for the others.

    R_i = fft2(r_i) over H, W, unnormalised (torch's norm="backward"), |.| the complex modulus;
    ``'l2'``: sqrt(mean_{c,h,w} |R_i|^2), ``'l1'``: mean_{c,h,w} |R_i|. The reference sums the per-sample
    values over the batch (``reduction: sum``); ``mean`` divides by B.

    Args:
        noise_norm, other_norm: ``'l1'`` or ``'l2'``; the reference (and the paper): l2 for noise, l1 else.
        reduction: ``'sum'`` (reference) or ``'mean'`` over the batch.
        loss_weight: multiplies the term.
    """

    def __init__(self, noise_norm: str = 'l2', other_norm: str = 'l1', reduction: str = 'sum',
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        self.noise_norm = _check('FourierResidualLoss.noise_norm', noise_norm, FOURIER_NORMS)
        self.other_norm = _check('FourierResidualLoss.other_norm', other_norm, FOURIER_NORMS)
        self.reduction = _check('FourierResidualLoss.reduction', reduction, REDUCTIONS)
        self.loss_weight = loss_weight

    @staticmethod
    def norms(residual: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample {'l1': mean |R_i|, 'l2': sqrt(mean |R_i|^2)}, each (B,)."""
        spectrum = torch.fft.fft2(residual.float())  # (B, C, H, W) complex, unnormalised
        modulus = spectrum.abs().flatten(1)
        return {'l1': modulus.mean(dim=1), 'l2': _sqrt(modulus.pow(2).mean(dim=1))}

    def per_sample(self, residual: torch.Tensor, is_noise: torch.Tensor) -> torch.Tensor:
        """(B,) the norm each sample takes; ``is_noise`` (B,) bool says which samples are noise."""
        norms = self.norms(residual)
        noise, other = norms[self.noise_norm], norms[self.other_norm]
        return torch.where(is_noise.to(device=noise.device, dtype=torch.bool), noise, other)

    def forward(self, residual: torch.Tensor, is_noise: torch.Tensor) -> torch.Tensor:
        values = self.per_sample(residual, is_noise)
        return self.loss_weight * (values.sum() if self.reduction == 'sum' else values.mean())


@LOSS_REGISTRY.register()
class ResidualContrastiveLoss(nn.Module):
    """The residual contrastive term on the dense embedding (DA-RCOT, Eq. 16), labels = degradation ids.

    With z_i = normalize(flatten(e_i)) (dimension D):

    ``elementwise`` (the reference): over unordered pairs i < j,
        pos = sum_{k(i)=k(j)} mean_D exp(-z_i * z_j / tau),  neg = sum_{k(i)!=k(j)} mean_D exp(z_i * z_j / tau),
        loss = pos + neg, with * the ELEMENTWISE product averaged over the D entries (not a dot product);
    ``infonce`` (the paper's description): per anchor i with at least one positive,
        -log sum_{j!=i, k(j)=k(i)} exp(cos_ij / tau) / sum_{j!=i} exp(cos_ij / tau), averaged over anchors.

    A batch of one sample (or without positives, for InfoNCE) gives 0.

    Args:
        mode: ``'elementwise'`` or ``'infonce'``.
        tau: temperature, 0.07.
        loss_weight: 0.1 in the reference.
    """

    def __init__(self, mode: str = 'elementwise', tau: float = 0.07, loss_weight: float = 0.1) -> None:
        super().__init__()
        self.mode = _check('ResidualContrastiveLoss.mode', mode, CONTRASTIVE_MODES)
        if tau <= 0:
            raise ValueError(f'ResidualContrastiveLoss.tau must be > 0, got {tau}.')
        self.tau, self.loss_weight = tau, loss_weight

    def pair_terms(self, embedding: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The elementwise form's (pos, neg) sums."""
        z = F.normalize(embedding.float().flatten(1), dim=1)
        b = z.shape[0]
        i, j = torch.triu_indices(b, b, offset=1, device=z.device)
        same = labels[i] == labels[j]
        # the positive pairs are pulled together (exp(-.)), the negatives pushed apart (exp(+.))
        sign = torch.where(same, -1.0, 1.0).to(z.dtype).unsqueeze(1)
        per_pair = torch.exp(sign * z[i] * z[j] / self.tau).mean(dim=1)  # (pairs,)
        return per_pair[same].sum(), per_pair[~same].sum()

    def infonce(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(embedding.float().flatten(1), dim=1)
        logits = z @ z.t() / self.tau
        eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float('-inf'))
        positive = (labels.view(-1, 1) == labels.view(1, -1)) & ~eye
        anchors = positive.any(dim=1)
        if not bool(anchors.any()):
            return z.sum() * 0
        pos_logits = logits.masked_fill(~positive, float('-inf'))
        per_anchor = torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)
        return per_anchor[anchors].mean()

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(embedding.device).view(-1)
        if self.mode == 'infonce':
            return self.loss_weight * self.infonce(embedding, labels)
        pos, neg = self.pair_terms(embedding, labels)
        return self.loss_weight * (pos + neg)


@LOSS_REGISTRY.register()
class WGANGPLoss(nn.Module):
    """The WGAN gradient penalty of the potential: loss_weight * mean_i (||dF/dx~_i||_2 - 1)^2 on
    x~ = alpha y + (1 - alpha) T(x), alpha ~ U(0, 1) per sample; the norm is over all C*H*W entries.

    Args:
        loss_weight: 10, as the reference.
    """

    def __init__(self, loss_weight: float = 10.0) -> None:
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                alpha: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted penalty, the per-sample gradient norms). ``alpha`` (B, 1, 1, 1) is drawn when None."""
        real, fake = real.detach().float(), fake.detach().float()
        if alpha is None:
            alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        scores = critic(mixed)
        grad, = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
        norms = grad.flatten(1).norm(dim=1)
        return self.loss_weight * (norms - 1).pow(2).mean(), norms
