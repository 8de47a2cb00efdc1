"""The shared AWQ clip search core (qvlm_modifiers.auto_clip) against a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from qvlm_modifiers.auto_clip import (
    clip_ratios,
    group_input_gram,
    group_output_error,
    group_output_error_gram,
    search_group_clip,
)


def _sym_rtn(w: torch.Tensor, ratio: float, bits: int = 3) -> torch.Tensor:
    """A candidate rule for the test: symmetric round-to-nearest with step ``ratio * max|w| / qmax``
    per group (last dim), values beyond the clipped range saturating."""
    qmax = 2 ** (bits - 1) - 1
    step = (w.abs().amax(-1, keepdim=True) * ratio / qmax).clamp(min=1e-12)
    return torch.clamp(torch.round(w / step), -qmax - 1, qmax) * step


def _brute_force(w, x, ratios, tw):
    """One (row, group, ratio) at a time in float64: sum_n w_n (x_n . (W - W_r))^2, first minimum."""
    out_f, groups, _ = w.shape
    tw = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64) if tw is None else tw.double()
    best = torch.zeros(out_f, groups, dtype=torch.long)
    for c in range(out_f):
        for g in range(groups):
            wg, xg = w[c, g].double(), x[:, g].double()
            errs = [float((tw * (xg @ (wg - _sym_rtn(wg, r))) ** 2).sum()) for r in ratios]
            best[c, g] = min(range(len(errs)), key=errs.__getitem__)
    return best


@pytest.mark.parametrize("error", ["tokens", "gram"])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "token_weighted"])
def test_search_matches_brute_force(weighted, error):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 4, 16, generator=g)
    w[:, :2, 2] *= 6.0  # an outlier in groups 0 and 1: clipping it can pay off
    w[:, 2:] = torch.rand(10, 2, 16, generator=g) * 2 - 1  # uniform groups: clipping rarely does
    x = torch.randn(48, 4, 16, generator=g) * torch.linspace(0.2, 3.0, 16)
    tw = torch.rand(48, generator=g) * 3 if weighted else None
    ratios = clip_ratios(20, 0.5)
    ratio, idx = search_group_clip(w, x, ratios, _sym_rtn, token_weights=tw, rows_per_chunk=3, error=error)
    expected = _brute_force(w, x, ratios, tw)
    assert torch.equal(idx, expected)
    torch.testing.assert_close(ratio, torch.tensor(ratios)[expected])
    assert idx.min() == 0 and idx.max() > 0  # some groups clipped, some not


def test_clip_ratios_end_point():
    assert clip_ratios(20, 0.5) == [1 - i / 20 for i in range(10)]  # AWQ's code: 1.0 .. 0.55
    assert clip_ratios(20, 0.5, include_end=True) == [1 - i / 20 for i in range(11)]  # 1.0 .. 0.5
    assert clip_ratios(20, 0.0) == clip_ratios(20, 0.0, include_end=True) == [1.0]
    for bad in [(0, 0.5), (20, 1.0), (20, -0.1)]:
        with pytest.raises(ValueError):
            clip_ratios(*bad)


@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "token_weighted"])
def test_gram_error_is_the_token_error(weighted):
    """d^T H d with H = sum_n w_n x_n x_n^T is sum_n w_n (x_n . d)^2: checked in float64, where the
    two sums differ only by rounding (1e-10 relative), and in float32 within 1e-4 relative (the
    float32 Gram of 300 tokens; the search only compares errors of one group)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, 8, generator=g, dtype=torch.float64) * torch.linspace(0.1, 4.0, 8, dtype=torch.float64)
    w = torch.randn(7, 5, 8, generator=g, dtype=torch.float64)
    wq = w + torch.randn(7, 5, 8, generator=g, dtype=torch.float64) * 0.05
    tw = torch.rand(300, generator=g, dtype=torch.float64) if weighted else None
    tokens = group_output_error(x, w, wq, tw)
    torch.testing.assert_close(group_output_error_gram(group_input_gram(x, tw), w, wq), tokens, rtol=1e-10, atol=0)
    x32, w32, wq32 = x.float(), w.float(), wq.float()
    tw32 = None if tw is None else tw.float()
    gram32 = group_output_error_gram(group_input_gram(x32, tw32), w32, wq32)
    torch.testing.assert_close(gram32.double(), tokens, rtol=1e-4, atol=0)


def test_unknown_error_form_is_rejected():
    with pytest.raises(ValueError, match="tokens' or 'gram"):
        search_group_clip(torch.ones(2, 1, 4), torch.ones(3, 1, 4), [1.0], lambda w, r: w, error="hessian")
