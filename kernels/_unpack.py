"""Triton device helpers shared by the packed kernels: reading ``b``-bit fields out of the
compressed-tensors dense int32 bit stream (see ``packing.py`` for the layout).

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
