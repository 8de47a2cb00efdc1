"""Decode matmul over the interleaved layout in ONE launch: ``y = x @ dequant(W).T``.

Layout: ``interleaved.py``. Row tiles of ``TILE_N`` rows, packs of 512 K values, each pack
seen as 32 planes of 16 lanes (value ``k = pack * 512 + 16 * plane + lane``), stored as
``BITS`` slabs of ``[TILE_N, 16]`` int32 words.

Grid ``(N_pad / BLOCK_N, SPLIT_K, cdiv(M, BLOCK_M))``. Program ``(n, s, m)`` owns ``BLOCK_N``
output columns (``BLOCK_N`` is a multiple of ``TILE_N``), ``BLOCK_M`` rows of ``x`` and the
packs ``s * PACKS_PER_SPLIT ..`` of K. Per pack, for each plane ``j = 0..31`` (unrolled):

1. load a slab when plane ``j`` is its first one: ``[BLOCK_N, 16]`` words, each row's 16
   words contiguous, so 128-bit loads;
2. extract the plane's fields with constant shifts (3 bits: two low bits from slab
   ``j // 16``, the high bit from slab 2), never combining two words of the same field;
3. ``w = q - z`` exactly in float32. ``q | 0x4B000000`` read as a float is ``2**23 + q``, and
   ``z`` is kept as ``2**23 + z``, so the integer-to-float conversion costs one OR;
4. multiply with the 16 ``x`` values of the plane into the *group* accumulator:
   - ``USE_DOT``: ``tl.dot`` of ``x [BLOCK_M, 16]`` and ``w^T [16, BLOCK_N]`` (``q - z`` is a small
     integer, exact in fp16/bf16), float32 accumulator ``[BLOCK_M, BLOCK_N]``;
   - else (GEMV, ``BLOCK_M = 1``): ``w * x`` accumulated per lane in ``[BLOCK_N, 16]`` registers,
     the same registers the words were loaded into; the lanes are summed once at the end;
5. at the end of a group, add ``scale * group accumulator`` to the output accumulator. Per
   channel there is one group, and it is scaled after the K loop.

Split-K without a second launch (``SPLIT_K`` is a runtime argument; the constexpr ``SPLIT``
says whether it exceeds 1, so tuning it compiles nothing new). With ``SPLIT_K > 1`` each program stores its float32 partial
to scratch memory and increments its output tile's counter (``atomic_add``, acquire-release).
The program that sees the count ``SPLIT_K - 1`` is the last one. It sums all ``SPLIT_K`` partials
in split order, so the result is deterministic whichever program finishes last, then writes the
output in the activation dtype and resets the counter to 0. So there is no zero-fill, no second
kernel, and no float32 -> fp16 cast pass. The scratch is preallocated (``launch.Scratch``), so
the call can be captured in a CUDA graph.

Numerics: ``(q - z) * x`` products are exact in float32. Sums are float32. The scale is applied
once per group, in float32. The output is rounded once to the activation dtype. That is at least
as accurate as the compressed-tensors-layout kernels, which round each weight to the activation
dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._unpack import add_f32, dot_f32, interpreter_upcast, standard_lib_usable
from .interleaved import KP, InterleavedWeight, reference_linear
from .launch import launch, scratch

__all__ = ["il_linear", "default_config", "reference", "MAX_DECODE_M"]

MAX_DECODE_M = 16
MAGIC = 8388608.0  # 2**23: (2**23 + q) as float32 has q in its low mantissa bits


@triton.jit
def _zero_point(z_ptr, offs_n, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """``2**23 + z`` in float32 for rows ``offs_n`` of one group (``z_ptr`` points at the group)."""
    if HAS_ZP:
        z = tl.load(z_ptr + offs_n).to(tl.float32)
    else:
        z = tl.full(offs_n.shape, 1 << (BITS - 1), tl.float32)
    return z + 8388608.0


@triton.jit
def _zeros_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    """A float32 accumulator: ``[BLOCK_M, BLOCK_N]`` for ``tl.dot``, ``[BLOCK_N, 16]`` lanes for the GEMV."""
    if USE_DOT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_N, 16), 0.0, tl.float32)
    return acc


@triton.jit
def _il_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K, N_PAD, N_PACKS, PACKS_PER_SPLIT, SPLIT_K, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZP: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, TL_SUM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    SLAB: tl.constexpr = TILE_N * 16  # words of one slab of one (row tile, pack)
    PACK: tl.constexpr = BITS * SLAB  # words of one (row tile, pack)
    FIELDS: tl.constexpr = 32 // BITS  # planes per slab (2, 4, 8 bits)

    lane = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = rows of W (N is padded)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    # word 0 of each row's lanes in pack 0, slab 0: [BLOCK_N, 16], 16 contiguous words per row
    w_ptrs = qw_ptr + ((offs_n // TILE_N) * (N_PACKS * PACK) + (offs_n % TILE_N) * 16)[:, None] + lane[None, :]
    acc = _zeros_acc(BLOCK_M, BLOCK_N, USE_DOT)
    if GROUP_K == 0:  # per channel: one scale and zero point per row, one group over all of K
        s_g = tl.load(s_ptr + offs_n).to(tl.float32)
        z_g = _zero_point(z_ptr, offs_n, BITS, HAS_ZP)
        accg = _zeros_acc(BLOCK_M, BLOCK_N, USE_DOT)

    p_begin = pid_k * PACKS_PER_SPLIT
    p_end = tl.minimum(p_begin + PACKS_PER_SPLIT, N_PACKS)
    for p in range(p_begin, p_end):
        w_pack = w_ptrs + p * PACK
        for j in tl.static_range(32):
            # 1-2. plane j's unsigned fields [BLOCK_N, 16]
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
                if (16 * j) % GROUP_K == 0:  # a group starts: its scale, zero point, accumulator
                    g = p * (512 // GROUP_K) + (16 * j) // GROUP_K
                    s_g = tl.load(s_ptr + g * N_PAD + offs_n).to(tl.float32)
                    z_g = _zero_point(z_ptr + g * N_PAD, offs_n, BITS, HAS_ZP)
                    accg = _zeros_acc(BLOCK_M, BLOCK_N, USE_DOT)
            # 3. q - z, exact
            w = (q | 0x4B000000).to(tl.float32, bitcast=True) - z_g[:, None]
            # 4. times the plane's 16 x values
            k = p * 512 + 16 * j + lane
            if USE_DOT:
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                            other=0.0)
                accg += dot_f32(x, tl.trans(w.to(x.dtype)), UPCAST_DOT)
            else:
                x = tl.load(x_ptr + pid_m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
                accg += w * x[None, :]
            # 5. a group ends: scale it into the output accumulator
            if GROUP_K != 0:
                if (16 * (j + 1)) % GROUP_K == 0:
                    if USE_DOT:
                        acc += accg * s_g[None, :]
                    else:
                        acc += accg * s_g[:, None]
    if GROUP_K == 0:
        if USE_DOT:
            acc = accg * s_g[None, :]
        else:
            acc = accg * s_g[:, None]

    if USE_DOT:
        out = acc
    elif TL_SUM:
        out = tl.reshape(tl.sum(acc, axis=1), (1, BLOCK_N))
    else:  # interpreter after Triton was imported without it (see _unpack.py)
        out = tl.reshape(tl.reduce(acc, 1, add_f32), (1, BLOCK_N))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & (offs_n < N)[None, :]
    if not SPLIT:  # SPLIT_K == 1
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # this split's partial -> scratch [SPLIT_K, M, N_PAD]; the last split of the tile sums them
        mn = offs_m[:, None] * N_PAD + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N_PAD + mn, out, mask=m_mask[:, None])
        tl.debug_barrier()  # every thread's partial is stored before the counter moves
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for s in range(SPLIT_K):  # split order: deterministic
                total += tl.load(part_ptr + s * M * N_PAD + mn, mask=m_mask[:, None], other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch


def default_config(m: int, w: InterleavedWeight, device: torch.device) -> dict:
    """An untuned config: GEMV at M == 1, ``tl.dot`` on 16-row tiles up to M = 16, 64-row tiles above;
    split-K until there are about two programs per SM (CPU: 2 splits, to exercise the reduction)."""
    il = w.layout
    use_dot = m > 1
    block_m = 1 if not use_dot else (16 if m <= MAX_DECODE_M else 64)
    block_n = il.tile_n
    programs = (il.n_pad // block_n) * triton.cdiv(m, block_m)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split_k = 1
        while programs * split_k < 2 * sms and split_k * 2 <= il.n_packs and m <= MAX_DECODE_M:
            split_k *= 2
    else:
        split_k = min(2, il.n_packs)
    return dict(block_m=block_m, block_n=block_n, split_k=split_k, use_dot=use_dot, num_warps=4, num_stages=2)


def il_linear(
    x: torch.Tensor,
    w: InterleavedWeight,
    *,
    block_m: int = 1,
    block_n: int | None = None,
    split_k: int = 1,
    use_dot: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[M, K] @ dequant(W).T -> [M, N]`` in ``x.dtype``, one kernel launch.

    Meant for decode (M <= 16) but correct for any M. ``block_n`` is a multiple of the
    layout's ``tile_n`` that divides ``N_pad``. ``use_dot=False`` is the GEMV (``block_m`` is
    then 1). ``out`` is an optional preallocated ``[M, N]`` output."""
    il = w.layout
    m, k = x.shape
    n = il.n
    block_n = block_n or il.tile_n
    if k != il.k:
        raise ValueError(f"x has K={k} but the weight has in_features={il.k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"packed kernels take fp16/bf16 activations, got {x.dtype}")
    if block_n % il.tile_n or il.n_pad % block_n:
        raise ValueError(f"block_n={block_n} must be a multiple of tile_n={il.tile_n} dividing N_pad={il.n_pad}")
    if not use_dot:
        block_m = 1
    elif block_m < 16:
        raise ValueError("tl.dot needs block_m >= 16")
    if x.stride(1) != 1:
        x = x.contiguous()
    pps = triton.cdiv(il.n_packs, max(1, min(split_k, il.n_packs)))
    split_k = triton.cdiv(il.n_packs, pps)  # no empty splits
    y = out if out is not None else torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (il.n_pad // block_n, split_k, triton.cdiv(m, block_m))
    partials = scratch.partials(x.device, split_k * m * il.n_pad if split_k > 1 else 1)
    counters = scratch.counters(x.device, grid[0] * grid[2])
    zeros = w.zeros if w.zeros is not None else w.scales  # dummy pointer when symmetric
    args = (x, w.qweight, w.scales, zeros, y, partials, counters,
            m, n, k, il.n_pad, il.n_packs, pps, split_k, x.stride(0), y.stride(0))
    constexprs = dict(BITS=il.bits, GROUP_K=il.group_k, HAS_ZP=w.zeros is not None, TILE_N=il.tile_n,
                      BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split_k > 1, USE_DOT=use_dot,
                      UPCAST_DOT=interpreter_upcast(x.dtype), TL_SUM=standard_lib_usable())
    launch(_il_matmul_kernel, grid, args, constexprs, num_warps=num_warps, num_stages=num_stages)
    return y


def reference(x: torch.Tensor, w: InterleavedWeight, **_) -> torch.Tensor:
    """Plain-PyTorch reference: interleaved unpack + dequantize, float32 matmul."""
    return reference_linear(x, w)


assert KP == 512  # the kernel hard-codes 32 planes x 16 lanes
