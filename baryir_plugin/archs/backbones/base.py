"""What a U-Net backbone exposes so the barycenter framework can sit on it.

The framework (:class:`baryir_plugin.archs.BaryIR`) owns the parts the BaryIR papers add to a restoration
U-Net: the shared LayerNorm of the latent, the barycenter map T, the latent fusion of z_B and the residual
s = z - z_B, and the residual decoder whose features are added to the skips. A backbone owns the rest:
an encoder that ends in a latent, and a decoder that restores from features at the latent's resolution
plus the skips. Subclass :class:`UNetBackbone`, set the widths in ``__init__``, implement
:meth:`~UNetBackbone.encode` and :meth:`~UNetBackbone.decode`, and register the class in
:data:`BACKBONE_REGISTRY`; the other methods have defaults a backbone may replace with its own blocks.

The backbone's modules are registered on the framework under their own names (no ``backbone.`` prefix),
so a backbone's own checkpoint keys are the framework's keys: weights trained without the barycenter
map load into the shared part with ``strict_load_g: false``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from basicsr.utils.registry import Registry
from torch import nn

from baryir_plugin.errors import did_you_mean

BACKBONE_REGISTRY = Registry('backbone')


class UpsampleTo(nn.Module):
    """2x up-sampling from ``in_channels`` to ``out_channels``: a convolution to 4 * out_channels, then
    PixelShuffle(2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class ConvBlock(nn.Module):
    """x + conv3x3(GELU(conv3x3(x))): the default block of the framework's parts on a backbone that names
    none of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(x)))


class UNetBackbone(nn.Module):
    """A U-Net split at its bottleneck.

    Attributes a subclass sets in ``__init__``:
        in_channels: channels of the input image (the output has as many).
        latent_channels: C of the latent ``encode`` returns, (B, C, H/s, W/s) with s = ``latent_stride``.
        skip_channels: widths of the skips ``encode`` returns, shallowest (full resolution) first; skip l
            (1-based) is at resolution H / 2**(l-1), and the deepest is one 2x step above the latent.
        decoder_channels: width of the features ``decode`` starts from, at the latent's resolution.
        latent_stride: the latent's downscale factor, 2 ** len(skip_channels); inputs are padded to a
            multiple of it.
        condition_channels: width of the extra features :meth:`latent_condition` returns (0: none).
    """

    in_channels: int = 3
    latent_channels: int
    skip_channels: tuple[int, ...]
    decoder_channels: int
    condition_channels: int = 0

    @property
    def latent_stride(self) -> int:
        return 2 ** len(self.skip_channels)

    # -- what every backbone implements ------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(latent, skips)`` for an input whose sides are multiples of ``latent_stride``."""
        raise NotImplementedError

    def decode(self, features: torch.Tensor, skips: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The restored image from the fused latent ``features`` (``decoder_channels`` wide, at the latent's
        resolution), the skips (already carrying the residual features) and the padded input ``x`` (for a
        global residual)."""
        raise NotImplementedError

    # -- blocks the framework builds on the backbone (defaults: plain convolutions) ----------------
    def fusion_block(self, channels: int) -> nn.Module:
        """The block that mixes [z_B, s(, condition)] at the latent resolution."""
        return ConvBlock(channels)

    def residual_stage(self, level: int, channels: int) -> nn.Module:
        """Blocks that refine the residual features of skip ``level`` (1-based) before they go one level up."""
        return ConvBlock(channels)

    def upsample(self, in_channels: int, out_channels: int) -> nn.Module:
        """2x up-sampling for the residual decoder."""
        return UpsampleTo(in_channels, out_channels)

    def latent_condition(self, z: torch.Tensor, z_bary: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Extra features (``condition_channels`` wide) concatenated to the fusion input; None for none."""
        return None

    def init_order(self, framework_modules: Sequence[str]) -> Optional[list[str]]:
        """The order in which the framework draws the initial weights of its top-level modules (the
        backbone's and its own, by name), or None for the order they were built in."""
        return None

    def module_groups(self) -> list[tuple[str, list[str]]]:
        """The backbone's top-level modules by group, for reports (default: one ``backbone`` group)."""
        return [('backbone', [name for name, _ in self.named_children()])]

    def check(self) -> None:
        """Raise ValueError naming what is missing when the subclass breaks the interface."""
        name = type(self).__name__
        for attr in ('latent_channels', 'skip_channels', 'decoder_channels'):
            if not hasattr(self, attr):
                raise ValueError(f'backbone {name} does not set {attr} in __init__ (see UNetBackbone).')
        widths = [self.latent_channels, self.decoder_channels, self.in_channels, *self.skip_channels]
        if not self.skip_channels or any(not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f'backbone {name}: widths must be positive integers and skip_channels non-empty, got '
                             f'latent_channels={self.latent_channels}, skip_channels={self.skip_channels}, '
                             f'decoder_channels={self.decoder_channels}, in_channels={self.in_channels}.')
        if self._parameters or self._buffers:
            raise ValueError(f'backbone {name} holds parameters or buffers directly ({list(self._parameters)}'
                             f'{list(self._buffers)}); put them in a submodule.')
        for method in ('encode', 'decode'):
            if getattr(type(self), method) is getattr(UNetBackbone, method):
                raise ValueError(f'backbone {name} does not implement {method}().')


def build_backbone(options: dict) -> UNetBackbone:
    """A backbone from ``{type: <registered name>, ...options}``."""
    if not isinstance(options, dict) or 'type' not in options:
        raise ValueError(f'backbone must be a mapping with a type (one of {sorted(BACKBONE_REGISTRY.keys())}), '
                         f'got {options!r}.')
    options = dict(options)
    name = options.pop('type')
    if not isinstance(name, str) or name not in BACKBONE_REGISTRY:
        raise ValueError(f'backbone.type: no backbone {name!r}{did_you_mean(name, list(BACKBONE_REGISTRY.keys()))}; '
                         f'registered: {sorted(BACKBONE_REGISTRY.keys())} (register yours with '
                         '@BACKBONE_REGISTRY.register()).')
    backbone = BACKBONE_REGISTRY.get(name)(**options)
    if not isinstance(backbone, UNetBackbone):
        raise ValueError(f'backbone {name} is not a UNetBackbone subclass.')
    backbone.check()
    return backbone
