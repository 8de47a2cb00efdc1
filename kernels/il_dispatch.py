"""Entry points of the interleaved layout: ``interleaved_linear`` (one call), and
``use_interleaved`` (the opt-in switch that moves a loaded model's ``PackedLinear`` modules to it).

Routing by M, the number of rows of ``x``:
- ``M <= 16`` (decode): ``il_decode.il_linear``, one launch. The GEMV is used at M == 1 and
  ``tl.dot`` above; split-K is reduced in the kernel.
- ``M > 16`` (prefill): ``il_prefill.prefill_linear``, which dequantizes into the shared buffer
  and calls cuBLAS. The same single-launch kernel with 64-row tiles (``fused``) is the other
  candidate.

On CUDA the first call per ``(decode|prefill, M bucket, layout, dtype, device)`` times the
candidates by CUDA-graph replay (``dispatch._time_cuda``) and caches the fastest. It does this
only when it is not inside a graph capture. Then the split-K factor is refined around the
winner; split-K is a runtime argument, so that refinement compiles at most one variant (split 1).
``QVLM_IL_TUNE=0|small|full`` sets the search (see ``_candidates``); ``QVLM_KERNEL_TUNE=0`` also
turns it off. Off, it uses the defaults, as the CPU interpreter always does.

The default route of ``PackedLinear`` does not change: ``use_interleaved(model)`` is the switch
(``kernels/e2e.py`` applies it after ``from_pretrained``).
"""

from __future__ import annotations

import os
import types

import torch

from . import il_decode, il_prefill
from .interleaved import InterleavedWeight, reference_dequantize, repack, supports, unrepack

__all__ = ["interleaved_linear", "choose", "use_interleaved", "tuning_cache"]

_TUNED: dict = {}


def tuning_cache() -> dict:
    return _TUNED


def _m_bucket(m: int) -> int:
    if m <= il_decode.MAX_DECODE_M:
        return m
    b = 32
    while b < m and b < 4096:
        b *= 2
    return b


def _tune_space() -> str:
    """``QVLM_IL_TUNE``: ``0`` (no timing), ``small`` (default) or ``full``; unset, ``QVLM_KERNEL_TUNE=0``
    also turns it off. Every candidate config is one Triton compile (seconds each), which is what
    the small space keeps down."""
    space = os.environ.get("QVLM_IL_TUNE", "").strip().lower()
    if not space:
        space = "0" if os.environ.get("QVLM_KERNEL_TUNE", "1") == "0" else "small"
    return space


def _candidates(m: int, w: InterleavedWeight, device, space: str = "small") -> list[tuple[str, dict]]:
    """Stage-1 candidates, the untuned default first. Small space: GEMV at M = 1, ``tl.dot`` above,
    ``BLOCK_N`` in {tile_n, 2 tile_n}, 4 warps; the fused prefill kernel only from M = 128. Full:
    both inner products at M = 1, ``BLOCK_N`` up to 4 tile_n, 4 and 8 warps, fused from M = 17."""
    il = w.layout
    full = space == "full"
    if m > il_decode.MAX_DECODE_M:
        out = [("dequant", {})]
        if m >= 128 or full:
            for block_n, warps in ((128, 8), (64, 4)) if full else ((128, 8),):
                if il.n_pad % block_n == 0 and block_n % il.tile_n == 0:
                    out.append(("fused", dict(block_m=64, block_n=block_n, split_k=1, use_dot=True, num_warps=warps)))
        return out
    base = il_decode.default_config(m, w, device)
    out = [("decode", base)]
    for use_dot in ((False, True) if m == 1 and full else (m > 1,)):
        for mult in (1, 2, 4) if full else (1, 2):
            block_n = il.tile_n * mult
            if il.n_pad % block_n:
                continue
            for warps in (4, 8) if full else (4,):
                cfg = dict(base, use_dot=use_dot, block_m=16 if use_dot else 1, block_n=block_n, num_warps=warps)
                if cfg != base:
                    out.append(("decode", cfg))
    return out


def _split_refine(best: tuple[str, dict], w: InterleavedWeight) -> list[tuple[str, dict]]:
    path, cfg = best
    splits = [s for s in (1, 2, 4, 8, 16, 32) if s <= w.layout.n_packs and s != cfg["split_k"]]
    return [(path, dict(cfg, split_k=s)) for s in splits]


def _run(path: str, x2d: torch.Tensor, w: InterleavedWeight, cfg: dict) -> torch.Tensor:
    if path == "dequant":
        return il_prefill.prefill_linear(x2d, w, **cfg)
    return il_decode.il_linear(x2d, w, **cfg)


def choose(x2d: torch.Tensor, w: InterleavedWeight) -> tuple[str, dict]:
    """``(path, config)`` for ``x2d``: tuned once per key on CUDA, else the first candidate."""
    m = x2d.shape[0]
    decode = m <= il_decode.MAX_DECODE_M
    key = ("decode" if decode else "prefill", _m_bucket(m), w.layout, x2d.dtype, x2d.device)
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    space = _tune_space()
    candidates = _candidates(m, w, x2d.device, space)
    tune = x2d.is_cuda and space != "0"
    if tune and torch.cuda.is_current_stream_capturing():
        tune = False
    best = candidates[0]
    if tune:
        best, best_ms = _fastest(candidates, x2d, w)
        if decode:
            refined, refined_ms = _fastest(_split_refine(best, w), x2d, w)
            if refined_ms < best_ms:
                best = refined
    _TUNED[key] = best
    return best


def _fastest(candidates, x2d, w):
    from .dispatch import _time_cuda

    best, best_ms = (candidates[0] if candidates else None), float("inf")
    for path, cfg in candidates:
        try:
            ms = _time_cuda(lambda: _run(path, x2d, w, cfg))
        except Exception:  # a config the compiler rejects
            continue
        if ms < best_ms:
            best, best_ms = (path, cfg), ms
    return best, best_ms


def interleaved_linear(x: torch.Tensor, w: InterleavedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ dequant(W).T (+ bias) -> [..., N]`` in ``x.dtype`` through the interleaved
    kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"packed kernels take fp16/bf16 activations, got {x.dtype}")
    il = w.layout
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if x2d.shape[0] == 0:
        y = x2d.new_empty((0, il.n))
    else:
        path, cfg = choose(x2d, w)
        y = _run(path, x2d, w, cfg)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, il.n)


# ----------------------------------------------------------------------------- model switch
def _weight(module) -> InterleavedWeight:
    return InterleavedWeight(module._il_layout, module.il_qweight, module.il_scales, module.il_zeros)


def _il_forward(module, x: torch.Tensor) -> torch.Tensor:
    if module._use_triton(x):
        return interleaved_linear(x, _weight(module), bias=module.bias)
    return torch.nn.functional.linear(x, _il_dequantized_weight(module, x.dtype), module.bias)


def _il_dequantized_weight(module, dtype: torch.dtype | None = None) -> torch.Tensor:
    return reference_dequantize(_weight(module), torch.float32).to(dtype or module.il_scales.dtype)


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """Saving writes the compressed-tensors tensors (the checkpoint format), rebuilt bit for bit."""
    for name, t in unrepack(_weight(module)).items():
        if name == "weight_shape":
            t = t.to(module.weight_shape.device)
        state_dict[prefix + name] = t


def use_interleaved(model: torch.nn.Module, tile_n: int = 32, drop_compressed: bool = True) -> int:
    """Repack every ``PackedLinear`` of ``model`` whose layout the interleaved kernels support (see
    ``interleaved.supports``), once, on its device. The others are left as they are.

    A converted module keeps ``il_qweight`` / ``il_scales`` / ``il_zeros`` buffers, which are not
    persistent. Its forward becomes ``interleaved_linear`` when the module would use Triton, and
    otherwise the interleaved plain-PyTorch dequantize + ``F.linear``. That is bit-identical to
    the compressed-tensors reference route, since both compute ``(q - z) * s`` exactly in float32.
    With ``drop_compressed`` (default) the compressed-tensors buffers are freed, so the weights are
    held once. ``state_dict`` / ``save_pretrained`` still write the compressed-tensors tensors,
    rebuilt by ``unrepack``. Returns the number of modules converted."""
    from qvlm_modifiers.packed_loader import PackedLinear

    converted = 0
    for module in model.modules():
        if not isinstance(module, PackedLinear) or hasattr(module, "il_qweight"):
            continue
        if not supports(module.layout, tile_n):
            continue
        w = repack(module.weight_packed, module.weight_scale, module.weight_zero_point, module.layout, tile_n)
        module._il_layout = w.layout
        module.register_buffer("il_qweight", w.qweight, persistent=False)
        module.register_buffer("il_scales", w.scales, persistent=False)
        module.register_buffer("il_zeros", w.zeros, persistent=False)
        module.forward = types.MethodType(_il_forward, module)
        module.dequantized_weight = types.MethodType(_il_dequantized_weight, module)
        if drop_compressed:
            for name in ("weight_packed", "weight_scale", "weight_zero_point"):
                if name in module._buffers:
                    del module._buffers[name]
            if hasattr(module, "register_state_dict_post_hook"):
                module.register_state_dict_post_hook(_state_dict_hook)
            else:  # older torch
                module._register_state_dict_hook(_state_dict_hook)
        converted += 1
    return converted
