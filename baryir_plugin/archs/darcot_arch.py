"""DA-RCOT: degradation-aware residual-conditioned optimal transport (DA-RCOT, TPAMI 2025, Sec. 4.2).

The transport map T restores in two passes of one generator G, a Restormer U-Net with PromptIR's
fusion blocks and no prompts (DA-RCOT, Eq. 14-15):

1. the encoder runs once on x; an unconditioned decoder pass gives the intermediate result x1;
2. the transport residual r = x - x1 (not detached) goes through the residual embedding generation
   module (REGM), a Restormer encoder with part of a decoder, which gives three embeddings:
   e_dense (8d, H/8), e_mid (4d, H/4) and e_shallow (2d, H/2);
3. the decoder runs again on the same encoder features, with ``residual_scale`` * e added at the
   latent, before the level-3 fusion block and before the level-2 fusion block: T(x).

The REGM shares G's patch embedding and last downsampling, and builds e_shallow with G's own level-2
decoder (the authors' code does so; their separate copies of those modules are never called and have
no counterpart here). Widths follow ``dim`` everywhere (the authors' code writes 192 for 4 * dim).
Reads top-down: encoder -> decoder pass -> REGM -> conditioned decoder pass.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .backbones.restormer import check_restormer_options
from .restormer_blocks import Downsample, Upsample, conv1x1, transformer_stage

CONDITIONS = ('multiscale', 'dense_only', 'none', 'first_pass_image')
PAD_MULTIPLE = 8  # three 2x downsamplings

Embeddings = tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``multiple``: by reflection, or by replication where the pad is not
    smaller than the side (tiny images), as BaryIR does."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    mode = 'reflect' if ph < h and pw < w else 'replicate'
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class ResidualEmbedding(nn.Module):
    """The REGM's own layers (DA-RCOT, Eq. 15); :meth:`DARCOT.residual_embeddings` combines them with the
    generator modules the REGM shares.

    encoder1..3 and latent mirror G's encoder on the residual; with ``decoder`` (multi-scale
    conditioning) a fusion block, a 1x1 projection, an upsampling and a level-3 decoder give e_mid.
    """

    def __init__(self, dim: int, num_blocks: Sequence[int], heads: Sequence[int], ffn: float, norm: str,
                 decoder: bool = True) -> None:
        super().__init__()
        d, nb, hd = dim, num_blocks, heads
        self.encoder1 = transformer_stage(nb[0], d, hd[0], ffn, norm)
        self.down1 = Downsample(d)
        self.encoder2 = transformer_stage(nb[1], 2 * d, hd[1], ffn, norm)
        self.down2 = Downsample(2 * d)
        self.encoder3 = transformer_stage(nb[2], 4 * d, hd[2], ffn, norm)
        self.latent = transformer_stage(nb[3], 8 * d, hd[3], ffn, norm)
        self.has_decoder = decoder
        if decoder:
            self.fuse_block = transformer_stage(1, 8 * d, hd[2], ffn, norm)[0]
            self.fuse_proj = conv1x1(8 * d, 4 * d)
            self.up3 = Upsample(4 * d)
            self.reduce3 = conv1x1(6 * d, 4 * d)
            self.decoder3 = transformer_stage(nb[2], 4 * d, hd[2], ffn, norm)


@ARCH_REGISTRY.register()
class DARCOT(nn.Module):
    """DA-RCOT's transport map T (the authors' ``MRCNet(decoder=True)``).

    ``net(x)`` returns the restored image T(x), same size as ``x`` (any H x W: padded by reflection to a
    multiple of 8 and cropped back). ``net(x, return_intermediates=True)`` returns
    ``(T(x), x1, r, (e_dense, e_mid, e_shallow))``: the first pass, the transport residual x - x1 (both
    at the input's size) and the embeddings (at the padded size; None where ``condition`` does not
    compute them).

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output (the global residual needs it equal to in_channels).
        dim: base width d; level widths d, 2d, 4d, 8d (latent); the last decoder level works at 2d.
        num_blocks: Restormer blocks per encoder level 1..3 and in the latent (decoder levels repeat them).
        num_refinement_blocks: blocks after the last decoder level.
        heads: attention heads per level 1..4 (the fusion blocks use heads[2], as the reference).
        ffn_expansion_factor: GDFN hidden ratio.
        LayerNorm_type: ``'WithBias'`` or ``'BiasFree'`` (Restormer's option name).
        residual_scale: weight of the embeddings added in the second pass (0.8 in the reference).
        condition: ``'multiscale'`` (reference: e_dense, e_mid, e_shallow), ``'dense_only'`` (e_dense at
            the latent only, RCOT-like), ``'none'`` (no second pass: T(x) = x1) or ``'first_pass_image'``
            (the REGM embeds x1 instead of the residual) -- the ablations of DA-RCOT, Tab. VI.
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
                 residual_scale: float = 0.8,
                 condition: str = 'multiscale') -> None:
        super().__init__()
        num_blocks, heads = check_restormer_options(dim, num_blocks, heads, in_channels, out_channels, 'DARCOT')
        if condition not in CONDITIONS:
            raise ValueError(f'DARCOT: condition must be one of {CONDITIONS}, got {condition!r}.')
        self.in_channels = in_channels
        self.condition = condition
        self.residual_scale = residual_scale
        self.latent_channels = 8 * dim
        d, nb, hd, ffn, norm = dim, num_blocks, heads, ffn_expansion_factor, LayerNorm_type

        # Encoder (run once per forward)
        self.embed = nn.Conv2d(in_channels, d, kernel_size=3, padding=1, bias=False)
        self.encoder1 = transformer_stage(nb[0], d, hd[0], ffn, norm)
        self.down1 = Downsample(d)
        self.encoder2 = transformer_stage(nb[1], 2 * d, hd[1], ffn, norm)
        self.down2 = Downsample(2 * d)
        self.encoder3 = transformer_stage(nb[2], 4 * d, hd[2], ffn, norm)
        self.down3 = Downsample(4 * d)
        self.latent = transformer_stage(nb[3], 8 * d, hd[3], ffn, norm)

        # Decoder (run in both passes)
        self.fuse_block = transformer_stage(1, 8 * d, hd[2], ffn, norm)[0]
        self.fuse_proj = conv1x1(8 * d, 4 * d)
        self.up3 = Upsample(4 * d)
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

        if condition != 'none':
            self.regm = ResidualEmbedding(d, nb, hd, ffn, norm, decoder=condition != 'dense_only')

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'DARCOT expects an image batch of shape (B, {self.in_channels}, H, W), got {shape}.')

    def decode(self, latent: torch.Tensor, skips: Sequence[torch.Tensor],
               embeddings: Optional[Embeddings] = None) -> torch.Tensor:
        """One decoder pass from the latent and the encoder skips (enc1, enc2, enc3); with ``embeddings``
        the conditioned pass. Returns the output convolution (before the global residual)."""
        enc1, enc2, enc3 = skips
        dense, mid, shallow = embeddings if embeddings is not None else (None, None, None)
        s = self.residual_scale
        lat = latent if dense is None else latent + s * dense  # (B, 8d, H/8, W/8)
        dec = self.up3(self.fuse_proj(self.fuse_block(lat)))  # (B, 2d, H/4, W/4)
        dec = self.decoder3(self.reduce3(torch.cat([dec, enc3], dim=1)))  # (B, 4d, H/4, W/4)
        if mid is not None:
            dec = dec + s * mid
        dec = self.up2(self.decoder3_proj(self.decoder3_tail(dec)))  # (B, 2d, H/2, W/2)
        dec = self.decoder2(self.reduce2(torch.cat([dec, enc2], dim=1)))  # (B, 2d, H/2, W/2)
        if shallow is not None:
            dec = dec + s * shallow
        dec = self.up1(self.decoder2_proj(self.decoder2_tail(dec)))  # (B, d, H, W)
        dec = self.decoder1(torch.cat([dec, enc1], dim=1))  # (B, 2d, H, W)
        return self.output(self.refinement(dec))

    def residual_embeddings(self, r: torch.Tensor) -> Embeddings:
        """The REGM on ``r`` (B, C, H, W), H and W multiples of 8: (e_dense, e_mid, e_shallow), the last two
        None with ``condition: dense_only``. Uses G's embed and down3, and G's level-2 decoder for e_shallow."""
        regm = self.regm
        f1 = regm.encoder1(self.embed(r))  # (B, d, H, W)
        f2 = regm.encoder2(regm.down1(f1))  # (B, 2d, H/2, W/2)
        f3 = regm.encoder3(regm.down2(f2))  # (B, 4d, H/4, W/4)
        dense = regm.latent(self.down3(f3))  # (B, 8d, H/8, W/8)
        if not regm.has_decoder:
            return dense, None, None
        q = regm.up3(regm.fuse_proj(regm.fuse_block(dense)))  # (B, 2d, H/4, W/4)
        mid = regm.decoder3(regm.reduce3(torch.cat([q, f3], dim=1)))  # (B, 4d, H/4, W/4)
        shallow = self.decoder2(self.reduce2(torch.cat([self.up2(mid), f2], dim=1)))  # (B, 2d, H/2, W/2)
        return dense, mid, shallow

    def forward(self, x: torch.Tensor, return_intermediates: bool = False):
        self._check_input(x)
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x)

        enc1 = self.encoder1(self.embed(inp))  # (B, d, H, W)
        enc2 = self.encoder2(self.down1(enc1))  # (B, 2d, H/2, W/2)
        enc3 = self.encoder3(self.down2(enc2))  # (B, 4d, H/4, W/4)
        latent = self.latent(self.down3(enc3))  # (B, 8d, H/8, W/8), the same in both passes
        skips = (enc1, enc2, enc3)

        first = self.decode(latent, skips) + inp  # x1, the unconditioned pass
        residual = inp - first  # r: the final loss reaches the first pass through it
        embeddings: Embeddings | tuple[None, None, None] = (None, None, None)
        if self.condition == 'none':
            out = first
        else:
            embeddings = self.residual_embeddings(first if self.condition == 'first_pass_image' else residual)
            out = self.decode(latent, skips, embeddings) + inp

        out = out[..., :h, :w]
        if return_intermediates:
            return out, first[..., :h, :w], residual[..., :h, :w], embeddings
        return out
