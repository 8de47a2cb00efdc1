"""Exact round trip: oneshot -> our save (compressed-tensors) -> AutoModelForImageTextToText.

For every family in ``zoo.FAMILY_NAMES`` x every scheme in :data:`ROUNDTRIP_SCHEMES`, and for
every (recipe, family) in :data:`ROUNDTRIP_RECIPES`:

* the reload reports no missing / unexpected / mismatched keys (``output_loading_info=True``);
* vision tower and projector tensors are bit-identical to the original model's;
* the language model's Linears really are quantized after the reload;
* reloaded logits on an image+text batch equal the in-memory quantized model's (tolerance below);
* the processor reloads and produces identical inputs;
* ``quantization_config`` is standard compressed-tensors (parses with
  ``compressed_tensors.QuantizationConfig``).

Plus: the bug is real without our fix (llm-compressor's plain save on LLaVA), and the
product-card snippet (``import qvlm_modifiers; from llmcompressor import oneshot``) reloads
exactly.

To add a recipe (e.g. an MBQ/Q-VLM one) to the round trip, append ``(recipe_name, family)`` to
:data:`ROUNDTRIP_RECIPES`; recipes that need calibration data get 4 samples.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import qvlm_modifiers
from qvlm_modifiers import data
from qvlm_modifiers.testing import zoo
from qvlm_modifiers.families import get_family

#: RTN schemes checked on every family: shipped recipe name -> what it is
ROUNDTRIP_SCHEMES = {
    "rtn_w4a16": "W4A16 int4 asymmetric group 128",
    "rtn_w4a16_sym": "W4A16 int4 symmetric group 128",
    "w8a8": "W8A8 int8 channel weights + dynamic int8 token activations",
}

#: (recipe, family) pairs that also go through the exact round trip. Extend freely.
ROUNDTRIP_RECIPES: list[tuple[str, str]] = [
    ("gptq_w4a16", "llava"),
    ("awq_w4a16", "qwen2_5_vl"),
    ("gptq_w3a16", "idefics3"),
    ("rtn_w3a16", "gemma3"),
    ("smoothquant_gptq_w8a8", "qwen2_vl"),
    ("smoothquant_gptq_w4a8", "gemma3"),
]

NUM_CALIBRATION_SAMPLES = 4

# Reloaded vs in-memory logits. Both forwards use the same dequantized weights: in memory the
# Linear fake-quantizes its weight (q/dq with the calibrated scale/zero point) on the fly, after
# the reload compressed-tensors unpacks the saved integers and applies the same scale/zero point,
# and activation quantization (W8A8) is the same dynamic per-token code in both. The values are
# bit-identical in practice (observed max |diff| = 0); 1e-5 absolute (logits are O(1)) leaves room
# only for a different fp32 summation order, far below the quantization effect we also assert.
LOGITS_ATOL = 1e-5



# ``import qvlm_modifiers`` also registers qvlm_modifiers.packed_loader (packed kernels, and it
# repairs ``ignore`` lists on load). The checkpoint itself must reload exactly in a process that
# never imported this package (and in vLLM), so reloads here go through upstream.
from qvlm_modifiers.upstream import upstream_loading  # noqa: E402


def load_upstream(path):
    with upstream_loading():
        return AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)


def _vision_and_projector_prefixes(model) -> tuple[str, ...]:
    fam = get_family(model)
    return (fam.vision_tower + ".", fam.projector + ".")


def _image_text_batch(processor, model, pairs):
    ds = data.build_calibration_dataset(pairs, processor, model, num_samples=1, shuffle=False)
    batch = data.collate_fn([ds[0]])
    batch.pop("loss_mask")
    return ds, batch


def _roundtrip(recipe_name: str, family: str, calib_pairs, tmp_path):
    torch.manual_seed(0)
    model, processor = zoo.build(family, seed=0)
    model.eval()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows, batch = _image_text_batch(processor, model, calib_pairs)
    with torch.no_grad():
        fp_logits = model(**batch).logits

    calib = data.build_calibration_dataset(
        calib_pairs, processor, model, num_samples=NUM_CALIBRATION_SAMPLES
    )
    out = tmp_path / f"{family}-{recipe_name}"
    qvlm_modifiers.oneshot(
        model=model,
        processor=processor,
        dataset=calib,
        recipe=recipe_name,
        num_calibration_samples=NUM_CALIBRATION_SAMPLES,
    )
    with torch.no_grad():  # the in-memory quantized model (weights fake-quantized on the fly)
        quant_logits = model(**batch).logits
    qvlm_modifiers.save_pretrained(model, processor, out)

    reloaded, info = load_upstream(out)
    reloaded.eval()
    return model, processor, original, rows, batch, fp_logits, quant_logits, reloaded, info, out


def _check_roundtrip(recipe_name, family, calib_pairs, tmp_path):
    (model, processor, original, rows, batch, fp_logits, quant_logits, reloaded, info, out) = _roundtrip(
        recipe_name, family, calib_pairs, tmp_path
    )
    # 1. nothing missing, nothing unexpected
    assert not info["missing_keys"], sorted(info["missing_keys"])[:10]
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])[:10]
    assert not info["mismatched_keys"], info["mismatched_keys"]

    # 2. vision tower + projector bit-identical to the original (not re-initialized)
    prefixes = _vision_and_projector_prefixes(reloaded)
    state = reloaded.state_dict()
    vision_keys = [k for k in original if k.startswith(prefixes)]
    assert vision_keys, f"no vision/projector tensors found under {prefixes}"
    for key in vision_keys:
        assert key in state, f"{key} missing after reload"
        assert state[key].dtype == original[key].dtype, key
        assert torch.equal(state[key], original[key]), f"{key} changed by save/reload"

    # 3. the language model really is quantized after the reload
    layers = get_family(reloaded).layers
    quantized = [
        n for n, m in reloaded.named_modules() if n.startswith(layers) and hasattr(m, "quantization_scheme")
    ]
    assert quantized, "no quantized decoder Linear after reload"
    assert not any(n.startswith(prefixes) for n, m in reloaded.named_modules() if hasattr(m, "quantization_scheme"))

    # 4. logits: reload == in-memory quantized model, and quantization did change them
    with torch.no_grad():
        reloaded_logits = reloaded(**batch).logits
    torch.testing.assert_close(reloaded_logits, quant_logits, atol=LOGITS_ATOL, rtol=0)
    assert (quant_logits - fp_logits).abs().max() > 1e-4, "quantization had no effect on the logits"

    # 5. processor reloads and produces identical inputs
    processor2 = AutoProcessor.from_pretrained(out)
    rows2 = data.build_calibration_dataset(calib_pairs, processor2, reloaded, num_samples=1, shuffle=False)
    assert rows2.column_names == rows.column_names
    for col in rows.column_names:
        assert rows2[0][col] == rows[0][col], f"processor output {col!r} differs after reload"

    # 6. standard compressed-tensors config
    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    assert raw["quant_method"] == "compressed-tensors"
    parsed = QuantizationConfig.model_validate(raw)
    assert parsed.config_groups
    assert all(isinstance(name, str) and not name.startswith("re:") for name in parsed.ignore)
    # the on-disk and in-memory name of each kept module are both listed
    assert set(parsed.ignore) >= {n for n in ("lm_head",) if n in dict(reloaded.named_modules())}


@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
@pytest.mark.parametrize("recipe_name", list(ROUNDTRIP_SCHEMES))
def test_exact_roundtrip_every_family(recipe_name, family, calib_pairs, tmp_path):
    _check_roundtrip(recipe_name, family, calib_pairs, tmp_path)


@pytest.mark.parametrize("recipe_name,family", ROUNDTRIP_RECIPES)
def test_exact_roundtrip_calibrated_recipes(recipe_name, family, calib_pairs, tmp_path):
    _check_roundtrip(recipe_name, family, calib_pairs, tmp_path)


# ---------------------------------------------------------------------------------------------
# The upstream bug, and the product-card snippet
# ---------------------------------------------------------------------------------------------
def _plain_llmcompressor_oneshot(saved_path, out):
    from llmcompressor import oneshot

    model = AutoModelForImageTextToText.from_pretrained(saved_path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(saved_path)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    oneshot(
        model=model,
        processor=processor,
        recipe=str(qvlm_modifiers.recipe_path("rtn_w4a16")),
        output_dir=str(out),
    )
    reloaded, info = load_upstream(out)
    return original, reloaded, info


def _vision_tensors_equal(original, reloaded) -> bool:
    prefixes = _vision_and_projector_prefixes(reloaded)
    state = reloaded.state_dict()
    return all(
        k in state and torch.equal(state[k], v) for k, v in original.items() if k.startswith(prefixes)
    )


def _upstream_only(saved_path, out):
    from qvlm_modifiers.upstream import install_oneshot_save_hook, uninstall_oneshot_save_hook

    uninstall_oneshot_save_hook()
    try:
        return _plain_llmcompressor_oneshot(saved_path, out)
    finally:
        install_oneshot_save_hook()


def test_without_fix_llava_reload_is_wrong(saved_vlm, tmp_path):
    """llm-compressor + compressed-tensors alone: LLaVA's vision tower is silently re-initialized."""
    original, reloaded, info = _upstream_only(saved_vlm("llava"), tmp_path / "plain")
    raw = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert any(n.startswith("vision_tower.") for n in raw["ignore"])  # on-disk names only
    assert not any(n.startswith("model.vision_tower.") for n in raw["ignore"])
    assert any(k.startswith("model.vision_tower.") for k in info["unexpected_keys"])
    assert info["missing_keys"]
    assert not _vision_tensors_equal(original, reloaded)


def test_without_fix_gemma3_reload_crashes(saved_vlm, tmp_path):
    """...and Gemma 3's SigLIP tower, wrongly treated as quantized, makes the reload crash."""
    with pytest.raises(AttributeError, match="weight"):
        _upstream_only(saved_vlm("gemma3"), tmp_path / "plain")


@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
def test_product_card_snippet_reloads_exactly(family, saved_vlm, tmp_path):
    """``import qvlm_modifiers; from llmcompressor import oneshot; oneshot(..., output_dir=...)``."""
    original, reloaded, info = _plain_llmcompressor_oneshot(saved_vlm(family), tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert _vision_tensors_equal(original, reloaded)


# vLLM's LlavaForConditionalGeneration.hf_to_vllm_mapper (vllm/model_executor/models/llava.py):
# its compressed-tensors config maps ``ignore`` through it (``apply_vllm_mapper``), then matches
# layer names exactly or by ``re.match`` (``should_ignore_layer``).
_VLLM_LLAVA_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}


def _vllm_map(name: str) -> str:
    for old, new in _VLLM_LLAVA_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def test_checkpoint_names_seen_by_vllm_llava(saved_vlm, tmp_path):
    """vLLM names LLaVA's layers like the on-disk checkpoint (``vision_tower.*``,
    ``language_model.model.layers.*``): every bf16 vision/projector Linear must be ignored under
    vLLM's mapping, no quantized Linear may be."""
    from safetensors import safe_open

    out = tmp_path / "out"
    _plain_llmcompressor_oneshot(saved_vlm("llava"), out)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    vllm_ignore = {_vllm_map(n) for n in ignore}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dense = {k[: -len(".weight")] for k in keys if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2}
    packed = {k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")}
    vision_linears = {
        m for m in dense
        if m.startswith(("vision_tower.", "multi_modal_projector.")) and "embedding" not in m
    }
    assert vision_linears and vision_linears <= vllm_ignore
    assert packed and all(m.startswith("language_model.model.layers.") for m in packed)
    assert not packed & vllm_ignore
