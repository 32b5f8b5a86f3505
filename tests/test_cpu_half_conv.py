"""CPU fp16 convolutions with float32-accumulated weight gradients: the same values as fp16 training
computes, an overflow still an overflow, and nothing changed outside CPU fp16 autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baryir_plugin.models.cpu_half_conv import fp16_conv_weight_grads_in_fp32
from baryir_plugin.archs.baryir_arch import BaryIR
from baryir_plugin.archs.restormer_blocks import set_activation_checkpointing
from baryir_plugin.models.training_speed import TrainingSpeed


def _conv_grads(x, w, b, mode: bool, dtype=torch.float16, ones=False, **conv):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with torch.autocast('cpu', dtype=dtype):
        if mode:
            with fp16_conv_weight_grads_in_fp32():
                y = F.conv2d(x, w, b, **conv)
        else:
            y = F.conv2d(x, w, b, **conv)
    y.backward(torch.ones_like(y) if ones else torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize('conv', [dict(padding=1), dict(stride=2, padding=2, dilation=2),
                                  dict(padding=1, groups=6)])
def test_forward_and_input_gradient_are_autocasts_and_weight_gradient_is_fp16_rounded_fp32_sum(conv):
    torch.manual_seed(0)
    x, b = torch.randn(2, 6, 13, 11), torch.randn(12)
    w = torch.randn(12, 6 // conv.get('groups', 1), 3, 3)
    y, gx, gw, gb = _conv_grads(x, w, b, mode=True, **conv)
    y0, gx0, gw0, gb0 = _conv_grads(x, w, b, mode=False, **conv)
    assert y.dtype == torch.float16 and torch.equal(y, y0)  # the same fp16 forward as autocast's
    assert gx.dtype == torch.float32 and torch.equal(gx, gx0)  # the same fp16 input gradient
    # the weight gradient: fp16 operands, summed in float32 (float64 here), rounded once to fp16
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).half().double()
    w64 = w.half().double().requires_grad_()
    F.conv2d(x.half().double(), w64, None, **conv).backward(g)
    expected = w64.grad.half().float()
    assert gw.dtype == torch.float32 and torch.equal(gw, gw.half().float())  # an fp16 value
    assert torch.allclose(gw, expected, rtol=2 ** -10, atol=1e-6)
    # and PyTorch's own fp16 kernel agrees to fp16's precision (it accumulates in fp16 steps)
    assert (gw - gw0).abs().max() <= 2e-2 * gw0.abs().max()
    assert torch.allclose(gb, g.sum((0, 2, 3)).half().float(), rtol=2 ** -10)


def test_an_fp16_overflow_stays_an_overflow():
    x = torch.full((1, 1, 64, 64), 200.0)
    w, b = torch.ones(1, 1, 3, 3), torch.zeros(1)
    _, _, gw, _ = _conv_grads(x, w, b, mode=True, ones=True, padding=1)
    assert torch.isinf(gw).all()  # 200 * 4096 > 65504: the GradScaler must see it and skip the step


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_nothing_changes_outside_cpu_fp16_autocast(dtype):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 9, 9, requires_grad=True), torch.randn(5, 4, 3, 3), torch.randn(5)
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        with fp16_conv_weight_grads_in_fp32():
            y = F.conv2d(x, w, b, padding=1)
        y0 = F.conv2d(x, w, b, padding=1)
    assert torch.equal(y, y0) and 'Fp16Conv2d' not in type(y.grad_fn).__name__
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16), fp16_conv_weight_grads_in_fp32():
        z = F.conv2d(x, w, b, padding=1)  # evaluation: nothing to differentiate, autocast's own kernel
    assert z.dtype == torch.float16 and z.grad_fn is None


@pytest.mark.parametrize('opt, active', [({'use_amp': True}, True),
                                         ({'use_amp': True, 'amp_bf16': True}, False),
                                         ({}, False)])
def test_training_autocast_uses_it_for_cpu_fp16_only(opt, active):
    speed = TrainingSpeed(opt, torch.device('cpu'))
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with speed.autocast():
        y = conv(torch.randn(1, 3, 8, 8))
    assert ('Fp16Conv2d' in type(y.grad_fn).__name__) == active


def test_activation_checkpointing_keeps_the_fp16_gradients():
    torch.manual_seed(0)
    net = BaryIR(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8])
    speed, x = TrainingSpeed({'use_amp': True}, torch.device('cpu')), torch.rand(2, 3, 32, 32)

    def grads():
        net.zero_grad()
        with speed.autocast():
            out = net(x)
        (out[0] if isinstance(out, (tuple, list)) else out).float().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    assert set_activation_checkpointing(net, None, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads()))
