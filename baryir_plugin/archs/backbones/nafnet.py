"""NAFNet backbone (Chen, Chu, Zhang, Sun: "Simple Baselines for Image Restoration", ECCV 2022).

A U-Net of nonlinear-activation-free blocks: LayerNorm -> 1x1 conv (2x) -> 3x3 depth-wise conv ->
SimpleGate (split in halves, multiply) -> simplified channel attention (global mean, 1x1 conv, multiply)
-> 1x1 conv, with a learned zero-initialised scale on the residual; then the same with a gated 1x1 FFN.
Down-sampling is a 2x2 stride-2 conv doubling the width; up-sampling a 1x1 conv and PixelShuffle(2)
halving it; skips are added, not concatenated; the output adds the input.

Written from the paper; module and parameter names follow its public release, so NAFNet weights load
into the backbone's part of the framework by name. With the barycenter framework the latent is the
output of the middle blocks (16 * width at H/16 for four levels), and the decoder starts from it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..restormer_blocks import LayerNorm2d
from .base import BACKBONE_REGISTRY, UNetBackbone, UpsampleTo


class SimpleGate(nn.Module):
    """x1 * x2 for the two channel halves of x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class NAFBlock(nn.Module):
    """NAFNet's block (paper Fig. 3c): x + beta * SCA-gated conv branch, then + gamma * gated FFN."""

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2, drop_out_rate: float = 0.0) -> None:
        super().__init__()
        dw = channels * dw_expand
        ffn = channels * ffn_expand
        self.conv1 = nn.Conv2d(channels, dw, kernel_size=1)
        self.conv2 = nn.Conv2d(dw, dw, kernel_size=3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, channels, kernel_size=1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, kernel_size=1))
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(channels, ffn, kernel_size=1)
        self.conv5 = nn.Conv2d(ffn // 2, channels, kernel_size=1)
        self.norm1 = LayerNorm2d(channels, 'WithBias', eps=1e-6)
        self.norm2 = LayerNorm2d(channels, 'WithBias', eps=1e-6)
        self.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else None
        self.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else None
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        if self.dropout1 is not None:
            x = self.dropout1(x)
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        if self.dropout2 is not None:
            x = self.dropout2(x)
        return y + x * self.gamma


def naf_stage(num_blocks: int, channels: int) -> nn.Sequential:
    return nn.Sequential(*[NAFBlock(channels) for _ in range(num_blocks)])


@BACKBONE_REGISTRY.register()
class NAFNetBackbone(UNetBackbone):
    """NAFNet as a backbone of the barycenter framework.

    Args:
        in_channels: image channels (NAFNet's ``img_channel``).
        width: width of level 1; level l has width * 2**(l-1), the latent width * 2**levels.
        enc_blk_nums: NAFBlocks per encoder level (the number of levels is its length).
        middle_blk_num: NAFBlocks at the bottleneck (the latent).
        dec_blk_nums: NAFBlocks per decoder level, deepest first (NAFNet's order); as long as enc_blk_nums.
    Defaults: NAFNet-width32 of the paper's SIDD experiments.
    """

    def __init__(self,
                 in_channels: int = 3,
                 width: int = 32,
                 enc_blk_nums: Sequence[int] = (2, 2, 4, 8),
                 middle_blk_num: int = 12,
                 dec_blk_nums: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        enc, dec = list(enc_blk_nums), list(dec_blk_nums)
        if width < 1 or in_channels < 1 or not enc or len(enc) != len(dec) or min(enc + dec + [middle_blk_num]) < 0:
            raise ValueError(f'NAFNetBackbone: width and in_channels must be positive and enc_blk_nums, dec_blk_nums '
                             f'non-empty lists of the same length of counts >= 0; got width={width}, '
                             f'in_channels={in_channels}, enc_blk_nums={enc}, dec_blk_nums={dec}, '
                             f'middle_blk_num={middle_blk_num}.')
        self.in_channels = in_channels
        self.dec_blk_nums = dec
        self.skip_channels = tuple(width * 2 ** level for level in range(len(enc)))
        self.latent_channels = self.decoder_channels = width * 2 ** len(enc)

        self.intro = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        chan = width
        for num in enc:
            self.encoders.append(naf_stage(num, chan))
            self.downs.append(nn.Conv2d(chan, 2 * chan, kernel_size=2, stride=2))
            chan *= 2
        self.middle_blks = naf_stage(middle_blk_num, chan)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for num in dec:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, kernel_size=1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(naf_stage(num, chan))
        self.ending = nn.Conv2d(width, in_channels, kernel_size=3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        x = self.intro(x)
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        return self.middle_blks(x), skips

    def decode(self, features: torch.Tensor, skips: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = features
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(list(skips))):
            out = decoder(up(out) + skip)
        return self.ending(out) + x

    def fusion_block(self, channels: int) -> nn.Module:
        return NAFBlock(channels)

    def residual_stage(self, level: int, channels: int) -> nn.Module:
        return naf_stage(self.dec_blk_nums[len(self.skip_channels) - level], channels)

    def upsample(self, in_channels: int, out_channels: int) -> nn.Module:
        return UpsampleTo(in_channels, out_channels, kernel_size=1)

    def module_groups(self) -> list[tuple[str, list[str]]]:
        return [('encoder', ['intro', 'encoders', 'downs', 'middle_blks']), ('main decoder', ['ups', 'decoders', 'ending'])]
