"""How a block's quantized Linears run while Q-VLM searches their ranges (Eq. 2-3).

The search evaluates the block objective once per candidate range, i.e. thousands of block
forwards with the quantization in the loop. Three switches for those forwards:

* :func:`quantization_enabled`: compressed-tensors' fake quantization on or off for some modules
  (off for the FP path ``W_r X_r`` of Eq. 3, on for the quantized path ``W_q X_q``);
* :func:`replay_linear_outputs`: while one Linear's candidates are tried, the Linears run before it
  in its layer replay their outputs (:class:`~qvlm_modifiers.qvlm.objective.LinearOutputReplay`);
* :func:`cached_weight_forward`: a quantized Linear fake-quantizes its weight once per *candidate*
  instead of once per forward call. compressed-tensors' quantized forward re-quantizes the weight
  on every call, although within one candidate the weight and its range do not change. The range
  variable of the weight (:mod:`~qvlm_modifiers.qvlm.range_variables`) stamps the module with the
  key of its current candidate (:data:`WEIGHT_KEY_ATTR`); the cache holds one fake-quantized weight
  per module for that key. Outputs are bit-identical to the uncached forward: the input QDQ
  (dynamic or static) is computed per call as before, and the cached weight is what
  ``forward_quantize`` returns for the same weight and qparams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from qvlm_modifiers.upstream import patch_quantized_forward

__all__ = ["WEIGHT_KEY_ATTR", "FQ_WEIGHT_ATTR", "quantization_enabled", "cached_weight_forward", "replay_linear_outputs"]

# module.__dict__ keys: the current weight candidate's key (set by the weight range variable's
# ``apply``) and the cached ``(key, fake-quantized weight)``; both removed when the search ends
WEIGHT_KEY_ATTR = "_qvlm_weight_key"
FQ_WEIGHT_ATTR = "_qvlm_fq_weight"


@contextlib.contextmanager
def quantization_enabled(modules: Iterable[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """compressed-tensors' ``quantization_enabled`` flag of ``modules`` set to ``enabled`` inside,
    restored to each module's previous value on exit."""
    modules = list(modules)
    previous = [getattr(m, "quantization_enabled", True) for m in modules]
    try:
        for m in modules:
            m.quantization_enabled = enabled
        yield
    finally:
        for m, value in zip(modules, previous):
            m.quantization_enabled = value


@contextlib.contextmanager
def cached_weight_forward(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside, every ``torch.nn.Linear`` of ``modules`` runs :func:`qvlm_modifiers.upstream.patch_quantized_forward`'s
    forward: fake-quantized weight taken from a one-entry cache keyed by the weight range
    variable's current candidate. Everything is restored on exit (forward, cache, key)."""
    saved = []
    try:
        for m in modules:
            if isinstance(m, torch.nn.Linear):
                saved.append(patch_quantized_forward(m, WEIGHT_KEY_ATTR, FQ_WEIGHT_ATTR))
        yield
    finally:
        for m, slot, previous in saved:
            if previous is None:
                m.__dict__.pop(slot, None)
            else:
                m.__dict__[slot] = previous
            m.__dict__.pop(FQ_WEIGHT_ATTR, None)
            m.__dict__.pop(WEIGHT_KEY_ATTR, None)


@contextlib.contextmanager
def replay_linear_outputs(modules: Iterable[torch.nn.Module], replay) -> Iterator[None]:
    """Inside, every ``torch.nn.Linear`` of ``modules`` runs through ``replay.call``
    (:class:`~qvlm_modifiers.qvlm.objective.LinearOutputReplay`): its current forward (the quantized
    / cached one included) or its replayed output. Forwards restored and the replay cache dropped on
    exit."""
    saved = []
    try:
        for m in modules:
            if isinstance(m, torch.nn.Linear):
                previous = m.__dict__.get("forward")
                inner = m.forward

                def forward(*args, _m=m, _inner=inner, **kwargs):
                    return replay.call(_m, _inner, *args, **kwargs)

                m.forward = forward
                saved.append((m, previous))
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
        replay.clear()
