"""Every dependency of this package on upstream internals, in one package, applied by one :func:`install`.

The patches themselves are in :mod:`.transformers_patches`, :mod:`.llmcompressor_patches` and
:mod:`.compressed_tensors_patches`, one module per upstream library; this module guards and applies them.

``import qvlm_modifiers`` calls :func:`install` once. It first checks the installed transformers,
llm-compressor and compressed-tensors against the versions this module was written for
(:data:`SUPPORTED`) and fails loudly, naming the fix, when they differ (set
``QVLM_ALLOW_UNTESTED_UPSTREAM=1`` to downgrade that to a warning). Then it applies, idempotently:

1. **Processor stand-ins** (transformers, only without torchvision): transformers 5.17 hides
   torchvision-free classes behind torchvision placeholders (``BaseVideoProcessor``,
   ``AutoVideoProcessor``, ``Idefics3ImageProcessorPil``), so Qwen2/2.5-VL, LLaVA-OneVision and
   Idefics3 processors could not build or reload on CPU torch (:func:`install_torchvision_free_standins`).
2. **Packed loading** (transformers): ``quant_method: compressed-tensors`` loads through our
   subclass of transformers' ``CompressedTensorsHfQuantizer``. ``register_quantizer`` refuses to
   replace an existing method, so the two registry entries are set directly (:func:`register`).
3. **Reload of llm-compressor's own saves** (llm-compressor): its ``oneshot`` replaces
   ``model.save_pretrained`` per instance through ``llmcompressor.entrypoints.utils.modify_save_pretrained``;
   that one name is rebound so the saved ``config.json`` also gets reload-safe ``ignore`` names
   (:func:`install_oneshot_save_hook`; the names themselves: :mod:`qvlm_modifiers.save`).

Used on demand, not at import:

4. **Weight init of compressed Linears** (transformers): :func:`skip_init_of_compressed_linears`,
   called by the packed quantizer before weights load.
5. **AWQ on CPU-only torch** (llm-compressor): AWQ pins its activation caches unconditionally;
   :class:`CPUSafeAWQMixin` makes an AWQModifier subclass's own caches pin-safe (per instance).
7. **Q-VLM's search forwards** (compressed-tensors, llm-compressor): :func:`patch_quantized_forward`
   caches the weight QDQ per candidate range inside compressed-tensors' quantized forward;
   :func:`gptq_internals` are GPTQ's private Hessian / rounding helpers for GPTQ inside the ranges.
6. **Private llm-compressor names** our Modifiers build on: :data:`PRIVATE_NAMES` lists them,
   :func:`check_private_names` verifies they exist (run by :func:`install`), and
   :func:`allreduce_data_sum` is the one import of AWQ's private distributed sum.

Public extension points are used everywhere else without a patch: ``ModifierFactory.register``,
subclasses of llm-compressor's Modifiers and of transformers' quantizer, torch module hooks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
from typing import Any


from qvlm_modifiers.errors import QVLMError

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED",
    "UpstreamVersionError",
    "check_versions",
    "check_private_names",
    "install",
    "torchvision_available",
    "install_torchvision_free_standins",
    "register",
    "unregister",
    "is_registered",
    "packed_loading",
    "upstream_loading",
    "skip_init_of_compressed_linears",
    "remove_init_placeholders",
    "wrap_model_save",
    "install_oneshot_save_hook",
    "uninstall_oneshot_save_hook",
    "accelerator_available",
    "PinSafeIntermediatesCache",
    "make_caches_pin_safe",
    "CPUSafeAWQMixin",
    "allreduce_data_sum",
    "patch_quantized_forward",
    "gptq_internals",
]

ENV_ALLOW_UNTESTED = "QVLM_ALLOW_UNTESTED_UPSTREAM"

#: distribution -> (lowest supported version, first unsupported version); the pins of pyproject.toml
SUPPORTED: dict[str, tuple[str, str]] = {
    "transformers": ("5.15", "5.18"),
    "llmcompressor": ("0.14.0.1", "0.14.0.2"),
    "compressed-tensors": ("0.19.0", "0.19.1"),
}

#: (module, attribute path) of the upstream internals our code calls, overrides or rebinds
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("llmcompressor.modifiers.transform.awq.base", "_allreduce_data_sum"),
    ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._compute_best_scale"),
    ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._compute_loss"),
    ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._get_grid_search_params"),
    ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._setup_activation_cache_hooks"),
    ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._apply_smoothing"),
    ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._compute_layer_means"),  # MBQ duo_scaling
    ("llmcompressor.pipelines.cache", "IntermediatesCache.pin_memory"),
    ("llmcompressor.entrypoints.utils", "modify_save_pretrained"),
    ("transformers.quantizers.auto", "AUTO_QUANTIZER_MAPPING"),
    ("transformers.quantizers.auto", "AUTO_QUANTIZATION_CONFIG_MAPPING"),
    ("compressed_tensors.quantization.lifecycle.forward", "forward_quantize"),
    ("compressed_tensors.utils", "patch_attr"),
    ("llmcompressor.modifiers.gptq.helpers", "make_empty_hessian"),
    ("llmcompressor.modifiers.gptq.helpers", "accumulate_hessian"),
    ("llmcompressor.modifiers.gptq.helpers", "batch_key"),
    ("llmcompressor.modifiers.gptq.gptq_quantize", "quantize_weight"),
)


class UpstreamVersionError(QVLMError):
    """An installed upstream package is outside the versions this package's integration was written for."""


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", text)[:4])


def check_versions(strict: bool | None = None) -> list[str]:
    """Compare installed versions with :data:`SUPPORTED`; returns the mismatches (empty: all fine).

    ``strict`` (default: unless ``QVLM_ALLOW_UNTESTED_UPSTREAM=1``) raises :class:`UpstreamVersionError`."""
    if strict is None:
        strict = os.environ.get(ENV_ALLOW_UNTESTED, "").strip().lower() not in ("1", "true", "yes", "on")
    problems = []
    for dist, (low, high) in SUPPORTED.items():
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist} is not installed (need >={low},<{high})")
            continue
        if not _version_tuple(low) <= _version_tuple(installed) < _version_tuple(high):
            problems.append(f"{dist} {installed} is installed, this package supports >={low},<{high}")
    if problems and strict:
        pins = " ".join(f'"{d}>={lo},<{hi}"' for d, (lo, hi) in SUPPORTED.items())
        raise UpstreamVersionError(
            "qvlm_modifiers patches upstream internals written for specific versions: "
            + "; ".join(problems)
            + f". Fix: pip install {pins} (or set {ENV_ALLOW_UNTESTED}=1 to run untested, at your own risk)."
        )
    for problem in problems:
        logger.warning(f"qvlm_modifiers: {problem}; running untested ({ENV_ALLOW_UNTESTED}=1)")
    return problems


def check_private_names() -> None:
    """Fail with the fix when an upstream internal this package builds on (:data:`PRIVATE_NAMES`) is gone."""
    for module_name, attr_path in PRIVATE_NAMES:
        obj: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                raise UpstreamVersionError(
                    f"{module_name}.{attr_path} is gone from the installed upstream package; qvlm_modifiers relies "
                    f"on it (see qvlm_modifiers.upstream). Fix: install the supported versions: {SUPPORTED}."
                )


_INSTALLED = False


def install() -> None:
    """Check versions, then apply the import-time integrations 1-3 (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    check_versions()
    check_private_names()
    install_torchvision_free_standins()
    register()
    install_oneshot_save_hook()
    _INSTALLED = True


from qvlm_modifiers.upstream.compressed_tensors_patches import patch_quantized_forward  # noqa: E402
from qvlm_modifiers.upstream.llmcompressor_patches import (  # noqa: E402
    CPUSafeAWQMixin,
    PinSafeIntermediatesCache,
    accelerator_available,
    allreduce_data_sum,
    gptq_internals,
    install_oneshot_save_hook,
    make_caches_pin_safe,
    uninstall_oneshot_save_hook,
    wrap_model_save,
)
from qvlm_modifiers.upstream.transformers_patches import (  # noqa: E402
    install_torchvision_free_standins,
    is_registered,
    packed_loading,
    register,
    remove_init_placeholders,
    skip_init_of_compressed_linears,
    torchvision_available,
    unregister,
    upstream_loading,
)
