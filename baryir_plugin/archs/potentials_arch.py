"""Kantorovich potentials f_1..f_K of the multi-source barycenter problem (training only).

Each branch f_k scores a barycenter latent zB_i (C x h x w, h = P/8 for training crops of P x P):
grouped 4x4 conv (stride 4, padding 1) -> LeakyReLU(0.2) -> flatten -> Linear(F, F/4) -> Linear(F/4, 64)
-> LeakyReLU(0.2) -> Linear(64, 1), the reference's layer stack (BaryIR journal, Sec. III-C). The K branches
are stored as stacked tensors and evaluated for the whole batch in one pass per layer, instead of the
reference's loop over samples and branches.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .precision import fp32_region

CONGRUENCE_MODES = ('penalty', 'parameterized')


def _conv_out(size: int) -> int:
    return (size + 2 * 1 - 4) // 4 + 1


def options_from_network(net: nn.Module) -> dict:
    """The potentials' options that follow the restoration network: ``in_channels`` (its latent width) and
    ``latent_stride`` (its latent's downscale factor), for the networks that expose them."""
    found = {'in_channels': getattr(net, 'latent_channels', None), 'latent_stride': getattr(net, 'latent_stride', None)}
    return {key: value for key, value in found.items() if value is not None}


@ARCH_REGISTRY.register()
class BarycenterPotentials(nn.Module):
    """K potentials, one per degradation source.

    Args:
        num_potentials: K, the number of sources.
        in_channels: width of the barycenter latent (8 * dim of the BaryIR network; 384 by default).
        patch_size: training crop size P; fixes the flattened width F when ``pool_size`` is None.
        groups: groups of the first convolution (4 in the reference).
        pool_size: None keeps the reference layout (only latents of a P x P crop are accepted);
            an integer adaptively average-pools the conv output to pool_size x pool_size, so any crop
            size works (F = in_channels * pool_size**2).
        congruence: ``'penalty'`` (reference: K free potentials; the loss penalises
            (sum_k lambda_k f_k)^2) or ``'parameterized'`` (BaryIR journal: K-1 free potentials and
            f_K = -(1/lambda_K) sum_{k<K} lambda_k f_k, so the congruence holds exactly).
        lambdas: barycenter weights lambda_k (sum to 1); uniform if omitted. The training model sets
            them from the dataset with :meth:`set_lambdas`; they are saved with the weights.
        latent_stride: the restoration network's latent downscale factor (8 for the default backbone,
            16 for a four-level one); the latent of a P x P crop is P/latent_stride wide. BaryIRModel
            fills it in from network_g when it is not given.
    """

    def __init__(self,
                 num_potentials: int = 3,
                 in_channels: int = 384,
                 patch_size: int = 128,
                 groups: int = 4,
                 pool_size: Optional[int] = None,
                 congruence: str = 'penalty',
                 lambdas: Optional[Sequence[float]] = None,
                 latent_stride: int = 8) -> None:
        super().__init__()
        if num_potentials < 1:
            raise ValueError(f'BarycenterPotentials: num_potentials must be >= 1, got {num_potentials}.')
        if congruence not in CONGRUENCE_MODES:
            raise ValueError(f'BarycenterPotentials: congruence must be one of {CONGRUENCE_MODES}, got {congruence!r}.')
        if congruence == 'parameterized' and num_potentials < 2:
            raise ValueError("BarycenterPotentials: congruence='parameterized' needs num_potentials >= 2.")
        if in_channels % groups:
            raise ValueError(f'BarycenterPotentials: in_channels={in_channels} is not divisible by groups={groups}.')
        if not isinstance(latent_stride, int) or latent_stride < 1:
            raise ValueError(f'BarycenterPotentials: latent_stride must be a positive integer, got {latent_stride!r}.')
        self.latent_stride = latent_stride
        if pool_size is None:
            if patch_size % latent_stride:
                raise ValueError(f'BarycenterPotentials: patch_size must be a multiple of {latent_stride} (the '
                                 f'latent stride), got {patch_size}; or set pool_size to accept any crop size.')
            self.latent_size: Optional[int] = patch_size // latent_stride
            side = _conv_out(self.latent_size)
            if side < 1:
                raise ValueError(f'BarycenterPotentials: patch_size={patch_size} is too small (latent '
                                 f'{self.latent_size}x{self.latent_size}); use >= {2 * latent_stride} or set '
                                 'pool_size.')
        else:
            if pool_size < 1:
                raise ValueError(f'BarycenterPotentials: pool_size must be >= 1, got {pool_size}.')
            self.latent_size, side = None, pool_size
        self.num_potentials = num_potentials
        self.in_channels = in_channels
        self.groups = groups
        self.pool_size = pool_size
        self.congruence = congruence
        self.num_features = in_channels * side * side
        hidden = self.num_features // 4
        free = num_potentials - 1 if congruence == 'parameterized' else num_potentials

        self.conv_weight = nn.Parameter(torch.empty(free, in_channels, in_channels // groups, 4, 4))
        self.fc1_weight = nn.Parameter(torch.empty(free, hidden, self.num_features))
        self.fc1_bias = nn.Parameter(torch.empty(free, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(free, 64, hidden))
        self.fc2_bias = nn.Parameter(torch.empty(free, 64))
        self.fc3_weight = nn.Parameter(torch.empty(free, 64))
        self.fc3_bias = nn.Parameter(torch.empty(free))
        self.register_buffer('lambdas', torch.full((num_potentials,), 1.0 / num_potentials))
        self.reset_parameters()
        if lambdas is not None:
            self.set_lambdas(lambdas)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Conv ~ N(0, 0.02) as in the reference; linears as torch's nn.Linear default, per branch."""
        self.conv_weight.normal_(0.0, 0.02)
        for w, b in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias),
                     (self.fc3_weight, self.fc3_bias)):
            bound = 1.0 / math.sqrt(w.shape[-1])
            w.uniform_(-bound, bound)
            b.uniform_(-bound, bound)

    @torch.no_grad()
    def set_lambdas(self, lambdas: Sequence[float] | torch.Tensor) -> None:
        lam = torch.as_tensor(lambdas, dtype=self.lambdas.dtype).flatten()
        if lam.numel() != self.num_potentials or bool((lam <= 0).any()) or abs(float(lam.sum()) - 1.0) > 1e-5:
            raise ValueError(f'BarycenterPotentials: lambdas must be {self.num_potentials} positive weights summing '
                             f'to 1, got {lam.tolist()}.')
        self.lambdas.copy_(lam.to(self.lambdas.device))

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.in_channels:
            raise ValueError(f'BarycenterPotentials expects latents of shape (B, {self.in_channels}, h, w), '
                             f'got {tuple(z.shape)}.')
        if self.latent_size is not None and tuple(z.shape[-2:]) != (self.latent_size, self.latent_size):
            raise ValueError(f'BarycenterPotentials was built for patch_size={self.latent_stride * self.latent_size} (latent '
                             f'{self.latent_size}x{self.latent_size}) but got a {z.shape[-2]}x{z.shape[-1]} latent; '
                             'train on crops of that size, or set pool_size to accept any size.')

    def forward_all(self, z_bary: torch.Tensor) -> torch.Tensor:
        """Scores of every potential for every sample: (B, K); float32 under autocast (``archs/precision.py``)."""
        self._check_input(z_bary)
        with fp32_region('potentials', z_bary) as upcast:
            return self._scores(z_bary.float() if upcast else z_bary)

    def _scores(self, z_bary: torch.Tensor) -> torch.Tensor:
        free = self.conv_weight.shape[0]
        b = z_bary.shape[0]
        # All branches at once: branch k sees the input through its own `groups` conv groups. (Evaluating
        # only each sample's own branch, grouped by source, measured no faster at batch 3-8 and K 3-5.)
        x = F.conv2d(z_bary.repeat(1, free, 1, 1), self.conv_weight.flatten(0, 1), stride=4, padding=1,
                     groups=free * self.groups)  # (B, K*C, o, o)
        x = F.leaky_relu(x, 0.2)
        if self.pool_size is not None:
            x = F.adaptive_avg_pool2d(x, self.pool_size)
        x = x.reshape(b, free, self.num_features)
        x = torch.einsum('bkf,khf->bkh', x, self.fc1_weight) + self.fc1_bias
        x = torch.einsum('bkh,kgh->bkg', x, self.fc2_weight) + self.fc2_bias
        x = F.leaky_relu(x, 0.2)
        scores = torch.einsum('bkg,kg->bk', x, self.fc3_weight) + self.fc3_bias  # (B, free)
        if self.congruence == 'parameterized':
            lam = self.lambdas.to(scores.dtype)
            last = -(scores * lam[:-1]).sum(dim=1, keepdim=True) / lam[-1]
            scores = torch.cat([scores, last], dim=1)
        return scores

    def forward(self, z_bary: torch.Tensor, source_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f_{k(i)}(zB_i) for each sample, shape (B,), or all scores (B, K) when ``source_ids`` is None."""
        scores = self.forward_all(z_bary)
        if source_ids is None:
            return scores
        source_ids = torch.as_tensor(source_ids, device=scores.device).long().view(-1, 1)
        if source_ids.shape[0] != scores.shape[0]:
            raise ValueError(f'BarycenterPotentials: got {source_ids.shape[0]} source ids for a batch of '
                             f'{scores.shape[0]} latents.')
        return scores.gather(1, source_ids).squeeze(1)

    def congruence_sum(self, z_bary: torch.Tensor) -> torch.Tensor:
        """sum_k lambda_k f_k(zB_i) per sample, shape (B,); zero up to rounding when parameterized."""
        return self.congruence_of(self.forward_all(z_bary))

    def congruence_of(self, scores: torch.Tensor) -> torch.Tensor:
        """sum_k lambda_k f_k per sample from already computed scores (B, K)."""
        return (scores * self.lambdas.to(scores.dtype)).sum(dim=1)
