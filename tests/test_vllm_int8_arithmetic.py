"""tests/vllm/int8_gemm.py: the integer arithmetic the vLLM stage emulates when vLLM's CPU W8A8
GEMM is not exact (oneDNN on x86 without VNNI). Checked here against plain integer arithmetic and
hand-computed cases; that it is vLLM's arithmetic is checked by the stage's probe against vLLM's
own ops, on the CPU the stage runs on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def ig(vllm_script):
    return vllm_script("int8_gemm")


def test_saturating_gemm_is_exact_where_no_pair_can_saturate(ig):
    # |w| <= 64: a pair sums to at most 2 * 255 * 64 = 32640 < 32767, so no saturation can happen
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (9, 130), generator=g, dtype=torch.int8)
    w = torch.randint(-64, 65, (17, 130), generator=g, dtype=torch.int8)
    assert torch.equal(ig.gemm_u8s8_sat16(x, w, rows_per_chunk=4), ig.gemm_exact(x, w))


def test_saturating_gemm_by_hand(ig):
    x = torch.tensor([[127, 127, -127, 5]], dtype=torch.int8)
    w = torch.tensor([[127, 127, 127, 0], [-127, -127, 0, 0]], dtype=torch.int8)
    # u = x + 128 = [255, 255, 1, 133]
    # row 0: pair (255*127 + 255*127 = 64770 -> 32767) + pair (1*127 + 133*0 = 127) - 128 * (3*127)
    # row 1: pair (-64770 -> -32768) + pair 0 - 128 * (-2*127)
    assert ig.gemm_u8s8_sat16(x, w).tolist() == [[32767 + 127 - 128 * 381, -32768 + 128 * 254]]
    assert ig.gemm_exact(x, w).tolist() == [[127 * 127 * 2 - 127 * 127, -127 * 127 * 2]]
    # odd K is padded with a zero column: same as the even case with a zero appended
    assert torch.equal(ig.gemm_u8s8_sat16(x[:, :3], w[:, :3]),
                       ig.gemm_u8s8_sat16(torch.cat([x[:, :3], torch.zeros(1, 1, dtype=torch.int8)], 1),
                                          torch.cat([w[:, :3], torch.zeros(2, 1, dtype=torch.int8)], 1)))


def test_per_token_quantization(ig):
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]], dtype=torch.bfloat16)
    x_q, scale = ig.quantize_per_token(x)
    assert x_q.dtype == torch.int8
    assert x_q.abs().amax(dim=-1).tolist() == [127, 0, 127]          # absmax maps to 127; zero row stays 0
    assert torch.allclose(scale.squeeze(), torch.tensor([1 / 127, 0.0, 3 / 127]))
    assert (x_q.float() * scale - x.float()).abs().max() <= scale.max() / 2 + 1e-6


def test_emulated_linear_with_exact_gemm_is_the_dequantized_linear(ig):
    g = torch.Generator().manual_seed(1)
    w_q = torch.randint(-127, 128, (24, 32), generator=g, dtype=torch.int8)
    w_s = torch.rand((24, 1), generator=g) / 100
    bias = torch.randn(24, generator=g)
    x = torch.randn((2, 5, 32), generator=g)
    layer = ig.EmulatedW8A8Linear(w_q, w_s, bias, ig.gemm_exact)
    x_q, x_s = ig.quantize_per_token(x.reshape(-1, 32))
    reference = torch.nn.functional.linear(x_q.double() * x_s.double(), w_q.double() * w_s.double(), bias.double())
    assert torch.allclose(layer(x).double(), reference.reshape(2, 5, 24), rtol=1e-5, atol=1e-6)  # fp32 output


def test_compare_swaps_only_int8_activation_linears(ig, vllm_script):
    compare = vllm_script("compare")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for i, bits in ((0, 8), (1, None)):
        layer = model[i]
        layer.weight = torch.nn.Parameter(torch.ones_like(layer.weight, dtype=torch.int8), requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(torch.full((layer.out_features, 1), 0.5), requires_grad=False)
        acts = None if bits is None else SimpleNamespace(num_bits=bits)
        layer.quantization_scheme = SimpleNamespace(input_activations=acts)
    assert compare.emulate_vllm_w8a8(model, ig.gemm_exact) == 1
    assert type(model[0]).__name__ == "EmulatedW8A8Linear" and isinstance(model[1], torch.nn.Linear)
    # decompressed weights (a forward already ran) cannot be emulated: a clear error, not wrong numbers
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model[0].weight_scale = torch.nn.Parameter(torch.ones(3, 1), requires_grad=False)
    model[0].quantization_scheme = SimpleNamespace(input_activations=SimpleNamespace(num_bits=8))
    with pytest.raises(RuntimeError, match="expected int8 weights"):
        compare.emulate_vllm_w8a8(model, ig.gemm_exact)
