"""Read the authors' released BaryIR checkpoints safely and convert them to BasicSR state dicts.

The official release files are ``torch.save({'epoch', 'BaryIR': <module>, 'Pots': <module>})`` of whole
pickled modules from a module ``model_bary``. Unpickling those normally imports and runs code named by
the file; torch >= 2.6 refuses them by default. Here a restricted unpickler maps every module class to
an inert stand-in that only stores its ``__dict__``, allows torch's tensor/storage rebuilding and a few
containers, and refuses anything else by name. Nothing in the file is executed.

Output: BasicSR-style files ``{'params': state_dict, 'baryir_config': {...}}`` loadable with
``torch.load(weights_only=True)`` and by ``path.pretrain_network_g`` / ``pretrain_network_potential``.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
from typing import Any

import torch

from baryir_plugin.errors import CheckpointError

# Classes of the release's `model_bary` module and the torch.nn modules it pickles: all become stand-ins.
_STANDIN_MODULE_PREFIXES = ('model_bary', 'torch.nn.modules.')
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

    def find_class(self, module: str, name: str):
        qualname = f'{module}.{name}'
        if module == 'torch' and _STORAGE_NAME.match(name):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_STANDIN_MODULE_PREFIXES) and name.isidentifier() and name[0].isupper():
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

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def load_official(path: str) -> dict:
    """Load an official release file with the restricted unpickler (tensors on the CPU)."""
    if os.path.isdir(path):
        raise CheckpointError(f'official checkpoint {path!r} is a folder; give the release .pth/.pt file inside it.')
    if not os.path.isfile(path):
        raise CheckpointError(f'official checkpoint not found: {path!r} (relative to {os.getcwd()}).')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'official checkpoint {path} is empty (0 bytes; an interrupted download?).')
    try:
        ckpt = torch.load(path, map_location='cpu', pickle_module=_RestrictedPickleModule, weights_only=False)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f'{path}: {e}') from None
    except Exception as e:  # noqa: BLE001 (every way a file can fail to unpickle: truncated, not torch, ...)
        from baryir_plugin.checkpoints import why_unreadable
        raise CheckpointError(f'official checkpoint {path} cannot be read: {why_unreadable(e)}.') from e
    if not isinstance(ckpt, dict) or 'BaryIR' not in ckpt:
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an official BaryIR release file (expected a dict with 'BaryIR' and 'Pots', "
                         f'got {keys}). BasicSR .pth files load directly with path.pretrain_network_g.')
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


def convert_official(path: str) -> tuple[dict, dict | None]:
    """Return ``(net_g, net_potential)`` BasicSR dicts ``{'params', 'baryir_config'}`` (potential may be None)."""
    ckpt = load_official(path)
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
