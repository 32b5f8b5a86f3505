"""Read the authors' released BaryIR and DA-RCOT checkpoints safely and convert them to BasicSR state dicts.

The official release files are ``torch.save`` of whole pickled modules: BaryIR's
``{'epoch', 'BaryIR': <module>, 'Pots': <module>}`` from a module ``model_bary``, DA-RCOT's
``{'epoch', 'Tnet': <MRCNet>, 'Fnet': <F_net>}`` from a module ``model_res``. Unpickling those normally
imports and runs code named by the file; torch >= 2.6 refuses them by default. Here a restricted
unpickler maps every module class to an inert stand-in that only stores its ``__dict__``, allows
torch's tensor/storage rebuilding and a few containers, and refuses anything else by name (for
DA-RCOT files an explicit list of the release's classes). Nothing in the file is executed.

Output: BasicSR-style files ``{'params': state_dict, 'baryir_config': {...}}`` loadable with
``torch.load(weights_only=True)`` and by ``path.pretrain_network_g`` / ``pretrain_network_potential``.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
from typing import Any, Optional

import torch

from baryir_plugin.errors import CheckpointError

# Classes of the release's `model_bary` module and the torch.nn modules it pickles: all become stand-ins.
_STANDIN_MODULE_PREFIXES = ('model_bary', 'torch.nn.modules.')
# DA-RCOT's release (`model_res`): only these classes, as stand-ins too
DARCOT_RELEASE_CLASSES = frozenset(f'model_res.{name}' for name in (
    'MRCNet', 'F_net', 'TransformerBlock', 'Attention', 'FeedForward', 'LayerNorm', 'WithBias_LayerNorm',
    'BiasFree_LayerNorm', 'OverlapPatchEmbed', 'Downsample', 'Upsample'))
DARCOT_TORCH_CLASSES = frozenset(f'torch.nn.modules.{name}' for name in (
    'conv.Conv2d', 'container.Sequential', 'linear.Linear', 'activation.LeakyReLU', 'pixelshuffle.PixelShuffle',
    'pixelshuffle.PixelUnshuffle'))
_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'),
    ('torch._utils', '_rebuild_parameter'),
    ('torch._utils', '_rebuild_parameter_with_state'),
    ('torch', 'Size'),
    ('collections', 'OrderedDict'),
    ('builtins', 'set'),
    ('__builtin__', 'set'),
    ('builtins', 'frozenset'),
    ('__builtin__', 'frozenset'),
}
_STORAGE_NAME = re.compile(r'^(Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|Bool)Storage$')


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint's pickle asks for a global outside the allow-list."""


class StandInModule:
    """Inert replacement for a pickled nn.Module: keeps the pickled state, runs nothing."""

    _qualname = '?'

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f'{self._qualname}: unexpected pickled state of type {type(state).__name__}.')
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f'<stand-in {self._qualname}>'


class _RestrictedUnpickler(pickle.Unpickler):
    _standins: dict[str, type] = {}
    # the stand-in classes of the current load (set per load by :func:`load_official`)
    seen: Optional[set] = None

    def find_class(self, module: str, name: str):
        qualname = f'{module}.{name}'
        if module == 'torch' and _STORAGE_NAME.match(name):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if qualname in DARCOT_RELEASE_CLASSES or (
                module.startswith(_STANDIN_MODULE_PREFIXES) and name.isidentifier() and name[0].isupper()):
            if self.seen is not None:
                self.seen.add(qualname)
            cls = self._standins.get(qualname)
            if cls is None:
                cls = type(name, (StandInModule,), {'_qualname': qualname})
                self._standins[qualname] = cls
            return cls
        raise UnsafeCheckpointError(
            f'refusing to load: the checkpoint asks for {qualname!r}, which is not a module class of the '
            'official release nor a tensor type. Official BaryIR checkpoints never need it; the file may '
            'have been tampered with.')


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler class and ``load``."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @classmethod
    def load(cls, file, **kwargs):
        return cls.Unpickler(file, **kwargs).load()


def _pickle_module(seen: set) -> type:
    """A restricted pickle module that records the stand-in classes it creates in ``seen``."""
    unpickler = type('_RecordingUnpickler', (_RestrictedUnpickler,), {'seen': seen})
    return type('_RecordingPickleModule', (_RestrictedPickleModule,), {'Unpickler': unpickler})


def load_official(path: str) -> dict:
    """Load an official release file with the restricted unpickler (tensors on the CPU)."""
    if os.path.isdir(path):
        raise CheckpointError(f'official checkpoint {path!r} is a folder; give the release .pth/.pt file inside it.')
    if not os.path.isfile(path):
        raise CheckpointError(f'official checkpoint not found: {path!r} (relative to {os.getcwd()}).')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'official checkpoint {path} is empty (0 bytes; an interrupted download?).')
    seen: set = set()
    try:
        ckpt = torch.load(path, map_location='cpu', pickle_module=_pickle_module(seen), weights_only=False)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f'{path}: {e}') from None
    except Exception as e:  # noqa: BLE001 (every way a file can fail to unpickle: truncated, not torch, ...)
        from baryir_plugin.checkpoints import why_unreadable
        raise CheckpointError(f'official checkpoint {path} cannot be read: {why_unreadable(e)}.') from e
    if not isinstance(ckpt, dict) or not ('BaryIR' in ckpt or 'Tnet' in ckpt):
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an official BaryIR release file (expected a dict with 'BaryIR' and 'Pots', "
                              f"or DA-RCOT's 'Tnet' and 'Fnet', got {keys}). BasicSR .pth files load directly with "
                              'path.pretrain_network_g.')
    if 'Tnet' in ckpt:
        outside = sorted(seen - DARCOT_RELEASE_CLASSES - DARCOT_TORCH_CLASSES)
        if outside:
            raise UnsafeCheckpointError(f'{path}: refusing to load: the DA-RCOT checkpoint asks for {outside[0]!r}, '
                                        'which is not a class of the official release (model_res and the torch.nn '
                                        'layers it uses); the file may have been tampered with.')
    return ckpt


def module_state_dict(module: StandInModule, prefix: str = '') -> 'collections.OrderedDict[str, torch.Tensor]':
    """Parameters and persistent buffers of a stand-in module tree, as cloned contiguous tensors.

    Clones because release files may store parameters as views of shared storages.
    """
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    state = module.__dict__
    non_persistent = state.get('_non_persistent_buffers_set', set())
    for group in ('_parameters', '_buffers'):
        for name, tensor in state.get(group, {}).items():
            if tensor is not None and not (group == '_buffers' and name in non_persistent):
                out[prefix + name] = tensor.detach().clone().contiguous()
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            out.update(module_state_dict(child, f'{prefix}{name}.'))
    return out


# --------------------------------------------------------------------------------------------------
# Key map: official BaryNet names (PromptIR leftovers) -> ours. Longest prefixes first.
_PREFIX_MAP = [
    ('patch_embed.proj.', 'embed.'),
    ('encoder_level1.', 'encoder1.'), ('down1_2.body.0.', 'down1.conv.'),
    ('encoder_level2.', 'encoder2.'), ('down2_3.body.0.', 'down2.conv.'),
    ('encoder_level3.', 'encoder3.'), ('down3_4.body.0.', 'down3.conv.'),
    ('latent.', 'latent.'), ('LN.', 'latent_norm.'), ('barylatent.', 'bary_map.blocks.'),
    ('noise_level3.', 'fuse_block.'), ('reduce_noise_level3.', 'fuse_proj.'), ('up4_3.body.0.', 'up3.conv.'),
    ('resreduce_noise_level3.', 'residual_decoder.proj3.'), ('resup4_3.body.0.', 'residual_decoder.up3.conv.'),
    ('resreduce_chan_level3.', 'residual_decoder.reduce3.'), ('resdecoder_level3.', 'residual_decoder.blocks3.'),
    ('resreduce_noise_level2.', 'residual_decoder.proj2.'), ('resup3_2.body.0.', 'residual_decoder.up2.conv.'),
    ('resreduce_chan_level2.', 'residual_decoder.reduce2.'), ('resdecoder_level2.', 'residual_decoder.blocks2.'),
    ('resreduce_noise_level1.', 'residual_decoder.proj1.'), ('resup2_1.body.0.', 'residual_decoder.up1.conv.'),
    ('reduce_chan_level3.', 'reduce3.'), ('decoder_level3.', 'decoder3.'),
    ('noise_level2.', 'decoder3_tail.'), ('reduce_noise_level2.', 'decoder3_proj.'), ('up3_2.body.0.', 'up2.conv.'),
    ('reduce_chan_level2.', 'reduce2.'), ('decoder_level2.', 'decoder2.'),
    ('noise_level1.', 'decoder2_tail.'), ('reduce_noise_level1.', 'decoder2_proj.'), ('up2_1.body.0.', 'up1.conv.'),
    ('decoder_level1.', 'decoder1.'), ('refinement.', 'refinement.'), ('output.', 'output.'),
]
# Modules the reference creates but never calls in BaryNet.forward (0.215 M parameters at dim 48).
UNUSED_OFFICIAL_MODULES = ('chnl_reduce1', 'chnl_reduce2', 'chnl_reduce3',
                           'reduce_noise_channel_1', 'reduce_noise_channel_2', 'reduce_noise_channel_3')


def map_official_key(key: str) -> str | None:
    """Our name for an official BaryNet parameter; None for the unused modules."""
    if key.split('.', 1)[0] in UNUSED_OFFICIAL_MODULES:
        return None
    for old, new in _PREFIX_MAP:
        if key.startswith(old):
            # LayerNorm wrappers: `normX.body.weight` -> `normX.weight`, `LN.body.*` -> `latent_norm.*`
            rest = re.sub(r'(^|\.)body\.(weight|bias)$', r'\1\2', key[len(old):])
            return new + rest
    raise KeyError(f'unknown parameter {key!r} in the official BaryNet; this converter knows the release of '
                   'xl-tang3/BaryIR (model_bary.BaryNet with decoder=True).')


def convert_baryir_state(official: dict[str, torch.Tensor]) -> 'collections.OrderedDict[str, torch.Tensor]':
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for key, tensor in official.items():
        new = map_official_key(key)
        if new is not None:
            out[new] = tensor
    return out


def infer_baryir_config(state: dict[str, torch.Tensor]) -> dict:
    """The BaryIR options that reproduce a converted state dict's shapes."""

    def depth(prefix: str) -> int:
        idx = {int(k[len(prefix):].split('.', 1)[0]) for k in state if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    dim = state['embed.weight'].shape[0]
    heads = [state[f'{stage}.0.attn.temperature'].shape[0] for stage in ('encoder1', 'encoder2', 'encoder3', 'latent')]
    hidden = state['encoder1.0.ffn.project_out.weight'].shape[1]
    return {
        'type': 'BaryIR',
        'in_channels': state['embed.weight'].shape[1],
        'out_channels': state['output.weight'].shape[0],
        'dim': dim,
        'num_blocks': [depth('encoder1.'), depth('encoder2.'), depth('encoder3.'), depth('latent.')],
        'num_refinement_blocks': depth('refinement.'),
        'heads': heads,
        # int(dim * f) == hidden; the reference's 2.66 is the usual value
        'ffn_expansion_factor': 2.66 if int(dim * 2.66) == hidden else round(hidden / dim, 4),
        'LayerNorm_type': 'WithBias' if 'latent_norm.bias' in state else 'BiasFree',
        'bary_map_type': 'transformer',
        'num_bary_blocks': depth('bary_map.blocks.'),
    }


def convert_potentials_state(official: dict[str, torch.Tensor]) -> 'collections.OrderedDict[str, torch.Tensor]':
    """``potentials.{k}.{0,3,4,6}.*`` (one nn.Sequential per source) -> our stacked tensors."""
    k_count = len({k.split('.')[1] for k in official if k.startswith('potentials.')})
    if k_count == 0:
        raise KeyError('official potentials: no `potentials.<k>.*` parameters found.')

    def stack(suffix: str) -> torch.Tensor:
        return torch.stack([official[f'potentials.{k}.{suffix}'] for k in range(k_count)])

    return collections.OrderedDict([
        ('conv_weight', stack('0.weight')),
        ('fc1_weight', stack('3.weight')), ('fc1_bias', stack('3.bias')),
        ('fc2_weight', stack('4.weight')), ('fc2_bias', stack('4.bias')),
        ('fc3_weight', stack('6.weight').squeeze(1)), ('fc3_bias', stack('6.bias').squeeze(1)),
        ('lambdas', torch.full((k_count,), 1.0 / k_count)),
    ])


def infer_potentials_config(state: dict[str, torch.Tensor]) -> dict:
    k, channels, per_group = state['conv_weight'].shape[:3]
    num_features = state['fc1_weight'].shape[2]
    side = int(round((num_features / channels) ** 0.5))
    if channels * side * side != num_features:
        raise ValueError(f'official potentials: flattened width {num_features} is not channels x side^2.')
    return {'type': 'BarycenterPotentials', 'num_potentials': k, 'in_channels': channels,
            'patch_size': 32 * side,  # the crop whose 1/8 latent gives a side x side conv output
            'groups': channels // per_group, 'congruence': 'penalty'}


# --------------------------------------------------------------------------------------------------
# DA-RCOT (model_res.MRCNet -> DARCOT, model_res.F_net -> DARCOTPotential). Longest prefixes first.
_DARCOT_PREFIX_MAP = [
    ('patch_embed.proj.', 'embed.'),
    ('encoder_level1.', 'encoder1.'), ('down1_2.body.0.', 'down1.conv.'),
    ('encoder_level2.', 'encoder2.'), ('down2_3.body.0.', 'down2.conv.'),
    ('encoder_level3.', 'encoder3.'), ('down3_4.body.0.', 'down3.conv.'), ('latent.', 'latent.'),
    ('noise_level3.', 'fuse_block.'), ('reduce_noise_level3.', 'fuse_proj.'), ('up4_3.body.0.', 'up3.conv.'),
    ('reduce_chan_level3.', 'reduce3.'), ('decoder_level3.', 'decoder3.'),
    ('noise_level2.', 'decoder3_tail.'), ('reduce_noise_level2.', 'decoder3_proj.'), ('up3_2.body.0.', 'up2.conv.'),
    ('reduce_chan_level2.', 'reduce2.'), ('decoder_level2.', 'decoder2.'),
    ('noise_level1.', 'decoder2_tail.'), ('reduce_noise_level1.', 'decoder2_proj.'), ('up2_1.body.0.', 'up1.conv.'),
    ('decoder_level1.', 'decoder1.'), ('refinement.', 'refinement.'), ('output.', 'output.'),
    # the residual embedding generation module (REGM)
    ('resencoder_level1.', 'regm.encoder1.'), ('resdown1_2.body.0.', 'regm.down1.conv.'),
    ('resencoder_level2.', 'regm.encoder2.'), ('resdown2_3.body.0.', 'regm.down2.conv.'),
    ('resencoder_level3.', 'regm.encoder3.'), ('reslatent.', 'regm.latent.'),
    ('resnoise_level3.', 'regm.fuse_block.'), ('resreduce_noise_level3.', 'regm.fuse_proj.'),
    ('resup4_3.body.0.', 'regm.up3.conv.'), ('resreduce_chan_level3.', 'regm.reduce3.'),
    ('resdecoder_level3.', 'regm.decoder3.'),
]
# Modules MRCNet creates but never calls in its forward (2,409,068 parameters at dim 48): the REGM uses
# the generator's patch_embed, down3_4, up3_2, reduce_chan_level2 and decoder_level2 instead of its copies.
DARCOT_UNUSED_MODULES = ('res_patch_embed', 'chnl_reduce1', 'chnl_reduce2', 'chnl_reduce3', 'reduce_noise_channel_1',
                         'reduce_noise_channel_2', 'reduce_noise_channel_3', 'resdown3_4', 'resup3_2',
                         'resreduce_chan_level2', 'resdecoder_level2', 'resup2_1', 'resdecoder_level1')
_DARCOT_POTENTIAL_KEY = re.compile(r'^(features\.\d+\.(weight|bias)|fc[12]?\.(weight|bias))$')


def map_darcot_key(key: str) -> str | None:
    """Our DARCOT name for an official MRCNet parameter; None for the unused modules."""
    if key.split('.', 1)[0] in DARCOT_UNUSED_MODULES:
        return None
    for old, new in _DARCOT_PREFIX_MAP:
        if key.startswith(old):
            return new + re.sub(r'(^|\.)body\.(weight|bias)$', r'\1\2', key[len(old):])
    raise KeyError(f'unknown parameter {key!r} in the official MRCNet; this converter knows the release of '
                   'xl-tang3/DA-RCOT (model_res.MRCNet with decoder=True).')


def convert_darcot_state(official: dict[str, torch.Tensor]) -> 'collections.OrderedDict[str, torch.Tensor]':
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for key, tensor in official.items():
        new = map_darcot_key(key)
        if new is not None:
            out[new] = tensor
    return out


def _depth(state: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split('.', 1)[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_darcot_config(state: dict[str, torch.Tensor]) -> dict:
    """The DARCOT options that reproduce a converted state dict's shapes."""
    dim = state['embed.weight'].shape[0]
    hidden = state['encoder1.0.ffn.project_out.weight'].shape[1]
    return {
        'type': 'DARCOT',
        'in_channels': state['embed.weight'].shape[1],
        'out_channels': state['output.weight'].shape[0],
        'dim': dim,
        'num_blocks': [_depth(state, f'{s}.') for s in ('encoder1', 'encoder2', 'encoder3', 'latent')],
        'num_refinement_blocks': _depth(state, 'refinement.'),
        'heads': [state[f'{s}.0.attn.temperature'].shape[0] for s in ('encoder1', 'encoder2', 'encoder3', 'latent')],
        'ffn_expansion_factor': 2.66 if int(dim * 2.66) == hidden else round(hidden / dim, 4),
        'LayerNorm_type': 'WithBias' if 'encoder1.0.norm1.bias' in state else 'BiasFree',
        'residual_scale': 0.8,  # a constant of the reference's forward
        'condition': 'multiscale',
    }


def infer_darcot_potential_config(state: dict[str, torch.Tensor]) -> dict:
    base = state['features.0.weight'].shape[0]
    num_features = state['fc.weight'].shape[1]
    side = int(round((num_features / (8 * base)) ** 0.5))
    if 8 * base * side * side != num_features:
        raise ValueError(f'official F_net: flattened width {num_features} is not 8 x {base} x side^2.')
    return {'type': 'DARCOTPotential', 'in_channels': state['features.0.weight'].shape[1], 'patch_size': 32 * side,
            'base_channels': base}


def convert_darcot(path: str, ckpt: dict) -> tuple[dict, dict | None]:
    """DA-RCOT's release dict (``Tnet``, ``Fnet``) -> ``(net_g, net_potential)`` in our format."""
    tnet = ckpt['Tnet']
    cls = getattr(tnet, '_qualname', type(tnet).__name__)
    if cls != 'model_res.MRCNet':
        raise CheckpointError(f'{path}: Tnet is {cls}, but only model_res.MRCNet (the released DA-RCOT network) '
                              'converts; the authors\' RCNet and PromptIR backbones have no port here.')
    if getattr(tnet, 'decoder', True) is not True:
        raise CheckpointError(f'{path}: Tnet was built with decoder=False, which the reference itself cannot run; '
                              'only decoder=True networks convert.')
    net_state = convert_darcot_state(module_state_dict(tnet))
    net_g = {'params': net_state, 'baryir_config': infer_darcot_config(net_state)}
    net_potential = None
    if ckpt.get('Fnet') is not None:
        pot_state = module_state_dict(ckpt['Fnet'])
        unknown = [k for k in pot_state if not _DARCOT_POTENTIAL_KEY.match(k)]
        if unknown:
            raise KeyError(f'unknown parameter {unknown[0]!r} in the official F_net')
        net_potential = {'params': pot_state, 'baryir_config': infer_darcot_potential_config(pot_state)}
    return net_g, net_potential


def convert_official(path: str) -> tuple[dict, dict | None]:
    """Return ``(net_g, net_potential)`` BasicSR dicts ``{'params', 'baryir_config'}`` (potential may be None),
    for a BaryIR or a DA-RCOT release file."""
    ckpt = load_official(path)
    if 'Tnet' in ckpt:
        try:
            return convert_darcot(path, ckpt)
        except (KeyError, ValueError, AttributeError, IndexError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            detail = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise CheckpointError(f'{path}: not the DA-RCOT release this converter knows ({detail}).') from e
    try:
        net_state = convert_baryir_state(module_state_dict(ckpt['BaryIR']))
        net_g = {'params': net_state, 'baryir_config': infer_baryir_config(net_state)}
        net_potential = None
        if ckpt.get('Pots') is not None:
            pot_state = convert_potentials_state(module_state_dict(ckpt['Pots']))
            net_potential = {'params': pot_state, 'baryir_config': infer_potentials_config(pot_state)}
    except (KeyError, ValueError, AttributeError, IndexError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        detail = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f'{path}: not the BaryIR release this converter knows ({detail}).') from e
    return net_g, net_potential


def potentials_output_path(out_path: str) -> str:
    root, ext = os.path.splitext(out_path)
    return f'{root}_potential{ext or ".pth"}'
