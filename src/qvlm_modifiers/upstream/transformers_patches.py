"""transformers internals: processor stand-ins without torchvision, the packed-loader registration,
weight init of compressed Linears. Applied through :func:`qvlm_modifiers.upstream.install`."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re

import torch
from torch import nn

logger = logging.getLogger("qvlm_modifiers.upstream")


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
