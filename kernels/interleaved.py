"""The kernel layout: compressed-tensors ``pack-quantized`` weights repacked once, at load time,
into tiles that a GPU reads with 128-bit loads and unpacks without a shift across words.

The checkpoint on disk stays standard compressed-tensors (``packing.py`` describes it). There
every row is one dense bit stream along K, and 3-bit fields straddle int32 words. The
interleaved layout keeps the same number of bits per weight (4 or 3; 2 and 8 work too). It
changes only the order of the bits.

Geometry. A *pack* is ``KP = 512`` consecutive K values of one row. Its values are read as
``PLANES = 32`` planes of ``LANES = 16`` lanes: value ``k = pack * 512 + 16 * j + l`` is plane
``j``, lane ``l``. Lane ``l`` of a row's pack keeps its 32 values in ``BITS`` int32 words, one
word per *slab*:

- 2, 4 and 8 bits: slab ``s`` holds planes ``s*F .. s*F + F - 1`` (``F = 32 // BITS`` fields per
  word). Plane ``j`` sits at bits ``BITS * (j % F)`` of slab ``j // F``.
- 3 bits (2 + 1): slab 0 holds the low 2 bits of planes 0..15, at bits ``2 * j``. Slab 1 holds the
  low 2 bits of planes 16..31, at bits ``2 * (j - 16)``. Slab 2 holds the high bit of plane ``j``, at
  bit ``j``. So ``q = ((slab[j // 16] >> 2 * (j % 16)) & 3) | (((slab2 >> j) & 1) << 2)``: every field
  comes out of a fixed place in one word.

Rows are grouped in tiles of ``tile_n`` rows (the decode kernel's ``BLOCK_N``). ``qweight`` is
int32 ``[N_pad / tile_n, K_pad / 512, BITS, tile_n, 16]``, contiguous. So one slab of one
(row tile, pack) is ``tile_n * 16`` consecutive words: a ``[tile_n, 16]`` block that a warp loads
as 128-bit vectors, 4 words per thread. A row tile's packs follow one another, so a program
that walks K through one row tile streams one contiguous range of memory. Each word holds one
plane-lane slot of a lane, so the plane-``j`` tile ``[tile_n, 16]`` is the ``W^T`` operand of a
``K = 16`` ``tl.dot``. For the GEMV it is 16 lanes of partial sums that stay in the registers
the words were loaded into.

Scales and zero points are transposed to ``[groups, N_pad]``, so a tile's ``tile_n`` scales of
one group are contiguous. ``scales`` keep the checkpoint dtype. ``zeros`` are unsigned ``uint8``
and exist only for asymmetric layouts: 8 bits per group per row, that is 0.06 bits per weight at
group 128. Symmetric layouts use ``2**(BITS-1)``. Padding: K is padded to a multiple of 512 and N
to a multiple of ``tile_n``, with zero fields and zero scales. Real 7B/13B widths (4096, 5120,
13824) pad nothing; 11008 pads 2.3% of K.

Group sizes: per channel, or ``group_size`` dividing 512 and a multiple of 16 (32, 64, 128, 256,
512). A pack then never splits a group, and a plane never does either.

``repack`` builds the layout; ``reference_unpack`` / ``reference_dequantize`` read it back in
plain PyTorch (tested bit for bit against compressed-tensors' own unpack and dequantize);
``unrepack`` returns the compressed-tensors tensors (so a repacked model can still be saved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import PackedLayout, packed_words

__all__ = [
    "KP",
    "LANES",
    "PLANES",
    "InterleavedLayout",
    "InterleavedWeight",
    "supports",
    "repack",
    "unrepack",
    "reference_unpack",
    "reference_dequantize",
    "reference_linear",
]

LANES = 16
PLANES = 32
KP = LANES * PLANES  # K values per pack
IL_BITS = (2, 3, 4, 8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class InterleavedLayout:
    """Shape of one repacked Linear: the compressed-tensors layout it came from, plus the row
    tile ``tile_n`` (the decode kernel's ``BLOCK_N``)."""

    base: PackedLayout
    tile_n: int = 32

    def __post_init__(self):
        problem = _unsupported_reason(self.base, self.tile_n)
        if problem:
            raise ValueError(problem)

    @property
    def bits(self) -> int:
        return self.base.num_bits

    @property
    def n(self) -> int:
        return self.base.out_features

    @property
    def k(self) -> int:
        return self.base.in_features

    @property
    def n_pad(self) -> int:
        return _cdiv(self.n, self.tile_n) * self.tile_n

    @property
    def k_pad(self) -> int:
        return _cdiv(self.k, KP) * KP

    @property
    def n_tiles(self) -> int:
        return self.n_pad // self.tile_n

    @property
    def n_packs(self) -> int:
        return self.k_pad // KP

    @property
    def group_k(self) -> int:
        """Group size along K, 0 per channel."""
        return self.base.group_size or 0

    @property
    def n_groups(self) -> int:
        return 1 if not self.group_k else self.k_pad // self.group_k

    @property
    def qweight_shape(self) -> tuple[int, ...]:
        return (self.n_tiles, self.n_packs, self.bits, self.tile_n, LANES)


def _unsupported_reason(base: PackedLayout, tile_n: int) -> str | None:
    if base.num_bits not in IL_BITS:
        return f"interleaved layout: {base.num_bits} bits not supported (supported: {IL_BITS})"
    g = base.group_size
    if g is not None and (g % LANES or KP % g):
        return f"interleaved layout: group_size={g} must be a multiple of {LANES} dividing {KP} (or per channel)"
    if tile_n < 1 or tile_n & (tile_n - 1):
        return f"interleaved layout: tile_n={tile_n} must be a power of two"
    return None


def supports(base: PackedLayout, tile_n: int = 32) -> bool:
    """Whether ``base`` can be repacked (else the caller keeps the compressed-tensors kernels)."""
    return _unsupported_reason(base, tile_n) is None


@dataclass
class InterleavedWeight:
    """The repacked tensors of one Linear (all on one device)."""

    layout: InterleavedLayout
    qweight: torch.Tensor  # int32 [n_tiles, n_packs, BITS, tile_n, 16]
    scales: torch.Tensor  # checkpoint dtype [n_groups, N_pad]
    zeros: torch.Tensor | None  # uint8 [n_groups, N_pad], asymmetric only

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qweight, self.scales, self.zeros) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device) -> "InterleavedWeight":
        z = None if self.zeros is None else self.zeros.to(device)
        return InterleavedWeight(self.layout, self.qweight.to(device), self.scales.to(device), z)


# ------------------------------------------------------------------ bit-stream <-> integers
def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unsigned ``bits``-bit fields ``0 .. count`` of each row of int32 ``words`` (the
    compressed-tensors bit stream), as int32 ``[rows, count]``. Plain PyTorch; the tests check it
    against compressed-tensors' ``unpack_from_int32``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    idx = torch.arange(count, device=words.device)
    bit = idx * bits
    word, shift = bit // 32, bit % 32
    lo = w[:, word] >> shift
    hi_word = torch.clamp(word + 1, max=words.shape[1] - 1)
    hi = torch.where(shift + bits > 32, w[:, hi_word] << (32 - shift), torch.zeros_like(lo))
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.int32)


def _pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``_unpack_stream``: unsigned fields ``[rows, count]`` -> int32 words
    ``[rows, ceil(count * bits / 32)]`` (the compressed-tensors bit stream)."""
    rows, count = values.shape
    n_words = packed_words(count, bits)
    stream = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=values.device)
    v = values.to(torch.int64)
    bit = torch.arange(count, device=values.device) * bits
    word, shift = bit // 32, bit % 32
    stream.index_add_(1, word, v << shift)  # fields never overlap: add == or
    stream.index_add_(1, word + 1, torch.where(shift + bits > 32, v >> (32 - shift), torch.zeros_like(v)))
    return _to_int32(stream[:, :n_words] & 0xFFFFFFFF)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _interleave(q: torch.Tensor, b: int) -> torch.Tensor:
    """Unsigned fields ``[tiles, tile_n, packs, planes, lanes]`` (int64) -> int32 slabs
    ``[tiles, packs, b, tile_n, lanes]`` (see the module docstring)."""
    q = q.permute(0, 2, 3, 1, 4)  # [tiles, packs, planes, tile_n, lanes]
    tiles, packs, _, tile_n, _ = q.shape
    device = q.device
    if b == 3:
        lo, hi = q & 3, q >> 2
        sh2 = (2 * torch.arange(16, device=device)).view(1, 1, 16, 1, 1)
        sh1 = torch.arange(PLANES, device=device).view(1, 1, PLANES, 1, 1)
        slabs = torch.stack([(lo[:, :, :16] << sh2).sum(2), (lo[:, :, 16:] << sh2).sum(2), (hi << sh1).sum(2)], dim=2)
    else:
        f = 32 // b
        q = q.reshape(tiles, packs, b, f, tile_n, LANES)  # plane j = slab * f + field
        sh = (b * torch.arange(f, device=device)).view(1, 1, 1, f, 1, 1)
        slabs = (q << sh).sum(3)
    return _to_int32(slabs)


# ------------------------------------------------------------------ repack
def repack(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    layout: PackedLayout,
    tile_n: int = 32,
) -> InterleavedWeight:
    """compressed-tensors tensors -> ``InterleavedWeight`` on the same device (done once per
    Linear at load time; plain PyTorch, transient memory bounded by a few 4M-value chunks)."""
    il = InterleavedLayout(layout, tile_n)
    n, k, b = il.n, il.k, il.bits
    device = weight_packed.device
    qweight = torch.empty(il.qweight_shape, dtype=torch.int32, device=device)
    step = max(1, (1 << 22) // (tile_n * il.k_pad))  # row tiles per chunk: bounded transient memory
    for t0 in range(0, il.n_tiles, step):
        t1 = min(il.n_tiles, t0 + step)
        r0, r1 = t0 * tile_n, min(n, t1 * tile_n)
        q = torch.zeros((t1 - t0) * tile_n, il.k_pad, dtype=torch.int64, device=device)
        if r1 > r0:
            q[: r1 - r0, :k] = _unpack_stream(weight_packed[r0:r1], b, k)
        qweight[t0:t1] = _interleave(q.reshape(t1 - t0, tile_n, il.n_packs, PLANES, LANES), b)

    g = il.n_groups
    scales = torch.zeros(g, il.n_pad, dtype=weight_scale.dtype, device=device)
    real_groups = weight_scale.shape[1]
    scales[:real_groups, :n] = weight_scale.T
    zeros = None
    if not layout.symmetric:
        if weight_zero_point is None:
            raise ValueError("asymmetric layout needs weight_zero_point")
        z = _unpack_stream(weight_zero_point.T.contiguous(), b, n)  # packed along N: one stream per group
        zeros = torch.zeros(g, il.n_pad, dtype=torch.uint8, device=device)
        zeros[:real_groups, :n] = z.to(torch.uint8)
    return InterleavedWeight(il, qweight, scales, zeros)


# ------------------------------------------------------------------ reference reads
def reference_unpack(w: InterleavedWeight) -> torch.Tensor:
    """Unsigned integer weights ``[N, K]`` (int32) read back from the interleaved layout."""
    il = w.layout
    b = il.bits
    s = w.qweight.to(torch.int64) & 0xFFFFFFFF  # [tiles, packs, slabs, tile_n, lanes]
    device = s.device
    if b == 3:
        sh2 = (2 * torch.arange(16, device=device)).view(1, 1, 16, 1, 1)
        lo = torch.cat([(s[:, :, 0:1] >> sh2) & 3, (s[:, :, 1:2] >> sh2) & 3], dim=2)  # 32 planes
        hi = (s[:, :, 2:3] >> torch.arange(PLANES, device=device).view(1, 1, PLANES, 1, 1)) & 1
        q = lo | (hi << 2)
    else:
        f = 32 // b
        sh = (b * torch.arange(f, device=device)).view(1, 1, 1, f, 1, 1)
        q = ((s.unsqueeze(3) >> sh) & ((1 << b) - 1)).reshape(il.n_tiles, il.n_packs, PLANES, il.tile_n, LANES)
    # [tiles, packs, planes, tile_n, lanes] -> [tiles, tile_n, packs, planes, lanes] -> [N_pad, K_pad]
    q = q.permute(0, 3, 1, 2, 4).reshape(il.n_pad, il.k_pad)
    return q[: il.n, : il.k].to(torch.int32)


def reference_dequantize(w: InterleavedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight ``(q - z) * s``, computed in float32 (exact) and cast to ``dtype``."""
    il = w.layout
    q = reference_unpack(w).float()
    cols = torch.arange(il.k, device=q.device)
    g = cols // il.group_k if il.group_k else torch.zeros_like(cols)
    s = w.scales.float()[g][:, : il.n].T  # [N, K]
    if w.zeros is None:
        z = float(1 << (il.bits - 1))
    else:
        z = w.zeros.float()[g][:, : il.n].T
    return ((q - z) * s).to(dtype)


def reference_linear(x: torch.Tensor, w: InterleavedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in float32 from the interleaved layout, returned in ``x.dtype``."""
    y = x.float() @ reference_dequantize(w).to(x.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def unrepack(w: InterleavedWeight) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors (``weight_packed``, ``weight_scale``, ``weight_shape``,
    asymmetric ``weight_zero_point``) that ``repack`` started from, bit for bit."""
    il = w.layout
    base = il.base
    out = {
        "weight_packed": _pack_stream(reference_unpack(w), il.bits),
        "weight_scale": w.scales[: base.n_groups, : il.n].T.contiguous(),
        "weight_shape": torch.tensor([il.n, il.k]),
    }
    if w.zeros is not None:
        z = w.zeros[: base.n_groups, : il.n].to(torch.int32)  # [groups, N]: one stream per group
        out["weight_zero_point"] = _pack_stream(z, il.bits).T.contiguous()
    return out
