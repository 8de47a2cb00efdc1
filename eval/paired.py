"""Paired statistics for the experiment matrix (issue #22): summaries over calibration seeds, a paired
bootstrap on per-row KL differences and McNemar's exact test on per-question hits.

Pure functions on plain lists / numpy arrays and on the records eval/main_job.py writes; nothing here
loads a model. The per-row data a comparison needs come from each record's

* ``quantized.kl_per_row``: KL(FP || Q) of each held-out KL row (list of floats, one per row, the same
  row order in every record of a model: the rows are drawn with ``--seed``, not ``--calib-seed``);
* ``quantized.kl_tokens_per_row`` (optional): the answer tokens of each KL row; when every paired
  record has the same counts the KL difference is token-weighted, the difference of the records'
  token-averaged ``kl.kl_mean``; without them each row weighs the same;
* ``quantized.vqa.hits``: 1/0 per easy-vqa test question (exact match), the same question order in
  every record.

A record without them (written before main_job recorded them) is named in the comparison's
``missing`` text, never skipped silently and never a crash.

Design of the paired bootstrap over seeds x rows: a cell run at several calibration seeds is evaluated
on the *same* rows at every seed (only the calibration draw changes), so the row is the sampling unit
and the seeds are repeated measurements of it. One bootstrap replicate draws row indices with
replacement once and uses those rows at every seed; the statistic is the mean over seeds of the mean
over the drawn rows of (A - B). That equals a plain paired bootstrap on the seed-averaged per-row
difference. Drawing rows independently per seed would treat the seeds' copies of a row as independent
rows and give too narrow an interval. The interval covers row-sampling noise of the seed-averaged
difference; the spread between calibration seeds is reported beside it (``per_seed``), not folded in
(with 1-3 seeds it cannot be estimated by resampling).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

KL_FIELD = "quantized.kl_per_row"
KL_TOKENS_FIELD = "quantized.kl_tokens_per_row"
HITS_FIELD = "quantized.vqa.hits"

# two-sided 95% quantile of Student's t, df = 1..30 (checked against scipy.stats.t.ppf in the tests)
_T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then a
    Cornish-Fisher expansion around 1.959964, within 1e-4 of the exact value past df 30)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963985
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seed_interval(values: Sequence[float]) -> dict:
    """Mean of a metric over calibration seeds and an interval over seeds.

    n = 1: the value, no interval (``kind: "single seed"``); n = 2: min..max (``"min..max"``, a t
    interval on 1 degree of freedom is 12.7 standard errors wide and says little); n >= 3: mean +- t
    (0.975, n-1) * sd / sqrt(n) (``"t95"``, sd with n-1 in the denominator)."""
    x = [float(v) for v in values]
    if not x:
        raise ValueError("seed_interval of no values")
    n, mean = len(x), sum(x) / len(x)
    if n == 1:
        return {"n": 1, "mean": mean, "low": None, "high": None, "kind": "single seed", "values": x}
    if n == 2:
        return {"n": 2, "mean": mean, "low": min(x), "high": max(x), "kind": "min..max", "values": x}
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "kind": "t95", "sd": sd, "values": x}


def _seeds_by_rows(values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected rows or seeds x rows of numbers, got shape {arr.shape}")
    return arr


def paired_bootstrap(a, b, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
                     weights=None) -> dict:
    """Paired percentile bootstrap of mean(A - B).

    ``a`` and ``b``: one value per row (1-D) or seeds x rows (2-D; row i is the same item at every seed,
    seed s the same calibration seed for both methods). ``weights`` (one per row, e.g. the answer tokens
    of each KL row) make every mean a weighted one, sum(w * d) / sum(w): with per-row KL means and token
    counts that is the difference of the token-averaged ``kl_mean`` of the two records. Returns
    ``mean_diff`` (mean over seeds of the mean over rows), ``ci_low``/``ci_high`` (percentile interval;
    rows resampled with the same indices at every seed, see the module docstring; a weighted replicate
    is the ratio sum(w d) / sum(w) over the drawn rows), ``per_seed`` (mean difference at each seed),
    ``n_rows``, ``n_seeds``, ``n_resamples``, ``confidence``, ``seed`` (the resampling is reproducible)
    and ``weighted``."""
    da, db = _seeds_by_rows(a), _seeds_by_rows(b)
    if da.shape != db.shape:
        raise ValueError(f"paired data must have the same seeds x rows, got {da.shape} and {db.shape}")
    diff = da - db
    per_row = diff.mean(axis=0)  # seed-averaged difference of each row
    n = per_row.size
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got shape {w.shape}")
    wd = w * per_row
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        stats[start:stop] = wd[idx].sum(axis=1) / w[idx].sum(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return {"mean_diff": float(wd.sum() / w.sum()), "ci_low": float(low), "ci_high": float(high),
            "per_seed": [float(v) for v in (diff * w).sum(axis=1) / w.sum()], "n_rows": int(n),
            "n_seeds": int(diff.shape[0]), "n_resamples": int(n_resamples), "confidence": confidence, "seed": seed,
            "weighted": weights is not None}


def binomial_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n trials at p = 1/2: 2 * P(X <= min(k, n-k)), capped at 1
    (the symmetric null makes this the same as the 'as likely or less likely' rule)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar_exact(hits_a: Sequence[int], hits_b: Sequence[int]) -> dict:
    """McNemar's exact test on paired 0/1 outcomes: ``b`` = A right and B wrong, ``c`` = A wrong and B
    right; p = exact two-sided binomial test of b among the b + c discordant pairs at 1/2."""
    if len(hits_a) != len(hits_b):
        raise ValueError(f"paired hits must have the same length, got {len(hits_a)} and {len(hits_b)}")
    bad = {v for v in list(hits_a) + list(hits_b) if v not in (0, 1, True, False)}
    if bad:
        raise ValueError(f"hits must be 0/1, got {sorted(bad)[:5]}")
    b = sum(1 for x, y in zip(hits_a, hits_b) if x and not y)
    c = sum(1 for x, y in zip(hits_a, hits_b) if y and not x)
    return {"b": b, "c": c, "n": len(hits_a), "p_value": binomial_two_sided_half(b, b + c)}


# ------------------------------------------------------------------------------- records of main_job
def field(record: Mapping, dotted: str) -> Any:
    """``record["quantized"]["vqa"]["hits"]`` for ``"quantized.vqa.hits"``; None when absent."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _describe(missing: Mapping[str, list[int]]) -> str:
    return ", ".join(f"{name} (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})"
                     for name, seeds in missing.items())


def _per_row(runs_a: Mapping[int, Mapping], runs_b: Mapping[int, Mapping], seeds: list[int], dotted: str,
             names: tuple[str, str]) -> tuple[np.ndarray | None, np.ndarray | None, dict | None, str | None]:
    """seeds x rows arrays of ``dotted`` for both sides, or the records lacking it (``{name: seeds}``),
    or why the rows do not pair (lengths differ)."""
    missing = {name: [s for s in seeds if field(runs[s], dotted) is None] for name, runs in zip(names, (runs_a, runs_b))}
    missing = {name: s for name, s in missing.items() if s}
    if missing:
        return None, None, missing, None
    rows_a = [list(field(runs_a[s], dotted)) for s in seeds]
    rows_b = [list(field(runs_b[s], dotted)) for s in seeds]
    lengths = {len(r) for r in rows_a + rows_b}
    if len(lengths) != 1 or 0 in lengths:
        return None, None, None, (f"{dotted} lengths differ ({names[0]}: {[len(r) for r in rows_a]}, "
                                  f"{names[1]}: {[len(r) for r in rows_b]}): not the same rows")
    return np.asarray(rows_a, dtype=np.float64), np.asarray(rows_b, dtype=np.float64), None, None


RERUN = "recorded before main_job wrote it; rerun those runs"


def _token_weights(runs_a, runs_b, seeds, n_rows) -> tuple[list[int] | None, str]:
    """The rows' answer-token counts when every paired record carries the same ones, else None and why
    the rows weigh equally."""
    counts = [field(runs[s], KL_TOKENS_FIELD) for runs in (runs_a, runs_b) for s in seeds]
    if any(c is None for c in counts):
        return None, f"rows (no {KL_TOKENS_FIELD} in every record)"
    if any(list(c) != list(counts[0]) for c in counts) or len(counts[0]) != n_rows:
        return None, f"rows ({KL_TOKENS_FIELD} differ between the records)"
    return list(counts[0]), "tokens"


def compare_runs(runs_a: Mapping[int, Mapping], runs_b: Mapping[int, Mapping], names: tuple[str, str] = ("A", "B"),
                 n_resamples: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of two cells from their records by calibration seed (``{seed: record}``).

    Seeds present for both are paired (a seed only one side has is listed in ``unpaired_seeds``).
    ``status``: ``"to run"`` (a side has no record), ``"no common seed"``, ``"missing per-row data"``
    (neither KL nor hits can be paired; ``missing`` says which record lacks which field) or ``"ok"``
    (at least one part computed; a part that could not be is ``{"missing": why}``). Differences are
    A - B: a negative KL difference and a positive accuracy difference favour A."""
    out: dict = {"a": names[0], "b": names[1], "seeds": [], "unpaired_seeds": {}}
    if not runs_a or not runs_b:
        out.update(status="to run", missing=" and ".join(n for n, r in zip(names, (runs_a, runs_b)) if not r)
                   + " not run yet")
        return out
    seeds = sorted(set(runs_a) & set(runs_b))
    out["seeds"] = seeds
    out["unpaired_seeds"] = {n: sorted(set(r) - set(seeds)) for n, r in zip(names, (runs_a, runs_b))
                             if set(r) - set(seeds)}
    if not seeds:
        out.update(status="no common seed",
                   missing=f"{names[0]} has seeds {sorted(runs_a)}, {names[1]} has {sorted(runs_b)}")
        return out
    accs = [(field(runs_a[s], "quantized.vqa.accuracy"), field(runs_b[s], "quantized.vqa.accuracy")) for s in seeds]
    if all(x is not None and y is not None for x, y in accs):
        out["accuracy_diff"] = float(np.mean([x - y for x, y in accs]))
    ka, kb, kl_missing, kl_why = _per_row(runs_a, runs_b, seeds, KL_FIELD, names)
    ha, hb, hits_missing, hits_why = _per_row(runs_a, runs_b, seeds, HITS_FIELD, names)
    if kl_missing:
        kl_why = f"no {KL_FIELD} in {_describe(kl_missing)}: {RERUN}"
    if hits_missing:
        hits_why = f"no {HITS_FIELD} in {_describe(hits_missing)}: {RERUN}"
    if kl_why:
        out["kl"] = {"missing": kl_why}
    else:
        weights, weighting = _token_weights(runs_a, runs_b, seeds, ka.shape[1])
        out["kl"] = {**paired_bootstrap(ka, kb, n_resamples=n_resamples, seed=seed, weights=weights),
                     "weighting": weighting}
    if hits_why:
        out["hits"] = {"missing": hits_why}
    else:
        out["hits"] = {"accuracy_diff": paired_bootstrap(ha, hb, n_resamples=n_resamples, seed=seed),
                       "mcnemar": [{"seed": s, **mcnemar_exact(ha[i].astype(int).tolist(), hb[i].astype(int).tolist())}
                                   for i, s in enumerate(seeds)]}
    if kl_why and hits_why:
        out["status"] = "missing per-row data"
        if kl_missing and kl_missing == hits_missing:
            out["missing"] = f"no {KL_FIELD} nor {HITS_FIELD} in {_describe(kl_missing)}: {RERUN.replace('it;', 'them;')}"
        else:
            out["missing"] = f"{kl_why}; {hits_why}"
    else:
        out["status"] = "ok"
    return out
