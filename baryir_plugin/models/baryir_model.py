"""BaryIRModel: adversarial training of the restoration network against the barycenter potentials.

Per iteration (BaryIR journal, Alg. 1):
  1. potentials frozen: forward BaryIR, loss
       L1(restored, gt) + w * mean_i lambda_k(i) [c_i + gamma (o_i + ctr_i) - f_k(i)(zB_i)],
     step optimizer_g (restoration network, barycenter map and encoder together: no detach);
  2. network frozen: ``potential_iters`` updates of the potentials on barycenter latents, either
     recomputed with the updated network (reference) or reused from step 1 (one forward fewer); each
     update is the reference's two optimizer steps (the potential loss, then the congruence penalty with
     the potentials already updated) or one step on their sum.
The options are read once into ``self.train_options`` / ``self.val_options`` (``options.py``); speed
options (mixed precision, channels-last, torch.compile, activation checkpointing) live in
``training_speed.py``, validation and its per-image reports in ``validation.py``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.losses import build_loss
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

from baryir_plugin.checkpoints import nonfinite_tensors
from baryir_plugin.compat import atomic_torch_save
from baryir_plugin.errors import CheckpointError, OptionError, TrainingError
from baryir_plugin.losses import transport_cost

from .options import (CONGRUENCE_STEPS, LAMBDA_MODES, POTENTIAL_STEP_MODES, SAMPLE_WEIGHTINGS, BaryIRTrainOptions,
                      BaryIRValOptions)
from .numerics import NonFiniteGuard
from .rng_state import capture_rng_state, restore_rng_state
from .training_speed import IntervalLog, TrainingSpeed, check_optimizer_options, per_source_stats
from .validation import BaryIRValidation

__all__ = ['BaryIRModel', 'barycenter_weights', 'capture_rng_state', 'dihedral_ensemble', 'restore_rng_state',
           'CONGRUENCE_STEPS', 'LAMBDA_MODES', 'POTENTIAL_STEP_MODES', 'SAMPLE_WEIGHTINGS']


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


def barycenter_weights(counts: Sequence[int], mode: str = 'proportional') -> torch.Tensor:
    """lambda_k from per-source sample counts N_k (after repeats).

    ``proportional`` (the papers): N_k / sum N; ``inverse`` (the reference code): (1/N_k) / sum 1/N_j;
    ``uniform``: 1/K.
    """
    if mode not in LAMBDA_MODES:
        raise OptionError(f'train.lambda_mode must be one of {LAMBDA_MODES}, got {mode!r}.')
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if n.numel() == 0 or bool((n <= 0).any()):
        raise ValueError(f'barycenter weights need positive per-source counts, got {list(counts)}.')
    if mode == 'proportional':
        lam = n / n.sum()
    elif mode == 'inverse':
        lam = (1 / n) / (1 / n).sum()
    else:
        lam = torch.full_like(n, 1 / n.numel())
    return lam.float()


@MODEL_REGISTRY.register()
class BaryIRModel(BaryIRValidation, SRModel):
    """BasicSR model for BaryIR: ``network_g`` (BaryIR) and ``network_potential`` (BarycenterPotentials).

    ``train`` options, read once into ``self.train_options`` (:class:`BaryIRTrainOptions`; defaults = the
    reference):
        pixel_opt: restoration loss (e.g. L1Loss), as in SRModel.
        mwb_opt: {type: MWBLoss, cost: rms}; potential_opt: {type: PotentialLoss, congruence_weight: 10,
            congruence_on: batch}; irc_opt: {type: IRCLoss, tau: 0.07} (``~`` to disable);
            bro_opt: {type: BROLoss, power: 2} (``~`` to disable).
        barycenter_weight: w, 1e-4. The reference instead scales L1 by 1e4 with w = 1; the two give the same
            gradient direction but NOT the same RMSprop updates (its eps = 1e-8 is added to a gradient RMS
            that is 1e4x smaller here), so recipes that follow the reference write pixel_opt.loss_weight
            1e4 and barycenter_weight 1.
        gamma: weight of IRC and BRO inside the barycenter term, 0.05 (the reference's DDP trainer: 0.02).
        irc_labels: 'degradation' (fine labels, reference) or 'source'.
        lambda_mode: 'proportional' | 'inverse' | 'uniform'; lambdas: explicit list (overrides the mode).
        potential_iters: potential steps per iteration, 1.
        potential_step: 'recompute' (second forward with the updated network, reference) | 'reuse'.
        congruence_step: 'separate' (reference, default: an optimizer step on the potential loss, then,
            after zero_grad, a second step on the congruence penalty evaluated with the updated potentials)
            | 'joint' (one step on their sum).
        sample_weighting: 'lambda' (reference, default): sample i is weighted by lambda_k(i); batches are
            drawn from the source mixture (p_k = N_k / N), so source k's effective weight is p_k lambda_k.
            'importance': lambda_k(i) / p_k(i), an unbiased estimate of sum_k lambda_k E_k[...].
        checkpointing: activation checkpointing of the Restormer stages (``training_speed.py``).
        gather_embeddings: under DDP, contrast IRC/BRO over the all-gathered global batch (with gradients).
        optim_g, optim_potential: any torch.optim class; RMSprop(lr 1e-4, alpha 0.99, eps 1e-8) default;
            ``foreach: true`` / ``fused: true`` are passed on where torch offers them.
        scheduler, ema_decay, warmup_iter, total_iter: as in BasicSR (one scheduler per optimizer).
        nonfinite: 'skip' | 'stop' | 'ignore', what a non-finite loss or gradient does (default 'skip');
            nonfinite_patience: consecutive skipped iterations before training stops, 10.

    Top-level speed options (traiNNer-redux's names): use_amp, amp_bf16, use_channels_last, use_compile,
    compile_mode (``training_speed.py``).

    Without source labels in the data (any paired BasicSR dataset) everything is one source; IRC then
    has nothing to contrast and is skipped with a logged warning.
    """

    def __init__(self, opt: dict) -> None:
        is_train = opt.get('is_train', True)
        self.val_options = BaryIRValOptions.from_opt(opt.get('val'), is_train)
        # read before SRModel.__init__, which calls init_training_settings
        self.train_options = BaryIRTrainOptions.from_opt(opt.get('train')) if is_train else None
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

    def init_training_settings(self) -> None:
        options = self.train_options
        logger = get_root_logger()
        if 'network_potential' not in self.opt:
            raise OptionError('BaryIRModel needs a network_potential section (type: BarycenterPotentials) in the '
                              'option file.')
        bare_g = self.get_bare_model(self.net_g)
        if not getattr(bare_g, 'uses_barycenter', False):
            raise OptionError('BaryIRModel trains the barycenter map, but network_g has no barycenter latent '
                              f'(embedding_mode={getattr(bare_g, "embedding_mode", "?")!r}); train it with SRModel.')

        self.source_names, counts, degradation_names = self._source_stats()
        pot = build_network(self.opt['network_potential'])
        if pot.num_potentials != len(self.source_names):
            raise OptionError(f'network_potential.num_potentials is {pot.num_potentials} but the training data has '
                              f'{len(self.source_names)} source(s) {self.source_names}; make them equal.')
        if options.lambdas is not None:
            if len(options.lambdas) != len(self.source_names):
                raise OptionError(f'train.lambdas has {len(options.lambdas)} weights but the training data has '
                                  f'{len(self.source_names)} source(s) {self.source_names}; give one per source.')
            lam = torch.as_tensor(options.lambdas, dtype=torch.float32)
        else:
            lam = barycenter_weights(counts, options.lambda_mode)
        pot.set_lambdas(lam)
        self.net_potential = self.model_to_device(pot, checkpoint_stages=False)
        # each source's mean potential on its latest samples, for the log (NaN until a sample is seen)
        self.potential_means = torch.full((len(self.source_names),), float('nan'), device=self.device)
        load_path = self.opt['path'].get('pretrain_network_potential')
        if load_path is not None:
            self.load_network(self.net_potential, load_path, self.opt['path'].get('strict_load_potential', True),
                              self.opt['path'].get('param_key_potential', 'params'))
        # the data's lambdas win over any loaded buffer: the potentials are tied to this training set
        self.get_bare_model(self.net_potential).set_lambdas(lam)
        self.lambdas = lam.to(self.device)
        logger.info('Barycenter weights: ' + ', '.join(f'{n}={float(v):.4f}' for n, v in zip(self.source_names, lam)))
        # per-source weight of each sample: lambda_k, or lambda_k / p_k with p_k = N_k / N the probability
        # that a sample of the shuffled training set comes from source k
        share = torch.as_tensor(counts, dtype=torch.float64)
        share = (share / share.sum()).float()
        self.sample_weights = (lam if options.sample_weighting == 'lambda' else lam / share).to(self.device)

        self.cri_mwb = build_loss(options.mwb_opt).to(self.device)
        self.cri_potential = build_loss(options.potential_opt)
        if getattr(pot, 'congruence', 'penalty') == 'parameterized':
            self.cri_potential.congruence_weight = 0.0  # holds by construction
        self.cri_irc = None if options.irc_opt is None else build_loss(options.irc_opt)
        self.cri_bro = None if options.bro_opt is None else build_loss(options.bro_opt)
        if self.cri_irc is not None and max(len(self.source_names), len(degradation_names)) < 2:
            logger.warning('IRC loss skipped: the training data has a single source/degradation, so there is '
                           'nothing to contrast. Use AllInOneDataset with two or more sources to enable it.')
            self.cri_irc = None
        super().init_training_settings()  # EMA, pixel loss, optimizers, schedulers
        self.net_potential.train()
        if hasattr(self, 'net_g_ema'):
            self.net_g_ema.to(memory_format=self.speed.memory_format)
        # one GradScaler per optimizer (fp16 only), in the order of self.optimizers
        self.scalers = [self.speed.grad_scaler() for _ in self.optimizers]
        self.guard = NonFiniteGuard(options.nonfinite, options.nonfinite_patience, self.opt['path'].get('models'),
                                    distributed=bool(self.opt['dist']), logger=logger)
        self.interval_log = IntervalLog()
        self.log_dict = OrderedDict()
        self._source_stats_acc = torch.zeros(2 * len(self.source_names), device=self.device)

    def _source_stats(self) -> tuple[list[str], list[int], list[str]]:
        """Source names, per-source counts and fine degradation names of the training data."""
        data_opt = self.opt['datasets'].get('train')
        if data_opt is not None and getattr(DATASET_REGISTRY.get(data_opt['type']), 'provides_sources', False):
            dataset = build_dataset(data_opt)  # options are deep-copied; only file lists are read
            return list(dataset.source_names), list(dataset.source_counts), list(dataset.degradation_names)
        get_root_logger().warning(f'BaryIRModel: the training dataset ({(data_opt or {}).get("type")}) has no '
                                  'degradation sources; treating all data as one source.')
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

    def _gather(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """All-gather along the batch axis with gradients; returns the tensors and this rank's offset."""
        if not (self.train_options.gather_embeddings and self.opt['dist'] and dist.is_initialized()):
            return list(tensors), 0
        from torch.distributed.nn.functional import all_gather
        out = [torch.cat(all_gather(t.contiguous()), dim=0) for t in tensors]
        return out, dist.get_rank() * tensors[0].shape[0]

    def optimize_parameters(self, current_iter: int) -> None:
        losses = self.network_step()
        losses.update(self.potential_step(self._z_bary if self.train_options.potential_step == 'reuse' else None))
        if not self.guard.pending:  # an iteration with a skipped step is logged on its own, not in the means
            self.interval_log.add(losses)  # read (one host sync) at the logging interval: get_current_log
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        self.guard.end_iteration(current_iter)  # logs skipped steps; raises when training has diverged

    def get_current_log(self) -> 'OrderedDict[str, float]':
        """The mean of every loss term since the last log line (over all ranks under DDP), and each
        source's mean potential on its own samples of that interval (``f_<source>``; a source with no
        sample in it keeps its previous value, ``nan`` before its first)."""
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
            self.log_dict = self.reduce_loss_dict(losses)
        return self.log_dict

    def network_step(self) -> 'OrderedDict[str, torch.Tensor]':
        """Step 1: restoration network, barycenter map and encoder; the potentials are frozen."""
        self._set_potential_grad(False)  # and called outside DDP: the potentials get no gradient here
        self.optimizer_g.zero_grad(set_to_none=True)
        total, losses, (cost, potential, z_bary) = self.network_losses()
        taken = self.speed.step(total, self.optimizer_g, self.scalers[0], guard=self.guard)
        self._set_potential_grad(True)
        self._z_bary = z_bary.detach()
        losses['transport_cost'] = cost.mean()
        if taken:
            self._source_stats_acc += per_source_stats(potential, self.source_id, len(self.source_names))
        else:
            self.guard.record('network', losses)
        return OrderedDict((k, v.detach()) for k, v in losses.items())

    def network_losses(self) -> tuple[torch.Tensor, 'OrderedDict[str, torch.Tensor]', tuple]:
        """Forward and the restoration step's objective (under autocast with ``use_amp``), no backward:
        (total loss, the terms, (per-sample transport cost, own potential, z_bary))."""
        losses: OrderedDict[str, torch.Tensor] = OrderedDict()
        bare_pot = self.get_bare_model(self.net_potential)
        weight = self.sample_weights[self.source_id]  # (B,) lambda_k(i) [/ p_k(i)], a lookup by source index
        with self.speed.autocast():
            self.output, z, z_bary, residual = self.net_g(self.lq, return_latents=True)
            l_total = 0
            if self.cri_pix is not None:
                losses['l_pix'] = self.cri_pix(self.output, self.gt)
                l_total = l_total + losses['l_pix']
            if self.cri_perceptual is not None:
                l_percep, l_style = self.cri_perceptual(self.output, self.gt)
                for name, value in (('l_percep', l_percep), ('l_style', l_style)):
                    if value is not None:
                        losses[name] = value
                        l_total = l_total + value
            potential = bare_pot(z_bary, self.source_id)
            cost = transport_cost(z, z_bary, self.cri_mwb.cost)  # once, for the loss and the log
            l_bary = losses['l_mwb'] = self.cri_mwb.from_cost(cost, potential, weight)
            labels = self.degradation_id if self.train_options.irc_labels == 'degradation' else self.source_id
            (bank_s, bank_labels), offset = self._gather(residual, labels)
            if self.cri_irc is not None:
                losses['l_irc'] = self.cri_irc(residual, labels, weight, bank=bank_s, bank_labels=bank_labels,
                                               offset=offset)
                l_bary = l_bary + self.train_options.gamma * losses['l_irc']
            if self.cri_bro is not None:
                losses['l_bro'] = self.cri_bro(z_bary, residual, weight, bank=bank_s)
                l_bary = l_bary + self.train_options.gamma * losses['l_bro']
        return l_total + self.train_options.barycenter_weight * l_bary, losses, (cost, potential, z_bary)

    def potential_step(self, z_bary: Optional[torch.Tensor] = None) -> 'OrderedDict[str, torch.Tensor]':
        """Step 2: ``potential_iters`` updates of the potentials on barycenter latents, network frozen.

        ``z_bary=None`` recomputes them with the current network (the reference: one more forward).
        With ``congruence_step: separate`` (the reference) each update is two optimizer steps: the
        potential loss, then the congruence penalty with the potentials that step has just updated.
        """
        losses: OrderedDict[str, torch.Tensor] = OrderedDict()
        if not self.train_options.potential_iters:
            return losses
        if z_bary is None:
            with torch.no_grad(), self.speed.autocast():
                _, _, z_bary, _ = self.get_bare_model(self.net_g)(self.lq, return_latents=True)
        separate = self.train_options.congruence_step == 'separate' and self.cri_potential.congruence_weight
        # the reference's separate penalty looks at the last sample only; none of the batch is needed then
        z_congruence = z_bary[-1:] if self.cri_potential.congruence_on == 'last' else z_bary
        scaler = self.scalers[1]
        for _ in range(self.train_options.potential_iters):
            self.optimizer_potential.zero_grad(set_to_none=True)
            l_pot, congruence = self.potential_losses(z_bary, with_congruence=not separate)
            if not self.speed.step(l_pot, self.optimizer_potential, scaler, guard=self.guard):
                self.guard.record('potential', {'l_potential': l_pot})
            if separate:
                self.optimizer_potential.zero_grad(set_to_none=True)
                with self.speed.autocast():
                    congruence = self.get_bare_model(self.net_potential).congruence_of(self.net_potential(z_congruence))
                    l_congruence = self.cri_potential.penalty(congruence)
                if not self.speed.step(l_congruence, self.optimizer_potential, scaler, guard=self.guard):
                    self.guard.record('congruence', {'l_congruence': l_congruence})
                losses['l_congruence'] = l_congruence.detach()
        losses['l_potential'] = l_pot.detach()
        losses['congruence'] = congruence.detach().float().pow(2).mean()
        return losses

    def potential_losses(self, z_bary: torch.Tensor, with_congruence: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The potentials' loss on barycenter latents (under autocast with ``use_amp``), through DDP so that
        its gradients are all-reduced: (mean_i w_i f_k(i)(zB_i) [+ the congruence penalty], the congruence
        sum_k lambda_k f_k(zB_i) per sample)."""
        with self.speed.autocast():
            scores = self.net_potential(z_bary)  # (B, K)
            own = scores.gather(1, self.source_id.view(-1, 1)).squeeze(1)
            congruence = self.get_bare_model(self.net_potential).congruence_of(scores)
            loss = self.cri_potential(own, congruence if with_congruence else None,
                                      self.sample_weights[self.source_id])
        return loss, congruence

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
