"""compressed-tensors internals: the quantized forward Q-VLM's search runs with a cached weight QDQ."""

from __future__ import annotations

import torch
from torch import nn


# =========================================================================== 7. Q-VLM's search: compressed-tensors forward, GPTQ internals
def patch_quantized_forward(module: nn.Module, key_attr: str, cache_attr: str) -> tuple[nn.Module, str, object]:
    """Replace ``module``'s forward by compressed-tensors' quantized forward with a cached weight QDQ
    (Q-VLM's search, :mod:`qvlm_modifiers.qvlm.cached_forward`); returns ``(module, slot, previous)``
    for the caller to restore. The cache is ``module.__dict__[cache_attr] = (key, weight QDQ)``, valid
    while ``module.__dict__[key_attr]`` (the current candidate's key) is unchanged.

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
            key = getattr(module, key_attr, None)
            if (
                not getattr(module, "quantization_enabled", True) or scheme is None or scheme.weights is None
                or status is None or status >= QuantizationStatus.COMPRESSED or key is None
                or scheme.output_activations is not None
            ):
                return original(input)
            weight = module.weight
            if scheme.input_activations:
                input = forward_quantize(module, input, "input", scheme.input_activations)
            cached = module.__dict__.get(cache_attr)
            if cached is None or cached[0] != key or cached[1].device != weight.device:
                cached = (key, forward_quantize(module, weight.data, "weight", scheme.weights))
                module.__dict__[cache_attr] = cached
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
