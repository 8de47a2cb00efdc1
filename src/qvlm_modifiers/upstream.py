"""Every dependency of this package on upstream internals, in one module, applied by one :func:`install`.

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
6. **Private llm-compressor names** our Modifiers build on: :data:`PRIVATE_NAMES` lists them,
   :func:`check_private_names` verifies they exist (run by :func:`install`), and
   :func:`allreduce_data_sum` is the one import of AWQ's private distributed sum.

Public extension points are used everywhere else without a patch: ``ModifierFactory.register``,
subclasses of llm-compressor's Modifiers and of transformers' quantizer, torch module hooks.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from llmcompressor.pipelines.cache import IntermediatesCache

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
    "accelerator_available",
    "PinSafeIntermediatesCache",
    "make_caches_pin_safe",
    "CPUSafeAWQMixin",
    "allreduce_data_sum",
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
    ("llmcompressor.pipelines.cache", "IntermediatesCache.pin_memory"),
    ("llmcompressor.entrypoints.utils", "modify_save_pretrained"),
    ("transformers.quantizers.auto", "AUTO_QUANTIZER_MAPPING"),
    ("transformers.quantizers.auto", "AUTO_QUANTIZATION_CONFIG_MAPPING"),
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
    from qvlm_modifiers.save import install_oneshot_save_hook

    install_oneshot_save_hook()
    _INSTALLED = True


# =========================================================================== 1. processor stand-ins
def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class _StandInAutoVideoProcessor:
    """Loads a saved video processor config as a plain ``BaseVideoProcessor`` (no torchvision)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from transformers.video_processing_utils import BaseVideoProcessor

        for key in ("trust_remote_code", "subfolder", "_from_auto", "_from_pipeline"):
            kwargs.pop(key, None)
        return BaseVideoProcessor.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


_STANDIN_INSTALLED = False


def install_torchvision_free_standins() -> bool:
    """Let video-capable processors (Qwen2/2.5-VL, LLaVA-OneVision) build and reload without torchvision.

    Their processors demand a video processor, and transformers' video processors (and
    ``AutoVideoProcessor``) need torchvision. Without torchvision, transformers exposes
    ``BaseVideoProcessor`` and ``AutoVideoProcessor`` only as import-error placeholders; this swaps
    those two placeholders for the real torchvision-free ``BaseVideoProcessor`` and a loader
    returning one, so the processor's type check and ``AutoProcessor.from_pretrained`` work for
    images. Videos stay unsupported (the stand-in is never used on images). It also exposes the
    real (torchvision-free) ``Idefics3ImageProcessorPil``, which transformers 5.17 hides behind a
    torchvision placeholder, so Idefics3/SmolVLM processors reload. Does nothing, and
    returns ``False``, when torchvision is installed. Idempotent.
    """
    global _STANDIN_INSTALLED
    if torchvision_available():
        return False
    if not _STANDIN_INSTALLED:
        import transformers
        import transformers.models.auto.video_processing_auto as video_auto
        import transformers.processing_utils as processing_utils
        from transformers.video_processing_utils import BaseVideoProcessor

        for module in {id(m): m for m in (transformers, processing_utils.transformers_module)}.values():
            setattr(module, "BaseVideoProcessor", BaseVideoProcessor)
        video_auto.AutoVideoProcessor = _StandInAutoVideoProcessor
        # transformers 5.17 lists Idefics3ImageProcessorPil under the torchvision backend although
        # the PIL module imports without it: expose the real class so AutoImageProcessor finds it.
        import transformers.models.idefics3 as idefics3_pkg
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        for module in (idefics3_pkg, transformers):
            if getattr(getattr(module, "Idefics3ImageProcessorPil", None), "is_dummy", False):
                setattr(module, "Idefics3ImageProcessorPil", Idefics3ImageProcessorPil)
        _STANDIN_INSTALLED = True
    return True


# =========================================================================== 2. packed loading registration
def _hf_auto():
    from transformers.quantizers import auto

    return auto


def _packed():
    from qvlm_modifiers import packed_loader

    return packed_loader


def _upstream_quantizer():
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    return CompressedTensorsHfQuantizer


def _upstream_config():
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return CompressedTensorsConfig


def register() -> None:
    """Make ``quant_method: compressed-tensors`` load through this module (idempotent).

    transformers' ``register_quantizer``/``register_quantization_config`` refuse to replace an
    existing method, so the two mapping entries are set directly (the same dicts they write)."""
    _hf_auto().AUTO_QUANTIZER_MAPPING["compressed-tensors"] = _packed().PackedCompressedTensorsHfQuantizer
    _hf_auto().AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] = _packed().CompressedTensorsConfig


def unregister() -> None:
    """Restore transformers' own compressed-tensors quantizer and config."""
    _hf_auto().AUTO_QUANTIZER_MAPPING["compressed-tensors"] = _upstream_quantizer()
    _hf_auto().AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] = _upstream_config()


def is_registered() -> bool:
    return _hf_auto().AUTO_QUANTIZER_MAPPING.get("compressed-tensors") is _packed().PackedCompressedTensorsHfQuantizer


@contextlib.contextmanager
def packed_loading():
    """Load with this package's quantizer inside the block, even after :func:`unregister` (then restore)."""
    was_registered = is_registered()
    if not was_registered:
        register()
    try:
        yield
    finally:
        if not was_registered:
            unregister()


@contextlib.contextmanager
def upstream_loading():
    """Load with transformers' own compressed-tensors quantizer inside the block (then restore).

    For judging a checkpoint itself, as a process that never imported this package (or vLLM)
    would see it: this loader also repairs ``ignore`` lists on load, upstream does not."""
    was_registered = is_registered()
    if was_registered:
        unregister()
    try:
        yield
    finally:
        if was_registered:
            register()


# =========================================================================== 4. weight init of compressed Linears
#: transformers versions whose loading order :func:`skip_init_of_compressed_linears` was written for
_INIT_WORKAROUND_TRANSFORMERS = ((5, 15), (5, 17))


def skip_init_of_compressed_linears(model: nn.Module) -> list[str]:
    """Keep transformers' weight initialization from reading the missing ``.weight`` of compressed Linears.

    Works around transformers-internal behaviour (written for transformers 5.15-5.17; a warning is
    logged on other versions, where it may be unnecessary or insufficient): ``from_pretrained``
    runs ``_initialize_missing_keys`` -> ``initialize_weights`` *after* the quantizer compressed
    the modules, and some models' ``_init_weights`` read ``module.weight`` without checking it
    exists. SigLIP (LLaVA-OneVision's and Gemma 3's vision tower) does, on every ``nn.Linear``
    (``lecun_normal_(module.weight)``) and on ``SiglipAttention``/``SiglipMLP`` (``q_proj.weight``,
    ``fc1.weight``...); a pack-quantized Linear only has ``weight_packed``, so the load raised
    ``AttributeError: 'Linear' object has no attribute 'weight'``.

    Each compressed Linear gets a plain (unregistered) ``weight`` attribute: a meta tensor of the
    logical shape flagged ``_is_hf_initialized``, which every ``transformers.initialization``
    function skips, and which is not in ``state_dict`` (loading and ``missing_keys`` are
    unchanged). Everything else is initialized as before, so a genuinely missing tensor (a bias,
    a norm) is still reported and initialized. :func:`remove_init_placeholders` deletes the
    attributes after loading. Returns the names of the modules that got one."""
    import transformers

    version = tuple(int(v) for v in re.findall(r"\d+", transformers.__version__)[:2])
    low, high = _INIT_WORKAROUND_TRANSFORMERS
    if not low <= version <= high:
        logger.warning(
            f"qvlm packed loader: skip_init_of_compressed_linears was written for transformers "
            f"{low[0]}.{low[1]}-{high[0]}.{high[1]}, this is {transformers.__version__}; if loading a checkpoint "
            "with a quantized vision tower fails in _init_weights, report it."
        )
    names = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Linear)
            and getattr(module, "quantization_scheme", None) is not None
            and getattr(module, "weight", None) is None  # compressed: weight_packed etc. instead
        ):
            dtype = getattr(getattr(module, "weight_scale", None), "dtype", None) or torch.get_default_dtype()
            placeholder = torch.empty(module.out_features, module.in_features, device="meta", dtype=dtype)
            placeholder._is_hf_initialized = True
            object.__setattr__(module, "weight", placeholder)
            module._qvlm_init_placeholder = True
            names.append(name)
    return names


def remove_init_placeholders(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.pop("_qvlm_init_placeholder", False):
            module.__dict__.pop("weight", None)


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
