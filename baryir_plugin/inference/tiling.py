"""Restoring images larger than memory: exact streamed execution of BaryIR, and blended tiles for any network.

**Why plain tiles are not enough here.** BaryIR's Restormer blocks attend over channels (MDTA): each
block's attention matrix is a normalised Gram matrix of its query and key maps summed over *every pixel
of the image*. A tile sees other sums than the whole image, so independently restored tiles differ from
the whole-image result everywhere, not only at their seams (measured on the demo network and a Kodak
photo: 3e-3 to 8e-3 mean absolute difference, 0.09 at worst, whatever the overlap).

**Streamed execution** (:func:`streamed_forward`, BaryIR) runs the network layer by layer over full-size
feature maps kept in host memory, each layer tile by tile on the device:

- every local layer (convolutions, GDFN, LayerNorm, the resamplers) gets its tiles with a halo of its own
  receptive field (one pixel for a 3x3 convolution) and is therefore exact;
- every MDTA block runs in two passes: the first accumulates, per head, the Gram matrix q k^T and the
  squared norms of q and k over all tiles; the second applies the attention matrix built from these
  whole-image sums to each tile's values.

The result equals the untiled forward up to the order of floating-point sums (about 1e-6), for any
tile size; the tile size only bounds the device memory (one layer of one tile at a time) and the host
keeps the full-size maps. Tiles shrink with depth as the width grows (side / sqrt(2^level)), so every
level's tiles hold about as many values.

**Blended tiles** (:func:`blended_forward`) are the fallback for other architectures (and an option):
overlapping tiles restored independently and averaged with feathered weights (a linear ramp across the
overlap), so no seam is visible; exact only for networks whose receptive field fits in the overlap.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ['StreamedRunner', 'blended_forward', 'can_stream', 'streamed_forward', 'tile_boxes']

Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def tile_boxes(height: int, width: int, tile: int, multiple: int = 1) -> Iterator[Box]:
    """Non-overlapping boxes covering ``height x width`` with sides of at most ``tile`` (their corners on
    multiples of ``multiple``)."""
    tile = max(multiple, tile // multiple * multiple)
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            yield y0, min(y0 + tile, height), x0, min(x0 + tile, width)


class StreamedRunner:
    """Runs layers over full-size maps (host memory) tile by tile on ``device``.

    Args:
        tile: tile side at full resolution (level 0); level l uses tile / sqrt(2^l), at least 16.
        device: where each tile is computed.
        autocast: a context manager factory for low precision (or None).
        progress: called once per tile pass (for a progress bar).
    """

    def __init__(self, tile: int, device: torch.device, autocast: Optional[Callable] = None,
                 progress: Optional[Callable[[], None]] = None, host: torch.device = torch.device('cpu')) -> None:
        self.tile = tile
        self.device = device
        self.host = host
        self.autocast = autocast
        self.progress = progress
        self.full_height: Optional[int] = None

    # ---------------------------------------------------------------------------------------------
    def _side(self, x: torch.Tensor) -> int:
        level = max(0, round(math.log2(self.full_height / x.shape[-2]))) if self.full_height else 0
        return max(16, int(self.tile / math.sqrt(2 ** level)) // 2 * 2)

    def _region(self, x: torch.Tensor, box: Box, halo: int) -> tuple[torch.Tensor, Box]:
        """The box grown by ``halo`` (clipped to the map), on the device, and the crop that gives the box back."""
        y0, y1, x0, x1 = box
        h, w = x.shape[-2:]
        ry0, ry1, rx0, rx1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
        part = x[..., ry0:ry1, rx0:rx1].to(self.device, non_blocking=True).contiguous()  # convolutions of views are slow
        return part, (y0 - ry0, y0 - ry0 + (y1 - y0), x0 - rx0, x0 - rx0 + (x1 - x0))

    def _run(self, fn: Callable, *args):
        if self.autocast is None:
            return fn(*args)
        with self.autocast():
            return fn(*args)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress()

    def local(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, halo: int,
              post: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, scale: float = 1.0,
              multiple: int = 1) -> torch.Tensor:
        """``post(fn(x))`` for a ``fn`` that keeps the resolution and sees ``halo`` pixels around each output
        pixel; ``post`` rearranges pixels (pixel (un)shuffle: ``scale`` 0.5 or 2, tiles on even corners)."""
        out = None
        for box in tile_boxes(*x.shape[-2:], self._side(x), multiple):
            part, (cy0, cy1, cx0, cx1) = self._region(x, box, halo)
            y = self._run(fn, part)[..., cy0:cy1, cx0:cx1]
            if post is not None:
                y = post(y)
            if out is None:
                h, w = x.shape[-2:]
                out = torch.empty(x.shape[0], y.shape[1], int(h * scale), int(w * scale), dtype=y.dtype,
                                  device=self.host)
            y0, y1, x0, x1 = (int(v * scale) for v in box)
            out[..., y0:y1, x0:x1] = y.to(self.host)
        self._tick()
        return out

    # ---------------------------------------------------------------------------------------------
    def attention_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x + MDTA(LN(x))`` with the attention matrices of the whole map (two passes), then ``x + GDFN(LN(x))``."""
        attn = block.attn
        heads = attn.num_heads

        def qkv(part: torch.Tensor) -> torch.Tensor:
            return attn.qkv_dwconv(attn.qkv(block.norm1(part)))

        gram = sq_q = sq_k = None
        side = self._side(x)
        for box in tile_boxes(*x.shape[-2:], side):
            part, (cy0, cy1, cx0, cx1) = self._region(x, box, 1)
            q, k, _ = self._run(qkv, part)[..., cy0:cy1, cx0:cx1].chunk(3, dim=1)
            wide = torch.promote_types(q.dtype, torch.float32)  # the sums in float32 at least (as under autocast)
            q = rearrange(q, 'b (head c) h w -> b head c (h w)', head=heads).to(wide)
            k = rearrange(k, 'b (head c) h w -> b head c (h w)', head=heads).to(wide)
            g, nq, nk = q @ k.transpose(-2, -1), q.square().sum(-1), k.square().sum(-1)
            gram, sq_q, sq_k = (g, nq, nk) if gram is None else (gram + g, sq_q + nq, sq_k + nk)
        eps = 1e-12  # F.normalize's: each row divided by max(norm, eps)
        cos = gram / (sq_q.sqrt().clamp_min(eps).unsqueeze(-1) * sq_k.sqrt().clamp_min(eps).unsqueeze(-2))
        matrix = (cos * attn.temperature.to(cos.dtype)).softmax(dim=-1)  # (B, heads, C/h, C/h)
        self._tick()

        def apply(part: torch.Tensor, crop: Box) -> torch.Tensor:
            cy0, cy1, cx0, cx1 = crop
            v = qkv(part)[..., cy0:cy1, cx0:cx1].chunk(3, dim=1)[2]
            h = v.shape[-2]
            v = rearrange(v, 'b (head c) h w -> b head c (h w)', head=heads)
            mixed = rearrange(matrix.to(v.dtype) @ v, 'b head c (h w) -> b (head c) h w', h=h)
            return part[..., cy0:cy1, cx0:cx1] + attn.project_out(mixed)

        out = torch.empty_like(x)
        for box in tile_boxes(*x.shape[-2:], side):
            part, crop = self._region(x, box, 1)
            y0, y1, x0, x1 = box
            out[..., y0:y1, x0:x1] = self._run(apply, part, crop).to(self.host, x.dtype)
        self._tick()
        return self.local(lambda t: t + block.ffn(block.norm2(t)), out, halo=1)

    def stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for block in stage:
            x = self.attention_block(block, x)
        return x

    def conv(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A convolution (or any local module) whose kernel gives its halo."""
        halo = module.kernel_size[0] // 2 if isinstance(module, nn.Conv2d) else 0
        return self.local(module, x, halo)

    def down(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.local(module.conv, x, 1, post=lambda t: F.pixel_unshuffle(t, 2), scale=0.5, multiple=2)

    def up(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.local(module.conv, x, 1, post=lambda t: F.pixel_shuffle(t, 2), scale=2.0)

    def whole(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A module with a global receptive field that is not MDTA (the ViT barycenter map): run whole."""
        out = self._run(module, x.to(self.device)).to(self.host)
        self._tick()
        return out


def can_stream(net: nn.Module) -> bool:
    """Whether :func:`streamed_forward` knows this network (BaryIR on the released Restormer backbone, with
    their own forwards; other backbones are tiled by blending)."""
    from ..archs.backbones import RestormerBackbone
    from ..archs.baryir_arch import BaryIR
    return type(net) is BaryIR and type(net.backbone) is RestormerBackbone


def _bary_map(runner: StreamedRunner, bary_map: nn.Module, z: torch.Tensor) -> torch.Tensor:
    kind = bary_map.map_type
    if kind == 'transformer':
        return runner.stage(bary_map.blocks, z)
    if kind == 'mlp':
        return runner.local(bary_map.blocks, z, 0)
    if kind == 'conv':
        return runner.local(bary_map.blocks, z, len(bary_map.blocks))
    return runner.whole(bary_map, z)


@torch.no_grad()
def streamed_forward(net: nn.Module, x: torch.Tensor, runner: StreamedRunner) -> torch.Tensor:
    """BaryIR's forward (``net(x)``, same result) with every layer run tile by tile over host maps.

    ``x``: (B, C, H, W) on the host; the result is on the host too."""
    if not can_stream(net):
        raise TypeError(f'streamed_forward runs BaryIR only, not {type(net).__name__}; use blended_forward.')
    net._check_input(x)
    h, w = x.shape[-2:]
    r = runner
    inp = net._pad(x.to(r.host) if x.is_floating_point() else x.to(r.host, torch.float32))
    r.full_height = inp.shape[-2]
    norm = net.latent_norm

    enc1 = r.stage(net.encoder1, r.conv(net.embed, inp))
    enc2 = r.stage(net.encoder2, r.down(net.down1, enc1))
    enc3 = r.stage(net.encoder3, r.down(net.down2, enc2))
    z = r.local(norm, r.stage(net.latent, r.down(net.down3, enc3)), 0)

    z_bary = residual = None
    if net.uses_barycenter:
        z_bary = r.local(norm, _bary_map(r, net.bary_map, z), 0)
        residual = z - z_bary
    fused, res_feat = net.decoder_inputs(z, z_bary, residual)
    del z, z_bary, residual
    dec = r.up(net.up3, r.conv(net.fuse_proj, r.attention_block(net.fuse_block, fused)))
    del fused

    skip3, skip2, skip1 = enc3, enc2, enc1
    if net.uses_residual:
        rd = net.residual_decoder
        r3 = r.up(rd.up3, r.conv(rd.proj3, res_feat))
        r2 = r.up(rd.up2, r.conv(rd.proj2, r.stage(rd.blocks3, r.conv(rd.reduce3, r3))))
        r1 = r.up(rd.up1, r.conv(rd.proj1, r.stage(rd.blocks2, r.conv(rd.reduce2, r2))))
        skip3 = enc3.add_(r3, alpha=net.residual_scale)
        skip2 = enc2.add_(r2, alpha=net.residual_scale)
        skip1 = enc1.add_(r1, alpha=net.residual_scale)
        del r3, r2, r1, res_feat

    dec = r.stage(net.decoder3, r.conv(net.reduce3, torch.cat([dec, skip3], dim=1)))
    del skip3, enc3
    dec = r.up(net.up2, r.conv(net.decoder3_proj, r.attention_block(net.decoder3_tail, dec)))
    dec = r.stage(net.decoder2, r.conv(net.reduce2, torch.cat([dec, skip2], dim=1)))
    del skip2, enc2
    dec = r.up(net.up1, r.conv(net.decoder2_proj, r.attention_block(net.decoder2_tail, dec)))
    dec = r.stage(net.decoder1, torch.cat([dec, skip1], dim=1))
    del skip1, enc1
    out = r.conv(net.output, r.stage(net.refinement, dec))
    return (out.to(inp.dtype) + inp)[..., :h, :w]


# --------------------------------------------------------------------------------------------------
def _ramp(length: int, overlap: int, start: bool, end: bool) -> torch.Tensor:
    """1 inside, rising linearly across ``overlap`` pixels at a side shared with a neighbouring tile."""
    weight = torch.ones(length)
    n = min(overlap, length)
    if n > 0:
        rise = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
        if start:
            weight[:n] = torch.minimum(weight[:n], rise)
        if end:
            weight[-n:] = torch.minimum(weight[-n:], rise.flip(0))
    return weight


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


@torch.no_grad()
def blended_forward(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                    progress: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """``run`` on overlapping ``tile x tile`` crops of ``x`` (host), averaged with feathered weights.

    ``run`` maps a (B, C, h, w) host crop to its restored host crop of the same size."""
    if overlap >= tile:
        raise ValueError(f'tile overlap {overlap} must be smaller than the tile {tile}.')
    b, _, height, width = x.shape
    out = weights = None
    ys, xs = _starts(height, tile, tile - overlap), _starts(width, tile, tile - overlap)
    for y0 in ys:
        for x0 in xs:
            crop = x[..., y0:y0 + tile, x0:x0 + tile]
            y = run(crop).float()
            h, w = crop.shape[-2:]
            wy = _ramp(h, overlap, y0 > 0, y0 + h < height)
            wx = _ramp(w, overlap, x0 > 0, x0 + w < width)
            weight = (wy[:, None] * wx[None, :]).to(y.device)
            if out is None:
                out = torch.zeros(b, y.shape[1], height, width, device=y.device)
                weights = torch.zeros(1, 1, height, width, device=y.device)
            out[..., y0:y0 + h, x0:x0 + w] += y * weight
            weights[..., y0:y0 + h, x0:x0 + w] += weight
            if progress is not None:
                progress()
    return out / weights
