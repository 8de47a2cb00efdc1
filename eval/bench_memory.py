"""Working memory of calibration vs. depth and width: does it grow with one layer, not the model?

    python eval/bench_memory.py                       # GPTQ, depth 4/8/16/32 at width 512, widths 256..1024
    python eval/bench_memory.py --recipes gptq_w4a16,mbq_w4,qvlm_w4 --depths 4,8 --widths ""
    qvlm bench memory -- --depths 4,8,16,32            # same, through the CLI

Each run quantizes a synthetic LLaVA (:mod:`qvlm_modifiers.testing.zoo`'s tiny LLaVA with the language
model widened to ``W`` and deepened to ``L`` decoder layers; MLP 2W, head dim 64) with a shipped
recipe through :func:`qvlm_modifiers.oneshot`, i.e. llm-compressor's sequential pipeline over
the decoder layers. Three processes per run: one builds and saves the model, one measures, and
the parent collects. The measuring process loads the saved bf16 model, records its RSS
(``rss_after_load``) and the bytes of its weights, resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), calibrates, and reads the peak (``VmHWM``) back:

    working memory = peak RSS during calibration - RSS after loading the model

(on CUDA: ``torch.cuda.max_memory_allocated`` during calibration minus the allocated bytes after
load). Nothing is saved (saving is a separate step with its own memory profile).

Memory-mapped weights. transformers 5 memory-maps the safetensors files, so a weight is paged in
when first read, and a weight that calibration modifies in place (AWQ/MBQ smoothing, GPTQ's
rounding) gets a private anonymous copy next to its file page. Both grow with the number of layers
calibrated so far and would count as "working memory" although they are the model's own weights.
By default the measuring process therefore copies every weight into anonymous memory right after
loading (as a dtype conversion at load does), and the baseline holds the whole model; ``--mmap``
keeps the mapping (every weight is then read once before the baseline). The anonymous peak
(``RssAnon`` sampled in a thread) is reported beside the ``VmHWM`` figure. Measured on ``mbq_w4``,
width 256, 8 rows, 4 -> 16 layers, on 2026-11-26 *before* the glibc heap fix of
``qvlm_modifiers.heap`` (single runs, not kept): with ``--mmap`` the anonymous working memory grew
101.8 -> 133.8 MiB (x1.31); with the copy, 95.0 -> 96.6 MiB (x1.02). The README's table is the
copied-weights setup.

Printed per run: layers, width, weights, working memory, calibration time and time per layer.
Then the checks the claim needs: working memory at the largest depth within 20% of the smallest
depth (flat), and calibration time linear in depth (least-squares ``fixed + per_layer * L``, every
run within 15% of the line; the fixed part is tracing and caching the inputs). Finally a
projection to 7B/13B/72B-class language models, fitted on the width series (see :func:`project`).
``--summarize results.json`` re-prints the checks of an earlier ``--json-out``. Exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qvlm_eval import cost_bench
from qvlm_modifiers.resources import proc_status_kib, reset_peak_rss

HEAD_DIM = 64
# (name, hidden, intermediate, layers) of the language models of common VLM sizes
PROJECTION_TARGETS = [
    ("7B-class (LLaVA-1.5-7B / Vicuna-7B)", 4096, 11008, 32),
    ("13B-class (LLaVA-1.5-13B)", 5120, 13824, 40),
    ("72B-class (Qwen2-VL-72B)", 8192, 29568, 80),
]


# ---------------------------------------------------------------------------------------- child

class _AnonPeak:
    """Peak of ``RssAnon`` (anonymous resident memory: heap, tensors torch allocates) sampled every
    ``poll_s`` in a thread. Unlike ``VmHWM`` it leaves out file-backed pages, e.g. the memory-mapped
    safetensors pages of the weights (``--mmap``): they count in RSS but are clean page cache the
    kernel can drop. (A thread beside ``metrics.measure_resources``'s, which polls psutil's RSS.)"""

    def __init__(self, poll_s: float = 0.005):
        import threading

        self.poll_s, self.peak = poll_s, proc_status_kib("RssAnon") * 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status_kib("RssAnon") * 1024)
            self._stop.wait(self.poll_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status_kib("RssAnon") * 1024)


# CPU memory compressed-tensors may use for weights under --disk-offload (the rest goes to disk)
DISK_OFFLOAD_CPU_BUDGET = 1_000_000


def build_model(layers: int, width: int, seed: int, out: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from qvlm_modifiers.testing import zoo

    _, processor = zoo.build("llava", seed=seed, num_layers=1)  # the processor only (tiny)
    config, _ = zoo._BUILDERS["llava"](layers)  # noqa: SLF001 - same config, then widened
    text = config.text_config
    text.hidden_size = width
    text.intermediate_size = 2 * width
    text.num_attention_heads = text.num_key_value_heads = max(1, width // HEAD_DIM)
    text.head_dim = width // text.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def measure(model_dir: Path, pairs_dir: Path, recipe: str, num_samples: int, offload_dir: str | None,
            materialize: bool = True) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import qvlm_modifiers
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.families import decoder_layers
    from qvlm_modifiers.heap import fix_malloc_mmap_threshold

    fix_malloc_mmap_threshold()  # as `qvlm quantize` does, before loading (QVLM_MALLOC_TUNING=0: off)
    processor = AutoProcessor.from_pretrained(model_dir)
    calib = build_calibration_dataset(str(pairs_dir), processor, str(model_dir), num_samples=num_samples)
    recipe_obj = qvlm_modifiers.load_recipe(recipe)
    cuda = torch.cuda.is_available()
    if offload_dir:
        from compressed_tensors.offload import load_offloaded_model

        # auto_offload puts on disk only what does not fit in CPU memory: on a machine with RAM to
        # spare, nothing. A CPU budget of DISK_OFFLOAD_CPU_BUDGET bytes forces the weights to disk.
        with load_offloaded_model(AutoModelForImageTextToText):
            model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto", device_map="auto_offload",
                                                                offload_folder=offload_dir,
                                                                max_memory={"cpu": DISK_OFFLOAD_CPU_BUDGET})
        from qvlm_modifiers.cli import disk_offloaded_tensors

        disk_tensors = disk_offloaded_tensors(offload_dir)
        if disk_tensors == 0:
            raise RuntimeError("--disk-offload: no weight was offloaded to disk (compressed-tensors kept them all "
                               "in CPU memory), so this would measure CPU offload; check DISK_OFFLOAD_CPU_BUDGET")
    else:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto",
                                                            device_map="cuda" if cuda else None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    n_layers = len(decoder_layers(model))
    seq_lens = [len(r["input_ids"][0]) for r in calib]

    import gc

    rss_before_paging = proc_status_kib("VmRSS") * 1024
    if not offload_dir and not cuda:
        # transformers 5 memory-maps the safetensors files: weights that match the file's dtype are
        # paged in only when first read. Read every weight once here, so that "RSS after load"
        # holds the whole model; otherwise calibration's first pass over the weights (which grows
        # with depth) would be counted as working memory.
        # default (no --mmap): copy every weight into anonymous memory instead (the mapping is then
        # released), as a model converted to another dtype at load is.
        cost_bench.page_in(model.parameters(), copy=materialize)
    gc.collect()
    rss_after_load = proc_status_kib("VmRSS") * 1024
    anon_after_load, file_after_load = proc_status_kib("RssAnon") * 1024, proc_status_kib("RssFile") * 1024
    peak_reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    from qvlm_modifiers._registry import all_modifiers

    kwargs = {"use_loss_mask": True} if any(
        isinstance(m, tuple(all_modifiers())) for m in recipe_obj.modifiers) else {}
    with _AnonPeak() as anon:
        qvlm_modifiers.oneshot(model=model, processor=processor, dataset=calib, recipe=recipe_obj,
                               num_calibration_samples=num_samples, **kwargs)
    seconds = time.perf_counter() - t0
    peak = proc_status_kib("VmHWM") * 1024
    result = {
        "layers": n_layers, "width": model.config.text_config.hidden_size, "recipe": recipe,
        "num_samples": num_samples, "mean_seq_len": sum(seq_lens) / len(seq_lens),
        "weights_bytes": weights, "rss_after_load": rss_after_load, "peak_rss": peak,
        "peak_counter_reset": peak_reset, "working_bytes": peak - rss_after_load,
        "paged_in_at_load_bytes": rss_after_load - rss_before_paging,
        "working_anon_bytes": anon.peak - anon_after_load, "materialized": materialize and not offload_dir and not cuda,
        "file_rss_after_load": file_after_load, "file_rss_after_calibration": proc_status_kib("RssFile") * 1024,
        "seconds": seconds, "seconds_per_layer": seconds / n_layers, "device": "cuda" if cuda else "cpu",
        "offload_dir": offload_dir,
        "disk_offloaded_tensors": disk_tensors if offload_dir else 0,
    }
    if cuda:
        result["cuda_working_bytes"] = torch.cuda.max_memory_allocated() - cuda_base
    return result


# ---------------------------------------------------------------------------------------- parent
def _run(cmd: list[str], timeout: float) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-8:])} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def run_one(layers: int, width: int, recipe: str, args, work: Path) -> dict:
    model_dir = work / f"llava-L{layers}-W{width}"
    if not (model_dir / "config.json").is_file():
        _run([sys.executable, __file__, "--child-build", str(model_dir), "--layers", str(layers),
              "--width", str(width)], timeout=1800)
    offload = work / f"offload-L{layers}-W{width}"
    if args.disk_offload and offload.exists():
        shutil.rmtree(offload)  # compressed-tensors leaves its offloaded weights there after a run
    out = _run([sys.executable, __file__, "--child-measure", str(model_dir), "--pairs", str(work / "pairs"),
                "--recipe", recipe, "--num-samples", str(args.num_samples)]
               + ([] if args.materialize else ["--mmap"])
               + (["--offload-dir", str(offload)] if args.disk_offload else []),
               timeout=3600)
    return json.loads(out.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def analytic_bytes(width: int, inter: int, tokens: int) -> float:
    """What one decoder layer's GPTQ calibration holds at once, in bytes (the model the projection
    scales): fp32 Hessians (in_features^2 for q, k, v, o, gate, up at ``width`` and down at
    ``inter``), the layer's weights upcast to fp32 while quantized, and the calibration
    activations entering and leaving the layer plus the MLP intermediate (bf16, all samples)."""
    hessians = 4 * (6 * width**2 + inter**2)
    layer_fp32 = 4 * (4 * width**2 + 3 * width * inter)
    activations = 2 * tokens * (2 * width + inter)
    return hessians + layer_fp32 + activations


def project(width_runs: list[dict], num_samples: int, seq_len: float) -> list[str]:
    """Least-squares fit ``working = a + b * analytic_bytes(W)`` over the width series (a: fixed
    overhead of the pipeline, b: how much of the analytic per-layer state is really resident), then
    evaluated at real model sizes; time per layer is fitted as ``t0 + c * flops(W)`` with flops = the
    two passes' forward FLOPs (2 * 2 * tokens * params of the layer) + GPTQ's O(in^3) inverse.
    Both fits extrapolate far beyond the measured widths: order-of-magnitude estimates."""
    if len(width_runs) < 2:
        return ["(projection needs at least two widths)"]
    tokens = num_samples * seq_len
    xs = [analytic_bytes(r["width"], 2 * r["width"], tokens) for r in width_runs]
    ys = [r["working_bytes"] for r in width_runs]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    a = my - b * mx

    def flops(w: int, inter: int, tok: float) -> float:
        params = 4 * w * w + 3 * w * inter
        return 2 * 2 * tok * params + 6 * w**3 + inter**3

    fs = [flops(r["width"], 2 * r["width"], tokens) for r in width_runs]
    ts = [r["seconds_per_layer"] for r in width_runs]
    mf, mt = sum(fs) / n, sum(ts) / n
    c = max(sum((f - mf) * (t - mt) for f, t in zip(fs, ts)) / max(sum((f - mf) ** 2 for f in fs), 1e-30), 0.0)
    t0 = max(mt - c * mf, 0.0)  # per-layer overhead that does not scale with FLOPs (hooks, onload, Python)
    lines = [f"fit on widths {[r['width'] for r in width_runs]}: working = {a / 2**20:.1f} MiB + "
             f"{b:.2f} x analytic(W); time/layer = {t0:.2f} s + {c:.3e} s/FLOP (this machine)"]
    for name, w, inter, layers in PROJECTION_TARGETS:
        for samples, seq in ((num_samples, seq_len), (128, 512)):
            tok = samples * seq
            mem = a + b * analytic_bytes(w, inter, tok)
            t = (t0 + c * flops(w, inter, tok)) * layers
            lines.append(f"  {name:<38} {samples:>4} samples x {seq:>5.0f} tokens: working memory ~ "
                         f"{mem / 2**30:6.2f} GiB above the weights (independent of its {layers} layers); "
                         f"calibration ~ {t / 3600:7.2f} h at this machine's speed")
    return lines


def summarize(results: list[dict], recipes: list[str], num_samples: int) -> tuple[bool, list[str]]:
    """Checks and projection from the runs: memory flat in depth (+-20% between the shallowest and
    the deepest model), time linear in depth (least-squares ``t = fixed + per_layer * L``, every run
    within 15% of the line; the fixed part is tracing the model and caching the calibration inputs)."""
    ok = True
    lines = []
    for recipe in recipes:
        depth_runs = sorted((r for r in results if r["recipe"] == recipe and r["series"] == "depth"),
                            key=lambda r: r["layers"])
        if len(depth_runs) >= 2:
            lo, hi = depth_runs[0], depth_runs[-1]
            # with disk offload the model is not resident: the measure is the peak RSS itself
            metric = "peak_rss" if lo.get("offload_dir") else "working_bytes"
            mem_ratio = hi[metric] / lo[metric]
            weight_ratio = hi["weights_bytes"] / lo["weights_bytes"]
            ls = [r["layers"] for r in depth_runs]
            ts = [r["seconds"] for r in depth_runs]
            n = len(ls)
            ml, mt = sum(ls) / n, sum(ts) / n
            per_layer = sum((x - ml) * (y - mt) for x, y in zip(ls, ts)) / sum((x - ml) ** 2 for x in ls)
            fixed = mt - per_layer * ml
            worst = max(abs(t - (fixed + per_layer * x)) / t for x, t in zip(ls, ts))
            flat = abs(mem_ratio - 1) <= 0.20
            linear = worst <= 0.15
            ok &= flat and linear
            what = "peak RSS (disk offload)" if metric == "peak_rss" else "working memory"
            lines.append(f"{recipe}: {lo['layers']} -> {hi['layers']} layers: weights x{weight_ratio:.2f}, {what} "
                         f"x{mem_ratio:.3f} ({'FLAT' if flat else 'NOT flat'}, limit +-20%)")
            if "working_anon_bytes" in lo and "working_anon_bytes" in hi:
                lines.append(f"{recipe}: anonymous working memory (no file-backed pages) "
                             f"{lo['working_anon_bytes'] / 2**20:.1f} -> {hi['working_anon_bytes'] / 2**20:.1f} MiB, "
                             f"x{hi['working_anon_bytes'] / max(lo['working_anon_bytes'], 1):.3f}")
            lines.append(f"{recipe}: calibration time = {fixed:.1f} s + {per_layer:.2f} s/layer x L, worst run off the "
                         f"line by {worst:.0%} ({'LINEAR' if linear else 'NOT linear'}, limit 15%)")
        width_runs = sorted((r for r in results if r["recipe"] == recipe and r["series"] == "width"),
                            key=lambda r: r["width"])
        if width_runs:
            lines.append(f"{recipe}: width series (" + ", ".join(
                f"W={r['width']}: {r['working_bytes'] / 2**20:.1f} MiB" for r in width_runs) + ")")
            seq = sum(r["mean_seq_len"] for r in width_runs) / len(width_runs)
            lines += project(width_runs, num_samples, seq)
    return ok, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="gptq_w4a16", help="comma-separated shipped recipe names")
    parser.add_argument("--depths", default="4,8,16,32")
    parser.add_argument("--width", type=int, default=512, help="width of the depth series")
    parser.add_argument("--widths", default="256,512,1024", help="width series (at --width-depth layers); '' = none")
    parser.add_argument("--width-depth", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--disk-offload", action="store_true",
                        help="load the model offloaded to disk (compressed-tensors auto_offload with a CPU budget "
                             "of DISK_OFFLOAD_CPU_BUDGET bytes, so the weights go to the offload folder)")
    parser.add_argument("--mmap", dest="materialize", action="store_false",
                        help="keep the loaded weights memory-mapped from the safetensors files (default: copy "
                             "them into anonymous memory; see the module docstring)")
    parser.add_argument("--workdir", default=None, help="keep built models here (default: a temp dir)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--summarize", default=None, metavar="JSON",
                        help="only print the checks and projection of a previous --json-out")
    # internal
    parser.add_argument("--child-build", default=None)
    parser.add_argument("--child-measure", default=None)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--pairs")
    parser.add_argument("--recipe")
    parser.add_argument("--offload-dir", default=None)
    args = parser.parse_args()

    if args.summarize:
        runs = json.loads(Path(args.summarize).read_text())["runs"]
        ok, lines = summarize(runs, sorted({r["recipe"] for r in runs}), runs[0]["num_samples"])
        print("\n".join(lines))
        return 0 if ok else 1
    if args.child_build:
        build_model(args.layers, args.width, 0, Path(args.child_build))
        return 0
    if args.child_measure:
        res = measure(Path(args.child_measure), Path(args.pairs), args.recipe, args.num_samples, args.offload_dir,
                      args.materialize)
        print(json.dumps(res))
        return 0

    from tqdm import tqdm

    from qvlm_modifiers import list_recipes
    from qvlm_modifiers.testing import zoo

    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in list_recipes()]
    if unknown:
        print(f"unknown recipe(s) {unknown}; shipped: {', '.join(list_recipes())}", file=sys.stderr)
        return 2
    depths = [int(d) for d in args.depths.split(",") if d]
    widths = [int(w) for w in args.widths.split(",") if w]
    ctx = tempfile.TemporaryDirectory(prefix="qvlm-bench-memory-") if args.workdir is None else None
    work = Path(args.workdir or ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "pairs").exists():
        zoo.sample_pairs(max(args.num_samples, 8), seed=0).save_to_disk(str(work / "pairs"))
    jobs = [(r, "depth", d, args.width) for r in recipes for d in depths]
    jobs += [(r, "width", args.width_depth, w) for r in recipes for w in widths]
    results: list[dict] = []
    header = f"{'recipe':<14} {'series':<6} {'layers':>6} {'width':>6} {'weights':>13} {'working':>13} " \
             f"{'anon':>13} {'calib s':>8} {'s/layer':>8}"
    print(header)
    for recipe, series, layers, width in tqdm(jobs, desc="bench memory", unit="run"):
        res = run_one(layers, width, recipe, args, work)
        res["series"] = series
        results.append(res)
        tqdm.write(f"{recipe:<14} {series:<6} {res['layers']:>6} {res['width']:>6} {_mib(res['weights_bytes'])} "
                   f"{_mib(res['working_bytes'])} {_mib(res['working_anon_bytes'])} {res['seconds']:8.1f} {res['seconds_per_layer']:8.2f}")

    ok, lines = summarize(results, recipes, args.num_samples)
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": results, "summary": lines}, indent=2))
    if ctx is not None:
        ctx.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
