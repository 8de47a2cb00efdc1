"""Calibration cost of recipes relative to a baseline recipe, on the same model and rows, in one run.

Issue #24 asks Q-VLM's calibration to cost at most 2x GPTQ's, issue #23 MBQ's at most 1.3x AWQ's.
Each recipe runs ``qvlm_modifiers.oneshot`` in its own fresh subprocess (same model, same calibration
rows: ``main_job.calibration_pairs``, the matrix's question/caption mix), the recipes alternating for
``--repeats`` rounds so that drifts in machine load hit all of them. The first recipe is the baseline.

Per recipe: wall time and process CPU time of the ``oneshot`` call (medians over repeats; CPU time is
robust to other load on a shared machine, so the ratios use it) and peak RSS above the loaded model.

    python eval/bench_recipe_cost.py gptq_w4a16_g64 qvlm_w4 --samples 64 --group-size 64

Recipes are shipped names (``recipes/``), eval recipes (``eval/recipes/``) or YAML paths; the model is the
default test bed's unless ``--model`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent


def resolve(recipe: str) -> Path:
    """A shipped recipe name, an eval recipe name or a YAML path; a clear error otherwise."""
    import qvlm_modifiers

    for candidate in (Path(recipe), EVAL_DIR / "recipes" / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    try:
        return Path(qvlm_modifiers.recipe_path(recipe))
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        raise SystemExit(f"recipe {recipe!r} is not a YAML file, an eval/recipes name or a shipped recipe "
                         f"({err}); pass one of those") from err


def run_child(args) -> dict:
    """One calibration in this (fresh) process."""
    import torch

    import qvlm_modifiers
    from qvlm_eval import cost_bench, main_job, metrics
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.recipe_check import override_group_size

    torch.set_num_threads(args.threads)
    heap_fixed = False
    if args.malloc_tuning:  # as `qvlm quantize` does: before the model is loaded (qvlm_modifiers.heap)
        from qvlm_modifiers.heap import fix_malloc_mmap_threshold

        heap_fixed = fix_malloc_mmap_threshold()
        if not heap_fixed:
            raise SystemExit("--malloc-tuning: the glibc heap setting could not be applied (not glibc, or "
                             "QVLM_MALLOC_TUNING=0 / a MALLOC_* variable set); unset those or drop the flag")
    text = Path(args.child).read_text()
    if args.group_size:
        text, _ = override_group_size(text, args.group_size)
    model, processor = metrics.load_model_and_processor(args.model, dtype=torch.float32)
    # the peak above the loaded model is the method's own, not the page-in of mapped weights
    cost_bench.page_in([*model.parameters(), *model.buffers()])
    pairs = main_job.calibration_pairs(args.samples, args.seed, caption_fraction=args.caption_fraction)
    rows = build_calibration_dataset(pairs, processor, model, prompt_column="question", text_column="text")
    recipe = Path(args.child_out).with_suffix(".yaml")
    recipe.write_text(text)
    with cost_bench.measure() as result:
        qvlm_modifiers.oneshot(model=model, processor=processor, dataset=rows, recipe=str(recipe),
                               num_calibration_samples=len(rows))
    result["malloc_tuning"] = heap_fixed
    return result


def child_command(recipe: Path, args, out: Path) -> list[str]:
    """The command line of one measuring child: this script with ``--child`` and the parent's settings."""
    return [sys.executable, __file__, "--child", str(recipe), "--child-out", str(out), "--model", args.model,
            "--samples", str(args.samples), "--seed", str(args.seed), "--caption-fraction", str(args.caption_fraction),
            "--threads", str(args.threads), "--group-size", str(args.group_size or 0)] + (
                ["--malloc-tuning"] if args.malloc_tuning else [])


def _spawn(recipe: Path, args, out_dir: Path) -> dict:
    from qvlm_eval import cost_bench

    out = out_dir / f"{recipe.stem}-{time.monotonic_ns()}.json"
    return cost_bench.spawn(child_command(recipe, args, out), out, recipe.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # nargs="*": a child gets its one recipe through --child, with no positional
    parser.add_argument("recipes", nargs="*", help="baseline recipe first, then the recipes to compare with it")
    parser.add_argument("--model", help="saved VLM directory (default: the default test bed's model)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption-fraction", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=None, help="run group schemes at this group size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc-tuning", action="store_true",
                        help="fix glibc's mmap threshold in every child before it loads the model "
                             "(qvlm_modifiers.heap, what `qvlm quantize` does on CPU): peak RSS then tracks live "
                             "memory instead of heap fragmentation that grows with every calibrated layer")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group_size == 0:
        args.group_size = None
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_child(args)))
        return 0
    if len(args.recipes) < 2:
        parser.error("give a baseline recipe and at least one recipe to compare with it")
    if args.samples < 1 or args.repeats < 1:
        parser.error("--samples and --repeats must be positive")
    recipes = [resolve(r) for r in args.recipes]
    if not args.model:
        from qvlm_eval import main_job
        from qvlm_eval.default_model import ensure_default_model

        args.model = str(ensure_default_model(main_job.DEFAULT_MODEL_DIR))
    runs: dict[str, list[dict]] = {r.stem: [] for r in recipes}
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        for _ in range(args.repeats):
            for recipe in recipes:
                runs[recipe.stem].append(_spawn(recipe, args, Path(tmp)))
                print(f"[bench] {recipe.stem}: {runs[recipe.stem][-1]}", flush=True)
    from qvlm_eval.cost_bench import ratio, summarize

    base = recipes[0].stem
    summary = {name: summarize(rs) for name, rs in runs.items()}
    print(f"model: {args.model}  samples: {args.samples} (caption share {args.caption_fraction})  "
          f"group size: {args.group_size or 'recipe'}  repeats: {args.repeats}  threads: {args.threads}  "
          f"glibc heap: {'fixed mmap threshold (--malloc-tuning)' if args.malloc_tuning else 'default'}")
    b = summary[base]
    for name, s in summary.items():
        rss = f"+{s['peak_rss_delta_mib']:.0f} MiB" if s["peak_rss_delta_mib"] is not None else "n/a"
        mem = ratio(s["peak_rss_delta_mib"], b["peak_rss_delta_mib"])
        print(f"{name:24s} {s['seconds_median']:8.1f} s wall {s['cpu_seconds_median']:8.1f} s CPU  "
              f"peak RSS {rss}   vs {base}: {ratio(s['cpu_seconds_median'], b['cpu_seconds_median']):.2f}x CPU, "
              f"{ratio(s['seconds_median'], b['seconds_median']):.2f}x wall, "
              + (f"{mem:.2f}x memory" if mem is not None else "memory n/a"))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                            if not k.startswith("child")},
                                               "runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
