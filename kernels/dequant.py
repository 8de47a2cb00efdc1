"""Dequantize a pack-quantized weight to a dense ``[N, K]`` fp16/bf16 matrix (then cuBLAS).

The prefill alternative to ``gemm.py``: at large M the matmul is compute bound, so writing the
dense weight once (``N*K`` elements, a few microseconds on a GPU) and calling
``torch.nn.functional.linear`` (cuBLAS) can beat a Triton GEMM that dequantizes in its inner
loop. The dispatcher measures both per shape (``dispatch.py``).

Grid: one program per ``BLOCK_N x BLOCK_K`` tile of W; each element reads its ``b``-bit field
from the packed row (layout in ``packing.py``), its group's scale and (asymmetric) zero point,
and stores ``(q - z) * s`` rounded to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._unpack import scale_and_zero, unpack_fields
from .packing import PackedLayout, reference_dequantize

__all__ = ["dequantize_packed", "dequant_linear", "reference"]


@triton.jit
def _dequant_kernel(
    wq_ptr, s_ptr, z_ptr, w_ptr,
    N, K, KW, ZW,
    stride_wqn, stride_sn, stride_sg, stride_zw, stride_zg, stride_wn, stride_wk,
    BITS: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    mask = n_mask[:, None] & k_mask[None, :]
    q = unpack_fields(wq_ptr + offs_n[:, None] * stride_wqn, offs_k[None, :], 1, KW, mask, BITS)  # [BN, BK]
    if GROUP_K == 0:
        g = offs_k * 0
    else:
        g = offs_k // GROUP_K
    s, z = scale_and_zero(s_ptr, z_ptr, offs_n[:, None], g[None, :], mask, ZW, stride_sn, stride_sg, stride_zw,
                          stride_zg, BITS, HAS_ZP)  # [BN, BK], [BN, BK] (asym) or [BN, 1] (sym)
    w = (q - z).to(tl.float32) * s
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_packed(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    layout: PackedLayout,
    dtype: torch.dtype,
    *,
    block_n: int = 64,
    block_k: int = 128,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (computed ``(q - z) * s`` in float32, rounded once)."""
    n, k = layout.out_features, layout.in_features
    w = out if out is not None else torch.empty((n, k), device=weight_packed.device, dtype=dtype)
    has_zp = not layout.symmetric
    zp = weight_zero_point if has_zp else weight_scale
    group_k = 0 if layout.group_size is None else layout.group_size
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        weight_packed, weight_scale, zp, w,
        n, k, weight_packed.shape[1], zp.shape[0],
        weight_packed.stride(0), weight_scale.stride(0), weight_scale.stride(1), zp.stride(0), zp.stride(1),
        w.stride(0), w.stride(1),
        BITS=layout.num_bits, GROUP_K=group_k, HAS_ZP=has_zp, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return w


def dequant_linear(x, weight_packed, weight_scale, weight_zero_point, layout, **kwargs):
    """``x @ dequant(W).T`` as Triton dequantize + ``torch.nn.functional.linear`` (cuBLAS on GPU)."""
    w = dequantize_packed(weight_packed, weight_scale, weight_zero_point, layout, x.dtype, **kwargs)
    return torch.nn.functional.linear(x, w)


def reference(weight_packed, weight_scale, weight_zero_point, layout, dtype):
    """Plain-PyTorch reference of ``dequantize_packed`` (compressed-tensors unpack + dequantize)."""
    return reference_dequantize(weight_packed, weight_scale, weight_zero_point, layout, torch.float32).to(dtype)
