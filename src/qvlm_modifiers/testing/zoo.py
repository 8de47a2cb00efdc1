"""Tiny, deterministic, random-weight VLMs of the real transformers classes, built offline.

Every supported family (:data:`FAMILY_NAMES`) gets a model of its real ``*ForConditionalGeneration``
class with a few-hundred-kilobyte config and a processor assembled locally: a byte-level tokenizer
(one token per byte, so token positions can be counted by hand) carrying the family's special
tokens and its real chat template, plus the family's PIL image processor. Nothing touches the hub.

Sizes are chosen so that a forward takes milliseconds and GPTQ/AWQ run in seconds on a CPU, while
every ``Linear`` the Modifiers quantize has ``in_features % 128 == 0`` (group size 128): text and
vision hidden size 128, MLP 256, 2 layers. Every image becomes more than 4 image tokens.

Usage::

    model, processor = zoo.build("qwen2_vl", seed=0)
    path = zoo.save("qwen2_vl", tmp_path / "tiny-qwen2-vl")   # oneshot needs a saved model
    pairs = zoo.sample_pairs(8)                               # columns: image, text, question
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from qvlm_modifiers.testing.pairs import IMAGE_SIZE, sample_pairs
from qvlm_modifiers.upstream import install_torchvision_free_standins

__all__ = [
    "FAMILY_NAMES",
    "IMAGE_SIZE",
    "build",
    "save",
    "sample_pairs",
    "build_tokenizer",
    "install_torchvision_free_standins",
]

FAMILY_NAMES: tuple[str, ...] = (
    "llava",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "gemma3",
)


# Shared tiny sizes. Text/vision hidden 128 and MLP 256 keep K % 128 == 0 for every Linear.
_HIDDEN = 128
_MLP = 256
_LAYERS = 2
_HEADS = 4
_VISION_HEADS = 2


from qvlm_modifiers.testing.chat_templates import (  # noqa: E402
    LLAVA_CHAT_TEMPLATE,
    LLAVA_ONEVISION_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    IDEFICS3_CHAT_TEMPLATE,
    GEMMA3_CHAT_TEMPLATE,
)


# --------------------------------------------------------------------------------------------
# Tokenizer: byte-level, one token per byte, plus the family's special tokens
# --------------------------------------------------------------------------------------------


def build_tokenizer(
    special_tokens: list[str],
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    named_tokens: dict[str, str] | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
):
    """A :class:`~transformers.PreTrainedTokenizerFast` with ids ``0..len(special_tokens)-1`` for
    the special tokens (in the given order) followed by the 256 byte-level symbols (no merges).

    :param named_tokens: extra named special tokens (``{"image_token": "<image>"}``) that become
        tokenizer attributes (``tokenizer.image_token``, ``tokenizer.image_token_id``)
    :param add_bos: prepend ``bos_token`` when encoding with ``add_special_tokens=True`` (Llama)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in special_tokens:
        vocab.setdefault(tok, len(vocab))
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(sym, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if add_bos and bos_token is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, vocab[bos_token])],
        )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    kwargs: dict[str, Any] = {}
    for name, value in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                        ("unk_token", unk_token)):
        if value is not None:
            kwargs[name] = value
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens=dict(named_tokens or {}), **kwargs
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _video_processor(cls_name: str, **kwargs):
    """The family's video processor, or a minimal stand-in when torchvision is absent.

    Qwen2/2.5-VL and LLaVA-OneVision processors require a video processor; the real ones need
    torchvision. Without it, a plain :class:`~transformers.video_processing_utils.BaseVideoProcessor`
    (the base class they share) stands in; see :func:`install_torchvision_free_standins`.
    """
    if not install_torchvision_free_standins():
        import transformers

        return getattr(transformers, cls_name)(**kwargs)
    from transformers.video_processing_utils import BaseVideoProcessor

    return BaseVideoProcessor(**kwargs)


def _text_kwargs(vocab_size: int, num_layers: int, **extra) -> dict[str, Any]:
    base = dict(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        intermediate_size=_MLP,
        num_hidden_layers=num_layers,
        num_attention_heads=_HEADS,
        max_position_embeddings=1024,
    )
    base.update(extra)
    return base


# --------------------------------------------------------------------------------------------
# Per-family builders: each returns (config, processor)
# --------------------------------------------------------------------------------------------


def _llava(num_layers: int = _LAYERS):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    special = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tok = build_tokenizer(special, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                          named_tokens={"image_token": "<image>"}, add_bos=True,
                          chat_template=LLAVA_CHAT_TEMPLATE)
    image_size, patch = 32, 8  # 16 patches + CLS; "default" strategy drops CLS -> 16 image tokens
    vision = CLIPVisionConfig(hidden_size=_HIDDEN, intermediate_size=_MLP, num_hidden_layers=_LAYERS,
                              num_attention_heads=_VISION_HEADS, image_size=image_size, patch_size=patch,
                              projection_dim=_HIDDEN)
    text = LlamaConfig(**_text_kwargs(len(tok), num_layers, num_key_value_heads=_HEADS, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=tok.pad_token_id))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                         image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return config, processor


def _qwen_tokenizer(extra: list[str], chat_template: str, named: dict[str, str]):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra]
    return build_tokenizer(special, eos_token="<|im_end|>", pad_token="<|endoftext|>", named_tokens=named,
                           chat_template=chat_template)


def _llava_onevision(num_layers: int = _LAYERS):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = _qwen_tokenizer(["<image>", "<video>"], LLAVA_ONEVISION_CHAT_TEMPLATE,
                          {"image_token": "<image>", "video_token": "<video>"})
    image_size, patch = 32, 8  # base tile 4x4=16 features; a square image adds 16 + 4 newlines
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    vision = SiglipVisionConfig(hidden_size=_HIDDEN, intermediate_size=_MLP, num_hidden_layers=_LAYERS,
                                num_attention_heads=_VISION_HEADS, image_size=image_size, patch_size=patch)
    text = Qwen2Config(**_text_kwargs(len(tok), num_layers, num_key_value_heads=2, bos_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                                  video_token_index=tok.video_token_id, image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  vision_aspect_ratio="anyres_max_9", pad_token_id=tok.pad_token_id)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                      image_grid_pinpoints=pinpoints)
    video = _video_processor("LlavaOnevisionVideoProcessor", size={"height": image_size, "width": image_size})
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video,
                                        num_image_tokens=(image_size // patch) ** 2,
                                        vision_feature_select_strategy="full",
                                        vision_aspect_ratio="anyres_max_9",
                                        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
    return config, processor


_QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_PATCH, _QWEN_MERGE = 8, 2
# 48x48 px image -> 6x6 patches -> 3x3 = 9 image tokens after the 2x2 merge
_QWEN_PIXELS = dict(min_pixels=32 * 32, max_pixels=64 * 64)


def _qwen_vl_common(text_config_cls, vision_config, config_cls, processor_cls, num_layers: int):
    from transformers import Qwen2VLImageProcessorPil

    tok = _qwen_tokenizer(_QWEN_VISION_TOKENS, QWEN2_VL_CHAT_TEMPLATE,
                          {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    head_dim = _HIDDEN // _HEADS
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections
    rope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1_000_000.0}
    assert sum(rope["mrope_section"]) == head_dim // 2
    text = text_config_cls(**_text_kwargs(len(tok), num_layers, num_key_value_heads=2, rope_parameters=rope,
                                          bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    config = config_cls(vision_config=vision_config, text_config=text, **ids)
    image_processor = Qwen2VLImageProcessorPil(patch_size=_QWEN_PATCH, merge_size=_QWEN_MERGE,
                                               temporal_patch_size=2, **_QWEN_PIXELS)
    video = _video_processor("Qwen2VLVideoProcessor", patch_size=_QWEN_PATCH, merge_size=_QWEN_MERGE,
                             temporal_patch_size=2)
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video,
                              chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return config, processor


def _qwen2_vl(num_layers: int = _LAYERS):
    from transformers import Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(depth=_LAYERS, embed_dim=_HIDDEN, hidden_size=_HIDDEN, mlp_ratio=2,
                                 num_heads=_VISION_HEADS, patch_size=_QWEN_PATCH,
                                 spatial_merge_size=_QWEN_MERGE, temporal_patch_size=2)
    return _qwen_vl_common(Qwen2VLTextConfig, vision, Qwen2VLConfig, Qwen2VLProcessor, num_layers)


def _qwen2_5_vl(num_layers: int = _LAYERS):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    # window 32 px = 2x2 merged tokens per window; block 1 uses full attention (like 7/15/23/31)
    vision = Qwen2_5_VLVisionConfig(depth=_LAYERS, hidden_size=_HIDDEN, intermediate_size=_MLP,
                                    out_hidden_size=_HIDDEN, num_heads=_VISION_HEADS, patch_size=_QWEN_PATCH,
                                    spatial_merge_size=_QWEN_MERGE, temporal_patch_size=2,
                                    window_size=32, fullatt_block_indexes=[1])
    return _qwen_vl_common(Qwen2_5_VLTextConfig, vision, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, num_layers)


def _idefics3(num_layers: int = _LAYERS):
    from transformers import Idefics3Config, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rows_cols = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<fake_token_around_image>",
               "<image>", "<end_of_utterance>", "<global-img>", *rows_cols]
    tok = build_tokenizer(special, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
                          pad_token="<|finetune_right_pad_id|>", named_tokens={"image_token": "<image>"},
                          chat_template=IDEFICS3_CHAT_TEMPLATE)
    image_size, patch, scale = 64, 8, 2  # 8x8 patches, pixel shuffle 2 -> 16 image tokens
    vision = Idefics3VisionConfig(hidden_size=_HIDDEN, intermediate_size=_MLP, num_hidden_layers=_LAYERS,
                                  num_attention_heads=_VISION_HEADS, image_size=image_size, patch_size=patch)
    text = LlamaConfig(**_text_kwargs(len(tok), num_layers, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    config = Idefics3Config(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                            scale_factor=scale, pad_token_id=tok.pad_token_id)
    # no image splitting: one global image of image_size x image_size per sample
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": image_size},
                                                max_image_size={"longest_edge": image_size},
                                                do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=(image_size // patch) ** 2 // scale**2,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    return config, processor


def _gemma3(num_layers: int = _LAYERS):
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<end_of_image>", "<image_soft_token>"]
    tok = build_tokenizer(special, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                          named_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                        "eoi_token": "<end_of_image>"},
                          add_bos=True, chat_template=GEMMA3_CHAT_TEMPLATE)
    image_size, patch, tokens = 64, 8, 16  # 8x8 patches avg-pooled to 4x4 = 16 soft tokens
    vision = SiglipVisionConfig(hidden_size=_HIDDEN, intermediate_size=_MLP, num_hidden_layers=_LAYERS,
                                num_attention_heads=_VISION_HEADS, image_size=image_size, patch_size=patch,
                                vision_use_head=False)
    # Gemma 3 interleaves sliding-window and global layers (5:1); tiny: alternate them
    layer_types = [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]
    text = Gemma3TextConfig(**_text_kwargs(len(tok), num_layers, num_key_value_heads=2, head_dim=_HIDDEN // _HEADS,
                                           query_pre_attn_scalar=_HIDDEN // _HEADS, sliding_window=16,
                                           layer_types=layer_types,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id))
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens,
                          boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                          image_token_index=tok.image_token_id)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens,
                                chat_template=GEMMA3_CHAT_TEMPLATE)
    return config, processor


_BUILDERS: dict[str, Callable[[int], tuple[Any, Any]]] = {
    "llava": _llava,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "idefics3": _idefics3,
    "gemma3": _gemma3,
}


def _tie(config) -> None:
    """Tie input and output embeddings, as the small real checkpoints of the family do."""
    config.tie_word_embeddings = True
    config.get_text_config().tie_word_embeddings = True


def _llava_real(config, processor) -> None:
    # LLaVA-1.5 (Vicuna): untied embeddings, full multi-head attention (as built); rows may hold
    # several <image> placeholders. Nothing to change in the config.
    config.get_text_config().tie_word_embeddings = False


def _llava_onevision_real(config, processor) -> None:
    # Qwen2-0.5B LM: tied embeddings, one KV head group per 4 query heads (GQA); SigLIP keeps its
    # attention-pooling head (vision_use_head); anyres: a 3x3 grid of base tiles plus the base image.
    _tie(config)
    config.get_text_config().num_key_value_heads = 1
    config.vision_config.vision_use_head = True
    size = processor.image_processor.size["height"]
    pinpoints = [[size * i, size * j] for i in range(1, 4) for j in range(1, 4)]
    config.image_grid_pinpoints = pinpoints
    processor.image_processor.image_grid_pinpoints = pinpoints


def _qwen_vl_real(config, processor) -> None:
    # Qwen2-VL-2B / Qwen2.5-VL-3B: tied embeddings, GQA; images keep their own resolution
    # (up to 8x8 merged tokens here), so rows differ in image-token count.
    _tie(config)
    processor.image_processor.max_pixels = 128 * 128


def _idefics3_real(config, processor) -> None:
    # SmolVLM: tied embeddings; image splitting into a grid of 32-px crops plus the global image,
    # each crop framed by <row_i_col_j> tokens.
    _tie(config)
    ip = processor.image_processor
    ip.do_image_splitting = True
    ip.size = {"longest_edge": 2 * config.vision_config.image_size}
    ip.max_image_size = {"longest_edge": config.vision_config.image_size}


def _gemma3_real(config, processor) -> None:
    # Gemma 3: tied embeddings (always), sliding-window and global layers, eager attention
    # (Gemma 3's recommended implementation), pan-and-scan crops of wide images.
    _tie(config)
    config._attn_implementation = "eager"
    config.get_text_config()._attn_implementation = "eager"
    ip = processor.image_processor
    ip.do_pan_and_scan = True
    ip.pan_and_scan_min_crop_size = 16
    ip.pan_and_scan_max_num_crops = 2
    ip.pan_and_scan_min_ratio_to_activate = 1.2


#: per family, the changes that make the tiny model configured the way the family's real
#: checkpoints are (tied embeddings, attention variant, crop grids / image splitting, vision head)
_CHECKPOINT_LIKE: dict[str, Callable[[Any, Any], None]] = {
    "llava": _llava_real,
    "llava_onevision": _llava_onevision_real,
    "qwen2_vl": _qwen_vl_real,
    "qwen2_5_vl": _qwen_vl_real,
    "idefics3": _idefics3_real,
    "gemma3": _gemma3_real,
}


def _check_family(family: str) -> str:
    if family not in _BUILDERS:
        raise ValueError(f"Unknown tiny family {family!r}; choose one of {', '.join(FAMILY_NAMES)}.")
    return family


def build(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = _LAYERS,
    checkpoint_like: bool = False,
):
    """A tiny random-weight model of ``family`` (its real transformers class) and its processor.

    :param num_layers: decoder layers of the language model (the vision tower keeps 2)
    :param checkpoint_like: configure it the way the family's real checkpoints are (tied
        embeddings, GQA / eager attention, crop grids and image splitting, SigLIP's pooling head;
        see ``_CHECKPOINT_LIKE``); images then become more, and more varied, image tokens

    Weights are drawn from a generator seeded with ``seed`` only (the global RNG state is
    restored afterwards), so the same ``(family, seed)`` always gives the same weights.
    """
    from transformers import AutoModelForImageTextToText

    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    config, processor = _BUILDERS[_check_family(family)](num_layers)
    if checkpoint_like:
        _CHECKPOINT_LIKE[family](config, processor)
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(cpu_state)
    model.eval()
    return model, processor


def save(
    family: str,
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = _LAYERS,
    checkpoint_like: bool = False,
) -> Path:
    """Build ``family`` and ``save_pretrained`` model + processor to ``path``; returns the path.

    ``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
    reload them (weights bit-identical). Load the model from ``path`` before calling llm-compressor's
    ``oneshot``: it reloads the config from the model's ``name_or_path``.
    """
    path = Path(path)
    model, processor = build(family, seed=seed, dtype=dtype, num_layers=num_layers, checkpoint_like=checkpoint_like)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
