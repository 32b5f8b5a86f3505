"""DA-RCOT's potential F: a critic that scores restored and clean IMAGES (training only).

Unlike BaryIR's potentials (on latents, one per source), one network scores the image: ten
convolutions, each followed by LeakyReLU(0.2), five of them 4x4 with stride 2 (P -> P/32), then
Linear(F, F/4) -> Linear(F/4, 64) -> LeakyReLU(0.2) -> Linear(64, 1), with no activation between the
first two linear layers and no sigmoid, as the authors' code builds it. DA-RCOT, Sec. 5 calls it "the
same as" SRGAN's discriminator, which has BatchNorm and a sigmoid; this one has neither.
"""
from __future__ import annotations

from typing import Optional

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

DOWNSCALE = 32  # five stride-2 convolutions


@ARCH_REGISTRY.register()
class DARCOTPotential(nn.Module):
    """The image critic F (the authors' ``F_net``); ``net(x)`` on (B, C, P, P) returns (B,) scores.

    State keys follow the reference (``features.<i>``, ``fc``, ``fc1``, ``fc2``), so converted official
    potentials load as they are.

    Args:
        in_channels: image channels.
        patch_size: the training crop P. Without ``pool_size`` it fixes the flattened width
            F = 8 * base_channels * (P / 32)^2 (P^2 / 2 at the default width), so only P x P inputs with
            P a multiple of 32 are accepted, as in the reference.
        base_channels: width of the first convolutions (64 in the reference); the stack widens to 2x,
            4x and 8x. Smaller values make a light critic for CPU demos.
        pool_size: None keeps the reference layout; an integer adaptively average-pools the last
            feature map to pool_size x pool_size, so any crop size works (F = 8 * base_channels * pool_size^2).
    """

    def __init__(self, in_channels: int = 3, patch_size: int = 128, base_channels: int = 64,
                 pool_size: Optional[int] = None) -> None:
        super().__init__()
        if base_channels < 1 or in_channels < 1:
            raise ValueError(f'DARCOTPotential: in_channels and base_channels must be positive, got '
                             f'{in_channels} and {base_channels}.')
        if pool_size is None and (patch_size < DOWNSCALE or patch_size % DOWNSCALE):
            raise ValueError(f'DARCOTPotential: patch_size must be a multiple of {DOWNSCALE} (five stride-2 '
                             f'convolutions), got {patch_size}; or set pool_size (e.g. 1) to accept any crop size.')
        if pool_size is not None and pool_size < 1:
            raise ValueError(f'DARCOTPotential: pool_size must be a positive integer or ~, got {pool_size}.')
        b = base_channels
        # (in, out, kernel, stride, padding, bias): the reference drops the bias from the 8b convolutions
        layout = [(in_channels, b, 5, 1, 2, True), (b, b, 4, 2, 1, True),
                  (b, 2 * b, 3, 1, 1, True), (2 * b, 2 * b, 4, 2, 1, True),
                  (2 * b, 4 * b, 3, 1, 1, True), (4 * b, 4 * b, 4, 2, 1, True),
                  (4 * b, 8 * b, 3, 1, 1, False), (8 * b, 8 * b, 4, 2, 1, False),
                  (8 * b, 8 * b, 3, 1, 1, False), (8 * b, 8 * b, 4, 2, 1, False)]
        layers: list[nn.Module] = []
        for cin, cout, k, s, p, bias in layout:
            layers += [nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.patch_size, self.pool_size = patch_size, pool_size
        side = pool_size if pool_size is not None else patch_size // DOWNSCALE
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_size is not None else None
        num_features = 8 * b * side * side
        self.fc = nn.Linear(num_features, num_features // 4)
        self.fc1 = nn.Linear(num_features // 4, 64)
        self.act = nn.LeakyReLU(0.2)
        self.fc2 = nn.Linear(64, 1)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)  # the reference's init; biases and linear layers: PyTorch's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is None and tuple(x.shape[-2:]) != (self.patch_size, self.patch_size):
            raise ValueError(f'DARCOTPotential(patch_size={self.patch_size}) scores {self.patch_size}x{self.patch_size} '
                             f'crops only, got {tuple(x.shape[-2:])}; set pool_size to accept other sizes.')
        feats = self.features(x)  # (B, 8b, P/32, P/32)
        if self.pool is not None:
            feats = self.pool(feats)
        return self.fc2(self.act(self.fc1(self.fc(feats.flatten(1))))).view(-1)
