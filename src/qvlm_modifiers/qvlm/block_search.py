"""Q-VLM joint block search (Eq. 2-3): clipping ranges chosen by coordinate descent.

Paper (Sec. 3.2-3.3): inside each block ``B_i`` (last layer ``L_i``) the quantization ranges
("rounding functions") of all layers are searched jointly to minimise the block output error
against the full-precision path (Eq. 3)::

    min_{Q_k, k in B_i} || W_q^(L_i) X_q^(L_i) - W_r^(L_i) X_r^(L_i) ||^2

The candidate ranges (min/max, percentiles of the FP distribution, lp-norm initialisation) are in
:mod:`~qvlm_modifiers.qvlm.ranges` (AWQ's activation-aware weight clip ranges in
:mod:`~qvlm_modifiers.qvlm.clip_search`), the objective (Eq. 3's MSE and its opt-in weightings) in
:mod:`~qvlm_modifiers.qvlm.objective`. Here (pure functions, no llm-compressor state):

* a *range variable* (:class:`RangeVariable`) is one quantity with its own clipping range: a
  Linear's weight (per group/channel/tensor min..max, as the scheme's ``weight_scale`` shape) or a
  Linear's static input activation. Its candidates: index 0 = min/max (plain round-to-nearest, the
  start of every search, issue #24), then e.g. the lp-norm range and one range per percentile ``p``
  (per group: the ``(1-p)``/``p`` quantiles for asymmetric, the ``p`` quantile of ``|x|`` for
  symmetric schemes), or AWQ's per-group clip ranges. Duplicate candidates are dropped.
  :mod:`~qvlm_modifiers.qvlm.range_variables` builds them on a quantized Linear; after the search,
  :mod:`~qvlm_modifiers.qvlm.guard` keeps them only where they beat min/max on held-out rows.
* :func:`coordinate_descent` visits the variables in order and moves one variable at a time to
  its best candidate with all others fixed, for up to ``epochs`` passes, stopping early after a
  pass without change. A move is taken only on strict improvement, so the objective never
  increases from its starting point.
* :func:`search_block` is Eq. 2 then Eq. 3: first each layer of the block is searched alone
  against its own FP target (greedy layer-wise, Eq. 2, inputs = the quantized outputs of the
  previous layers); then, if the block has more than one layer, all the block's variables are
  refined jointly on the block output (Eq. 3), starting from the layer-wise solution
  (``init="layerwise"``, default), or from min/max (``init="rtn"``, formerly ``"lp_norm"``). With the
  default the block objective can only improve on the layer-wise solution, and a one-layer block
  *is* the layer-wise search.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from qvlm_modifiers.qvlm.objective import (
    BlockObjective,
    BlockObjectiveKind,
    LayerFn,
    LinearOutputReplay,
    block_mse_objective,
)

__all__ = [
    "RangeVariable",
    "DescentResult",
    "coordinate_descent",
    "BlockSearchResult",
    "search_block",
    "spread_batch_indices",
]


@dataclass
class RangeVariable:
    """One searched range: ``candidates[i]`` is a setting (e.g. ``{"weight_scale": s,
    "weight_zero_point": z}``) written by ``apply``; ``labels[i]`` names it for logs;
    ``current`` indexes the chosen candidate (0 = min/max); ``module``: the module whose range it
    is (optional; lets :class:`BlockObjective` replay the outputs of the modules run before it)."""

    name: str
    candidates: list[dict[str, torch.Tensor]]
    labels: list[str]
    apply: Callable[[dict[str, torch.Tensor]], None]
    current: int = 0
    module: object | None = None

    def set(self, index: int) -> None:
        self.apply(self.candidates[index])

    @property
    def label(self) -> str:
        return self.labels[self.current]

    @property
    def is_weight(self) -> bool:
        """A weight's range (named ``<module>.weight``), not an activation's."""
        return self.name.endswith(".weight")


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


@dataclass
class BlockSearchResult:
    layerwise: list[DescentResult]
    block: DescentResult | None
    # final block-output MSE (Eq. 3 objective / numel) on ALL batches; for a one-layer block (no
    # joint stage, no layer-wise solution to compare with) on the search batches only
    loss: float
    layerwise_loss: float  # block-output MSE of the layer-wise solution, on ALL batches (idem)
    search_loss: float = float("nan")  # the searched objective (on the search batches) at the end
    search_batches: int = 0  # number of batches the search objective used
    kept_layerwise: bool = False  # searched on a subset and the joint solution was worse on all batches


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
    init: Literal["layerwise", "rtn", "lp_norm"] = "layerwise",
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    search_batches: int | None = None,
    reference: bool = False,
    objective_kind: BlockObjectiveKind = "mse",
    token_weights: Sequence[torch.Tensor | None] | None = None,
    train_batches: Sequence[int] | None = None,
    replay: LinearOutputReplay | None = None,
) -> BlockSearchResult:
    """Search the ranges of one block of consecutive layers.

    :param layers: the block's layers as callables ``(hidden, batch_index) -> hidden``
    :param variables: per layer, its range variables (candidate 0 = min/max)
    :param quantized: ``quantized(True)`` / ``quantized(False)``: context managers in which the
        layers run fake-quantized / in full precision
    :param q_inputs: per batch, the block input on the quantized path (``X_q``)
    :param fp_targets: per layer, per batch, the FP-path output of that layer (Eq. 3's
        ``W_r X_r``); ``None`` = targets are the FP layers applied to the quantized-path input
        (GPTQ-style ``"quant_input"`` target)
    :param epochs: coordinate-descent passes (``search_epochs``)
    :param init: ``"layerwise"`` (Eq. 2 per layer, then Eq. 3 jointly) or ``"rtn"`` / ``"lp_norm"``
        (Eq. 3 from candidate 0 = min/max; no layer-wise stage unless the block has one layer,
        and ``layerwise_loss`` is then NaN)
    :param keep: where to keep intermediate per-batch tensors (e.g. move to the offload device)
    :param search_batches: evaluate the search objectives on this many batches only (spread
        evenly, :func:`spread_batch_indices`); ``None`` = all (exact). For a block of several
        layers the reported ``loss`` and ``layerwise_loss`` are measured on all batches, and if
        the joint (Eq. 3) solution is worse there than the layer-wise one, the layer-wise one is
        kept, so the block result is never worse than layer-wise on the full calibration
        objective; a one-layer block reports its loss on the search batches
    :param reference: use the plain objective (:func:`block_mse_objective`: every candidate
        re-runs the whole block on every batch) instead of :class:`BlockObjective`'s exact
        shortcuts. Same choices and losses, slower: for tests and benchmarks
    :param objective_kind: ``"mse"`` (Eq. 2/3) or ``"token_relative_mse"`` (each token's error
        relative to its target's norm, :func:`token_error_weights`), for every objective here
    :param token_weights: per batch (all calibration batches, like ``q_inputs``), optional extra
        per-token weights of every objective here (e.g. :func:`modality_token_weights`); ``None``
        = every token alike (Eq. 2-3)
    :param replay: the :class:`~qvlm_modifiers.qvlm.objective.LinearOutputReplay` wrapped around
        the block's Linears (:func:`~qvlm_modifiers.qvlm.cached_forward.replay_linear_outputs`), if
        any: the candidates of a Linear's range then re-run only what follows that Linear in its
        layer (exact, same losses)
    :param train_batches: the calibration batches the search may use (default all); the others are
        held out for :mod:`~qvlm_modifiers.qvlm.guard` and never evaluated here. ``search_batches``
        and the reported losses ("all batches" above) are then relative to these
    """
    if len(layers) != len(variables):
        raise ValueError("one list of range variables per layer is required")
    num_batches = len(q_inputs)
    pool = list(range(num_batches)) if train_batches is None else sorted(train_batches)
    if not pool or pool[0] < 0 or pool[-1] >= num_batches:
        raise ValueError(f"train_batches must be a non-empty subset of 0..{num_batches - 1}")
    indices = [pool[i] for i in spread_batch_indices(len(pool), search_batches)]
    subset = len(indices) < len(pool)

    if token_weights is not None and len(token_weights) != num_batches:
        raise ValueError("one token-weight tensor (or None) per calibration batch is required")

    def make_objective(obj_layers, inputs, targets, batch_ids, obj_vars=None, var_layers=None):
        weights = None if token_weights is None else [token_weights[i] for i in batch_ids]
        if reference:
            return block_mse_objective(obj_layers, inputs, targets, batch_ids, objective_kind, weights)
        return BlockObjective(
            obj_layers, inputs, targets, batch_ids, obj_vars, var_layers, keep, objective_kind, weights, replay
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
            objective = make_objective([layer], x_q, target, indices, layer_vars, [0] * len(layer_vars))
            layerwise_results.append(coordinate_descent(objective, layer_vars, epochs, memo=not reference))
            if j < len(layers) - 1:
                x_q = _run([layer], x_q, keep, indices)
    if len(layers) == 1:  # nothing to compare on all batches: the loss on the search batches
        result = layerwise_results[0]
        return BlockSearchResult(
            layerwise=layerwise_results, block=None, loss=result.loss, layerwise_loss=result.loss,
            search_loss=result.loss, search_batches=len(indices),
        )
    if fp_targets is not None:
        block_target = list(fp_targets[-1])
    else:
        with quantized(False):
            block_target = _run(list(layers), q_inputs, keep)
    all_vars = [v for layer_vars in variables for v in layer_vars]
    var_layers = [j for j, layer_vars in enumerate(variables) for _ in layer_vars]
    full_objective = make_objective(list(layers), [q_inputs[i] for i in pool], [block_target[i] for i in pool], pool)
    with quantized(True):
        if init != "layerwise":  # from candidate 0 = min/max ("lp_norm": its former name)
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
