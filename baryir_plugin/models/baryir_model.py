"""BaryIRModel: adversarial training of the restoration network against the barycenter potentials.

Per iteration (BaryIR journal, Alg. 1):
  1. potentials frozen: forward BaryIR, loss
       L1(restored, gt) + w * mean_i lambda_k(i) [c_i + gamma (o_i + ctr_i) - f_k(i)(zB_i)],
     step optimizer_g (restoration network, barycenter map and encoder together: no detach);
  2. network frozen: ``potential_iters`` updates of the potentials on barycenter latents, either
     recomputed with the updated network (reference) or reused from step 1 (one forward fewer); each
     update is the reference's two optimizer steps (the potential loss, then the congruence penalty with
     the potentials already updated) or one step on their sum.
Speed options (mixed precision, channels-last, torch.compile, activation checkpointing) live in
``training_speed.py``.
"""
from __future__ import annotations

import os
import os.path as osp
import random
import time
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

from baryir_plugin.compat import atomic_torch_save
from baryir_plugin.losses import transport_cost

from .training_speed import IntervalLog, TrainingSpeed, check_optimizer_options, per_source_stats

from .validation_report import SetAverage, ValidationReport, metric_needs_reference

LAMBDA_MODES = ('proportional', 'inverse', 'uniform')
POTENTIAL_STEP_MODES = ('recompute', 'reuse')
CONGRUENCE_STEPS = ('separate', 'joint')
SAMPLE_WEIGHTINGS = ('lambda', 'importance')
_RMSPROP = {'type': 'RMSprop', 'lr': 1e-4, 'alpha': 0.99, 'eps': 1e-8}


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
        raise ValueError(f'train.lambda_mode must be one of {LAMBDA_MODES}, got {mode!r}.')
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


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) random states, as objects torch.load(weights_only) accepts."""
    np_state = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


@MODEL_REGISTRY.register()
class BaryIRModel(SRModel):
    """BasicSR model for BaryIR: ``network_g`` (BaryIR) and ``network_potential`` (BarycenterPotentials).

    ``train`` options, read once here (defaults = the reference):
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

    Top-level speed options (traiNNer-redux's names): use_amp, amp_bf16, use_channels_last, use_compile,
    compile_mode (``training_speed.py``).

    Without source labels in the data (any paired BasicSR dataset) everything is one source; IRC then
    has nothing to contrast and is skipped with a logged warning.
    """

    def __init__(self, opt: dict) -> None:
        device = torch.device('cuda' if opt.get('num_gpu', 0) != 0 else 'cpu')  # as BaseModel decides
        if not opt.get('is_train', True) and (opt.get('val') or {}).get('channels_last', False):
            opt['use_channels_last'] = True  # the test-time spelling of the same option
        self.speed = TrainingSpeed(opt, device, is_train=opt.get('is_train', True))
        super().__init__(opt)  # builds net_g through model_to_device, so the speed options apply there
        self.self_ensemble = (opt.get('val') or {}).get('self_ensemble', False)
        if not isinstance(self.self_ensemble, bool):
            raise ValueError(f'val.self_ensemble must be true or false, got {self.self_ensemble!r}.')
        metric_names = list((opt.get('val') or {}).get('metrics') or {})
        for entry in (opt.get('datasets') or {}).values():  # checked here, not hours later at that set's turn
            self._dataset_metrics(entry, metric_names)
        self.set_average = self._set_average(opt, self.is_train)

    @staticmethod
    def _set_average(opt: dict, is_train: bool) -> Optional[SetAverage]:
        """The ``val.average`` option: which evaluation sets the logged average is taken over."""
        names = []
        for key, entry in (opt.get('datasets') or {}).items():
            # training validates the 'val' entries; `basicsr test` evaluates every entry
            if not is_train or entry.get('phase', key.split('_')[0]) == 'val':
                names.append(entry.get('name'))
        names = list(dict.fromkeys(names))  # two entries of one name report (and average) as one set
        choice = (opt.get('val') or {}).get('average')
        if choice is None:
            choice = len(names) >= 2
        if choice is False:
            return None
        if choice is True:
            chosen = names
        elif isinstance(choice, (list, tuple)) and choice and all(isinstance(n, str) for n in choice):
            unknown = [n for n in choice if n not in names]
            if unknown:
                raise ValueError(f'val.average: {unknown} are not evaluation sets of this file ({names}); '
                                 'list dataset names, or write true (all sets) or false (no average).')
            chosen = list(dict.fromkeys(choice))
        else:
            raise ValueError(f'val.average must be true, false or a list of dataset names, got {choice!r}.')
        if 'average' in names:
            raise ValueError("a dataset is named 'average', the name the average over sets is logged and "
                             'reported under; rename the dataset, or set val.average: false.')
        return SetAverage(chosen) if chosen else None

    @staticmethod
    def _dataset_metrics(dataset_opt: dict, metric_names: Sequence[str]) -> list[str]:
        """The val.metrics names a dataset entry asks for (its ``metrics`` list; default all of them)."""
        only = dataset_opt.get('metrics')
        if only is None:
            return list(metric_names)
        unknown = [m for m in only if m not in metric_names]
        if unknown:
            raise ValueError(f'dataset {dataset_opt.get("name")}: metrics {unknown} are not defined under val.metrics '
                             f'({list(metric_names)}); define them there or drop them from the dataset entry.')
        return list(only)

    def model_to_device(self, net: torch.nn.Module, checkpoint_stages: bool = True) -> torch.nn.Module:
        """BasicSR's move to the device and DDP wrapping, with the memory format, checkpointing (of the
        restoration network, in training) and compilation applied to the bare network first."""
        net = self.speed.prepare(net.to(self.device), checkpoint_stages=checkpoint_stages and self.is_train)
        return super().model_to_device(net)

    def init_training_settings(self) -> None:
        train_opt = self.opt['train']
        logger = get_root_logger()
        if 'network_potential' not in self.opt:
            raise KeyError('BaryIRModel needs a `network_potential` entry (type: BarycenterPotentials) in the YAML.')
        bare_g = self.get_bare_model(self.net_g)
        if not getattr(bare_g, 'uses_barycenter', False):
            raise ValueError('BaryIRModel trains the barycenter map, but network_g has no barycenter latent '
                             f'(embedding_mode={getattr(bare_g, "embedding_mode", "?")!r}); train it with SRModel.')

        self.source_names, counts, degradation_names = self._source_stats()
        pot = build_network(self.opt['network_potential'])
        if pot.num_potentials != len(self.source_names):
            raise ValueError(f'network_potential.num_potentials is {pot.num_potentials} but the training data has '
                             f'{len(self.source_names)} source(s) {self.source_names}; make them equal.')
        if train_opt.get('lambdas') is not None:
            lam = torch.as_tensor(train_opt['lambdas'], dtype=torch.float32)
        else:
            lam = barycenter_weights(counts, train_opt.get('lambda_mode', 'proportional'))
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
        self.sample_weighting = train_opt.get('sample_weighting', 'lambda')
        if self.sample_weighting not in SAMPLE_WEIGHTINGS:
            raise ValueError(f'train.sample_weighting must be one of {SAMPLE_WEIGHTINGS}, '
                             f'got {self.sample_weighting!r}.')
        # per-source weight of each sample: lambda_k, or lambda_k / p_k with p_k = N_k / N the probability
        # that a sample of the shuffled training set comes from source k
        share = torch.as_tensor(counts, dtype=torch.float64)
        share = (share / share.sum()).float()
        self.sample_weights = (lam if self.sample_weighting == 'lambda' else lam / share).to(self.device)
        self.congruence_step = train_opt.get('congruence_step', 'separate')
        if self.congruence_step not in CONGRUENCE_STEPS:
            raise ValueError(f'train.congruence_step must be one of {CONGRUENCE_STEPS}, got {self.congruence_step!r}.')

        self.barycenter_weight = float(train_opt.get('barycenter_weight', 1e-4))
        self.gamma = float(train_opt.get('gamma', 0.05))
        self.potential_iters = int(train_opt.get('potential_iters', 1))
        if self.potential_iters < 0:
            raise ValueError(f'train.potential_iters must be >= 0, got {self.potential_iters}.')
        self.potential_step_mode = train_opt.get('potential_step', 'recompute')
        if self.potential_step_mode not in POTENTIAL_STEP_MODES:
            raise ValueError(f'train.potential_step must be one of {POTENTIAL_STEP_MODES}, '
                             f'got {self.potential_step_mode!r}.')
        self.irc_labels = train_opt.get('irc_labels', 'degradation')
        if self.irc_labels not in ('degradation', 'source'):
            raise ValueError(f"train.irc_labels must be 'degradation' or 'source', got {self.irc_labels!r}.")
        self.gather_embeddings = bool(train_opt.get('gather_embeddings', False))

        self.cri_mwb = build_loss(dict(train_opt.get('mwb_opt') or {'type': 'MWBLoss'})).to(self.device)
        self.cri_potential = build_loss(dict(train_opt.get('potential_opt') or {'type': 'PotentialLoss'}))
        if getattr(pot, 'congruence', 'penalty') == 'parameterized':
            self.cri_potential.congruence_weight = 0.0  # holds by construction
        self.cri_irc = self._optional_loss(train_opt, 'irc_opt', 'IRCLoss')
        self.cri_bro = self._optional_loss(train_opt, 'bro_opt', 'BROLoss')
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
        self.interval_log = IntervalLog()
        self.log_dict = OrderedDict()
        self._source_stats_acc = torch.zeros(2 * len(self.source_names), device=self.device)

    @staticmethod
    def _optional_loss(train_opt: dict, key: str, default_type: str):
        if key in train_opt and train_opt[key] is None:
            return None
        return build_loss(dict(train_opt.get(key) or {'type': default_type}))

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
        train_opt = self.opt['train']
        for key, net in (('optim_g', self.net_g), ('optim_potential', self.net_potential)):
            cfg = dict(train_opt.get(key) or _RMSPROP)
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
            if self.self_ensemble:
                self.output = dihedral_ensemble(forward, self.lq, self.speed.memory_format)
            else:
                self.output = forward(self.lq)
        net.train(was_training)

    def _set_potential_grad(self, flag: bool) -> None:
        for p in self.net_potential.parameters():
            p.requires_grad_(flag)

    def _gather(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """All-gather along the batch axis with gradients; returns the tensors and this rank's offset."""
        if not (self.gather_embeddings and self.opt['dist'] and dist.is_initialized()):
            return list(tensors), 0
        from torch.distributed.nn.functional import all_gather
        out = [torch.cat(all_gather(t.contiguous()), dim=0) for t in tensors]
        return out, dist.get_rank() * tensors[0].shape[0]

    def optimize_parameters(self, current_iter: int) -> None:
        losses = self.network_step()
        losses.update(self.potential_step(self._z_bary if self.potential_step_mode == 'reuse' else None))
        self.interval_log.add(losses)  # read (one host sync) at the logging interval: get_current_log
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

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
        self.speed.step(total, self.optimizer_g, self.scalers[0])
        self._set_potential_grad(True)
        self._z_bary = z_bary.detach()
        losses['transport_cost'] = cost.mean()
        self._source_stats_acc += per_source_stats(potential, self.source_id, len(self.source_names))
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
            labels = self.degradation_id if self.irc_labels == 'degradation' else self.source_id
            (bank_s, bank_labels), offset = self._gather(residual, labels)
            if self.cri_irc is not None:
                losses['l_irc'] = self.cri_irc(residual, labels, weight, bank=bank_s, bank_labels=bank_labels,
                                               offset=offset)
                l_bary = l_bary + self.gamma * losses['l_irc']
            if self.cri_bro is not None:
                losses['l_bro'] = self.cri_bro(z_bary, residual, weight, bank=bank_s)
                l_bary = l_bary + self.gamma * losses['l_bro']
        return l_total + self.barycenter_weight * l_bary, losses, (cost, potential, z_bary)

    def potential_step(self, z_bary: Optional[torch.Tensor] = None) -> 'OrderedDict[str, torch.Tensor]':
        """Step 2: ``potential_iters`` updates of the potentials on barycenter latents, network frozen.

        ``z_bary=None`` recomputes them with the current network (the reference: one more forward).
        With ``congruence_step: separate`` (the reference) each update is two optimizer steps: the
        potential loss, then the congruence penalty with the potentials that step has just updated.
        """
        losses: OrderedDict[str, torch.Tensor] = OrderedDict()
        if not self.potential_iters:
            return losses
        if z_bary is None:
            with torch.no_grad(), self.speed.autocast():
                _, _, z_bary, _ = self.get_bare_model(self.net_g)(self.lq, return_latents=True)
        separate = self.congruence_step == 'separate' and self.cri_potential.congruence_weight
        # the reference's separate penalty looks at the last sample only; none of the batch is needed then
        z_congruence = z_bary[-1:] if self.cri_potential.congruence_on == 'last' else z_bary
        scaler = self.scalers[1]
        for _ in range(self.potential_iters):
            self.optimizer_potential.zero_grad(set_to_none=True)
            l_pot, congruence = self.potential_losses(z_bary, with_congruence=not separate)
            self.speed.step(l_pot, self.optimizer_potential, scaler)
            if separate:
                self.optimizer_potential.zero_grad(set_to_none=True)
                with self.speed.autocast():
                    congruence = self.get_bare_model(self.net_potential).congruence_of(self.net_potential(z_congruence))
                    l_congruence = self.cri_potential.penalty(congruence)
                self.speed.step(l_congruence, self.optimizer_potential, scaler)
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
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """BasicSR's validation plus a per-image report (``val`` options, read here):

        report: write ``<set>.csv`` (one row per image) and ``<set>.json`` (means, the metric options that
            produced them, unavailable metrics and why, seconds per image) to ``results/<name>/metrics/``
            (test) or ``experiments/<name>/metrics/<set>_<iter>`` (training). Default: on in test, off in
            training.
        channels_last: (test mode) run the network in channels-last memory format, 1.5-1.8x faster on a
            CPU for the same output (to 1e-5; scripts/bench_inference.py). Default false.
        self_ensemble: restore with the mean over the 8 rotations and flips of the input (8 forwards per
            image, one at a time, so 8x the time at the memory of one; usually a higher PSNR). Applies to
            validation during training too. Default false.
        input_metrics: also score the degraded input (``input_<metric>`` columns: against the ground truth,
            or on its own for no-reference metrics; the baseline a restoration must beat). Default false.
        average: after the last set of a round, log each metric's mean over the sets' means (the "Average"
            column of all-in-one tables; with best value, TensorBoard tag ``metrics/average/<metric>``,
            the inputs' average with input_metrics, and ``average[_<iter>].json`` beside the set reports).
            A metric is averaged over the sets that report it, named in the log when not all do.
            true: all evaluation sets; a list: those dataset names; false: none. Default: true when there
            are two sets or more.
        metrics: as BasicSR. A dataset entry may list ``metrics: [psnr, niqe]`` (names of val.metrics,
            checked when the model is built) to compute only those on that set, e.g. no-reference metrics
            only where they are wanted. Full-reference metrics on a set without ground truth and metrics
            whose local weight files are missing are reported as unavailable (never as a number);
            no-reference metrics (calculate_niqe, calculate_piqe) need ``better: lower`` for the
            best-value tracking.
        """
        val_opt = self.opt['val']
        dataset_name = dataloader.dataset.opt['name']
        all_metrics = val_opt.get('metrics') or {}
        metric_opts = {m: all_metrics[m] for m in self._dataset_metrics(dataloader.dataset.opt, list(all_metrics))}
        write_report = bool(val_opt.get('report', not self.opt['is_train']))
        report = ValidationReport(dataset_name, metric_opts, with_input=bool(val_opt.get('input_metrics', False)))
        logger = get_root_logger()
        for val_data in dataloader:
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            start = time.perf_counter()
            self.test()
            seconds = time.perf_counter() - start
            visuals = self.get_current_visuals()
            restored = tensor2img([visuals['result']])
            gt = tensor2img([visuals['gt']]) if 'gt' in visuals else None
            lq = tensor2img([visuals['lq']]) if report.with_input else None
            for attr in ('lq', 'gt', 'output'):
                if hasattr(self, attr):
                    delattr(self, attr)
            if save_img:
                imwrite(restored, self._visualization_path(dataset_name, img_name, current_iter))
            values, input_values = {}, {}
            for name, opt_ in metric_opts.items():
                if not report.available(name):
                    continue
                if gt is None and metric_needs_reference(opt_):
                    report.mark_unavailable(name, f'{opt_.get("type")} needs ground truth; {dataset_name} has none')
                    continue
                data = {'img': restored} if gt is None else {'img': restored, 'img2': gt}
                try:
                    values[name] = float(calculate_metric(data, opt_))
                except FileNotFoundError as e:  # e.g. LPIPS without its local weight files
                    report.mark_unavailable(name, str(e))
                    logger.warning(f'Validation {dataset_name}: metric {name} unavailable: {e}')
                    continue
                if lq is not None:  # the degraded input scored the same way (no-reference metrics: on its own)
                    data['img'] = lq
                    input_values[name] = float(calculate_metric(data, opt_))
            report.add(img_name, values, input_values, seconds)

        self.metric_results = means = report.means()
        input_means = report.means('input_') if report.with_input else {}
        if metric_opts:
            self._log_means(dataset_name, means, input_means, current_iter, tb_logger)
        for name, reason in report.unavailable.items():
            logger.info(f'Validation {dataset_name}: {name} not reported ({reason}).')
        if write_report:
            folder, stem = self._report_location(dataset_name, current_iter)
            csv_path, json_path = report.write(folder, stem, **self._report_extra(current_iter))
            logger.info(f'Validation {dataset_name}: per-image metrics in {csv_path}, summary in {json_path}')
        if self.set_average is not None and self.set_average.add(current_iter, dataset_name, means, input_means):
            self._log_set_average(current_iter, tb_logger, write_report)

    def _log_means(self, label: str, means: dict, input_means: dict, current_iter, tb_logger) -> None:
        """BasicSR's validation lines for ``label`` (means, best values, TensorBoard), then its inputs' means."""
        self.metric_results = means  # what BasicSR's _log_validation_metric_values reads
        self._initialize_best_metric_results(label)
        for name, value in means.items():
            self._update_best_metric_result(label, name, value, current_iter)
        self._log_validation_metric_values(current_iter, label, tb_logger)
        if input_means:
            get_root_logger().info(f'Inputs of {label}: ' + ', '.join(f'{k}: {v:.4f}' for k, v in input_means.items()))

    def _log_set_average(self, current_iter, tb_logger, write_report: bool) -> None:
        """Log (and report) the mean over the ``val.average`` sets, once the last of them has reported."""
        average, logger = self.set_average, get_root_logger()
        means = average.means()
        if not means:
            return
        partial = ''.join(f'; {metric} over {len(sets)} of them ({", ".join(sets)})'
                          for metric, (_, sets) in means.items() if len(sets) < len(average.names))
        logger.info(f'Validation average: mean of the set means of {", ".join(average.names)}{partial}')
        inputs = {metric: value for metric, (value, _) in average.input_means().items()}
        self._log_means('average', {metric: value for metric, (value, _) in means.items()}, inputs,
                        current_iter, tb_logger)
        if write_report:
            folder, stem = self._report_location('average', current_iter)
            path = average.write(osp.join(folder, f'{stem}.json'), **self._report_extra(current_iter))
            logger.info(f'Validation average: summary in {path}')

    def _report_location(self, dataset_name: str, current_iter) -> tuple[str, str]:
        if self.opt['is_train']:
            return osp.join(self.opt['path']['experiments_root'], 'metrics'), f'{dataset_name}_{current_iter}'
        return osp.join(self.opt['path']['results_root'], 'metrics'), dataset_name

    def _report_extra(self, current_iter) -> dict:
        return {'model': self.opt['name'], 'iteration': current_iter,
                'network_g': self.opt['path'].get('pretrain_network_g')}

    def _visualization_path(self, dataset_name: str, img_name: str, current_iter) -> str:
        if self.opt['is_train']:
            return osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
        suffix = self.opt['val'].get('suffix') or self.opt['name']
        return osp.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')

    # ------------------------------------------------------------------------------------------------
    def save(self, epoch: int, current_iter: int) -> None:
        self._rng_states = self._gather_rng_states()  # collective: every rank calls save()
        if hasattr(self, 'net_g_ema'):
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        self.save_network(self.net_potential, 'net_potential', current_iter)
        self.save_training_state(epoch, current_iter)

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
            raise ValueError(f'resume: the training state was written for sources {saved}, but the data now has '
                             f'{self.source_names}; the potentials would be mixed up. Keep the source list.')
        seed = resume_state.get('manual_seed')
        if seed is not None and seed != self.opt.get('manual_seed'):
            get_root_logger().warning(f'resume: the training state was written with manual_seed {seed}, this run has '
                                      f'{self.opt.get("manual_seed")}; the training samples after the resume will '
                                      'differ from an uninterrupted run. Set manual_seed to the saved value.')
        super().resume_training(resume_state)
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
