"""AWQ-style activation-aware per-group clip search (qvlm_modifiers.qvlm.clip_search) against a
brute-force reference in plain PyTorch: every (output channel, group) and every ratio, quantized with
the textbook asymmetric uniform formula, error of the group's contribution to the output."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from qvlm_modifiers.qvlm.clip_search import auto_clip_ranges, blend_ratios, clip_input_tokens, clip_ratio_grid
from qvlm_modifiers.qvlm.range_variables import weight_candidate_mode
from qvlm_modifiers.qvlm.ranges import flatten_for_ranges

GROUP8 = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=8)
CHANNEL = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="channel")
GROUP8_SYM = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=8)


def _reference_qdq(w: torch.Tensor, low: float, high: float, symmetric: bool, bits: int = 4) -> torch.Tensor:
    """Textbook uniform quantizer of one group on the signed grid [-2^(b-1), 2^(b-1)-1]: asymmetric
    (the range always contains 0, as compressed-tensors' calculate_qparams makes it) or symmetric
    (scale = max(|low|, |high|) / ((qmax - qmin) / 2), zero-point 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = max(-low, high) / ((qmax - qmin) / 2) if symmetric else (high - low) / (qmax - qmin)
    if scale == 0:
        return w.clone()
    zp = 0 if symmetric else max(min(round(qmin - low / scale), qmax), qmin)
    q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def _reference_errors(weight, x, group, ratios, symmetric):
    """errors[o, g, i]: mean over tokens of (sum_{s in g} (w - Q_r(w))_{o,s} x_{t,s})^2, r = ratios[i]."""
    out, inp = weight.shape
    groups = inp // group
    errors = torch.zeros(out, groups, len(ratios), dtype=torch.float64)
    for o in range(out):
        for g in range(groups):
            w = weight[o, g * group:(g + 1) * group]
            xs = x[:, g * group:(g + 1) * group]
            for i, r in enumerate(ratios):
                dq = _reference_qdq(w, r * w.min().item(), r * w.max().item(), symmetric)
                errors[o, g, i] = ((xs.double() @ (w - dq).double()) ** 2).mean()
    return errors


@torch.no_grad()
@pytest.mark.parametrize("args,group", [(GROUP8, 8), (CHANNEL, 32), (GROUP8_SYM, 8)])
def test_auto_clip_matches_brute_force(args, group):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 32, generator=g)
    weight[:, 3] *= 6.0  # an outlier weight column: clipping it trades its error for finer steps
    x = torch.randn(64, 32, generator=g)
    x[:, 5] *= 10.0  # a salient input channel: its weights' error counts 100x
    ratios = clip_ratio_grid(20, 0.5)
    ratio, low, high = auto_clip_ranges(flatten_for_ranges(weight, "weight", args), x, args, ratios)
    ref = _reference_errors(weight, x, group, ratios, bool(args.symmetric))
    assert ratio.shape == ref.shape[:2]
    grid = torch.tensor(ratios)
    chosen = (ratio.unsqueeze(-1) - grid).abs().argmin(-1)  # float32 ratio -> its grid index
    assert ((ratio - grid[chosen]).abs() < 1e-6).all()
    picked = ref.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    best = ref.min(dim=-1).values
    # the same argmin up to float32-vs-float64 evaluation: a different pick may only be a near-tie
    # (1e-4 relative; the reference sums in float64, the search in float32 einsums)
    assert torch.all(picked <= best * (1 + 1e-4) + 1e-12), (picked - best).max()
    assert (picked <= ref[..., 0] * (1 + 1e-4) + 1e-12).all()  # never above min/max (r = 1.0 = RTN)
    assert (ratio < 1).any()  # the outlier case does clip somewhere
    torch.testing.assert_close(low, weight.reshape(6, -1, group).amin(-1) * ratio)
    torch.testing.assert_close(high, weight.reshape(6, -1, group).amax(-1) * ratio)


def test_clip_grid_and_blend():
    assert clip_ratio_grid(20, 0.5) == pytest.approx([1 - i / 20 for i in range(11)])
    assert clip_ratio_grid(20, 0.5)[0] == 1.0 and clip_ratio_grid(20, 0.5)[-1] == pytest.approx(0.5)
    r = torch.tensor([0.5, 0.8, 1.0])
    torch.testing.assert_close(blend_ratios(r, 1.0), r)
    torch.testing.assert_close(blend_ratios(r, 0.5), torch.tensor([0.75, 0.9, 1.0]))
    torch.testing.assert_close(blend_ratios(r, 0.0), torch.ones(3))


def test_clip_inputs_leave_out_the_attention_sink_and_cap_tokens():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    x[:, 0] = 1e6  # position 0: the sink
    rows = clip_input_tokens([x], exclude_first=True, max_tokens=100)
    assert rows.shape == (8, 3) and rows.max() < 1e6
    assert clip_input_tokens([x], exclude_first=False, max_tokens=100).shape == (10, 3)
    capped = clip_input_tokens([x, x], exclude_first=True, max_tokens=5)
    assert capped.shape == (5, 3)


@pytest.mark.parametrize("bits,strategy,requested,expected", [
    (4, "group", "auto", "clip"), (3, "group", "auto", "clip"), (4, "channel", "auto", "clip"),
    (4, "tensor", "auto", "percentile"), (6, "channel", "auto", "minmax"), (8, "channel", "auto", "minmax"),
    (8, "channel", "clip", "clip"), (4, "group", "percentile", "percentile"),
])
def test_weight_candidate_mode(bits, strategy, requested, expected):
    extra = {"group_size": 8} if strategy == "group" else {}
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy=strategy, **extra)
    assert weight_candidate_mode(args, requested) == expected
