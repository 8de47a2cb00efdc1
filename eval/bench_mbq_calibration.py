"""Calibration cost of MBQ relative to AWQ on the same model and data, measured in one run.

Each method runs ``oneshot`` in its own fresh subprocess (same model, same calibration rows, same
follow-up quantization), alternating AWQ / MBQ for ``--repeats`` rounds:

- AWQ: ``LMAWQModifier`` (llm-compressor's AWQModifier scoped to the LM, ``duo_scaling=False``,
  ``n_grid=20``), no loss mask;
- MBQ: ``MBQModifier`` with the shipped defaults, *including* its gradient sensitivity pass.

Reported per method: wall time and process CPU time of the ``oneshot`` call (medians over repeats;
CPU time is robust to other load on a shared machine) and peak memory above
the loaded-model baseline: peak RSS (CPU; ``/proc/self/clear_refs`` resets the high-water mark after
loading) and, on CUDA, ``torch.cuda.max_memory_allocated``. The script prints MBQ/AWQ ratios and exits
non-zero with ``--check`` if the time ratio exceeds ``--max-ratio`` (target 1.3).

CI-fast (tiny zoo model, CPU)::

    python eval/bench_mbq_calibration.py --family llava --samples 4 --repeats 1

The embedded default model (SmolLM2's width 576 needs group 64), 16 easy-vqa train rows::

    python eval/bench_mbq_calibration.py --model eval/.models/smolvlm-tiny --pairs /tmp/easyvqa16 \
        --samples 16 --scheme w4 --group-size 64 --threads 1

(``/tmp/easyvqa16``: ``main_job.calibration_pairs(16, 0).save_to_disk(...)``.)

Real model on a GPU::

    python eval/bench_mbq_calibration.py --model /path/llava-onevision-7b --pairs /path/coco_pairs \
        --samples 128 --device cuda --scheme w3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from qvlm_eval import cost_bench

SCHEMES = {
    "w3": {"weights": {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}},
    "w4": {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}},
    "w4a8": {
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    },
}
IGNORE = [
    "lm_head", "re:.*vision_tower.*", "re:.*visual\\..*", "re:.*vision_model.*",
    "re:.*multi_modal_projector.*", "re:.*connector.*",
]



def run_child(args) -> dict:
    """One calibration in this (fresh) process; returns the measurements as a dict."""
    import torch
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import qvlm_modifiers
    from qvlm_modifiers import data
    from qvlm_modifiers.testing import zoo
    from qvlm_modifiers.lm_scoped import LMAWQModifier
    from qvlm_modifiers.mbq.modifier import MBQModifier

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model
    processor = AutoProcessor.from_pretrained(model_path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, dtype=dtype, device_map=args.device if args.device != "cpu" else None
    )
    source = args.pairs if args.pairs else zoo.sample_pairs(args.samples, seed=0)
    rows = data.build_calibration_dataset(
        source, processor, model, num_samples=args.samples, prompt_column=args.prompt_column
    )
    scheme = SCHEMES[args.scheme]
    if args.group_size:
        scheme = {**scheme, "weights": {**scheme["weights"], "group_size": args.group_size}}
    quant = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], **scheme}}, ignore=IGNORE)
    if args.child == "awq":
        transform, use_mask = LMAWQModifier(duo_scaling=False, n_grid=20), False
    else:
        transform, use_mask = MBQModifier(act_bits=8 if args.scheme == "w4a8" else None,
                                          **mbq_overrides(args.mbq_set)), True

    # the weights are mapped lazily from the file: read them before the baseline is taken, or MBQ's
    # sensitivity pass (every weight up front) is charged their page-in and AWQ's pipeline spreads it
    cost_bench.page_in([*model.parameters(), *model.buffers()])
    with cost_bench.measure(args.device) as result:
        qvlm_modifiers.oneshot(
            model, processor=processor, dataset=rows, recipe=[transform, quant], use_loss_mask=use_mask,
            num_calibration_samples=len(rows), shuffle_calibration_samples=False,
        )
    result.update(method=args.child, samples=len(rows))
    return result


def mbq_overrides(items) -> dict:
    """``--mbq-set KEY=VALUE`` pairs as MBQModifier fields (values parsed as YAML: ``clip_search=true``)."""
    import yaml

    fields = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--mbq-set wants KEY=VALUE (e.g. clip_search=true), got {item!r}")
        fields[key.strip()] = yaml.safe_load(value)
    return fields


def _spawn(method: str, args, out_dir: Path) -> dict:
    out = out_dir / f"{method}-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable, __file__, "--child", method, "--child-out", str(out), "--model", args.model,
        "--samples", str(args.samples), "--scheme", args.scheme, "--device", args.device,
        "--dtype", args.dtype, "--threads", str(args.threads or 0), "--group-size", str(args.group_size or 0),
    ]
    if args.pairs:
        cmd += ["--pairs", args.pairs]
    if args.prompt_column:
        cmd += ["--prompt-column", args.prompt_column]
    for item in args.mbq_set or []:
        cmd += ["--mbq-set", item]
    return cost_bench.spawn(cmd, out, method)


def _save_zoo_model(args, path: Path) -> Path:
    """The zoo model of ``--family``; with ``--text-hidden/--text-layers`` a wider/deeper random LM."""
    from qvlm_modifiers.testing import zoo

    if not (args.text_hidden or args.text_layers):
        return zoo.save(args.family, path)
    if args.family != "llava":
        raise SystemExit("--text-hidden/--text-layers are implemented for --family llava only")
    import torch
    from transformers import AutoModelForImageTextToText

    model, processor = zoo.build(args.family)
    config = model.config
    if args.text_hidden:
        if args.text_hidden % 128:
            raise SystemExit("--text-hidden must be a multiple of 128 (group size)")
        config.text_config.hidden_size = args.text_hidden
        config.text_config.intermediate_size = 3 * args.text_hidden
    if args.text_layers:
        config.text_config.num_hidden_layers = args.text_layers
    torch.manual_seed(0)
    big = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    big.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", help="zoo family to build when --model is not given")
    parser.add_argument("--model", help="saved VLM directory (model + processor)")
    parser.add_argument("--pairs", help="calibration image-text pairs (build_calibration_dataset source)")
    parser.add_argument("--prompt-column", default="question")
    parser.add_argument("--text-hidden", type=int, help="zoo llava only: widen the language model (random weights)")
    parser.add_argument("--text-layers", type=int, help="zoo llava only: number of decoder layers")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="w3")
    parser.add_argument("--group-size", type=int, default=None,
                        help="group size of the w3/w4 schemes (default 128; the default model needs 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or a device_map value")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children")
    parser.add_argument("--mbq-set", action="append", metavar="KEY=VALUE",
                        help="MBQModifier field for the MBQ side, repeatable (e.g. clip_search=true, duo_scaling=true)")
    parser.add_argument("--max-ratio", type=float, default=1.3)
    parser.add_argument("--check", action="store_true", help="exit 1 if the time ratio exceeds --max-ratio")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=["awq", "mbq"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads == 0:
        args.threads = None
    if args.group_size == 0:
        args.group_size = None
    if args.group_size is not None:
        if args.group_size < 1:
            parser.error(f"--group-size must be positive, got {args.group_size}")
        if SCHEMES[args.scheme]["weights"].get("strategy") != "group":
            parser.error(f"--group-size applies to the group schemes (w3, w4), not {args.scheme}")

    if args.child:
        Path(args.child_out).write_text(json.dumps(run_child(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-mbq-") as tmp:
        tmp = Path(tmp)
        if not args.model:
            from qvlm_modifiers.testing import zoo

            args.model = str(_save_zoo_model(args, tmp / args.family))
        runs = {"awq": [], "mbq": []}
        for _ in range(args.repeats):
            for method in ("awq", "mbq"):  # alternate so drifts in machine load hit both
                runs[method].append(_spawn(method, args, tmp))

    summary = {method: cost_bench.summarize(results) for method, results in runs.items()}
    time_ratio = cost_bench.ratio(summary["mbq"]["seconds_median"], summary["awq"]["seconds_median"])
    cpu_ratio = cost_bench.ratio(summary["mbq"]["cpu_seconds_median"], summary["awq"]["cpu_seconds_median"])
    rss_ratio = cost_bench.ratio(summary["mbq"]["peak_rss_delta_mib"], summary["awq"]["peak_rss_delta_mib"])
    gpu_ratio = cost_bench.ratio(summary["mbq"]["peak_gpu_delta_mib"], summary["awq"]["peak_gpu_delta_mib"])
    rss_total_ratio = cost_bench.ratio(summary["mbq"]["peak_rss_total_mib"], summary["awq"]["peak_rss_total_mib"])
    gpu_total_ratio = cost_bench.ratio(summary["mbq"]["peak_gpu_total_mib"], summary["awq"]["peak_gpu_total_mib"])

    group = f" group {args.group_size}" if args.group_size else ""
    mbq_fields = ", ".join(args.mbq_set or []) or "shipped defaults"
    print(f"model: {args.model}  samples: {args.samples}  scheme: {args.scheme}{group}  device: {summary['awq']['device']}"
          f"  MBQ: {mbq_fields}")
    for method in ("awq", "mbq"):
        s = summary[method]
        gpu = f"  peak GPU +{s['peak_gpu_delta_mib']:.1f} MiB" if s["peak_gpu_delta_mib"] is not None else ""
        rss = f"{s['peak_rss_delta_mib']:.1f}" if s["peak_rss_delta_mib"] is not None else "n/a"
        print(f"{method.upper():4s} calibration {s['seconds_median']:.3f} s wall {s['seconds_all']}, "
              f"{s['cpu_seconds_median']:.3f} s CPU  peak RSS +{rss} MiB{gpu}")
    print(f"MBQ/AWQ time ratio: {time_ratio:.3f} wall, {cpu_ratio:.3f} process CPU time  "
          f"(target <= {args.max_ratio}; sensitivity pass included; on a shared machine trust CPU time)")
    if rss_ratio is not None:
        print(f"MBQ/AWQ peak RSS ratio: total {rss_total_ratio:.3f}, above loaded model {rss_ratio:.3f}")
    if gpu_ratio is not None:
        print(f"MBQ/AWQ peak GPU memory ratio: total {gpu_total_ratio:.3f}, above loaded model {gpu_ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"scheme": args.scheme, "group_size": args.group_size, "samples": args.samples,
             "summary": summary, "time_ratio": time_ratio, "cpu_time_ratio": cpu_ratio, "rss_ratio": rss_ratio, "gpu_ratio": gpu_ratio,
             "rss_total_ratio": rss_total_ratio, "gpu_total_ratio": gpu_total_ratio}, indent=2
        ))
    if args.check and (cpu_ratio if summary["awq"]["device"] == "cpu" else time_ratio) > args.max_ratio:
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
