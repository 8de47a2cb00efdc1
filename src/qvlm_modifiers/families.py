"""Supported VLM families: the one place that records what the Modifiers need to know per family.

Adding a family = one :class:`VLMFamily` entry in :data:`FAMILIES` + one builder in
:mod:`qvlm_modifiers.testing.zoo`. Module paths are *in-memory* names of the transformers 5 classes
(``model.language_model``...), i.e. what ``model.named_modules()`` yields; the on-disk names
that compressed-tensors writes drop the ``model.`` prefix (see :mod:`qvlm_modifiers.save`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qvlm_modifiers.errors import UnsupportedModelError

__all__ = [
    "VLMFamily",
    "FAMILIES",
    "get_family",
    "supported_architectures",
    "decoder_layers",
    "decoder_layer_class_name",
    "image_token_id",
]


@dataclass(frozen=True)
class VLMFamily:
    """What the Modifiers need to know about one VLM family.

    :param name: short name used in tests, docs and the CLI (``"llava"``, ``"qwen2_vl"``, ...)
    :param model_type: ``config.model_type`` of the top-level config
    :param architecture: the ``*ForConditionalGeneration`` class name in transformers
    :param language_model: in-memory path of the language model (the decoder stack's parent)
    :param layers: in-memory path of the ``nn.ModuleList`` of decoder layers
    :param vision_tower: in-memory path of the vision encoder
    :param projector: in-memory path of the vision->text projector/connector
    :param image_token_attr: config attribute holding the image placeholder token id
    :param uses_mm_token_type_ids: the processor emits ``mm_token_type_ids`` and the model needs
        it in every batch (Qwen2/2.5-VL M-RoPE); 1 marks image tokens there
    :param extra_batch_keys: processor outputs that must be kept in calibration batches
    """

    name: str
    model_type: str
    architecture: str
    language_model: str
    layers: str
    vision_tower: str
    projector: str
    image_token_attr: str = "image_token_id"
    uses_mm_token_type_ids: bool = False
    extra_batch_keys: tuple[str, ...] = ()
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def vision_regexes(self) -> list[str]:
        """llm-compressor ``ignore`` regexes (in-memory names) for vision tower and projector."""
        return [f"re:{re.escape(self.vision_tower)}\\..*", f"re:{re.escape(self.projector)}.*"]

    @property
    def default_ignore(self) -> list[str]:
        """What stays in bf16 by default: vision tower, projector and lm_head."""
        return ["lm_head", *self.vision_regexes]


FAMILIES: dict[str, VLMFamily] = {
    f.model_type: f
    for f in [
        VLMFamily(
            name="llava",
            model_type="llava",
            architecture="LlavaForConditionalGeneration",
            language_model="model.language_model",
            layers="model.language_model.layers",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            notes="LLaVA-1.5 (CLIP vision tower + MLP projector + Llama/Vicuna)",
        ),
        VLMFamily(
            name="llava_onevision",
            model_type="llava_onevision",
            architecture="LlavaOnevisionForConditionalGeneration",
            language_model="model.language_model",
            layers="model.language_model.layers",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            notes="LLaVA-OneVision (SigLIP + Qwen2); anyres tiling",
        ),
        VLMFamily(
            name="qwen2_vl",
            model_type="qwen2_vl",
            architecture="Qwen2VLForConditionalGeneration",
            language_model="model.language_model",
            layers="model.language_model.layers",
            vision_tower="model.visual",
            projector="model.visual.merger",
            uses_mm_token_type_ids=True,
            extra_batch_keys=("image_grid_thw", "mm_token_type_ids"),
            notes="Qwen2-VL (native resolution ViT with merger; M-RoPE needs mm_token_type_ids)",
        ),
        VLMFamily(
            name="qwen2_5_vl",
            model_type="qwen2_5_vl",
            architecture="Qwen2_5_VLForConditionalGeneration",
            language_model="model.language_model",
            layers="model.language_model.layers",
            vision_tower="model.visual",
            projector="model.visual.merger",
            uses_mm_token_type_ids=True,
            extra_batch_keys=("image_grid_thw", "mm_token_type_ids"),
            notes="Qwen2.5-VL (window-attention ViT with merger)",
        ),
        VLMFamily(
            name="idefics3",
            model_type="idefics3",
            architecture="Idefics3ForConditionalGeneration",
            language_model="model.text_model",
            layers="model.text_model.layers",
            vision_tower="model.vision_model",
            projector="model.connector",
            extra_batch_keys=("pixel_attention_mask",),
            notes="Idefics3 / SmolVLM (SigLIP + pixel-shuffle connector + Llama)",
        ),
        VLMFamily(
            name="gemma3",
            model_type="gemma3",
            architecture="Gemma3ForConditionalGeneration",
            language_model="model.language_model",
            layers="model.language_model.layers",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            image_token_attr="image_token_id",
            notes="Gemma 3 (SigLIP + avg-pool projector + Gemma3 text)",
        ),
    ]
}


def supported_architectures() -> list[str]:
    return sorted(f.architecture for f in FAMILIES.values())


def get_family(model_or_config: Any) -> VLMFamily:
    """Family entry for a model, a config, a ``model_type`` string or a family name.

    Raises :class:`UnsupportedModelError` listing the supported architectures otherwise.
    """
    config = getattr(model_or_config, "config", model_or_config)
    key = config if isinstance(config, str) else getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if key in (fam.model_type, fam.name, fam.architecture, *fam.aliases):
            return fam
    archs = getattr(config, "architectures", None) or []
    for fam in FAMILIES.values():
        if fam.architecture in archs:
            return fam
    described = key if key else type(model_or_config).__name__
    raise UnsupportedModelError(
        f"Model type {described!r} is not a supported vision-language model. Supported "
        f"architectures: {', '.join(supported_architectures())}. Use a checkpoint of one of these "
        "families, or add an entry to qvlm_modifiers.families.FAMILIES (and a builder to "
        "qvlm_modifiers.testing.zoo) for a new one."
    )


def _get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no submodule {path!r}: this transformers version lays the "
            "model out differently from what qvlm_modifiers.families expects. Install a supported "
            "transformers version (5.15-5.17)."
        ) from err


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a supported VLM."""
    return _get_submodule(model, get_family(model).layers)


def decoder_layer_class_name(model: nn.Module) -> str:
    """Class name of the language model's decoder layer (llm-compressor ``sequential_targets``)."""
    return type(decoder_layers(model)[0]).__name__


def image_token_id(model_or_config: Any) -> int:
    """The image placeholder token id that marks vision tokens in ``input_ids``."""
    config = getattr(model_or_config, "config", model_or_config)
    fam = get_family(config)
    value = getattr(config, fam.image_token_attr, None)
    if value is None and fam.image_token_attr == "image_token_id":
        value = getattr(config, "image_token_index", None)
    if value is None:
        raise UnsupportedModelError(
            f"Config of {fam.architecture} has no {fam.image_token_attr!r}; cannot find image tokens."
        )
    return int(value)
