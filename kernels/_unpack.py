"""Triton device helpers shared by the packed kernels: reading ``b``-bit fields out of the
compressed-tensors dense int32 bit stream (see ``packing.py`` for the layout) and dequantizing
them, ``W = (q - z) * s`` (``scale_and_zero``, ``dequant_tile``), so that every kernel reads the
layout through the same code.

Interpreter note: the kernels use only ``triton.language`` builtins and our own ``@triton.jit``
helpers, never the ``@jit`` functions of ``triton.language.standard`` (``tl.zeros``, ``tl.sum``,
``tl.cdiv``): those are decorated when ``triton`` is first imported, so if anything imported
Triton before ``TRITON_INTERPRET=1`` was set (llm-compressor does), the interpreter cannot call
them. Our modules only need the variable set before *they* are imported."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def unpack_fields(base_ptrs, idx, word_stride, n_words, valid, BITS: tl.constexpr):
    """Unsigned ``BITS``-bit field number ``idx`` of the bit streams starting at ``base_ptrs``.

    ``base_ptrs`` (pointer tile, broadcastable to ``idx``) points at word 0 of each stream,
    consecutive words are ``word_stride`` elements apart, a stream holds ``n_words`` words.
    Field ``i`` occupies stream bits ``i*BITS ..``: word ``(i*BITS) >> 5``, shift ``(i*BITS) & 31``.
    When ``32 % BITS != 0`` (3 bits) a field may straddle two words; its high part is read
    from the next word (masked load: lanes that do not straddle fetch nothing)."""
    bit = idx * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    lo = tl.load(base_ptrs + word * word_stride, mask=valid, other=0)
    value = lo.to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:
        spill = (shift + BITS) > 32
        hi = tl.load(base_ptrs + (word + 1) * word_stride, mask=valid & spill & (word + 1 < n_words), other=0)
        hi = hi.to(tl.uint32, bitcast=True) << ((32 - shift) & 31)
        value = value | tl.where(spill, hi, 0)
    return (value & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def unpack_tile(row_ptrs, k0, n_words, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unsigned fields ``k0 .. k0 + BLOCK_K`` of ``BLOCK_N`` packed rows as a ``[BLOCK_K, BLOCK_N]``
    tile, loading every int32 word once (``unpack_fields`` gathers one word per field instead).

    ``row_ptrs`` ``[BLOCK_N]`` points at word 0 of each row (words contiguous), ``k0`` and
    ``BLOCK_K`` are multiples of 32, so the tile covers whole 32-field / ``BITS``-word packs.
    Fields past the end of the row read as 0 (masked words); callers zero the matching x.
    - ``32 % BITS == 0`` (4, 2, 8 bits): a word holds ``V = 32 // BITS`` whole fields:
      ``[BLOCK_K // V, 1, BLOCK_N]`` words shifted by ``[1, V, 1]`` offsets, reshaped row-major
      to ``[BLOCK_K, BLOCK_N]`` (field ``k = word * V + i``).
    - otherwise (3 bits): a pack of 32 fields spans ``BITS`` words; field ``i`` of a pack takes
      the bits of word ``j`` shifted by ``i*BITS - 32*j`` (right if >= 0, left if < 0) for each
      word ``j`` it overlaps, OR-ed together."""
    if 32 % BITS == 0:
        V: tl.constexpr = 32 // BITS
        w_idx = k0 // V + tl.arange(0, BLOCK_K // V)
        words = tl.load(
            row_ptrs[None, :] + w_idx[:, None], mask=n_mask[None, :] & (w_idx[:, None] < n_words), other=0
        ).to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, V) * BITS).to(tl.uint32)
        fields = words[:, None, :] >> shifts[None, :, None]
        fields = tl.reshape(fields, (BLOCK_K, BLOCK_N))
    else:
        PACKS: tl.constexpr = BLOCK_K // 32
        pack = tl.arange(0, PACKS)
        bit = tl.arange(0, 32) * BITS  # bit offset of field i inside its pack
        fields = tl.full((PACKS, 32, BLOCK_N), 0, tl.uint32)
        for j in tl.static_range(BITS):
            w_idx = (k0 // 32 + pack) * BITS + j
            word = tl.load(
                row_ptrs[None, :] + w_idx[:, None], mask=n_mask[None, :] & (w_idx[:, None] < n_words), other=0
            ).to(tl.uint32, bitcast=True)[:, None, :]
            sh = bit - 32 * j  # [32]
            right = (tl.maximum(sh, 0) & 31).to(tl.uint32)
            left = (tl.maximum(-sh, 0) & 31).to(tl.uint32)
            part = tl.where((sh >= 0)[None, :, None], word >> right[None, :, None], word << left[None, :, None])
            overlaps = (sh > -BITS) & (sh < 32)
            fields = fields | tl.where(overlaps[None, :, None], part, 0)
        fields = tl.reshape(fields, (BLOCK_K, BLOCK_N))
    return (fields & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def scale_and_zero(s_ptr, z_ptr, offs_n, g, mask, ZW, stride_sn, stride_sg, stride_zw, stride_zg,
                   BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """Float32 scale and unsigned int32 zero point of output row(s) ``offs_n`` in group(s) ``g``.

    ``offs_n``, ``g`` and ``mask`` broadcast against each other: ``[BLOCK_N]`` with a scalar
    group (the GEMM kernels: one group per K step, or group 0 per channel) or ``[BLOCK_N, 1]``
    with ``[1, BLOCK_K]`` (the dequantize kernel: a group per element). The scale is
    ``weight_scale[n, g]``; the zero point is field ``n`` of column ``g`` of ``weight_zero_point``
    (packed along N, read with ``unpack_fields``) when ``HAS_ZP``, else the symmetric offset
    ``2**(BITS-1)`` (values are stored unsigned). Masked lanes read scale 0 and zero point 0."""
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZP:
        z = unpack_fields(z_ptr + g * stride_zg, offs_n, stride_zw, ZW, mask, BITS)
    else:
        z = tl.full(offs_n.shape, 1 << (BITS - 1), tl.int32)
    return s, z


@triton.jit
def dequant_tile(row_ptrs, k0, K, n_words, n_mask, s, z, DTYPE: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WORD_TILE: tl.constexpr, APPLY_SCALE: tl.constexpr):
    """The dequantized ``W^T`` tile ``[BLOCK_K, BLOCK_N]`` (fields ``k0 .. k0 + BLOCK_K`` of the
    ``BLOCK_N`` packed rows at ``row_ptrs``), ready for ``tl.dot`` with an x tile ``[M, BLOCK_K]``.

    ``(q - z) * s`` computed in float32 and rounded once to ``DTYPE`` (the activation dtype);
    ``s`` and ``z`` are ``[BLOCK_N]`` (``scale_and_zero``): one group per tile, which is why
    callers make ``BLOCK_K`` divide the group size. ``APPLY_SCALE=False`` (per channel) returns
    ``q - z``, small integers that are exact in fp16/bf16; the caller scales the accumulator once
    at the end. ``k0`` and ``BLOCK_K`` are multiples of 32.
    - ``WORD_TILE``: ``unpack_tile`` (every packed word loaded once; words past ``n_words`` read 0).
    - otherwise ``unpack_fields`` (one word gather per field, a second one for 3-bit fields
      straddling two words; fields ``k >= K`` read 0).
    Either way lanes past the row end hold finite values and the caller zeroes the matching x."""
    if WORD_TILE:
        q = unpack_tile(row_ptrs, k0, n_words, n_mask, BITS, BLOCK_K, BLOCK_N)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        q = unpack_fields(row_ptrs[None, :], k[:, None], 1, n_words, (k < K)[:, None] & n_mask[None, :], BITS)
    w = (q - z[None, :]).to(tl.float32)
    if APPLY_SCALE:
        w = w * s[None, :]
    return w.to(DTYPE)


@triton.jit
def dot_f32(x, w, UPCAST_DOT: tl.constexpr):
    """``tl.dot(x, w)`` with a float32 result; ``UPCAST_DOT`` (interpreter only, see
    ``interpreter_upcast``) multiplies float32 copies instead."""
    if UPCAST_DOT:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(x, w)


@triton.jit
def add_f32(a, b):
    """Combine function for ``tl.reduce`` (a sum that also works in the interpreter, see above)."""
    return a + b


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to float32: only in the interpreter and only
    for bf16, whose ``tl.dot`` the Triton 3.9 interpreter computes wrongly (numpy has no bf16).
    The bf16 rounding of the dequantized weight still happens before the upcast, so the
    numerics match the GPU path up to accumulation order."""
    return interpreting() and dtype == torch.bfloat16


def standard_lib_usable() -> bool:
    """Whether ``triton.language.standard``'s jit functions (``tl.sum``: a fast numpy path in the
    interpreter) can be called: always when compiling, in the interpreter only if Triton itself
    was imported with ``TRITON_INTERPRET=1`` already set."""
    if not interpreting():
        return True
    return type(tl.sum).__name__ == "InterpretedFunction"
