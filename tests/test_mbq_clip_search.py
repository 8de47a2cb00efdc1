"""MBQ/AWQ weight clip search (qvlm_modifiers.mbq.clip_search) against a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from qvlm_modifiers.mbq.clip_search import (
    apply_clip,
    clip_ratios,
    modality_token_weights,
    search_clip,
    strided_sample,
)


def _fq_rows_asym(w, bits=3):
    """Asymmetric min/max quantizer per row, range including 0 (compressed-tensors' rule), plain torch."""
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def _brute_force(w, x, tw, group, ratios, bits=3):
    """One (row, group, ratio) at a time: sum_n w_n (x_n.W - x_n.Q(clamp(W)))^2, first minimum."""
    out_f, in_f = w.shape
    best = torch.zeros(out_f, in_f // group, dtype=torch.float64)
    for c in range(out_f):
        for g in range(in_f // group):
            wg = w[c, g * group:(g + 1) * group].double()
            xg = x[:, g * group:(g + 1) * group].double()
            ref = xg @ wg
            m0 = wg.abs().max()
            errs = []
            for r in ratios:
                q = _fq_rows_asym(wg.clamp(-m0 * r, m0 * r)[None], bits)[0]
                errs.append(float((tw.double() * (ref - xg @ q) ** 2).sum()))
            best[c, g] = m0 * ratios[min(range(len(errs)), key=errs.__getitem__)]
    return best


def test_ratios_are_awqs():
    assert clip_ratios(20, 0.5) == [1 - i / 20 for i in range(10)]
    assert clip_ratios(20, 0.5)[0] == 1.0 and clip_ratios(20, 0.5)[-1] == pytest.approx(0.55)
    with pytest.raises(ValueError):
        clip_ratios(20, 1.5)


@pytest.mark.parametrize("weighted", [False, True], ids=["uniform_awq", "modality_weighted"])
def test_search_matches_brute_force(weighted):
    torch.manual_seed(0)
    out_f, in_f, group, n = 12, 64, 16, 40
    w = torch.randn(out_f, in_f)
    w[:, 3] *= 8  # outliers make clipping pay off in some groups
    x = torch.randn(n, in_f) * torch.linspace(0.2, 3.0, in_f)
    if weighted:
        is_vision = torch.arange(n) % 3 != 0
        tw = modality_token_weights(is_vision, text_count=30, vision_count=300, vision_weight=0.2)
    else:
        tw = torch.ones(n)
    ratios = clip_ratios(20, 0.5)
    got, idx = search_clip(w, x, tw, group, lambda t: _fq_rows_asym(t, 3), ratios, rows_per_chunk=5)
    expected = _brute_force(w, x, tw, group, ratios)
    # float32 einsum vs float64 loops: the same argmin (the errors of neighbouring ratios differ by far more
    # than float32 rounding here); max_val then agrees to float32 precision
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    assert idx.max() > 0 and idx.min() == 0  # some groups clipped, some not: a non-trivial check
    # per-channel (one group per row) too
    got_c, _ = search_clip(w, x, tw, in_f, lambda t: _fq_rows_asym(t, 3), ratios)
    torch.testing.assert_close(got_c.double(), _brute_force(w, x, tw, in_f, ratios), rtol=1e-6, atol=1e-7)


def test_apply_clip_in_the_scaled_domain():
    torch.manual_seed(1)
    w, s = torch.randn(4, 32), torch.rand(32) + 0.5
    max_val = (w * s).reshape(4, 2, 16).abs().amax(-1) * 0.7
    direct = apply_clip(w * s, max_val, 16)
    via_unscaled = apply_clip(w, max_val, 16, scales=s) * s
    torch.testing.assert_close(via_unscaled, direct, rtol=1e-6, atol=1e-7)
    assert (direct.reshape(4, 2, 16).abs().amax(-1) <= max_val + 1e-6).all()


def test_token_weights_and_sampling():
    is_vision = torch.tensor([True, True, False, True])
    pooled = modality_token_weights(is_vision, text_count=10, vision_count=30, vision_weight=0.5)
    # each sampled text token stands for 10 text tokens (weight 1), each vision token for 10 (weight 0.5)
    assert pooled.tolist() == [5.0, 5.0, 10.0, 5.0]
    per_mod = modality_token_weights(is_vision, 10, 30, 0.5, normalization="per_modality")
    assert per_mod.tolist() == pytest.approx([0.5 / 3, 0.5 / 3, 1.0, 0.5 / 3])
    assert strided_sample(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert strided_sample(100, 3).tolist() == [0, 50, 99]
    with pytest.raises(ValueError, match="multiple of group_size"):
        search_clip(torch.zeros(2, 10), torch.zeros(3, 10), torch.ones(3), 4, lambda t: t, [1.0])
