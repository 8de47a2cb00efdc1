"""GPTQ inside Q-VLM's ranges (``QVLMModifier.gptq_rounding``; not in the paper).

Q-VLM (Eq. 2-3) chooses each Linear's quantization *range* (scale / zero-point) and rounds to
nearest inside it. GPTQ (Frantar et al., 2022, Alg. 1) instead chooses the *integers* column by
column, compensating each column's rounding error on the columns not yet quantized with the inverse
Hessian ``H = 2 X X^T / n`` of the layer's inputs (GPTQ Eq. 2-3). :func:`gptq_quantize_layers` runs
llm-compressor's GPTQ (``quantize_weight``, through :func:`qvlm_modifiers.upstream.gptq_internals`)
with the scale / zero-point fixed to the Linears' current qparams, in llm-compressor
``GPTQModifier``'s order and on its inputs, so that with min/max qparams it gives GPTQModifier's
weights (``tests/test_qvlm_gptq_rounding.py``):

* decoder layer by decoder layer; layer ``j``'s Hessians from its Linears' inputs when the layer
  runs in full precision (GPTQModifier calibrates under ``DisableQuantization``) on the block input
  of the quantized path through the block's layers ``< j``, already GPTQ-quantized;
* act-order ``"static"`` (= ``"weight"``, GPTQModifier's default): columns processed by decreasing
  Hessian diagonal, groups (qparams) kept in the original column order;
* GPTQModifier's ``block_size`` 128 and ``dampening_frac`` 0.01.

The Modifier runs it with the searched ranges and with min/max and keeps the better on held-out
calibration rows (:mod:`.guard`); :func:`gptq_quantize_states` runs both states in one pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from compressed_tensors.quantization import ActivationOrdering

from qvlm_modifiers.qvlm.block_search import RangeVariable
from qvlm_modifiers.qvlm.cached_forward import WEIGHT_KEY_ATTR, cached_weight_forward
from qvlm_modifiers.qvlm.objective import LayerFn
from qvlm_modifiers.upstream import gptq_internals

__all__ = [
    "GPTQ_BLOCKSIZE", "GPTQ_PERCDAMP", "gptq_quantize_layers", "gptq_quantize_states", "GPTQStatesResult",
    "StateSettings", "PipelineHessians", "HessianSums",
]

# llm-compressor's GPTQModifier defaults (block_size, dampening_frac)
GPTQ_BLOCKSIZE = 128
GPTQ_PERCDAMP = 0.01


@torch.no_grad()
def gptq_quantize_layers(
    layer_linears: Sequence[Sequence[torch.nn.Module]],
    layers: Sequence[LayerFn],
    quantized: Callable[[int, bool], contextlib.AbstractContextManager],
    q_inputs: Sequence[torch.Tensor],
    actorder: bool = True,
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    blocksize: int = GPTQ_BLOCKSIZE,
    percdamp: float = GPTQ_PERCDAMP,
) -> list[torch.Tensor]:
    """GPTQ's integers inside the current qparams of every weight-quantized Linear of the block,
    layer by layer (module docstring). Each Linear's ``weight`` is overwritten in place with the
    dequantized GPTQ result (on the grid of its unchanged ``weight_scale`` / ``weight_zero_point``).

    :param layer_linears: per layer of the block, its quantized Linears (full-precision weights)
    :param layers: the block's layers ``(hidden, batch_index) -> hidden``
    :param quantized: ``quantized(j, enabled)``: a context in which layer ``j`` runs fake-quantized
        (``True``) or in full precision (``False``)
    :param q_inputs: per calibration batch, the block input on the quantized path
    :param actorder: act-order ``"static"`` (GPTQModifier's default); ``False``: natural order
    :returns: per batch, the block output on the quantized path after GPTQ
    """
    result = gptq_quantize_states(
        layer_linears, layers, quantized, q_inputs, [[[] for _ in layers]],
        actorder=actorder, keep=keep, blocksize=blocksize, percdamp=percdamp,
    )
    return result.outputs[0]


# per layer of the block: (range variable, candidate indices); one index = that candidate, several =
# a weight variable whose candidate GPTQ chooses (the lowest GPTQ error of its Linear)
StateSettings = Sequence[Sequence[tuple[RangeVariable, Sequence[int]]]]


@dataclass
class GPTQStatesResult:
    """Per state: the block output per batch on the quantized path (``outputs``), the GPTQ weight of
    each Linear (``weights``, ``id(module)`` -> tensor) and the candidate each variable ended on
    (``choices``, variable name -> index)."""

    outputs: list[list[torch.Tensor | None]]
    weights: list[dict[int, torch.Tensor]]
    choices: list[dict[str, int]]
    # what complete() needs: (run, last layer index, per state its last-layer settings, the last
    # layer's quantized Linears, per state the last layer's inputs)
    _last: tuple | None = field(default=None, repr=False)

    def complete(self, s: int, batches: Sequence[int] | None = None) -> list[torch.Tensor | None]:
        """State ``s``'s outputs on every batch (or on ``batches`` only): runs the batches that
        ``last_layer_batches`` left out, with the block's last layer set to state ``s``. Fills
        ``outputs[s]`` in place and returns it."""
        out = self.outputs[s]
        wanted = range(len(out)) if batches is None else batches
        missing = [b for b in wanted if out[b] is None]
        if missing:
            run, j, settings, linears, inputs = self._last
            for var, _ in settings[s]:
                var.current = self.choices[s][var.name]
                var.set(var.current)
            for m in linears:
                m.weight.data.copy_(self.weights[s][id(m)])
            done = run(j, linears, ("complete", s), inputs[s], missing)
            for b in missing:
                out[b] = done[b]
        return out


@torch.no_grad()
def gptq_quantize_states(
    layer_linears: Sequence[Sequence[torch.nn.Module]],
    layers: Sequence[LayerFn],
    quantized: Callable[[int, bool], contextlib.AbstractContextManager],
    q_inputs: Sequence[torch.Tensor],
    states: Sequence[StateSettings],
    actorder: bool = True,
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    blocksize: int = GPTQ_BLOCKSIZE,
    percdamp: float = GPTQ_PERCDAMP,
    max_batch: int = 16,
    last_layer_batches: Sequence[int] | None = None,
    first_layer_hessians: Mapping[int, torch.Tensor] | None = None,
) -> GPTQStatesResult:
    """:func:`gptq_quantize_layers` for several range states of the block at once (the guard's
    searched ranges and min/max), each state exactly as if run alone, and with GPTQ in the loop of
    the weight-range choice.

    The states advance layer by layer in lockstep. At layer ``j``, each state's Hessians are taken
    from its own quantized-path input; then every (state, Linear, candidate range) of the layer goes
    through GPTQ, those with the same weight shape and quantization args in *one* batched
    ``quantize_weight`` call (at most ``max_batch`` items). ``quantize_weight`` treats batch items
    independently (own Hessian, scale, zero-point), so batching changes no number; on a CPU, where
    GPTQModifier runs one Linear per call, it saves part of the column loop's per-call overhead
    (four 576 x 576 items: 0.44 s of CPU in one call against 4 x 0.145 s). Where a state
    lists several candidates for a Linear's weight, the Linear keeps the one with the lowest GPTQ
    error (``quantize_weight``'s loss: the Hessian-weighted error ``||(W - Q) X||^2`` its column
    updates leave, on this layer's inputs; ties keep the earlier candidate, min/max first), and that
    state's layer then runs with it.

    :param states: per state, per layer, the range variables to set (:data:`StateSettings`); a
        weight-quantized Linear without a variable keeps its current qparams
    :param last_layer_batches: at the block's last layer, run each state only on these batches
        (e.g. the guard's held-out rows; ``None`` entries in ``outputs`` elsewhere): the states are
        compared there, and only the kept one needs every row (``result.complete(s)``)
    :param first_layer_hessians: the normalized Hessians (``id(module)`` -> tensor) of the first
        layer's Linears on ``q_inputs`` in full precision, when the caller already has them
        (:class:`PipelineHessians`); computed here otherwise
    :returns: :class:`GPTQStatesResult`. The Linears are left holding the last state's weights and
        qparams; the caller applies the state it keeps
    """
    if any(len(state) != len(layers) for state in states) or len(layer_linears) != len(layers):
        raise ValueError("one list of Linears and, per state, one list of settings per layer are required")
    if not states:
        raise ValueError("at least one state is required")
    quantize_weight, accumulate_hessian, make_empty_hessian, batch_key = gptq_internals()
    # a state's *path* names its quantized-path input: the choices made so far. States on the same path
    # share their Hessians, their GPTQ runs and their layer outputs (e.g. at a block's first layer, or
    # while the searched state keeps min/max), which are then computed once.
    paths: list[tuple] = [() for _ in states]
    inputs: dict[tuple, list[torch.Tensor]] = {(): list(q_inputs)}
    result = GPTQStatesResult(outputs=[], weights=[{} for _ in states], choices=[{} for _ in states])
    order = ActivationOrdering.WEIGHT if actorder else None
    num_batches = len(q_inputs)

    def run(j: int, linears: list, tag: tuple, hidden: Sequence[torch.Tensor], batches) -> dict[int, torch.Tensor]:
        """Layer ``j`` fake-quantized on ``batches`` of ``hidden``, each GPTQ weight fake-quantized
        once for all of them (bit-identical to once per forward call, :func:`cached_weight_forward`;
        ``tag`` keys the cache inside this call only)."""
        with quantized(j, True), cached_weight_forward(linears):
            for m in linears:
                m.__dict__[WEIGHT_KEY_ATTR] = ("gptq", tag)
            return {b: keep(layers[j](hidden[b], b)) for b in batches}

    last_inputs: list[Sequence[torch.Tensor]] = [q_inputs for _ in states]
    for j, (layer, linears) in enumerate(zip(layers, layer_linears)):
        linears = [m for m in linears if m.quantization_scheme.weights is not None]
        originals = {id(m): m.weight.data.clone() for m in linears}  # still full precision here
        items = {}  # (path, Linear, candidate) -> (module, normalized Hessian, scale, zero-point)
        hessians: dict[tuple, dict[int, torch.Tensor]] = {}
        for s, state in enumerate(states):
            weight_vars = _apply_settings(state[j])
            if j == 0 and first_layer_hessians is not None and all(id(m) in first_layer_hessians for m in linears):
                hessians[()] = {id(m): first_layer_hessians[id(m)] for m in linears}
            if paths[s] not in hessians:
                hessians[paths[s]] = _layer_hessians(layer, linears, inputs[paths[s]], quantized(j, False),
                                                     accumulate_hessian, make_empty_hessian)
            for m in linears:
                var, candidates = weight_vars.get(id(m), (None, [None]))
                for c in candidates:
                    if (paths[s], id(m), c) in items:
                        continue
                    if var is not None:
                        var.set(c)
                    zp = getattr(m, "weight_zero_point", None)
                    zp = zp.data.clone() if zp is not None else torch.zeros_like(m.weight_scale.data)
                    items[(paths[s], id(m), c)] = (m, hessians[paths[s]][id(m)], m.weight_scale.data.clone(), zp)
        del hessians
        gptq: dict[tuple, tuple[torch.Tensor, float]] = {}
        for batch in _batches(list(items.items()), max_batch, batch_key):
            args = batch[0][1][0].quantization_scheme.weights.model_copy(update={"actorder": order})
            quantized_weights, losses, _ = quantize_weight(
                weights=torch.stack([originals[id(m)].float() for _, (m, *_) in batch]),
                hessians=torch.stack([item[1] for _, item in batch]),
                scale=torch.stack([item[2] for _, item in batch]),
                zero_point=torch.stack([item[3] for _, item in batch]),
                global_scale=None,
                quant_args=args,
                blocksize=blocksize,
                percdamp=percdamp,
            )
            for (key, (m, *_)), q, loss in zip(batch, quantized_weights, losses):
                gptq[key] = (q.to(m.weight.dtype), float(loss))
        del items
        outputs: dict[tuple, list[torch.Tensor]] = {}
        for s, state in enumerate(states):
            weight_vars = _apply_settings(state[j])
            for m in linears:
                var, candidates = weight_vars.get(id(m), (None, [None]))
                best = min(candidates, key=lambda c: gptq[(paths[s], id(m), c)][1])  # first of equals: min/max
                if var is not None:
                    var.current = best
                    var.set(best)
                weight = gptq[(paths[s], id(m), best)][0]
                m.weight.data.copy_(weight)
                result.weights[s][id(m)] = weight
            for var, _ in state[j]:
                result.choices[s][var.name] = var.current
            path = paths[s] + (tuple(sorted((var.name, var.current) for var, _ in state[j])),)
            batches = range(num_batches)
            if j == len(layers) - 1:
                last_inputs[s] = inputs[paths[s]]
                if last_layer_batches is not None:
                    batches = sorted(set(last_layer_batches))
            if path not in outputs:
                done = run(j, linears, path, inputs[paths[s]], batches)
                outputs[path] = [done.get(b) for b in range(num_batches)]
            paths[s] = path
        inputs = outputs
    result.outputs = [inputs[path] for path in paths]  # states on one path share one list

    j = len(layers) - 1
    result._last = (run, j, [state[j] for state in states],
                    [m for m in layer_linears[j] if m.quantization_scheme.weights is not None], last_inputs)
    return result


class PipelineHessians:
    """GPTQ's Hessians of a block's first decoder layer, taken during llm-compressor's own
    calibration pass instead of a pass of our own.

    The sequential pipeline runs each decoder layer in full precision on its propagated inputs
    (``DisableQuantization``) before the Modifier sees it, which is where GPTQModifier takes its
    Hessians. For the first layer of a block these are the Hessians :func:`gptq_quantize_states`
    needs -- *if* the pipeline's input is the block's quantized-path input. So each batch's input
    is compared (``torch.equal``) with the Modifier's own quantized-path input; one mismatch (e.g.
    static activation quantization, which the pipeline's pass does not apply) and :meth:`take`
    returns ``None``, so the Hessians are computed as before. Either way the result is the same.

    Wiring: :meth:`observe` from the decoder layer's forward pre-hook, :meth:`hook` as the forward
    pre-hook of the layer's quantized Linears.
    """

    def __init__(self):
        internals = gptq_internals()
        self._accumulate, self._empty = internals.accumulate_hessian, internals.make_empty_hessian
        self.layer: int | None = None
        self.batches = 0
        self.valid = False
        self._members: set[int] = set()
        self._active = False
        self._sums = HessianSums(self._accumulate, self._empty)

    def observe(self, k: int, batch_index: int, hidden: torch.Tensor, expected: torch.Tensor | None,
                linears: Sequence[torch.nn.Module]) -> None:
        """Decoder layer ``k`` is about to run calibration batch ``batch_index`` on ``hidden``;
        ``expected``: its quantized-path input when ``k`` opens a block, else ``None`` (nothing
        is taken, what was taken for the open block is kept)."""
        if expected is None:
            self._active = False
            return
        if batch_index == 0:
            self.layer, self.batches, self.valid = k, 0, True
            self._sums = HessianSums(self._accumulate, self._empty)
            self._members = {id(m) for m in linears}
        same = self.layer == k and hidden.shape == expected.shape and torch.equal(hidden.to(expected.device), expected)
        self.valid = self.valid and same and batch_index == self.batches
        self._active = self.valid
        if self._active:
            self.batches += 1

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        if self._active and id(module) in self._members:
            self._sums.add(module, args[0])

    def take(self, k: int, num_batches: int) -> dict[int, torch.Tensor] | None:
        """The normalized Hessians of layer ``k``'s Linears if every one of ``num_batches`` batches
        matched, else ``None``; forgets them either way."""
        sums = self._sums
        ok = (self.valid and self.layer == k and self.batches == num_batches and set(sums.modules()) == self._members
              and not sums.diverged)
        self._sums, self.valid, self._active = HessianSums(self._accumulate, self._empty), False, False
        if not ok:
            return None
        return sums.normalized()


def _apply_settings(settings: Sequence[tuple[RangeVariable, Sequence[int]]]) -> dict[int, tuple]:
    """Set each variable of one layer to its candidate (the first listed where GPTQ chooses among
    several); returns the weight variables by ``id`` of their Linear, with their candidates."""
    weight_vars = {}
    for var, candidates in settings:
        candidates = list(candidates)
        if not candidates:
            raise ValueError(f"no candidate given for {var.name}")
        is_weight = var.is_weight
        if len(candidates) > 1 and not is_weight:
            raise ValueError(f"GPTQ can only choose among weight ranges, not among those of {var.name}")
        var.current = candidates[0]
        var.set(candidates[0])
        if is_weight and var.module is not None:
            weight_vars[id(var.module)] = (var, candidates)
    return weight_vars


def _layer_hessians(layer, linears, inputs, full_precision, accumulate_hessian, make_empty_hessian,
                    share: bool = True) -> dict[int, torch.Tensor]:
    """GPTQ's normalized Hessians ``2 X X^T / n`` of each Linear's inputs when ``layer`` runs in
    full precision on ``inputs`` (GPTQModifier calibrates under ``DisableQuantization``). Linears
    reading one tensor share its Hessian (:class:`HessianSums`); should that pattern break within
    the pass, the pass is run again with one accumulator per Linear."""
    sums = HessianSums(accumulate_hessian, make_empty_hessian, share=share)
    handles = [m.register_forward_pre_hook(lambda module, args: sums.add(module, args[0])) for m in linears]
    try:
        with full_precision:
            for b, h in enumerate(inputs):
                layer(h, b)
    finally:
        for handle in handles:
            handle.remove()
    if sums.diverged:
        return _layer_hessians(layer, linears, inputs, full_precision, accumulate_hessian, make_empty_hessian,
                               share=False)
    return sums.normalized()


class HessianSums:
    """Running GPTQ Hessian sums ``(H, n)`` of several Linears, one batch of inputs at a time, with
    llm-compressor's ``accumulate_hessian`` (GPTQModifier's own update).

    A Linear whose input is the very tensor (the same object) that the Linear updated just before it
    was given, in every batch so far, shares that Linear's sums instead of repeating the update: in a
    Llama layer ``q/k/v_proj`` read one normalized hidden state and ``gate/up_proj`` another, so 7
    updates per batch become 4 (about a quarter of the Hessian work: the 1536-wide ``down_proj`` is
    the largest). Same values through the same arithmetic: the shared sums are bit-identical to
    separate ones. A sharing Linear that is later handed another tensor (or out of order) cannot
    take its own history back from the shared sums: :attr:`diverged` is set, and the caller computes
    the Hessians without sharing instead (``share=False``).
    """

    def __init__(self, accumulate_hessian: Callable, make_empty_hessian: Callable, share: bool = True):
        self._accumulate, self._empty, self._share = accumulate_hessian, make_empty_hessian, share
        self._sums: dict[int, list] = {}  # id(module) -> [H, n, batches]; one list for sharing Linears
        self._followers: set[int] = set()  # Linears that joined another's sums
        self._last: tuple[torch.Tensor, int] | None = None  # (input, id(module)) of the latest update
        self.diverged = False

    def add(self, module: torch.nn.Module, x: torch.Tensor) -> None:
        """Add one batch of ``module``'s inputs ``x`` (the tensor the forward pre-hook received)."""
        key = id(module)
        own = self._sums.get(key)
        if self._share and self._last is not None and x is self._last[0]:
            leader = self._sums[self._last[1]]
            # same history so far: new (first batch), or already sharing the leader's sums
            if own is leader or (own is None and leader[2] == 1):
                self._sums[key] = leader
                self._followers.add(key)
                return
        if key in self._followers:
            self.diverged = True
            return
        if own is None:
            own = self._sums[key] = [self._empty(module), torch.zeros(()), 0]
        own[0], own[1] = self._accumulate(x.detach(), module, own[0], own[1])
        own[2] += 1
        self._last = (x, key)

    def modules(self) -> list[int]:
        """The ``id`` of every Linear with sums."""
        return list(self._sums)

    def normalized(self) -> dict[int, torch.Tensor]:
        """The Hessians GPTQ quantizes with, ``H / n`` (``n`` >= 1), by ``id(module)``; sharing
        Linears get one tensor (read-only: ``quantize_weight`` stacks copies)."""
        done: dict[int, torch.Tensor] = {}
        out = {}
        for key, (h, n, _) in self._sums.items():
            if id(h) not in done:
                done[id(h)] = h / n.to(h.device).clamp_min(1)
            out[key] = done[id(h)]
        return out


def _batches(items: list, max_batch: int, batch_key: Callable) -> list[list]:
    """``items`` (``(key, (module, ...))``) grouped as GPTQModifier's ``assign_batches`` groups
    modules: by llm-compressor's ``batch_key`` (same weight shape, dtype, device and quantization
    args; ``None``: alone), at most ``max_batch`` per group, first-seen order."""
    groups: dict[object, list] = {}
    for n, item in enumerate(items):
        key = batch_key(item[1][0])
        groups.setdefault(("alone", n) if key is None else key, []).append(item)
    return [group[i:i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]
