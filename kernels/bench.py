"""Benchmark the packed W3/W4 kernels side by side with torch fp16 and other low-bit kernels.

    python kernels/bench.py                 # CUDA: 7B/13B layer shapes, M in 1..1024, + end-to-end
    python kernels/bench.py --impls il tinygemm gemlite marlin --ms 1 16 256 1024 --e2e off
    python kernels/bench.py --help

One row per (scheme, layer shape K x N, M, implementation), all on the device it finds:
- ``fp16``: ``torch.nn.functional.linear`` with a dense fp16 weight (cuBLAS), the baseline;
- ``ct``: transformers' default compressed-tensors route (transformers 5.17 + compressed-tensors
  0.19): decompressed to a dense weight on the first forward (``decompress_module``), then its
  wrapped forward on the dense weight (no memory saving);
- ``ours``: ``dispatch.packed_linear``, the kernels on the compressed-tensors layout (the loader's
  default route);
- ``il``: ``il_dispatch.interleaved_linear``, the kernels on the interleaved layout
  (``interleaved.py``): single-launch decode, dequantize + cuBLAS prefill;
- peers (``peers.py``), when they can run: ``tinygemm`` (``torch.ops.aten._weight_int4pack_mm``,
  W4, bf16 activations), ``gemlite`` and vLLM's ``marlin`` when importable.
Columns: eager latency (ms), CUDA-graph replay latency (ms, the kernels without the host's
launch overhead), host enqueue time per call (us), speed-ups over fp16 in both timings, achieved
GB/s (weights as stored + activations in + outputs out, over the graph latency when measured)
with % of peak memory bandwidth, the error against the fp32 plain-PyTorch reference, and the
chosen path/config. Tuned paths are tuned before timing. Timing: CUDA events around each call,
the L2 cache flushed before every timed call, median over ``--reps``. A failing measurement
prints FAILED and the run goes on (``--strict`` stops).

End-to-end (``--e2e``): ``kernels/e2e.py``. bf16 against W4A16 g128 through ``ours`` and through
``il`` on a LLaVA with Llama-7B layer shapes, greedy decode eager and with CUDA graphs.

On CPU (no CUDA) it runs tiny shapes through the Triton interpreter (``TRITON_INTERPRET=1``,
set automatically) so CI keeps the script working: the timings then mean nothing and are
labelled so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

if not torch.cuda.is_available():  # before the kernels are imported (see kernels/_unpack.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qvlm_modifiers.kernels import dispatch, il_dispatch  # noqa: E402
from qvlm_modifiers.kernels.interleaved import repack, supports  # noqa: E402
from qvlm_modifiers.kernels.packing import PackedLayout, quantize_and_pack, reference_dequantize  # noqa: E402
from qvlm_modifiers.kernels.peers import PEERS, Unavailable, make_peer  # noqa: E402

GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824), (13824, 5120)]  # K x N
GPU_MS = [1, 4, 16, 64, 256, 1024]
CPU_SHAPES = [(128, 96), (256, 33)]
CPU_MS = [1, 4, 16, 64]
SCHEMES = {  # name: (bits, group_size, symmetric)
    "w4g128": (4, 128, True),
    "w4g128a": (4, 128, False),
    "w3g128": (3, 128, True),
    "w3g128a": (3, 128, False),
    "w4ch": (4, None, True),
}
IMPLS = ["ct", "ours", "il", *PEERS]
# peak HBM bandwidth (GB/s) by device name, when torch does not expose clock and bus width
PEAK_GBS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
            "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935, "A100-PCIE-40GB": 1555,
            "L40S": 864, "L4": 300, "RTX 4090": 1008, "A10G": 600}
# Targets from the issue (H100/H200, fp16 baseline, group 128)
TARGETS = {("w4g128", 1): 3.0, ("w4g128a", 1): 3.0, ("w3g128", 1): 3.6, ("w3g128a", 1): 3.6}


def peak_bandwidth_gbs(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-gbs"
    if device.type != "cuda":
        return None, "n/a on CPU"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width (DDR)"
    for key, gbs in PEAK_GBS.items():
        if key in props.name:
            return float(gbs), f"table entry {key!r}"
    return None, f"unknown for {props.name!r}; pass --peak-gbs"


class Timer:
    """Median latency (ms) of ``fn`` with the L2 flushed before each timed call."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
            self.flush_buf = torch.empty(2 * l2, dtype=torch.int8, device=device)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.reps):
                self.flush_buf.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()  # keeps one call per flush; events measure GPU time only
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def graph(self, fn) -> float:
        """Median latency (ms) of ``fn`` captured once in a CUDA graph and replayed (L2 flushed
        before each replay): the GPU time of the kernels, without the host's launch overhead."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self(graph.replay)

    def host_us(self, fn, calls: int = 200) -> float:
        """Host time (us) to enqueue one call of ``fn`` (no synchronisation between calls): the
        launch overhead an eager (non-graph) decode step pays per Linear."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / calls * 1e6


def ct_default_linear(packed: dict, layout: PackedLayout, dtype: torch.dtype, device: torch.device):
    """A Linear in the state transformers' default compressed-tensors route leaves it in after the
    first forward: scheme attached, compressed tensors loaded, then ``decompress_module``."""
    from compressed_tensors.compressors.base import decompress_module
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
    from compressed_tensors.utils import replace_direct_state_dict

    linear = torch.nn.Linear(layout.in_features, layout.out_features, bias=False, device=device, dtype=dtype)
    scheme = QuantizationScheme(targets=["Linear"], weights=layout.quantization_args(), format="pack-quantized")
    initialize_module_for_quantization(linear, scheme, force_zero_point=False)
    state = {k: v.to(device) for k, v in packed.items()}
    replace_direct_state_dict(linear, state)
    linear.register_parameter("bias", None)  # replace_direct_state_dict drops entries it was not given
    linear.quantization_status = QuantizationStatus.COMPRESSED
    decompress_module(linear)
    assert linear.weight.dtype == dtype and linear.quantization_status == QuantizationStatus.DECOMPRESSED
    return linear


def _implementations(args, packed, layout, tensors, w, dtype, device) -> dict:
    """name -> (fn(x), stored bytes, w_ref or None, choose(x) -> config string) or the reason it cannot run."""
    out = {}
    stored = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    for name in args.impls:
        try:
            if name == "ct":
                lin = ct_default_linear(packed, layout, dtype, device)
                out[name] = (lin, layout.out_features * layout.in_features * 2, None, lambda x: "dense after decompression")
            elif name == "ours":
                def choose_ours(x):
                    path, cfg = dispatch.choose(x, tensors, layout)
                    return f"{path} " + ",".join(f"{a}={b}" for a, b in cfg.items() if a in CFG_KEYS)
                out[name] = (lambda x: dispatch.packed_linear(x, *tensors, layout), stored, None, choose_ours)
            elif name == "il":
                if not supports(layout, args.tile_n):
                    raise Unavailable("layout not supported by the interleaved kernels")
                iw = repack(*tensors, layout, tile_n=args.tile_n)

                def choose_il(x, iw=iw):
                    path, cfg = il_dispatch.choose(x, iw)
                    return f"{path} " + ",".join(f"{a}={b}" for a, b in cfg.items() if a in CFG_KEYS)
                out[name] = (lambda x, iw=iw: il_dispatch.interleaved_linear(x, iw), iw.nbytes(), None, choose_il)
            else:
                peer = make_peer(name, tensors, layout, w, dtype, device)
                out[name] = (peer.fn, peer.stored_bytes, peer.w_ref, lambda x, note=peer.note: note)
        except Unavailable as e:
            out[name] = str(e)
        except Exception as e:  # noqa: BLE001
            if args.strict:
                raise
            out[name] = f"FAILED to set up: {type(e).__name__}: {str(e)[:200]}"
    return out


CFG_KEYS = ("block_m", "block_n", "block_k", "split_k", "use_dot", "num_warps")


def bench_layers(args, device: torch.device) -> list[dict]:
    on_gpu = device.type == "cuda"
    graphs = on_gpu and args.timing == "both"
    dtype = torch.float16
    shapes = args.shapes or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    ms = args.ms or (GPU_MS if on_gpu else CPU_MS)
    timer = Timer(device, args.reps, args.warmup)
    peak, peak_src = peak_bandwidth_gbs(device, args.peak_gbs)
    print(f"# peak memory bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'} ({peak_src})")
    header = (f"{'scheme':8} {'K':>6} {'N':>6} {'M':>5} {'impl':8} | {'eager ms':>9} {'graph ms':>9} {'host us':>7} | "
              f"{'x fp16':>6} {'x graph':>7} | {'GB/s':>7} {'%peak':>6} | {'rel err':>7} | path / note")
    print(header)
    print("-" * len(header))
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for scheme in args.schemes:
        bits, group, sym = SCHEMES[scheme]
        for k, n in tqdm(shapes, desc=f"bench {scheme}", unit="shape", leave=False, file=sys.stderr):
            w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
            # fp16 scales so the compressed-tensors route can run in fp16 too (ours accepts either)
            packed, layout = quantize_and_pack(w, bits, group, sym, scale_dtype=dtype)
            tensors = tuple(packed[name].to(device) if name in packed else None
                            for name in ("weight_packed", "weight_scale", "weight_zero_point"))
            w16 = w.to(dtype)
            w_ref = reference_dequantize(*tensors, layout, torch.float32)  # plain-PyTorch reference, fp32
            impls = _implementations(args, packed, layout, tensors, w, dtype, device)
            del w
            for name, impl in impls.items():
                if isinstance(impl, str):
                    print(f"{scheme:8} {k:6d} {n:6d} {'-':>5} {name:8} | unavailable: {impl}", flush=True)
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
                io_bytes = (m * k + m * n) * 2
                fp16 = lambda: torch.nn.functional.linear(x, w16)  # noqa: E731
                base = dict(eager=timer(fp16), graph=timer.graph(fp16) if graphs else float("nan"),
                            host=timer.host_us(fp16) if graphs else float("nan"))
                cases = [("fp16", (fp16, n * k * 2, w16.float(), None))] + [(a, b) for a, b in impls.items()
                                                                     if not isinstance(b, str)]
                for name, (fn, nbytes, own_ref, choose) in cases:
                    try:
                        label = choose(x) if choose else "cuBLAS"  # tune before timing
                        call = fn if name == "fp16" else (lambda fn=fn: fn(x))
                        t = base if name == "fp16" else dict(
                            eager=timer(call), graph=timer.graph(call) if graphs else float("nan"),
                            host=timer.host_us(call) if graphs else float("nan"))
                        y_ref = x.float() @ (own_ref.to(device) if own_ref is not None else w_ref).T
                        y = call() if name != "fp16" else fn()
                        err = ((y.float() - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-12)).item()
                    except Exception as e:  # keep the rest of the table (a GPU session runs this unattended)
                        print(f"{scheme:8} {k:6d} {n:6d} {m:5d} {name:8} | FAILED: {type(e).__name__}: {str(e)[:300]}",
                              flush=True)
                        if args.strict:
                            raise
                        continue
                    kernel_ms = t["graph"] if t["graph"] == t["graph"] else t["eager"]
                    gbs = (nbytes + io_bytes) / kernel_ms / 1e6
                    row = dict(scheme=scheme, k=k, n=n, m=m, impl=name, eager=t["eager"], graph=t["graph"],
                               host_us=t["host"], x_fp16=base["eager"] / t["eager"],
                               x_fp16_graph=base["graph"] / t["graph"], gbs=gbs,
                               pct=(100 * gbs / peak) if peak else float("nan"), rel_err=err, path=label,
                               stored_bytes=nbytes)
                    rows.append(row)
                    print(f"{scheme:8} {k:6d} {n:6d} {m:5d} {name:8} | {t['eager']:9.4f} {t['graph']:9.4f} "
                          f"{t['host']:7.1f} | {row['x_fp16']:6.2f} {row['x_fp16_graph']:7.2f} | {gbs:7.1f} "
                          f"{row['pct']:6.1f} | {err:7.1e} | {label}", flush=True)
            del impls, w16, w_ref
            if on_gpu:
                torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict], device: torch.device) -> None:
    for impl in ("ours", "il"):
        sel = [r for r in rows if r["impl"] == impl]
        if sel:
            worst = max(sel, key=lambda r: r["rel_err"])
            # fp16 output rounding is 2^-11 ~ 5e-4 of the output's scale; fp32 accumulation order adds less
            print(f"\n# correctness {impl}: worst max|y - fp32 reference| / max|reference| = {worst['rel_err']:.1e} "
                  f"({worst['scheme']} K={worst['k']} N={worst['n']} M={worst['m']}): "
                  f"{'OK' if worst['rel_err'] < 2e-3 else 'TOO LARGE'} (bound 2e-3)")
    print("\n# targets (issue): W4 g128 M=1 >= 3.0x fp16, W3 g128 M=1 >= 3.6x, never slower than fp16 at M >= 128")
    if device.type != "cuda":
        print("#   not evaluated: CPU interpreter timings mean nothing")
        return
    name = torch.cuda.get_device_name(device)
    print(f"#   device: {name}")
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i not in ("fp16", "ct")]
    for impl in impls:
        for key, label in (("x_fp16_graph", "graph"), ("x_fp16", "eager")):
            timed = [r for r in rows if r["impl"] == impl and r[key] == r[key]]  # NaN: not measured
            for (scheme, m), target in TARGETS.items():
                sel = [r[key] for r in timed if r["scheme"] == scheme and r["m"] == m]
                if sel:
                    print(f"#   {impl:8} {scheme} M={m} ({label}): min speed-up over shapes {min(sel):.2f}x "
                          f"(target {target}x): {'MET' if min(sel) >= target else 'NOT MET'}")
            big = [r for r in timed if r["m"] >= 128]
            if big:
                worst = min(big, key=lambda r: r[key])
                print(f"#   {impl:8} M>=128 ({label}): worst speed-up {worst[key]:.2f}x ({worst['scheme']} K={worst['k']} "
                      f"N={worst['n']} M={worst['m']}): {'MET' if worst[key] >= 1.0 else 'NOT MET'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["w4g128", "w4g128a", "w3g128"], choices=list(SCHEMES))
    p.add_argument("--shapes", nargs="+", default=None, type=lambda s: tuple(int(v) for v in s.lower().split("x")),
                   help="layer shapes KxN (in_features x out_features), e.g. 4096x11008")
    p.add_argument("--ms", nargs="+", type=int, default=None, help="rows M of the activation")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (median)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--peak-gbs", type=float, default=None, help="override the device's peak memory bandwidth")
    p.add_argument("--quick", action="store_true",
                   help="short GPU run: W4/W3 g128 sym, shapes 4096x4096 and 4096x11008, M in {1, 16, 256}")
    p.add_argument("--timing", choices=["eager", "both"], default="both",
                   help="eager: per-call latency only; both (GPU): also CUDA-graph replay (kernel time without "
                        "launch overhead) and the host's enqueue time per call")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS,
                   help="implementations besides fp16 (peers that cannot run print why)")
    p.add_argument("--tile-n", type=int, default=32, help="row tile of the interleaved layout")
    p.add_argument("--strict", action="store_true", help="stop at the first failing measurement")
    p.add_argument("--e2e", choices=["on", "off", "only"], default="on",
                   help="end-to-end decode line: on (after the layer table), off, or only (skip the layer table)")
    p.add_argument("--e2e-layers", type=int, default=8)
    p.add_argument("--e2e-tokens", type=int, default=64)
    p.add_argument("--e2e-variants", nargs="+", default=["bf16", "interleaved", "packed"],
                   choices=["bf16", "packed", "interleaved"])
    p.add_argument("--workdir", default=None, help="where the e2e checkpoints go (default: a temp dir)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    import tempfile

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if args.quick and on_gpu:
        args.schemes = ["w4g128", "w3g128"]
        args.shapes = args.shapes or [(4096, 4096), (4096, 11008)]
        args.ms = args.ms or [1, 16, 256]
    args.reps = args.reps or (50 if on_gpu else 2)
    args.warmup = args.warmup or (5 if on_gpu else 1)
    import triton

    if on_gpu:
        print(f"# device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}")
    else:
        print(f"# device: CPU, Triton interpreter (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}), "
              f"torch {torch.__version__}, triton {triton.__version__}")
        print("# !!! CPU run: tiny shapes, interpreted kernels. The timings below MEAN NOTHING; this run only "
              "checks that the benchmark works.")
    rows: list[dict] = []
    if args.e2e != "only":
        t0 = time.perf_counter()
        rows = bench_layers(args, device)
        summarize(rows, device)
        print(f"# layer table took {time.perf_counter() - t0:.0f} s (Triton compilation and tuning included)")
    if args.e2e in ("on", "only"):
        from qvlm_modifiers.kernels import e2e

        try:
            run = lambda wd: e2e.run_e2e(wd, device, args.e2e_layers, args.e2e_tokens,  # noqa: E731
                                         variants=args.e2e_variants)
            if args.workdir:
                run(args.workdir)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    run(tmp)
        except Exception as e:
            print(f"e2e FAILED: {type(e).__name__}: {str(e)[:500]}")
            if args.strict:
                raise
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
