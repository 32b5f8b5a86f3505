"""The barycenter map T: latent z -> barycenter latent (before the shared LayerNorm).

The reference uses a stack of Restormer blocks at the latent width (BaryIR journal, Sec. III-B);
the journal's ablation (BaryIR journal, Tab. XI) compares it with an MLP, a plain convolutional map and
a standard ViT. All variants keep the (B, C, h, w) shape and are residual, so T starts near the
identity map whatever its depth.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .restormer_blocks import LayerNorm2d, conv1x1, transformer_stage

BARY_MAP_TYPES = ('transformer', 'mlp', 'conv', 'vit')


class _MLPBlock(nn.Module):
    """x + W2 GELU(W1 LN(x)) with 1x1 convolutions: a per-position map with no spatial mixing."""

    def __init__(self, dim: int, hidden: int, norm_type: str) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim, norm_type)
        self.fc1 = conv1x1(dim, hidden)
        self.fc2 = conv1x1(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class _ConvBlock(nn.Module):
    """x + LN(ReLU(conv3x3(x))): the convolutional ablation of T."""

    def __init__(self, dim: int, norm_type: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.norm = LayerNorm2d(dim, norm_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(F.relu(self.conv(x)))


class _ViTBlock(nn.Module):
    """Standard pre-norm ViT block: softmax self-attention over the h*w tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'ViT barycenter map: width {dim} is not divisible by num_heads={num_heads}.')
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        q, k, v = self.qkv(self.norm1(t)).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(
            2, 0, 3, 1, 4)
        t = t + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


@ARCH_REGISTRY.register()
class BarycenterMap(nn.Module):
    """The barycenter map T at the latent width: (B, dim, h, w) -> (B, dim, h, w), any h and w.

    Registered on its own, so it can be built from YAML (``type: BarycenterMap``), put on any latent, or
    given to BaryIR as ``bary_map: {type: BarycenterMap, map_type: mlp, num_blocks: 2}``.

    Args:
        dim: latent width (8 * dim of the default BaryIR network, 384).
        map_type: ``'transformer'`` (reference), ``'mlp'``, ``'conv'`` or ``'vit'``.
        num_blocks: depth of the map.
        num_heads: attention heads for ``transformer`` and ``vit``.
        ffn_expansion_factor: GDFN expansion (``transformer``) and hidden ratio (``mlp``).
        norm_type: LayerNorm variant of the Restormer blocks.
    """

    def __init__(self, dim: int = 384, map_type: str = 'transformer', num_blocks: int = 8, num_heads: int = 8,
                 ffn_expansion_factor: float = 2.66, norm_type: str = 'WithBias') -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f'BarycenterMap: dim must be a positive integer (the latent width), got {dim!r}.')
        self.dim = dim
        if map_type not in BARY_MAP_TYPES:
            raise ValueError(f'bary_map_type must be one of {BARY_MAP_TYPES}, got {map_type!r}.')
        if num_blocks < 1:
            raise ValueError(f'num_bary_blocks must be >= 1, got {num_blocks}.')
        self.map_type = map_type
        if map_type == 'transformer':
            self.blocks = transformer_stage(num_blocks, dim, num_heads, ffn_expansion_factor, norm_type)
        elif map_type == 'mlp':
            hidden = int(dim * ffn_expansion_factor)
            self.blocks = nn.Sequential(*[_MLPBlock(dim, hidden, norm_type) for _ in range(num_blocks)])
        elif map_type == 'conv':
            self.blocks = nn.Sequential(*[_ConvBlock(dim, norm_type) for _ in range(num_blocks)])
        else:
            self.blocks = nn.Sequential(*[_ViTBlock(dim, num_heads) for _ in range(num_blocks)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f'BarycenterMap expects latents of shape (B, {self.dim}, h, w), got {tuple(z.shape)}.')
        return self.blocks(z)
