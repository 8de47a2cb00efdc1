"""Easy-vqa test accuracy of the default model assembled with one or more vision-weight files.

Answers "is this training run good enough?" for ``eval/train_vision.py`` outputs with the same
measurement as the acceptance figure in eval/README.md: greedy generation, exact match on the normalized
answer, percentile-bootstrap 95% interval (``metrics.evaluate_vqa``), float32 on CPU, on a seeded subset
of easy-vqa's own test split (never trained on). Several files are measured in one run on the same
questions, so a new run is compared against the committed weights measured alongside it.

    python eval/evaluate_vision_weights.py eval/weights/smolvlm_tiny_vision.safetensors other.safetensors
    python eval/evaluate_vision_weights.py --testbed v2 eval/weights/v2/smolvlm_tiny_vision.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def evaluate(weights: list[str], questions: int = 1000, seed: int = 0, batch_size: int = 20,
             language_model=None, testbed: str | None = None) -> list[dict]:
    """Accuracy (+ 95% CI) of the default model with each vision-weight file, on the same questions."""
    from qvlm_eval import default_model as dm
    from qvlm_eval import metrics

    lm = language_model if language_model is not None else dm.load_language_model(torch.float32)
    processor = dm.build_processor(testbed_name=testbed)
    data = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=questions, seed=seed)
    rows = []
    for path in weights:
        start = time.time()
        model = dm.assemble(lm, vision_weights=path, dtype=torch.float32, testbed_name=testbed)
        result = metrics.evaluate_vqa(model, processor, data, batch_size=batch_size, progress=True)
        rows.append({"weights": str(path), "accuracy": result["accuracy"], "ci_low": result["ci_low"],
                     "ci_high": result["ci_high"], "n": result["n"], "wall_s": round(time.time() - start, 1)})
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="+", help="vision weights (safetensors) written by eval/train_vision.py")
    parser.add_argument("--testbed", default=None, help="default-model version the weights are for (v1, v2)")
    parser.add_argument("--questions", type=int, default=1000, help="easy-vqa test questions (seeded subset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    missing = [w for w in args.weights if not Path(w).is_file()]
    if missing:
        print(f"error: no such weights file: {', '.join(missing)}. Pass safetensors written by "
              "eval/train_vision.py (--output).", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = evaluate(args.weights, args.questions, args.seed, args.batch_size, testbed=args.testbed)
    for row in rows:
        print(f"{row['weights']}: easy-vqa test {100 * row['accuracy']:.1f}% "
              f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}] "
              f"on {row['n']} questions ({row['wall_s']:.0f} s)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
