"""Restormer building blocks shared by every BaryIR network.

Channel-wise LayerNorm, MDTA attention, GDFN feed-forward, the pre-norm transformer block and the
pixel-(un)shuffle resamplers of Restormer (Zamir et al., CVPR 2022), written as small modules whose
parameter layout is stable, so official checkpoints map onto them with a plain key table
(see ``baryir_plugin.official``). No convolution has a bias, as in the reference.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .precision import fp32_region, in_fp32

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
        if in_fp32('layernorm', x):
            x = x.float()
        if self.bias is None:
            var = x.var(dim=1, keepdim=True, unbiased=False)
            return x * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1)
        out = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias,
                           self.eps).permute(0, 3, 1, 2)
        if x.is_contiguous(memory_format=torch.channels_last):
            # (B, H, W, C) in memory: the channel axis is innermost, so LayerNorm ran on a view and its
            # result is channels-last again: no copy in either direction.
            return out
        # (B, C, H, W) in memory: the normalised axis is strided, so layer_norm copies its input, and the
        # result is copied back to the input's layout; a channels-last result would otherwise spread to
        # the following convolutions and give their weight gradients strides DDP's buckets do not expect.
        # (Statistics over dim 1 without the permute measured no faster, with more saved activations.)
        return out.contiguous()


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
        h = x.shape[-2]
        q, k, v = (rearrange(t, 'b (head c) h w -> b head c (h w)', head=self.num_heads)
                   for t in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        with fp32_region('attention', q) as upcast:
            if upcast:
                q, k = q.float(), k.float()
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B, heads, C/h, C/h)
        return self.project_out(rearrange(attn @ v, 'b head c (h w) -> b (head c) h w', h=h))


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


class TransformerStage(nn.Sequential):
    """TransformerBlocks at one width, applied in sequence.

    ``checkpoint_every = n`` (set through :func:`set_activation_checkpointing`) keeps only the input of
    each run of n blocks during training and recomputes the run's activations in the backward pass:
    less memory for one more forward of the stage. 0 (default) stores every activation, as usual.
    """

    checkpoint_every = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.checkpoint_every
        if not (n and self.training and torch.is_grad_enabled()):
            return super().forward(x)
        for start in range(0, len(self), n):
            x = checkpoint(self._run, x, start, start + n, use_reentrant=False)
        return x

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in self[start:stop]:
            x = block(x)
        return x


def transformer_stage(num_blocks: int, dim: int, num_heads: int, ffn_expansion_factor: float,
                      norm_type: str) -> TransformerStage:
    """``num_blocks`` TransformerBlocks at one width, applied in sequence."""
    return TransformerStage(*[TransformerBlock(dim, num_heads, ffn_expansion_factor, norm_type)
                              for _ in range(num_blocks)])


def transformer_stages(net: nn.Module) -> dict[str, TransformerStage]:
    """The network's Restormer stages by module name (``encoder1``, ``bary_map.blocks``, ...)."""
    return {name: m for name, m in net.named_modules() if isinstance(m, TransformerStage) and len(m)}


def set_activation_checkpointing(net: nn.Module, stages: Optional[Sequence[str]] = None, every: int = 1) -> list[str]:
    """Checkpoint the named stages of ``net`` (all of them when ``stages`` is None) in runs of ``every``
    blocks; ``every = 0`` switches it off. Returns the names of the stages it applies to."""
    found = transformer_stages(net)
    names = list(found) if stages is None else list(stages)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f'train.checkpointing.stages: {unknown} are not stages of this network; its stages are '
                         f'{list(found)}.')
    if not isinstance(every, int) or every < 0:
        raise ValueError(f'train.checkpointing.every must be an integer >= 0 (blocks per recomputed run), '
                         f'got {every!r}.')
    for name, stage in found.items():
        stage.checkpoint_every = every if name in names else 0
    return names


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
