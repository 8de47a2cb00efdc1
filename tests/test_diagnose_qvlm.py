"""eval/diagnose_qvlm.py's pure parts: the variant recipes it builds and the per-layer error it
reports (the diagnostics themselves run the default model, by hand)."""

from __future__ import annotations

import pytest
import torch
import yaml

import qvlm_modifiers
from qvlm_eval import diagnose_qvlm as diagnose


def _fields(text: str) -> dict:
    return yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["QVLMModifier"]


def test_variant_recipe_replaces_and_adds_fields():
    base = qvlm_modifiers.recipe_path("qvlm_w4").read_text()
    text = diagnose.variant_recipe(base, "x:search_epochs=0; init_shrink_factors=[1.0];block_target=quant_input")
    fields = _fields(text)
    assert fields["search_epochs"] == 0 and fields["init_shrink_factors"] == [1.0]
    assert fields["block_target"] == "quant_input"
    assert text.count("search_epochs:") == 1  # replaced, not duplicated
    rest = {k: v for k, v in fields.items() if k not in ("search_epochs", "init_shrink_factors", "block_target")}
    assert rest == {k: v for k, v in _fields(base).items() if k != "search_epochs"}
    assert diagnose.variant_recipe(base, "plain") == base


def test_variant_recipe_rejects_malformed_options():
    base = qvlm_modifiers.recipe_path("qvlm_w4").read_text()
    with pytest.raises(ValueError, match="not key=value"):
        diagnose.variant_recipe(base, "x:search_epochs")


def test_layer_mse_with_and_without_the_largest_token():
    # one row, two layers, three tokens of width 2; token 0 has the largest FP norm in both layers
    fp = [(torch.tensor([[10.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 20.0], [1.0, 1.0], [2.0, 0.0]]))]
    q = [(fp[0][0] + torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
          fp[0][1] + torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0]]))]
    mse, excl = diagnose.layer_mse(fp, q)
    assert mse == pytest.approx([(9 + 1) / 6, (4 + 4) / 6])
    assert excl == pytest.approx([1 / 4, (4 + 4) / 4])


def test_variant_recipe_refuses_to_replace_a_multiline_field():
    base = qvlm_modifiers.recipe_path("qvlm_w4").read_text()
    with pytest.raises(ValueError, match="several lines"):
        diagnose.variant_recipe(base, "x:config_groups={}")
