"""What a quantized model's VQA answers look like, not only whether they match.

The matrix stores per-question hits; when a cell answers 0% this tells a format collapse (the turn
ends at once, so the decoded answer is empty) from wrong answers. For each checkpoint (a matrix cell
id under ``results/<model>/quantized/`` or a folder), greedy answers on the same easy-vqa test
questions are split into exact matches, empty answers and others, with the most common first words.

    python eval/answer_forms.py mbq_w3 mbq_w3_duo_clip --questions 60
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent


def classify(predictions: list[str], references: list[str]) -> dict:
    """Counts of exact matches (``normalize_answer``), empty answers and others, plus the five most
    common first words of the non-empty answers."""
    from qvlm_eval.metrics import normalize_answer

    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    empty = sum(not p.strip() for p in predictions)
    first = collections.Counter(p.split()[0].lower() for p in predictions if p.strip())
    return {"n": len(predictions), "exact": hits, "empty": empty, "other": len(predictions) - hits - empty,
            "first_words": first.most_common(5)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="matrix cell ids (results/<model>/quantized/<id>) or folders; 'fp' = the default model")
    parser.add_argument("--model", default="smolvlm-tiny-v2")
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(EVAL_DIR.parent))
    import torch

    import qvlm_modifiers  # noqa: F401  (packed loader)
    from qvlm_eval.metrics import generate_answers, load_model_and_processor, load_vqa_dataset

    paths = {}  # every name resolved before any model loads, so a typo fails at once
    for name in args.checkpoints:
        path = EVAL_DIR / ".models" / args.model if name == "fp" else Path(name)
        if name != "fp" and not path.exists():
            path = EVAL_DIR / "results" / args.model / "quantized" / name
        if not path.exists():
            parser.error(f"no checkpoint {name!r}: give a matrix cell id with a folder under "
                         f"{EVAL_DIR / 'results' / args.model / 'quantized'}, a folder, or 'fp'")
        paths[name] = path
    torch.set_num_threads(args.threads)
    rows = load_vqa_dataset("easy-vqa", "test", num_samples=args.questions, seed=args.seed)
    references = [r["answer"] for r in rows]
    for name, path in paths.items():
        model, processor = load_model_and_processor(path)
        predictions = generate_answers(model, processor, [r["image"] for r in rows], [r["question"] for r in rows])
        c = classify(predictions, references)
        print(f"{name:32s} exact {c['exact']:3d}/{c['n']}  empty {c['empty']:3d}  other {c['other']:3d}  "
              f"first words {c['first_words']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
