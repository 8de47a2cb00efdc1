"""Cost of Q-VLM's range search (QVLMModifier, Eq. 2-3): the old plain search vs the new default,
measured in one run on the same model and the same calibration data.

Modes (each a fresh copy of the model through llm-compressor's ``oneshot``):

- ``reference``: ``search_implementation: reference, search_samples: null`` -- the old behaviour:
  every candidate of every range variable re-runs the whole block on every calibration sample,
  and compressed-tensors re-fake-quantizes every weight on every forward;
- ``exact``: ``search_implementation: fast, search_samples: null`` -- the exact shortcuts only
  (cached block-input prefix, cached fake-quantized weights, early stop of hopeless candidates,
  memo of evaluated states); must give the reference's choices and losses exactly;
- ``default``: the Modifier's defaults, the setting the shipped recipes use (at present
  ``fast`` with ``search_samples: null``, i.e. the same as ``exact``; the subsets measured at 128
  samples are in ``eval/results/smolvlm-tiny/bench_qvlm_search.txt``);
- ``sN``, one per ``--search-samples N``: ``fast`` on N evenly spread calibration samples (the
  approximation; losses still reported on all samples).

Model: the first ``--layers`` decoder layers of the default eval model (SmolLM2-135M LM,
``qvlm_eval.default_model``), calibration rows as ``eval/main_job.py`` builds them (easy-vqa
TRAIN, seed 0). Recipe: ``qvlm_w4`` at group size 64 (SmolLM2's width 576 is not a multiple of
128, as in the evaluation matrix), with ``entropy_threshold: -1`` by default so that every block
has ``max_block_layers`` = 3 layers (the most expensive case, and the same partition in every
mode).

Printed per mode: search wall and CPU time per decoder layer (CPU time = process time, robust to
other load on a shared machine; the ratio uses CPU time), objective evaluations, and per block the
block-output MSE on ALL calibration samples (Eq. 3 objective) and its relative difference to the
baseline mode: ``reference`` when it ran, else ``exact`` (the two give identical losses). Blocks after the first start from different quantized inputs in different modes, so
their losses compare the whole pipeline, not one search.

    nice -n 19 python eval/bench_qvlm_search.py --layers 3 --samples 128 --modes exact --search-samples 8 16 32
    nice -n 19 python eval/bench_qvlm_search.py --layers 3 --samples 4 --modes reference exact

``--json PATH`` also writes the figures.

``search_implementation`` is this benchmark's switch, not a recipe field of ``QVLMModifier``: the
modes run :class:`BenchQVLMModifier`, ``QVLMModifier`` plus that field.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch

from qvlm_modifiers.qvlm import QVLMModifier

EVAL_DIR = Path(__file__).resolve().parent


class BenchQVLMModifier(QVLMModifier):
    """``QVLMModifier`` with the benchmark's baseline switch.

    :param search_implementation: ``"fast"`` (default, what ``QVLMModifier`` always runs): the
        search with exact shortcuts -- the block input of the layer being searched is cached (layers
        before it are not re-run per candidate), each Linear's fake-quantized weight is computed
        once per candidate instead of once per forward, candidates stop being evaluated as soon as
        their partial error already exceeds the best, and states already evaluated are not
        evaluated again. ``"reference"``: the plain search in which every candidate re-runs the
        whole block on every sample; same choices and losses, the benchmark's baseline
    """

    search_implementation: Literal["fast", "reference"] = "fast"

    def _search(self, *args, **kwargs):
        return super()._search(*args, reference=self.search_implementation == "reference", **kwargs)


MODES = {
    "reference": {"search_implementation": "reference", "search_samples": None},
    "exact": {"search_implementation": "fast", "search_samples": None},
    "default": {},
}


def truncated_default_model(layers: int, out: Path) -> Path:
    """The default eval model with only its first ``layers`` decoder layers, saved to ``out``."""
    from qvlm_eval import main_job
    from qvlm_eval import metrics
    from qvlm_eval.default_model import ensure_default_model
    from qvlm_modifiers.families import decoder_layers

    ensure_default_model(main_job.DEFAULT_MODEL_DIR)
    model, processor = metrics.load_model_and_processor(main_job.DEFAULT_MODEL_DIR, dtype=torch.float32)
    del decoder_layers(model)[layers:]
    model.config.text_config.num_hidden_layers = layers
    if getattr(model.config.text_config, "layer_types", None):
        model.config.text_config.layer_types = model.config.text_config.layer_types[:layers]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def run_mode(model_dir: Path, calib, overrides: dict, recipe: str, group_size: int, entropy_threshold) -> dict:
    from llmcompressor import oneshot

    import qvlm_modifiers
    from qvlm_eval import metrics
    from qvlm_eval.bench_recipe_cost import resolve
    from qvlm_modifiers.data import collate_fn
    from qvlm_modifiers.recipe_check import override_group_size

    text, _ = override_group_size(resolve(recipe).read_text(), group_size)
    import yaml

    config = yaml.safe_load(text)
    fields = config["quant_stage"]["quant_modifiers"]["QVLMModifier"]
    if entropy_threshold is not None:
        fields["entropy_threshold"] = entropy_threshold
    fields.update(overrides)
    modifier = BenchQVLMModifier(**fields)
    model, processor = metrics.load_model_and_processor(model_dir, dtype=torch.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, processor=processor, dataset=calib, recipe=[modifier], data_collator=collate_fn,
            num_calibration_samples=len(calib))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    meta = model.config.qvlm_blocks
    return {
        "settings": {k: getattr(modifier, k) for k in ("search_implementation", "search_samples")},
        "oneshot_wall_s": wall,
        "oneshot_cpu_s": cpu,
        "blocks": meta["blocks"],
        "block_losses": meta["block_losses"],
        "weight_scales": {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight_scale")},
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3, help="decoder layers of the default model kept")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--recipe", default="qvlm_w4_rtn",
                        help="a shipped or eval/recipes name or a YAML path (default: the nearest-rounding search)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--entropy-threshold", type=float, default=-1.0,
                        help="h0; -1 = full max_block_layers blocks (use nan to keep the recipe's)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--search-samples", type=_positive_int, nargs="+", default=[],
                        help="one more mode per value N, 'sN' = fast search on N samples (losses on all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qvlm_eval import main_job
    from qvlm_eval import metrics
    from qvlm_modifiers.data import build_calibration_dataset

    modes = dict(MODES)
    for n in args.search_samples:
        modes[f"s{n}"] = {"search_implementation": "fast", "search_samples": n}
    run_modes = list(dict.fromkeys(args.modes + [f"s{n}" for n in args.search_samples]))
    threshold = None if args.entropy_threshold != args.entropy_threshold else args.entropy_threshold
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_qvlm_search_") as tmp:
        model_dir = truncated_default_model(args.layers, Path(tmp) / "model")
        model, processor = metrics.load_model_and_processor(model_dir, dtype=torch.float32)
        calib = build_calibration_dataset(main_job.calibration_pairs(args.samples, 0), processor, model,
                                          prompt_column="question", text_column="text")
        del model
        for mode in run_modes:
            print(f"[bench_qvlm_search] {mode}: {modes[mode] or 'Modifier defaults'}", flush=True)
            results[mode] = run_mode(model_dir, calib, modes[mode], args.recipe, args.group_size, threshold)

    # losses and CPU time relative to the reference search, or to the exact fast search when the
    # reference was not run (the two give identical losses; see the 'exact vs reference' line)
    base_mode = "reference" if "reference" in results else "exact" if "exact" in results else None
    base = results.get(base_mode) if base_mode else None
    print(f"\nQ-VLM range search, default model's first {args.layers} decoder layers, {args.samples} calibration "
          f"samples, recipe {args.recipe} (group {args.group_size}), torch threads {args.threads}")
    header = (f"{'mode':<10} {'impl':<9} {'search_samples':>14} {'wall s/layer':>12} {'CPU s/layer':>11} "
              f"{'CPU ratio':>9} {'evals':>7}  block MSE (all samples) [rel. to {base_mode or 'n/a: neither reference nor exact ran'}]")
    print(header)
    summary = {}
    for mode, r in results.items():
        losses = r["block_losses"]
        wall = sum(b["search_s"] for b in losses) / args.layers
        cpu = sum(b["search_cpu_s"] for b in losses) / args.layers
        evals = sum(b["evaluations"] for b in losses)
        ratio = (sum(b["search_cpu_s"] for b in base["block_losses"]) / args.layers) / cpu if base else float("nan")
        cells = []
        for i, b in enumerate(losses):
            rel = ""
            if base and i < len(base["block_losses"]) and base["block_losses"][i]["layers"] == b["layers"]:
                ref = base["block_losses"][i]["loss"]
                rel = f" [{(b['loss'] - ref) / ref:+.2%}]"
            cells.append(f"{b['layers']}: {b['loss']:.5g}{rel}")
        print(f"{mode:<10} {r['settings']['search_implementation']:<9} {str(r['settings']['search_samples']):>14} "
              f"{wall:>12.2f} {cpu:>11.2f} {ratio:>8.2f}x {evals:>7}  " + "; ".join(cells))
        summary[mode] = {"settings": r["settings"], "blocks": r["blocks"], "wall_s_per_layer": wall,
                         "cpu_s_per_layer": cpu, "cpu_speedup": ratio, "baseline": base_mode, "evaluations": evals,
                         "oneshot_wall_s": r["oneshot_wall_s"], "oneshot_cpu_s": r["oneshot_cpu_s"],
                         "block_losses": [{k: b[k] for k in ("layers", "loss", "layerwise_loss", "search_samples",
                                                            "kept_layerwise", "search_s", "search_cpu_s", "evaluations")}
                                          for b in r["block_losses"]]}
    if "reference" in results and "exact" in results:
        same = all(torch.equal(base["weight_scales"][k], results["exact"]["weight_scales"][k]) for k in base["weight_scales"])
        same_loss = [b["loss"] for b in base["block_losses"]] == [b["loss"] for b in results["exact"]["block_losses"]]
        print(f"exact vs reference: identical weight scales {same}, identical block losses {same_loss}")
        summary["exact_identical_to_reference"] = bool(same and same_loss)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": summary}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
