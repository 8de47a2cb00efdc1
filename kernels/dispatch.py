"""Pick a kernel and a config per (shape, layout, dtype): ``packed_linear`` is the one entry point.

- ``M <= 16`` (decode): ``gemv_splitk.splitk_linear`` (split-K; CUDA-core GEMV or ``tl.dot``).
- ``M > 16`` (prefill): ``gemm.gemm_linear`` (Triton tiled GEMM, dequant in registers) or
  ``dequant.dequant_linear`` (Triton dequantize + cuBLAS), whichever is faster.

On CUDA the first call for a key ``(path, M bucket, N, K, bits, group, sym, dtype, device)``
times a small candidate list (CUDA events over a CUDA-graph replay of a few calls, so launch
overhead does not decide; selection only, not a benchmark)
and caches the winner for the process: decode tunes inner product (tensor-core ``tl.dot`` vs
CUDA-core GEMV at M == 1), unpack variant (word tile vs per-field gather), tile sizes, then
split-K; prefill tunes GEMM tiles and unpack variant against dequantize + cuBLAS. ``QVLM_KERNEL_TUNE=0`` skips tuning and uses each
kernel's ``default_config`` (as the CPU interpreter always does).
"""

from __future__ import annotations

import os

import torch

from . import dequant, gemm, gemv_splitk
from .packing import PackedLayout

__all__ = ["packed_linear", "choose", "clear_tuning_cache", "tuning_cache"]

_TUNED: dict[tuple, tuple[str, dict]] = {}


def tuning_cache() -> dict:
    """The per-process cache ``key -> (path, config)`` (for inspection and the benchmark)."""
    return _TUNED


def clear_tuning_cache() -> None:
    _TUNED.clear()


def _m_bucket(m: int) -> int:
    if m <= gemv_splitk.MAX_M:
        return m
    b = 32
    while b < m and b < 4096:
        b *= 2
    return b


def _decode_candidates(m: int, layout: PackedLayout, device) -> list[tuple[str, dict]]:
    """Stage 1: inner product, unpack variant and tile sizes at the default split-K."""
    base = gemv_splitk.default_config(m, layout, device)
    out = [("splitk", base)]
    group = layout.group_size
    block_ks = [bk for bk in (64, 128) if group is None or group % bk == 0] or [32]
    for use_dot in ((False, True) if m == 1 else (True,)):
        for word_tile in (True, False):
            for block_n in (32, 64, 128):
                for block_k in block_ks:
                    cfg = dict(base, use_dot=use_dot, word_tile=word_tile, block_n=block_n, block_k=block_k)
                    if cfg != base:
                        out.append(("splitk", cfg))
    return out


def _decode_refine(best: tuple[str, dict]) -> list[tuple[str, dict]]:
    """Stage 2: split-K around the default for the stage-1 winner."""
    path, cfg = best
    s = cfg["split_k"]
    return [(path, dict(cfg, split_k=v)) for v in sorted({max(1, s // 4), max(1, s // 2), s * 2}) if v != s]


def _prefill_candidates(m: int, layout: PackedLayout, device) -> list[tuple[str, dict]]:
    out = [("gemm", gemm.default_config(m, layout, device)), ("dequant", {})]
    group = layout.group_size
    for bm, bn, bk, warps, stages in (
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 256, 32, 8, 3),
    ):
        if group is not None and group % bk != 0:
            continue
        if bm > 2 * max(m, 16):
            continue
        for word_tile in (True, False):
            out.append(("gemm", dict(block_m=bm, block_n=bn, block_k=bk, group_m=8, word_tile=word_tile,
                                     num_warps=warps, num_stages=stages)))
    return out


_RUNNERS = {
    "splitk": gemv_splitk.splitk_linear,
    "gemm": gemm.gemm_linear,
    "dequant": dequant.dequant_linear,
}


def _time_cuda(fn, reps: int = 10) -> float:
    """GPU time (ms) of one call of ``fn``: ``reps`` calls captured in one CUDA graph and replayed,
    so the host's launch overhead (tens of microseconds per Triton launch, more than a decode
    kernel's run time) does not decide the ranking. Falls back to back-to-back eager calls when
    the graph cannot be captured."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(reps):
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        runner = graph.replay
        runner()
    except Exception:  # capture unsupported here: time eagerly (launch overhead included)
        torch.cuda.synchronize()

        def runner():
            for _ in range(reps):
                fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    runner()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def choose(x2d: torch.Tensor, tensors: tuple, layout: PackedLayout) -> tuple[str, dict]:
    """The ``(path, config)`` used for ``x2d`` (tuned on CUDA unless ``QVLM_KERNEL_TUNE=0``)."""
    m = x2d.shape[0]
    decode = m <= gemv_splitk.MAX_M
    key = ("decode" if decode else "prefill", _m_bucket(m), layout, x2d.dtype, x2d.device)
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    device = x2d.device
    candidates = _decode_candidates(m, layout, device) if decode else _prefill_candidates(m, layout, device)
    tune = device.type == "cuda" and os.environ.get("QVLM_KERNEL_TUNE", "1") != "0"
    if tune and torch.cuda.is_current_stream_capturing():
        tune = False  # first call inside a user's graph capture: no synchronising timings allowed
    if not tune:
        best = candidates[0]
    else:
        best, best_ms = _fastest(candidates, x2d, tensors, layout)
        if decode:
            refined, refined_ms = _fastest(_decode_refine(best), x2d, tensors, layout)
            if refined_ms < best_ms:
                best = refined
    _TUNED[key] = best
    return best


def _fastest(candidates, x2d, tensors, layout) -> tuple[tuple[str, dict], float]:
    best, best_ms = candidates[0] if candidates else None, float("inf")
    for path, cfg in candidates:
        try:
            ms = _time_cuda(lambda: _RUNNERS[path](x2d, *tensors, layout, **cfg))
        except Exception:  # a config the compiler rejects (e.g. out of shared memory)
            continue
        if ms < best_ms:
            best, best_ms = (path, cfg), ms
    return best, best_ms


def packed_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    layout: PackedLayout,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[..., K] @ dequant(W).T (+ bias) -> [..., N]`` in ``x.dtype`` through the Triton kernels.

    ``x`` must be fp16 or bf16 and on the same device as the packed tensors (CUDA, or CPU under
    ``TRITON_INTERPRET=1``)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"packed kernels take fp16/bf16 activations, got {x.dtype}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    tensors = (weight_packed, weight_scale, weight_zero_point)
    if x2d.shape[0] == 0:
        y = x2d.new_empty((0, layout.out_features))
    else:
        path, cfg = choose(x2d, tensors, layout)
        y = _RUNNERS[path](x2d, *tensors, layout, **cfg)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, layout.out_features)
