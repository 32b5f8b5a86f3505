"""The Restormer U-Net of the released BaryIR network (the default backbone).

Restormer (Zamir et al., CVPR 2022) with BaryIR's decoder (BaryIR journal, Sec. III; the released code):
the fused latent enters at 4d, and each of decoder levels 3 and 2 ends in one more Transformer block and a
1x1 convolution (the places where PromptIR's prompt fusion sat, see ``promptir.py``) before up-sampling.

Widths for base width d: skips d, 2d, 4d (levels 1-3), latent 8d at H/8; the decoder starts from 4d.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..restormer_blocks import Downsample, Upsample, conv1x1, transformer_stage
from .base import BACKBONE_REGISTRY, UNetBackbone, UpsampleTo

# The released network's module order: a seed gives the same initial weights as the reference layout
# (framework modules in between, by name).
RELEASE_INIT_ORDER = ('embed', 'encoder1', 'down1', 'encoder2', 'down2', 'encoder3', 'down3', 'latent', 'latent_norm',
                      'bary_map', 'fuse_block', 'fuse_proj', 'up3', 'residual_decoder', 'reduce3', 'decoder3',
                      'decoder3_tail', 'decoder3_proj', 'up2', 'reduce2', 'decoder2', 'decoder2_tail', 'decoder2_proj',
                      'up1', 'decoder1', 'refinement', 'output')


def check_restormer_options(dim: int, num_blocks: Sequence[int], heads: Sequence[int], in_channels: int,
                            out_channels: int, owner: str) -> tuple[list[int], list[int]]:
    num_blocks, heads = list(num_blocks), list(heads)
    if len(num_blocks) != 4 or len(heads) != 4:
        raise ValueError(f'{owner}: num_blocks and heads need 4 entries (levels 1-3 and latent), '
                         f'got num_blocks={num_blocks}, heads={heads}.')
    if dim < 1 or in_channels < 1:
        raise ValueError(f'{owner}: dim and in_channels must be positive, got dim={dim}, in_channels={in_channels}.')
    if in_channels != out_channels:
        raise ValueError(f'{owner} adds the input to its output (global residual), so out_channels must equal '
                         f'in_channels; got in_channels={in_channels}, out_channels={out_channels}.')
    return num_blocks, heads


@BACKBONE_REGISTRY.register()
class RestormerBackbone(UNetBackbone):
    """Restormer encoder and BaryIR's decoder (the options keep Restormer's names).

    Args:
        in_channels, out_channels: image channels (equal: the output adds the input).
        dim: base width d.
        num_blocks: Transformer blocks of encoder levels 1-3 and of the latent; the decoder levels mirror 1-3.
        num_refinement_blocks: blocks after the last decoder level.
        heads: attention heads of levels 1-3 and the latent.
        ffn_expansion_factor: GDFN hidden ratio.
        LayerNorm_type: ``'WithBias'`` or ``'BiasFree'``.
    """

    def __init__(self,
                 in_channels: int = 3,
                 out_channels: int = 3,
                 dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8),
                 num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8),
                 ffn_expansion_factor: float = 2.66,
                 LayerNorm_type: str = 'WithBias') -> None:  # noqa: N803 (Restormer's option name)
        super().__init__()
        nb, hd = check_restormer_options(dim, num_blocks, heads, in_channels, out_channels, type(self).__name__)
        d, ffn, norm = dim, ffn_expansion_factor, LayerNorm_type
        self.dim, self.num_blocks, self.heads, self.ffn, self.norm_type = d, nb, hd, ffn, norm
        self.in_channels = in_channels
        self.latent_channels = 8 * d
        self.skip_channels = (d, 2 * d, 4 * d)
        self.decoder_channels = 4 * d

        # Encoder
        self.embed = nn.Conv2d(in_channels, d, kernel_size=3, padding=1, bias=False)
        self.encoder1 = transformer_stage(nb[0], d, hd[0], ffn, norm)
        self.down1 = Downsample(d)
        self.encoder2 = transformer_stage(nb[1], 2 * d, hd[1], ffn, norm)
        self.down2 = Downsample(2 * d)
        self.encoder3 = transformer_stage(nb[2], 4 * d, hd[2], ffn, norm)
        self.down3 = Downsample(4 * d)
        self.latent = transformer_stage(nb[3], 8 * d, hd[3], ffn, norm)

        # Decoder; skip_l arrives as enc_l (+ the framework's residual features)
        self.up3 = Upsample(4 * d)
        self.reduce3 = conv1x1(6 * d, 4 * d)
        self.decoder3 = transformer_stage(nb[2], 4 * d, hd[2], ffn, norm)
        self.decoder3_tail = self.fusion_block(4 * d)
        self.decoder3_proj = conv1x1(4 * d, 4 * d)
        self.up2 = Upsample(4 * d)
        self.reduce2 = conv1x1(4 * d, 2 * d)
        self.decoder2 = transformer_stage(nb[1], 2 * d, hd[1], ffn, norm)
        self.decoder2_tail = self.fusion_block(2 * d)
        self.decoder2_proj = conv1x1(2 * d, 2 * d)
        self.up1 = Upsample(2 * d)
        self.decoder1 = transformer_stage(nb[0], 2 * d, hd[0], ffn, norm)
        self.refinement = transformer_stage(num_refinement_blocks, 2 * d, hd[0], ffn, norm)
        self.output = nn.Conv2d(2 * d, out_channels, kernel_size=3, padding=1, bias=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        enc1 = self.encoder1(self.embed(x))  # (B, d, H, W)
        enc2 = self.encoder2(self.down1(enc1))  # (B, 2d, H/2, W/2)
        enc3 = self.encoder3(self.down2(enc2))  # (B, 4d, H/4, W/4)
        return self.latent(self.down3(enc3)), [enc1, enc2, enc3]  # latent (B, 8d, H/8, W/8)

    def decode(self, features: torch.Tensor, skips: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        skip1, skip2, skip3 = skips
        dec = self.up3(features)  # (B, 2d, H/4, W/4)
        dec = self.decoder3(self.reduce3(torch.cat([dec, skip3], dim=1)))  # (B, 4d, H/4, W/4)
        dec = self.up2(self.decoder3_proj(self.decoder3_tail(self.decoder_condition(2, dec))))  # (B, 2d, H/2)
        dec = self.decoder2(self.reduce2(torch.cat([dec, skip2], dim=1)))  # (B, 2d, H/2, W/2)
        dec = self.up1(self.decoder2_proj(self.decoder2_tail(self.decoder_condition(1, dec))))  # (B, d, H, W)
        dec = self.decoder1(torch.cat([dec, skip1], dim=1))  # (B, 2d, H, W)
        return self.output(self.refinement(dec)) + x

    def decoder_condition(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """The input of decoder level ``level + 1``'s tail block (a subclass may widen it; PromptIR does)."""
        return x

    # -- the framework's blocks are Restormer blocks too --------------------------------------------
    def fusion_block(self, channels: int) -> nn.Module:
        if channels % self.heads[2]:
            raise ValueError(f'{type(self).__name__}: the fusion width {channels} is not divisible by heads[2]='
                             f'{self.heads[2]}.')
        return transformer_stage(1, channels, self.heads[2], self.ffn, self.norm_type)[0]

    def residual_stage(self, level: int, channels: int) -> nn.Module:
        return transformer_stage(self.num_blocks[level - 1], channels, self.heads[level - 1], self.ffn, self.norm_type)

    def upsample(self, in_channels: int, out_channels: int) -> nn.Module:
        return Upsample(in_channels) if 2 * out_channels == in_channels else UpsampleTo(in_channels, out_channels)

    @property
    def release_layout(self) -> bool:
        """Whether the modules are those of the released network (subclasses may add their own)."""
        return type(self) is RestormerBackbone

    def init_order(self, framework_modules: Sequence[str]) -> Optional[list[str]]:
        if not self.release_layout:
            return None
        return [name for name in RELEASE_INIT_ORDER if name in framework_modules or name in self._modules]

    def module_groups(self) -> list[tuple[str, list[str]]]:
        encoder = ['embed', 'encoder1', 'down1', 'encoder2', 'down2', 'encoder3', 'down3', 'latent']
        first = ['up3']
        decoder = [n for n in self._modules if n not in encoder and n not in first]
        return [('encoder', encoder), ('latent fusion', first), ('main decoder', decoder)]
