"""Sweep of Q-VLM's visual-encoder optimization (VEO, Eq. 8-10) weights on the default model.

    python eval/sweep_vision_opt.py                        # the default grid on the embedded default model
    python eval/sweep_vision_opt.py --configs none 0.1,1,0.5 0.1,1,0.5@1 --vision-epochs 2

The paper gives no values for lambda1 (``vision_lambda_ent``), lambda2 (``vision_lambda_err``), eta
(``vision_eta``) or the number of steps. For each configuration this script

1. quantizes a fresh in-memory copy of the model with ``QVLMModifier``: the vision tower at W4A4 like
   ``recipes/qvlm_w4a4.yaml`` (int4 asymmetric per-channel weights, int4 asymmetric dynamic per-token
   activations; per-channel has no group size to divide the widths; ``quantize_vision_tower: true``), the
   language model's decoder Linears at ``--lm-scheme`` (default W8A8: the LM at W4A4 destroys this small
   model and hides every vision-side difference; ``fp`` leaves it unquantized), through
   ``qvlm_modifiers.oneshot`` (which turns on the loss masks VEO's next-token term reads). The
   checkpoint is not saved (transformers 5.17 does not reload packed SigLIP-style vision towers): the
   in-memory, fake-quantized model that oneshot leaves is evaluated;
2. measures easy-vqa TEST exact match (greedy, the same questions for every configuration), KL(FP || Q)
   on the answer tokens of held-out TEST rows, the relative error of the visual tokens (projector output,
   what VEO optimizes) on those rows' images, and the calibration wall / CPU time;
3. compares every configuration with the first one (the baseline, normally ``none`` = no VEO) on the same
   questions/rows: paired bootstrap 95% intervals of the accuracy and KL differences;
4. writes ``veo_sweep.json`` and ``veo_sweep.md`` into ``--results-dir`` after every configuration
   (``--resume`` skips configurations already measured with the same settings).

The language-model side is identical in every configuration: with ``search_epochs: 0`` (default) the
decoder Linears get their lp-norm ranges, which depend on the weights only (dynamic per-token activations
have no static range), so the decoder's quantized weights do not depend on the vision stage; the JSON
records a hash of them per configuration to show it. Without VEO the vision tower gets the same lp-norm
ranges; with VEO they are learned.

Configuration syntax: ``none`` (no VEO) or ``LAMBDA_ENT,LAMBDA_ERR,ETA``, optionally ``@SEED`` for another
calibration-row draw (measures the calibration-data noise of VEO).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

EVAL_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = EVAL_DIR / ".models" / "smolvlm-tiny-v2"  # the default test bed (v2)

# The issue's grid: baseline without VEO, the provisional default, then one factor changed at a time.
DEFAULT_CONFIGS = ["none", "0.1,1,0.5", "0,1,0.5", "1,1,0.5", "0.1,0,0.5", "0.1,1,0", "0.1,1,1"]

def shipped_scheme(recipe: str) -> dict:
    """The quantization scheme (group_0 without targets) of a shipped Q-VLM recipe, so the sweep stays
    in step with ``recipes/<recipe>.yaml``."""
    import yaml

    from qvlm_modifiers import recipe_path

    spec = yaml.safe_load(Path(recipe_path(recipe)).read_text())
    group = spec["quant_stage"]["quant_modifiers"]["QVLMModifier"]["config_groups"]["group_0"]
    return {k: v for k, v in group.items() if k != "targets"}


W4A4 = shipped_scheme("qvlm_w4a4")  # int4 asym per-channel weights, int4 asym dynamic per-token activations

# The language model's scheme (--lm-scheme). The vision tower is always W4A4. The 2026-11-25 sweep ran the
# LM at W4A4 too, which destroyed SmolLM2-135M (0% accuracy, KL 16 nats) and left nothing for VEO to
# change: a milder LM scheme lets the vision-side differences show.
LM_SCHEMES = {
    "w4a4": W4A4,
    "w8a8": shipped_scheme("qvlm_w8a8"),
    # qvlm_w4 is group 128, which SmolLM2's widths do not divide: per-channel here
    "w4a16": {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}},
    "fp": None,
}
LM_SCHEME_TEXT = {
    "w4a4": "int4 asym per-channel weights, int4 asym dynamic per-token activations",
    "w8a8": "int8 sym per-channel weights, int8 sym dynamic per-token activations",
    "w4a16": "int4 asym per-channel weights only",
    "fp": "not quantized",
}

Q4_NOTE = (
    "The default model's LM is SmolLM2-135M-Instruct from a Q4_1 GGUF (block 32), dequantized: its weights "
    "already lie on a 4-bit grid, so W4 weight quantization of the LM is easier here than on a natively bf16 model."
)

# settings that change the measurements (a resumed sweep must match them)
_MEASUREMENT_ARGS = ("calib_samples", "vision_epochs", "vision_lr", "search_epochs", "vqa_questions", "kl_rows",
                     "batch_size", "seed", "max_block_layers", "lm_scheme")


def parse_config(spec: str) -> dict:
    """``none`` / ``none@S`` or ``l_ent,l_err,eta[@S]`` -> a configuration record."""
    text, _, seed = spec.strip().partition("@")
    calib_seed = int(seed) if seed else None
    if text.lower() in ("none", "off", "no"):
        return {"name": spec, "optimize_vision_encoder": False, "lambda_ent": None, "lambda_err": None, "eta": None,
                "calib_seed": calib_seed}
    try:
        lambda_ent, lambda_err, eta = (float(v) for v in text.split(","))
    except ValueError as err:
        raise SystemExit(f"error: configuration {spec!r} is not 'none' or 'LAMBDA_ENT,LAMBDA_ERR,ETA[@SEED]' "
                         f"(e.g. 0.1,1,0.5)") from err
    if min(lambda_ent, lambda_err, eta) < 0:
        raise SystemExit(f"error: configuration {spec!r} has a negative weight; lambda1, lambda2 and eta are >= 0")
    return {"name": spec, "optimize_vision_encoder": True, "lambda_ent": lambda_ent, "lambda_err": lambda_err,
            "eta": eta, "calib_seed": calib_seed}


def scheme_groups(model, lm_scheme: str) -> dict:
    """config_groups: W4A4 on the vision tower's Linears, ``LM_SCHEMES[lm_scheme]`` on the decoder layers'
    Linears (none for ``fp``). Targets are the modules' exact names (compressed-tensors matches a plain
    target by name), so no norm or projector is caught."""
    from qvlm_modifiers.families import get_family

    family = get_family(model)
    vision = [f"{family.vision_tower}.{n}" for n, _ in _linears(model.get_submodule(family.vision_tower))]
    decoder = [f"{family.layers}.{n}" for n, _ in _linears(model.get_submodule(family.layers))]
    if not vision or not decoder:
        raise RuntimeError(f"no Linear found in {family.vision_tower if not vision else family.layers}")
    groups = {"vision": {**W4A4, "targets": vision}}
    if LM_SCHEMES[lm_scheme] is not None:
        groups["language_model"] = {**copy.deepcopy(LM_SCHEMES[lm_scheme]), "targets": decoder}
    return copy.deepcopy(groups)


def make_modifier(config: dict, args, model):
    from qvlm_modifiers.qvlm import QVLMModifier

    fields = dict(config_groups=scheme_groups(model, args.lm_scheme),
                  max_block_layers=args.max_block_layers, search_epochs=args.search_epochs,
                  quantize_vision_tower=True, optimize_vision_encoder=config["optimize_vision_encoder"])
    if config["optimize_vision_encoder"]:
        fields.update(vision_lambda_ent=config["lambda_ent"], vision_lambda_err=config["lambda_err"],
                      vision_eta=config["eta"], vision_lr=args.vision_lr, vision_epochs=args.vision_epochs)
    return QVLMModifier(**fields)


def _linears(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def tensors_sha(module, attributes: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name, m in _linears(module):
        for attr in attributes:
            t = getattr(m, attr, None)
            if t is not None:
                digest.update(name.encode() + attr.encode())
                digest.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def vision_scales(model) -> dict[str, torch.Tensor]:
    from qvlm_modifiers.families import get_family

    vision = model.get_submodule(get_family(model).vision_tower)
    return {n: m.weight_scale.detach().float().clone() for n, m in _linears(vision) if hasattr(m, "weight_scale")}


def evaluate(model, processor, vqa_rows, kl_rows, batch_size: int) -> dict:
    """Greedy VQA answers, answer-token log-probs and the projector outputs on the KL rows' images."""
    from qvlm_eval import metrics
    from qvlm_modifiers.families import get_family

    t = time.perf_counter()
    vqa = metrics.evaluate_vqa(model, processor, vqa_rows, batch_size=batch_size)
    projector = model.get_submodule(get_family(model).projector)
    visual: list[torch.Tensor] = []
    handle = projector.register_forward_hook(
        lambda _m, _a, out: visual.append((out[0] if isinstance(out, tuple) else out).detach().float().cpu()))
    try:
        logprobs = metrics.answer_logprobs(model, processor, kl_rows)
    finally:
        handle.remove()
    return {"vqa": vqa, "logprobs": logprobs, "visual": visual, "eval_s": time.perf_counter() - t}


def hits(predictions, answers) -> np.ndarray:
    from qvlm_eval.metrics import normalize_answer

    return np.array([float(normalize_answer(p) == normalize_answer(a)) for p, a in zip(predictions, answers)])


def row_kl(fp_logprobs, q_logprobs) -> tuple[np.ndarray, np.ndarray]:
    """Per KL row: summed KL over its answer tokens, and its token count."""
    from qvlm_eval.metrics import kl_divergence

    sums, counts = [], []
    for p, q in zip(fp_logprobs, q_logprobs):
        values = kl_divergence(p, q)
        sums.append(float(values.sum()))
        counts.append(values.numel())
    return np.array(sums), np.array(counts, dtype=np.float64)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None, n_resamples: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """``mean(b) - mean(a)`` over the same items with a paired percentile-bootstrap 95% interval (the
    items are resampled together for both). With ``weights`` (per-item token counts), ``a``/``b`` are
    per-item sums and the means are ratio estimators ``sum(a)/sum(weights)`` (mean per token)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_resamples, a.size))
    if weights is None:
        diffs = b[idx].mean(axis=1) - a[idx].mean(axis=1)
        point = float(b.mean() - a.mean())
    else:
        diffs = (b[idx].sum(axis=1) - a[idx].sum(axis=1)) / weights[idx].sum(axis=1)
        point = float((b.sum() - a.sum()) / weights.sum())
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {"diff": point, "ci_low": float(low), "ci_high": float(high), "significant": bool(low > 0 or high < 0)}


def relative_visual_error(fp_visual, q_visual) -> float:
    num = sum(float((q - r).pow(2).sum()) for q, r in zip(q_visual, fp_visual))
    den = sum(float(r.pow(2).sum()) for r in fp_visual)
    return num / den


def run_config(config, args, fp_model, processor, calib_cache, vqa_rows, kl_rows, fp, baseline_scales):
    import qvlm_modifiers
    from qvlm_eval import metrics
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.families import get_family

    calib_seed = args.seed if config["calib_seed"] is None else config["calib_seed"]
    if calib_seed not in calib_cache:
        pairs = calibration_pairs(args.calib_samples, calib_seed)
        calib_cache[calib_seed] = build_calibration_dataset(pairs, processor, fp_model, prompt_column="question",
                                                            text_column="text")
    calib = calib_cache[calib_seed]
    torch.manual_seed(args.seed)
    q_model = copy.deepcopy(fp_model)
    recipe = make_modifier(config, args, q_model)
    cpu0 = time.process_time()
    _, usage = metrics.measure_resources(lambda: qvlm_modifiers.oneshot(
        model=q_model, processor=processor, dataset=calib, recipe=recipe, num_calibration_samples=len(calib)))
    cpu_s = time.process_time() - cpu0
    family = get_family(q_model)
    meta = getattr(q_model.config, "qvlm_blocks", None) or {}
    veo = meta.get("visual_encoder_optimization")
    scales = vision_scales(q_model)
    if not scales:
        raise RuntimeError("the vision tower has no quantized Linear: quantize_vision_tower did not take effect")
    result = evaluate(q_model, processor, vqa_rows, kl_rows, args.batch_size)
    kl_sums, kl_counts = row_kl(fp["logprobs"], result["logprobs"])
    record = {
        **config,
        "calib_seed": calib_seed,
        "vqa": {k: v for k, v in result["vqa"].items() if k != "predictions"},
        "predictions": result["vqa"]["predictions"],
        "answers_identical_to_fp": float(np.mean([a == b for a, b in zip(fp["predictions"],
                                                                          result["vqa"]["predictions"])])),
        "kl": metrics.mean_kl(fp["logprobs"], result["logprobs"]),
        "kl_row_sums": kl_sums.tolist(),
        "kl_row_tokens": kl_counts.astype(int).tolist(),
        "visual_rel_mse": relative_visual_error(fp["visual"], result["visual"]),
        "calibration": {**usage.as_dict(), "cpu_s": cpu_s},
        "eval_s": result["eval_s"],
        "veo": None if veo is None else {
            "epochs": veo["epochs"], "lr": veo["lr"], "history": veo["history"],
            "objective_first": veo["history"][0]["total"], "objective_last": veo["history"][-1]["total"],
        },
        "language_model_weights_sha": tensors_sha(q_model.get_submodule(family.language_model),
                                                  ("weight", "weight_scale", "weight_zero_point")),
        "vision_scales_sha": tensors_sha(q_model.get_submodule(family.vision_tower), ("weight_scale",
                                                                                      "weight_zero_point")),
    }
    if baseline_scales is not None:
        ratios = [torch.log(scales[n].clamp_min(1e-12) / baseline_scales[n].clamp_min(1e-12)).abs().mean()
                  for n in scales if n in baseline_scales]
        record["vision_scale_mean_abs_log_ratio_vs_baseline"] = float(torch.stack(ratios).mean()) if ratios else None
    del q_model
    return record, scales


def calibration_pairs(num_samples: int, seed: int):
    """easy-vqa TRAIN rows as image/question/text (as eval/main_job.py)."""
    from qvlm_eval.metrics import load_vqa_dataset

    rows = load_vqa_dataset("easy-vqa", split="train", num_samples=num_samples, seed=seed)
    return rows.rename_column("answer", "text")


def add_comparisons(rows: list[dict], fp: dict, answers) -> None:
    """Paired differences of every row against rows[0] (the baseline) on the same questions/rows."""
    if not rows:
        return
    base = rows[0]
    base_hits = hits(base["predictions"], answers)
    base_kl = np.array(base["kl_row_sums"])
    tokens = np.array(base["kl_row_tokens"], dtype=np.float64)
    for row in rows:
        row_hits = hits(row["predictions"], answers)
        row["vs_baseline"] = {
            "baseline": base["name"],
            "accuracy": paired_bootstrap(base_hits, row_hits),
            "kl_mean": paired_bootstrap(base_kl, np.array(row["kl_row_sums"]), weights=tokens),
            "fixed_by_config": int(((base_hits == 0) & (row_hits == 1)).sum()),
            "broken_by_config": int(((base_hits == 1) & (row_hits == 0)).sum()),
            "answers_identical_to_baseline": float(np.mean([a == b for a, b in zip(base["predictions"],
                                                                                   row["predictions"])])),
        }


def _pct(x):
    return f"{100 * x:.1f}"


def table_lines(rows: list[dict], fp: dict) -> list[str]:
    head = ("| config (lambda1, lambda2, eta [@calib seed]) | VEO | easy-vqa acc % [95% CI] | acc diff vs base, pp "
            "[paired 95% CI] | KL(FP‖Q) nats/token | KL diff vs base [paired 95% CI] | visual-token rel. MSE | "
            "VEO objective first → last | calib wall s | calib CPU s |")
    lines = [head, "|" + "---|" * 10]
    fpv = fp["vqa"]
    lines.append(f"| full precision | - | {_pct(fpv['accuracy'])} [{_pct(fpv['ci_low'])}, {_pct(fpv['ci_high'])}] | - "
                 f"| 0 | - | 0 | - | - | - |")
    for r in rows:
        v, c = r["vqa"], r.get("vs_baseline", {})
        acc_d, kl_d, veo = c.get("accuracy"), c.get("kl_mean"), r["veo"]
        if r["optimize_vision_encoder"]:
            name = f"({r['lambda_ent']:g}, {r['lambda_err']:g}, {r['eta']:g})"
        else:
            name = "no VEO"
        if r.get("calib_seed_explicit"):
            name += f" @{r['calib_seed']}"
        acc_text = kl_text = "-"
        if acc_d is not None and r is not rows[0]:
            acc_text = (f"{100 * acc_d['diff']:+.1f} [{100 * acc_d['ci_low']:+.1f}, "
                        f"{100 * acc_d['ci_high']:+.1f}]")
            kl_text = f"{kl_d['diff']:+.4f} [{kl_d['ci_low']:+.4f}, {kl_d['ci_high']:+.4f}]"
        veo_text = "-" if veo is None else f"{veo['objective_first']:.4g} → {veo['objective_last']:.4g}"
        lines.append(
            f"| {name} | {'yes' if r['optimize_vision_encoder'] else 'no'} "
            f"| {_pct(v['accuracy'])} [{_pct(v['ci_low'])}, {_pct(v['ci_high'])}] | {acc_text} "
            f"| {r['kl']['kl_mean']:.4f} | {kl_text} | {r['visual_rel_mse']:.4f} | {veo_text} "
            f"| {r['calibration']['wall_s']:.1f} | {r['calibration']['cpu_s']:.1f} |")
    return lines


def automatic_reading(rows: list[dict]) -> list[str]:
    """Rule-based statements from the numbers (no judgement beyond the intervals)."""
    if len(rows) < 2:
        return ["Only one configuration was measured: nothing to compare."]
    base = rows[0]
    out = [f"Baseline: `{base['name']}`. Differences are paired (same questions / KL rows); an interval that "
           "excludes 0 is marked significant."]
    for r in rows[1:]:
        c = r["vs_baseline"]
        a, k = c["accuracy"], c["kl_mean"]
        out.append(
            f"- `{r['name']}`: accuracy {100 * a['diff']:+.1f} pp ({'significant' if a['significant'] else 'within noise'}; "
            f"{c['fixed_by_config']} questions fixed, {c['broken_by_config']} broken), KL {k['diff']:+.4f} "
            f"({'significant' if k['significant'] else 'within noise'}), visual-token rel. MSE "
            f"{r['visual_rel_mse']:.4f} vs {base['visual_rel_mse']:.4f}.")
    best_kl = min(rows, key=lambda r: r["kl"]["kl_mean"])
    best_acc = max(rows, key=lambda r: r["vqa"]["accuracy"])
    out.append(f"Lowest KL: `{best_kl['name']}`; highest accuracy: `{best_acc['name']}`.")
    return out


def write_outputs(results_dir: Path, record: dict) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = results_dir / ".veo_sweep.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, results_dir / "veo_sweep.json")
    rows, fp, meta = record["configs"], record["fp"], record["meta"]
    md = [
        "# Q-VLM visual-encoder optimization (Eq. 8-10): sweep of lambda1, lambda2, eta",
        "",
        f"Written by `eval/sweep_vision_opt.py` ({'complete' if record['complete'] else 'INCOMPLETE: partial results'}).",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['started_utc']} → {meta['finished_utc']}; sweep wall time {meta['wall_s']:.0f} s",
        f"- machine: {meta['machine']}",
        f"- model: `{meta['model']}`; vision weights sha256 `{meta['vision_weights_sha256']}`",
        f"- scheme: vision tower W4A4 as `recipes/qvlm_w4a4.yaml` (int4 asym per-channel weights, int4 asym dynamic "
        f"per-token activations, `quantize_vision_tower: true`); language model (decoder Linears) "
        f"{meta['args'].get('lm_scheme', 'w4a4').upper()} (`--lm-scheme`: {LM_SCHEME_TEXT[meta['args'].get('lm_scheme', 'w4a4')]}); "
        f"projector and lm_head FP",
        f"- LM side identical in every configuration: `search_epochs: {meta['args']['search_epochs']}` "
        f"(lp-norm ranges); decoder weight hashes: {sorted({r['language_model_weights_sha'] for r in rows})}",
        f"- VEO: `vision_epochs: {meta['args']['vision_epochs']}`, `vision_lr: {meta['args']['vision_lr']}` (Adam, "
        f"batch 1), {meta['args']['calib_samples']} easy-vqa TRAIN calibration rows (seed {meta['args']['seed']} "
        f"unless `@seed`)",
        f"- evaluation: {meta['args']['vqa_questions']} easy-vqa TEST questions (greedy exact match, seed "
        f"{meta['args']['seed']}), KL on the answer tokens of {meta['args']['kl_rows']} other TEST rows "
        f"({rows[0]['kl']['tokens'] if rows else '?'} tokens); visual-token rel. MSE = "
        "||Xv_q − Xv_fp||² / ||Xv_fp||² of the projector output on the KL rows' images",
        f"- note: {Q4_NOTE}",
        "",
        *table_lines(rows, fp),
        "",
        "## Automatic reading (from the intervals)",
        "",
        *automatic_reading(rows),
        "",
    ]
    if record.get("reading"):
        md += ["## Reading", "", record["reading"], ""]
    (results_dir / "veo_sweep.md").write_text("\n".join(md))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR),
                        help="VLM directory (the default model is assembled there first when absent or stale)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="'none' or 'LAMBDA_ENT,LAMBDA_ERR,ETA[@CALIB_SEED]'; the first is the baseline")
    parser.add_argument("--results-dir", help="default eval/results/<model dir name>")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--vision-epochs", type=int, default=3)
    parser.add_argument("--vision-lr", type=float, default=1e-3)
    parser.add_argument("--search-epochs", type=int, default=0,
                        help="Q-VLM LM-side block-search passes (0 = lp-norm ranges: identical across configs)")
    parser.add_argument("--max-block-layers", type=int, default=3)
    parser.add_argument("--lm-scheme", choices=sorted(LM_SCHEMES), default="w8a8",
                        help="the language model's scheme (the vision tower is W4A4); w4a4 swamps the vision side")
    parser.add_argument("--vqa-questions", type=int, default=200)
    parser.add_argument("--kl-rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true",
                        help="keep configurations of an existing veo_sweep.json measured with the same settings")
    parser.add_argument("--reading", help="a text file with the hand-written reading to put into veo_sweep.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [parse_config(s) for s in args.configs]
    for c in configs:
        c["calib_seed_explicit"] = c["calib_seed"] is not None

    from tqdm import tqdm

    from qvlm_eval import metrics
    from qvlm_modifiers.errors import QVLMError

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    model_dir = Path(args.model)
    results_dir = Path(args.results_dir) if args.results_dir else EVAL_DIR / "results" / model_dir.name
    try:
        vision_sha = None
        if model_dir == DEFAULT_MODEL_DIR:
            from qvlm_eval.default_model import DEFAULT_VISION_WEIGHTS, _file_sha256, ensure_default_model

            ensure_default_model(model_dir)
            vision_sha = _file_sha256(DEFAULT_VISION_WEIGHTS)
        fp_model, processor = metrics.load_model_and_processor(model_dir, dtype=torch.float32)
        vqa_rows = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=args.vqa_questions, seed=args.seed)
        kl_rows = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=args.kl_rows, seed=args.seed + 1)
        settings = {k: getattr(args, k) for k in _MEASUREMENT_ARGS}
        settings["vision_weights_sha256"] = vision_sha
        previous = {}
        if args.resume and (results_dir / "veo_sweep.json").is_file():
            old = json.loads((results_dir / "veo_sweep.json").read_text())
            if old.get("settings") == settings:
                previous = {r["name"]: r for r in old["configs"]}
                print(f"[sweep] resuming: {sorted(previous)} already measured", flush=True)
            else:
                print("[sweep] --resume: the existing sweep used other settings; starting over", flush=True)
        print(f"[sweep] full precision on {len(vqa_rows)} VQA questions and {len(kl_rows)} KL rows", flush=True)
        fp_eval = evaluate(fp_model, processor, vqa_rows, kl_rows, args.batch_size)
        fp = {"vqa": {k: v for k, v in fp_eval["vqa"].items() if k != "predictions"},
              "predictions": fp_eval["vqa"]["predictions"], "logprobs": fp_eval["logprobs"],
              "visual": fp_eval["visual"], "eval_s": fp_eval["eval_s"]}
        answers = list(vqa_rows["answer"])
        rows: list[dict] = []
        calib_cache: dict[int, object] = {}
        baseline_scales = None
        machine = (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs; "
                   f"nice {os.nice(0)}), torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
                   f"load average at start {os.getloadavg()[0]:.1f}")

        def record(complete: bool) -> dict:
            add_comparisons(rows, fp, answers)
            now = datetime.datetime.now(datetime.timezone.utc)
            reading = Path(args.reading).read_text().strip() if args.reading else None
            return {
                "complete": complete, "settings": settings, "reading": reading,
                "meta": {"command": "python eval/sweep_vision_opt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                         "started_utc": started.strftime("%Y-%m-%d %H:%M"), "finished_utc": now.strftime("%Y-%m-%d %H:%M"),
                         "wall_s": time.perf_counter() - t0, "machine": machine, "model": str(model_dir),
                         "vision_weights_sha256": vision_sha, "args": vars(args),
                         "scheme": {"vision": W4A4, "language_model": LM_SCHEMES[args.lm_scheme]}, "note": Q4_NOTE},
                "fp": {k: v for k, v in fp.items() if k not in ("logprobs", "visual")},
                "configs": rows,
            }

        progress = tqdm(configs, desc="VEO sweep", unit="config")
        for config in progress:
            progress.set_postfix_str(config["name"])
            if config["name"] in previous:
                row = previous[config["name"]]
                scales = None
            else:
                row, scales = run_config(config, args, fp_model, processor, calib_cache, vqa_rows, kl_rows, fp,
                                         baseline_scales)
                row["calib_seed_explicit"] = config["calib_seed_explicit"]
            if not rows and scales is not None:
                baseline_scales = scales
            rows.append(row)
            tqdm.write(f"[sweep] {row['name']}: acc {_pct(row['vqa']['accuracy'])}%, KL {row['kl']['kl_mean']:.4f}, "
                       f"visual rel. MSE {row['visual_rel_mse']:.4f}, calib {row['calibration']['wall_s']:.0f}s wall")
            write_outputs(results_dir, record(complete=False))
        final = record(complete=True)
        write_outputs(results_dir, final)
    except QVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print()
    print("\n".join(table_lines(rows, fp)))
    print()
    print("\n".join(automatic_reading(rows)))
    print(f"\n{Q4_NOTE}\nwrote {results_dir / 'veo_sweep.json'} and {results_dir / 'veo_sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
