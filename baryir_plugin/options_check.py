"""The option file, checked once, right after BasicSR parses it and before any work starts.

``basicsr train|test`` (BasicSR's ``parse_options``, wrapped by :func:`install`) first reads the file
itself and checks what BasicSR's parser indexes without looking (a mapping with ``name``, ``model_type``,
``num_gpu``, ``datasets`` and ``path``; ``--force_yml`` entries it can apply), then lets BasicSR parse it,
then runs :func:`check_options`:

- top-level keys: BasicSR's, ours (``use_amp`` ...) and ``network_*`` sections; a near miss of a known
  key is an error with the closest name, another unknown key an error for BaryIRModel and a logged
  warning for other models (their plugins may read more keys);
- ``model_type`` registered in BasicSR's MODEL_REGISTRY;
- every ``network_*``: ``type`` registered in ARCH_REGISTRY, keys and value types against the
  constructor's signature (annotations, else the defaults' types), required arguments given;
- ``train``: for BaryIRModel every key is one it reads (:class:`BaryIRTrainOptions`, BasicSR's keys),
  other models get warnings; losses (``*_opt``: LOSS_REGISTRY, the constructor's signature), optimizers
  (``optim_*``: a torch.optim class and its signature), the scheduler (a type BasicSR builds);
- ``val``: the keys (:class:`BaryIRValOptions` for BaryIRModel), ``val.metrics.*`` (METRIC_REGISTRY,
  the metric function's signature without img/img2, plus ``better``);
- ``logger``, ``path`` (``pretrain_network_*`` files exist), ``dist_params``;
- ``datasets``: each entry a mapping whose ``type`` is in DATASET_REGISTRY (deeper checks happen when
  the datasets are built).

Every error is one OptionError: ``<option file>: <dotted option> <what is wrong>; <the fix>``. The checks
read no image and build no network. :func:`install` also makes a network or loss constructor's
TypeError/ValueError at build time an OptionError naming its type.
"""
from __future__ import annotations

import argparse
import ast
import collections.abc
import copy
import functools
import inspect
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, Iterable, Optional, Sequence

from baryir_plugin.errors import BaryIRError, OptionError, SetupError, did_you_mean, one_line

_LOG = logging.getLogger('baryir_plugin.options')
_EMPTY = inspect.Parameter.empty

# top-level keys BasicSR reads for every model (and that its parser and pipelines set themselves)
BASICSR_TOP_KEYS = ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'path', 'train', 'val',
                    'logger', 'dist_params', 'find_unused_parameters')
PARSED_TOP_KEYS = ('dist', 'rank', 'world_size', 'auto_resume', 'is_train', 'root_path')
# top-level keys of BasicSR's RealESRGAN/RealESRNet models (the degradations they synthesise)
REALESRGAN_TOP_KEYS = tuple(f'{k}{s}' for k in ('resize_prob', 'resize_range', 'gaussian_noise_prob', 'noise_range',
                                                'poisson_scale_range', 'gray_noise_prob', 'jpeg_range')
                            for s in ('', '2')) + (
    'high_order_degradation', 'queue_size', 'gt_size', 'second_blur_prob', 'gt_usm', 'l1_gt_usm', 'percep_gt_usm',
    'gan_gt_usm')
# ours (baryir_plugin/models/training_speed.py)
PLUGIN_TOP_KEYS = ('use_amp', 'amp_bf16', 'use_channels_last', 'use_compile', 'compile_mode')
# keys BasicSR's parse_options or build_model index without a default
REQUIRED_TOP_KEYS = ('name', 'model_type', 'num_gpu', 'datasets', 'path')

# train/val keys of BasicSR's other models (GAN, video, StyleGAN2): warnings only name keys outside these
BASICSR_OTHER_TRAIN_KEYS = ('optim_d', 'gan_opt', 'ldl_opt', 'feature_matching_opt', 'net_d_iters',
                            'net_d_init_iters', 'dcn_lr_mul', 'flow_lr_mul', 'fix_flow', 'lr_flow', 'mixing_prob',
                            'net_d_reg_every', 'net_g_reg_every', 'path_reg_weight', 'r1_reg_weight')
BASICSR_OTHER_VAL_KEYS = ('center_frame_only', 'flip_seq', 'num_val_samples')
BASICSR_LOSS_KEYS = ('pixel_opt', 'perceptual_opt', 'gan_opt', 'ldl_opt', 'feature_matching_opt')
LOGGER_KEYS = ('print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb')
WANDB_KEYS = ('project', 'resume_id')
DIST_PARAMS_KEYS = ('backend', 'port')
PATH_KEYS = ('resume_state', 'ignore_resume_networks', 'experiments_root', 'models', 'training_states', 'log',
             'visualization', 'results_root')
PATH_NETWORK_PREFIXES = ('pretrain_network_', 'strict_load_', 'param_key_')
# networks BasicSR's own models load through path.*_<suffix> without a network_<suffix> section
BASICSR_PATH_SUFFIXES = ('g', 'd', 'g_ema', 'flow')
METRIC_EXTRA_KEYS = ('better',)


# --------------------------------------------------------------------------------------------------
# values and signatures
def _show(value: Any) -> str:
    from baryir_plugin.models.options import show
    return show(value)


def _yaml_hint(value: Any) -> str:
    from baryir_plugin.models.options import yaml_hint
    return yaml_hint(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if value is None:
        return 'nothing (~)'
    if isinstance(value, Mapping):
        return 'a mapping'
    if isinstance(value, (list, tuple)):
        return 'a list'
    if isinstance(value, bool):
        return 'true/false'
    if isinstance(value, (int, float)):
        return 'a number'
    return 'text' if isinstance(value, str) else type(value).__name__


_SEQUENCE_ORIGINS = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence,
                     collections.abc.Iterable, collections.abc.Collection)
_MAPPING_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def matches(value: Any, annotation: Any) -> bool:
    """Whether an option value (as YAML gives it) fits a parameter annotation; unknown annotations fit."""
    if annotation is Any or annotation is _EMPTY or isinstance(annotation, (str, typing.TypeVar)):
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation in _SEQUENCE_ORIGINS or origin in _SEQUENCE_ORIGINS:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if annotation in _MAPPING_ORIGINS or origin in _MAPPING_ORIGINS:
        return isinstance(value, Mapping)
    if isinstance(annotation, type) and origin is None:
        return isinstance(value, annotation)  # e.g. Tensor in `float | Tensor`: YAML gives none
    return True  # a typing construct we do not read (Callable, ...)


_PLURAL = {int: 'integers', float: 'numbers', str: 'strings', bool: 'true/false values'}


def _plural(element: Any) -> str:
    if _is_union(element):
        named = [a for a in typing.get_args(element) if a in _PLURAL]
        element = named[0] if len(named) == 1 else element
    return _PLURAL.get(element, 'values')


def describe(annotation: Any) -> str:
    """'an integer', 'a list of integers', 'a number or ~', ... for a message."""
    if annotation is None or annotation is type(None):
        return '~'
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        parts = [describe(a) for a in args if a in (None, type(None)) or describe(a) != 'a value']
        parts = [p for i, p in enumerate(parts) if p not in parts[:i]]
        none = '~' in parts
        parts = [p for p in parts if p != '~'] + (['~'] if none else [])
        return ' or '.join(parts) or 'a value'
    if origin is typing.Literal:
        return f'one of {args}'
    simple = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}
    if annotation in simple:
        return simple[annotation]
    if annotation in _SEQUENCE_ORIGINS or origin in _SEQUENCE_ORIGINS:
        if origin is tuple and args and args[-1] is not Ellipsis:
            item = _plural(args[0]) if len({describe(a) for a in args}) == 1 else 'values'
            return f'a list of {len(args)} {item}'
        return f'a list of {_plural(args[0])}' if args else 'a list'
    if annotation in _MAPPING_ORIGINS or origin in _MAPPING_ORIGINS:
        return 'a mapping'
    return 'a value'


def _default_type(default: Any) -> Any:
    """The type an unannotated parameter takes, from its default."""
    if default is _EMPTY or default is None:
        return Any
    for kind in (bool, int, float, str):  # bool before int: True is an int
        if isinstance(default, kind):
            return kind
    if isinstance(default, (list, tuple)):
        return list
    if isinstance(default, Mapping):
        return dict
    return Any


class Signature:
    """The keyword options a constructor or function takes, with the type each expects."""

    def __init__(self, obj: Any, skip: Sequence[str] = (), types_: Optional[Mapping[str, Any]] = None) -> None:
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):  # no signature to read (a builtin): accept what is given
            params = [inspect.Parameter('kwargs', inspect.Parameter.VAR_KEYWORD)]
        if inspect.isclass(obj) and params and params[0].name == 'self':
            params = params[1:]
        self.var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
        self.params = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                       and p.name not in skip}
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # noqa: BLE001 (an annotation that does not resolve: fall back to the defaults)
            hints = {}
        self.types = {name: hints.get(name, _default_type(p.default)) for name, p in self.params.items()}
        self.types.update(types_ or {})

    @property
    def required(self) -> list[str]:
        return [name for name, p in self.params.items() if p.default is _EMPTY]

    def check(self, section: str, given: Mapping, owner: str, extra: Iterable[str] = ('type',),
              any_keys: Optional[bool] = None) -> None:
        """Unknown keys (unless the callable takes ``**kwargs`` and ``any_keys`` is not False), missing
        required arguments and value types, each an OptionError naming ``section.key``."""
        extra = tuple(extra)
        any_keys = self.var_keyword if any_keys is None else any_keys
        known = list(self.params) + [e for e in extra if e != 'type']
        for key in given:
            if key in extra or key in self.params or any_keys:
                continue
            hint = did_you_mean(key, known)
            listing = '' if hint else f' (its options: {", ".join(known) or "none"})'
            raise OptionError(f'{section}.{key} is not an option of {owner}{hint}{listing}; fix its name or '
                              'remove it.')
        missing = [name for name in self.required if name not in given]
        if missing:
            raise OptionError(f'{section} misses {", ".join(missing)}, required by {owner}; add '
                              f'{" and ".join(f"{section}.{m}" for m in missing)}.')
        for key, value in given.items():
            expected = self.types.get(key, Any)
            if key in self.params and not matches(value, expected):
                raise OptionError(f'{section}.{key} must be {describe(expected)}, got {_show(value)}'
                                  f'{_yaml_hint(value)}.')


# --------------------------------------------------------------------------------------------------
# registries
def _registry(name: str):
    from basicsr.utils import registry
    return getattr(registry, f'{name.upper()}_REGISTRY')


def registered(registry, name: Any) -> Any:
    """The object registered under ``name`` (or BasicSR's ``<name>_basicsr``), else None; prints nothing."""
    if not isinstance(name, str):
        return None
    objects = dict(iter(registry))
    return objects.get(name, objects.get(f'{name}_basicsr'))


def _unregistered(section: str, value: Any, registry, what: str) -> OptionError:
    names = sorted(k for k, _ in registry)
    if not isinstance(value, str):
        return OptionError(f'{section} must be the name of a registered {what}, got {_show(value)}.')
    hint = did_you_mean(value, names)
    if hint:
        listing = ''
    else:
        shown = ', '.join(names[:24]) + (f', ... ({len(names)} in all)' if len(names) > 24 else '')
        listing = f'; registered: {shown} (a plugin registers more when it is imported)'
    return OptionError(f'{section}: no {what} named {value!r} is registered in BasicSR{hint}{listing}.')


def lookup(section: str, value: Any, kind: str, what: str) -> Any:
    registry = _registry(kind)
    found = registered(registry, value)
    if found is None:
        raise _unregistered(section, value, registry, what)
    return found


def _section(name: str, value: Any, example: str = '') -> Mapping:
    if not isinstance(value, Mapping):
        example = f' ({example})' if example else ''
        raise OptionError(f'{name} must be a mapping of options{example}, got {_show(value)}.')
    return value


def _typed_section(name: str, value: Any, example: str) -> tuple[Mapping, Any]:
    value = _section(name, value, f'type: {example}, ...')
    if 'type' not in value:
        raise OptionError(f'{name}.type is missing; name what to build, e.g. type: {example}.')
    return value, value['type']


# --------------------------------------------------------------------------------------------------
class _Checker:
    """One pass over a parsed option dict; raises the first problem, collects warnings."""

    def __init__(self, opt: dict, opt_path: str, check_files: bool = True) -> None:
        from basicsr.models.sr_model import SRModel

        from baryir_plugin.models.adversarial_base import AdversarialOTModel

        self.opt, self.opt_path, self.check_files = opt, opt_path, check_files
        self.is_train = bool(opt.get('is_train', True))
        self.warnings: list[str] = []
        self.model_type = opt.get('model_type')
        self.model_cls = lookup('model_type', self.model_type, 'model', 'model')
        self.strict = issubclass(self.model_cls, AdversarialOTModel)  # BaryIRModel, DARCOTModel
        self.sr_like = issubclass(self.model_cls, SRModel)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def unknown(self, section: str, key: str, known: Iterable[str], strict: Optional[bool] = None) -> None:
        """An unknown key: an error when it is a near miss or the model is ours, else a warning."""
        known = list(known)
        hint = did_you_mean(key, known)
        name = f'{section}.{key}' if section else key
        strict = self.strict if strict is None else strict
        if hint or strict:
            raise OptionError(f'{name} is not an option {self.model_type} reads{hint}; fix its name or remove it.')
        self.warn(f'{self.opt_path}: {name} is not an option BasicSR reads; ignored unless {self.model_type} '
                  'reads it.')

    # ---------------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        self.top_level()
        for key in self.opt:
            if str(key).startswith('network_'):
                self.network(str(key), self.opt[key])
        if self.is_train:
            self.train(self.opt.get('train'))
        self.val(self.opt.get('val'))
        if self.is_train and self.opt.get('logger') is None:
            raise OptionError("logger is missing: BasicSR's train pipeline reads logger.print_freq, "
                              'save_checkpoint_freq and use_tb_logger; add a logger section.')
        if self.opt.get('logger') is not None:
            self.logger(self.opt['logger'])
        self.path(self.opt.get('path'))
        self.dist_params(self.opt.get('dist_params'))
        self.datasets(self.opt.get('datasets'))
        return self.warnings

    def top_level(self) -> None:
        from baryir_plugin.models.training_speed import COMPILE_MODES

        known = set(BASICSR_TOP_KEYS) | set(PARSED_TOP_KEYS) | set(PLUGIN_TOP_KEYS)
        if not self.strict:
            known |= set(REALESRGAN_TOP_KEYS)
        for key in self.opt:
            if key not in known and not str(key).startswith('network_'):
                self.unknown('', str(key), sorted(known | {'network_g'}))
        if self.strict:
            needed = ['network_g', 'network_potential'] if self.is_train else ['network_g']
        else:
            needed = ['network_g'] if self.sr_like else []
        for key in needed:
            if key not in self.opt:
                sections = [str(k) for k in self.opt if str(k).startswith('network_') and k not in needed]
                hint = did_you_mean(key, sections)
                extra = f' ({self.model_cls.potential_example})' \
                    if key == 'network_potential' else ''
                raise OptionError(f'{key} is missing{hint}: {self.model_type} builds it{extra}; add a {key} section.')
        if self.is_train and self.opt.get('train') is None:
            raise OptionError('train is missing: training needs a train section (total_iter, optimizers, losses, '
                              'scheduler).')
        if not self.is_train and self.opt.get('val') is None:
            raise OptionError("val is missing: BasicSR's test pipeline reads val.save_img (and val.metrics); add "
                              'val: {save_img: false, metrics: {...}}.')
        if self.opt.get('scale') is not None and not (_is_int(self.opt['scale']) and self.opt['scale'] >= 1):
            raise OptionError(f'scale must be an integer >= 1 (1 for restoration), got {_show(self.opt["scale"])}.')
        seed = self.opt.get('manual_seed')
        if seed is not None and not _is_int(seed):
            raise OptionError(f'manual_seed must be an integer, got {_show(seed)}.')
        if self.opt.get('find_unused_parameters') is not None and not isinstance(self.opt['find_unused_parameters'],
                                                                                  bool):
            raise OptionError(f'find_unused_parameters must be true or false, got '
                              f'{_show(self.opt["find_unused_parameters"])}.')
        for key in ('use_amp', 'amp_bf16', 'use_channels_last', 'use_compile'):
            if self.opt.get(key) is not None and not isinstance(self.opt[key], bool):
                raise OptionError(f'{key} must be true or false, got {_show(self.opt[key])}.')
        mode = self.opt.get('compile_mode')
        if mode not in COMPILE_MODES:
            raise OptionError(f'compile_mode must be one of {COMPILE_MODES}, got {_show(mode)}'
                              f'{did_you_mean(mode, [m for m in COMPILE_MODES if m])}.')

    def network(self, section: str, value: Any) -> None:
        value, arch = _typed_section(section, value, 'BaryIR')
        cls = lookup(f'{section}.type', arch, 'arch', 'network')
        options = {k: v for k, v in value.items() if k != 'type'}
        Signature(cls).check(section, options, f'{arch} ({section})')
        from baryir_plugin.archs import BaryIR

        if isinstance(cls, type) and issubclass(cls, BaryIR):
            self.barycenter_parts(section, options)

    def barycenter_parts(self, section: str, options: Mapping) -> None:
        """The nested sections of a BaryIR network: ``backbone`` and ``bary_map``."""
        from baryir_plugin.archs.backbones import BACKBONE_REGISTRY

        if options.get('backbone') is not None:
            name = f'{section}.backbone'
            value, kind = _typed_section(name, options['backbone'], 'NAFNetBackbone')
            cls = registered(BACKBONE_REGISTRY, kind)
            if cls is None:
                known = sorted(BACKBONE_REGISTRY.keys())
                raise OptionError(f'{name}.type: no backbone {_show(kind)} is registered{did_you_mean(kind, known)}; '
                                  f'registered: {", ".join(known)}.')
            Signature(cls).check(name, {k: v for k, v in value.items() if k != 'type'}, f'{kind} ({name})')
        if options.get('bary_map') is not None:
            name = f'{section}.bary_map'
            value = _section(name, options['bary_map'], 'type: BarycenterMap, map_type: mlp')
            kind = value.get('type', 'BarycenterMap')
            cls = lookup(f'{name}.type', kind, 'arch', 'barycenter map')
            Signature(cls).check(name, {k: v for k, v in value.items() if k != 'type'}, f'{kind} ({name})')

    # ---------------------------------------------------------------------------------------------
    def train(self, train: Any) -> None:
        from baryir_plugin.models.options import BASICSR_TRAIN_KEYS, BaryIRTrainOptions

        train = _section('train', train)
        if self.strict:
            getattr(self.model_cls, 'train_options_class', BaryIRTrainOptions).from_opt(train, owner=self.model_type)
        else:
            known = set(BASICSR_TRAIN_KEYS) | set(BASICSR_OTHER_TRAIN_KEYS) | {'optim_g'}
            for key in map(str, train):
                if key not in known and not key.startswith('optim_') and not key.endswith('_opt'):
                    self.warn(f'{self.opt_path}: train.{key} is not an option BasicSR reads'
                              f'{did_you_mean(key, known)}; ignored unless {self.model_type} reads it.')
        self._iterations('train.total_iter', train.get('total_iter'), required=True)
        warmup = train.get('warmup_iter')
        if warmup is not None and not (_is_number(warmup) and float(warmup).is_integer()):
            raise OptionError(f'train.warmup_iter must be an integer (-1: no warm-up), got {_show(warmup)}.')
        ema = train.get('ema_decay')
        if ema is not None and not (_is_number(ema) and 0 <= ema < 1):
            raise OptionError(f'train.ema_decay must be a number in [0, 1) (0: no EMA network), got {_show(ema)}.')
        for key, value in train.items():
            key = str(key)
            if key.startswith('optim_'):
                if value is not None or not self.strict:
                    self.optimizer(f'train.{key}', value)
            elif key.endswith('_opt'):
                if self.strict or key in BASICSR_LOSS_KEYS or (isinstance(value, Mapping) and 'type' in value):
                    self.loss(f'train.{key}', value)
        if self.sr_like:
            if train.get('pixel_opt') is None and train.get('perceptual_opt') is None:
                raise OptionError(f'train: {self.model_type} needs a restoration loss; set train.pixel_opt (e.g. '
                                  '{type: L1Loss, loss_weight: 1.0}) or train.perceptual_opt.')
            if not self.strict and train.get('optim_g') is None:
                raise OptionError(f'train.optim_g is missing: {self.model_type} builds its optimizer from it '
                                  '(e.g. {type: Adam, lr: !!float 2e-4}).')
        self._scheduler(train)

    def _iterations(self, name: str, value: Any, required: bool = False, minimum: int = 1) -> None:
        if value is None:
            if required:
                raise OptionError(f'{name} is missing; BasicSR reads it (an integer >= {minimum}).')
            return
        if not (_is_number(value) and float(value).is_integer() and value >= minimum):
            raise OptionError(f'{name} must be an integer >= {minimum}, got {_show(value)}{_yaml_hint(value)}.')

    def optimizer(self, section: str, value: Any) -> None:
        import torch

        value, name = _typed_section(section, value, 'Adam')
        cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer):
            known = sorted(n for n, c in vars(torch.optim).items() if isinstance(c, type)
                           and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)
            hint = did_you_mean(name, known)
            listing = '' if hint else f'; use a torch.optim class: {", ".join(known)}'
            raise OptionError(f'{section}.type: torch.optim has no optimizer {_show(name)}{hint}{listing}.')
        if 'lr' not in value:
            raise OptionError(f'{section}.lr is missing: BasicSR passes every optimizer a learning rate; add e.g. '
                              'lr: !!float 1e-4.')
        options = {k: v for k, v in value.items() if k != 'type'}
        Signature(cls, skip=('params',)).check(section, options, f'torch.optim.{name}')

    def loss(self, section: str, value: Any) -> None:
        if value is None:
            return  # that term is off
        value, name = _typed_section(section, value, 'L1Loss')
        cls = lookup(f'{section}.type', name, 'loss', 'loss')
        Signature(cls).check(section, {k: v for k, v in value.items() if k != 'type'}, name)

    def _scheduler(self, train: Mapping) -> None:
        from basicsr.models.base_model import BaseModel
        from basicsr.models.lr_scheduler import CosineAnnealingRestartLR, MultiStepRestartLR

        if getattr(self.model_cls, 'setup_schedulers', None) is not BaseModel.setup_schedulers:
            return  # the model builds its own schedulers
        if train.get('scheduler') is None:
            if self.sr_like:
                raise OptionError("train.scheduler is missing: BasicSR's models always build one; add e.g. "
                                  'scheduler: {type: MultiStepLR, milestones: [250000], gamma: 0.5}.')
            return
        value, name = _typed_section('train.scheduler', train['scheduler'], 'MultiStepLR')
        # BasicSR's scheduler arguments are unannotated; their types are these
        schedulers = {
            'MultiStepLR': (MultiStepRestartLR, {'milestones': list, 'gamma': float, 'restarts': list,
                                                 'restart_weights': list, 'last_epoch': int}),
            'CosineAnnealingRestartLR': (CosineAnnealingRestartLR, {'periods': list, 'restart_weights': list,
                                                                    'eta_min': float, 'last_epoch': int}),
        }
        schedulers['MultiStepRestartLR'] = schedulers['MultiStepLR']
        if not isinstance(name, str) or name not in schedulers:
            raise OptionError(f'train.scheduler.type: BasicSR builds no scheduler {_show(name)}'
                              f'{did_you_mean(name, schedulers)}; use one of {", ".join(schedulers)}.')
        cls, kinds = schedulers[name]
        Signature(cls, skip=('optimizer',), types_=kinds).check(
            'train.scheduler', {k: v for k, v in value.items() if k != 'type'}, name)

    # ---------------------------------------------------------------------------------------------
    def val(self, val: Any) -> None:
        from baryir_plugin.models.options import BASICSR_VAL_KEYS, BaryIRValOptions

        if val is None:
            return
        val = _section('val', val)
        if self.strict:
            BaryIRValOptions.from_opt(val, self.is_train, owner=self.model_type)
        else:
            known = set(BASICSR_VAL_KEYS) | set(BASICSR_OTHER_VAL_KEYS)
            for key in val:
                if key not in known:
                    self.warn(f'{self.opt_path}: val.{key} is not an option BasicSR reads'
                              f'{did_you_mean(key, known)}; ignored unless {self.model_type} reads it.')
        if self.is_train:
            self._iterations('val.val_freq', val.get('val_freq'), required=True)
        if 'save_img' not in val:
            raise OptionError("val.save_img is missing: BasicSR's pipeline reads it; add save_img: false (or true "
                              'to write the restored images).')
        for key in ('save_img', 'pbar'):
            if val.get(key) is not None and not isinstance(val[key], bool):
                raise OptionError(f'val.{key} must be true or false, got {_show(val[key])}.')
        if not self.strict and self.sr_like and not self.is_train and val.get('save_img') and 'suffix' not in val:
            raise OptionError(f"val.suffix is missing: {self.model_type}'s test reads it to name the saved images; "
                              'add suffix: ~ (the run name) or a text.')
        metrics = val.get('metrics')
        if metrics is not None:
            for name, metric in _section('val.metrics', metrics, 'psnr: {type: calculate_psnr, ...}').items():
                self.metric(f'val.metrics.{name}', metric)
        if self.strict:
            from baryir_plugin.models.validation import BaryIRValidation
            names = list(metrics or {})
            for entry in (self.opt.get('datasets') or {}).values():
                if isinstance(entry, Mapping):
                    BaryIRValidation._dataset_metrics(entry, names)
            BaryIRValidation._set_average(self.opt, self.is_train)

    def metric(self, section: str, value: Any) -> None:
        value, name = _typed_section(section, value, 'calculate_psnr')
        func = lookup(f'{section}.type', name, 'metric', 'metric')
        better = value.get('better', 'higher')
        if better not in ('higher', 'lower'):
            raise OptionError(f"{section}.better must be 'higher' or 'lower', got {_show(better)}.")
        # BasicSR's metric functions take **kwargs only to swallow img2 and `better`: check the named ones
        Signature(func, skip=('img', 'img2')).check(section, {k: v for k, v in value.items() if k != 'type'},
                                                    name, extra=('type',) + METRIC_EXTRA_KEYS, any_keys=False)

    # ---------------------------------------------------------------------------------------------
    def logger(self, logger: Any) -> None:
        logger = _section('logger', logger, 'print_freq: 100, save_checkpoint_freq: 5000, use_tb_logger: false')
        for key in logger:
            if key not in LOGGER_KEYS:
                self.unknown('logger', key, LOGGER_KEYS, strict=self.strict or self.sr_like)
        if self.is_train:
            self._iterations('logger.print_freq', logger.get('print_freq'), required=True)
            self._iterations('logger.save_checkpoint_freq', logger.get('save_checkpoint_freq'), required=True)
            if 'use_tb_logger' not in logger:
                raise OptionError("logger.use_tb_logger is missing: BasicSR's message logger reads it; add "
                                  'use_tb_logger: false (or true for TensorBoard).')
        if logger.get('use_tb_logger') is not None and not isinstance(logger['use_tb_logger'], bool):
            raise OptionError(f'logger.use_tb_logger must be true or false, got {_show(logger["use_tb_logger"])}.')
        wandb = logger.get('wandb')
        if wandb is not None:
            wandb = _section('logger.wandb', wandb, 'project: NAME, resume_id: ~')
            for key in wandb:
                if key not in WANDB_KEYS:
                    self.unknown('logger.wandb', key, WANDB_KEYS, strict=True)
            if wandb.get('project') is not None and logger.get('use_tb_logger') is not True:
                raise OptionError('logger.wandb.project is set but logger.use_tb_logger is not true: BasicSR syncs '
                                  'wandb from TensorBoard; set use_tb_logger: true or wandb: ~.')

    def path(self, path: Any) -> None:
        path = _section('path', path, 'pretrain_network_g: ~, strict_load_g: true, resume_state: ~')
        suffixes = [k[len('network_'):] for k in self.opt if k.startswith('network_')]
        if not self.strict:
            suffixes += [s for s in BASICSR_PATH_SUFFIXES if s not in suffixes]
        known = list(PATH_KEYS) + [f'{p}{s}' for p in PATH_NETWORK_PREFIXES for s in suffixes]
        resuming = bool(path.get('resume_state')) or bool(self.opt.get('auto_resume'))
        for key, value in path.items():
            if key not in known:
                self.unknown('path', key, known, strict=self.strict or key.startswith(PATH_NETWORK_PREFIXES))
                continue
            if key.startswith('pretrain_network_') or key == 'resume_state':
                if value is not None and not isinstance(value, str):
                    raise OptionError(f'path.{key} must be a file path or ~, got {_show(value)}.')
                if key != 'resume_state' and value and self.check_files and not resuming \
                        and not os.path.isfile(value):
                    where = 'a folder' if os.path.isdir(value) else 'no file'
                    fix = ', or write ~ to start from random weights' if self.opt.get('is_train', True) else ''
                    raise OptionError(f'path.{key}: {where} at {value!r} (relative paths are relative to '
                                      f'{os.getcwd()}); fix the path{fix}.')
            elif key.startswith('strict_load_'):
                if value is not None and not isinstance(value, bool):
                    raise OptionError(f'path.{key} must be true or false, got {_show(value)}.')
            elif key.startswith('param_key_'):
                if value is not None and not isinstance(value, str):
                    raise OptionError(f'path.{key} must be the name of the weights in the checkpoint (e.g. params or '
                                      f'params_ema), got {_show(value)}.')
            elif key == 'ignore_resume_networks':
                if value is not None and not (isinstance(value, (list, tuple))
                                              and all(isinstance(v, str) for v in value)):
                    raise OptionError(f'path.ignore_resume_networks must be a list of network sections (e.g. '
                                      f'[network_g]), got {_show(value)}.')

    def dist_params(self, params: Any) -> None:
        if params is None:
            return
        params = _section('dist_params', params, 'backend: nccl, port: 29500')
        for key in params:
            if key not in DIST_PARAMS_KEYS:
                self.unknown('dist_params', key, DIST_PARAMS_KEYS, strict=True)
        if params.get('backend') is not None and params['backend'] not in ('nccl', 'gloo'):
            raise OptionError(f"dist_params.backend must be 'nccl' or 'gloo', got {_show(params['backend'])}.")
        if params.get('port') is not None and not (_is_int(params['port']) and 0 < params['port'] < 65536):
            raise OptionError(f'dist_params.port must be a port number, got {_show(params["port"])}.')

    def datasets(self, datasets: Any) -> None:
        datasets = _section('datasets', datasets, 'train: {...}, val: {...}')
        if self.is_train:
            for phase in datasets:
                if phase != 'train' and str(phase).split('_')[0] != 'val':
                    raise OptionError(f'datasets.{phase}: in training, the dataset entries are named train, val or '
                                      f'val_<n> (BasicSR reads the phase from the name); rename it.')
            if 'train' not in datasets:
                raise OptionError('datasets.train is missing: training needs a train set.')
        for phase, entry in datasets.items():
            section = f'datasets.{phase}'
            entry, name = _typed_section(section, entry, 'PairedImageDataset')
            lookup(f'{section}.type', name, 'dataset', 'dataset')
            sources = entry.get('sources')
            if isinstance(sources, (list, tuple)):
                for i, source in enumerate(sources):
                    if isinstance(source, Mapping) and 'type' in source:
                        lookup(f'{section}.sources[{i}].type', source['type'], 'dataset', 'dataset')


def check_options(opt: dict, opt_path: str, check_files: bool = True, forced: Sequence[str] = ()) -> list[str]:
    """Check a parsed option dict (as BasicSR's parse_options returns it) before any work starts.

    Raises OptionError ``<opt_path>: <dotted option> <what is wrong>; <the fix>``; returns the warnings
    (also logged). ``check_files=False`` skips the existence of ``path.pretrain_network_*`` files;
    ``forced``: the dotted keys set by ``--force_yml`` (named as such in a message about them).
    """
    try:
        checker = _Checker(opt, opt_path, check_files=check_files)
        warnings = checker.run()
    except OptionError as e:
        message = str(e)
        for key in forced:
            if re.search(rf'(^|[\s:]){re.escape(key)}\b', message):
                message = f'{message} ({key} was set by --force_yml)'
                break
        raise OptionError(f'{opt_path}: {message}') from None
    if opt.get('rank', 0) == 0:
        for message in warnings:
            _LOG.warning(message)
    return warnings


# --------------------------------------------------------------------------------------------------
# before BasicSR's parser: the file's shape and --force_yml
def _yaml_loader():
    from basicsr.utils.options import ordered_yaml
    return ordered_yaml()[0]


def load_option_file(opt_path: str) -> Any:
    """The option file as BasicSR's parser reads it (YAML errors propagate: the boundary names file:line)."""
    import yaml
    with open(opt_path, mode='r') as f:
        return yaml.load(f, Loader=_yaml_loader())


_KEY = re.compile(r'^[\w.\-]+$')


def apply_force_yml(opt: dict, entries: Optional[Sequence[str]]) -> list[str]:
    """Apply ``--force_yml`` entries to ``opt`` as BasicSR does, refusing what it would fail on (or run:
    BasicSR executes the keys and evaluates list values). Returns the dotted keys that were set."""
    from basicsr.utils.options import _postprocess_yml_value

    forced = []
    for entry in entries or ():
        usage = 'write KEY=VALUE, nested keys joined by colons, e.g. --force_yml train:total_iter=1000'
        if entry.count('=') != 1:
            raise OptionError(f'--force_yml {entry!r}: {usage} (exactly one =).')
        keys, value = (part.strip() for part in entry.split('='))
        parts = keys.split(':')
        for part in parts:
            if not _KEY.match(part):
                raise OptionError(f'--force_yml {entry!r}: {part!r} is not an option name; {usage}.')
        if value.startswith('['):
            try:
                literal = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                literal = None
            if not isinstance(literal, list):
                raise OptionError(f'--force_yml {entry!r}: {value} is not a list of values, e.g. [1, 2].')
        if value.startswith('!!float'):
            try:
                float(value.replace('!!float', ''))
            except ValueError:
                raise OptionError(f'--force_yml {entry!r}: {value} is not a number, e.g. !!float 1e-4.') from None
        node = opt
        for depth, part in enumerate(parts[:-1]):
            here = ':'.join(parts[:depth + 1])
            if part not in node:
                raise OptionError(f'--force_yml {entry!r}: the option file has no {here}'
                                  f'{did_you_mean(part, [str(k) for k in node])}; --force_yml can add only the last '
                                  'key of a path.')
            node = node[part]
            if not isinstance(node, Mapping):
                raise OptionError(f'--force_yml {entry!r}: {here} is {_kind(node)}, not a mapping of options; '
                                  '--force_yml sets keys of mappings only.')
        node[parts[-1]] = _postprocess_yml_value(value)
        forced.append('.'.join(parts))
    return forced


def check_option_file(raw: Any, opt_path: str, is_train: Optional[bool] = None) -> None:
    """What BasicSR's parser and build_model index without looking (``is_train``: also what its train
    pipeline does): raises OptionError naming the file."""
    if raw is None:
        raise OptionError(f'{opt_path}: the option file is empty; give name, model_type, num_gpu, datasets, path '
                          '(see options/train_baryir_demo.yml).')
    if not isinstance(raw, Mapping):
        raise OptionError(f'{opt_path}: an option file is a mapping of options (name: ..., model_type: ..., '
                          f'datasets: ...), but this one holds {_kind(raw)}; write one option per line as key: value.')
    missing = [key for key in REQUIRED_TOP_KEYS if key not in raw]
    if missing:
        hints = ''.join(did_you_mean(m, [str(k) for k in raw]) for m in missing)
        raise OptionError(f'{opt_path}: {", ".join(missing)} {"is" if len(missing) == 1 else "are"} missing{hints}; '
                          f'BasicSR needs {", ".join(REQUIRED_TOP_KEYS)} in every option file.')
    if not (isinstance(raw['name'], str) and raw['name'].strip()):
        raise OptionError(f'{opt_path}: name must be a non-empty string (the run\'s folder name), got '
                          f'{_show(raw["name"])}.')
    if raw['name'].strip() in ('.', '..') or any(sep in raw['name'] for sep in ('/', '\\', os.sep)):
        raise OptionError(f'{opt_path}: name {raw["name"]!r} must be a plain folder name (no / or \\, not . or ..): '
                          'the run lives in experiments/<name> (results/<name> for basicsr test), and BasicSR '
                          'archives an existing folder of that name; choose a name like my_run_x4.')
    if not isinstance(raw['model_type'], str):
        raise OptionError(f'{opt_path}: model_type must be a model name (e.g. BaryIRModel), got '
                          f'{_show(raw["model_type"])}.')
    num_gpu = raw['num_gpu']
    if num_gpu != 'auto' and not (_is_int(num_gpu) and num_gpu >= 0):
        raise OptionError(f'{opt_path}: num_gpu must be auto or an integer >= 0 (0: CPU), got {_show(num_gpu)}.')
    if num_gpu not in ('auto', 0):
        import torch
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise SetupError(f'{opt_path}: num_gpu is {num_gpu} but this machine has no usable CUDA GPU; set '
                             'num_gpu: auto (GPUs when there are any, else the CPU) or 0.')
    seed = raw.get('manual_seed')
    if seed is not None and not (_is_int(seed) and seed >= 0):
        raise OptionError(f'{opt_path}: manual_seed must be an integer >= 0 (or ~ for a random one), got '
                          f'{_show(seed)}.')
    datasets = raw['datasets']
    if not isinstance(datasets, Mapping) or not datasets:
        raise OptionError(f'{opt_path}: datasets must be a mapping of dataset entries (train: {{...}}, val: {{...}}), '
                          f'got {_show(datasets)}.')
    for phase, entry in datasets.items():
        if not isinstance(entry, Mapping):
            raise OptionError(f'{opt_path}: datasets.{phase} must be a mapping of dataset options (name, type, ...), '
                              f'got {_show(entry)}.')
    if not isinstance(raw['path'], Mapping):
        raise OptionError(f'{opt_path}: path must be a mapping (e.g. pretrain_network_g: ~, resume_state: ~), got '
                          f'{_show(raw["path"])}.')
    if is_train and not isinstance(raw.get('logger'), Mapping):
        raise OptionError(f"{opt_path}: logger {'must be a mapping' if 'logger' in raw else 'is missing'}: BasicSR's "
                          'train pipeline reads logger.print_freq, save_checkpoint_freq and use_tb_logger; add a '
                          'logger section.')


def _peek_args(argv: Sequence[str]) -> Optional[argparse.Namespace]:
    """BasicSR's own flags, read the way its parse_options reads them (None when they do not parse: its
    parser then reports the usage error)."""
    parser = _SilentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--force_yml', nargs='+', default=None)
    try:
        args, _ = parser.parse_known_args(list(argv))
    except (SystemExit, ValueError):
        return None
    return args


class _SilentParser(argparse.ArgumentParser):
    """A parser that leaves the usage message to BasicSR's own (which prints it once)."""

    def error(self, message: str):
        raise ValueError(message)


def _raised_by_parser(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by BasicSR's parse_options itself (or the code its --force_yml executes)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and (last == '<string>' or last.replace(os.sep, '/').endswith('basicsr/utils/options.py'))


def checked_parse_options(original):
    """BasicSR's ``parse_options`` with the option file checked before and after it runs."""
    if getattr(original, '__baryir_checked__', False):
        return original

    @functools.wraps(original)
    def parse_options(root_path, is_train=True):
        args = _peek_args(sys.argv[1:])
        forced: list[str] = []
        if args is not None and args.opt and os.path.isfile(args.opt):
            raw = load_option_file(args.opt)
            check_option_file(raw, args.opt, is_train)
            trial = copy.deepcopy(raw)
            try:
                forced = apply_force_yml(trial, args.force_yml)
            except OptionError as e:
                raise OptionError(f'{args.opt}: {e}') from None
            if forced:
                check_option_file(trial, f'{args.opt} (after --force_yml)', is_train)
            if not is_train and 'network_g' in trial and not (trial.get('path') or {}).get('pretrain_network_g'):
                raise OptionError(f'{args.opt}: path.pretrain_network_g is not set, so basicsr test would restore '
                                  'with an untrained network; set it to the .pth to test (e.g. experiments/<name>/'
                                  'models/net_g_latest.pth).')
        try:
            opt, parsed = original(root_path, is_train=is_train)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, BaryIRError) or not _raised_by_parser(e):
                raise
            where = args.opt if args is not None and args.opt else 'the option file'
            raise OptionError(f'{where}: BasicSR cannot read the options ({type(e).__name__}: {one_line(e)}); '
                              'check the sections it names.') from e
        check_options(opt, parsed.opt, forced=forced)
        return opt, parsed

    parse_options.__baryir_checked__ = True
    return parse_options


def translating_builder(original, kind: str, what: str):
    """``build_network``/``build_loss`` whose constructor TypeError/ValueError (options the checks could not
    see) and unknown types are OptionErrors naming the type."""
    if getattr(original, '__baryir_checked__', False):
        return original

    @functools.wraps(original)
    def build(opt):
        name = opt.get('type') if isinstance(opt, Mapping) else None
        if isinstance(opt, Mapping) and 'type' in opt and registered(_registry(kind), name) is None:
            raise _unregistered(f'{what} type', name, _registry(kind), what)
        try:
            return original(opt)
        except BaryIRError:
            raise
        except (TypeError, ValueError) as e:
            raise OptionError(f'{what} {name} cannot be built from its options: {one_line(e).rstrip(".")}; fix '
                              f'the {name} options in the option file.') from e

    build.__baryir_checked__ = True
    return build


def _rebind(module_name: str, attribute: str, original, replacement) -> None:
    """Replace ``attribute`` in every loaded module that bound ``original`` by ``from ... import``."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == module_name or name.startswith(('basicsr.', 'baryir_plugin.'))):
            continue
        if getattr(module, attribute, None) is original:
            setattr(module, attribute, replacement)


def install() -> None:
    """Check options in ``basicsr train|test`` (wraps ``basicsr.train.parse_options`` and
    ``basicsr.test.parse_options``) and translate build-time option errors of networks and losses."""
    import basicsr.archs
    import basicsr.losses
    import basicsr.test
    import basicsr.train

    for module in (basicsr.train, basicsr.test):
        module.parse_options = checked_parse_options(module.parse_options)
    for module, attribute, kind, what in ((basicsr.archs, 'build_network', 'arch', 'network'),
                                          (basicsr.losses, 'build_loss', 'loss', 'loss')):
        original = getattr(module, attribute)
        replacement = translating_builder(original, kind, what)
        _rebind(module.__name__, attribute, original, replacement)
