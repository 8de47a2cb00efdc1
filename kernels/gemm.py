"""Prefill path (large M): tiled GEMM that dequantizes pack-quantized W tiles in registers.

``y[M, N] = x[M, K] @ dequant(W)[N, K].T``; layout in ``packing.py``.

Grid: one program per ``BLOCK_M x BLOCK_N`` output tile, launched in grouped order
(``GROUP_M`` tile rows share W tiles while they are in L2). Each K step loads an x tile, reads
the packed words of the matching W^T tile ``[BLOCK_K, BLOCK_N]``, extracts the ``b``-bit fields
(3-bit fields may straddle two int32 words), dequantizes ``(q - z) * s`` in float32, rounds to
the activation dtype and feeds ``tl.dot`` (tensor cores; float32 accumulator).
``BLOCK_K`` divides the group size so a K step uses one scale (and zero point) per column.
Per-channel: ``x @ (q - z)`` is accumulated exactly and the scale applied once at the end.

At large M the GEMM is compute bound and the dequant work is amortized over ``BLOCK_M`` rows;
the dispatcher (``dispatch.py``) also measures "dequantize to fp16 + cuBLAS" (``dequant.py``)
per shape on CUDA and keeps whichever is faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._unpack import dequant_tile, dot_f32, interpreter_upcast, scale_and_zero
from .packing import PackedLayout, reference_linear

__all__ = ["gemm_linear", "reference", "default_config"]


@triton.jit
def _gemm_kernel(
    x_ptr, wq_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, KW, ZW,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_sg, stride_zw, stride_zg, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, WORD_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_rows = wq_ptr + offs_n * stride_wn  # word 0 of each packed row

    if GROUP_K == 0:  # per channel: scale / zero point constant along K, loaded once
        s_col, z_col = scale_and_zero(s_ptr, z_ptr, offs_n, 0, n_mask, ZW, stride_sn, stride_sg, stride_zw, stride_zg,
                                      BITS, HAS_ZP)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
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
        acc += dot_f32(x, w, UPCAST_DOT)

    if GROUP_K == 0:
        acc = acc * s_col[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def default_config(m: int, layout: PackedLayout, device: torch.device) -> dict:
    block_k = 64 if layout.group_size is None else min(64, layout.group_size)
    if device.type != "cuda":  # interpreter: small tiles keep CPU emulation fast
        return dict(block_m=16, block_n=32, block_k=min(block_k, 32), group_m=8, num_warps=4, num_stages=2)
    block_m = 128 if m >= 128 else 64
    return dict(block_m=block_m, block_n=128, block_k=block_k, group_m=8, num_warps=8, num_stages=3)


def gemm_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    layout: PackedLayout,
    *,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 32,
    group_m: int = 8,
    word_tile: bool = True,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """``x[M, K] @ dequant(W).T -> [M, N]`` in ``x.dtype`` (any M)."""
    m, k = x.shape
    n = layout.out_features
    if k != layout.in_features:
        raise ValueError(f"x has K={k} but the weight has in_features={layout.in_features}")
    group_k = 0 if layout.group_size is None else layout.group_size
    if group_k and group_k % block_k != 0:
        raise ValueError(f"block_k={block_k} must divide group_size={group_k}")
    if block_k % 32 != 0:
        raise ValueError(f"block_k={block_k} must be a multiple of 32 (one packing unit of 32 fields)")
    if weight_packed.stride(1) != 1:
        weight_packed = weight_packed.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    has_zp = not layout.symmetric
    zp = weight_zero_point if has_zp else weight_scale
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel[grid](
        x, weight_packed, weight_scale, zp, y,
        m, n, k, weight_packed.shape[1], zp.shape[0],
        x.stride(0), x.stride(1), weight_packed.stride(0), weight_scale.stride(0), weight_scale.stride(1),
        zp.stride(0), zp.stride(1), y.stride(0), y.stride(1),
        BITS=layout.num_bits, GROUP_K=group_k, HAS_ZP=has_zp,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        UPCAST_DOT=interpreter_upcast(x.dtype), WORD_TILE=word_tile, num_warps=num_warps, num_stages=num_stages,
    )
    return y


def reference(x, weight_packed, weight_scale, weight_zero_point, layout, **_):
    """Plain-PyTorch reference (compressed-tensors unpack + dequantize, float32 matmul)."""
    return reference_linear(x, weight_packed, weight_scale, weight_zero_point, layout)
