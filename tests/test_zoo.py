"""The tiny model zoo: real classes, family registry paths, sizes, determinism, save/reload."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from qvlm_modifiers import families
from qvlm_modifiers.testing import zoo
from qvlm_modifiers.data import build_calibration_dataset, collate_fn

FAMILIES = zoo.FAMILY_NAMES

# The image placeholder token each family's real tokenizer uses (written down from the model cards).
IMAGE_TOKEN = {
    "llava": "<image>",
    "llava_onevision": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "idefics3": "<image>",
    "gemma3": "<image_soft_token>",
}

ARCHITECTURE = {
    "llava": "LlavaForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


def test_family_names_cover_registry():
    assert set(FAMILIES) == {f.name for f in families.FAMILIES.values()}


@pytest.mark.parametrize("family", FAMILIES)
def test_build_real_class_and_registry_paths(family):
    model, processor = zoo.build(family)
    assert type(model).__name__ == ARCHITECTURE[family]
    fam = families.get_family(model)
    assert fam.name == family and fam.architecture == ARCHITECTURE[family]
    modules = dict(model.named_modules())
    for attr in ("language_model", "vision_tower", "projector"):
        assert isinstance(modules.get(getattr(fam, attr)), nn.Module), (family, attr)
    layers = families.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    # every Linear of the language model and of the vision side works with group size 128
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module.in_features % 128 == 0, (name, module.in_features)
    # config image token id == tokenizer's image token
    tok = processor.tokenizer
    assert families.image_token_id(model) == tok.convert_tokens_to_ids(IMAGE_TOKEN[family])
    assert tok.convert_ids_to_tokens(families.image_token_id(model)) == IMAGE_TOKEN[family]
    assert model.config.get_text_config().vocab_size >= len(tok)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = zoo.build("llava", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = zoo.build("llava", seed=0)
    c, _ = zoo.build("llava", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_num_layers(family, calib_pairs):
    model, processor = zoo.build(family, num_layers=5)
    assert len(families.decoder_layers(model)) == 5
    assert len(model.config.get_text_config().layer_types) == 5
    batch = collate_fn([build_calibration_dataset(calib_pairs, processor, model, num_samples=1)[0]])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_build_bf16_forwards_float32_pixels(family, calib_pairs):
    model, processor = zoo.build(family, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = collate_fn([build_calibration_dataset(calib_pairs, processor, model, num_samples=1)[0]])
    assert batch["pixel_values"].dtype == torch.float32  # the model casts pixels itself
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_unknown_family():
    with pytest.raises(ValueError, match="llava"):
        zoo.build("blip2")


def test_sample_pairs_varied_and_seeded():
    pairs = zoo.sample_pairs(6, seed=3)
    assert pairs.column_names == ["image", "text", "question"]
    assert len(pairs) == 6
    images = pairs["image"]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (48, 48) for im in images)
    assert len({im.tobytes() for im in images}) == 6
    assert all(t.strip() for t in pairs["text"]) and all(q.strip() for q in pairs["question"])
    again = zoo.sample_pairs(6, seed=3)
    assert [im.tobytes() for im in again["image"]] == [im.tobytes() for im in images]
    assert again["text"] == pairs["text"]
    other = zoo.sample_pairs(6, seed=4)
    assert [im.tobytes() for im in other["image"]] != [im.tobytes() for im in images]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_on_collated_batch_and_reload(family, saved_vlm, calib_pairs):
    """Forward on a batch from collate_fn; the saved copy reloads with no missing/unexpected keys
    and gives bit-identical logits (float32 weights are stored exactly)."""
    model, processor = zoo.build(family)
    ds = build_calibration_dataset(calib_pairs, processor, model, num_samples=2, prompt_column="question")
    batch = collate_fn([ds[0]])
    n_image_tokens = int((batch["input_ids"] == families.image_token_id(model)).sum())
    assert n_image_tokens > 4
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    # llm-compressor's basic pipeline calls model(**batch) with loss_mask still in it
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, rtol=0, atol=0)

    path = saved_vlm(family)
    reloaded, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    reloaded_processor = AutoProcessor.from_pretrained(path)
    assert type(reloaded_processor) is type(processor)
    assert type(reloaded_processor.image_processor) is type(processor.image_processor)
    # the reloaded processor encodes exactly like the in-memory one
    ds2 = build_calibration_dataset(calib_pairs, reloaded_processor, reloaded, num_samples=2,
                                    prompt_column="question")
    batch2 = collate_fn([ds2[0]])
    assert batch2.keys() == batch.keys()
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        logits2 = reloaded(**inputs).logits
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
