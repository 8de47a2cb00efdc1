"""eval/sweep_vision_opt.py end to end on the tiny Idefics3 zoo model (the default model's sweep is
recorded in eval/results/smolvlm-tiny/veo_sweep.md)."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest



def test_sweep_writes_baseline_and_veo_rows(saved_vlm, tmp_path, capsys, eval_script):
    sweep = eval_script("sweep_vision_opt")
    results = tmp_path / "results"
    rc = sweep.main([
        "--model", str(saved_vlm("idefics3")), "--configs", "none", "0.1,1,0.5",
        "--calib-samples", "2", "--vqa-questions", "4", "--kl-rows", "2", "--vision-epochs", "1",
        "--vision-lr", "1e-2", "--batch-size", "4", "--results-dir", str(results),
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| no VEO |" in out and "| (0.1, 1, 0.5) |" in out
    record = json.loads((results / "veo_sweep.json").read_text())
    md = (results / "veo_sweep.md").read_text()
    assert record["complete"] is True and "complete" in md and "INCOMPLETE" not in md
    assert "Q4_1 GGUF" in md and "| no VEO | no |" in md
    base, veo = record["configs"]
    # the baseline has no visual-encoder optimization, the other row ran it with the swept weights
    assert base["optimize_vision_encoder"] is False and base["veo"] is None
    assert veo["optimize_vision_encoder"] is True
    assert (veo["lambda_ent"], veo["lambda_err"], veo["eta"]) == (0.1, 1.0, 0.5)
    assert veo["veo"]["epochs"] == 1 and len(veo["veo"]["history"]) == 2  # 1 training pass + 1 measuring pass
    # the LM side is identical (search_epochs 0: lp-norm ranges from the weights only) ...
    assert base["language_model_weights_sha"] == veo["language_model_weights_sha"]
    # ... and VEO moved the vision tower's learned ranges away from the baseline's lp-norm ones
    assert base["vision_scales_sha"] != veo["vision_scales_sha"]
    assert veo["vision_scale_mean_abs_log_ratio_vs_baseline"] > 0
    for row in (base, veo):
        assert row["vqa"]["n"] == 4 and len(row["predictions"]) == 4
        assert row["kl"]["tokens"] == sum(row["kl_row_tokens"]) > 0 and row["kl"]["kl_mean"] >= 0
        assert row["kl"]["kl_mean"] == pytest.approx(sum(row["kl_row_sums"]) / sum(row["kl_row_tokens"]), rel=1e-5)
        assert row["visual_rel_mse"] > 0  # the vision tower is quantized in both
        assert row["calibration"]["wall_s"] > 0
    # the baseline compared with itself: no difference, all answers identical
    assert base["vs_baseline"]["accuracy"]["diff"] == 0 and base["vs_baseline"]["kl_mean"]["diff"] == 0
    assert base["vs_baseline"]["answers_identical_to_baseline"] == 1.0


def test_paired_bootstrap_against_direct_computation(eval_script):
    sweep = eval_script("sweep_vision_opt")
    rng = np.random.default_rng(1)
    a = rng.random(50)
    shifted = sweep.paired_bootstrap(a, a + 0.25)
    # a constant paired shift: every resample has exactly that difference (up to float rounding)
    assert shifted["diff"] == pytest.approx(0.25) and shifted["ci_low"] == pytest.approx(0.25)
    assert shifted["ci_high"] == pytest.approx(0.25) and shifted["significant"]
    sums_a, sums_b, tokens = rng.random(40), rng.random(40), rng.integers(1, 4, 40).astype(float)
    ratio = sweep.paired_bootstrap(sums_a, sums_b, weights=tokens)
    assert ratio["diff"] == pytest.approx(sums_b.sum() / tokens.sum() - sums_a.sum() / tokens.sum())
    assert ratio["ci_low"] <= ratio["diff"] <= ratio["ci_high"]
    same = sweep.paired_bootstrap(a, a.copy())
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0 and not same["significant"]


def test_config_syntax(eval_script):
    sweep = eval_script("sweep_vision_opt")
    assert sweep.parse_config("none")["optimize_vision_encoder"] is False
    c = sweep.parse_config("0.1,1,0.5@3")
    assert (c["lambda_ent"], c["lambda_err"], c["eta"], c["calib_seed"]) == (0.1, 1.0, 0.5, 3)
    with pytest.raises(SystemExit, match="LAMBDA_ENT,LAMBDA_ERR,ETA"):
        sweep.parse_config("0.1,1")
    with pytest.raises(SystemExit, match="negative"):
        sweep.parse_config("0.1,-1,0.5")


@pytest.mark.parametrize("lm_scheme", ["w8a8", "fp"])
def test_lm_scheme_quantizes_the_vision_tower_at_w4a4_and_the_decoder_as_asked(saved_vlm, eval_script, lm_scheme):
    """The sweep's recipe: every vision-tower Linear W4A4, every decoder Linear at --lm-scheme (none for fp);
    nothing else (norms, projector, lm_head) is matched. Checked on the quantized model itself."""
    import argparse

    import qvlm_modifiers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qvlm_modifiers.testing import zoo
    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.families import get_family

    sweep = eval_script("sweep_vision_opt")
    path = saved_vlm("idefics3")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    family = get_family(model)
    args = argparse.Namespace(lm_scheme=lm_scheme, max_block_layers=3, search_epochs=0)
    recipe = sweep.make_modifier(sweep.parse_config("none"), args, model)
    calib = build_calibration_dataset(zoo.sample_pairs(2, seed=0), processor, model, prompt_column="question",
                                      text_column="text")
    qvlm_modifiers.oneshot(model=model, processor=processor, dataset=calib, recipe=recipe, num_calibration_samples=2)
    schemes = {name: getattr(m, "quantization_scheme", None) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    vision = {n: s for n, s in schemes.items() if n.startswith(family.vision_tower + ".")}
    decoder = {n: s for n, s in schemes.items() if n.startswith(family.layers + ".")}
    others = {n: s for n, s in schemes.items() if n not in vision and n not in decoder}
    assert vision and decoder and others
    for s in vision.values():
        assert (s.weights.num_bits, s.input_activations.num_bits, s.input_activations.strategy) == (4, 4, "token")
    if lm_scheme == "fp":
        assert all(s is None for s in decoder.values())
    else:
        for s in decoder.values():
            assert (s.weights.num_bits, s.weights.symmetric, s.input_activations.num_bits) == (8, True, 8)
    assert all(s is None for s in others.values()), [n for n, s in others.items() if s is not None]
    norms = [m for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(getattr(m, "quantization_scheme", None) is None for m in norms)
