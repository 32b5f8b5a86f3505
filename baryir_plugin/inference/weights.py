"""One way in for every weights file a user may hold: build the restoration network from it, ready to run.

Accepted, told apart by their content (never by their name):

- a BasicSR ``.pth`` written by this package (training, ``convert-official``): ``{'params': ...,
  ['params_ema': ...,] 'baryir_config': {'type': ..., ...}}`` -- the network options are read from the
  file, no option file is needed; ``params_ema`` is preferred when present (BasicSR's convention);
- a BasicSR ``.pth`` without options (older runs, other tools) or a bare state dict: the options come from
  ``--opt FILE.yml`` (its ``network_g``), or else are inferred from the weights' shapes (BaryIR only,
  said in the log);
- a ``.safetensors`` file from ``baryir export-safetensors`` (the options in its metadata);
- the authors' release file (whole pickled modules): converted in memory by the restricted unpickler of
  :mod:`baryir_plugin.official`, which executes nothing from the file.

Everything else -- a training state, a potentials file, a truncated or foreign file, a pickle that asks
for code -- is one :class:`~baryir_plugin.errors.CheckpointError` naming the file and the fix.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..checkpoints import (NETWORK_OPTIONS_KEY, check_network_file, nonfinite_tensors, read_checkpoint,
                           state_dict_mismatch)
from ..errors import CheckpointError, OptionError

__all__ = ['LoadedNetwork', 'WeightsFile', 'build_network', 'load_network', 'read_weights']

# parameters only BarycenterPotentials has: a potentials file without stored options is told apart by them
_POTENTIALS_KEYS = {'conv_weight', 'fc1_weight', 'fc3_weight'}
# the parameter entries BasicSR writes, in the order they are preferred for inference
PARAM_KEYS = ('params_ema', 'params')


@dataclass
class WeightsFile:
    """What a weights file holds: the state dict to load, and the network options when the file has them."""
    path: str
    state: dict
    param_key: Optional[str]
    options: Optional[dict]
    kind: str  # 'basicsr' | 'state dict' | 'safetensors' | 'official release'
    extra: dict = field(default_factory=dict)  # e.g. the release file's potentials


@dataclass
class LoadedNetwork:
    net: nn.Module
    options: dict
    weights: WeightsFile
    options_from: str  # 'the weights file' | '--opt FILE' | 'the weights' shapes'

    def describe(self) -> str:
        params = sum(p.numel() for p in self.net.parameters())
        key = f" ['{self.weights.param_key}']" if self.weights.param_key else ''
        return (f'{self.options["type"]} ({params:,} parameters) from {self.weights.path}{key} '
                f'({self.weights.kind}; options from {self.options_from})')


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items())


def read_weights(path: str, what: str = '--weights') -> WeightsFile:
    """Read a weights file of any accepted kind (see the module docstring) into a :class:`WeightsFile`."""
    from .export import looks_like_safetensors, read_safetensors

    if os.path.isfile(path) and looks_like_safetensors(path):
        try:
            state, options = read_safetensors(path, what)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 (the safetensors library's own errors on a broken header)
            raise CheckpointError(f'{what} {path} is not a readable safetensors file ({" ".join(str(e).split())[:120]}'
                                  '); give a file written by `baryir export-safetensors`, or a .pth.') from None
        return WeightsFile(path, state, None, options, 'safetensors')
    try:
        obj = read_checkpoint(path, what)
    except CheckpointError as e:
        if 'pickled objects' not in str(e):
            raise
        from ..official import convert_official  # the release format: whole pickled modules

        net_g, net_potential = convert_official(path)
        return WeightsFile(path, net_g['params'], None, net_g[NETWORK_OPTIONS_KEY], 'official release',
                           {'potentials': net_potential})
    if _is_state_dict(obj):
        return WeightsFile(path, obj, None, None, 'state dict')
    check_network_file(obj, what, path, 'give the models/net_g_<iter>.pth saved with it')
    key = next((k for k in PARAM_KEYS if _is_state_dict(obj.get(k))), None)
    if key is None:
        found = [k for k in obj if isinstance(k, str)][:6]
        raise CheckpointError(f"{what} {path} has no 'params' or 'params_ema' weights (it has {found}); give a "
                              'BasicSR network file.')
    options = obj.get(NETWORK_OPTIONS_KEY)
    if options is not None and not (isinstance(options, dict) and isinstance(options.get('type'), str)):
        raise CheckpointError(f"{what} {path}: its '{NETWORK_OPTIONS_KEY}' entry is not network options "
                              "(a dict with 'type'); re-save the file, or give the options with --opt.")
    state = {k[7:] if k.startswith('module.') else k: v for k, v in obj[key].items()}
    return WeightsFile(path, state, key, copy.deepcopy(options), 'basicsr')


def options_from_file(opt_path: str, key: str = 'network_g') -> dict:
    """The ``network_g`` entry of a BasicSR option file."""
    import yaml

    if not os.path.isfile(opt_path):
        raise OptionError(f'--opt {opt_path}: no such file (relative to {os.getcwd()}).')
    try:
        with open(opt_path, encoding='utf-8') as f:
            options = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OptionError(f'--opt {opt_path} is not a YAML option file ({" ".join(str(e).split())[:160]}).') from None
    net = options.get(key) if isinstance(options, dict) else None
    if not isinstance(net, dict) or not isinstance(net.get('type'), str):
        raise OptionError(f'--opt {opt_path} has no {key} entry with a type (e.g. {key}: {{type: BaryIR, dim: 48}}).')
    return net


def build_network(options: dict, where: str) -> nn.Module:
    """The registered architecture ``options['type']`` built with the other options; errors name ``where``."""
    import baryir_plugin  # noqa: F401  (registers the architectures)
    from basicsr.utils.registry import ARCH_REGISTRY

    from ..errors import did_you_mean

    kwargs = {k: v for k, v in options.items() if k != 'type'}
    name = options['type']
    try:
        cls = ARCH_REGISTRY.get(name)
    except KeyError:
        raise OptionError(f'{where}: unknown network type {name!r}{did_you_mean(name, list(ARCH_REGISTRY.keys()))}.') \
            from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise OptionError(f'{where}: {name} cannot be built from {kwargs} ({e}).') from None


def _infer_options(weights: WeightsFile) -> Optional[dict]:
    from ..official import infer_baryir_config

    try:
        return infer_baryir_config(weights.state)
    except (KeyError, IndexError, AttributeError):
        return None


def load_network(path: str, opt: Optional[str] = None, device: str | torch.device = 'cpu',
                 log: Callable[[str], None] = print, what: str = '--weights') -> LoadedNetwork:
    """The network of a weights file, its weights loaded (strict), in eval mode on ``device``.

    ``opt``: an option file whose ``network_g`` gives the options (it wins over those stored in the file).
    """
    weights = read_weights(path, what)
    if opt is not None:
        options, source = options_from_file(opt), f'--opt {opt}'
        if weights.options is not None and weights.options != options:
            log(f'{what} {path} stores other network options than --opt {opt}; using those of --opt.')
    elif weights.options is not None:
        options, source = weights.options, 'the weights file'
    elif _POTENTIALS_KEYS <= set(weights.state):
        options, source = {'type': 'BarycenterPotentials'}, "the weights' names"
    else:
        options, source = _infer_options(weights), "the weights' shapes"
        if options is None:
            raise CheckpointError(f'{what} {path} stores no network options and they cannot be inferred from its '
                                  'weights; give the option file it was trained with: --opt FILE.yml.')
        log(f'{what} {path} stores no network options; built {options["type"]} from the shapes of its weights '
            '(give --opt FILE.yml if it was trained with other options, e.g. residual_scale).')
    if options.get('type') in ('BarycenterPotentials',):
        raise CheckpointError(f'{what} {path} holds the barycenter potentials (used only in training), not the '
                              'restoration network; give the net_g file.')
    net = build_network(options, f'{what} {path}' if source == 'the weights file' else source)
    bad = nonfinite_tensors(weights.state.values())
    if bad:
        raise CheckpointError(f'{what} {path}: {bad} weight tensor(s) hold NaN/inf (saved from a diverged run?); '
                              'give an earlier checkpoint.')
    try:
        net.load_state_dict(weights.state, strict=True)
    except RuntimeError:
        detail, _ = state_dict_mismatch(net.state_dict(), weights.state)
        raise CheckpointError(f'{what} {path} does not fit {options["type"]} built from {source} ({detail}); give '
                              'the option file it was trained with: --opt FILE.yml.') from None
    net.eval().requires_grad_(False)
    return LoadedNetwork(net.to(device), options, weights, source)
