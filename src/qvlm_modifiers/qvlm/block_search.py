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
import math
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
    "token_error_weights",
    "BlockObjective",
    "spread_batch_indices",
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
    evaluations: int  # objective evaluations actually run (memo hits not counted)
    history: list[float] = field(default_factory=list)
    memo_hits: int = 0  # candidate states whose verdict was known from an earlier evaluation


def coordinate_descent(
    objective: Callable[..., float],
    variables: Sequence[RangeVariable],
    epochs: int,
    initial_loss: float | None = None,
    memo: bool = True,
) -> DescentResult:
    """Minimise ``objective()`` over the variables' candidates, one variable at a time.

    Starts from each variable's ``current`` candidate; a pass tries every other candidate of each
    variable (others fixed) and keeps the best if it strictly improves. Stops after ``epochs``
    passes or a pass without change. Leaves every variable applied at its chosen candidate.

    Exact shortcuts (the visited states, the choices and the losses are those of the plain
    procedure above, for any deterministic objective):

    * a memo of the states already evaluated (tuple of every variable's candidate index): a
      state seen before is not evaluated again (typically half of the last, confirming pass);
    * if ``objective`` has a ``focus(variable_index)`` method (:class:`BlockObjective`), it is
      called before the candidates of that variable are tried, so that the objective can reuse
      what does not depend on that variable;
    * if ``objective.supports_bound`` is true, it is called as ``objective(bound=best)`` and may
      stop early and return any value ``>= bound`` once the candidate provably cannot be
      strictly better than ``best`` (it is rejected either way).

    :param initial_loss: the objective at the starting state, if the caller already knows it
    :param memo: keep the memo of evaluated states (``False``: re-evaluate every candidate, the
        plain procedure's cost)
    """
    focus = getattr(objective, "focus", None)
    bounded = bool(getattr(objective, "supports_bound", False))
    for var in variables:
        var.set(var.current)
    if initial_loss is None:
        if focus is not None:
            focus(None)
        best = objective()
        evaluations = 1
    else:
        best, evaluations = float(initial_loss), 0
    initial = best
    history = [best]
    epochs_run = 0
    state = [var.current for var in variables]
    # memo: state -> the loss, or a lower bound of it that was >= the best loss at the time
    seen: dict[tuple[int, ...], float] = {tuple(state): best}
    memo_hits = 0
    for _ in range(max(0, epochs)):
        epochs_run += 1
        changed = False
        for position, var in enumerate(variables):
            focused = False
            for index in range(len(var.candidates)):
                if index == var.current:
                    continue
                state[position] = index
                key = tuple(state)
                known = seen.get(key) if memo else None
                if known is not None:
                    # deterministic objective: the stored loss gives the same verdict again; a
                    # stored lower bound was >= an earlier best >= the current best: rejected
                    memo_hits += 1
                    loss = known
                else:
                    if focus is not None and not focused:
                        focus(position)
                        focused = True
                    var.set(index)
                    loss = objective(bound=best) if bounded else objective()
                    evaluations += 1
                    if memo:
                        seen[key] = loss
                if loss < best:
                    best, var.current, changed = loss, index, True
            state[position] = var.current
            var.set(var.current)
        history.append(best)
        if not changed:
            break
    return DescentResult(
        loss=best, initial_loss=initial, epochs_run=epochs_run, evaluations=evaluations, history=history,
        memo_hits=memo_hits,
    )


# ---------------------------------------------------------------------------------------------
# layer-wise (Eq. 2) + block (Eq. 3) search
# ---------------------------------------------------------------------------------------------

LayerFn = Callable[[torch.Tensor, int], torch.Tensor]  # (hidden states, batch index) -> hidden states


@dataclass
class BlockSearchResult:
    layerwise: list[DescentResult]
    block: DescentResult | None
    loss: float  # final block-output MSE (Eq. 3 objective / numel), on ALL batches
    layerwise_loss: float  # block-output MSE of the layer-wise solution, on ALL batches
    search_loss: float = float("nan")  # the searched objective (on the search batches) at the end
    search_batches: int = 0  # number of batches the search objective used
    kept_layerwise: bool = False  # searched on a subset and the joint solution was worse on all batches


BlockObjectiveKind = Literal["mse", "token_relative_mse"]


def token_error_weights(target: torch.Tensor, kind: BlockObjectiveKind) -> torch.Tensor | None:
    """Per-token weights of the squared error (``None`` = plain MSE, Eq. 3).

    ``"token_relative_mse"`` weighs token ``t`` by ``d / ||y_t||^2`` (d = hidden size), so the
    objective becomes the mean over tokens of ``||out_t - y_t||^2 / ||y_t||^2``: every token counts
    alike. Not in the paper: with plain MSE an LLM's massive activations (one attention-sink token
    whose hidden state is 100x the others', >99% of the squared norm in SmolLM2's later layers)
    decide the whole search."""
    if kind == "mse":
        return None
    if kind != "token_relative_mse":
        raise ValueError(f"block objective must be 'mse' or 'token_relative_mse', got {kind!r}")
    y = target.float()
    return y.shape[-1] / y.pow(2).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def combined_token_weights(
    target: torch.Tensor, kind: BlockObjectiveKind, token_weight: torch.Tensor | None
) -> torch.Tensor | None:
    """The per-token weights of one batch's squared error: :func:`token_error_weights` times an
    optional given per-token weight (shape ``target.shape[:-1] + (1,)``, e.g. the modality weights
    of :func:`modality_token_weights`); ``None`` when both are uniform. Given weights must be finite
    and >= 0 (a negative weight would break :class:`BlockObjective`'s early stop)."""
    weight = token_error_weights(target, kind)
    if token_weight is None:
        return weight
    token_weight = token_weight.to(target.device, torch.float32)
    if not bool(torch.isfinite(token_weight).all()) or bool((token_weight < 0).any()):
        raise ValueError("token weights must be finite and >= 0")
    return token_weight if weight is None else weight * token_weight


def modality_token_weights(loss_mask: torch.Tensor, hidden_shape: torch.Size, vision_weight: float) -> torch.Tensor:
    """Per-token weights of the block error from a calibration ``loss_mask`` (0 prompt/template,
    1 answer, 2 image; :mod:`qvlm_modifiers.data`): ``vision_weight`` on image tokens, 1 on every
    text token (prompt and answer). Shape ``hidden_shape[:-1] + (1,)``, to broadcast over channels.

    Not in Q-VLM (Eq. 3 counts every token alike); MBQ's observation (CVPR'25) that errors on
    vision tokens matter far less to the answer than errors on text tokens, applied to Q-VLM's
    block objective."""
    mask = torch.as_tensor(loss_mask).reshape(hidden_shape[:-1])
    weights = torch.ones(mask.shape, dtype=torch.float32)
    weights[mask.cpu() == 2] = float(vision_weight)
    return weights.unsqueeze(-1)


def _squared_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> float:
    err = (out.float() - target.to(out.device).float()).pow(2)
    if weight is not None:
        err = err * weight.to(err.device)
    return err.sum().item()


def block_mse_objective(
    layers: Sequence[LayerFn], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
    batch_ids: Sequence[int] | None = None, kind: BlockObjectiveKind = "mse",
    token_weights: Sequence[torch.Tensor | None] | None = None,
) -> Callable[[], float]:
    """Eq. 3's objective as a closure: mean squared error of ``layers`` applied to ``inputs``
    against ``targets`` (summed over batches, divided by the number of target elements; with
    ``kind="token_relative_mse"`` each token's error is weighed by :func:`token_error_weights`).
    The plain reference: every call runs every layer on every batch. ``batch_ids`` are the
    calibration batch indices the layers receive (default ``0..len(inputs)-1``); ``token_weights``
    optional per-token weights, one per batch (:func:`combined_token_weights`)."""
    ids = list(range(len(inputs))) if batch_ids is None else list(batch_ids)
    extra = list(token_weights) if token_weights is not None else [None] * len(targets)
    weights = [combined_token_weights(y, kind, w) for y, w in zip(targets, extra)]

    def objective() -> float:
        total, count = 0.0, 0
        for batch_index, x, y, w in zip(ids, inputs, targets, weights):
            out = x
            for layer in layers:
                out = layer(out, batch_index)
            total += _squared_error(out, y, w)
            count += y.numel()
        return total / max(count, 1)

    return objective


class BlockObjective:
    """Eq. 3's objective (the same value as :func:`block_mse_objective`, same summation order)
    with two exact shortcuts for :func:`coordinate_descent`:

    * **prefix cache** -- ``focus(i)`` before the candidates of variable ``i`` (which lives in
      layer ``variable_layers[i]``) are tried: the block's hidden states at the *input* of that
      layer do not depend on the variable, so they are computed once (from the nearest still-valid
      cached layer input) and each candidate only runs the layers from there on;
    * **early stop** -- ``objective(bound=b)``: the squared errors are summed batch by batch; as
      soon as ``partial_sum / count >= b`` the final loss cannot be ``< b`` any more (the terms are
      non-negative and float addition/division are monotone), so the candidate is rejected
      without running the remaining batches and the partial value is returned.

    :param layers: the block's layers ``(hidden, batch_index) -> hidden``
    :param inputs: the block input, one tensor per evaluated batch
    :param targets: the targets, one per evaluated batch
    :param batch_indices: the batch index passed to the layers for each evaluated batch (default
        ``0..len(inputs)-1``; a subset when the search uses only some calibration batches)
    :param variables: the range variables of the descent, and ``variable_layers[i]`` the index of
        the layer (in ``layers``) that ``variables[i]`` belongs to. Without them no prefix cache
    :param keep: where cached hidden states are kept (e.g. the offload device)
    :param kind: the per-token error weighting (:func:`token_error_weights`)
    :param token_weights: optional extra per-token weights, one per evaluated batch
        (:func:`combined_token_weights`)
    """

    supports_bound = True

    def __init__(
        self,
        layers: Sequence[LayerFn],
        inputs: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        batch_indices: Sequence[int] | None = None,
        variables: Sequence[RangeVariable] | None = None,
        variable_layers: Sequence[int] | None = None,
        keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        kind: BlockObjectiveKind = "mse",
        token_weights: Sequence[torch.Tensor | None] | None = None,
    ):
        if len(inputs) != len(targets):
            raise ValueError("one target per input batch is required")
        if token_weights is not None and len(token_weights) != len(targets):
            raise ValueError("one token-weight tensor (or None) per input batch is required")
        self.layers = list(layers)
        self.targets = list(targets)
        extra = list(token_weights) if token_weights is not None else [None] * len(self.targets)
        self.weights = [combined_token_weights(y, kind, w) for y, w in zip(self.targets, extra)]
        self.batch_indices = list(range(len(inputs))) if batch_indices is None else list(batch_indices)
        if len(self.batch_indices) != len(inputs):
            raise ValueError("one batch index per input batch is required")
        if (variables is None) != (variable_layers is None):
            raise ValueError("pass both variables and variable_layers, or neither")
        self.variables = list(variables) if variables is not None else None
        self.variable_layers = list(variable_layers) if variable_layers is not None else None
        self.keep = keep
        self.count = max(sum(t.numel() for t in self.targets), 1)
        # layer index -> (state of the variables of the layers before it, hidden states at its input)
        self._prefix: dict[int, tuple[tuple[int, ...], list[torch.Tensor]]] = {0: ((), list(inputs))}
        self._start = 0

    def _state_before(self, layer_index: int) -> tuple[int, ...]:
        return tuple(v.current for v, j in zip(self.variables, self.variable_layers) if j < layer_index)

    def focus(self, variable_index: int | None) -> None:
        """Prepare for trying the candidates of ``variables[variable_index]`` (``None``: the whole
        block). Every variable must be applied at its ``current`` candidate."""
        if variable_index is None or self.variables is None:
            self._start = 0
            return
        start = self.variable_layers[variable_index]
        key = self._state_before(start)
        cached = self._prefix.get(start)
        if cached is None or cached[0] != key:
            # nearest earlier layer whose cached input is still valid (layer 0 always is)
            origin = max(j for j, (k, _) in self._prefix.items() if j <= start and k == self._state_before(j))
            hidden = self._prefix[origin][1]
            for j in range(origin, start):
                hidden = [self.keep(self.layers[j](h, b)) for h, b in zip(hidden, self.batch_indices)]
                self._prefix[j + 1] = (self._state_before(j + 1), hidden)
        self._start = start

    def __call__(self, bound: float = math.inf) -> float:
        total = 0.0
        hidden = self._prefix[self._start][1]
        run = self.layers[self._start:]
        for x, y, w, b in zip(hidden, self.targets, self.weights, self.batch_indices):
            out = x
            for layer in run:
                out = layer(out, b)
            total += _squared_error(out, y, w)
            if total / self.count >= bound:
                return total / self.count  # a lower bound of the loss, >= bound: rejected
        return total / self.count


def _run(
    layers: Sequence[LayerFn],
    inputs: Sequence[torch.Tensor],
    keep: Callable[[torch.Tensor], torch.Tensor],
    batch_indices: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    outputs = []
    indices = range(len(inputs)) if batch_indices is None else batch_indices
    for batch_index, x in zip(indices, inputs):
        out = x
        for layer in layers:
            out = layer(out, batch_index)
        outputs.append(keep(out))
    return outputs


def spread_batch_indices(num_batches: int, search_batches: int | None) -> list[int]:
    """``search_batches`` batch indices spread evenly over ``0..num_batches-1`` (all when
    ``None`` or not smaller): the fixed calibration subset the search objective is evaluated on."""
    if search_batches is None or search_batches >= num_batches:
        return list(range(num_batches))
    if search_batches < 1:
        raise ValueError(f"search_batches must be >= 1, got {search_batches}")
    return sorted({int(i * num_batches // search_batches) for i in range(search_batches)})


def search_block(
    layers: Sequence[LayerFn],
    variables: Sequence[Sequence[RangeVariable]],
    quantized: Callable[[bool], contextlib.AbstractContextManager],
    q_inputs: Sequence[torch.Tensor],
    fp_targets: Sequence[Sequence[torch.Tensor]] | None,
    epochs: int,
    init: Literal["layerwise", "lp_norm"] = "layerwise",
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    search_batches: int | None = None,
    reference: bool = False,
    objective_kind: BlockObjectiveKind = "mse",
    token_weights: Sequence[torch.Tensor | None] | None = None,
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
    :param search_batches: evaluate the search objectives on this many batches only (spread
        evenly, :func:`spread_batch_indices`); ``None`` = all (exact). The reported ``loss`` and
        ``layerwise_loss`` are always measured on all batches, and if the joint (Eq. 3) solution
        is worse there than the layer-wise one, the layer-wise one is kept, so the block result
        is never worse than layer-wise on the full calibration objective
    :param reference: use the plain objective (:func:`block_mse_objective`: every candidate
        re-runs the whole block on every batch) instead of :class:`BlockObjective`'s exact
        shortcuts. Same choices and losses, slower: for tests and benchmarks
    :param objective_kind: ``"mse"`` (Eq. 2/3) or ``"token_relative_mse"`` (each token's error
        relative to its target's norm, :func:`token_error_weights`), for every objective here
    :param token_weights: per batch (all calibration batches, like ``q_inputs``), optional extra
        per-token weights of every objective here (e.g. :func:`modality_token_weights`); ``None``
        = every token alike (Eq. 2-3)
    """
    if len(layers) != len(variables):
        raise ValueError("one list of range variables per layer is required")
    num_batches = len(q_inputs)
    indices = spread_batch_indices(num_batches, search_batches)
    subset = len(indices) < num_batches

    if token_weights is not None and len(token_weights) != num_batches:
        raise ValueError("one token-weight tensor (or None) per calibration batch is required")

    def make_objective(obj_layers, inputs, targets, batch_ids, obj_vars=None, var_layers=None):
        weights = None if token_weights is None else [token_weights[i] for i in batch_ids]
        if reference:
            return block_mse_objective(obj_layers, inputs, targets, batch_ids, objective_kind, weights)
        return BlockObjective(
            obj_layers, inputs, targets, batch_ids, obj_vars, var_layers, keep, objective_kind, weights
        )

    def pick(seq):
        return [seq[i] for i in indices]

    layerwise_results: list[DescentResult] = []
    for layer_vars in variables:
        for var in layer_vars:
            var.set(var.current)
    # Eq. 2: greedy layer-wise search, feeding the quantized outputs forward
    run_layerwise = init == "layerwise" or len(layers) == 1
    x_q = pick(q_inputs)
    for j, (layer, layer_vars) in enumerate(zip(layers, variables) if run_layerwise else []):
        if fp_targets is not None:
            target = pick(fp_targets[j])
        else:
            with quantized(False):
                target = _run([layer], x_q, keep, indices)
        with quantized(True):
            objective = make_objective([layer], x_q, target, indices)
            layerwise_results.append(coordinate_descent(objective, layer_vars, epochs, memo=not reference))
            if j < len(layers) - 1:
                x_q = _run([layer], x_q, keep, indices)
    if fp_targets is not None:
        block_target = list(fp_targets[-1])
    else:
        with quantized(False):
            block_target = _run(list(layers), q_inputs, keep)
    all_vars = [v for layer_vars in variables for v in layer_vars]
    var_layers = [j for j, layer_vars in enumerate(variables) for _ in layer_vars]
    full_objective = make_objective(list(layers), list(q_inputs), block_target, list(range(num_batches)))
    with quantized(True):
        if len(layers) == 1:
            result = layerwise_results[0]
            loss = full_objective() if subset else result.loss
            return BlockSearchResult(
                layerwise=layerwise_results, block=None, loss=loss, layerwise_loss=loss,
                search_loss=result.loss, search_batches=len(indices),
            )
        if init == "lp_norm":
            for var in all_vars:
                var.current = 0
                var.set(0)
        layerwise_loss = full_objective() if run_layerwise else float("nan")
        layerwise_choice = [v.current for v in all_vars]
        # on all batches (not subset) the search objective is full_objective: its starting loss is known
        search_objective = make_objective(list(layers), pick(q_inputs), pick(block_target), indices, all_vars, var_layers)
        known_start = run_layerwise and not reference and not subset
        block_result = coordinate_descent(
            search_objective, all_vars, epochs, initial_loss=layerwise_loss if known_start else None, memo=not reference,
        )
        loss = full_objective() if subset else block_result.loss
        kept_layerwise = False
        if subset and run_layerwise and not loss < layerwise_loss and layerwise_choice != [v.current for v in all_vars]:
            # searched on a subset: keep the layer-wise solution where it is better on all batches
            for var, index in zip(all_vars, layerwise_choice):
                var.current = index
                var.set(index)
            loss, kept_layerwise = layerwise_loss, True
    return BlockSearchResult(
        layerwise=layerwise_results, block=block_result, loss=loss, layerwise_loss=layerwise_loss,
        search_loss=block_result.loss, search_batches=len(indices), kept_layerwise=kept_layerwise,
    )
