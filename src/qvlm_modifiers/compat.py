"""Compatibility shims for machines without torchvision (CPU-only torch).

PyPI's torchvision does not import beside CPU torch, yet transformers 5.17 hides several
torchvision-free pieces behind torchvision placeholders (video processors that Qwen2/2.5-VL and
LLaVA-OneVision processors require, ``Idefics3ImageProcessorPil``). ``import qvlm_modifiers``
installs the stand-ins below; with torchvision installed (CUDA users) nothing is touched.
"""

from __future__ import annotations

import importlib.util

__all__ = ["torchvision_available", "install_torchvision_free_standins"]


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
