"""DARCOTModel's ``train`` options, read and checked once into a typed object (as ``options.py`` does for
BaryIRModel; the ``val`` options are BaryIRModel's, :class:`~baryir_plugin.models.options.BaryIRValOptions`).

Defaults are the authors' DA-RCOT code; every message names the option (``train.pairing``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from baryir_plugin.errors import OptionError

from .options import (BASICSR_TRAIN_KEYS, NONFINITE_POLICIES, _mapping, _Section, check_choice, check_flag,
                      check_integer, check_known_keys, check_number, check_section, show)

PAIRINGS = ('paired', 'unpaired', 'first_n')
GP_MODES = ('separate_step', 'summed')
DARCOT_POTENTIAL_STEPS = ('recompute', 'reuse')
CONTRASTIVE_LABELS = ('degradation', 'source')
# RMSprop with torch's defaults; the transport map at half the potential's learning rate (the reference)
RMSPROP_T = {'type': 'RMSprop', 'lr': 5e-5, 'alpha': 0.99, 'eps': 1e-8}
RMSPROP_F = {'type': 'RMSprop', 'lr': 1e-4, 'alpha': 0.99, 'eps': 1e-8}


@dataclass(frozen=True)
class DARCOTTrainOptions(_Section):
    """DARCOTModel's ``train`` options (DARCOTModel documents what each does).

    ``*_opt`` hold the loss sections as written (with the default section where the key is absent);
    ``fourier_opt: ~`` / ``contrastive_opt: ~`` switch those terms off.
    """

    optim_g: dict = field(default_factory=lambda: dict(RMSPROP_T))
    optim_potential: dict = field(default_factory=lambda: dict(RMSPROP_F))
    cost_opt: dict = field(default_factory=lambda: {'type': 'FROTCostLoss'})
    fourier_opt: Optional[dict] = field(default_factory=lambda: {'type': 'FourierResidualLoss'})
    contrastive_opt: Optional[dict] = field(default_factory=lambda: {'type': 'ResidualContrastiveLoss'})
    gp_opt: dict = field(default_factory=lambda: {'type': 'WGANGPLoss'})
    sigma: float = 1.0
    gp_mode: str = 'separate_step'
    potential_iters: int = 1
    potential_step: str = 'recompute'
    pairing: str = 'paired'
    pairnum: Optional[int] = None
    unpaired_contrastive: bool = False
    unpaired_shuffle: bool = False
    contrastive_labels: str = 'degradation'
    noise_sources: Optional[tuple[str, ...]] = None
    nonfinite: str = 'skip'
    nonfinite_patience: int = 10

    _LOSS_DEFAULTS = {'cost_opt': 'FROTCostLoss', 'fourier_opt': 'FourierResidualLoss',
                      'contrastive_opt': 'ResidualContrastiveLoss', 'gp_opt': 'WGANGPLoss'}
    _OPTIONAL_LOSSES = ('fourier_opt', 'contrastive_opt')

    BASICSR_KEYS = BASICSR_TRAIN_KEYS

    @classmethod
    def from_opt(cls, train_opt: Optional[Mapping], owner: str = 'DARCOTModel') -> 'DARCOTTrainOptions':
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
            if value is None and key in cls._OPTIONAL_LOSSES:
                values[key] = None  # the term is off
            elif value is None:
                raise OptionError(f'train.{key} cannot be switched off (~): {owner} needs it; give '
                                  f'{{type: {default_type}}} or leave the key out for the default.')
            elif value != {}:
                values[key] = check_section(f'train.{key}', value, default_type)
        if 'sigma' in opt:
            values['sigma'] = check_number('train.sigma', opt['sigma'], 0)
        for key, choices in (('gp_mode', GP_MODES), ('potential_step', DARCOT_POTENTIAL_STEPS),
                             ('pairing', PAIRINGS), ('contrastive_labels', CONTRASTIVE_LABELS),
                             ('nonfinite', NONFINITE_POLICIES)):
            if key in opt:
                values[key] = check_choice(f'train.{key}', opt[key], choices)
        for key in ('unpaired_contrastive', 'unpaired_shuffle'):
            if key in opt:
                values[key] = check_flag(f'train.{key}', opt[key])
        if 'potential_iters' in opt:
            values['potential_iters'] = check_integer('train.potential_iters', opt['potential_iters'], 1)
        if 'nonfinite_patience' in opt:
            values['nonfinite_patience'] = check_integer('train.nonfinite_patience', opt['nonfinite_patience'], 1)
        if opt.get('pairnum') is not None:
            values['pairnum'] = check_integer('train.pairnum', opt['pairnum'], 0)
        if values.get('pairing') == 'first_n' and values.get('pairnum') is None:
            raise OptionError('train.pairing is first_n but train.pairnum is not set; give the number of paired '
                              'samples per epoch (e.g. pairnum: 10000), or use pairing: paired / unpaired.')
        if values.get('pairnum') is not None and values.get('pairing') != 'first_n':
            raise OptionError(f'train.pairnum is set but train.pairing is {values.get("pairing", "paired")!r}; '
                              'pairnum counts paired samples for pairing: first_n only. Set that, or remove pairnum.')
        if opt.get('noise_sources') is not None:
            names = opt['noise_sources']
            if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
                raise OptionError(f'train.noise_sources must be a list of source names (those whose Fourier term is '
                                  f'the noise norm), got {show(names)}.')
            values['noise_sources'] = tuple(names)
        return cls(**values)
