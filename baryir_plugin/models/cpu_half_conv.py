"""fp16 training on the CPU at a usable speed: convolution weight gradients accumulated in float32.

PyTorch's CPU kernel for the weight gradient of an fp16 convolution is a slow fallback: on a 2-core
Xeon it takes about 150x the float32 time (a 1x1 convolution 16 -> 84 channels at 8x48x48: 187 ms
against 1.6 ms), while the fp16 forward and input gradient run at float32's speed. Training the demo in
fp16 is then 28x slower than in float32, and nearly all of it is that one kernel.

Inside :func:`fp16_conv_weight_grads_in_fp32`, a ``conv2d`` that CPU fp16 autocast would run in fp16
runs in fp16 forward exactly as autocast runs it, its input gradient in fp16 as PyTorch computes it, and
its weight gradient from the same fp16 tensors, multiplied and summed in float32, then rounded to fp16.
That is what a GPU's fp16 convolution computes too (fp16 operands, float32 accumulation, an fp16
result), so the values differ from PyTorch's CPU kernel only by summation order, and an overflow is
still an overflow (inf, which the GradScaler sees and skips).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CONV2D = (torch.conv2d, torch.nn.functional.conv2d)


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


class _Fp16Conv2d(torch.autograd.Function):
    """conv2d in fp16 (forward and input gradient) with a float32-accumulated, fp16-rounded weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        xh, wh = x.to(torch.float16), weight.to(torch.float16)
        bh = None if bias is None else bias.to(torch.float16)
        ctx.conv = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(xh, wh)
        with torch.autocast('cpu', enabled=False):
            return torch.conv2d(xh, wh, bh, *ctx.conv)

    @staticmethod
    def backward(ctx, grad_out):
        xh, wh = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(torch.float16)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, xh, wh, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0].to(x_dtype)
        if need_w:
            grad_w = torch.ops.aten.convolution_backward(
                grad_out.float(), xh.float(), wh.float(), None, stride, padding, dilation, False, [0, 0],
                groups, [False, True, False])[1]
            grad_w = grad_w.to(torch.float16).to(w_dtype)
        if need_b:
            grad_b = grad_out.float().sum((0, 2, 3)).to(torch.float16).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _conv_args(args, kwargs):
    names = ('input', 'weight', 'bias', 'stride', 'padding', 'dilation', 'groups')
    defaults = (None, None, None, 1, 0, 1, 1)
    values = dict(zip(names, defaults))
    values.update(zip(names, args))
    values.update(kwargs)
    return [values[n] for n in names]


class _Fp16ConvMode(TorchFunctionMode):

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV2D and torch.is_autocast_enabled('cpu') \
                and torch.get_autocast_dtype('cpu') == torch.float16:
            x, weight, bias, stride, padding, dilation, groups = _conv_args(args, kwargs)
            if isinstance(x, torch.Tensor) and x.device.type == 'cpu' and x.dim() == 4 \
                    and x.dtype in (torch.float32, torch.float16) and not isinstance(padding, str) \
                    and torch.is_grad_enabled():
                return _Fp16Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)
        return func(*args, **kwargs)


def fp16_conv_weight_grads_in_fp32() -> TorchFunctionMode:
    """A context manager for the forward under CPU fp16 autocast (see the module's docstring)."""
    return _Fp16ConvMode()
