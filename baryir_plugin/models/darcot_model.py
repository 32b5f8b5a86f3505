"""DARCOTModel: DA-RCOT's transport map T trained against its image potential F (DA-RCOT, TPAMI 2025, Sec. 4).

Per iteration, in the reference's order:
  1. potential step (T frozen): L_F = -mean F(y) + mean F(T(x)), one optimizer step;
  2. gradient-penalty step: ``gp_weight`` * WGAN-GP on alpha y + (1 - alpha) T(x), a SECOND optimizer step
     (``gp_mode: summed`` makes 1-2 one step on their sum); ``potential_iters`` repeats 1-2;
  3. transport step (F frozen, differentiated through):
       L_T = -mean F(T(x)) + sigma [c(x - T(x)) + Fourier(x - T(x)) + ctr(e_dense)] + pixel loss,
     the pixel loss (Sigma * mean |T(x) - y|, BasicSR's ``pixel_opt``) and ctr only for paired iterations.
T(x) of steps 1-2 is a no-grad forward (``potential_step: recompute``) or the detached output of the one
forward that step 3 then back-propagates (``reuse``: one T forward fewer, the same values).
Everything shared with BaryIRModel (options read once, optimizers, source statistics, log, non-finite
guard, validation, saving and resuming) is in ``adversarial_base.py``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.distributed as dist
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from baryir_plugin.errors import OptionError

from .adversarial_base import AdversarialOTModel
from .darcot_options import DARCOTTrainOptions
from .training_speed import per_source_stats

__all__ = ['DARCOTModel', 'default_noise_sources']


def default_noise_sources(source_names: list[str]) -> list[str]:
    """The sources whose Fourier term takes the noise norm when ``train.noise_sources`` is not given: those
    whose name says noise (``noise``, ``denoise_25``, ``gaussian_noise``, ...)."""
    return [name for name in source_names if 'noise' in name.lower()]


@MODEL_REGISTRY.register()
class DARCOTModel(AdversarialOTModel):
    """BasicSR model for DA-RCOT: ``network_g`` (DARCOT) and ``network_potential`` (DARCOTPotential).

    ``train`` options, read once into ``self.train_options`` (:class:`DARCOTTrainOptions`; defaults = the
    reference):
        pixel_opt: the paired term, BasicSR's L1Loss with loss_weight Sigma = 1e4 in the reference recipe.
        cost_opt: {type: FROTCostLoss, cost: batch_rms}; fourier_opt: {type: FourierResidualLoss,
            noise_norm: l2, other_norm: l1, reduction: sum} (``~`` off); contrastive_opt:
            {type: ResidualContrastiveLoss, mode: elementwise, tau: 0.07, loss_weight: 0.1} (``~`` off);
            gp_opt: {type: WGANGPLoss, loss_weight: 10}.
        sigma: weight of cost + Fourier + contrastive, 1.
        gp_mode: 'separate_step' (reference: the penalty is a second optimizer step of F) | 'summed'.
        potential_iters: updates of F (each one or two optimizer steps) per iteration, 1.
        potential_step: 'recompute' (reference) | 'reuse' (see the module docstring).
        pairing: 'paired' (default) | 'unpaired' (no pixel loss, no contrastive term) | 'first_n' (the
            reference's counter: the first ``pairnum`` samples of every epoch are paired).
        unpaired_contrastive: keep the contrastive term in unpaired iterations (the paper's "unpaired w/
            L_ctr"), false. unpaired_shuffle: in unpaired iterations F sees the batch's targets in a random
            order, so no target is its own input's (the paper shuffles the data set; within a batch only the
            gradient-penalty pairs change), false.
        contrastive_labels: 'degradation' (fine labels: three noise levels are three classes, reference)
            | 'source'.
        noise_sources: the sources whose Fourier term takes noise_norm (by name); default: those whose name
            contains 'noise'.
        optim_g, optim_potential: RMSprop with torch's defaults, lr 5e-5 for T and 1e-4 for F (lr_T = lr_F / 2);
            the scheduler (one per optimizer, the same gamma) keeps the ratio.
        scheduler, ema_decay, warmup_iter, total_iter: as in BasicSR.
        nonfinite, nonfinite_patience: as BaryIRModel.

    Top-level speed options: use_amp, amp_bf16, use_channels_last, use_compile, compile_mode; the gradient
    penalty always runs in float32.
    """

    train_options_class = DARCOTTrainOptions
    potential_example = 'type: DARCOTPotential, patch_size: <datasets.train.gt_size>'

    def init_training_settings(self) -> None:
        options = self.train_options
        logger = get_root_logger()
        if 'network_potential' not in self.opt:
            raise OptionError('DARCOTModel needs a network_potential section (type: DARCOTPotential) in the option '
                              'file.')
        bare_g = self.get_bare_model(self.net_g)
        if not hasattr(bare_g, 'residual_embeddings'):
            raise OptionError(f'DARCOTModel trains the two-pass transport map, but network_g is '
                              f'{type(bare_g).__name__}; use network_g type: DARCOT (or train it with SRModel).')
        if options.contrastive_opt is not None and bare_g.condition == 'none':
            raise OptionError("train.contrastive_opt needs the residual embedding, but network_g.condition is 'none' "
                              '(no second pass); set contrastive_opt: ~ or another condition.')

        self.source_names, counts, degradation_names = self._source_stats()
        noise = list(options.noise_sources) if options.noise_sources is not None else \
            default_noise_sources(self.source_names)
        unknown = [n for n in noise if n not in self.source_names]
        if unknown:
            raise OptionError(f'train.noise_sources: {unknown} are not sources of the training data '
                              f'{self.source_names}; name sources of datasets.train.sources.')
        self.is_noise_source = torch.tensor([n in noise for n in self.source_names], device=self.device)
        if options.fourier_opt is not None:
            logger.info('Fourier residual term: noise norm for ' + (', '.join(noise) or 'no source')
                        + '; the other norm for the rest.')

        pot = build_network(self.opt['network_potential'])
        self._check_potential_crop(pot)
        self.net_potential = self.model_to_device(pot, checkpoint_stages=False)
        load_path = self.opt['path'].get('pretrain_network_potential')
        if load_path is not None:
            self.load_network(self.net_potential, load_path, self.opt['path'].get('strict_load_potential', True),
                              self.opt['path'].get('param_key_potential', 'params'))
        self.potential_means = torch.full((len(self.source_names),), float('nan'), device=self.device)

        self.cri_cost = build_loss(options.cost_opt)
        self.cri_fourier = None if options.fourier_opt is None else build_loss(options.fourier_opt)
        self.cri_ctr = None if options.contrastive_opt is None else build_loss(options.contrastive_opt)
        self.cri_gp = build_loss(options.gp_opt)
        if self.cri_ctr is not None and max(len(self.source_names), len(degradation_names)) < 2:
            logger.warning('Contrastive term skipped: the training data has a single source/degradation, so there '
                           'is nothing to contrast. Use AllInOneDataset with two or more sources to enable it.')
            self.cri_ctr = None
        self.paired_iters_per_epoch = self._paired_iters_per_epoch()
        super().init_training_settings()  # EMA, pixel loss, optimizers, schedulers
        self._adversarial_settings(logger)

    def _check_potential_crop(self, pot: torch.nn.Module) -> None:
        """A potential of the reference layout scores patch_size crops only: the training crop must be it."""
        crop = (self.opt['datasets'].get('train') or {}).get('gt_size')
        if getattr(pot, 'pool', None) is None and crop is not None and crop != getattr(pot, 'patch_size', crop):
            raise OptionError(f'network_potential.patch_size is {pot.patch_size} but datasets.train.gt_size is {crop}; '
                              'the potential scores training crops, so make them equal (a multiple of 32), or set '
                              'network_potential.pool_size (e.g. 1) to accept any crop size.')

    def _paired_iters_per_epoch(self) -> Optional[tuple[int, int]]:
        """For ``pairing: first_n``: (iterations per epoch, paired iterations at its start), as BasicSR's loader
        runs them (each rank draws ceil(N * enlarge / world) samples, drop_last batches)."""
        options = self.train_options
        if options.pairing != 'first_n':
            return None
        data_opt = self.opt['datasets']['train']
        size = self.train_set_size if self.train_set_size is not None else len(build_dataset(data_opt))
        world = self.opt.get('world_size', 1) or 1
        batch = data_opt['batch_size_per_gpu']
        per_epoch = max(math.ceil(size * data_opt.get('dataset_enlarge_ratio', 1) / world) // batch, 1)
        return per_epoch, options.pairnum // (batch * world)

    def is_paired(self, current_iter: int) -> bool:
        """Whether iteration ``current_iter`` (1-based, BasicSR's count) takes the paired loss."""
        pairing = self.train_options.pairing
        if pairing != 'first_n':
            return pairing == 'paired'
        per_epoch, paired = self.paired_iters_per_epoch
        return (current_iter - 1) % per_epoch < paired

    # ------------------------------------------------------------------------------------------------
    def optimize_parameters(self, current_iter: int) -> None:
        paired = self.is_paired(current_iter)
        forward = None
        if self.train_options.potential_step == 'reuse':
            with self.speed.autocast():
                forward = self.net_g(self.lq, return_intermediates=True)
        losses = self.potential_step(None if forward is None else forward[0].detach(), paired)
        losses.update(self.transport_step(paired, forward))
        if not self.guard.pending:  # an iteration with a skipped step is logged on its own, not in the means
            self.interval_log.add(losses)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        self.guard.end_iteration(current_iter)

    def potential_targets(self, paired: bool) -> torch.Tensor:
        """The clean images F scores as real: the batch's own, or shuffled in unpaired iterations."""
        if paired or not self.train_options.unpaired_shuffle or self.gt.shape[0] < 2:
            return self.gt
        return self.gt[torch.randperm(self.gt.shape[0], device=self.gt.device)]

    def potential_step(self, restored: Optional[torch.Tensor] = None,
                       paired: bool = True) -> 'OrderedDict[str, torch.Tensor]':
        """Steps 1-2: ``potential_iters`` updates of F on (y, T(x)); T(x) from a no-grad forward when
        ``restored`` is None."""
        losses: OrderedDict[str, torch.Tensor] = OrderedDict()
        if restored is None:
            with torch.no_grad(), self.speed.autocast():
                restored = self.get_bare_model(self.net_g)(self.lq)
        real, fake = self.potential_targets(paired), restored.detach()
        bare_pot = self.get_bare_model(self.net_potential)
        summed = self.train_options.gp_mode == 'summed'
        for _ in range(self.train_options.potential_iters):
            self.optimizer_potential.zero_grad(set_to_none=True)
            with self.speed.autocast():
                f_real, f_fake = self.net_potential(real), self.net_potential(fake)
                l_critic = f_fake.float().mean() - f_real.float().mean()
            loss = l_critic
            if summed:  # one backward through DDP's forward and the bare penalty: all gradients reduced together
                l_gp, norms = self.cri_gp(bare_pot, real, fake)
                loss = l_critic + l_gp
            if not self.speed.step(loss, self.optimizer_potential, self.scalers[1], guard=self.guard):
                self.guard.record('potential', {'l_critic': l_critic})
            if not summed:
                self.optimizer_potential.zero_grad(set_to_none=True)
                # the bare network: the penalty leaves fc2.bias without a gradient, which DDP's reducer would
                # wait for; the gradients are averaged over the ranks by hand instead
                l_gp, norms = self.cri_gp(bare_pot, real, fake)
                if not self._synced_step(l_gp, self.optimizer_potential, bare_pot):
                    self.guard.record('gradient penalty', {'l_gp': l_gp})
        losses['l_critic'] = l_critic.detach()
        losses['l_gp'] = l_gp.detach()
        losses['gp_grad_norm'] = norms.detach().mean()
        losses['f_target'] = f_real.detach().float().mean()
        return losses

    def _synced_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, net: torch.nn.Module) -> bool:
        """backward, the gradients averaged over DDP ranks (those that exist: None stays None), the non-finite
        check, the step. Float32, no loss scaling."""
        loss.backward()
        if self.opt['dist'] and dist.is_initialized():
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
        if self.guard.active and not self.guard.finite(loss, optimizer):
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        return True

    def transport_step(self, paired: bool = True, forward: Optional[tuple] = None) -> 'OrderedDict[str, torch.Tensor]':
        """Step 3: T on L_T, F frozen; ``forward``: the output of ``net_g(lq, return_intermediates=True)``
        when it was computed already."""
        self._set_potential_grad(False)  # and called outside DDP: F gets no gradient here
        self.optimizer_g.zero_grad(set_to_none=True)
        total, losses, scores = self.transport_losses(paired, forward)
        taken = self.speed.step(total, self.optimizer_g, self.scalers[0], guard=self.guard)
        self._set_potential_grad(True)
        if taken:
            self._source_stats_acc += per_source_stats(scores, self.source_id, len(self.source_names))
        else:
            self.guard.record('transport', losses)
        return OrderedDict((k, v.detach()) for k, v in losses.items())

    def transport_losses(self, paired: bool = True, forward: Optional[tuple] = None
                         ) -> tuple[torch.Tensor, 'OrderedDict[str, torch.Tensor]', torch.Tensor]:
        """Forward (unless given) and L_T, no backward: (total, the terms, F(T(x)) per sample)."""
        options = self.train_options
        losses: OrderedDict[str, torch.Tensor] = OrderedDict()
        with self.speed.autocast():
            if forward is None:
                forward = self.net_g(self.lq, return_intermediates=True)
            self.output, _, _, (e_dense, _, _) = forward
            residual = self.lq - self.output  # r = x - T(x)
            scores = self.get_bare_model(self.net_potential)(self.output).float()
            losses['l_transport'] = -scores.mean()
            bracket = losses['l_cost'] = self.cri_cost(residual)
            if self.cri_fourier is not None:
                losses['l_fourier'] = self.cri_fourier(residual, self.is_noise_source[self.source_id])
                bracket = bracket + losses['l_fourier']
            if self.cri_ctr is not None and (paired or options.unpaired_contrastive):
                labels = self.degradation_id if options.contrastive_labels == 'degradation' else self.source_id
                losses['l_ctr'] = self.cri_ctr(e_dense, labels)
                bracket = bracket + losses['l_ctr']
            total = losses['l_transport'] + options.sigma * bracket
            if paired:
                if self.cri_pix is not None:
                    losses['l_pix'] = self.cri_pix(self.output, self.gt)
                    total = total + losses['l_pix']
                if self.cri_perceptual is not None:
                    l_percep, l_style = self.cri_perceptual(self.output, self.gt)
                    for name, value in (('l_percep', l_percep), ('l_style', l_style)):
                        if value is not None:
                            losses[name] = value
                            total = total + value
        return total, losses, scores
