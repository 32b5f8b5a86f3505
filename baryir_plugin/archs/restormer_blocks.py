"""Restormer building blocks shared by every BaryIR network.

Channel-wise LayerNorm, MDTA attention, GDFN feed-forward, the pre-norm transformer block and the
pixel-(un)shuffle resamplers of Restormer (Zamir et al., CVPR 2022), written as small modules whose
parameter layout is stable, so official checkpoints map onto them with a plain key table
(see ``baryir_plugin.official``). No convolution has a bias, as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_TYPES = ('WithBias', 'BiasFree')


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Args:
        channels: number of channels C.
        norm_type: ``'WithBias'`` (standard LayerNorm with weight and bias) or ``'BiasFree'``
            (Restormer's variant: divides by the standard deviation without centring, weight only).
        eps: added to the variance, 1e-5 as in Restormer.
    """

    def __init__(self, channels: int, norm_type: str = 'WithBias', eps: float = 1e-5) -> None:
        super().__init__()
        if norm_type not in LAYER_NORM_TYPES:
            raise ValueError(f'LayerNorm_type must be one of {LAYER_NORM_TYPES}, got {norm_type!r}.')
        self.norm_type = norm_type
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if norm_type == 'WithBias' else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            # contiguous(): a channels-last result would give the following convs' weight gradients
            # strides that DistributedDataParallel's buckets do not expect.
            return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias,
                                self.eps).permute(0, 3, 1, 2).contiguous()
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return x * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1)


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA): attention over channels, not pixels.

    Cost is linear in H*W, which is what makes full-resolution restoration affordable.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attention width {dim} is not divisible by num_heads={num_heads}.')
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        # (B, heads, C/heads, H*W)
        q = F.normalize(q.reshape(b, self.num_heads, c // self.num_heads, h * w), dim=-1)
        k = F.normalize(k.reshape(b, self.num_heads, c // self.num_heads, h * w), dim=-1)
        v = v.reshape(b, self.num_heads, c // self.num_heads, h * w)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B, heads, C/h, C/h)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN): GELU(x1) * x2 after a depth-wise 3x3 conv."""

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, norm_type: str) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim, norm_type)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm2d(dim, norm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stage(num_blocks: int, dim: int, num_heads: int, ffn_expansion_factor: float,
                      norm_type: str) -> nn.Sequential:
    """``num_blocks`` TransformerBlocks at one width, applied in sequence."""
    return nn.Sequential(*[TransformerBlock(dim, num_heads, ffn_expansion_factor, norm_type) for _ in range(num_blocks)])


class Downsample(nn.Module):
    """3x3 conv to C/2 then PixelUnshuffle(2): (B, C, H, W) -> (B, 2C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.conv(x), 2)


class Upsample(nn.Module):
    """3x3 conv to 2C then PixelShuffle(2): (B, C, H, W) -> (B, C/2, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
