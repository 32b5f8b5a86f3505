"""Training speed options of BaryIRModel, under the names traiNNer-redux gives them (top level of the YAML):

    use_amp: false            # mixed precision: autocast around forward and losses
    amp_bf16: false           # bf16 autocast (no loss scaling needed); false = fp16 with a GradScaler
                              # per optimizer, whose state is saved and resumed with the training state
    use_channels_last: false  # channels-last memory format for the networks and their inputs
    use_compile: false        # torch.compile the restoration network and the potentials
    compile_mode: ~           # torch.compile's mode: default | reduce-overhead | max-autotune | ...

and ``train.checkpointing`` (activation checkpointing of the Restormer stages). All are off by default,
which is float32 training exactly as without them. Parts that low precision breaks stay in float32 under
autocast (``baryir_plugin/archs/precision.py``; the measurements are in docs/training-speed.md).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Optional

import torch
from basicsr.utils import get_root_logger

from baryir_plugin.archs.restormer_blocks import set_activation_checkpointing
from baryir_plugin.errors import OptionError, SetupError
from baryir_plugin.models.cpu_half_conv import fp16_conv_weight_grads_in_fp32

COMPILE_MODES = (None, 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def _flag(opt: dict, key: str) -> bool:
    value = opt.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OptionError(f'{key} must be true or false, got {value!r}.')
    return value


def compile_unavailable(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run on ``device`` here, or None when it can."""
    try:
        from torch import _dynamo
        if not _dynamo.is_dynamo_supported():
            return 'TorchDynamo does not support this Python version'
    except Exception as e:  # noqa: BLE001 (an import failure of an optional subsystem)
        return f'torch._dynamo cannot be imported ({e})'
    if device.type == 'cuda':
        try:
            import triton  # noqa: F401
        except ImportError:
            return 'triton is not installed (pip install triton)'
    elif device.type == 'cpu':
        compilers = [os.environ.get('CXX'), 'g++', 'c++', 'clang++']
        if not any(c and shutil.which(c) for c in compilers):
            return 'no C++ compiler found (inductor generates C++ on the CPU; install g++ or set CXX)'
    return None


def parse_checkpointing(value) -> Optional[tuple[Optional[list[str]], int]]:
    """``train.checkpointing``: false/~ (off), true (every stage, one block per recomputed run) or
    ``{stages: all | [names], every: n}``; returns (stage names or None for all, n) or None."""
    if value is None or value is False:
        return None
    if value is True:
        return None, 1
    if not isinstance(value, dict) or set(value) - {'stages', 'every'}:
        raise OptionError('train.checkpointing must be true, false or {stages: all | [stage names], every: n}, '
                         f'got {value!r}.')
    stages = value.get('stages', 'all')
    if stages != 'all' and not (isinstance(stages, (list, tuple)) and all(isinstance(s, str) for s in stages)):
        raise OptionError(f"train.checkpointing.stages must be 'all' or a list of stage names, got {stages!r}.")
    every = value.get('every', 1)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise OptionError(f'train.checkpointing.every must be an integer >= 1, got {every!r}.')
    return (None if stages == 'all' else list(stages)), every


def _channels_last_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of a 4-D tensor with exactly the strides a channels-last gradient of it will have.

    ``contiguous(memory_format=channels_last)`` leaves a 1x1 kernel (C_out, C_in, 1, 1) as it is (both
    layouts fit it), but its gradient comes out with channels-last strides, which DDP's gradient bucket,
    laid out after the parameter, then reports as mismatched and copies every step."""
    n, c, h, w = t.shape
    out = torch.empty_strided(t.shape, (h * w * c, 1, w * c, c), dtype=t.dtype, device=t.device)
    return out.copy_(t)


class TrainingSpeed:
    """Reads and checks the speed options once, then applies them where the model needs them."""

    def __init__(self, opt: dict, device: torch.device, is_train: bool = True) -> None:
        logger = get_root_logger()
        self.device = device
        self.use_amp = _flag(opt, 'use_amp')
        self.amp_dtype = torch.bfloat16 if _flag(opt, 'amp_bf16') else torch.float16
        if _flag(opt, 'amp_bf16') and not self.use_amp:
            logger.warning('amp_bf16 is set but use_amp is false: training stays in float32.')
        if self.use_amp and self.amp_dtype == torch.bfloat16 and device.type == 'cuda' \
                and not torch.cuda.is_bf16_supported():
            raise SetupError('amp_bf16: this GPU has no bf16 support; set amp_bf16: false (fp16 with loss scaling).')
        self.channels_last = _flag(opt, 'use_channels_last')
        self.compile_mode = opt.get('compile_mode')
        if self.compile_mode not in COMPILE_MODES:
            raise OptionError(f'compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}.')
        self.compile = _flag(opt, 'use_compile') and is_train  # testing runs the eager network
        if self.compile:
            reason = compile_unavailable(device)
            if reason:
                logger.warning(f'use_compile: torch.compile is not available here ({reason}); training runs '
                               'uncompiled.')
                self.compile = False
        self.checkpointing = parse_checkpointing((opt.get('train') or {}).get('checkpointing'))

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def scaled(self) -> bool:
        """fp16 needs loss scaling (its gradients underflow); bf16 has float32's range and does not."""
        return self.use_amp and self.amp_dtype == torch.float16

    def autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        if self.amp_dtype == torch.float16 and self.device.type == 'cpu' and not self.compile:
            stack = contextlib.ExitStack()  # CPU fp16: PyTorch's own conv weight-gradient kernel is ~150x slow
            stack.enter_context(torch.autocast('cpu', dtype=torch.float16))
            stack.enter_context(fp16_conv_weight_grads_in_fp32())
            return stack
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> Optional['torch.amp.GradScaler']:
        return torch.amp.GradScaler(self.device.type) if self.scaled else None

    def prepare(self, net: torch.nn.Module, checkpoint_stages: bool = False) -> torch.nn.Module:
        """Memory format, activation checkpointing and compilation of a bare network, before DDP wraps it
        (so DDP's gradient buckets take the parameters' final strides)."""
        if self.channels_last:
            with torch.no_grad():  # 4-D weights only: the potentials' stacked 5-D weights have no such layout
                for p in net.parameters():
                    if p.dim() == 4:
                        p.data = _channels_last_strided(p.data)
        if checkpoint_stages and self.checkpointing is not None:
            stages, every = self.checkpointing
            names = set_activation_checkpointing(net, stages, every)
            get_root_logger().info(f'Activation checkpointing ({every} block(s) per recomputed run): '
                                   f'{", ".join(names)}')
        if self.compile:
            from torch import _dynamo
            # a graph that fails to compile runs eagerly, with dynamo's warning, instead of stopping training
            _dynamo.config.suppress_errors = True
            net.compile(mode=self.compile_mode)
        return net

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @staticmethod
    def step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler, guard=None) -> bool:
        """backward + optimizer step, through the optimizer's GradScaler when there is one. With a
        :class:`~baryir_plugin.models.numerics.NonFiniteGuard`, a step whose loss (or, unscaled, whose
        gradients) holds NaN/inf is not taken; returns whether it was."""
        check = guard is not None and guard.active
        if scaler is None:
            loss.backward()
            if check and not guard.finite(loss, optimizer):
                optimizer.zero_grad(set_to_none=True)
                return False
            optimizer.step()
            return True
        if check and not guard.finite(loss):
            optimizer.zero_grad(set_to_none=True)
            return False
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped when the scaled gradients hold inf/NaN (the scale then shrinks)
        scaler.update()
        return True


def check_optimizer_options(key: str, cfg: dict, optimizer_cls: type) -> None:
    """``foreach``/``fused`` are passed to torch.optim; say which optimizers take them."""
    import inspect
    params = inspect.signature(optimizer_cls.__init__).parameters
    for name in ('foreach', 'fused'):
        if name in cfg and name not in params:
            raise OptionError(f'train.{key}.{name}: torch.optim.{optimizer_cls.__name__} has no {name!r} option '
                             f'in this torch ({torch.__version__}); remove it.')


class IntervalLog:
    """Loss values summed on their device since the last log line: reading them costs one host sync
    per logging interval instead of one per loss and iteration. The log shows the interval's mean."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict) -> None:
        for key, value in losses.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop_means(self) -> dict:
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means

    def __bool__(self) -> bool:
        return bool(self.sums)


def per_source_stats(scores: torch.Tensor, source_id: torch.Tensor, num_sources: int) -> torch.Tensor:
    """(2K,) per-source sums of ``scores`` then per-source counts, for means taken later."""
    onehot = torch.nn.functional.one_hot(source_id.long(), num_sources).to(torch.float32)
    return torch.cat([onehot.t() @ scores.detach().float(), onehot.sum(0)])

