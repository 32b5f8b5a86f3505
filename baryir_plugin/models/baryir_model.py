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
``training_speed.py``, validation and its per-image reports in ``validation.py``; what BaryIRModel shares
with DARCOTModel (optimizers, source statistics, log, saving and resuming) in ``adversarial_base.py``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from baryir_plugin.archs.potentials_arch import options_from_network
from baryir_plugin.errors import OptionError
from baryir_plugin.losses import transport_cost

from .adversarial_base import AdversarialOTModel, dihedral_ensemble
from .options import CONGRUENCE_STEPS, LAMBDA_MODES, POTENTIAL_STEP_MODES, SAMPLE_WEIGHTINGS, BaryIRTrainOptions
from .rng_state import capture_rng_state, restore_rng_state
from .training_speed import per_source_stats

__all__ = ['BaryIRModel', 'barycenter_weights', 'capture_rng_state', 'dihedral_ensemble', 'restore_rng_state',
           'CONGRUENCE_STEPS', 'LAMBDA_MODES', 'POTENTIAL_STEP_MODES', 'SAMPLE_WEIGHTINGS']


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
class BaryIRModel(AdversarialOTModel):
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

    train_options_class = BaryIRTrainOptions

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
        pot = build_network(self._potential_options(bare_g))
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
        self._adversarial_settings(logger)  # loss scalers, non-finite guard, interval log

    def _potential_options(self, bare_g: torch.nn.Module) -> dict:
        """``network_potential`` with ``in_channels`` taken from the network's latent width where it is not
        given (any backbone), or checked against it where it is. The completed options are kept, so the
        potentials' checkpoints carry their width."""
        options = self.opt['network_potential']
        what = {'in_channels': 'channels', 'latent_stride': 'as its downscale factor'}
        for key, value in options_from_network(bare_g).items():
            given = options.get(key)
            if given is None:
                options[key] = value
            elif given != value:
                raise OptionError(f'network_potential.{key} is {given} but network_g\'s barycenter latent has {value} '
                                  f'{what[key]}; set {key}: {value} or leave it out (it follows network_g).')
        return options

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
