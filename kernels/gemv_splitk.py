"""Decode path (M = 1..16): split-K GEMV/skinny-GEMM straight from the pack-quantized layout.

``y[M, N] = x[M, K] @ dequant(W)[N, K].T`` where ``W`` is compressed-tensors ``weight_packed``
(int32, packed along K), ``weight_scale`` (per group of K or per channel) and optional packed
``weight_zero_point`` (see ``packing.py``).

Grid: ``(cdiv(N, BLOCK_N), SPLIT_K)``. Program ``(n, s)`` owns output columns
``n*BLOCK_N ..`` and the K range ``s*K_PER_SPLIT ..``; all ``M <= BLOCK_M`` rows of ``x`` are
handled by the same program, so every packed weight word is read from memory once. At small M
the matmul is bound by reading W, and splitting K puts enough programs on the GPU to saturate
memory bandwidth even when ``N / BLOCK_N`` is small. With ``SPLIT_K > 1`` each program writes a
float32 partial ``[SPLIT_K, M, N]`` and a second small kernel sums the partials (deterministic,
no atomics).

Two inner products: ``USE_DOT=True`` uses ``tl.dot`` on a ``[BLOCK_M=16, BLOCK_K] x
[BLOCK_K, BLOCK_N]`` tile (tensor cores, any M <= 16); ``USE_DOT=False`` (``BLOCK_M=1``) is a
CUDA-core GEMV for M == 1 (elementwise products accumulated in a ``[BLOCK_K, BLOCK_N]`` register
tile across the K loop, reduced over K once at the end).

Dequantization: ``W = (q - z) * s`` with unsigned ``q``/``z`` (``z = 2**(b-1)`` when symmetric),
computed in float32 and rounded once to the activation dtype. Group strategy: ``BLOCK_K``
divides the group size, so a K block uses one scale per column. Channel strategy: the scale
(and zero point) are constant along K, so ``x @ (q - z)`` is accumulated exactly and the scale
applied once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._unpack import add_f32, dequant_tile, dot_f32, interpreter_upcast, scale_and_zero, standard_lib_usable
from .packing import PackedLayout, reference_linear

__all__ = ["splitk_linear", "reference", "default_config", "MAX_M"]

MAX_M = 16


@triton.jit
def _splitk_kernel(
    x_ptr, wq_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, KW, ZW, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_sg, stride_zw, stride_zg,
    stride_os, stride_om, stride_on,
    BITS: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, TL_SUM: tl.constexpr, WORD_TILE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_rows = wq_ptr + offs_n * stride_wn  # word 0 of each packed row

    if GROUP_K == 0:  # per channel: scale / zero point constant along K, loaded once
        s_col, z_col = scale_and_zero(s_ptr, z_ptr, offs_n, 0, n_mask, ZW, stride_sn, stride_sg, stride_zw, stride_zg,
                                      BITS, HAS_ZP)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if not USE_DOT:
        acc_k = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if GROUP_K == 0:
            w = dequant_tile(w_rows, k0, K, KW, n_mask, s_col, z_col, x.dtype, BITS, BLOCK_K, BLOCK_N, WORD_TILE, False)
        else:  # BLOCK_K divides GROUP_K: one group per K step
            s, z = scale_and_zero(s_ptr, z_ptr, offs_n, k0 // GROUP_K, n_mask, ZW, stride_sn, stride_sg, stride_zw,
                                  stride_zg, BITS, HAS_ZP)
            w = dequant_tile(w_rows, k0, K, KW, n_mask, s, z, x.dtype, BITS, BLOCK_K, BLOCK_N, WORD_TILE, True)
        if USE_DOT:
            acc += dot_f32(x, w, UPCAST_DOT)
        else:  # BLOCK_M == 1: CUDA-core GEMV, per-thread partial sums, one reduction at the end
            acc_k += tl.reshape(x, (BLOCK_K, 1)).to(tl.float32) * w.to(tl.float32)

    if not USE_DOT:
        if TL_SUM:
            acc += tl.reshape(tl.sum(acc_k, axis=0), (1, BLOCK_N))
        else:  # interpreter after Triton was imported without it (see _unpack.py)
            acc += tl.reshape(tl.reduce(acc_k, 0, add_f32), (1, BLOCK_N))

    if GROUP_K == 0:
        acc = acc * s_col[None, :]
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_partials_kernel(p_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def default_config(m: int, layout: PackedLayout, device: torch.device) -> dict:
    """A reasonable untuned config (the dispatcher tunes on CUDA; see ``dispatch.py``)."""
    k = layout.in_features
    block_k = 128 if layout.group_size is None else min(128, layout.group_size)
    block_n = 64
    n_tiles = triton.cdiv(layout.out_features, block_n)
    k_blocks = triton.cdiv(k, block_k)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split_k = 1
        while n_tiles * split_k < 4 * sms and split_k * 2 <= k_blocks and split_k < 32:
            split_k *= 2
    else:
        split_k = min(2, k_blocks)  # interpreter: exercise the split-K reduction cheaply
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, use_dot=m > 1, word_tile=True, num_warps=4,
                num_stages=3)


def splitk_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    layout: PackedLayout,
    *,
    block_n: int = 64,
    block_k: int = 64,
    split_k: int = 1,
    use_dot: bool = True,
    word_tile: bool = True,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """``x[M, K] @ dequant(W).T -> [M, N]`` in ``x.dtype`` for ``M <= 16``."""
    m, k = x.shape
    n = layout.out_features
    if m > MAX_M:
        raise ValueError(f"splitk_linear handles M <= {MAX_M} rows, got M={m}; use gemm_linear")
    if k != layout.in_features:
        raise ValueError(f"x has K={k} but the weight has in_features={layout.in_features}")
    group_k = 0 if layout.group_size is None else layout.group_size
    if group_k and group_k % block_k != 0:
        raise ValueError(f"block_k={block_k} must divide group_size={group_k}")
    if not use_dot and m != 1:
        raise ValueError("the CUDA-core GEMV variant (use_dot=False) handles M == 1 only")
    if block_k % 32 != 0:
        raise ValueError(f"block_k={block_k} must be a multiple of 32 (one packing unit of 32 fields)")
    if weight_packed.stride(1) != 1:
        weight_packed = weight_packed.contiguous()
    block_m = 16 if use_dot else 1
    k_blocks = triton.cdiv(k, block_k)
    split_k = max(1, min(split_k, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # drop empty splits

    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    out = y if split_k == 1 else torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    stride_os = 0 if split_k == 1 else out.stride(0)
    has_zp = not layout.symmetric
    zp = weight_zero_point if has_zp else weight_scale  # dummy pointer when symmetric
    grid = (triton.cdiv(n, block_n), split_k)
    _splitk_kernel[grid](
        x, weight_packed, weight_scale, zp, out,
        m, n, k, weight_packed.shape[1], zp.shape[0], k_per_split,
        x.stride(0), x.stride(1), weight_packed.stride(0), weight_scale.stride(0), weight_scale.stride(1),
        zp.stride(0), zp.stride(1),
        stride_os, out.stride(-2), out.stride(-1),
        BITS=layout.num_bits, GROUP_K=group_k, HAS_ZP=has_zp,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
        UPCAST_DOT=interpreter_upcast(x.dtype), TL_SUM=standard_lib_usable(), WORD_TILE=word_tile, num_warps=num_warps, num_stages=num_stages,
    )
    if split_k > 1:
        mn = m * n
        block = 1024
        _sum_partials_kernel[(triton.cdiv(mn, block),)](out, y, mn, SPLIT_K=split_k, BLOCK=block)
    return y


def reference(x, weight_packed, weight_scale, weight_zero_point, layout, **_):
    """Plain-PyTorch reference (compressed-tensors unpack + dequantize, float32 matmul)."""
    return reference_linear(x, weight_packed, weight_scale, weight_zero_point, layout)
