"""BaryIRModel's ``train`` and ``val`` options, read and checked once, into typed objects.

The model reads ``self.train_options.<field>`` and ``self.val_options.<field>``, never the option dict:
every option it understands is a field here, with its default and its check, and a key that is neither a
field nor one BasicSR itself reads (:data:`BASICSR_TRAIN_KEYS`, :data:`BASICSR_VAL_KEYS`) is an error,
never a silently ignored typo. ``basicsr train|test`` runs the same checks on the option file before any
work starts (``baryir_plugin/options_check.py``); every message names the option (``train.gamma``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from baryir_plugin.errors import OptionError, did_you_mean

LAMBDA_MODES = ('proportional', 'inverse', 'uniform')
POTENTIAL_STEP_MODES = ('recompute', 'reuse')
CONGRUENCE_STEPS = ('separate', 'joint')
SAMPLE_WEIGHTINGS = ('lambda', 'importance')
IRC_LABELS = ('degradation', 'source')
NONFINITE_POLICIES = ('skip', 'stop', 'ignore')
RMSPROP_DEFAULT = {'type': 'RMSprop', 'lr': 1e-4, 'alpha': 0.99, 'eps': 1e-8}

# ``train`` keys that BasicSR's SRModel/BaseModel and its train pipeline read for BaryIRModel
BASICSR_TRAIN_KEYS = ('ema_decay', 'total_iter', 'warmup_iter', 'scheduler', 'pixel_opt', 'perceptual_opt')
# ``val`` keys that BasicSR's SRModel and its train/test pipelines read
BASICSR_VAL_KEYS = ('val_freq', 'save_img', 'metrics', 'suffix', 'pbar')


# --------------------------------------------------------------------------------------------------
# value checks (messages name the option by its dotted path)
def show(value: Any, limit: int = 80) -> str:
    """``repr`` of an option value as the user wrote it (mappings as plain dicts), shortened."""
    def plain(v):
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(plain(x) for x in v)
        return v
    text = repr(plain(value))
    return text if len(text) <= limit else text[:limit - 3] + '...'


def yaml_hint(value: Any) -> str:
    """Why a number may have been read as text: PyYAML reads 1e-4 (no dot) as a string."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ''
        return f' (YAML read it as text: write !!float {value} or a number with a dot, e.g. 1.0e-4)'
    return ''


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_choice(name: str, value: Any, choices: tuple) -> str:
    if value not in choices:
        raise OptionError(f'{name} must be one of {choices}, got {show(value)}{did_you_mean(value, choices)}.')
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f'{name} must be true or false, got {show(value)}.')
    return value


def check_number(name: str, value: Any, minimum: Optional[float] = None) -> float:
    if not is_number(value):
        raise OptionError(f'{name} must be a number, got {show(value)}{yaml_hint(value)}.')
    if minimum is not None and value < minimum:
        raise OptionError(f'{name} must be >= {minimum}, got {value}.')
    return float(value)


def check_integer(name: str, value: Any, minimum: Optional[int] = None) -> int:
    if not is_integer(value):
        raise OptionError(f'{name} must be an integer, got {show(value)}.')
    if minimum is not None and value < minimum:
        raise OptionError(f'{name} must be an integer >= {minimum}, got {value}.')
    return value


def check_section(name: str, value: Any, default_type: Optional[str] = None) -> dict:
    """A loss or optimizer section: a mapping with a ``type``."""
    if not isinstance(value, Mapping):
        example = f' such as {{type: {default_type}}}' if default_type else ''
        raise OptionError(f'{name} must be a mapping of options{example}, got {show(value)}.')
    if not isinstance(value.get('type'), str):
        example = f' (e.g. type: {default_type})' if default_type else ''
        raise OptionError(f'{name}.type is missing or not a name{example}; got {show(value)}.')
    return dict(value)


def check_known_keys(section: str, given: Mapping, known, owner: str) -> None:
    """Every key of ``given`` is in ``known``; a typo is named with the closest known key."""
    for key in given:
        if key not in known:
            hint = did_you_mean(key, known)
            listing = '' if hint else f' (its {section} options: {", ".join(sorted(known))})'
            raise OptionError(f'{section}.{key} is not an option of {owner}{hint}{listing}; fix its name or '
                              'remove it.')


def _mapping(name: str, value: Any) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(f'{name} must be a mapping of options, got {show(value)}.')
    return value


# --------------------------------------------------------------------------------------------------
class _Section:
    """What the option checks need of a section's dataclass: the keys it reads."""

    BASICSR_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def known_keys(cls) -> frozenset:
        """Every key of the section that the model reads: its own fields and BasicSR's keys."""
        return frozenset(cls.field_names()) | frozenset(cls.BASICSR_KEYS)


@dataclass(frozen=True)
class BaryIRTrainOptions(_Section):
    """BaryIRModel's ``train`` options (defaults = the reference); see the README for what each does.

    ``optim_*`` and ``*_opt`` hold the sections as written (with the default section where the key is
    absent); their types and keys against the optimizer's or loss's signature are checked by
    ``baryir_plugin/options_check.py``. ``irc_opt: ~`` / ``bro_opt: ~`` disable those terms (``None``).
    ``checkpointing`` is the parsed ``train.checkpointing``: None (off) or (stage names or None for all,
    blocks per recomputed run).
    """

    optim_g: dict = field(default_factory=lambda: dict(RMSPROP_DEFAULT))
    optim_potential: dict = field(default_factory=lambda: dict(RMSPROP_DEFAULT))
    mwb_opt: dict = field(default_factory=lambda: {'type': 'MWBLoss'})
    potential_opt: dict = field(default_factory=lambda: {'type': 'PotentialLoss'})
    irc_opt: Optional[dict] = field(default_factory=lambda: {'type': 'IRCLoss'})
    bro_opt: Optional[dict] = field(default_factory=lambda: {'type': 'BROLoss'})
    barycenter_weight: float = 1e-4
    gamma: float = 0.05
    irc_labels: str = 'degradation'
    lambda_mode: str = 'proportional'
    lambdas: Optional[tuple[float, ...]] = None
    sample_weighting: str = 'lambda'
    potential_iters: int = 1
    potential_step: str = 'recompute'
    congruence_step: str = 'separate'
    gather_embeddings: bool = False
    checkpointing: Optional[tuple[Optional[tuple[str, ...]], int]] = None
    nonfinite: str = 'skip'
    nonfinite_patience: int = 10

    _LOSS_DEFAULTS = {'mwb_opt': 'MWBLoss', 'potential_opt': 'PotentialLoss', 'irc_opt': 'IRCLoss',
                      'bro_opt': 'BROLoss'}

    BASICSR_KEYS = BASICSR_TRAIN_KEYS

    @classmethod
    def from_opt(cls, train_opt: Optional[Mapping], owner: str = 'BaryIRModel') -> 'BaryIRTrainOptions':
        """Read and check the ``train`` section; raises OptionError naming ``train.<key>``."""
        opt = _mapping('train', train_opt)
        check_known_keys('train', opt, cls.known_keys(), owner)
        values: dict[str, Any] = {}
        for key in ('optim_g', 'optim_potential'):
            if opt.get(key) is not None:
                values[key] = check_section(f'train.{key}', opt[key], 'RMSprop')
        for key, default_type in cls._LOSS_DEFAULTS.items():
            if key not in opt:
                continue
            value = opt[key]
            if value is None and key in ('irc_opt', 'bro_opt'):
                values[key] = None  # the term is off
            elif value is not None and value != {}:
                values[key] = check_section(f'train.{key}', value, default_type)
        if 'barycenter_weight' in opt:
            values['barycenter_weight'] = check_number('train.barycenter_weight', opt['barycenter_weight'], 0)
        if 'gamma' in opt:
            values['gamma'] = check_number('train.gamma', opt['gamma'], 0)
        for key, choices in (('irc_labels', IRC_LABELS), ('lambda_mode', LAMBDA_MODES),
                             ('sample_weighting', SAMPLE_WEIGHTINGS), ('potential_step', POTENTIAL_STEP_MODES),
                             ('congruence_step', CONGRUENCE_STEPS), ('nonfinite', NONFINITE_POLICIES)):
            if key in opt:
                values[key] = check_choice(f'train.{key}', opt[key], choices)
        if opt.get('lambdas') is not None:
            lambdas = opt['lambdas']
            if not (isinstance(lambdas, (list, tuple)) and lambdas and all(is_number(v) and v > 0 for v in lambdas)):
                raise OptionError(f'train.lambdas must be a list of positive numbers (one per source, summing to 1), '
                                  f'got {show(lambdas)}.')
            values['lambdas'] = tuple(float(v) for v in lambdas)
        if 'potential_iters' in opt:
            values['potential_iters'] = check_integer('train.potential_iters', opt['potential_iters'], 0)
        if 'nonfinite_patience' in opt:
            values['nonfinite_patience'] = check_integer('train.nonfinite_patience', opt['nonfinite_patience'], 1)
        if 'gather_embeddings' in opt:
            values['gather_embeddings'] = check_flag('train.gather_embeddings', opt['gather_embeddings'])
        if 'checkpointing' in opt:
            from .training_speed import parse_checkpointing
            value = opt['checkpointing']
            try:
                parsed = parse_checkpointing(dict(value) if isinstance(value, Mapping) else value)
            except OptionError:
                raise
            except ValueError as e:
                raise OptionError(str(e)) from None
            if parsed is not None:
                stages, every = parsed
                parsed = (None if stages is None else tuple(stages), every)
            values['checkpointing'] = parsed
        return cls(**values)


@dataclass(frozen=True)
class BaryIRValOptions(_Section):
    """BaryIRModel's ``val`` options (BaryIRValidation.nondist_validation documents what each does).

    ``report`` defaults to on in test and off in training; ``average`` is None (the default: true when
    there are two evaluation sets or more), true, false or the names of the sets to average.
    """

    metrics: dict = field(default_factory=dict)
    report: bool = False
    channels_last: bool = False
    self_ensemble: bool = False
    input_metrics: bool = False
    average: Union[None, bool, tuple[str, ...]] = None
    suffix: Optional[str] = None

    BASICSR_KEYS = BASICSR_VAL_KEYS

    @classmethod
    def from_opt(cls, val_opt: Optional[Mapping], is_train: bool,
                 owner: str = 'BaryIRModel') -> 'BaryIRValOptions':
        """Read and check the ``val`` section; raises OptionError naming ``val.<key>``."""
        opt = _mapping('val', val_opt)
        check_known_keys('val', opt, cls.known_keys(), owner)
        values: dict[str, Any] = {'report': not is_train}
        metrics = _mapping('val.metrics', opt.get('metrics'))
        for name, metric in metrics.items():
            check_section(f'val.metrics.{name}', metric, 'calculate_psnr')
        values['metrics'] = {name: dict(metric) for name, metric in metrics.items()}
        for key in ('report', 'channels_last', 'self_ensemble', 'input_metrics'):
            if opt.get(key) is not None:
                values[key] = check_flag(f'val.{key}', opt[key])
        choice = opt.get('average')
        if isinstance(choice, (list, tuple)) and choice and all(isinstance(n, str) for n in choice):
            values['average'] = tuple(choice)
        elif choice is None or isinstance(choice, bool):
            values['average'] = choice
        else:
            raise OptionError(f'val.average must be true, false or a list of dataset names, got {show(choice)}.')
        if opt.get('suffix') is not None:
            if not isinstance(opt['suffix'], str):
                raise OptionError(f'val.suffix must be a string (added to the saved images\' names), got '
                                  f'{show(opt["suffix"])}.')
            values['suffix'] = opt['suffix']
        return cls(**values)
