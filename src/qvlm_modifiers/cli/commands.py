"""The five ``qvlm`` commands: ``quantize``, ``eval``, ``recipes``, ``inspect``, ``bench``.

Each ``cmd_*`` takes the parsed arguments and returns the exit code; a user-facing failure raises a
:class:`~qvlm_modifiers.errors.QVLMError`, which :func:`qvlm_modifiers.cli.main` turns into a
message and exit code 2. ``quantize`` and ``eval`` first run every input check
(:mod:`qvlm_modifiers.cli.checks`), then load weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qvlm_modifiers.cli.checks import UsageError, check_eval_inputs, check_quantize_inputs
from qvlm_modifiers.cli.loading import disk_offloaded_tensors, load_model, offload_folder, offloads
from qvlm_modifiers.cli.logs import human_bytes, log
from qvlm_modifiers.cli.record import attach_run_record, data_fingerprint, save_checkpoint, versions
from qvlm_modifiers.errors import CalibrationDataError

__all__ = ["cmd_quantize", "cmd_eval", "cmd_recipes", "cmd_inspect", "cmd_bench", "recipe_description",
           "answer_token_logprobs", "bench_command", "EVAL_LAB"]


# --------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    """Check every input, build the calibration rows, load the model (offloaded with --offload-dir),
    calibrate with the recipe (:func:`qvlm_modifiers.oneshot`) and save the checkpoint with its run
    record atomically; print one summary line."""
    import torch

    from qvlm_modifiers.heap import fix_malloc_mmap_threshold

    # before any weight is loaded: keeps CPU calibration's heap from growing layer by layer
    # (qvlm_modifiers.heap; QVLM_MALLOC_TUNING=0 turns it off)
    fix_malloc_mmap_threshold()
    t0 = time.perf_counter()

    # 1. everything that can be checked without loading weights, cheapest first
    inputs = check_quantize_inputs(args)
    out, recipe_file, source = inputs.out, inputs.recipe_file, inputs.source

    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.families import get_family

    family = get_family(inputs.config)
    log.info("qvlm: %s (%s), recipe %s, %d calibration samples -> %s", source, family.architecture,
             recipe_file.name, args.num_samples, out)
    calib = build_calibration_dataset(
        inputs.pairs, inputs.processor, inputs.config, num_samples=args.num_samples, image_column=args.image_column,
        text_column=args.text_column, prompt_column=inputs.prompt_column, seed=args.seed,
        max_seq_length=args.max_seq_length,
    )
    fingerprint = data_fingerprint(calib)

    # 2. load and quantize
    torch.manual_seed(args.seed)
    record: dict[str, Any] = {
        "command": ["qvlm", *args._argv],
        "model": source,
        "architecture": family.architecture,
        "recipe_file": str(recipe_file),
        "recipe": recipe_file.read_text(),
        "dataset": args.dataset,
        "num_samples": args.num_samples,
        "max_seq_length": args.max_seq_length,
        "data_fingerprint_sha256": fingerprint,
        "seed": args.seed,
        "versions": versions(),
        "_t0": t0,
    }
    attach_run_record(inputs.processor, record)

    from qvlm_modifiers.api import oneshot

    oneshot_kwargs: dict[str, Any] = {}  # (use_loss_mask: set by the wrapper for MBQ / Q-VLM recipes)
    if offloads(args.device_map, args.offload_dir):
        oneshot_kwargs["sequential_offload_device"] = "cpu"
    with offload_folder(args.offload_dir) as folder:
        model = load_model(source, args.trust_remote_code, args.device_map, folder, args.max_cpu_memory)
        if folder is not None:
            record["offload"] = {"dir": str(args.offload_dir), "max_cpu_memory": args.max_cpu_memory,
                                 "disk_offloaded_tensors": disk_offloaded_tensors(folder)}
        # output_dir=None: the wrapper would check the output directory again; it was checked
        # above. save_checkpoint makes the wrapper's save call (save.save_pretrained), inside the
        # offload folder's lifetime because offloaded weights are read back from that folder.
        oneshot(
            model=model, processor=inputs.processor, dataset=calib, recipe=inputs.recipe, output_dir=None,
            num_calibration_samples=args.num_samples, max_seq_length=args.max_seq_length or 2048, **oneshot_kwargs,
        )
        from qvlm_modifiers.mbq.diagnostics import take_run_diagnostics

        mbq = take_run_diagnostics()  # per-mapping exponents and losses of an MBQ recipe (None otherwise)
        if mbq is not None:
            record["mbq"] = mbq
        run = save_checkpoint(model, inputs.processor, out, overwrite=args.overwrite)

    from qvlm_modifiers.inspect_ckpt import inspect_checkpoint

    report = inspect_checkpoint(out)
    schemes = ", ".join(sorted({s.split(" ")[0] for s in report.config_groups.values()})) or "dense"
    print(
        f"qvlm: quantized {Path(source).name} with {recipe_file.stem} ({schemes}) on {args.num_samples} samples in "
        f"{run.get('wall_time_s', 0):.1f} s -> {out} ({human_bytes(report.size_on_disk)}, "
        f"{report.compression_vs_bf16:.2f}x smaller than bf16; peak RSS {human_bytes(run['peak_rss_bytes'])})"
    )
    return 0


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def answer_token_logprobs(model, row) -> tuple[Any, Any]:
    """Log-probs over the vocabulary at every position that predicts an answer token (``loss_mask``
    TEXT; position t predicts token t+1, :func:`qvlm_modifiers.scoring.next_token_logprobs`), and
    the answer token ids they predict."""
    import torch

    from qvlm_modifiers.data import TEXT, collate_fn
    from qvlm_modifiers.scoring import next_token_logprobs, predicting_positions

    batch = collate_fn([row])
    target_mask = batch.pop("loss_mask")[0] == TEXT
    with torch.no_grad():
        logits = model(**batch).logits[0]
    logprobs = next_token_logprobs(logits, target_mask)
    targets = batch["input_ids"][0][predicting_positions(target_mask) + 1]
    return logprobs, targets


def cmd_eval(args: argparse.Namespace) -> int:
    """Answer-token negative log-likelihood of a checkpoint on image-text pairs, optionally against a
    reference model (KL and top-1 agreement on the same tokens)."""
    import math

    from tqdm import tqdm

    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.scoring import kl_divergence

    inputs = check_eval_inputs(args)
    source = inputs.source
    rows = build_calibration_dataset(inputs.pairs, inputs.processor, inputs.config, num_samples=args.num_samples,
                                     image_column=args.image_column, text_column=args.text_column,
                                     prompt_column=inputs.prompt_column, seed=args.seed,
                                     max_seq_length=args.max_seq_length,
                                     text_mask="answer")  # `qvlm eval` scores the answer tokens themselves
    model = load_model(source, args.trust_remote_code, None, None).eval()
    reference = None
    if inputs.reference is not None:
        reference = load_model(inputs.reference, args.trust_remote_code, None, None).eval()

    nll_sum, tokens, kl_sum, agree, ref_nll_sum = 0.0, 0, 0.0, 0, 0.0
    for row in tqdm(rows, desc="eval", unit="sample"):
        logprobs, targets = answer_token_logprobs(model, row)
        nll_sum += -logprobs.gather(1, targets[:, None]).sum().item()
        tokens += len(targets)
        if reference is not None:
            ref_lp, _ = answer_token_logprobs(reference, row)
            ref_nll_sum += -ref_lp.gather(1, targets[:, None]).sum().item()
            kl_sum += kl_divergence(ref_lp, logprobs).sum().item()  # KL(reference || checkpoint), per token
            agree += int((ref_lp.argmax(-1) == logprobs.argmax(-1)).sum())
    if tokens == 0:
        raise CalibrationDataError("The evaluation rows contain no answer tokens. Give every image a non-empty text.")
    result: dict[str, Any] = {
        "checkpoint": source, "samples": len(rows), "answer_tokens": tokens,
        "nll": nll_sum / tokens, "perplexity": math.exp(nll_sum / tokens),
    }
    if reference is not None:
        result.update(reference=args.reference, reference_nll=ref_nll_sum / tokens,
                      reference_perplexity=math.exp(ref_nll_sum / tokens), kl_ref_to_ckpt=kl_sum / tokens,
                      top1_agreement=agree / tokens)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    line = (f"qvlm eval: {Path(source).name} on {len(rows)} samples / {tokens} answer tokens: "
            f"NLL {result['nll']:.4f} (ppl {result['perplexity']:.3f})")
    if reference is not None:
        line += (f"; reference NLL {result['reference_nll']:.4f}, KL {result['kl_ref_to_ckpt']:.5f}, "
                 f"top-1 agreement {result['top1_agreement']:.1%}")
    print(line)
    return 0


# --------------------------------------------------------------------------------------------
# recipes / inspect
# --------------------------------------------------------------------------------------------


def recipe_description(path: Path) -> str:
    """First sentence-line of a recipe's header comment (the lines starting with '#')."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if text:
            return text
    return "(no description: add a '# ...' header comment to the recipe)"


def cmd_recipes(args: argparse.Namespace) -> int:
    """One line per shipped recipe: its name and the first line of its header comment."""
    from qvlm_modifiers import list_recipes

    recipes = list_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}")
    log.info("%d recipes; pass a name to `qvlm quantize --recipe NAME`, or a path to your own YAML.", len(recipes))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Report of a checkpoint; exit 1 when it does not reload exactly in transformers."""
    from qvlm_modifiers.inspect_ckpt import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, reload=not args.no_reload)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(format_report(report, all_modules=args.all))
    if report.reload is not None and not report.reload.get("exact"):
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------

#: the evaluation lab (eval/ of the source tree, installed separately): has the memory benchmark
EVAL_LAB = "qvlm_eval"


def _bench_scripts() -> dict[str, Path]:
    """The kernel benchmark shipped inside the package (``qvlm_modifiers.kernels``)."""
    import qvlm_modifiers.kernels as kernels

    bench = Path(kernels.__file__).parent / "bench.py"
    # kernels/bench.py prints the end-to-end decode line itself; "e2e" runs only that line
    return {"kernels": bench, "e2e": bench}


def _eval_lab_installed() -> bool:
    return importlib.util.find_spec(EVAL_LAB) is not None


def bench_command(which: str, bench_args: list[str]) -> list[str]:
    """The command line of a benchmark. ``kernels`` / ``e2e`` run the shipped kernel bench;
    ``memory`` runs ``python -m qvlm_eval.bench_memory`` from the evaluation lab, an installed
    package, never a file of a source checkout."""
    if which == "memory":
        if not _eval_lab_installed():
            raise UsageError(
                f"The memory benchmark is part of the evaluation lab (the {EVAL_LAB} package), which is not "
                "installed. Install it from a source checkout with `pip install -e eval`, then rerun "
                "`qvlm bench memory`."
            )
        return [sys.executable, "-m", f"{EVAL_LAB}.bench_memory", *bench_args]
    script = _bench_scripts()[which]
    if not script.is_file():
        raise UsageError(f"The {which} benchmark ({script}) is missing from this installation. Reinstall "
                         "qvlm-modifiers (`pip install --force-reinstall qvlm-modifiers`).")
    extra = ["--e2e", "only"] if which == "e2e" else []
    return [sys.executable, str(script), *extra, *bench_args]


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark in a child process; its exit code is ours."""
    cmd = bench_command(args.which, args.bench_args)
    log.info("qvlm bench: %s", " ".join(cmd))
    env = dict(os.environ)
    if args.quiet:
        env["TQDM_DISABLE"] = "1"
    return subprocess.call(cmd, env=env)
