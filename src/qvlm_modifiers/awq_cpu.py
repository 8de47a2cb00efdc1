"""Run llm-compressor's AWQModifier (and subclasses) on CPU-only PyTorch, without global patches.

The problem: ``AWQModifier._apply_smoothing`` pins the cached parent-module kwargs before its grid
search (``IntermediatesCache.pin_memory`` -> ``Tensor.pin_memory()``), and on a PyTorch build
without an accelerator ``pin_memory()`` raises ``RuntimeError: Cannot access accelerator device
when none is available``. No recipe setting avoids it (``offload_device`` only changes where the
cache lives; the pinning is unconditional).

The fix, per Modifier instance: :class:`PinSafeIntermediatesCache` is an ``IntermediatesCache``
whose ``pin_memory`` does nothing when no accelerator is available (pinning is only an H2D copy
speed-up, so skipping it changes no numbers) and pins as usual otherwise. :class:`CPUSafeAWQMixin`
switches the Modifier's own caches (``self._parent_args_cache``) to that class right after
AWQ creates them and again before smoothing, so it also covers subclasses that replace either
step. Nothing outside the Modifier instance is touched.

Usage (any AWQModifier subclass, e.g. the MBQ Modifier)::

    from llmcompressor.modifiers.transform.awq import AWQModifier
    from qvlm_modifiers.awq_cpu import CPUSafeAWQMixin

    class MyAWQ(CPUSafeAWQMixin, AWQModifier):   # the mixin must come first
        ...

or call :func:`make_caches_pin_safe` on the ``_parent_args_cache`` dict yourself.
"""

from __future__ import annotations

from typing import Any

import torch
from llmcompressor.pipelines.cache import IntermediatesCache

__all__ = ["accelerator_available", "PinSafeIntermediatesCache", "make_caches_pin_safe", "CPUSafeAWQMixin"]


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
