"""The plain llm-compressor path: every shipped recipe, VLM data as llm-compressor builds it, exact reload.

What a new user does, with no project wrapper: ``import qvlm_modifiers`` (registers the Modifiers),
calibration rows built the way llm-compressor's VLM examples build them (the processor's output per
row: no ``loss_mask``, with or without ``labels``; see ``plain_path.py``), ``llmcompressor.oneshot``,
``model.save_pretrained(out, save_compressed=True)``, ``AutoModelForImageTextToText.from_pretrained``.
Models are the zoo's tiny families configured like their real checkpoints (``checkpoint_like``:
tied embeddings, GQA / eager attention, crop grids, image splitting, pan-and-scan, SigLIP's pooling
head), and rows hold one or two images of different aspect ratios.

Per recipe x family: the reload reports nothing missing, unexpected or mismatched; the language
model's Linears are quantized; the tensors the recipe leaves alone (vision tower, projector) are
bit-identical to the original; reloaded logits equal the in-memory quantized model's.
"""

from __future__ import annotations

import re

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModelForImageTextToText, AutoProcessor

import qvlm_modifiers
from plain_path import data_collator, plain_rows
from qvlm_modifiers.testing import zoo
from qvlm_modifiers.errors import CalibrationDataError
from qvlm_modifiers.families import get_family
from qvlm_modifiers.modality import IGNORE, TEXT, VISION, derive_loss_mask
from qvlm_modifiers.upstream import upstream_loading

RECIPES = sorted(qvlm_modifiers.list_recipes())
N_ROWS = 4
# the recipe x family matrix calibrates on 2 rows (one with one image, one with two): the reload check
# needs quantized weights, not good ones, and 120 cells must stay a small part of the suite
MATRIX_ROWS = 2

# Same justification as test_roundtrip.LOGITS_ATOL: in memory and after the reload both forwards use
# the same dequantized weights (observed max |diff| = 0); 1e-5 leaves room for summation order only.
LOGITS_ATOL = 1e-5


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _plain_oneshot(model, processor, dataset, recipe, **kwargs):
    torch.manual_seed(0)  # oneshot shuffles the calibration rows with the global RNG
    oneshot(
        model=model,
        processor=processor,
        dataset=dataset,
        recipe=str(qvlm_modifiers.recipe_path(recipe)),
        data_collator=data_collator,
        num_calibration_samples=len(dataset),
        **kwargs,
    )


def _probe(dataset):
    batch = data_collator([dataset[1]])  # a two-image row
    batch.pop("labels", None)
    return batch


def _untouched_prefixes(recipe: str, model) -> tuple[str, ...]:
    fam = get_family(model)
    return (fam.projector + ".",) if recipe.endswith("_vision") else (fam.vision_tower + ".", fam.projector + ".")


@pytest.mark.slow
@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_plain_oneshot_save_and_reload(recipe, family, saved_vlm, tmp_path):
    model, processor = _load(saved_vlm(family, checkpoint_like=True))
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dataset = plain_rows(processor, n=MATRIX_ROWS)
    _plain_oneshot(model, processor, dataset, recipe)
    batch = _probe(dataset)
    with torch.no_grad():
        quant_logits = model(**batch).logits

    out = tmp_path / "out"
    model.save_pretrained(out, save_compressed=True)
    processor.save_pretrained(out)

    reloaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), {k: sorted(v)[:5] for k, v in info.items() if v}
    fam = get_family(reloaded)
    quantized = [
        n
        for n, m in reloaded.named_modules()
        if n.startswith(fam.layers + ".") and (hasattr(m, "quantization_scheme") or hasattr(m, "weight_packed"))
    ]
    assert quantized, "no quantized decoder Linear after reload"
    state = reloaded.state_dict()
    kept = [k for k in original if k.startswith(_untouched_prefixes(recipe, reloaded))]
    assert kept and all(torch.equal(state[k], original[k]) for k in kept), "unquantized tensors changed on reload"
    with torch.no_grad():
        logits = reloaded(**batch).logits
    torch.testing.assert_close(logits, quant_logits, atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------------ modality labels
def test_derived_loss_mask_rules():
    model, _ = zoo.build("llava")
    image = model.config.image_token_index
    ids = torch.tensor([[1, image, image, 50, 51, 52, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, 51, 52, -100]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    mask, rule = derive_loss_mask(ids, model.config, labels=labels, attention_mask=attention)
    assert mask.tolist() == [[IGNORE, VISION, VISION, IGNORE, TEXT, TEXT, IGNORE]]
    assert "labels" in rule
    mask, rule = derive_loss_mask(ids, model.config, attention_mask=attention)
    assert mask.tolist() == [[TEXT, VISION, VISION, TEXT, TEXT, TEXT, IGNORE]]
    assert "non-image" in rule
    # Qwen2-VL: mm_token_type_ids marks image tokens (what its M-RoPE reads)
    qwen, _ = zoo.build("qwen2_vl")
    types = torch.tensor([[0, 1, 1, 0]])
    mask, _ = derive_loss_mask(torch.tensor([[5, 6, 7, 8]]), qwen.config, mm_token_type_ids=types)
    assert mask.tolist() == [[TEXT, VISION, VISION, TEXT]]


def _with_loss_mask(dataset, model, rule_labels: bool):
    def add(row):
        mask, _ = derive_loss_mask(
            row["input_ids"], model.config, labels=row["labels"] if rule_labels else None,
            attention_mask=row["attention_mask"], mm_token_type_ids=row.get("mm_token_type_ids"),
        )
        return {"loss_mask": mask.tolist()}

    return dataset.map(add)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_mbq_plain_rows_get_the_labels_rule_and_use_it(family, saved_vlm):
    """Plain rows with labels: MBQ's result equals an explicit-loss_mask run with the labels rule
    (so the derived labels reach the search and the sensitivity pass), and differs from the
    all-text rule (so the labels matter)."""
    from loguru import logger

    path = saved_vlm(family, checkpoint_like=True)
    model, processor = _load(path)
    dataset = plain_rows(processor, n=N_ROWS, labels=True)
    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="INFO")
    try:
        _plain_oneshot(model, processor, dataset, "mbq_w4")
    finally:
        logger.remove(sink)
    derived = [m for m in messages if "modality labels derived per row" in m]
    assert len(derived) == 1 and "labels != -100" in derived[0], derived

    def explicit(rule_labels):
        m, p = _load(path)
        rows = _with_loss_mask(dataset, m, rule_labels).remove_columns(["labels"])
        _plain_oneshot(m, p, rows, "mbq_w4", use_loss_mask=True)
        return m.state_dict()

    plain = model.state_dict()
    same = explicit(rule_labels=True)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    other = explicit(rule_labels=False)
    assert any(not torch.equal(plain[k], other[k]) for k in plain if "weight" in k)


def test_mbq_keeps_a_datasets_own_loss_mask_without_use_loss_mask(saved_vlm, calib_pairs):
    """Rows from build_calibration_dataset keep their own loss_mask, also through plain oneshot."""
    from qvlm_modifiers import data

    path = saved_vlm("llava")
    model, processor = _load(path)
    rows = data.build_calibration_dataset(calib_pairs, processor, model, num_samples=N_ROWS, shuffle=False)
    _plain_oneshot(model, processor, rows, "mbq_w4")  # no use_loss_mask
    reference, processor = _load(path)
    _plain_oneshot(reference, processor, rows, "mbq_w4", use_loss_mask=True)
    plain, ref = model.state_dict(), reference.state_dict()
    assert all(torch.equal(plain[k], ref[k]) for k in plain)


def test_row_with_neither_image_nor_text_refused_by_index(saved_vlm, tmp_path):
    model, processor = _load(saved_vlm("llava"))
    dataset = plain_rows(processor, n=3, labels=True)
    # row 2: text only (no image) and nothing supervised
    ids = processor(text=["USER: hello ASSISTANT: hi"])["input_ids"][0]
    bad = {c: dataset[0][c] for c in dataset.column_names}
    bad.update(input_ids=[ids], attention_mask=[[1] * len(ids)], labels=[[-100] * len(ids)])
    rows = [dataset[0], dataset[1], bad]
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    out = tmp_path / "out"
    with pytest.raises(CalibrationDataError, match=r"row 2 has neither image tokens .* nor text tokens"):
        _plain_oneshot(model, processor, dataset, "mbq_w3", output_dir=str(out))
    assert not out.exists()


def test_upstream_reload_of_plain_checkpoint(saved_vlm, tmp_path):
    """A plain-path checkpoint also reloads exactly in a process without this package's loader."""
    model, processor = _load(saved_vlm("qwen2_5_vl", checkpoint_like=True))
    dataset = plain_rows(processor, n=N_ROWS)
    _plain_oneshot(model, processor, dataset, "mbq_w4")
    batch = _probe(dataset)
    with torch.no_grad():
        quant_logits = model(**batch).logits
    model.save_pretrained(tmp_path / "out", save_compressed=True)
    with upstream_loading():
        reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, quant_logits, atol=LOGITS_ATOL, rtol=0)


def test_qvlm_token_weights_on_plain_rows(saved_vlm, tmp_path):
    """Q-VLM's modality-weighted objective (vision_token_weight != 1) also runs on plain rows: the
    derived labels give the same result as explicit loss_mask rows."""
    text, n = re.subn(r"(?m)^(\s+)quantize_vision_tower: .*$", r"\1quantize_vision_tower: false\n\1vision_token_weight: 0.25",
                      qvlm_modifiers.recipe_path("qvlm_w4").read_text())
    assert n == 1, "recipes/qvlm_w4.yaml has no quantize_vision_tower line: update this test"
    recipe = tmp_path / "qvlm_weighted.yaml"
    recipe.write_text(text)
    path = saved_vlm("idefics3", checkpoint_like=True)
    model, processor = _load(path)
    dataset = plain_rows(processor, n=N_ROWS)
    _plain_oneshot(model, processor, dataset, recipe)
    reference, processor = _load(path)
    rows = _with_loss_mask(dataset.add_column("labels", [None] * len(dataset)), reference, rule_labels=False)
    _plain_oneshot(reference, processor, rows.remove_columns(["labels"]), recipe, use_loss_mask=True)
    plain, ref = model.state_dict(), reference.state_dict()
    assert all(torch.equal(plain[k], ref[k]) for k in plain)
    assert model.config.qvlm_blocks["vision_token_weight"] == 0.25
