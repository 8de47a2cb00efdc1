"""``PackedLinear``: a Linear that keeps its compressed-tensors pack-quantized weight packed.

Built by the packed loader (:mod:`qvlm_modifiers.packed_loader`) from a loaded compressed Linear. Its
forward runs the Triton kernels (:mod:`qvlm_modifiers.kernels.dispatch`) on CUDA fp16/bf16 inputs and
otherwise the reference path: compressed-tensors' unpack + dequantize, then ``F.linear`` (a transient
dense weight per call). ``QVLM_PACKED_BACKEND`` (``auto`` default, ``triton``, ``reference``) or
:func:`set_backend` picks the forward; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

__all__ = ["PackedLinear", "packed_modules", "set_backend", "ENV_BACKEND"]

ENV_BACKEND = "QVLM_PACKED_BACKEND"
_BACKENDS = ("auto", "triton", "reference")


# --------------------------------------------------------------------------- module
class PackedLinear(nn.Module):
    """A Linear whose weight stays in the compressed-tensors pack-quantized layout.

    Buffers (names as in the checkpoint): ``weight_packed`` int32 ``[N, ceil(K*b/32)]``,
    ``weight_scale`` ``[N, groups]``, ``weight_zero_point`` int32 ``[ceil(N*b/32), groups]``
    (asymmetric only), ``weight_shape`` int64 ``[2]``; optional ``bias``; optional ``weight_g_idx``
    int ``[K]`` (GPTQ act-order ``group``: input column -> scale group). With ``weight_g_idx`` the
    forward always takes the reference path (dequantize with the index + matmul): the Triton
    kernels assume contiguous groups."""

    def __init__(self, layout, weight_packed, weight_scale, weight_zero_point=None, weight_shape=None, bias=None,
                 weight_g_idx=None):
        super().__init__()
        self.layout = layout
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        if weight_zero_point is not None:
            self.register_buffer("weight_zero_point", weight_zero_point)
        else:
            self.weight_zero_point = None
        if weight_shape is None:
            weight_shape = torch.tensor([layout.out_features, layout.in_features])
        self.register_buffer("weight_shape", weight_shape)
        if weight_g_idx is not None:
            if weight_g_idx.shape != (layout.in_features,):
                from qvlm_modifiers.errors import CheckpointError

                raise CheckpointError(
                    f"weight_g_idx has shape {tuple(weight_g_idx.shape)}, expected ({layout.in_features},) (one scale "
                    "group per input column): the checkpoint's act-order index does not belong to this Linear. "
                    "Re-create the checkpoint."
                )
            self.register_buffer("weight_g_idx", weight_g_idx)
        else:
            self.weight_g_idx = None
        self.bias = bias
        self.backend = os.environ.get(ENV_BACKEND, "auto")
        if self.backend not in _BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={self.backend!r} is not one of {_BACKENDS}; unset it or pick one.")

    @classmethod
    def from_compressed_linear(cls, module: nn.Linear) -> "PackedLinear":
        """Take over the loaded compressed tensors of a compressed-tensors pack-quantized Linear."""
        from qvlm_modifiers.kernels.packing import PackedLayout

        from qvlm_modifiers.errors import CheckpointError
        from qvlm_modifiers.kernels.packing import packed_words

        args = module.quantization_scheme.weights
        n, k = (int(v) for v in module.weight_shape.tolist())
        rows, words = module.weight_packed.shape
        if n != rows or k <= 0 or packed_words(k, args.num_bits) != words:
            raise CheckpointError(
                f"{type(module).__name__} quantized as W{args.num_bits} has weight_shape {(n, k)} inconsistent with "
                f"its weight_packed {tuple(module.weight_packed.shape)}: the checkpoint holds no compressed tensors "
                "for this module (it is probably stored dense but missing from quantization_config.ignore, or its "
                "weight is tied). Add the module to `ignore` in config.json, or load with QVLM_PACKED_KERNELS=0 "
                "to get transformers' own behaviour."
            )
        layout = PackedLayout(
            out_features=n,
            in_features=k,
            num_bits=args.num_bits,
            group_size=args.group_size if args.strategy == "group" else None,
            symmetric=args.symmetric,
        )
        zp = getattr(module, "weight_zero_point", None) if not args.symmetric else None
        bias = module.bias
        g_idx = getattr(module, "weight_g_idx", None)
        return cls(
            layout,
            module.weight_packed.data,
            module.weight_scale.data,
            zp.data if zp is not None else None,
            module.weight_shape.data,
            bias,
            g_idx.data if g_idx is not None else None,
        )

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                "PackedLinear keeps its weight packed and has no dense `weight`: call `.dequantized_weight()` for "
                "a dense copy, or load with QVLM_PACKED_KERNELS=0 (or "
                "quantization_config=PackedKernelsConfig(packed_kernels=False)) to get dense Linears."
            )
        return super().__getattr__(name)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "reference" or self.weight_g_idx is not None:
            return False
        if self.backend == "triton":
            return True
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _triton_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_triton(x):
            from qvlm_modifiers.kernels.dispatch import packed_linear

            return packed_linear(
                x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.layout, bias=self.bias
            )
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[N, K]`` weight via compressed-tensors' unpack + dequantize (reference path)."""
        from qvlm_modifiers.kernels.packing import reference_dequantize

        if self.weight_g_idx is not None:
            w = _dequantize_with_g_idx(
                self.weight_packed, self.weight_scale, self.weight_zero_point, self.weight_g_idx, self.layout
            )
        else:
            w = reference_dequantize(self.weight_packed, self.weight_scale, self.weight_zero_point, self.layout)
        return w.to(dtype or self.weight_scale.dtype)

    def extra_repr(self) -> str:
        lay = self.layout
        g = f"group={lay.group_size}" if lay.group_size else "per-channel"
        act = ", act-order index" if self.weight_g_idx is not None else ""
        return (
            f"in_features={lay.in_features}, out_features={lay.out_features}, bias={self.bias is not None}, "
            f"W{lay.num_bits} {g} {'sym' if lay.symmetric else 'asym'}{act}, backend={self.backend}"
        )


def _dequantize_with_g_idx(weight_packed, weight_scale, weight_zero_point, g_idx, layout) -> torch.Tensor:
    """Dense float32 ``[N, K]`` weight of a GPTQ act-order ``group`` Linear: column ``j`` uses scale
    (and zero point) group ``g_idx[j]``, i.e. ``W[:, j] = (q[:, j] - z[:, g_idx[j]]) * s[:, g_idx[j]]``
    (what compressed-tensors < 0.10 and vLLM compute). Same operations and order as
    compressed-tensors' ``_dequantize`` in float32 (exact: small integers times a bf16 scale)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    n, k = layout.out_features, layout.in_features
    q = unpack_from_int32(weight_packed, layout.num_bits, torch.Size((n, k)))
    cols = g_idx.to(device=weight_scale.device, dtype=torch.long)
    scale = weight_scale.to(torch.float32)
    w = q.to(torch.float32)
    if not layout.symmetric:
        zp = unpack_from_int32(weight_zero_point, layout.num_bits, torch.Size((n, layout.n_groups)), packed_dim=0)
        w = w - zp.to(torch.float32)[:, cols]
    return w * scale[:, cols]


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def packed_modules(model: nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def set_backend(model: nn.Module, backend: str) -> None:
    """Set the forward of every :class:`PackedLinear` of ``model`` (``auto``/``triton``/``reference``)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {_BACKENDS}")
    for module in packed_modules(model).values():
        module.backend = backend


