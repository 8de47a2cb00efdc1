"""The compressed-tensors ``pack-quantized`` layout and its plain-PyTorch reference.

Layout written by compressed-tensors 0.19 (``PackedQuantizationCompressor``, verified on
checkpoints saved by llm-compressor 0.14 ``QuantizationModifier`` W4A16, W4A16_ASYM, W3A16,
W3 asym g64 and W4 asym per-channel; see ``kernels/README.md``) for a Linear with weight
``[N, K]`` (out_features N, in_features K) quantized to ``b`` bits:

- ``weight_packed``: int32 ``[N, ceil(K * b / 32)]``. Row ``n`` is one dense little-endian
  bit stream: element ``k`` occupies bits ``k*b .. k*b + b - 1`` of the row, bit ``j`` of the
  stream being bit ``j % 32`` of word ``j // 32``. For 4 bits that is 8 values per word; for
  3 bits it is 32 values per 3 words, and elements ``k % 32 in {10, 21}`` straddle two words
  (it is NOT the older "10 values per int32" layout). Values are stored unsigned:
  ``q_stored = q + 2**(b-1)`` with ``q`` the signed integer in ``[-2**(b-1), 2**(b-1) - 1]``.
- ``weight_scale``: ``[N, K // group_size]`` (group strategy) or ``[N, 1]`` (channel), in the
  model dtype (bf16 in our checkpoints).
- ``weight_zero_point`` (asymmetric only): int32 ``[ceil(N * b / 32), n_groups]``, i.e. the
  ``[N, n_groups]`` zero points packed the same way but along dim 0 (N), also stored unsigned.
  Symmetric checkpoints carry no zero point (it is 0).
- ``weight_shape``: int64 ``[2]`` = ``(N, K)``.

Dequantization (compressed-tensors ``dequantize``): ``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]``
with ``g = k // group_size``. With both ``q`` and ``z`` read unsigned the offsets cancel:
``W = (q_stored - z_stored) * s`` and, symmetric, ``W = (q_stored - 2**(b-1)) * s``. The
kernels use that identity; the reference below uses compressed-tensors' own
``unpack_from_int32`` and ``dequantize`` so it shares no bit tricks with the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "PackedLayout",
    "SUPPORTED_BITS",
    "reference_dequantize",
    "reference_linear",
    "quantize_and_pack",
    "packed_words",
]

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_words(count: int, num_bits: int) -> int:
    """Number of int32 words compressed-tensors uses for ``count`` ``num_bits``-bit values."""
    return math.ceil(count * num_bits / 32)


@dataclass(frozen=True)
class PackedLayout:
    """Static description of one pack-quantized Linear weight.

    ``group_size`` is ``None`` for per-channel (one scale per output row)."""

    out_features: int  # N
    in_features: int  # K
    num_bits: int
    group_size: int | None
    symmetric: bool

    def __post_init__(self):
        if self.num_bits not in SUPPORTED_BITS:
            raise ValueError(
                f"num_bits={self.num_bits} is not supported by the packed kernels "
                f"(supported: {SUPPORTED_BITS}); load with dequantize=True instead."
            )
        if self.group_size is not None and self.in_features % self.group_size != 0:
            raise ValueError(
                f"in_features={self.in_features} is not a multiple of group_size={self.group_size}; "
                "compressed-tensors cannot produce such a checkpoint."
            )

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size is None else self.in_features // self.group_size

    @property
    def packed_shape(self) -> tuple[int, int]:
        return (self.out_features, packed_words(self.in_features, self.num_bits))

    @property
    def zero_point_shape(self) -> tuple[int, int]:
        return (packed_words(self.out_features, self.num_bits), self.n_groups)

    def quantization_args(self):
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            strategy="group" if self.group_size is not None else "channel",
            group_size=self.group_size,
        )


def reference_dequantize(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    layout: PackedLayout,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight, through compressed-tensors' ``unpack_from_int32`` + ``dequantize``.

    ``dtype=None`` keeps compressed-tensors' own output dtype (the scale dtype, as its
    decompressor does); the default computes in float32 (exact: small integers times a
    bf16/fp16 scale are representable in float32)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    shape = torch.Size((layout.out_features, layout.in_features))
    q = unpack_from_int32(weight_packed, layout.num_bits, shape)
    zero_point = None
    if not layout.symmetric:
        if weight_zero_point is None:
            raise ValueError("asymmetric layout needs weight_zero_point")
        zero_point = unpack_from_int32(
            weight_zero_point, layout.num_bits, torch.Size((layout.out_features, layout.n_groups)), packed_dim=0
        )
    scale = weight_scale if dtype is None else weight_scale.to(dtype)
    return dequantize(x_q=q, scale=scale, zero_point=zero_point, args=layout.quantization_args())


def reference_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    layout: PackedLayout,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(W).T (+ bias)`` computed in float32, returned in ``x.dtype``."""
    w = reference_dequantize(weight_packed, weight_scale, weight_zero_point, layout, torch.float32)
    y = x.float() @ w.to(x.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_and_pack(
    weight: torch.Tensor,
    num_bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[dict[str, torch.Tensor], PackedLayout]:
    """Quantize a dense ``[N, K]`` weight with min-max ranges and pack it exactly as
    compressed-tensors' ``PackedQuantizationCompressor.compress`` does (test/benchmark helper).

    Returns the compressed state dict (``weight_packed``, ``weight_scale``, ``weight_shape`` and,
    asymmetric, ``weight_zero_point``) and its layout."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = weight.shape
    layout = PackedLayout(n, k, num_bits, group_size, symmetric)
    args = layout.quantization_args()
    w = weight.float()
    if group_size is None:
        w_grouped = w.reshape(n, 1, k)
    else:
        w_grouped = w.reshape(n, k // group_size, group_size)
    min_vals = w_grouped.amin(dim=-1)
    max_vals = w_grouped.amax(dim=-1)
    scale, zero_point = calculate_qparams(min_vals, max_vals, args)
    scale = scale.to(scale_dtype)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": weight.to(scale_dtype), "weight_scale": scale, "weight_zero_point": zero_point.to(torch.int8)}
    compressed = PackedQuantizationCompressor.compress(state, scheme)
    return compressed, layout
