"""Q-VLM block objective (Eq. 2-3): the error of a block's output against its target.

Paper (Sec. 3.2-3.3, Eq. 3): inside block ``B_i`` (last layer ``L_i``) the quantization ranges are
searched to minimise the block-output error against the full-precision path::

    min_{Q_k, k in B_i} || W_q^(L_i) X_q^(L_i) - W_r^(L_i) X_r^(L_i) ||^2

(Eq. 2 is the same for one layer.) Here that error is the mean squared error over the calibration
batches (:func:`block_mse_objective`, the plain reference; :class:`BlockObjective`, the same value
with exact shortcuts for the coordinate descent of :mod:`~qvlm_modifiers.qvlm.block_search`).

Three opt-in per-token weightings, not in the paper (``QVLMModifier.block_objective`` and
``vision_token_weight``), multiply each token's squared error:

* ``"token_relative_mse"`` (:func:`token_error_weights`): every token's error relative to its FP
  target's squared norm, so that one attention-sink token with a huge hidden state does not decide
  the whole search;
* ``"mse_skip_first"``: Eq. 3 with token position 0 (the attention sink) left out;
* modality weights (:func:`modality_token_weights`, :func:`calibration_token_weights`): image-token
  errors weigh ``vision_weight``, text tokens 1 (MBQ's observation applied to Q-VLM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch

from qvlm_modifiers.errors import CalibrationDataError
from qvlm_modifiers.modality import VISION

if TYPE_CHECKING:
    from qvlm_modifiers.qvlm.block_search import RangeVariable

__all__ = [
    "LayerFn",
    "BlockObjectiveKind",
    "token_error_weights",
    "combined_token_weights",
    "modality_token_weights",
    "calibration_token_weights",
    "batch_squared_errors",
    "subset_loss",
    "block_mse_objective",
    "LinearOutputReplay",
    "BlockObjective",
]

LayerFn = Callable[[torch.Tensor, int], torch.Tensor]  # (hidden states, batch index) -> hidden states

BlockObjectiveKind = Literal["mse", "token_relative_mse", "mse_skip_first"]


def token_error_weights(target: torch.Tensor, kind: BlockObjectiveKind) -> torch.Tensor | None:
    """Per-token weights of the squared error (``None`` = plain MSE, Eq. 3).

    ``"token_relative_mse"`` weighs token ``t`` by ``d / ||y_t||^2`` (d = hidden size), so the
    objective becomes the mean over tokens of ``||out_t - y_t||^2 / ||y_t||^2``: every token counts
    alike (the denominator floored at 1e-6 of the mean token's, so a zero output stays finite). Not
    in the paper: with plain MSE an LLM's massive activations (one attention-sink token whose hidden
    state is 100x the others', >99% of the squared norm in SmolLM2's later layers) decide the whole
    search."""
    if kind == "mse":
        return None
    if kind == "mse_skip_first":
        # Eq. 3 without token position 0 (the attention sink; issue #24: >99% of the residual
        # stream's squared error from the middle layers on); a target without a token axis keeps all
        weight = torch.ones(target.shape[:-1] + (1,), dtype=torch.float32, device=target.device)
        if target.dim() >= 3 and target.shape[-2] > 1:
            weight[..., 0, :] = 0.0
        return weight
    if kind != "token_relative_mse":
        raise ValueError(f"block objective must be 'mse', 'token_relative_mse' or 'mse_skip_first', got {kind!r}")
    y = target.float()
    norms = y.pow(2).sum(dim=-1, keepdim=True)
    # a token whose FP output is (near) zero would get an infinite weight (0 * inf = NaN for an exact
    # match): floor the denominator at 1e-6 of the mean token's squared norm (and at 1e-12 absolute)
    floor = (norms.mean() * 1e-6).clamp_min(1e-12)
    return y.shape[-1] / torch.maximum(norms, floor)


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


def calibration_token_weights(
    masks: Sequence[torch.Tensor | None], hidden: Sequence[torch.Tensor], vision_weight: float
) -> list[torch.Tensor]:
    """:func:`modality_token_weights` of every calibration batch, from llm-compressor's
    ``state.loss_masks`` (one per batch) and the block inputs ``hidden`` (one per batch, for the
    token counts). Refuses, with what to do, masks that cannot carry modality labels: missing ones,
    none marking an image token (e.g. llm-compressor's answer-only 0/1 masks: the weight would do
    nothing), or a token count that does not match the batch's hidden state."""
    masks = list(masks)
    if len(masks) != len(hidden) or any(m is None for m in masks):
        raise CalibrationDataError(
            f"QVLMModifier: vision_token_weight={vision_weight} needs a per-token modality "
            f"label (loss_mask) for each of the {len(hidden)} calibration batches; got "
            f"{sum(m is not None for m in masks)}. Build the rows with qvlm_modifiers.data."
            "build_calibration_dataset and run qvlm_modifiers.oneshot (or pass use_loss_mask=True to "
            "llmcompressor.oneshot), or set vision_token_weight: 1.0."
        )
    if not any(bool((torch.as_tensor(m) == VISION).any()) for m in masks):
        raise CalibrationDataError(
            f"QVLMModifier: vision_token_weight={vision_weight} weighs image tokens, but no "
            "calibration loss_mask marks any (value 2): the masks are not modality labels (e.g. "
            "llm-compressor's answer-only 0/1 masks) or the rows have no image. Build the rows with "
            "qvlm_modifiers.data.build_calibration_dataset, or set vision_token_weight: 1.0."
        )
    weights = []
    for index, (mask, h) in enumerate(zip(masks, hidden)):
        if torch.as_tensor(mask).numel() != h.shape[:-1].numel():
            raise CalibrationDataError(
                f"QVLMModifier: calibration batch {index} has a loss_mask of {torch.as_tensor(mask).numel()} "
                f"tokens for a hidden state of {h.shape[:-1].numel()}; every row's loss_mask must "
                "label each token of that row (qvlm_modifiers.data.build_calibration_dataset does)."
            )
        weights.append(modality_token_weights(mask, h.shape, vision_weight))
    return weights


def _squared_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> float:
    err = (out.float() - target.to(out.device).float()).pow(2)
    if weight is not None:
        err = err * weight.to(err.device)
    return err.sum().item()


def batch_squared_errors(
    outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kind: BlockObjectiveKind = "mse",
    token_weights: Sequence[torch.Tensor | None] | None = None,
) -> list[tuple[float, int]]:
    """Per batch, ``(weighted squared error sum, number of target elements)`` of ``outputs`` against
    ``targets``: the terms of :func:`block_mse_objective` (Eq. 3), so that the objective of any
    subset of batches is ``sum(errors) / sum(counts)`` (:func:`subset_loss`)."""
    extra = list(token_weights) if token_weights is not None else [None] * len(targets)
    if len(outputs) != len(targets) or len(extra) != len(targets):
        raise ValueError("one output (and token weight) per target batch is required")
    return [
        (_squared_error(out, y, combined_token_weights(y, kind, w)), y.numel())
        for out, y, w in zip(outputs, targets, extra)
    ]


def subset_loss(errors: Sequence[tuple[float, int]], batches: Sequence[int] | None = None) -> float:
    """The objective (Eq. 3's mean) over ``batches`` (all when ``None``) of :func:`batch_squared_errors`."""
    chosen = [errors[b] for b in batches] if batches is not None else list(errors)
    return sum(e for e, _ in chosen) / max(sum(n for _, n in chosen), 1)


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


class LinearOutputReplay:
    """Exact shortcut inside a decoder layer for :class:`BlockObjective`: while the candidates of the
    range of one Linear ``L`` are tried, every module wrapped by
    :func:`~qvlm_modifiers.qvlm.cached_forward.replay_linear_outputs` that runs *before* ``L`` in
    the same batch's forward gets exactly the same input each time (nothing upstream of ``L``
    changes), so its output is computed on the first candidate and replayed afterwards. Only what
    follows ``L`` runs again (the layer's norms / attention arithmetic still run; their Linears,
    most of the FLOPs, do not). Bit-identical outputs; memory: the replayed outputs of the search
    batches, for one focus at a time, on the execution device.

    :class:`BlockObjective` drives it: :meth:`begin` at a call with the focused variable's module
    (the cache is dropped whenever the focus key changes), :meth:`start_batch` per batch,
    :meth:`end` after the call (the wrappers then run plainly)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._key: object = None
        self._target: object = None
        self._batch: int | None = None
        self._target_seen = False
        self.active = False
        self.hits = 0

    def begin(self, key: object, target: object) -> None:
        if key != self._key:
            self._cache.clear()
            self._key = key
        self._target, self.active = target, True

    def start_batch(self, batch_index: int) -> None:
        self._batch, self._target_seen = batch_index, False

    def end(self) -> None:
        self.active, self._batch = False, None

    def clear(self) -> None:
        self._cache.clear()
        self._key = None

    def call(self, module: object, forward: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """``forward(*args, **kwargs)`` of a wrapped module, or its replayed output."""
        if not self.active or self._batch is None or self._target_seen:
            return forward(*args, **kwargs)
        if module is self._target:
            self._target_seen = True
            return forward(*args, **kwargs)
        key = (self._batch, id(module))
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = forward(*args, **kwargs)
        else:
            self.hits += 1
        return out


class BlockObjective:
    """Eq. 3's objective (the same value as :func:`block_mse_objective`, same summation order)
    with two exact shortcuts for :func:`~qvlm_modifiers.qvlm.block_search.coordinate_descent`:

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
    :param replay: third shortcut, inside the focused variable's layer (:class:`LinearOutputReplay`;
        needs the variables' ``module``)
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
        replay: LinearOutputReplay | None = None,
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
        self.replay = replay
        self._replay_target: object = None  # module of the focused variable
        self._focus_serial = 0

    def _state_before(self, layer_index: int) -> tuple[int, ...]:
        return tuple(v.current for v, j in zip(self.variables, self.variable_layers) if j < layer_index)

    def focus(self, variable_index: int | None) -> None:
        """Prepare for trying the candidates of ``variables[variable_index]`` (``None``: the whole
        block). Every variable must be applied at its ``current`` candidate."""
        self._focus_serial += 1
        self._replay_target = None
        if variable_index is None or self.variables is None:
            self._start = 0
            return
        self._replay_target = getattr(self.variables[variable_index], "module", None)
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
        replay = self.replay if self._replay_target is not None else None
        if replay is not None:  # the same focus = the same upstream outputs: the key of the cache
            replay.begin((id(self), self._focus_serial), self._replay_target)
        try:
            for x, y, w, b in zip(hidden, self.targets, self.weights, self.batch_indices):
                if replay is not None:
                    replay.start_batch(b)
                out = x
                for layer in run:
                    out = layer(out, b)
                total += _squared_error(out, y, w)
                if total / self.count >= bound:
                    return total / self.count  # a lower bound of the loss, >= bound: rejected
            return total / self.count
        finally:
            if replay is not None:
                replay.end()
