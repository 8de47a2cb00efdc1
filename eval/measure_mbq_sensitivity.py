"""MBQ's measured vision/text sensitivity on a default-model test bed, beside the paper's figure.

MBQ weights the vision tokens' reconstruction error by ``r = G_v / G_t``, the ratio of the mean absolute
gradient of the loss at vision vs text positions of a decoder layer's outputs (paper Eq. 8-13; the
reference taps ``o_proj`` and ``down_proj``). The paper measures about 10x more gradient on text than on
vision tokens (Fig. 1: LLaVA-OneVision-7B, block 13, 1.7e-8 vs 2.1e-7, r ~ 0.08; its oracle uses a fixed
0.1, Table 1). On test bed v1 (one-word answers, answer-only text mask) the measured r was 590-1310
(issue #22): the last labelled position's output gradient is exactly 0, and with one-token answers that
is every text position.

This script runs MBQ's own sensitivity pass (:func:`qvlm_modifiers.mbq.sensitivity.compute_modality_sensitivity`)
on the calibration rows ``eval/main_job.py`` builds, once with the reference's text mask (the whole
assistant turn) and once with the answer-only mask, and writes the per-layer raw ratios::

    python eval/measure_mbq_sensitivity.py --testbed v2 --rows 32
    # -> eval/results/<model>/mbq_sensitivity.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

EVAL_DIR = Path(__file__).resolve().parent
PAPER_RATIO = 1.7e-8 / 2.1e-7  # Fig. 1, LLaVA-OneVision-7B block 13


def measure(model, processor, pairs, text_mask: str) -> dict:
    """Raw per-layer ratios (no median floor) and the zero-text-gradient row count for one text mask."""
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.mbq.sensitivity import compute_modality_sensitivity

    rows = build_calibration_dataset(pairs, processor, model, prompt_column="question", text_column="text",
                                     text_mask=text_mask)
    t = time.perf_counter()
    result = compute_modality_sensitivity(model, rows, median_floor=False)
    record = result.to_dict()
    ratios = [r for layer in result.raw_ratios.values() for r in layer.values()]
    return {"text_mask": text_mask, "rows": len(rows), "seconds": round(time.perf_counter() - t, 1),
            "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "sensitivity": record}


def markdown(model_name: str, args, results: list[dict]) -> str:
    lines = [
        f"# MBQ vision/text sensitivity on {model_name}",
        "",
        f"`python eval/measure_mbq_sensitivity.py --testbed {args.testbed} --rows {args.rows} --seed {args.seed} "
        f"--caption-fraction {args.caption_fraction}` (calibration rows as eval/main_job.py builds them: "
        f"easy-vqa train questions and captions). Raw ratios r = G_v / G_t per decoder layer and tap "
        f"(attn = o_proj output, mlp = down_proj output), before MBQ's median floor.",
        "",
        f"Paper (Fig. 1, LLaVA-OneVision-7B block 13): r ~ {PAPER_RATIO:.2f}; its oracle uses 0.1 (Table 1).",
        "",
        "| text mask | rows | rows with zero text gradient | median r | min r | max r |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        zero = r["sensitivity"].get("zero_text_grad_samples", "?")
        lines.append(f"| {r['text_mask']} | {r['rows']} | {zero} | {r['median']:.3g} | {r['min']:.3g} | {r['max']:.3g} |")
    lines += ["", "Per layer (attn / mlp):", "", "| layer | " + " | ".join(r["text_mask"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    layers = sorted({int(k) for r in results for k in r["sensitivity"]["raw_ratios"]})
    for i in layers:
        cells = []
        for r in results:
            layer = r["sensitivity"]["raw_ratios"].get(str(i), {})
            cells.append(f"{layer.get('attn', float('nan')):.3g} / {layer.get('mlp', float('nan')):.3g}")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", default=None, help="default-model version (v1, v2)")
    parser.add_argument("--rows", type=int, default=32, help="calibration rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration-row draw")
    parser.add_argument("--caption-fraction", type=float, default=0.5, help="share of caption rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="default eval/results/<model>")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qvlm_eval import default_model as dm
    from qvlm_eval import main_job, metrics

    bed = dm.testbed(args.testbed)
    path = dm.ensure_default_model(testbed_name=bed)
    model, processor = metrics.load_model_and_processor(path, dtype=torch.float32)
    pairs = main_job.calibration_pairs(args.rows, args.seed, args.caption_fraction)
    results = [measure(model, processor, pairs, mask) for mask in ("assistant_turn", "answer")]
    out_dir = Path(args.out_dir) if args.out_dir else EVAL_DIR / "results" / bed.model_name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mbq_sensitivity.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    text = markdown(bed.model_name, args, results)
    (out_dir / "mbq_sensitivity.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
