"""eval/paired.py: seed intervals, paired bootstrap and McNemar's exact test against independent
references (scipy where installed, hand-computed cases otherwise), and the record-level comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qvlm_eval import paired


def test_t975_matches_scipy_and_known_values():
    assert paired.t975(1) == pytest.approx(12.7062, abs=1e-4)
    assert paired.t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert paired.t975(10) == pytest.approx(2.2281, abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 61)) + [100, 1000]:
        assert paired.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    with pytest.raises(ValueError):
        paired.t975(0)


def test_seed_interval_single_minmax_and_t():
    one = paired.seed_interval([0.5])
    assert one["mean"] == 0.5 and one["low"] is None and one["kind"] == "single seed"
    two = paired.seed_interval([0.3, 0.1])
    assert two["mean"] == pytest.approx(0.2) and (two["low"], two["high"]) == (0.1, 0.3) and two["kind"] == "min..max"
    three = paired.seed_interval([0.1, 0.2, 0.3])
    # by hand: sd = 0.1, half-width = 4.302653 * 0.1 / sqrt(3)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert three["kind"] == "t95" and three["mean"] == pytest.approx(0.2)
    assert (three["low"], three["high"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    with pytest.raises(ValueError):
        paired.seed_interval([])


def test_mcnemar_hand_computed_cases():
    # b = 1, c = 6: n = 7, P(X <= 1) = (1 + 7) / 128, two-sided 16/128
    hits_a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    hits_b = [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    hits_a[8], hits_b[8] = 1, 1  # a concordant pair (both right)
    out = paired.mcnemar_exact(hits_a, hits_b)
    assert (out["b"], out["c"], out["n"]) == (1, 6, 10)
    assert out["p_value"] == pytest.approx(0.125)
    assert paired.mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pair
    assert paired.binomial_two_sided_half(5, 10) == 1.0  # capped
    assert paired.binomial_two_sided_half(0, 5) == pytest.approx(2 / 32)
    # symmetric in A and B
    assert paired.mcnemar_exact(hits_b, hits_a)["p_value"] == out["p_value"]
    with pytest.raises(ValueError, match="same length"):
        paired.mcnemar_exact([1], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        paired.mcnemar_exact([2], [1])


def test_mcnemar_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for b in range(0, 25):
        for c in range(0, 25, 3):
            if b + c == 0:
                continue
            assert paired.binomial_two_sided_half(b, b + c) == pytest.approx(
                stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9), (b, c)


def test_paired_bootstrap_single_seed_matches_scipy_and_the_normal_approximation():
    rng = np.random.default_rng(7)
    a = rng.gamma(2.0, 0.1, size=200)
    b = a + rng.normal(0.02, 0.05, size=200)
    d = a - b
    out = paired.paired_bootstrap(a, b, n_resamples=20000, seed=3)
    assert out["mean_diff"] == pytest.approx(d.mean()) and out["n_rows"] == 200 and out["n_seeds"] == 1
    se = d.std(ddof=0) / math.sqrt(d.size)
    # the percentile interval is close to mean +- 1.96 SE for a near-normal mean (Monte Carlo error ~0.04 SE)
    assert out["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.2 * se)
    assert out["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.2 * se)
    stats = pytest.importorskip("scipy.stats")
    ref = stats.bootstrap((d,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                          random_state=11).confidence_interval
    assert out["ci_low"] == pytest.approx(ref.low, abs=0.15 * se)
    assert out["ci_high"] == pytest.approx(ref.high, abs=0.15 * se)


def test_paired_bootstrap_resamples_rows_jointly_across_seeds():
    """seeds x rows: the same row indices at every seed, i.e. the bootstrap of the seed-averaged per-row
    difference; identical seeds do not narrow the interval (they are not new rows)."""
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.3, size=(3, 50))
    b = rng.normal(0.9, 0.3, size=(3, 50))
    out = paired.paired_bootstrap(a, b, n_resamples=5000, seed=5)
    ref = paired.paired_bootstrap((a - b).mean(axis=0), np.zeros(50), n_resamples=5000, seed=5)
    assert (out["ci_low"], out["ci_high"]) == (ref["ci_low"], ref["ci_high"])
    assert out["mean_diff"] == pytest.approx((a - b).mean())
    assert out["per_seed"] == pytest.approx(list((a - b).mean(axis=1)))
    assert out["n_seeds"] == 3 and out["n_rows"] == 50
    one = paired.paired_bootstrap(a[0], b[0], n_resamples=5000, seed=5)
    same = paired.paired_bootstrap(np.stack([a[0]] * 3), np.stack([b[0]] * 3), n_resamples=5000, seed=5)
    assert (same["ci_low"], same["ci_high"]) == pytest.approx((one["ci_low"], one["ci_high"]))


def test_paired_bootstrap_is_seeded_and_checks_shapes():
    a, b = [0.3, 0.1, 0.4, 0.9, 0.2], [0.2, 0.2, 0.1, 0.5, 0.2]
    assert paired.paired_bootstrap(a, b, n_resamples=500, seed=1) == paired.paired_bootstrap(a, b, n_resamples=500, seed=1)
    assert paired.paired_bootstrap(a, b, n_resamples=500, seed=1) != paired.paired_bootstrap(a, b, n_resamples=500, seed=2)
    const = paired.paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], n_resamples=200)
    assert (const["mean_diff"], const["ci_low"], const["ci_high"]) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="same seeds x rows"):
        paired.paired_bootstrap([1.0, 2.0], [1.0, 2.0, 3.0])


def _record(acc, kl_rows=None, hits=None):
    q = {"vqa": {"accuracy": acc}, "kl": {"kl_mean": 0.1}}
    if kl_rows is not None:
        q["kl_per_row"] = kl_rows
    if hits is not None:
        q["vqa"]["hits"] = hits
    return {"quantized": q}


def test_compare_runs_pairs_common_seeds_and_computes_both_parts():
    hits_a = {0: [1, 1, 1, 0, 1, 1], 1: [1, 1, 0, 0, 1, 1]}
    hits_b = {0: [0, 1, 0, 0, 1, 0], 1: [1, 0, 0, 0, 1, 1], 2: [1, 1, 1, 1, 1, 1]}
    runs_a = {s: _record(np.mean(hits_a[s]), [0.1, 0.2, 0.3], hits_a[s]) for s in (0, 1)}
    runs_b = {s: _record(np.mean(hits_b[s]), [0.3, 0.2, 0.5], hits_b[s]) for s in (0, 1, 2)}
    out = paired.compare_runs(runs_a, runs_b, names=("mbq", "awq"), n_resamples=500)
    assert out["status"] == "ok" and out["seeds"] == [0, 1] and out["unpaired_seeds"] == {"awq": [2]}
    assert out["kl"]["mean_diff"] == pytest.approx(-0.4 / 3)
    assert out["accuracy_diff"] == pytest.approx(np.mean([3 / 6, 1 / 6]))
    assert out["hits"]["accuracy_diff"]["mean_diff"] == pytest.approx(out["accuracy_diff"])
    mc = out["hits"]["mcnemar"]
    assert [(m["seed"], m["b"], m["c"]) for m in mc] == [(0, 3, 0), (1, 1, 0)]
    assert mc[0]["p_value"] == pytest.approx(0.25)


def test_compare_runs_says_what_is_missing():
    with_rows = _record(0.5, [0.1, 0.2], [1, 0])
    bare = _record(0.4)
    out = paired.compare_runs({0: with_rows}, {0: bare}, names=("mbq_w3", "awq_w3a16"))
    assert out["status"] == "missing per-row data"
    assert "quantized.kl_per_row" in out["missing"] and "quantized.vqa.hits" in out["missing"]
    assert "awq_w3a16 (seed 0)" in out["missing"] and "mbq_w3" not in out["missing"]
    assert out["accuracy_diff"] == pytest.approx(0.1)  # the aggregate accuracies still compare
    # only the hits lack: the KL part is computed, the hits part says why not
    kl_only = paired.compare_runs({0: _record(0.5, [0.1, 0.2])}, {0: _record(0.4, [0.2, 0.2])}, names=("a", "b"),
                                  n_resamples=200)
    assert kl_only["status"] == "ok" and "mean_diff" in kl_only["kl"]
    assert "quantized.vqa.hits" in kl_only["hits"]["missing"] and "a (seed 0), b (seed 0)" in kl_only["hits"]["missing"]
    # one seed of several lacks the rows: named by seed
    part = paired.compare_runs({0: with_rows, 1: bare}, {0: with_rows, 1: with_rows}, names=("a", "b"))
    assert part["status"] == "missing per-row data" and "a (seed 1)" in part["missing"]
    # different row counts do not pair
    diff = paired.compare_runs({0: _record(0.5, [0.1, 0.2], [1, 0])}, {0: _record(0.5, [0.1], [1, 0])}, names=("a", "b"),
                               n_resamples=200)
    assert "lengths differ" in diff["kl"]["missing"] and diff["status"] == "ok"
    assert paired.compare_runs({}, {0: bare}, names=("a", "b")) == {
        "a": "a", "b": "b", "seeds": [], "unpaired_seeds": {}, "status": "to run", "missing": "a not run yet"}
    assert paired.compare_runs({1: bare}, {0: bare}, names=("a", "b"))["status"] == "no common seed"


def test_token_weighted_bootstrap_is_the_difference_of_token_averaged_kl():
    """Per-row KL means weighted by their token counts give the difference of the token-averaged KL
    (what main_job's kl_mean is); the interval matches scipy's paired bootstrap of that ratio."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(1, 6, size=80)
    per_token_a = [rng.gamma(2.0, 0.1, size=t) for t in tokens]
    per_token_b = [rng.gamma(2.0, 0.12, size=t) for t in tokens]
    a = [float(v.mean()) for v in per_token_a]
    b = [float(v.mean()) for v in per_token_b]
    out = paired.paired_bootstrap(a, b, n_resamples=20000, seed=2, weights=tokens)
    token_mean = np.concatenate(per_token_a).mean() - np.concatenate(per_token_b).mean()
    assert out["mean_diff"] == pytest.approx(token_mean) and out["weighted"]
    assert out["per_seed"] == [pytest.approx(token_mean)]
    # equal weights are the unweighted bootstrap, draw for draw
    plain = paired.paired_bootstrap(a, b, n_resamples=2000, seed=2)
    ones = paired.paired_bootstrap(a, b, n_resamples=2000, seed=2, weights=[1] * 80)
    assert (ones["ci_low"], ones["ci_high"]) == pytest.approx((plain["ci_low"], plain["ci_high"]))
    with pytest.raises(ValueError, match="weights"):
        paired.paired_bootstrap(a, b, weights=[1, 2])
    stats = pytest.importorskip("scipy.stats")
    d = np.asarray(a) - np.asarray(b)
    ref = stats.bootstrap((d, tokens.astype(float)), lambda x, w: np.sum(w * x) / np.sum(w), paired=True,
                          vectorized=False, n_resamples=20000, method="percentile", random_state=5).confidence_interval
    width = ref.high - ref.low
    assert out["ci_low"] == pytest.approx(ref.low, abs=0.06 * width)
    assert out["ci_high"] == pytest.approx(ref.high, abs=0.06 * width)


def test_compare_runs_weights_kl_by_tokens_when_every_record_has_them():
    a = {0: {"quantized": {"kl_per_row": [0.1, 0.4], "kl_tokens_per_row": [1, 3], "vqa": {"accuracy": 0.5}}}}
    b = {0: {"quantized": {"kl_per_row": [0.2, 0.2], "kl_tokens_per_row": [1, 3], "vqa": {"accuracy": 0.5}}}}
    out = paired.compare_runs(a, b, n_resamples=200)
    assert out["kl"]["weighting"] == "tokens"
    assert out["kl"]["mean_diff"] == pytest.approx((1 * -0.1 + 3 * 0.2) / 4)
    del b[0]["quantized"]["kl_tokens_per_row"]
    out = paired.compare_runs(a, b, n_resamples=200)
    assert out["kl"]["weighting"].startswith("rows") and out["kl"]["mean_diff"] == pytest.approx(0.05)
