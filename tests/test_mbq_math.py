"""MBQ's pure math (loss, grid, scales, fake quantizers) against independent plain-PyTorch formulas."""

from __future__ import annotations

import pytest
import torch

from qvlm_modifiers.mbq.loss import (
    modality_error_sums,
    modality_token_masks,
    modality_weighted_loss,
)
from qvlm_modifiers.mbq.scale_search import (
    activation_scales,
    alpha_grid,
    fake_quantize_per_channel_symmetric,
    fake_quantize_per_token_symmetric,
    wa_candidate_input,
)


def _example(seed=0, batch=2, seq=9, channels=6):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(batch, seq, channels, generator=g, dtype=torch.float64)
    cand = ref + 0.1 * torch.randn(batch, seq, channels, generator=g, dtype=torch.float64)
    mask = torch.randint(0, 3, (batch, seq), generator=g)
    mask[0, 0], mask[0, 1], mask[0, 2] = 0, 1, 2  # every class present
    return ref, cand, mask


def test_token_masks_answer_and_all_text():
    mask = torch.tensor([[0, 1, 2, 2, 1, 0]])
    text, vision = modality_token_masks(mask, "answer")
    assert text.tolist() == [[False, True, False, False, True, False]]
    assert vision.tolist() == [[False, False, True, True, False, False]]
    text, _ = modality_token_masks(mask, "all_text")
    assert text.tolist() == [[True, True, False, False, True, True]]
    with pytest.raises(ValueError):
        modality_token_masks(mask, "prompt")


@pytest.mark.parametrize("text_tokens", ["answer", "all_text"])
def test_mae_loss_is_reference_formula(text_tokens):
    # Reference auto_scale.py (loss_mode="mae"):
    #   (sum_{caption} sum_c |d| + r * sum_{vision} sum_c |d|) / (C * (n_caption + n_vision))
    ref, cand, mask = _example()
    r = 0.37
    d = (ref - cand).abs()
    is_text = (mask == 1) if text_tokens == "answer" else (mask != 2)
    is_vis = mask == 2
    expected = (d[is_text].sum() + r * d[is_vis].sum()) / (ref.shape[-1] * (is_text.sum() + is_vis.sum()))
    sums = modality_error_sums(ref, cand, mask, "mae", text_tokens)
    got = modality_weighted_loss(sums, vision_weight=r, loss_mode="mae")
    # float64 inputs, same terms summed in a different order: agreement to ~1e-15 relative
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_mse_loss_reference_normalisation_and_pooled():
    ref, cand, mask = _example(1)
    r, tw = 0.2, 1.5
    d2 = (ref - cand).pow(2)
    t, v = mask == 1, mask == 2
    sums = modality_error_sums(ref, cand, mask, "mse", "answer")
    # reference loss_mode="mse": mean over caption elements + r * mean over vision elements
    per_modality = tw * d2[t].mean() + r * d2[v].mean()
    torch.testing.assert_close(
        modality_weighted_loss(sums, r, tw, "mse", "reference"), per_modality, rtol=1e-12, atol=0
    )
    pooled = (tw * d2[t].sum() + r * d2[v].sum()) / (d2.shape[-1] * (t.sum() + v.sum()))
    torch.testing.assert_close(modality_weighted_loss(sums, r, tw, "mse", "pooled"), pooled, rtol=1e-12, atol=0)


def test_pooled_mse_with_unit_weights_and_all_text_is_awq_loss():
    # llm-compressor AWQ (no loss mask): sum of squared errors over everything / numel
    ref, cand, mask = _example(2)
    awq = torch.nn.functional.mse_loss(ref, cand, reduction="sum") / ref.numel()
    sums = modality_error_sums(ref, cand, mask, "mse", "all_text")
    torch.testing.assert_close(modality_weighted_loss(sums, 1.0, 1.0, "mse", "pooled"), awq, rtol=1e-12, atol=0)


def test_error_sums_accumulate_over_batches():
    ref, cand, mask = _example(3)
    whole = modality_error_sums(ref, cand, mask, "mae")
    parts = modality_error_sums(ref[:1], cand[:1], mask[:1], "mae") + modality_error_sums(
        ref[1:], cand[1:], mask[1:], "mae"
    )
    for a, b in zip(whole.as_tensors(), parts.as_tensors()):
        torch.testing.assert_close(a, b)


def test_loss_without_counted_tokens_is_nan_and_mode_checked():
    ref, cand, _ = _example()
    sums = modality_error_sums(ref, cand, torch.zeros(ref.shape[:2], dtype=torch.long), "mae")
    assert torch.isnan(modality_weighted_loss(sums, 0.5))
    with pytest.raises(ValueError):
        modality_error_sums(ref, cand, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        modality_error_sums(ref, cand, torch.zeros(ref.shape[:2], dtype=torch.long), "l1")


def test_alpha_grids():
    assert alpha_grid(20, "mbq") == [k / 20 for k in range(20)]
    assert alpha_grid(20)[-1] == 0.95 and 1.0 not in alpha_grid(20)
    assert alpha_grid(20, "awq")[-1] == 1.0 and len(alpha_grid(20, "awq")) == 20
    with pytest.raises(ValueError):
        alpha_grid(1, "awq")


def test_activation_scales_formula():
    x_mean = torch.tensor([0.5, 2.0, 8.0, 1e-9])
    alpha = 0.35
    s = x_mean.pow(alpha).clamp(min=1e-4)
    expected = s / torch.sqrt(s.max() * s.min())
    torch.testing.assert_close(activation_scales(x_mean, alpha), expected)
    # alpha = 0: all ones (AWQ's identity candidate)
    torch.testing.assert_close(activation_scales(x_mean, 0.0), torch.ones(4))


def test_per_token_symmetric_fake_quant_against_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    bits = 8
    out = fake_quantize_per_token_symmetric(x, bits)
    for i in range(3):
        for j in range(5):
            tok = x[i, j]
            step = max(tok.abs().max().item(), 1e-5) / 127
            expected = torch.tensor([round(v / step) * step for v in tok.tolist()])
            torch.testing.assert_close(out[i, j], expected, rtol=1e-6, atol=1e-7)
    # at most 2^(b-1)-1 distinct magnitudes per token, error below half a step
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((out - x).abs() <= step / 2 + 1e-7).all()


def test_per_channel_symmetric_fake_quant_levels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 32, generator=g)
    q = fake_quantize_per_channel_symmetric(w, 4)
    step = w.abs().amax(-1, keepdim=True) / 7
    levels = q / step
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)
    assert levels.abs().max() <= 7 + 1e-5


def test_wa_candidate_input_gives_quantized_weight_times_quantized_scaled_input():
    # Q_w(W*s)/s applied to s*Q_tok(x/s) == Q_w(W*s) @ Q_tok(x/s)  (reference WALinear on x/s)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 32, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 32, dtype=torch.float64)
    w = torch.randn(12, 32, generator=g, dtype=torch.float64)
    s = activation_scales(x.abs().mean((0, 1)), 0.5)
    wq = fake_quantize_per_channel_symmetric(w * s, 4)
    layer_weight = wq / s
    got = wa_candidate_input(x, s, 8) @ layer_weight.T
    expected = fake_quantize_per_token_symmetric(x / s, 8) @ wq.T
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("duo", [True, "both"])
def test_duo_grid_is_awqmodifiers(duo):
    """Same candidates, same order as llm-compressor's AWQModifier (the identity first)."""
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from qvlm_modifiers.mbq.scale_search import duo_grid

    for n_grid in (4, 20, 21):
        assert duo_grid(n_grid, duo) == AWQModifier(duo_scaling=duo, n_grid=n_grid)._get_grid_search_params()
    assert len(duo_grid(20, True)) == 20 and duo_grid(20, True)[0] == (0.0, False)


def test_duo_scales_formula():
    """s = x^a / (w^(1-a) + 1e-4), clamped at 1e-4, divided by sqrt(max*min) (AWQModifier's duo branch)."""
    from qvlm_modifiers.mbq.scale_search import candidate_scales, duo_scales

    x_mean, w_mean = torch.tensor([0.5, 2.0, 8.0, 1e-9]), torch.tensor([0.3, 0.9, 0.1, 0.5])
    for alpha in (0.0, 0.25, 0.7, 1.0):
        raw = torch.tensor([max(x ** alpha / (w ** (1 - alpha) + 1e-4), 1e-4) for x, w in zip(x_mean.tolist(),
                                                                                          w_mean.tolist())])
        expected = raw / (raw.max() * raw.min()).sqrt()
        torch.testing.assert_close(duo_scales(x_mean, w_mean, alpha), expected)
        torch.testing.assert_close(candidate_scales(x_mean, alpha, True, w_mean), expected)
    torch.testing.assert_close(candidate_scales(x_mean, 0.3), activation_scales(x_mean, 0.3))
    with pytest.raises(ValueError, match="w_mean"):
        candidate_scales(x_mean, 0.3, duo=True)
