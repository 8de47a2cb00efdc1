"""GPTQ rounding inside Q-VLM's ranges (qvlm_modifiers.qvlm.gptq_rounding) on one quantized Linear:
the integers stay on the grid of the given scale/zero-point, and the result is kept only where it
lowers the block objective (else the weights come back bit for bit)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle import fake_quantize, initialize_module_for_quantization

from qvlm_modifiers.qvlm.cached_forward import quantization_enabled
from qvlm_modifiers.qvlm.gptq_rounding import gptq_round_block
from qvlm_modifiers.qvlm.objective import block_mse_objective
from qvlm_modifiers.qvlm.ranges import flatten_for_ranges, minmax_range, range_qparams

W4 = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="channel")


def _linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 32, generator=g))
    initialize_module_for_quantization(lin, QuantizationScheme(targets=["Linear"], weights=W4))
    scale, zp = range_qparams(*minmax_range(flatten_for_ranges(lin.weight.detach(), "weight", W4)), W4)
    lin.weight_scale.data.copy_(scale.reshape(lin.weight_scale.shape))
    lin.weight_zero_point.data.copy_(zp.reshape(lin.weight_zero_point.shape))
    return lin, [torch.randn(1, 16, 32, generator=g) for _ in range(3)]


@torch.no_grad()
@pytest.mark.parametrize("search_loss,kept", [(float("inf"), True), (0.0, False)])
def test_gptq_rounding_kept_only_below_the_search_loss(search_loss, kept):
    lin, inputs = _linear()
    layers = [lambda h, b: lin(h)]
    with quantization_enabled([lin], False):
        targets = [lin(x) for x in inputs]  # the FP outputs
    original = lin.weight.detach().clone()

    def quantized(enabled):
        return quantization_enabled([lin], enabled)

    loss = gptq_round_block([lin], layers, quantized, inputs, targets, search_loss)
    assert loss >= 0
    if kept:
        # the GPTQ result is on the grid of the unchanged scale / zero-point, and its loss is the objective's
        requant = fake_quantize(lin.weight, lin.weight_scale, lin.weight_zero_point, W4)
        torch.testing.assert_close(requant, lin.weight, rtol=0, atol=1e-6)
        assert not torch.equal(lin.weight, original)
        with quantized(True):
            assert block_mse_objective(layers, inputs, targets)() == loss
    else:
        assert torch.equal(lin.weight, original)  # round-to-nearest restored bit for bit
