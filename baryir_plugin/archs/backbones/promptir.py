"""PromptIR backbone for BaryIR — a RECONSTRUCTION: no reference code or weights were released.

The BaryIR journal (Sec. V-A, "PromptIR as backbone", Tab. III and XIII) reports BaryIR on PromptIR
(Potlapalli et al., "PromptIR: Prompting for All-in-One Blind Image Restoration", NeurIPS 2023) but does
not say where the prompts enter or which latent drives them, and the authors' code has no such network.
This variant puts PromptIR's three prompt generation blocks back at the three places where BaryIR's
decoder inherited PromptIR's prompt-fusion blocks (the released BaryIR keeps their names and comments the
prompt channels out), and leaves every BaryIR part unchanged:

- prompt 3 (latent, H/8): p3 = PGB3(src), src = z (default; what PromptIR feeds its third prompt),
  z_B (``prompt_source: bary``) or s (``residual``); the framework's fusion block takes [z_B, s, p3].
- prompt 2 (decoder level 3, H/4): p2 = PGB2(dec3); the level's tail block takes [dec3, p2].
- prompt 1 (decoder level 2, H/2): p1 = PGB1(dec2); the level's tail block takes [dec2, p1].

Each widened block is PromptIR's "concatenate the prompt, one Transformer block, 1x1 convolution back to
the level's width". ``prompt_levels: []`` is exactly the Restormer backbone (same modules, keys and
initial weights). The journal's own numbers for its (unknown) architecture are not a parity target.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..restormer_blocks import conv1x1
from .base import BACKBONE_REGISTRY
from .restormer import RestormerBackbone

PROMPT_SOURCES = ('z', 'bary', 'residual')


class PromptGenBlock(nn.Module):
    """PromptIR's prompt generation block (PGM): a softmax mixture of ``prompt_len`` learned prompts,
    weighted from the feature's spatial mean, resized to the feature and passed through a 3x3 convolution.

    (B, lin_dim, H, W) -> (B, prompt_dim, H, W). Parameter names are PromptIR's, so its weights map by name.
    """

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int) -> None:
        super().__init__()
        self.prompt_param = nn.Parameter(torch.empty(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.prompt_param.uniform_(0.0, 1.0)  # PromptIR: torch.rand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, L)
        prompt = torch.einsum('bl,lchw->bchw', weights, self.prompt_param[0].to(weights.dtype))
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode='bilinear', align_corners=False)
        return self.conv3x3(prompt)


@BACKBONE_REGISTRY.register()
class PromptIRBackbone(RestormerBackbone):
    """The Restormer backbone with PromptIR's prompts (reconstruction; see the module docstring).

    Args (besides RestormerBackbone's):
        prompt_levels: which of PromptIR's prompts 1 (decoder level 2), 2 (decoder level 3) and
            3 (latent) to use; ``[]`` = the Restormer backbone exactly.
        prompt_dims: prompt widths Cp of prompts 1, 2, 3 (PromptIR: 64, 128, 320).
        prompt_len: learned prompts per block (PromptIR: 5).
        prompt_sizes: learned prompt sides of prompts 1, 2, 3 (PromptIR: 64, 32, 16; resized to the
            feature, so any input size works).
        prompt_source: what drives prompt 3: ``'z'`` (encoder latent), ``'bary'`` (z_B) or ``'residual'`` (s).
    """

    def __init__(self,
                 in_channels: int = 3,
                 out_channels: int = 3,
                 dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8),
                 num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8),
                 ffn_expansion_factor: float = 2.66,
                 LayerNorm_type: str = 'WithBias',  # noqa: N803 (Restormer's option name)
                 prompt_levels: Sequence[int] = (1, 2, 3),
                 prompt_dims: Sequence[int] = (64, 128, 320),
                 prompt_len: int = 5,
                 prompt_sizes: Sequence[int] = (64, 32, 16),
                 prompt_source: str = 'z') -> None:
        super().__init__(in_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads,
                         ffn_expansion_factor, LayerNorm_type)
        levels = list(prompt_levels)
        if any(level not in (1, 2, 3) for level in levels) or len(set(levels)) != len(levels):
            raise ValueError(f'PromptIRBackbone: prompt_levels must be distinct entries of [1, 2, 3], got {levels}.')
        dims, sizes = list(prompt_dims), list(prompt_sizes)
        if len(dims) != 3 or len(sizes) != 3 or any(v < 1 for v in dims + sizes) or prompt_len < 1:
            raise ValueError(f'PromptIRBackbone: prompt_dims and prompt_sizes need 3 positive entries (prompts 1-3) '
                             f'and prompt_len >= 1; got prompt_dims={dims}, prompt_sizes={sizes}, '
                             f'prompt_len={prompt_len}.')
        if prompt_source not in PROMPT_SOURCES:
            raise ValueError(f'PromptIRBackbone: prompt_source must be one of {PROMPT_SOURCES}, got {prompt_source!r}.')
        self.prompt_levels = sorted(levels)
        self.prompt_source = prompt_source
        d = dim
        width = {1: 2 * d, 2: 4 * d, 3: 8 * d}  # the feature each prompt reads (PromptIR's lin_dim)
        for level in self.prompt_levels:
            cp = dims[level - 1]
            self.add_module(f'prompt{level}', PromptGenBlock(cp, prompt_len, sizes[level - 1], width[level]))
        # decoder levels 3 and 2: their tail block and 1x1 conv take [feature, prompt]
        for level, prefix in ((2, 'decoder3'), (1, 'decoder2')):
            if level in self.prompt_levels:
                wide = width[level] + dims[level - 1]
                setattr(self, f'{prefix}_tail', self.fusion_block(wide))
                setattr(self, f'{prefix}_proj', conv1x1(wide, width[level]))
        self.condition_channels = dims[2] if 3 in self.prompt_levels else 0

    def decoder_condition(self, level: int, x: torch.Tensor) -> torch.Tensor:
        if level not in self.prompt_levels:
            return x
        return torch.cat([x, getattr(self, f'prompt{level}')(x)], dim=1)

    def latent_condition(self, z: torch.Tensor, z_bary: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if 3 not in self.prompt_levels:
            return None
        source = {'z': z, 'bary': z_bary, 'residual': residual}[self.prompt_source]
        if source is None:
            raise ValueError(f"PromptIRBackbone: prompt_source={self.prompt_source!r} needs the network's "
                             f"{'barycenter latent' if self.prompt_source == 'bary' else 'residual'}, which its "
                             "embedding_mode does not compute; use prompt_source: z.")
        return self.prompt3(source)

    @property
    def release_layout(self) -> bool:
        return not self.prompt_levels

    def module_groups(self) -> list[tuple[str, list[str]]]:
        groups = super().module_groups()
        prompts = [f'prompt{level}' for level in self.prompt_levels]
        return [(name, [m for m in modules if m not in prompts]) for name, modules in groups] + \
            ([('prompts', prompts)] if prompts else [])
