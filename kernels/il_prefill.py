"""Prefill over the interleaved layout: dequantize W into a reused dense buffer, then cuBLAS.

At large M the matmul is compute bound. So the weight is expanded once per call into a dense
``[N, K]`` buffer in the activation dtype, and ``torch.nn.functional.linear`` (cuBLAS on a GPU)
does the matmul. The buffer is shared by every Linear on the device (``launch.scratch.dense``,
grow-only; the largest layer's ``N * K`` elements), so prefill costs no per-layer memory.

Dequantize kernel: grid ``(N_pad / BLOCK_N, packs)``. Each program reads one (row tile, pack):
``BITS`` slabs of ``[BLOCK_N, 16]`` words, loaded with 128-bit loads. For each of the 32 planes
it writes ``(q - z) * s``, computed in float32 and rounded once to the output dtype. The writes
are ``[BLOCK_N, 16]`` tiles whose rows are 16 contiguous elements (32 bytes). The kernel is
bound by the dense write: ``2 * N * K`` bytes out against ``N * K * BITS / 8`` bytes in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interleaved import InterleavedWeight, reference_dequantize
from .launch import launch, scratch

__all__ = ["dequantize_il", "prefill_linear", "reference"]


@triton.jit
def _il_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, N_PAD, N_PACKS, stride_wn,
    BITS: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZP: tl.constexpr, TILE_N: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    SLAB: tl.constexpr = TILE_N * 16
    PACK: tl.constexpr = BITS * SLAB
    FIELDS: tl.constexpr = 32 // BITS
    lane = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_pack = qw_ptr + ((offs_n // TILE_N) * (N_PACKS * PACK) + (offs_n % TILE_N) * 16 + p * PACK)[:, None] + lane[None, :]
    n_mask = (offs_n < N)[:, None]
    if GROUP_K == 0:
        s_g = tl.load(s_ptr + offs_n).to(tl.float32)
        if HAS_ZP:
            z_g = tl.load(z_ptr + offs_n).to(tl.int32)
        else:
            z_g = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.int32)
    for j in tl.static_range(32):
        if BITS == 3:
            if j % 16 == 0:
                low = tl.load(w_pack + (j // 16) * SLAB, eviction_policy="evict_first")
            if j == 0:
                high = tl.load(w_pack + 2 * SLAB, eviction_policy="evict_first")
            q = ((low >> (2 * (j % 16))) & 3) | (((high >> j) & 1) << 2)
        else:
            if j % FIELDS == 0:
                words = tl.load(w_pack + (j // FIELDS) * SLAB, eviction_policy="evict_first")
            q = (words >> (BITS * (j % FIELDS))) & ((1 << BITS) - 1)
        if GROUP_K != 0:
            if (16 * j) % GROUP_K == 0:
                g = p * (512 // GROUP_K) + (16 * j) // GROUP_K
                s_g = tl.load(s_ptr + g * N_PAD + offs_n).to(tl.float32)
                if HAS_ZP:
                    z_g = tl.load(z_ptr + g * N_PAD + offs_n).to(tl.int32)
                else:
                    z_g = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.int32)
        w = (q - z_g[:, None]).to(tl.float32) * s_g[:, None]
        k = p * 512 + 16 * j + lane
        tl.store(w_ptr + offs_n[:, None] * stride_wn + k[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=n_mask & (k < K)[None, :])


def dequantize_il(w: InterleavedWeight, dtype: torch.dtype, *, out: torch.Tensor | None = None,
                  block_n: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (``(q - z) * s`` in float32, rounded once), written
    into ``out`` when given (any ``[N, K]`` view whose rows are contiguous)."""
    il = w.layout
    block_n = block_n or il.tile_n
    if block_n % il.tile_n or il.n_pad % block_n:
        raise ValueError(f"block_n={block_n} must be a multiple of tile_n={il.tile_n} dividing N_pad={il.n_pad}")
    dense = out if out is not None else torch.empty((il.n, il.k), dtype=dtype, device=w.qweight.device)
    if dense.shape != (il.n, il.k) or dense.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{il.n}, {il.k}] tensor")
    zeros = w.zeros if w.zeros is not None else w.scales
    args = (w.qweight, w.scales, zeros, dense, il.n, il.k, il.n_pad, il.n_packs, dense.stride(0))
    constexprs = dict(BITS=il.bits, GROUP_K=il.group_k, HAS_ZP=w.zeros is not None, TILE_N=il.tile_n, BLOCK_N=block_n)
    launch(_il_dequant_kernel, (il.n_pad // block_n, il.n_packs), args, constexprs, num_warps=num_warps, num_stages=1)
    return dense


def prefill_linear(x: torch.Tensor, w: InterleavedWeight, **kwargs) -> torch.Tensor:
    """``x[M, K] @ dequant(W).T`` as dequantize-into-the-shared-buffer + ``F.linear``."""
    il = w.layout
    buf = scratch.dense(x.device, x.dtype, il.n * il.k)[: il.n * il.k].view(il.n, il.k)
    dequantize_il(w, x.dtype, out=buf, **kwargs)
    return torch.nn.functional.linear(x, buf)


def reference(w: InterleavedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Plain-PyTorch reference of ``dequantize_il``."""
    return reference_dequantize(w, torch.float32).to(dtype)
