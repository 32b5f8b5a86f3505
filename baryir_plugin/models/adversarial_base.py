"""What BaryIRModel and DARCOTModel share: a restoration network ``net_g`` trained against a potential
``net_potential`` with two optimizers, on all-in-one data whose samples carry a source and a fine
degradation id.

:class:`AdversarialOTModel` holds the common parts: the train/val options read once (each model names
its own :attr:`train_options_class`), the speed options, the two optimizers, source statistics of the
training data, the interval log with each source's mean potential, the non-finite guard, test-time
self-ensemble, validation with reports (:class:`BaryIRValidation`), and saving/resuming the complete
training state (both networks, both optimizers, schedulers, iteration, random states of every rank).
The models add their losses and the order of their steps.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.distributed as dist
from basicsr.data import build_dataset
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import DATASET_REGISTRY

from baryir_plugin.checkpoints import nonfinite_tensors
from baryir_plugin.compat import atomic_torch_save
from baryir_plugin.errors import CheckpointError, TrainingError

from .numerics import NonFiniteGuard
from .options import BaryIRValOptions
from .rng_state import capture_rng_state, restore_rng_state
from .training_speed import IntervalLog, TrainingSpeed, check_optimizer_options
from .validation import BaryIRValidation


def dihedral_ensemble(net: torch.nn.Module, x: torch.Tensor,
                      memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Test-time self-ensemble: the mean of ``net`` over the 8 rotations and flips of ``x`` (N, C, H, W),
    each output mapped back to the input's orientation. One view at a time, so peak memory is that of a
    single forward; the result is invariant to rotating or flipping the input (for any ``net``)."""
    total = None
    for k in range(8):
        view = torch.rot90(x, k % 4, dims=(-2, -1))
        if k >= 4:
            view = view.flip(-1)
        y = net(view.contiguous(memory_format=memory_format))
        if k >= 4:
            y = y.flip(-1)
        y = torch.rot90(y, -(k % 4), dims=(-2, -1))
        total = y if total is None else total + y
    return total / 8


class AdversarialOTModel(BaryIRValidation, SRModel):
    """Base of the two-network optimal-transport models (not registered itself).

    Subclasses set :attr:`train_options_class` (a dataclass with ``from_opt(train_opt, owner)``) and
    build ``self.net_potential`` in ``init_training_settings``, then call :meth:`_adversarial_settings`
    after SRModel's ``init_training_settings``.
    """

    train_options_class: ClassVar[type]
    # what `basicsr train` suggests when network_potential is missing
    potential_example: ClassVar[str] = 'type: BarycenterPotentials, num_potentials: <number of sources>, ...'

    def __init__(self, opt: dict) -> None:
        is_train = opt.get('is_train', True)
        owner = type(self).__name__
        self.val_options = BaryIRValOptions.from_opt(opt.get('val'), is_train, owner=owner)
        # read before SRModel.__init__, which calls init_training_settings
        self.train_options = self.train_options_class.from_opt(opt.get('train'), owner=owner) if is_train else None
        device = torch.device('cuda' if opt.get('num_gpu', 0) != 0 else 'cpu')  # as BaseModel decides
        if not is_train and self.val_options.channels_last:
            opt['use_channels_last'] = True  # the test-time spelling of the same option
        self.speed = TrainingSpeed(opt, device, is_train=is_train)
        super().__init__(opt)  # builds net_g through model_to_device, so the speed options apply there
        metric_names = list(self.val_options.metrics)
        for entry in (opt.get('datasets') or {}).values():  # checked here, not hours later at that set's turn
            self._dataset_metrics(entry, metric_names)
        self.set_average = self._set_average(opt, self.is_train)

    def model_to_device(self, net: torch.nn.Module, checkpoint_stages: bool = True) -> torch.nn.Module:
        """BasicSR's move to the device and DDP wrapping, with the memory format, checkpointing (of the
        restoration network, in training) and compilation applied to the bare network first."""
        net = self.speed.prepare(net.to(self.device), checkpoint_stages=checkpoint_stages and self.is_train)
        return super().model_to_device(net)

    def _adversarial_settings(self, logger) -> None:
        """After SRModel's init_training_settings (EMA, pixel loss, optimizers, schedulers): loss scalers,
        the non-finite guard and the interval log."""
        self.net_potential.train()
        if hasattr(self, 'net_g_ema'):
            self.net_g_ema.to(memory_format=self.speed.memory_format)
        # one GradScaler per optimizer (fp16 only), in the order of self.optimizers
        self.scalers = [self.speed.grad_scaler() for _ in self.optimizers]
        options = self.train_options
        self.guard = NonFiniteGuard(options.nonfinite, options.nonfinite_patience, self.opt['path'].get('models'),
                                    distributed=bool(self.opt['dist']), logger=logger)
        self.interval_log = IntervalLog()
        self.log_dict = OrderedDict()
        self._source_stats_acc = torch.zeros(2 * len(self.source_names), device=self.device)
        if not hasattr(self, 'potential_means'):
            self.potential_means = torch.full((len(self.source_names),), float('nan'), device=self.device)

    def _source_stats(self) -> tuple[list[str], list[int], list[str]]:
        """Source names, per-source counts and fine degradation names of the training data."""
        data_opt = self.opt['datasets'].get('train')
        if data_opt is not None and getattr(DATASET_REGISTRY.get(data_opt['type']), 'provides_sources', False):
            dataset = build_dataset(data_opt)  # options are deep-copied; only file lists are read
            self.train_set_size = len(dataset)
            return list(dataset.source_names), list(dataset.source_counts), list(dataset.degradation_names)
        get_root_logger().warning(f'{type(self).__name__}: the training dataset ({(data_opt or {}).get("type")}) has '
                                  'no degradation sources; treating all data as one source.')
        self.train_set_size = None
        return ['all'], [1], ['all']

    # ------------------------------------------------------------------------------------------------
    def setup_optimizers(self) -> None:
        for key, net in (('optim_g', self.net_g), ('optim_potential', self.net_potential)):
            cfg = dict(getattr(self.train_options, key))
            optim_type = cfg.pop('type')
            cls = getattr(torch.optim, str(optim_type), None)
            if isinstance(cls, type):
                check_optimizer_options(key, cfg, cls)
            params = [p for p in net.parameters() if p.requires_grad]
            optimizer = self.get_optimizer(optim_type, params, **cfg)
            setattr(self, 'optimizer_g' if key == 'optim_g' else 'optimizer_potential', optimizer)
            self.optimizers.append(optimizer)  # order = order in the training state: [g, potential]

    def get_current_learning_rate(self) -> list[float]:
        return [group['lr'] for opt in self.optimizers for group in opt.param_groups]

    def feed_data(self, data: dict) -> None:
        super().feed_data(data)
        self.lq = self.speed.layout(self.lq)
        if hasattr(self, 'gt'):
            self.gt = self.speed.layout(self.gt)
        b = self.lq.shape[0]
        if 'source_id' in data:
            self.source_id = data['source_id'].to(self.device).long().view(b)
            self.degradation_id = data.get('degradation_id', data['source_id']).to(self.device).long().view(b)
        else:
            self.source_id = torch.zeros(b, dtype=torch.long, device=self.device)
            self.degradation_id = self.source_id

    def test(self) -> None:
        """SRModel's test (the EMA network when there is one); with ``val.self_ensemble`` the network's mean
        over the 8 dihedral views. A compiled network validates eagerly: compiling again for every
        validation image size would cost more than it saves."""
        net = getattr(self, 'net_g_ema', self.net_g)
        was_training = net.training
        net.eval()
        forward = self.get_bare_model(net).forward if self.speed.compile else net
        with torch.no_grad():
            if self.val_options.self_ensemble:
                self.output = dihedral_ensemble(forward, self.lq, self.speed.memory_format)
            else:
                self.output = forward(self.lq)
        net.train(was_training)

    def _set_potential_grad(self, flag: bool) -> None:
        for p in self.net_potential.parameters():
            p.requires_grad_(flag)

    def get_current_log(self) -> 'OrderedDict[str, float]':
        """The mean of every loss term since the last log line (over all ranks under DDP), and each
        source's mean potential on its own samples of that interval (``f_<source>``; a source with no
        sample in it keeps its previous value, ``nan`` before its first); with fp16, each optimizer's
        current loss scale (``loss_scale_g``, ``loss_scale_potential``)."""
        if self.interval_log:
            losses = OrderedDict(self.interval_log.pop_means())
            stats = self._source_stats_acc
            if self.opt['dist'] and dist.is_initialized():
                dist.all_reduce(stats)
            k = len(self.source_names)
            sums, counts = stats[:k], stats[k:]
            self.potential_means = torch.where(counts > 0, sums / counts.clamp(min=1), self.potential_means)
            self._source_stats_acc = torch.zeros_like(stats)
            for i, name in enumerate(self.source_names):
                losses[f'f_{name}'] = self.potential_means[i]
            for name, scaler in zip(('g', 'potential'), self.scalers):  # fp16: a scale that keeps falling
                if scaler is not None:  # means overflowing gradients (each halving skipped a step)
                    losses[f'loss_scale_{name}'] = torch.tensor(scaler.get_scale(), device=self.device)
            self.log_dict = self.reduce_loss_dict(losses)
        return self.log_dict

    # ------------------------------------------------------------------------------------------------
    def save(self, epoch: int, current_iter: int) -> None:
        """The networks and the training state of this iteration, all of them or (when a network's weights
        hold NaN/inf) none: the previous complete set stays the one to resume from."""
        self._rng_states = self._gather_rng_states()  # collective: every rank calls save()
        nets = [('net_g', self.net_g), ('net_potential', self.net_potential)]
        if hasattr(self, 'net_g_ema'):
            nets.append(('net_g_ema', self.net_g_ema))
        label = 'latest' if current_iter == -1 else current_iter
        bad = [name for name, net in nets if nonfinite_tensors(self.get_bare_model(net).state_dict().values())]
        why = None
        if bad:
            why = f'the weights of {", ".join(bad)} hold NaN/inf'
        elif self.is_train and self.guard.diverging:
            why = f'the last {self.guard.consecutive} iteration(s) skipped non-finite steps'
        if why is not None:
            get_root_logger().error(f'Not saving iteration {label} (net_g_{label}.pth and the rest): {why}; the '
                                    'previous checkpoints are kept.')
            if current_iter == -1:  # the end of training: a run whose result was refused must not end as a success
                last = self.guard.last_finite if self.is_train else None
                raise TrainingError(f'training ended, but net_g_latest.pth was not saved: {why}. '
                                    + (f'The last checkpoint saved is {last[1]} (iteration {last[0]}).' if last else
                                       'No checkpoint was saved.')
                                    + ' Lower the learning rate (train.optim_*.lr) or check the data for extreme '
                                    'values.')
            return
        if hasattr(self, 'net_g_ema'):
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        self.save_network(self.net_potential, 'net_potential', current_iter)
        self.save_training_state(epoch, current_iter)
        if current_iter != -1:
            self.guard.saved(current_iter, os.path.join(self.opt['path']['models'], f'net_g_{current_iter}.pth'))

    def _gather_rng_states(self) -> list:
        state = capture_rng_state()
        if self.opt['dist'] and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return states
        return [state]

    @master_only
    def save_training_state(self, epoch: int, current_iter: int) -> None:
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter,
                 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers],
                 'rng': getattr(self, '_rng_states', None) or [capture_rng_state()],
                 'source_names': list(self.source_names),
                 'potential_means': self.potential_means.cpu(),
                 'manual_seed': self.opt.get('manual_seed'),
                 'scalers': [None if sc is None else sc.state_dict() for sc in self.scalers]}
        atomic_torch_save(state, os.path.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state: dict) -> None:
        saved = resume_state.get('source_names')
        if saved is not None and list(saved) != list(self.source_names):
            raise CheckpointError(f'resume: the training state was written for sources {saved}, but the data now '
                                  f'has {self.source_names}; the potentials would be mixed up. Keep the source list.')
        seed = resume_state.get('manual_seed')
        if seed is not None and seed != self.opt.get('manual_seed'):
            get_root_logger().warning(f'resume: the training state was written with manual_seed {seed}, this run has '
                                      f'{self.opt.get("manual_seed")}; the training samples after the resume will '
                                      'differ from an uninterrupted run. Set manual_seed to the saved value.')
        try:
            super().resume_training(resume_state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f'resume: the training state does not fit this model ({e}); resume with the options '
                                  'it was trained with.') from e
        scalers = resume_state.get('scalers') or [None] * len(self.scalers)
        for scaler, saved_scaler in zip(self.scalers, scalers):
            if scaler is not None and saved_scaler:
                scaler.load_state_dict(saved_scaler)
            elif scaler is not None:
                get_root_logger().warning('resume: the training state has no fp16 loss-scaler state (it was saved '
                                          'without fp16 use_amp); the scaler starts afresh.')
        if resume_state.get('potential_means') is not None:
            self.potential_means = resume_state['potential_means'].to(self.device, torch.float32)
        rng = resume_state.get('rng')
        if rng:
            rank = self.opt.get('rank', 0)
            if rank < len(rng):
                restore_rng_state(rng[rank])
            else:
                get_root_logger().warning(f'resume: no random state saved for rank {rank}; the data order of this '
                                          'rank will differ from an uninterrupted run.')

