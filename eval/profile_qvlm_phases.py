"""Where Q-VLM's calibration time goes: one ``oneshot`` of a recipe on the default test bed's model,
with the Modifier's phases wrapped in process-CPU-time accumulators (nested phases count in their
parents too, e.g. the guard's block passes are in ``_run_block`` and in ``guard``). A breakdown, not
a comparison: ratios against GPTQ come from ``bench_recipe_cost.py`` (both measured in one run).
Run it alone on the machine (CPU time under contention is not comparable).

    python eval/profile_qvlm_phases.py recipes/qvlm_w4.yaml --samples 64 [--group-size 64] [--blocks out.json]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", help="write the Modifier's per-block records (qvlm_blocks) here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(EVAL_DIR.parent))
    import tempfile

    import torch

    import qvlm_modifiers
    import qvlm_modifiers.qvlm.base as base
    import qvlm_modifiers.qvlm.block_search as block_search
    import qvlm_modifiers.qvlm.range_variables as range_variables
    from qvlm_eval import main_job, metrics
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.recipe_check import override_group_size

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # as main_job: the calibration shuffle, so --blocks matches the matrix cell
    cpu, calls = collections.defaultdict(float), collections.Counter()

    def wrap(owner, name, label):
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*a, **k):
            start = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                cpu[label] += time.process_time() - start
                calls[label] += 1

        setattr(owner, name, timed)

    wrap(base.QVLMModifier, "_close_block", "close a block (all below but the hooks)")
    wrap(base, "search_block", "block search (Eq. 2-3)")
    wrap(block_search, "coordinate_descent", "  coordinate descent")
    wrap(range_variables, "auto_clip_ranges", "AWQ clip candidates")
    wrap(base.QVLMModifier, "_guard", "guard (held-out rows, winner's outputs)")
    wrap(base, "gptq_quantize_states", "  GPTQ inside (gptq_rounding, both states)")
    wrap(base.QVLMModifier, "_run_block", "block passes (FP targets + guard)")
    wrap(base.QVLMModifier, "_dependency_hook", "entropy hook (Eq. 4-5)")
    wrap(base.QVLMModifier, "_capture_call_hook", "capture hook")
    # inside GPTQ (gptq_rounding): Hessian passes of our own, llm-compressor's GPTQ and Hessian helpers
    import qvlm_modifiers.qvlm.gptq_rounding as gptq_rounding

    wrap(gptq_rounding, "_layer_hessians", "    Hessian passes of our own")
    internals = gptq_rounding.gptq_internals

    def timed_internals():
        found = internals()
        timed = {}
        for name, label in (("quantize_weight", "    quantize_weight (llm-compressor GPTQ)"),
                            ("accumulate_hessian", "accumulate_hessian (ours and in the pipeline)")):
            holder = type("holder", (), {name: staticmethod(getattr(found, name))})
            wrap(holder, name, label)
            timed[name] = getattr(holder, name)
        return found._replace(**timed)

    gptq_rounding.gptq_internals = timed_internals
    runner = base.layer_runner

    def timed_runner(layer, calls):
        holder = type("holder", (), {"run": staticmethod(runner(layer, calls))})
        wrap(holder, "run", "decoder-layer calls of the Modifier's own passes")
        return holder.run

    base.layer_runner = timed_runner

    text, _ = override_group_size(Path(args.recipe).read_text(), args.group_size)
    model, processor = metrics.load_model_and_processor(str(main_job.DEFAULT_MODEL_DIR), dtype=torch.float32)
    pairs = main_job.calibration_pairs(args.samples, args.seed, caption_fraction=0.5)
    rows = build_calibration_dataset(pairs, processor, model, prompt_column="question", text_column="text")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(text)
        wall, total = time.perf_counter(), time.process_time()
        qvlm_modifiers.oneshot(model=model, processor=processor, dataset=rows, recipe=str(recipe),
                               num_calibration_samples=len(rows))
        wall, total = time.perf_counter() - wall, time.process_time() - total
    print(f"{args.recipe} (group {args.group_size}, {args.samples} rows, {args.threads} threads): "
          f"oneshot {wall:.1f} s wall, {total:.1f} s CPU")
    for label, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {label:42s} {seconds:7.1f} s CPU  {100 * seconds / total:5.1f}%  calls {calls[label]}")
    blocks = getattr(model.config, "qvlm_blocks", None)
    if blocks:
        records = blocks["block_losses"]
        print(f"  blocks {[r['layers'] for r in records]}; search evaluations {sum(r['evaluations'] for r in records)}")
        if args.blocks:
            Path(args.blocks).write_text(json.dumps(blocks, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
