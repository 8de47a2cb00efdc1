"""Q-VLM visual-encoder optimization pieces (Eq. 8-10): STE quantizer, differentiable entropy,
Jacobian weights."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle import fake_quantize

from qvlm_modifiers.qvlm.ranges import flatten_for_ranges, minmax_range, range_qparams
from qvlm_modifiers.qvlm.entropy import JointLevelAccumulator
from qvlm_modifiers.qvlm.visual import (
    dynamic_token_fake_quant_ste,
    fake_quant_range_ste,
    jacobian_weights,
    soft_dependency,
    veo_objective,
)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ste_quantizer_forward_equals_compressed_tensors(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=128)
    obs = flatten_for_ranges(w, "weight", args)
    low, high = minmax_range(obs)
    low, high = low * 0.9, high * 0.8
    ours = fake_quant_range_ste(obs, low, high, 4, symmetric).reshape(w.shape)
    scale, zp = range_qparams(low, high, args)
    torch.testing.assert_close(ours, fake_quantize(w, scale, zp, args), rtol=0, atol=1e-6)


def test_ste_gradients_reach_the_range():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, generator=g)
    obs = w.unsqueeze(-2).unsqueeze(0)  # channel layout (1, 4, 1, 64)
    log_high = torch.zeros(4, 1, requires_grad=True)
    low, high = obs.amin(dim=(0, -1)), obs.amax(dim=(0, -1))
    out = fake_quant_range_ste(obs, low, high * log_high.exp(), 3, False)
    (out - obs).pow(2).sum().backward()
    assert log_high.grad is not None and log_high.grad.abs().sum() > 0


def test_dynamic_token_ste_equals_compressed_tensors_token_quant():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 7, 32, generator=g)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="token", dynamic=True)
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    torch.testing.assert_close(dynamic_token_fake_quant_ste(x, 4, False), fake_quantize(x, scale, zp, args), rtol=0, atol=1e-6)


def test_soft_dependency_equals_streaming_accumulator_and_is_differentiable():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 16, generator=g, requires_grad=True)
    b = (0.5 * a + torch.randn(9, 16, generator=g)).detach()
    acc = JointLevelAccumulator(8)
    acc.update(a.detach(), b)
    d = soft_dependency(a, b, 8)
    assert d.item() == pytest.approx(acc.entropy(), rel=1e-5)
    d.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_jacobian_weights_of_a_linear_chain():
    # X1 = 2 X0, X2 = 3 X1, E = ||X2 - r||^2: dE/dX1 = 3 * 2(X2 - r), dE/dX0 = 2 * that
    x0 = torch.randn(3, 4, requires_grad=True)
    x1 = 2 * x0
    x2 = 3 * x1
    r = torch.zeros(3, 4)
    w = jacobian_weights(x2, r, [x0, x1])
    torch.testing.assert_close(w, torch.tensor([2 / 3, 1 / 3]))


def test_veo_objective_combines_the_terms():
    g = torch.Generator().manual_seed(4)
    hs = [torch.randn(1, 5, 8, generator=g, requires_grad=True) for _ in range(4)]
    final_r = hs[-1].detach() + 0.1
    vq, vr = torch.randn(1, 3, 8, generator=g), torch.zeros(1, 3, 8)
    reg = torch.tensor(2.0)
    out = veo_objective(reg, hs, final_r, vq, vr, num_levels=8, lambda_ent=0.5, lambda_err=2.0, eta=0.25)
    err = vq.pow(2).mean() + 0.25 * 0.01
    assert out["err"].item() == pytest.approx(err.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(2.0 + 0.5 * out["ent"].item() + 2.0 * err.item(), rel=1e-5)
    assert out["weights"].shape == (2,) and out["weights"].sum().item() == pytest.approx(1.0)
