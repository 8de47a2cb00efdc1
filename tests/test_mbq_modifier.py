"""MBQModifier inside llm-compressor's oneshot: exact AWQ reduction, scale choice vs an independent
brute-force search (weight-only and W-A), sensitivity plumbing, scoping and input errors (CPU-only)."""

from __future__ import annotations

import pytest
import torch
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForImageTextToText, AutoProcessor

import qvlm_modifiers
from qvlm_modifiers import data
from qvlm_modifiers.errors import CalibrationDataError
from qvlm_modifiers.families import decoder_layers
from qvlm_modifiers.lm_scoped import LMAWQModifier
from qvlm_modifiers.mbq import modifier as mbq_modifier_module
from qvlm_modifiers.mbq.modifier import MBQModifier
from qvlm_modifiers.mbq.scale_search import activation_scales, alpha_grid
from qvlm_modifiers.mbq.sensitivity import ModalitySensitivity, compute_modality_sensitivity

RECORDED: dict[str, dict[str, torch.Tensor]] = {}
BALANCE_NAMES: dict[str, list[str]] = {}

W3_G128 = {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}
W4_CHANNEL_SYM = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
A8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]



def _record(tag, mapping, scales):
    RECORDED.setdefault(tag, {})[mapping.smooth_name] = scales.clone()
    BALANCE_NAMES[mapping.smooth_name] = list(mapping.balance_names)


class SpyMBQ(MBQModifier):
    def _compute_best_scale(self, mapping, fp16_outputs, orig_layer_weights):
        best = super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
        _record("mbq", mapping, best)
        return best


class SpyAWQ(LMAWQModifier):
    def _compute_best_scale(self, mapping, fp16_outputs, orig_layer_weights):
        best = super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
        _record("awq", mapping, best)
        return best


@pytest.fixture(scope="module")
def llava(saved_vlm, calib_pairs):
    path = saved_vlm("llava")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    rows = data.build_calibration_dataset(calib_pairs.select(range(4)), processor, model, prompt_column="question")
    return path, processor, rows


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path)


def _quant(weights, acts=None):
    group = {"targets": ["Linear"], "weights": weights}
    if acts is not None:
        group["input_activations"] = acts
    return QuantizationModifier(config_groups={"group_0": group}, ignore=IGNORE)


def _run(path, processor, rows, transform, quant, use_loss_mask=True):
    RECORDED.clear()
    model = _load(path)
    qvlm_modifiers.oneshot(
        model, processor=processor, dataset=rows, recipe=[transform, quant],
        use_loss_mask=use_loss_mask, num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,  # fixed order: float sums (x_mean, losses) are order-dependent
    )
    return model, {k: dict(v) for k, v in RECORDED.items()}


def test_vision_weight_one_all_text_reduces_exactly_to_awq(llava):
    path, processor, rows = llava
    awq_model, rec = _run(path, processor, rows, SpyAWQ(duo_scaling=False, n_grid=20),
                          _quant({**W3_G128}), use_loss_mask=False)
    awq_scales = rec["awq"]
    mbq = SpyMBQ(vision_weight=1.0, text_tokens="all_text", loss_mode="mse", loss_normalization="pooled",
                 alpha_grid="awq", activation_stats_tokens="all")
    mbq_model, rec = _run(path, processor, rows, mbq, _quant({**W3_G128}), use_loss_mask=True)
    mbq_scales = rec["mbq"]
    assert set(awq_scales) == set(mbq_scales) and len(awq_scales) >= 6  # >= 3 mappings x 2 layers
    for name in awq_scales:
        assert torch.equal(awq_scales[name], mbq_scales[name]), name
    awq_sd, mbq_sd = awq_model.state_dict(), mbq_model.state_dict()
    assert awq_sd.keys() == mbq_sd.keys()
    for key in awq_sd:
        assert torch.equal(awq_sd[key], mbq_sd[key]), key
    # and the default MBQ (answer tokens only, sensitivities, MAE, MBQ grid) chooses differently
    _, rec = _run(path, processor, rows, SpyMBQ(), _quant({**W3_G128}))
    assert any(not torch.equal(awq_scales[n], rec["mbq"][n]) for n in awq_scales)


# ---------------------------------------------------------------- independent brute-force oracle
def _fq_group_asym(w, bits, group):
    """compressed-tensors' asymmetric min/max group quantizer in plain torch (range includes 0)."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(out_f, in_f)


def _fq_channel_sym(w, bits):
    """compressed-tensors' symmetric per-channel quantizer: step = absmax / ((2^b - 1) / 2)."""
    step = w.abs().amax(-1, keepdim=True) / ((2**bits - 1) / 2)
    return torch.clamp(torch.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


def _fq_token_sym(x, bits):
    step = x.abs().amax(-1, keepdim=True).clamp(min=1e-5) / (2 ** (bits - 1) - 1)
    return torch.round(x / step) * step


def _oracle_down_proj_scales(path, rows, vision_weight, wa: bool):
    """Brute force for layer 0's up_proj -> down_proj mapping (parent = down_proj), written from
    the paper / reference code: x_mean over all tokens, alpha = k/20, candidate Q(W*s)/s (W-only) or
    Q_w(W*s) @ Q_tok(x/s) (W-A), pooled weighted MAE (answer tokens 1, vision tokens r, rest 0)."""
    model = _load(path)
    down = decoder_layers(model)[0].mlp.down_proj
    xs = []
    handle = down.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()))
    with torch.no_grad():
        for i in range(len(rows)):
            batch = data.collate_fn([rows[i]])
            batch.pop("loss_mask")
            model(**batch)
    handle.remove()
    masks = [torch.tensor(rows[i]["loss_mask"]).reshape(-1) for i in range(len(rows))]
    w = down.weight.detach()
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    x_mean = flat.abs().sum(0) / flat.shape[0]
    losses = []
    for alpha in alpha_grid(20, "mbq"):
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        num, den = 0.0, 0
        for x, m in zip(xs, masks):
            ref = x @ w.T
            if wa:
                out = _fq_token_sym(x / s, 8) @ _fq_channel_sym(w * s, 4).T
            else:
                out = x @ (_fq_group_asym(w * s, 3, 128) / s).T
            err = (ref - out).abs().sum(-1)[0]
            num += err[m == 1].sum().item() + vision_weight * err[m == 2].sum().item()
            den += int(((m == 1) | (m == 2)).sum()) * w.shape[0]
        losses.append(num / den)
    best = min(range(len(losses)), key=losses.__getitem__)
    ordered = sorted(losses)
    return activation_scales(x_mean, alpha_grid(20)[best]), (ordered[1] - ordered[0]) / ordered[0]


@pytest.mark.parametrize("wa", [False, True], ids=["w3_g128", "w4a8"])
def test_scale_choice_matches_independent_search(llava, wa):
    path, processor, rows = llava
    expected, margin = _oracle_down_proj_scales(path, rows, vision_weight=0.3, wa=wa)
    quant = _quant(W4_CHANNEL_SYM, A8_TOKEN) if wa else _quant(W3_G128)
    _, rec = _run(path, processor, rows, SpyMBQ(vision_weight=0.3), quant)
    got = rec["mbq"]["model.language_model.layers.0.mlp.up_proj"]
    # the oracle's best alpha beats the runner-up by `margin` (relative), far above float32 noise
    assert margin > 1e-5
    assert (expected - 1).abs().max() > 0.05  # a non-trivial alpha (not the identity candidate)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_wa_mode_inferred_from_scheme_and_changes_choice(llava):
    path, processor, rows = llava
    _, rec_wa = _run(path, processor, rows, SpyMBQ(vision_weight=0.3), _quant(W4_CHANNEL_SYM, A8_TOKEN))
    _, rec_w = _run(path, processor, rows, SpyMBQ(vision_weight=0.3, act_bits=None), _quant(W4_CHANNEL_SYM))
    _, rec_wa_explicit = _run(path, processor, rows, SpyMBQ(vision_weight=0.3, act_bits=8), _quant(W4_CHANNEL_SYM))
    for name in rec_wa["mbq"]:
        assert torch.equal(rec_wa["mbq"][name], rec_wa_explicit["mbq"][name])
    assert any(not torch.equal(rec_wa["mbq"][n], rec_w["mbq"][n]) for n in rec_w["mbq"])


def test_sensitivities_in_modifier_equal_standalone_and_file_roundtrip(llava, tmp_path):
    path, processor, rows = llava
    standalone = compute_modality_sensitivity(_load(path), rows, collate_fn=data.collate_fn)
    mbq = SpyMBQ()
    _, rec_auto = _run(path, processor, rows, mbq, _quant(W3_G128))
    for i, kinds in standalone.ratios.items():
        for kind, r in kinds.items():
            # same samples, possibly another order: float32 sums agree to ~1e-6 relative
            assert mbq._sensitivity.ratios[i][kind] == pytest.approx(r, rel=1e-5)
    # the same sensitivities from a file give the same scales
    _, rec_file = _run(path, processor, rows, SpyMBQ(sensitivity=str(mbq._sensitivity.save(tmp_path / "s.json"))),
                       _quant(W3_G128))
    for name in rec_auto["mbq"]:
        assert torch.equal(rec_auto["mbq"][name], rec_file["mbq"][name])
    # per-layer ratios all 1 == fixed vision_weight 1
    ones = {i: {"attn": 1.0, "mlp": 1.0} for i in standalone.ratios}
    _, rec_ones = _run(path, processor, rows, SpyMBQ(sensitivity=ones), _quant(W3_G128))
    _, rec_fixed = _run(path, processor, rows, SpyMBQ(vision_weight=1.0), _quant(W3_G128))
    for name in rec_ones["mbq"]:
        assert torch.equal(rec_ones["mbq"][name], rec_fixed["mbq"][name])


def test_fixed_vision_weight_skips_gradient_pass(llava, monkeypatch):
    path, processor, rows = llava

    def forbidden(*args, **kwargs):
        raise AssertionError("sensitivity pass must not run with a fixed vision_weight")

    monkeypatch.setattr(mbq_modifier_module, "compute_modality_sensitivity", forbidden)
    _run(path, processor, rows, SpyMBQ(vision_weight=0.5), _quant(W3_G128))


def test_only_language_model_is_smoothed(llava):
    path, processor, rows = llava
    before = _load(path).state_dict()
    model, rec = _run(path, processor, rows, SpyMBQ(vision_weight=0.2), _quant(W3_G128))
    assert rec["mbq"] and all(n.startswith("model.language_model.layers.") for n in rec["mbq"])
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            assert torch.equal(after[key], value), key


def test_rows_own_loss_mask_is_used_without_use_loss_mask(llava):
    """Without ``use_loss_mask`` llm-compressor hands the Modifier no masks; MBQ then takes each row's
    own ``loss_mask`` itself (qvlm_modifiers.modality), so the scales are those of the flagged run.
    (Rows without any loss_mask: tests/test_plain_path.py.)"""
    path, processor, rows = llava
    _, flagged = _run(path, processor, rows, SpyMBQ(vision_weight=0.2), _quant(W3_G128), use_loss_mask=True)
    _, plain = _run(path, processor, rows, SpyMBQ(vision_weight=0.2), _quant(W3_G128), use_loss_mask=False)
    assert set(flagged["mbq"]) == set(plain["mbq"]) and flagged["mbq"]
    for name, scales in flagged["mbq"].items():
        assert torch.equal(scales, plain["mbq"][name]), name


def test_sensitivity_file_errors_name_the_fix(tmp_path):
    with pytest.raises(CalibrationDataError, match="ModalitySensitivity.save"):
        ModalitySensitivity.load(tmp_path / "missing.json")


def test_recipe_fields_validate():
    mod = MBQModifier(sensitivity={"0": {"attn": 1, "mlp": 2}})  # YAML/JSON keys arrive as strings
    assert mod.sensitivity == {0: {"attn": 1.0, "mlp": 2.0}}
    assert (mod.duo_scaling, mod.n_grid, mod.loss_mode, mod.text_tokens, mod.alpha_grid) == (
        False, 20, "mae", "answer", "mbq"
    )
    for bad in ({"loss_mode": "l1"}, {"text_tokens": "prompt"}, {"vision_weight": -1}, {"act_bits": 1}):
        with pytest.raises(ValueError):
            MBQModifier(**bad)


def _apply_scales_by_hand(model, scales):
    """AWQ's smoothing, written out: smooth layer / s (rows of a Linear), balance layers' columns * s."""
    with torch.no_grad():
        for smooth_name, s in scales.items():
            smooth = model.get_submodule(smooth_name)
            if smooth.weight.ndim == 1:
                smooth.weight.div_(s)
            else:
                smooth.weight[-s.numel():].div_(s.view(-1, 1))
                if smooth.bias is not None:
                    smooth.bias.div_(s)
            for name in BALANCE_NAMES[smooth_name]:
                model.get_submodule(name).weight.mul_(s.view(1, -1))


def test_gptq_after_mbq_equals_gptq_on_the_smoothed_model(llava):
    """MBQ scales, then GPTQ: llm-compressor 0.14 runs each Modifier in its own pipeline pass, so
    GPTQ's Hessians come from the already-smoothed model. Checked against the same scales applied
    by hand to a fresh model followed by GPTQ alone: identical weights and qparams."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    path, processor, rows = llava

    def gptq():
        return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": W3_G128}},
                            ignore=IGNORE, dampening_frac=0.01)

    combined, rec = _run(path, processor, rows, SpyMBQ(vision_weight=0.3), gptq())
    reference = _load(path)
    _apply_scales_by_hand(reference, rec["mbq"])
    qvlm_modifiers.oneshot(reference, processor=processor, dataset=rows, recipe=[gptq()],
                           num_calibration_samples=len(rows), shuffle_calibration_samples=False)
    n_quantized = 0
    for name, module in combined.named_modules():
        if name.startswith("model.language_model.layers.") and isinstance(module, torch.nn.Linear):
            ref_module = reference.get_submodule(name)
            assert torch.equal(module.weight, ref_module.weight), name
            assert torch.equal(module.weight_scale, ref_module.weight_scale), name
            assert torch.equal(module.weight_zero_point, ref_module.weight_zero_point), name
            # int3 asymmetric: at most 8 levels per group of 128
            assert module.weight[0, :128].unique().numel() <= 8
            n_quantized += 1
    assert n_quantized == 14  # 7 linears x 2 layers
    # and the scales mattered: GPTQ on the unsmoothed model gives other weights
    plain = _load(path)
    qvlm_modifiers.oneshot(plain, processor=processor, dataset=rows, recipe=[gptq()],
                           num_calibration_samples=len(rows), shuffle_calibration_samples=False)
    name = "model.language_model.layers.0.mlp.down_proj"
    assert not torch.equal(plain.get_submodule(name).weight, combined.get_submodule(name).weight)
