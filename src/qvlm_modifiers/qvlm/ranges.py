"""Q-VLM candidate ranges of one quantity (Sec. 3.3): percentile bounds and the lp-norm initialisation.

Paper (Sec. 3.3): the candidate bounds of a quantization range are percentiles of the FP tensor
distribution, ``p in {1.0, 0.995, 0.99, 0.985, 0.98}``, and the ranges are initialised QLoRA-style
by minimising the lp distance between FP and quantized values over a grid of shrink factors of the
min/max range (the reference code's grid, ``DEFAULT_SHRINK_FACTORS``).

Everything here works on an *observed* tensor ``(N, *Q, S)`` shaped like llm-compressor's observers
see it (:func:`flatten_for_ranges`): ``Q`` is the shape of the scheme's ``*_scale`` (per
tensor/channel/group), ``S`` the elements sharing one qparam. A range is a pair of ``Q``-shaped
tensors ``(low, high)``; :func:`range_qparams` turns it into the standard compressed-tensors
``(scale, zero_point)``. Pure functions, no llm-compressor state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_SHRINK_FACTORS",
    "ACTIVATION_INIT_NORM",
    "WEIGHT_INIT_NORM",
    "flatten_for_ranges",
    "minmax_range",
    "percentile_range",
    "range_qparams",
    "fake_quantize_observed",
    "lp_norm_range",
]

DEFAULT_PERCENTILES = (1.0, 0.995, 0.99, 0.985, 0.98)  # paper, Sec. 3.3
DEFAULT_SHRINK_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # reference code's init grid

# p of the lp-norm initialisation of static *activation* ranges: the reference code's
# ``lp_loss(p=0.5)`` on each layer's input.
ACTIVATION_INIT_NORM = 0.5
# p of the lp-norm initialisation of *weight* ranges (design note: 2). Not 0.5: with p < 1 the bulk
# of small weights dominates the error and the search picks the strongest shrink of the grid; on
# SmolLM2-135M that clipped int8 weights to 70% of their range (8.6% weight error instead of 1.0% for
# min/max) and the W8A8 model answered nothing (fixed in b043845, eval/README.md).
WEIGHT_INIT_NORM = 2.0

# cap on the elements used for an activation quantile (sorting cost); a strided subsample beyond
_MAX_QUANTILE_ELEMENTS = 1 << 22


def flatten_for_ranges(value: torch.Tensor, base_name: str, args: QuantizationArgs) -> torch.Tensor:
    """``value`` reshaped to ``(observations, *qparam_shape, group)`` like llm-compressor's
    observers (``flatten_for_calibration``), in float32."""
    from llmcompressor.observers.helpers import flatten_for_calibration

    return flatten_for_calibration(value.float(), base_name, args)


def minmax_range(observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-qparam ``(min, max)`` of an observed tensor ``(N, *Q, S)`` -> two ``Q``-shaped tensors."""
    return observed.amin(dim=(0, -1)), observed.amax(dim=(0, -1))


def _quantile_rows(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile ``q`` of each row (same convention as ``torch.quantile``)."""
    n = rows.shape[-1]
    if n > _MAX_QUANTILE_ELEMENTS:
        stride = -(-n // _MAX_QUANTILE_ELEMENTS)
        rows = rows[..., ::stride]
        n = rows.shape[-1]
    ordered = rows.sort(dim=-1).values
    position = q * (n - 1)
    lo = int(position)
    hi = min(lo + 1, n - 1)
    frac = position - lo
    return ordered[..., lo] * (1 - frac) + ordered[..., hi] * frac


def percentile_range(observed: torch.Tensor, p: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Range bounded by the ``p``-th percentile of the FP distribution, per qparam.

    Asymmetric: ``[quantile(1-p), quantile(p)]``. Symmetric: ``+-quantile_p(|x|)``.
    ``p = 1.0`` equals :func:`minmax_range` (asymmetric) / the absmax range (symmetric).
    """
    if not 0.5 < p <= 1.0:
        raise ValueError(f"percentile must be in (0.5, 1.0], got {p}")
    rows = observed.movedim(0, -2).flatten(-2, -1)  # (*Q, N*S)
    if symmetric:
        bound = _quantile_rows(rows.abs(), p)
        return -bound, bound
    return _quantile_rows(rows, 1.0 - p), _quantile_rows(rows, p)


def range_qparams(
    low: torch.Tensor, high: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard compressed-tensors ``(scale, zero_point)`` of a range (``calculate_qparams``)."""
    return calculate_qparams(low, high, args)


def fake_quantize_observed(
    observed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantizationArgs
) -> torch.Tensor:
    """Quantize-dequantize ``observed`` ``(N, *Q, S)`` with per-qparam scale/zero-point ``Q``."""
    token_args = args.model_copy(update={"strategy": QuantizationStrategy.TOKEN})
    return fake_quantize(observed, scale.unsqueeze(-1), zero_point.unsqueeze(-1), token_args)


def lp_norm_range(
    observed: torch.Tensor,
    args: QuantizationArgs,
    shrink_factors: Sequence[float] = DEFAULT_SHRINK_FACTORS,
    norm: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """lp-norm range initialisation (QLoRA-style, as the paper says): per qparam, the shrink
    factor ``f`` of the min/max range minimising ``sum |Q_f(x) - x|^norm``."""
    low, high = minmax_range(observed)
    best_err = torch.full_like(low, float("inf"))
    best_low, best_high = low.clone(), high.clone()
    for factor in shrink_factors:
        cand_low, cand_high = low * factor, high * factor
        scale, zero_point = range_qparams(cand_low, cand_high, args)
        dq = fake_quantize_observed(observed, scale, zero_point, args)
        err = (dq - observed).abs().pow(norm).sum(dim=(0, -1))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_low = torch.where(better, cand_low, best_low)
        best_high = torch.where(better, cand_high, best_high)
    return best_low, best_high
