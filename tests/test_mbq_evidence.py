"""Evidence that the modality weighting does what MBQ claims, on a model built to make it matter.

Construction (tiny LLaVA from the zoo, then edited in memory):

- text embeddings live only in hidden channels B = 64..127, the projector writes image features only
  into channels A = 0..63 (disjoint subspaces);
- attention is nearly switched off (``o_proj *= 0.01``), so a token's error stays its own;
- layer 0's ``post_attention_layernorm`` gives A a gain of 8: vision tokens dominate ``mean|x|`` on A;
- layer 0's ``gate_proj``/``up_proj`` have 8x larger weights on B (text) columns, so the int3 group
  range is set by text columns.

Only ``post_attention_layernorm -> gate/up`` of layer 0 is searched and only those two layers are
quantized (W3 g128). Raising alpha scales A up: A columns (vision) get finer steps, B columns (text)
coarser ones, so vision-token error wants a large alpha and text-token error a small one. AWQ
(modality-blind, all tokens) lands in between; MBQ, whose gradient pass finds vision tokens barely
matter for the answer loss, favours text. Measured at the language model's final hidden state
against the unquantized model (independent of either search's loss).
"""

from __future__ import annotations

import pytest
import torch
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq.mappings import AWQMapping
from transformers import AutoModelForImageTextToText, AutoProcessor

import qvlm_modifiers
from qvlm_modifiers import data
from qvlm_modifiers.lm_scoped import LMAWQModifier
from qvlm_modifiers.mbq.modifier import MBQModifier

LAYER0 = r"re:model\.language_model\.layers\.0\."
MAPPING = [AWQMapping(LAYER0 + "post_attention_layernorm$", [LAYER0 + r"mlp\.gate_proj$", LAYER0 + r"mlp\.up_proj$"])]
W3_G128 = {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}



def _conflicted_llava(path):
    model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        proj = model.model.multi_modal_projector.linear_2
        proj.weight[64:] = 0
        proj.bias[64:] = 0
        model.model.language_model.embed_tokens.weight[:, :64] = 0
        layers = model.model.language_model.layers
        for layer in layers:
            layer.self_attn.o_proj.weight *= 0.01
        layers[0].post_attention_layernorm.weight[:64] = 8.0
        layers[0].mlp.gate_proj.weight[:, 64:] *= 8
        layers[0].mlp.up_proj.weight[:, 64:] *= 8
    return model


def _final_hidden(model, rows):
    out = []
    with torch.no_grad():
        for i in range(len(rows)):
            batch = data.collate_fn([rows[i]])
            mask = batch.pop("loss_mask")[0]
            out.append((model(**batch, output_hidden_states=True).hidden_states[-1][0], mask))
    return out


def _modality_errors(model, reference, rows):
    """Mean |h_q - h_fp| per token, averaged over answer-text tokens and over vision tokens."""
    text = vision = 0.0
    n_text = n_vision = 0
    for (h, mask), (ref, _) in zip(_final_hidden(model, rows), reference):
        err = (h - ref).abs().mean(-1)
        text += err[mask == 1].sum().item()
        vision += err[mask == 2].sum().item()
        n_text += int((mask == 1).sum())
        n_vision += int((mask == 2).sum())
    return text / n_text, vision / n_vision


def test_mbq_trades_vision_error_for_text_error_where_awq_does_not(saved_vlm, calib_pairs):
    path = saved_vlm("llava")
    processor = AutoProcessor.from_pretrained(path)
    reference_model = _conflicted_llava(path)
    rows = data.build_calibration_dataset(calib_pairs, processor, reference_model, prompt_column="question")
    reference = _final_hidden(reference_model, rows)

    errors, modifiers = {}, {}
    for name, transform, use_mask in (
        ("awq", LMAWQModifier(duo_scaling=False, n_grid=20, mappings=MAPPING), False),
        ("mbq", MBQModifier(mappings=MAPPING), True),
    ):
        model = _conflicted_llava(path)
        quant = QuantizationModifier(
            config_groups={"g": {"targets": [LAYER0 + r"mlp\.(gate|up)_proj$"], "weights": W3_G128}}
        )
        qvlm_modifiers.oneshot(
            model, processor=processor, dataset=rows, recipe=[transform, quant], use_loss_mask=use_mask,
            num_calibration_samples=len(rows), shuffle_calibration_samples=False,
        )
        errors[name] = _modality_errors(model, reference, rows)
        modifiers[name] = transform

    (awq_text, awq_vision), (mbq_text, mbq_vision) = errors["awq"], errors["mbq"]
    # the gradient pass saw that vision tokens hardly move the answer loss here
    assert modifiers["mbq"]._sensitivity.ratios[0]["mlp"] < 0.05
    # Measured (seeds 0-2 of the calibration pairs): text 0.215 vs 0.241, vision 1.09 vs 0.64. The
    # 2% / 10% margins below are far outside float noise and fail if the weighting is ignored
    # (MBQ would then pick AWQ's alpha, giving equal errors) or inverted.
    assert mbq_text < 0.98 * awq_text, errors
    assert awq_vision < 0.9 * mbq_vision, errors
