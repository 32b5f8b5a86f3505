"""BaryIR: all-in-one restoration in a continuous Wasserstein-barycenter latent space.

The network (BaryIR NeurIPS, Fig. 2; BaryIR journal, Sec. III) is a Restormer U-Net whose bottleneck latent z
is mapped by the barycenter map T to a degradation-agnostic barycenter latent zB = LN(T(z)); the
residual s = z - zB keeps what is specific to the degradation. The decoder restores from zB and s,
and a second, light decoder turns s into per-level residual features added to the skips.

Reads top-down: encoder -> barycenter map -> latent fusion -> residual decoder -> main decoder.
Widths in comments assume the input is H x W after padding to a multiple of 8.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .barycenter_map import BarycenterMap
from .restormer_blocks import Downsample, LayerNorm2d, Upsample, conv1x1, transformer_stage

EMBEDDING_MODES = ('barycenter+residual', 'original', 'barycenter', 'original+residual')
ZERO_FEATURES = (None, 'barycenter', 'residual')
PAD_MULTIPLE = 8  # three 2x downsamplings


class ResidualDecoder(nn.Module):
    """Decodes the residual embedding s into features for the skips of levels 3, 2 and 1.

    s (8d, H/8) -> r3 (4d, H/4) -> r2 (2d, H/2) -> r1 (d, H); each level refines with Restormer blocks.
    """

    def __init__(self, dim: int, num_blocks: Sequence[int], heads: Sequence[int], ffn: float, norm: str) -> None:
        super().__init__()
        self.proj3 = conv1x1(8 * dim, 8 * dim)
        self.up3 = Upsample(8 * dim)
        self.reduce3 = conv1x1(4 * dim, 4 * dim)
        self.blocks3 = transformer_stage(num_blocks[2], 4 * dim, heads[2], ffn, norm)
        self.proj2 = conv1x1(4 * dim, 4 * dim)
        self.up2 = Upsample(4 * dim)
        self.reduce2 = conv1x1(2 * dim, 2 * dim)
        self.blocks2 = transformer_stage(num_blocks[1], 2 * dim, heads[1], ffn, norm)
        self.proj1 = conv1x1(2 * dim, 2 * dim)
        self.up1 = Upsample(2 * dim)

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r3 = self.up3(self.proj3(s))  # (B, 4d, H/4, W/4)
        r2 = self.up2(self.proj2(self.blocks3(self.reduce3(r3))))  # (B, 2d, H/2, W/2)
        r1 = self.up1(self.proj1(self.blocks2(self.reduce2(r2))))  # (B, d, H, W)
        return r3, r2, r1


@ARCH_REGISTRY.register()
class BaryIR(nn.Module):
    """BaryIR restoration network.

    ``net(x)`` returns the restored image (same size as ``x``, any H x W); ``net(x, return_latents=True)``
    returns ``(image, z, z_bary, residual)`` for the barycenter losses (``z_bary``/``residual`` are
    ``None`` where the embedding mode does not compute them).

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image (the global residual needs it equal to in_channels).
        dim: base width d; level widths are d, 2d, 4d, 8d (latent), the fusion block 16d.
        num_blocks: Restormer blocks per encoder level 1..3 and in the latent.
        num_refinement_blocks: blocks after the last decoder level.
        heads: attention heads per level 1..4.
        ffn_expansion_factor: GDFN hidden ratio.
        LayerNorm_type: ``'WithBias'`` or ``'BiasFree'`` (Restormer's option name).
        bary_map_type: barycenter map T: ``'transformer'`` (reference), ``'mlp'``, ``'conv'``, ``'vit'``.
        num_bary_blocks: depth of T; ``None`` = ``num_blocks[3]`` for ``transformer`` (the reference,
            8 blocks by default) and 2 for the other maps.
        residual_scale: weight of the residual features added to the skips (0.8 in the reference).
        embedding_mode: which embeddings feed the decoder: ``'barycenter+residual'`` (default),
            ``'original'`` (z only, no T: the plain Restormer-style baseline), ``'barycenter'`` (zB only)
            or ``'original+residual'`` (z and s).
        zero_features: test-time ablation: ``'barycenter'`` or ``'residual'`` features are replaced by
            zeros before they reach the decoder (BaryIR journal, Fig. 9); ``None`` for normal use.
            Settable after construction through :meth:`set_zero_features`.
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
                 bary_map_type: str = 'transformer',
                 num_bary_blocks: Optional[int] = None,
                 residual_scale: float = 0.8,
                 embedding_mode: str = 'barycenter+residual',
                 zero_features: Optional[str] = None) -> None:
        super().__init__()
        num_blocks, heads = list(num_blocks), list(heads)
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f'BaryIR: num_blocks and heads need 4 entries (levels 1-3 and latent), '
                             f'got num_blocks={num_blocks}, heads={heads}.')
        if dim < 1 or in_channels < 1:
            raise ValueError(f'BaryIR: dim and in_channels must be positive, got dim={dim}, in_channels={in_channels}.')
        if in_channels != out_channels:
            raise ValueError(f'BaryIR adds the input to its output (global residual), so out_channels must equal '
                             f'in_channels; got in_channels={in_channels}, out_channels={out_channels}.')
        if embedding_mode not in EMBEDDING_MODES:
            raise ValueError(f'BaryIR: embedding_mode must be one of {EMBEDDING_MODES}, got {embedding_mode!r}.')
        self.in_channels = in_channels
        self.embedding_mode = embedding_mode
        self.uses_barycenter = embedding_mode != 'original'
        self.uses_residual = embedding_mode.endswith('+residual')
        self.residual_scale = residual_scale
        d, nb, hd, ffn, norm = dim, num_blocks, heads, ffn_expansion_factor, LayerNorm_type

        # Encoder
        self.embed = nn.Conv2d(in_channels, d, kernel_size=3, padding=1, bias=False)
        self.encoder1 = transformer_stage(nb[0], d, hd[0], ffn, norm)
        self.down1 = Downsample(d)
        self.encoder2 = transformer_stage(nb[1], 2 * d, hd[1], ffn, norm)
        self.down2 = Downsample(2 * d)
        self.encoder3 = transformer_stage(nb[2], 4 * d, hd[2], ffn, norm)
        self.down3 = Downsample(4 * d)
        self.latent = transformer_stage(nb[3], 8 * d, hd[3], ffn, norm)
        self.latent_norm = LayerNorm2d(8 * d, norm)  # shared by z and zB (BaryIR journal, Eq. 5)

        # Barycenter map T
        if self.uses_barycenter:
            if num_bary_blocks is None:
                num_bary_blocks = nb[3] if bary_map_type == 'transformer' else 2
            self.bary_map = BarycenterMap(8 * d, bary_map_type, num_bary_blocks, hd[3], ffn, norm)

        # Latent fusion: (z or zB) [+ s] -> 4d at H/8 -> 2d at H/4
        fused = 8 * d * (2 if self.uses_residual else 1)
        self.fuse_block = transformer_stage(1, fused, hd[2], ffn, norm)[0]
        self.fuse_proj = conv1x1(fused, 4 * d)
        self.up3 = Upsample(4 * d)

        if self.uses_residual:
            self.residual_decoder = ResidualDecoder(d, nb, hd, ffn, norm)

        # Main decoder; skip_l = enc_l + residual_scale * r_l
        self.reduce3 = conv1x1(6 * d, 4 * d)
        self.decoder3 = transformer_stage(nb[2], 4 * d, hd[2], ffn, norm)
        self.decoder3_tail = transformer_stage(1, 4 * d, hd[2], ffn, norm)[0]
        self.decoder3_proj = conv1x1(4 * d, 4 * d)
        self.up2 = Upsample(4 * d)
        self.reduce2 = conv1x1(4 * d, 2 * d)
        self.decoder2 = transformer_stage(nb[1], 2 * d, hd[1], ffn, norm)
        self.decoder2_tail = transformer_stage(1, 2 * d, hd[2], ffn, norm)[0]
        self.decoder2_proj = conv1x1(2 * d, 2 * d)
        self.up1 = Upsample(2 * d)
        self.decoder1 = transformer_stage(nb[0], 2 * d, hd[0], ffn, norm)
        self.refinement = transformer_stage(num_refinement_blocks, 2 * d, hd[0], ffn, norm)
        self.output = nn.Conv2d(2 * d, out_channels, kernel_size=3, padding=1, bias=False)

        self.zero_features: Optional[str] = None
        self.set_zero_features(zero_features)

    def set_zero_features(self, which: Optional[str]) -> None:
        """Zero the ``'barycenter'`` or ``'residual'`` features fed to the decoder (``None`` to stop)."""
        if which not in ZERO_FEATURES:
            raise ValueError(f'BaryIR: zero_features must be one of {ZERO_FEATURES}, got {which!r}.')
        if which == 'barycenter' and not self.embedding_mode.startswith('barycenter'):
            raise ValueError(f"BaryIR: zero_features='barycenter' needs an embedding_mode that feeds z_bary to the "
                             f"decoder, but embedding_mode is {self.embedding_mode!r}.")
        if which == 'residual' and not self.uses_residual:
            raise ValueError(f"BaryIR: zero_features='residual' needs a '+residual' embedding_mode, "
                             f'but embedding_mode is {self.embedding_mode!r}.')
        self.zero_features = which

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'BaryIR expects an image batch of shape (B, {self.in_channels}, H, W), got {shape}.')

    @staticmethod
    def _pad(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
        if ph == 0 and pw == 0:
            return x
        # Reflection needs the pad to be smaller than the side; tiny images fall back to replication.
        mode = 'reflect' if ph < h and pw < w else 'replicate'
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def decoder_inputs(self, z: torch.Tensor, z_bary: Optional[torch.Tensor], residual: Optional[torch.Tensor]):
        """``(fusion input, residual features)`` per the embedding mode and the test-time ablation: the
        primary embedding (zB or z) [concatenated with s: (B, 16d, H/8, W/8)], and s for the residual
        decoder (None without one)."""
        primary = z_bary if self.embedding_mode.startswith('barycenter') else z
        if self.zero_features == 'barycenter':
            primary = torch.zeros_like(primary)
        if not self.uses_residual:
            return primary, None
        res_feat = torch.zeros_like(residual) if self.zero_features == 'residual' else residual
        return torch.cat([primary, res_feat], dim=1), res_feat

    def forward(self, x: torch.Tensor, return_latents: bool = False):
        self._check_input(x)
        h, w = x.shape[-2:]
        inp = self._pad(x)

        enc1 = self.encoder1(self.embed(inp))  # (B, d, H, W)
        enc2 = self.encoder2(self.down1(enc1))  # (B, 2d, H/2, W/2)
        enc3 = self.encoder3(self.down2(enc2))  # (B, 4d, H/4, W/4)
        z = self.latent_norm(self.latent(self.down3(enc3)))  # (B, 8d, H/8, W/8)

        z_bary = residual = None
        if self.uses_barycenter:
            z_bary = self.latent_norm(self.bary_map(z))
            residual = z - z_bary

        fused_in, res_feat = self.decoder_inputs(z, z_bary, residual)
        dec = self.up3(self.fuse_proj(self.fuse_block(fused_in)))  # (B, 2d, H/4, W/4)

        skip3, skip2, skip1 = enc3, enc2, enc1
        if self.uses_residual:
            r3, r2, r1 = self.residual_decoder(res_feat)
            skip3 = enc3 + self.residual_scale * r3
            skip2 = enc2 + self.residual_scale * r2
            skip1 = enc1 + self.residual_scale * r1

        dec = self.decoder3(self.reduce3(torch.cat([dec, skip3], dim=1)))  # (B, 4d, H/4, W/4)
        dec = self.up2(self.decoder3_proj(self.decoder3_tail(dec)))  # (B, 2d, H/2, W/2)
        dec = self.decoder2(self.reduce2(torch.cat([dec, skip2], dim=1)))  # (B, 2d, H/2, W/2)
        dec = self.up1(self.decoder2_proj(self.decoder2_tail(dec)))  # (B, d, H, W)
        dec = self.decoder1(torch.cat([dec, skip1], dim=1))  # (B, 2d, H, W)
        out = (self.output(self.refinement(dec)) + inp)[..., :h, :w]

        if return_latents:
            return out, z, z_bary, residual
        return out

    def forward_with_latents(self, x: torch.Tensor):
        """``(image, z, z_bary, residual)``; same as ``forward(x, return_latents=True)``."""
        return self.forward(x, return_latents=True)
