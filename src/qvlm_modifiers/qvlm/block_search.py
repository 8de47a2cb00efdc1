"""Q-VLM joint block search (Eq. 2-3): clipping ranges chosen by coordinate descent.

Paper (Sec. 3.2-3.3): inside each block ``B_i`` (last layer ``L_i``) the quantization ranges
("rounding functions") of all layers are searched jointly to minimise the block output error
against the full-precision path (Eq. 3)::

    min_{Q_k, k in B_i} || W_q^(L_i) X_q^(L_i) - W_r^(L_i) X_r^(L_i) ||^2

The candidate bounds are percentiles of the FP tensor distribution,
``p in {1.0, 0.995, 0.99, 0.985, 0.98}``; ranges are initialised QLoRA-style by minimising the
lp distance between FP and quantized values over a grid of shrink factors of the min/max range.

Here (pure functions, no llm-compressor state):

* a *range variable* is one quantity with its own clipping range: a Linear's weight (per
  group/channel/tensor min..max, as the scheme's ``weight_scale`` shape) or a Linear's static input
  activation. Its candidates are: index 0 = the lp-norm initial range, then one range per
  percentile ``p`` (per group: the ``(1-p)``/``p`` quantiles for asymmetric, the ``p`` quantile
  of ``|x|`` for symmetric schemes; ``p=1.0`` is min/max). Duplicate candidates are dropped.
* :func:`coordinate_descent` visits the variables in order and moves one variable at a time to
  its best candidate with all others fixed, for up to ``epochs`` passes, stopping early after a
  pass without change. A move is taken only on strict improvement, so the objective never
  increases from its starting point.
* :func:`search_block` is Eq. 2 then Eq. 3: first each layer of the block is searched alone
  against its own FP target (greedy layer-wise, Eq. 2, inputs = the quantized outputs of the
  previous layers); then, if the block has more than one layer, all the block's variables are
  refined jointly on the block output (Eq. 3), starting from the layer-wise solution
  (``init="layerwise"``, default), or from the lp-norm ranges (``init="lp_norm"``). With the
  default the block objective can only improve on the layer-wise solution, and a one-layer block
  *is* the layer-wise search.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_SHRINK_FACTORS",
    "flatten_for_ranges",
    "minmax_range",
    "percentile_range",
    "lp_norm_range",
    "range_qparams",
    "fake_quantize_observed",
    "RangeVariable",
    "DescentResult",
    "coordinate_descent",
    "BlockSearchResult",
    "search_block",
    "block_mse_objective",
]

DEFAULT_PERCENTILES = (1.0, 0.995, 0.99, 0.985, 0.98)  # paper, Sec. 3.3
DEFAULT_SHRINK_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # reference code's init grid

# cap on the elements used for an activation quantile (sorting cost); a strided subsample beyond
_MAX_QUANTILE_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# ranges of one quantity
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# coordinate descent
# ---------------------------------------------------------------------------------------------


@dataclass
class RangeVariable:
    """One searched range: ``candidates[i]`` is a setting (e.g. ``{"weight_scale": s,
    "weight_zero_point": z}``) written by ``apply``; ``labels[i]`` names it for logs;
    ``current`` indexes the chosen candidate (0 = the initial range)."""

    name: str
    candidates: list[dict[str, torch.Tensor]]
    labels: list[str]
    apply: Callable[[dict[str, torch.Tensor]], None]
    current: int = 0

    def set(self, index: int) -> None:
        self.apply(self.candidates[index])

    @property
    def label(self) -> str:
        return self.labels[self.current]


@dataclass
class DescentResult:
    loss: float
    initial_loss: float
    epochs_run: int
    evaluations: int
    history: list[float] = field(default_factory=list)


def coordinate_descent(
    objective: Callable[[], float], variables: Sequence[RangeVariable], epochs: int
) -> DescentResult:
    """Minimise ``objective()`` over the variables' candidates, one variable at a time.

    Starts from each variable's ``current`` candidate; a pass tries every other candidate of each
    variable (others fixed) and keeps the best if it strictly improves. Stops after ``epochs``
    passes or a pass without change. Leaves every variable applied at its chosen candidate.
    """
    for var in variables:
        var.set(var.current)
    best = objective()
    initial = best
    evaluations = 1
    history = [best]
    epochs_run = 0
    for _ in range(max(0, epochs)):
        epochs_run += 1
        changed = False
        for var in variables:
            for index in range(len(var.candidates)):
                if index == var.current:
                    continue
                var.set(index)
                loss = objective()
                evaluations += 1
                if loss < best:
                    best, var.current, changed = loss, index, True
            var.set(var.current)
        history.append(best)
        if not changed:
            break
    return DescentResult(loss=best, initial_loss=initial, epochs_run=epochs_run, evaluations=evaluations, history=history)


# ---------------------------------------------------------------------------------------------
# layer-wise (Eq. 2) + block (Eq. 3) search
# ---------------------------------------------------------------------------------------------

LayerFn = Callable[[torch.Tensor, int], torch.Tensor]  # (hidden states, batch index) -> hidden states


@dataclass
class BlockSearchResult:
    layerwise: list[DescentResult]
    block: DescentResult | None
    loss: float  # final block-output MSE (Eq. 3 objective / numel)
    layerwise_loss: float  # block-output MSE of the layer-wise solution


def block_mse_objective(
    layers: Sequence[LayerFn], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> Callable[[], float]:
    """Eq. 3's objective as a closure: mean squared error of ``layers`` applied to ``inputs``
    against ``targets`` (summed over batches, divided by the number of target elements)."""
    def objective() -> float:
        total, count = 0.0, 0
        for batch_index, (x, y) in enumerate(zip(inputs, targets)):
            out = x
            for layer in layers:
                out = layer(out, batch_index)
            total += (out.float() - y.to(out.device).float()).pow(2).sum().item()
            count += y.numel()
        return total / max(count, 1)

    return objective


def _run(layers: Sequence[LayerFn], inputs: Sequence[torch.Tensor], keep: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    outputs = []
    for batch_index, x in enumerate(inputs):
        out = x
        for layer in layers:
            out = layer(out, batch_index)
        outputs.append(keep(out))
    return outputs


def search_block(
    layers: Sequence[LayerFn],
    variables: Sequence[Sequence[RangeVariable]],
    quantized: Callable[[bool], contextlib.AbstractContextManager],
    q_inputs: Sequence[torch.Tensor],
    fp_targets: Sequence[Sequence[torch.Tensor]] | None,
    epochs: int,
    init: Literal["layerwise", "lp_norm"] = "layerwise",
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> BlockSearchResult:
    """Search the ranges of one block of consecutive layers.

    :param layers: the block's layers as callables ``(hidden, batch_index) -> hidden``
    :param variables: per layer, its range variables (candidate 0 = lp-norm initial range)
    :param quantized: ``quantized(True)`` / ``quantized(False)``: context managers in which the
        layers run fake-quantized / in full precision
    :param q_inputs: per batch, the block input on the quantized path (``X_q``)
    :param fp_targets: per layer, per batch, the FP-path output of that layer (Eq. 3's
        ``W_r X_r``); ``None`` = targets are the FP layers applied to the quantized-path input
        (GPTQ-style ``"quant_input"`` target)
    :param epochs: coordinate-descent passes (``search_epochs``)
    :param init: ``"layerwise"`` (Eq. 2 per layer, then Eq. 3 jointly) or ``"lp_norm"`` (Eq. 3
        from candidate 0 = the lp-norm ranges; no layer-wise stage unless the block has one layer,
        and ``layerwise_loss`` is then NaN)
    :param keep: where to keep intermediate per-batch tensors (e.g. move to the offload device)
    """
    if len(layers) != len(variables):
        raise ValueError("one list of range variables per layer is required")
    layerwise_results: list[DescentResult] = []
    for layer_vars in variables:
        for var in layer_vars:
            var.set(var.current)
    # Eq. 2: greedy layer-wise search, feeding the quantized outputs forward
    run_layerwise = init == "layerwise" or len(layers) == 1
    x_q = list(q_inputs)
    for j, (layer, layer_vars) in enumerate(zip(layers, variables) if run_layerwise else []):
        if fp_targets is not None:
            target = fp_targets[j]
        else:
            with quantized(False):
                target = _run([layer], x_q, keep)
        with quantized(True):
            layerwise_results.append(coordinate_descent(block_mse_objective([layer], x_q, target), layer_vars, epochs))
            if j < len(layers) - 1:
                x_q = _run([layer], x_q, keep)
    if fp_targets is not None:
        block_target = fp_targets[-1]
    else:
        with quantized(False):
            block_target = _run(list(layers), q_inputs, keep)
    all_vars = [v for layer_vars in variables for v in layer_vars]
    block_objective = block_mse_objective(list(layers), q_inputs, block_target)
    with quantized(True):
        if len(layers) == 1:
            result = layerwise_results[0]
            return BlockSearchResult(layerwise=layerwise_results, block=None, loss=result.loss, layerwise_loss=result.loss)
        if init == "lp_norm":
            for var in all_vars:
                var.current = 0
        layerwise_loss = block_objective() if run_layerwise else float("nan")
        block_result = coordinate_descent(block_objective, all_vars, epochs)
    return BlockSearchResult(
        layerwise=layerwise_results, block=block_result, loss=block_result.loss, layerwise_loss=layerwise_loss
    )
