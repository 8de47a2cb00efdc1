"""Diagnostics behind two Q-VLM findings on the default model (eval/README.md, 2026-11-26).

    python eval/diagnose_qvlm.py norms                # where the hidden states' squared norm sits, per layer
    python eval/diagnose_qvlm.py w8a8 --questions 40  # Q-VLM W8A8 with search_epochs 0 vs RTN W8A8

``norms``: one forward pass per calibration row (easy-vqa TRAIN, as the matrix builds them); per decoder
layer output, the largest token norm, the median token norm and the share of the sequence's squared norm
held by the largest token. A share near 1 means a plain MSE over the hidden states is that token's error.

``w8a8``: ``recipes/w8a8.yaml`` (RTN) and ``recipes/qvlm_w8a8.yaml`` with ``search_epochs: 0`` (the
initial ranges only) on the same calibration rows, scored on the same easy-vqa TEST questions. Before
b043845 the Q-VLM weight ranges started from an lp-norm search with p = 0.5 and this answered 0%.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

EVAL_DIR = Path(__file__).resolve().parent
REPO = EVAL_DIR.parent


def _setup(rows: int):
    sys.path.insert(0, str(EVAL_DIR))
    import main_job
    from qvlm_modifiers import metrics
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.default_model import ensure_default_model

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
    from qvlm_modifiers import metrics

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["norms", "w8a8"])
    parser.add_argument("--rows", type=int, default=None, help="calibration rows (norms: 4, w8a8: 8)")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "norms":
        norms(args.rows or 4)
    else:
        w8a8(args.rows or 8, args.questions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
