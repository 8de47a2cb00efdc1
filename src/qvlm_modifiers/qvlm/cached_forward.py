"""How a block's quantized Linears run while Q-VLM searches their ranges (Eq. 2-3).

The search evaluates the block objective once per candidate range, i.e. thousands of block
forwards with the quantization in the loop. Two switches for those forwards:

* :func:`quantization_enabled`: compressed-tensors' fake quantization on or off for some modules
  (off for the FP path ``W_r X_r`` of Eq. 3, on for the quantized path ``W_q X_q``);
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

__all__ = ["WEIGHT_KEY_ATTR", "FQ_WEIGHT_ATTR", "quantization_enabled", "cached_weight_forward"]

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
    """Inside, every ``torch.nn.Linear`` of ``modules`` runs :func:`_patch_quantized_forward`'s
    forward: fake-quantized weight taken from a one-entry cache keyed by the weight range
    variable's current candidate. Everything is restored on exit (forward, cache, key)."""
    saved = []
    try:
        for m in modules:
            if isinstance(m, torch.nn.Linear):
                saved.append(_patch_quantized_forward(m))
        yield
    finally:
        for m, slot, previous in saved:
            if previous is None:
                m.__dict__.pop(slot, None)
            else:
                m.__dict__[slot] = previous
            m.__dict__.pop(FQ_WEIGHT_ATTR, None)
            m.__dict__.pop(WEIGHT_KEY_ATTR, None)


def _patch_quantized_forward(module: torch.nn.Module) -> tuple[torch.nn.Module, str, object]:
    """UPSTREAM PATCH (compressed-tensors): replace ``module``'s forward by compressed-tensors'
    quantized forward with a cached weight QDQ; returns ``(module, slot, previous)`` to restore.

    Depends on these compressed-tensors behaviours (checked against the pinned version):

    * ``quantization.lifecycle.forward.set_forward_quantized`` makes a quantized Linear's
      ``forward`` QDQ the input (``forward_quantize(module, x, "input", args)``) and the weight
      (``forward_quantize(module, weight.data, "weight", args)``, skipped from status
      ``COMPRESSED`` on), both skipped when ``module.quantization_enabled`` is false, then call
      ``module.__class__.forward`` with the QDQ weight swapped in via ``patch_attr(weight, "data",
      ...)``. The replacement below does the same with the weight QDQ cached; what it does not
      handle (output activations, no weight scheme, no candidate key) falls through to the original;
    * ``offload.module.offload_module`` wraps ``forward`` (moving the inputs to the onload device)
      around ``module._original_forward_func(self, *args)`` (an instance attribute): the patch goes
      inside that wrapper when present, so onloading still happens.
    """
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.utils import patch_attr

    def make(original):
        def forward(input: torch.Tensor) -> torch.Tensor:
            scheme = getattr(module, "quantization_scheme", None)
            status = getattr(module, "quantization_status", None)
            key = getattr(module, WEIGHT_KEY_ATTR, None)
            if (
                not getattr(module, "quantization_enabled", True) or scheme is None or scheme.weights is None
                or status is None or status >= QuantizationStatus.COMPRESSED or key is None
                or scheme.output_activations is not None
            ):
                return original(input)
            weight = module.weight
            if scheme.input_activations:
                input = forward_quantize(module, input, "input", scheme.input_activations)
            cached = module.__dict__.get(FQ_WEIGHT_ATTR)
            if cached is None or cached[0] != key or cached[1].device != weight.device:
                cached = (key, forward_quantize(module, weight.data, "weight", scheme.weights))
                module.__dict__[FQ_WEIGHT_ATTR] = cached
            with patch_attr(weight, "data", cached[1]):
                return module.__class__.forward(module, input)

        return forward

    slot = "_original_forward_func" if "_original_forward_func" in module.__dict__ else "forward"
    previous = module.__dict__.get(slot)
    if slot == "forward":
        module.forward = make(module.forward)
    else:
        inner = make(lambda x, _f=previous, _m=module: _f(_m, x))
        module.__dict__[slot] = lambda _self, x, _inner=inner: _inner(x)
    return module, slot, previous
