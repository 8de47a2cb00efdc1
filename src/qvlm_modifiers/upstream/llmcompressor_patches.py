"""llm-compressor internals: reload-safe saves from its ``oneshot``, AWQ's caches on CPU-only torch,
AWQ's private distributed sum, GPTQ's private helpers. Applied through
:func:`qvlm_modifiers.upstream.install` or imported by our Modifiers from :mod:`qvlm_modifiers.upstream`."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import wraps
from typing import Any, NamedTuple

import torch
from llmcompressor.pipelines.cache import IntermediatesCache
from torch import nn


# =========================================================================== 3. reload-safe saves from llm-compressor's oneshot
def wrap_model_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (this instance only) fix the config after saving.

    Expects llm-compressor's per-instance wrapper to be installed already (it is, inside
    ``oneshot``); wraps whatever ``model.save_pretrained`` currently is. Idempotent.
    """
    inner = model.save_pretrained
    if getattr(inner, "_qvlm_config_fix", False):
        return
    model_ref = weakref.ref(model)

    @wraps(inner)
    def save_pretrained_with_config_fix(save_directory, *args, **kwargs):
        result = inner(save_directory, *args, **kwargs)
        from compressed_tensors.distributed import is_source_process

        target = model_ref()
        if target is not None and is_source_process():
            from qvlm_modifiers.save import fix_saved_config

            fix_saved_config(save_directory, target)
        return result

    save_pretrained_with_config_fix._overridden = True  # llm-compressor: already wrapped
    save_pretrained_with_config_fix._qvlm_config_fix = True
    model.save_pretrained = save_pretrained_with_config_fix


_ORIGINAL_MODIFY_SAVE_PRETRAINED = None


def install_oneshot_save_hook() -> None:
    """Make llm-compressor's ``oneshot`` write checkpoints that reload exactly (idempotent).

    Rebinds ``llmcompressor.entrypoints.utils.modify_save_pretrained`` (the name its
    ``pre_process`` calls) to a function that runs the original and then :func:`wrap_model_save`
    on the same model instance. See the module docstring for the scope.
    """
    global _ORIGINAL_MODIFY_SAVE_PRETRAINED
    import llmcompressor.entrypoints.utils as lc_entry_utils

    current = lc_entry_utils.modify_save_pretrained
    if getattr(current, "_qvlm_hook", False):
        return
    original = current

    @wraps(original)
    def modify_save_pretrained(model):
        original(model)
        wrap_model_save(model)

    modify_save_pretrained._qvlm_hook = True
    _ORIGINAL_MODIFY_SAVE_PRETRAINED = original
    lc_entry_utils.modify_save_pretrained = modify_save_pretrained


def uninstall_oneshot_save_hook() -> None:
    """Undo :func:`install_oneshot_save_hook` (for tests that need upstream's behaviour)."""
    global _ORIGINAL_MODIFY_SAVE_PRETRAINED
    import llmcompressor.entrypoints.utils as lc_entry_utils

    if _ORIGINAL_MODIFY_SAVE_PRETRAINED is not None:
        lc_entry_utils.modify_save_pretrained = _ORIGINAL_MODIFY_SAVE_PRETRAINED
        _ORIGINAL_MODIFY_SAVE_PRETRAINED = None


# =========================================================================== 5-6. AWQ internals
def accelerator_available() -> bool:
    """Whether this PyTorch build can pin memory (an accelerator is present)."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


class PinSafeIntermediatesCache(IntermediatesCache):
    """``IntermediatesCache`` whose ``pin_memory`` is a no-op without an accelerator."""

    def pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
        if not accelerator_available():
            return
        super().pin_memory(batch_index, input_names)


def make_caches_pin_safe(caches: dict[Any, IntermediatesCache]) -> None:
    """Switch every cache in ``caches`` (in place, same objects) to :class:`PinSafeIntermediatesCache`."""
    for cache in caches.values():
        if isinstance(cache, IntermediatesCache) and not isinstance(cache, PinSafeIntermediatesCache):
            cache.__class__ = PinSafeIntermediatesCache


class CPUSafeAWQMixin:
    """Mixin for ``AWQModifier`` subclasses: their activation caches never pin memory on CPU-only
    PyTorch. Put it before ``AWQModifier`` in the bases. Adds no recipe fields."""

    def _setup_activation_cache_hooks(self, *args, **kwargs):
        result = super()._setup_activation_cache_hooks(*args, **kwargs)
        make_caches_pin_safe(self._parent_args_cache)
        return result

    def _apply_smoothing(self, *args, **kwargs):
        make_caches_pin_safe(self._parent_args_cache)
        return super()._apply_smoothing(*args, **kwargs)


def allreduce_data_sum(tensors):
    """llm-compressor AWQ's private distributed sum of ``[sum, count]`` statistics (one import site)."""
    from llmcompressor.modifiers.transform.awq.base import _allreduce_data_sum

    return _allreduce_data_sum(tensors)


# =========================================================================== 7b. GPTQ internals (Q-VLM's GPTQ rounding)
class GPTQInternals(NamedTuple):
    """llm-compressor GPTQ's private helpers (:func:`gptq_internals`)."""

    quantize_weight: Callable
    accumulate_hessian: Callable
    make_empty_hessian: Callable
    batch_key: Callable


def gptq_internals() -> GPTQInternals:
    """llm-compressor GPTQ's private helpers, for GPTQ rounding inside Q-VLM's ranges
    (:mod:`qvlm_modifiers.qvlm.gptq_rounding`).

    Depends on ``llmcompressor.modifiers.gptq.helpers.make_empty_hessian(module)`` (a zero
    ``(in_features, in_features)`` float32 Hessian), ``accumulate_hessian(inp, module, H, n)``
    (adds ``2 X X^T`` of one input batch to ``H`` and its sample count to ``n``, returns
    ``(H, n)``; the caller divides), ``batch_key(module)`` (what GPTQModifier's batches share:
    weight shape, dtype, execution device, weight quantization args; ``None``: run alone) and
    ``gptq_quantize.quantize_weight(weights, hessians, scale, zero_point, global_scale, quant_args,
    blocksize, percdamp)`` on tensors with a leading batch dimension (returns the dequantized GPTQ
    weights, the losses and RTN-fallback flags)."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, batch_key, make_empty_hessian

    return GPTQInternals(quantize_weight, accumulate_hessian, make_empty_hessian, batch_key)
