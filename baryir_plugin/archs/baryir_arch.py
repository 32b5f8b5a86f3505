"""BaryIR: all-in-one restoration in a continuous Wasserstein-barycenter latent space.

The network (BaryIR NeurIPS, Fig. 2; BaryIR journal, Sec. III) is a U-Net whose bottleneck latent z is
mapped by the barycenter map T to a degradation-agnostic barycenter latent zB = LN(T(z)); the residual
s = z - zB keeps what is specific to the degradation. The decoder restores from zB and s, and a second,
light decoder turns s into per-level residual features added to the skips.

The journal presents this as a plug-in framework for restoration U-Nets: :class:`BaryIR` owns the
barycenter parts (shared LayerNorm, T, latent fusion, residual decoder) and takes the encoder and decoder
from a backbone (``baryir_plugin.archs.backbones``): the released Restormer one by default, PromptIR's
(reconstructed), NAFNet, or any registered :class:`~baryir_plugin.archs.backbones.UNetBackbone`.

Reads top-down: encoder -> barycenter map -> latent fusion -> residual decoder -> main decoder.
Widths in comments are those of the default (Restormer) backbone, for an H x W input padded to a
multiple of 8.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from baryir_plugin.errors import did_you_mean

from .backbones import RestormerBackbone, UNetBackbone, build_backbone
from .backbones.restormer import check_restormer_options
from .barycenter_map import BarycenterMap
from .restormer_blocks import LayerNorm2d, conv1x1

EMBEDDING_MODES = ('barycenter+residual', 'original', 'barycenter', 'original+residual')
ZERO_FEATURES = (None, 'barycenter', 'residual')
PAD_MULTIPLE = 8  # the default backbone's three 2x downsamplings; a network's own is ``net.pad_multiple``
# the framework's own top-level modules; a backbone's may not take these names
FRAMEWORK_MODULES = ('latent_norm', 'bary_map', 'fuse_block', 'fuse_proj', 'residual_decoder')
# the default backbone's options, which BaryIR passes on when no backbone is given
_RESTORMER_DEFAULTS = {'dim': 48, 'num_blocks': [4, 6, 6], 'num_refinement_blocks': 4}


class ResidualDecoder(nn.Module):
    """Decodes the residual embedding s into features for each skip of the backbone, deepest first.

    For the Restormer backbone: s (8d, H/8) -> r3 (4d, H/4) -> r2 (2d, H/2) -> r1 (d, H). Level l:
    ``up_l(proj_l(x))`` gives r_l at the skip's width; above level 1 the backbone's blocks refine it
    (``blocks_l(reduce_l(r_l))``) for the next level.
    """

    def __init__(self, backbone: UNetBackbone, in_channels: int) -> None:
        super().__init__()
        self.levels = len(backbone.skip_channels)
        width = in_channels
        for level in range(self.levels, 0, -1):
            out = backbone.skip_channels[level - 1]
            self.add_module(f'proj{level}', conv1x1(width, width))
            self.add_module(f'up{level}', backbone.upsample(width, out))
            if level > 1:
                self.add_module(f'reduce{level}', conv1x1(out, out))
                self.add_module(f'blocks{level}', backbone.residual_stage(level, out))
            width = out

    def forward(self, s: torch.Tensor) -> list[torch.Tensor]:
        """Residual features for the skips, shallowest first (the order of the backbone's skips)."""
        features = []
        x = s
        for level in range(self.levels, 0, -1):
            r = getattr(self, f'up{level}')(getattr(self, f'proj{level}')(x))
            features.append(r)
            if level > 1:
                x = getattr(self, f'blocks{level}')(getattr(self, f'reduce{level}')(r))
        return features[::-1]


@ARCH_REGISTRY.register()
class BaryIR(nn.Module):
    """BaryIR restoration network: the barycenter framework on a U-Net backbone.

    ``net(x)`` returns the restored image (same size as ``x``, any H x W); ``net(x, return_latents=True)``
    returns ``(image, z, z_bary, residual)`` for the barycenter losses (``z_bary``/``residual`` are
    ``None`` where the embedding mode does not compute them).

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image (the global residual needs it equal to in_channels).
        dim: base width d of the default backbone; level widths are d, 2d, 4d, 8d (latent), the fusion
            block 16d.
        num_blocks: Restormer blocks per encoder level 1..3 and in the latent (default backbone); entry 4
            also sets the depth of a transformer T when ``num_bary_blocks`` is None (any backbone).
        num_refinement_blocks: blocks after the last decoder level (default backbone).
        heads: attention heads per level 1..4; ``heads[3]`` is also T's.
        ffn_expansion_factor: GDFN hidden ratio (backbone and T).
        LayerNorm_type: ``'WithBias'`` or ``'BiasFree'`` (Restormer's option name), for the backbone, the
            shared latent LayerNorm and T.
        bary_map_type: barycenter map T: ``'transformer'`` (reference), ``'mlp'``, ``'conv'``, ``'vit'``.
        num_bary_blocks: depth of T; ``None`` = ``num_blocks[3]`` for ``transformer`` (the reference,
            8 blocks by default) and 2 for the other maps.
        residual_scale: weight of the residual features added to the skips (0.8 in the reference).
        embedding_mode: which embeddings feed the decoder: ``'barycenter+residual'`` (default),
            ``'original'`` (z only, no T: the plain backbone), ``'barycenter'`` (zB only)
            or ``'original+residual'`` (z and s).
        zero_features: test-time ablation: ``'barycenter'`` or ``'residual'`` features are replaced by
            zeros before they reach the decoder (BaryIR journal, Fig. 9); ``None`` for normal use.
            Settable after construction through :meth:`set_zero_features`.
        backbone: ``None`` (the released Restormer backbone, from the options above) or
            ``{type: <registered backbone>, ...its options}``: ``RestormerBackbone``, ``PromptIRBackbone``,
            ``NAFNetBackbone`` or your own (docs/plugin-framework.md). With a backbone, ``dim``,
            ``num_blocks[:3]`` and ``num_refinement_blocks`` are set inside it instead.
        bary_map: ``None`` (T from ``bary_map_type`` and ``num_bary_blocks``) or ``{type: <registered
            arch>, ...}`` for any T of your own (``dim`` is filled in with the latent width); the
            ``BarycenterMap`` arch takes ``map_type``, ``num_blocks``, ``num_heads``, ...
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
                 zero_features: Optional[str] = None,
                 backbone: Optional[dict] = None,
                 bary_map: Optional[dict] = None) -> None:
        super().__init__()
        initial_rng = torch.get_rng_state()
        num_blocks, heads = list(num_blocks), list(heads)
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f'BaryIR: num_blocks and heads need 4 entries (levels 1-3 and latent), '
                             f'got num_blocks={num_blocks}, heads={heads}.')
        if embedding_mode not in EMBEDDING_MODES:
            raise ValueError(f'BaryIR: embedding_mode must be one of {EMBEDDING_MODES}, got {embedding_mode!r}.')
        self.embedding_mode = embedding_mode
        self.uses_barycenter = embedding_mode != 'original'
        self.uses_residual = embedding_mode.endswith('+residual')
        self.residual_scale = residual_scale
        ffn, norm = ffn_expansion_factor, LayerNorm_type

        if backbone is None:
            check_restormer_options(dim, num_blocks, heads, in_channels, out_channels, 'BaryIR')
            net = RestormerBackbone(in_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads, ffn, norm)
        else:
            given = {'dim': dim, 'num_blocks': num_blocks[:3], 'num_refinement_blocks': num_refinement_blocks}
            moved = [k for k, v in given.items() if v != _RESTORMER_DEFAULTS[k]]
            if moved:
                raise ValueError(f'BaryIR: {", ".join(moved)} configure the default backbone; with backbone: '
                                 f'{{type: {backbone.get("type") if isinstance(backbone, dict) else backbone}}} '
                                 'set the backbone\'s own options inside it.')
            net = build_backbone(backbone)
            if net.in_channels != in_channels or in_channels != out_channels:
                raise ValueError(f'BaryIR: the backbone takes {net.in_channels}-channel images but in_channels is '
                                 f'{in_channels} and out_channels {out_channels}; make them equal.')
        self._adopt(net)
        self.in_channels = in_channels
        width = net.latent_channels

        self.latent_norm = LayerNorm2d(width, norm)  # shared by z and zB (BaryIR journal, Eq. 5)

        # Barycenter map T
        if self.uses_barycenter:
            self.bary_map = self._barycenter_map(bary_map, bary_map_type, num_bary_blocks, width, num_blocks[3],
                                                 heads[3], ffn, norm)

        # Latent fusion: (z or zB) [+ s] [+ the backbone's condition] -> the decoder's input width
        fused = width * (2 if self.uses_residual else 1) + net.condition_channels
        self.fuse_block = net.fusion_block(fused)
        self.fuse_proj = conv1x1(fused, net.decoder_channels)

        if self.uses_residual:
            self.residual_decoder = ResidualDecoder(net, width)

        order = net.init_order(FRAMEWORK_MODULES)
        if order:
            self._draw_initial_weights(initial_rng, order)
            # and list the modules in that order too (state-dict keys and reports as in the released layout)
            self._modules = {name: self._modules[name] for name in order if name in self._modules} | \
                {name: m for name, m in self._modules.items() if name not in order}

        self.zero_features: Optional[str] = None
        self.set_zero_features(zero_features)

    # -- construction -------------------------------------------------------------------------------
    def _adopt(self, backbone: UNetBackbone) -> None:
        """Register the backbone's modules on this network under their own names (flat state-dict keys),
        and keep the backbone for its encode/decode."""
        for name, child in backbone.named_children():
            if name in FRAMEWORK_MODULES or name in ('backbone',) or hasattr(type(self), name):
                raise ValueError(f'backbone {type(backbone).__name__}: its module name {name!r} is taken by the '
                                 f'barycenter framework ({", ".join(FRAMEWORK_MODULES)}); rename it.')
            self.add_module(name, child)
        self.__dict__['backbone'] = backbone  # not a child: its modules are registered above

    @staticmethod
    def _barycenter_map(options: Optional[dict], map_type: str, num_blocks: Optional[int], width: int,
                        latent_blocks: int, num_heads: int, ffn: float, norm: str) -> nn.Module:
        if options is None:
            if num_blocks is None:
                num_blocks = latent_blocks if map_type == 'transformer' else 2
            return BarycenterMap(width, map_type, num_blocks, num_heads, ffn, norm)
        if map_type != 'transformer' or num_blocks is not None:
            raise ValueError('BaryIR: give the barycenter map either as bary_map: {type: ...} or with '
                             'bary_map_type / num_bary_blocks, not both.')
        if not isinstance(options, dict):
            raise ValueError(f'BaryIR: bary_map must be a mapping such as {{type: BarycenterMap, map_type: mlp}}, '
                             f'got {options!r}.')
        options = dict(options)
        name = options.pop('type', 'BarycenterMap')
        if not isinstance(name, str) or name not in ARCH_REGISTRY:
            known = [k for k in ARCH_REGISTRY.keys()]
            raise ValueError(f'bary_map.type: no arch {name!r} is registered{did_you_mean(name, known)}.')
        if options.setdefault('dim', width) != width:
            raise ValueError(f'bary_map.dim is {options["dim"]} but the latent has {width} channels; leave it out.')
        return ARCH_REGISTRY.get(name)(**options)

    @torch.no_grad()
    def _draw_initial_weights(self, rng: torch.Tensor, order: Sequence[str]) -> None:
        """Draw the random initial weights again, module by module in ``order``, from the random state this
        network's construction started from: a seed gives the same network whatever order it was built in."""
        if any(p.device.type != 'cpu' for p in self.parameters()):
            return  # built under another device's generator (or on meta): nothing to reproduce
        torch.set_rng_state(rng)
        for name in order:
            if name in self._modules:
                for module in self._modules[name].modules():
                    reset = getattr(module, 'reset_parameters', None)
                    if callable(reset):
                        reset()

    def train(self, mode: bool = True) -> 'BaryIR':
        super().train(mode)
        self.backbone.training = mode
        return self

    # -- what the rest of the package reads -----------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Width of the barycenter latent (what the potentials score)."""
        return self.backbone.latent_channels

    @property
    def latent_stride(self) -> int:
        """The latent's downscale factor (8 for the default backbone)."""
        return self.backbone.latent_stride

    @property
    def pad_multiple(self) -> int:
        return self.backbone.latent_stride

    def module_groups(self) -> list[tuple[str, list[str]]]:
        """Top-level modules by group, in the order the forward runs them (encoder, T, fusion, residual
        decoder, decoder; the backbone's extra groups after)."""
        groups = [(name, list(modules)) for name, modules in self.backbone.module_groups()]
        encoder, rest = groups[0], groups[1:]
        fusion = ['fuse_block', 'fuse_proj']
        for name, modules in list(rest):
            if name == 'latent fusion':
                fusion += modules
                rest.remove((name, modules))
        return [(encoder[0], encoder[1] + ['latent_norm']), ('barycenter map T', ['bary_map']),
                ('latent fusion', fusion), ('residual decoder', ['residual_decoder'])] + rest

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

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        multiple = self.pad_multiple
        ph, pw = -h % multiple, -w % multiple
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
        backbone = self.backbone

        latent, skips = backbone.encode(inp)  # (B, 8d, H/8, W/8); d, 2d, 4d at H, H/2, H/4
        z = self.latent_norm(latent)

        z_bary = residual = None
        if self.uses_barycenter:
            z_bary = self.latent_norm(self.bary_map(z))
            residual = z - z_bary

        fused_in, res_feat = self.decoder_inputs(z, z_bary, residual)
        condition = backbone.latent_condition(z, z_bary, residual)
        if condition is not None:
            fused_in = torch.cat([fused_in, condition], dim=1)
        features = self.fuse_proj(self.fuse_block(fused_in))  # (B, 4d, H/8, W/8)

        if self.uses_residual:
            skips = [skip + self.residual_scale * r for skip, r in zip(skips, self.residual_decoder(res_feat))]
        out = backbone.decode(features, skips, inp)[..., :h, :w]

        if return_latents:
            return out, z, z_bary, residual
        return out

    def forward_with_latents(self, x: torch.Tensor):
        """``(image, z, z_bary, residual)``; same as ``forward(x, return_latents=True)``."""
        return self.forward(x, return_latents=True)
