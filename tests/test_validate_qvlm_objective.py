"""eval/validate_qvlm_objective.py: its fake quantizer and its candidate objectives, against
compressed-tensors and hand-computed values (the model run itself is the script's job, not CI's)."""

from __future__ import annotations

import random

import pytest
import torch

from qvlm_eval import validate_qvlm_objective as v


def test_ratio_one_is_compressed_tensors_rtn():
    """Clip ratio 1 = min/max asymmetric int4 per group of 64: compressed-tensors' own qparams and
    fake quantization give the same tensor (scales are computed the same way, so exact up to one
    float32 rounding of the scale)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    torch.manual_seed(0)
    w = torch.randn(8, 128)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
    groups = w.reshape(8, 2, 64)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    expected = fake_quantize(w, scale, zero, args)
    torch.testing.assert_close(v.fake_quant(w, 4, 64, 1.0), expected, rtol=0, atol=1e-6)


def test_clipping_shrinks_each_group_range_and_saturates():
    w = torch.tensor([[-1.0, -0.5, 0.25, 2.0]])
    q = v.fake_quant(w, 2, 4, 0.5)  # range [-0.5, 1.0], step 0.5
    assert q.min() >= -0.5 - 1e-6 and q.max() <= 1.0 + 1e-6
    torch.testing.assert_close(q, torch.tensor([[-0.5, -0.5, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="group size"):
        v.fake_quant(torch.zeros(2, 6), 4, 4, 1.0)


def test_objectives_match_their_definitions():
    torch.manual_seed(0)
    d, t, vocab = 4, 5, 7
    h_fp = torch.randn(t, d)
    h_fp[0] *= 50  # an attention-sink-like first token
    h_q = h_fp.clone()
    h_q[0] += 1.0   # error 1 per channel on the sink
    h_q[3] += 0.5   # error 0.5 per channel on an assistant-turn token
    mask = torch.tensor([0, 0, 0, 1, 1])
    norm = torch.nn.Identity()
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        out = v.objectives(h_q, h_fp, mask, norm, norm, head)
    assert out["mse"] == pytest.approx((d * 1.0 + d * 0.25, t * d))
    assert out["mse_skip_first"] == pytest.approx((d * 0.25, (t - 1) * d))
    assert out["assistant_turn_mse"] == pytest.approx((d * 0.25, 2 * d))
    rel = d * 1.0 / float(h_fp[0].pow(2).sum()) + d * 0.25 / float(h_fp[3].pow(2).sum())
    assert out["token_relative_mse"][0] == pytest.approx(rel) and out["token_relative_mse"][1] == t
    assert out["next_norm_mse"] == pytest.approx(out["mse"])  # identity norm
    # logit lens: positions 2 and 3 predict the assistant-turn tokens 3 and 4; only position 3 differs
    with torch.no_grad():
        p = torch.log_softmax(head(h_fp[3]), -1)
        q = torch.log_softmax(head(h_q[3]), -1)
    kl, n = out["logit_lens_kl"]
    assert n == 2 and kl == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-5)


def test_candidates_start_with_the_uniform_ratios_and_do_not_repeat():
    names = ["a", "b", "c"]
    cands = v.candidates(names, [1.0, 0.9], 4, random.Random(0))
    assert cands[0] == {n: 1.0 for n in names} and cands[1] == {n: 0.9 for n in names}
    assert len(cands) == 6 and len({tuple(sorted(c.items())) for c in cands}) == 6
    assert v.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert v.spearman([1, 1, 1], [1, 2, 3]) == 0.0  # constant objective: no ranking, not NaN


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        v.main(["--ratios", "0.9", "0.8"])
    assert "must include 1.0" in capsys.readouterr().err
