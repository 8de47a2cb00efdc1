"""Diagnostics behind the Q-VLM findings on the default model (eval/README.md, 2026-11-26).

    python eval/diagnose_qvlm.py norms                # where the hidden states' squared norm sits, per layer
    python eval/diagnose_qvlm.py w8a8 --questions 40  # Q-VLM W8A8 with search_epochs 0 vs RTN W8A8
    python eval/diagnose_qvlm.py w4 --questions 200 "minmax:init_shrink_factors=[1.0]"

``norms``: one forward pass per calibration row (easy-vqa TRAIN, as the matrix builds them); per decoder
layer output, the largest token norm, the median token norm and the share of the sequence's squared norm
held by the largest token. A share near 1 means a plain MSE over the hidden states is that token's error.

``w4``: RTN W4A16 g64 and ``recipes/qvlm_w4.yaml`` (g64) variants, each given as ``name`` or
``name:key=value;key=value`` (QVLMModifier fields set in the recipe; ``rtn`` = recipes/rtn_w4a16.yaml).
Per variant: whether its weight qparams equal RTN's, VQA accuracy, answer KL, and the quantized
model's hidden-state MSE against the full-precision model at decoder-layer outputs, on the
calibration rows and on as many held-out rows (easy-vqa TRAIN, another seed's random subset; an
overlap with the calibration rows is possible but unlikely among 38k rows). With ``block_target: fp``
(Eq. 3) that MSE at a block's last layer is the block objective the search minimised (exactly so
when the search used every calibration row), so the two columns separate a search that overfits its rows (held-out MSE up) from an
objective that disagrees with the answers (both MSEs down, KL up). ``excl. top`` leaves out each
row's largest-norm token (the attention sink).

``w8a8``: ``recipes/w8a8.yaml`` (RTN) and ``recipes/qvlm_w8a8.yaml`` with ``search_epochs: 0`` (the
initial ranges only) on the same calibration rows, scored on the same easy-vqa TEST questions. Before
b043845 the Q-VLM weight ranges started from an lp-norm search with p = 0.5 and this answered 0%.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
from pathlib import Path

import torch

EVAL_DIR = Path(__file__).resolve().parent
REPO = EVAL_DIR.parent


def _setup(rows: int):
    from qvlm_eval import main_job
    from qvlm_eval import metrics
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_eval.default_model import ensure_default_model

    path = ensure_default_model(main_job.DEFAULT_MODEL_DIR)
    model, processor = metrics.load_model_and_processor(path, dtype=torch.float32)
    calib = build_calibration_dataset(main_job.calibration_pairs(rows, 0), processor, model,
                                      prompt_column="question", text_column="text")
    return model, processor, calib


def norms(rows: int) -> None:
    from qvlm_modifiers.data import collate_fn

    model, _, calib = _setup(rows)
    per_layer: dict[int, list[tuple[float, float, float, int]]] = {}
    for r in range(len(calib)):
        batch = collate_fn([calib[r]])
        batch.pop("loss_mask", None)
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        for k, h in enumerate(hidden[1:-1]):  # decoder layer outputs (the last entry is after the final norm)
            token_norm = h[0].norm(dim=-1)
            squared = h[0].pow(2).sum(-1)
            per_layer.setdefault(k, []).append((float(token_norm.max()), float(token_norm.median()),
                                                float(squared.max() / squared.sum()), int(token_norm.argmax())))
    print(f"{'layer':>5} {'max token norm':>15} {'median':>8} {'largest token share':>20}  position")
    for k, stats in per_layer.items():
        print(f"{k:>5} {max(s[0] for s in stats):>15.1f} {sorted(s[1] for s in stats)[len(stats) // 2]:>8.1f} "
              f"{min(s[2] for s in stats):>9.2f}-{max(s[2] for s in stats):.2f}  {[s[3] for s in stats]}")


def w8a8(rows: int, questions: int) -> None:
    import qvlm_modifiers
    from qvlm_eval import metrics

    model, processor, calib = _setup(rows)
    data = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=questions, seed=0)
    print(f"full precision: {metrics.evaluate_vqa(model, processor, data, batch_size=20)['accuracy']:.3f}", flush=True)
    recipes = {
        "RTN W8A8 (recipes/w8a8.yaml)": (REPO / "recipes" / "w8a8.yaml").read_text(),
        "Q-VLM W8A8, search_epochs 0": (REPO / "recipes" / "qvlm_w8a8.yaml").read_text().replace(
            "search_epochs: 10", "search_epochs: 0"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in recipes.items():
            recipe = Path(tmp) / "recipe.yaml"
            recipe.write_text(text)
            quantized = copy.deepcopy(model)
            qvlm_modifiers.oneshot(model=quantized, processor=processor, dataset=calib, recipe=str(recipe),
                                   num_calibration_samples=len(calib))
            result = metrics.evaluate_vqa(quantized, processor, data, batch_size=20)
            print(f"{name}: {result['accuracy']:.3f} on {questions} questions", flush=True)


def variant_recipe(recipe_text: str, spec: str) -> str:
    """``recipe_text`` with the fields of a ``name:key=value;key=value`` spec set in its Modifier
    block (a field the recipe already sets is replaced, a new one added after
    ``quantize_vision_tower``)."""
    text = recipe_text
    for option in spec.partition(":")[2].split(";"):
        if not option.strip():
            continue
        if "=" not in option:
            raise ValueError(f"variant option {option!r} is not key=value (spec {spec!r})")
        key, value = (part.strip() for part in option.split("=", 1))
        existing = re.search(rf"^      {re.escape(key)}:(.*)$", text, flags=re.M)
        if existing and not existing.group(1).split("#")[0].strip():
            raise ValueError(f"variant option {key!r}: the recipe sets it over several lines; only one-line "
                             "fields can be replaced")
        if existing:
            text = text[:existing.start()] + f"      {key}: {value}" + text[existing.end():]
        elif "quantize_vision_tower: false" in text:
            text = text.replace("quantize_vision_tower: false", f"quantize_vision_tower: false\n      {key}: {value}")
        else:
            raise ValueError(f"cannot place {key!r}: the recipe has no 'quantize_vision_tower: false' line")
    return text


def _hidden_states(model, calib) -> list[tuple[torch.Tensor, ...]]:
    from qvlm_modifiers.data import collate_fn

    out = []
    for r in range(len(calib)):
        batch = collate_fn([calib[r]])
        batch.pop("loss_mask", None)
        with torch.no_grad():
            out.append(tuple(h[0] for h in model(**batch, output_hidden_states=True).hidden_states[1:-1]))
    return out


def layer_mse(fp, q) -> tuple[list[float], list[float]]:
    """Per decoder layer: MSE over all elements, and over all tokens but each row's largest-norm one."""
    layers = len(fp[0])
    total, excl = [0.0] * layers, [0.0] * layers
    n, n_excl = [0] * layers, [0] * layers
    for f_row, q_row in zip(fp, q):
        for k in range(layers):
            err = (q_row[k] - f_row[k]).pow(2)
            top = int(f_row[k].norm(dim=-1).argmax())
            keep = torch.ones(err.shape[0], dtype=torch.bool)
            keep[top] = False
            total[k] += float(err.sum())
            n[k] += err.numel()
            excl[k] += float(err[keep].sum())
            n_excl[k] += int(keep.sum()) * err.shape[-1]
    return [t / c for t, c in zip(total, n)], [t / c for t, c in zip(excl, n_excl)]


def w4(rows: int, questions: int, specs: list[str]) -> None:
    from qvlm_eval import main_job

    import qvlm_modifiers
    from qvlm_eval import metrics
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.recipe_check import override_group_size

    model, processor, calib = _setup(rows)
    heldout = build_calibration_dataset(main_job.calibration_pairs(rows, 1), processor, model,
                                        prompt_column="question", text_column="text")
    vqa = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=questions, seed=0)
    kl_rows = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=64, seed=1)
    fp_logprobs = metrics.answer_logprobs(model, processor, kl_rows)
    fp_calib, fp_held = _hidden_states(model, calib), _hidden_states(model, heldout)
    print(f"full precision: accuracy {metrics.evaluate_vqa(model, processor, vqa, batch_size=20)['accuracy']:.3f}"
          f" on {questions} questions", flush=True)
    qvlm_text = (REPO / "recipes" / "qvlm_w4.yaml").read_text()
    reference_qparams = None
    depth = len(fp_calib[0])
    shown = sorted({k for k in (8, 11, 20) if k < depth} | {depth - 1})
    for spec in ["rtn"] + [s for s in specs if s != "rtn"]:
        name, _, options = spec.partition(":")
        if name == "rtn" and options:
            raise SystemExit(f"variant {spec!r}: 'rtn' is recipes/rtn_w4a16.yaml as shipped and takes no options")
        text = ((REPO / "recipes" / "rtn_w4a16.yaml").read_text() if name == "rtn"
                else variant_recipe(qvlm_text, spec))
        text, _ = override_group_size(text, 64)
        with tempfile.TemporaryDirectory() as tmp:
            recipe = Path(tmp) / "recipe.yaml"
            recipe.write_text(text)
            quantized = copy.deepcopy(model)
            qvlm_modifiers.oneshot(model=quantized, processor=processor, dataset=calib, recipe=str(recipe),
                                   num_calibration_samples=len(calib))
        qparams = {n: (m.weight_scale.detach().clone(), m.weight_zero_point.detach().clone())
                   for n, m in quantized.named_modules() if hasattr(m, "weight_scale")}
        if reference_qparams is None:
            reference_qparams = qparams
        shared = [n for n in qparams if n in reference_qparams]
        same = sum(torch.equal(qparams[n][0], reference_qparams[n][0])
                   and torch.equal(qparams[n][1], reference_qparams[n][1]) for n in shared)
        accuracy = metrics.evaluate_vqa(quantized, processor, vqa, batch_size=20)["accuracy"]
        kl = metrics.mean_kl(fp_logprobs, metrics.answer_logprobs(quantized, processor, kl_rows))["kl_mean"]
        mse_c, excl_c = layer_mse(fp_calib, _hidden_states(quantized, calib))
        mse_h, excl_h = layer_mse(fp_held, _hidden_states(quantized, heldout))
        print(f"{spec}: accuracy {accuracy:.3f}, KL {kl:.3f}, weight qparams equal to RTN's in {same}/{len(shared)}"
              f" Linears both quantize ({len(qparams)} quantized)", flush=True)
        for k in shown:
            print(f"    layer {k:>2} hidden MSE  calibration {mse_c[k]:10.4g} (excl. top {excl_c[k]:8.4g})   "
                  f"held-out {mse_h[k]:10.4g} (excl. top {excl_h[k]:8.4g})", flush=True)
        del quantized


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["norms", "w8a8", "w4"])
    parser.add_argument("variants", nargs="*", help="w4: Q-VLM variants, name or name:key=value;key=value")
    parser.add_argument("--rows", type=int, default=None, help="calibration rows (norms: 4, w8a8: 8, w4: 32)")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "norms":
        norms(args.rows or 4)
    elif args.what == "w4":
        w4(args.rows or 32, args.questions, args.variants)
    else:
        w8a8(args.rows or 8, args.questions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
