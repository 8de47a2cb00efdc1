"""Which block objective should Q-VLM's range search minimise? (issue #24, item 1)

Q-VLM chooses weight ranges per block by minimising an error at the block's output (Eq. 3: the
residual-stream MSE). An objective is only worth searching with if it ranks candidate ranges the way
the metric we report does. This script measures that, on the default model, with plain PyTorch
(no product code in the loop, so it also checks the product's objectives independently):

- **Candidates**: the ranges the search chooses between. For one decoder layer ``b`` at a time (the
  rest of the model in full precision), its Linears are fake-quantized (asymmetric int, per group)
  with clip ratio ``r`` per Linear (group range ``[r min, r max]``, AWQ's clip form): every Linear at
  one ratio from ``--ratios``, and ``--random-variants`` random per-Linear mixes of them.
- **Candidate objectives**, on held-out calibration-like rows (easy-vqa TRAIN questions and captions,
  not the search's rows), at layer ``b``'s output ``h`` against the full-precision ``h_fp``:
  ``mse`` (Eq. 3), ``token_relative_mse`` (each token's error over ``||h_fp,t||^2``), ``mse_skip_first``
  (without position 0, the attention sink), ``next_norm_mse`` (error after the next layer's RMSNorm
  with its gain: what layer ``b+1`` reads), ``assistant_turn_mse`` (the labelled assistant-turn tokens
  only) and ``logit_lens_kl`` (KL of ``lm_head(norm(h))`` at the assistant-turn positions).
- **Target**: teacher-forced KL(FP || quantized) over every assistant-turn token of held-out TEST rows
  (questions and composed captions), the matrix's primary metric.

Per layer: Spearman's rho of each objective with the target over the candidates, and the regret of
searching with it (target KL of the objective's best candidate over the best target KL). Output: a
table (``--out``.md) and the raw numbers (``--out``.json).

    python eval/validate_qvlm_objective.py                      # W4 g64, 8 layers, ~25 CPU-min
    python eval/validate_qvlm_objective.py --bits 3 --layers 2 11 20
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

EVAL_DIR = Path(__file__).resolve().parent
OBJECTIVES = ("mse", "token_relative_mse", "mse_skip_first", "next_norm_mse", "assistant_turn_mse", "logit_lens_kl")


# ------------------------------------------------------------------------------------------ the math
def fake_quant(weight: torch.Tensor, bits: int, group_size: int, ratio: float) -> torch.Tensor:
    """Asymmetric round-to-nearest per group of ``group_size`` input columns, group range
    ``[ratio * min(w, 0), ratio * max(w, 0)]`` (ratio 1 = min/max, plain RTN; weights outside clip)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
    w = weight.reshape(out_features, in_features // group_size, group_size)
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0) * ratio
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0) * ratio
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-10)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(out_features, in_features)


def objectives(h_q: torch.Tensor, h_fp: torch.Tensor, mask: torch.Tensor, next_norm, final_norm, lm_head) -> dict:
    """Candidate objectives of one row: ``h_*`` (tokens, hidden); ``mask`` (tokens,) 1 on assistant-turn
    tokens. Returns per-objective (sum, count) so rows pool by token."""
    err = (h_q - h_fp).pow(2)  # (T, d)
    tok = err.sum(-1)
    d = h_fp.shape[-1]
    out = {
        "mse": (float(tok.sum()), tok.numel() * d),
        "token_relative_mse": (float((tok / h_fp.pow(2).sum(-1).clamp(min=1e-12)).sum()), tok.numel()),
        "mse_skip_first": (float(tok[1:].sum()), (tok.numel() - 1) * d),
        "next_norm_mse": (float((next_norm(h_q) - next_norm(h_fp)).pow(2).sum()), tok.numel() * d),
    }
    labelled = mask.bool()
    out["assistant_turn_mse"] = (float(tok[labelled].sum()), int(labelled.sum()) * d)
    # position t predicts token t+1: the logits that score the assistant turn sit one position earlier
    predicting = torch.zeros_like(labelled)
    predicting[:-1] = labelled[1:]
    p = torch.log_softmax(lm_head(final_norm(h_fp[predicting])).float(), -1)
    q = torch.log_softmax(lm_head(final_norm(h_q[predicting])).float(), -1)
    out["logit_lens_kl"] = (float((p.exp() * (p - q)).sum()), int(predicting.sum()))
    return out


def spearman(x, y) -> float:
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # a constant objective ranks nothing: rho 0, not a warning and NaN
        warnings.simplefilter("ignore")
        rho = spearmanr(x, y).statistic
    return float(rho) if not math.isnan(rho) else 0.0


# ------------------------------------------------------------------------------------------ the runs
class _Stop(Exception):
    pass


def layer_outputs(model, layer: torch.nn.Module, rows) -> list[torch.Tensor]:
    """Each row's output of ``layer`` (tokens, hidden); the forward stops there."""
    from qvlm_modifiers.data import collate_fn

    captured = []

    def hook(_module, _args, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[0].detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        for r in range(len(rows)):
            batch = collate_fn([rows[r]])
            batch.pop("loss_mask", None)
            try:
                with torch.no_grad():
                    model(**batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def candidates(names: list[str], ratios: list[float], random_variants: int, rng: random.Random) -> list[dict]:
    """Every Linear at one ratio, then random per-Linear mixes (no repeats)."""
    out = [{n: r for n in names} for r in ratios]
    seen = {tuple(sorted(c.items())) for c in out}
    while len(out) < len(ratios) + random_variants:
        c = {n: rng.choice(ratios) for n in names}
        if tuple(sorted(c.items())) not in seen:
            seen.add(tuple(sorted(c.items())))
            out.append(c)
    return out


def run(args) -> dict:
    from qvlm_eval import main_job, metrics
    from qvlm_eval.default_model import ensure_default_model
    from qvlm_modifiers.data import build_calibration_dataset

    torch.set_num_threads(args.threads)
    path = ensure_default_model(main_job.DEFAULT_MODEL_DIR)
    model, processor = metrics.load_model_and_processor(path, dtype=torch.float32)
    model.eval()
    text_model = model.model.text_model
    layers = text_model.layers
    pairs = main_job.calibration_pairs(args.objective_rows, args.seed, caption_fraction=0.5)
    obj_rows = build_calibration_dataset(pairs, processor, model, prompt_column="question", text_column="text",
                                         shuffle=False)
    target_rows = metrics.assistant_turn_rows(args.target_rows // 2, args.target_rows - args.target_rows // 2,
                                              seed=1)
    masks = [torch.tensor(obj_rows[r]["loss_mask"]).reshape(-1) for r in range(len(obj_rows))]
    with torch.no_grad():
        fp_target = metrics.answer_logprobs(model, processor, target_rows)
    rng = random.Random(args.seed)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "layers": {}}
    for b in args.layers:
        t0 = time.perf_counter()
        next_norm = layers[b + 1].input_layernorm if b + 1 < len(layers) else text_model.norm
        fp_h = layer_outputs(model, layers[b], obj_rows)
        linears = [(n, m) for n, m in layers[b].named_modules() if isinstance(m, torch.nn.Linear)]
        originals = {n: m.weight.data.clone() for n, m in linears}
        rows = []
        for cand in candidates([n for n, _ in linears], args.ratios, args.random_variants, rng):
            for n, m in linears:
                m.weight.data = fake_quant(originals[n], args.bits, args.group_size, cand[n])
            with torch.no_grad():
                q_h = layer_outputs(model, layers[b], obj_rows)
                sums = {k: [0.0, 0] for k in OBJECTIVES}
                for hq, hf, mask in zip(q_h, fp_h, masks):
                    for k, (s, c) in objectives(hq, hf, mask, next_norm, text_model.norm, model.lm_head).items():
                        sums[k][0] += s
                        sums[k][1] += c
                target = metrics.assistant_turn_kl(fp_target, metrics.answer_logprobs(model, processor, target_rows),
                                                   kinds=target_rows["kind"])
            rows.append({"ratios": cand, **{k: s / max(c, 1) for k, (s, c) in sums.items()},
                         "target_kl": target["kl_mean"]})
        for n, m in linears:
            m.weight.data = originals[n]
        best_target = min(r["target_kl"] for r in rows)
        summary = {}
        for k in OBJECTIVES:
            chosen = min(rows, key=lambda r: r[k])
            summary[k] = {"spearman": spearman([r[k] for r in rows], [r["target_kl"] for r in rows]),
                          "regret": chosen["target_kl"] / best_target}
        result["layers"][b] = {"candidates": rows, "summary": summary, "seconds": time.perf_counter() - t0}
        print(f"[validate] layer {b}: " + ", ".join(f"{k} rho {v['spearman']:+.2f}" for k, v in summary.items())
              + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    result["overall"] = {
        k: {"mean_spearman": statistics.fmean(result["layers"][b]["summary"][k]["spearman"] for b in args.layers),
            "min_spearman": min(result["layers"][b]["summary"][k]["spearman"] for b in args.layers),
            "mean_regret": statistics.fmean(result["layers"][b]["summary"][k]["regret"] for b in args.layers),
            "max_regret": max(result["layers"][b]["summary"][k]["regret"] for b in args.layers)}
        for k in OBJECTIVES
    }
    return result


def table(result: dict) -> str:
    s = result["settings"]
    layers = list(result["layers"])
    lines = [
        f"# Q-VLM block objectives vs assistant-turn KL (W{s['bits']} g{s['group_size']}, default model)",
        "",
        f"`python eval/validate_qvlm_objective.py {' '.join(s['argv'])}`".replace("  ", " "),
        "",
        f"One decoder layer at a time quantized (rest FP); {s['ratios'].__len__()} uniform clip ratios "
        f"{s['ratios']} + {s['random_variants']} random per-Linear mixes = "
        f"{len(s['ratios']) + s['random_variants']} candidates per layer. Objectives on {s['objective_rows']} "
        f"held-out TRAIN rows (half captions); target = assistant-turn KL on {s['target_rows']} TEST rows "
        "(half questions, half captions). rho = Spearman over the candidates; regret = target KL of the "
        "objective's best candidate / best target KL (1.00 = it picks the best).",
        "",
        "| objective | mean rho | min rho | " + " | ".join(f"L{b} rho" for b in layers)
        + " | mean regret | max regret |",
        "|---|---|---|" + "---|" * len(layers) + "---|---|",
    ]
    order = sorted(OBJECTIVES, key=lambda k: -result["overall"][k]["mean_spearman"])
    for k in order:
        o = result["overall"][k]
        per = " | ".join(f"{result['layers'][b]['summary'][k]['spearman']:+.2f}" for b in layers)
        lines.append(f"| {k} | {o['mean_spearman']:+.2f} | {o['min_spearman']:+.2f} | {per} | "
                     f"{o['mean_regret']:.2f} | {o['max_regret']:.2f} |")
    lines += ["", f"Best by mean rho: **{order[0]}**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 5, 9, 13, 17, 21, 25, 29])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.85, 0.8, 0.7])
    parser.add_argument("--random-variants", type=int, default=6)
    parser.add_argument("--objective-rows", type=int, default=12)
    parser.add_argument("--target-rows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=11, help="objective rows' draw and the random mixes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(EVAL_DIR / "results" / "smolvlm-tiny-v2" / "qvlm_objectives"),
                        help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if any(not 0 < r <= 1 for r in args.ratios) or 1.0 not in args.ratios:
        parser.error("--ratios are clip ratios in (0, 1] and must include 1.0 (min/max, RTN)")
    if args.random_variants < 0 or args.objective_rows < 1 or args.target_rows < 2:
        parser.error("--random-variants >= 0, --objective-rows >= 1, --target-rows >= 2")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
