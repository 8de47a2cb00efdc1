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


@pytest.mark.parametrize("duo", [False, True], ids=["activation_only", "duo_scaling"])
def test_vision_weight_one_all_text_reduces_exactly_to_awq(llava, duo):
    """MBQ with uniform modality weights, AWQ's unmasked MSE and AWQ's grid chooses exactly
    llm-compressor AWQModifier's scales: activation-only (duo_scaling false, alpha = k/19) and duo
    scaling (x^a / w^(1-a), the identity plus 19 exponents)."""
    path, processor, rows = llava
    awq_model, rec = _run(path, processor, rows, SpyAWQ(duo_scaling=duo, n_grid=20),
                          _quant({**W3_G128}), use_loss_mask=False)
    awq_scales = rec["awq"]
    mbq = SpyMBQ(vision_weight=1.0, text_tokens="all_text", loss_mode="mse", loss_normalization="pooled",
                 alpha_grid="awq", activation_stats_tokens="all", duo_scaling=duo)
    mbq_model, rec = _run(path, processor, rows, mbq, _quant({**W3_G128}), use_loss_mask=True)
    mbq_scales = rec["mbq"]
    assert set(awq_scales) == set(mbq_scales) and len(awq_scales) >= 6  # >= 3 mappings x 2 layers
    for name in awq_scales:
        assert torch.equal(awq_scales[name], mbq_scales[name]), name
    awq_sd, mbq_sd = awq_model.state_dict(), mbq_model.state_dict()
    assert awq_sd.keys() == mbq_sd.keys()
    for key in awq_sd:
        assert torch.equal(awq_sd[key], mbq_sd[key]), key
    chosen = [(m["alpha"], m["duo_scaling"]) for m in mbq.diagnostics()["mappings"]]
    if duo:
        # the weight term was chosen somewhere, so the duo comparison is not the activation-only one again
        assert any(is_duo for _, is_duo in chosen)
    else:
        # and the default MBQ (labelled text, sensitivities, MAE, MBQ grid) chooses differently
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
    w, xs, masks, x_mean = _down_proj_case(path, rows)
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


def _oracle_diagnostics(path, rows, vision_weight):
    """Layer 0's up_proj -> down_proj, weight-only W3 g128, written out: per alpha the pooled
    weighted MAE and each modality's mean |dY| per token and channel."""
    w, xs, masks, x_mean = _down_proj_case(path, rows)
    results = []
    for alpha in alpha_grid(20, "mbq"):
        s = activation_scales(x_mean, alpha)
        text_sum = vision_sum = 0.0
        n_text = n_vision = 0
        for x, m in zip(xs, masks):
            err = (x @ w.T - x @ (_fq_group_asym(w * s, 3, 128) / s).T).abs().sum(-1)[0]
            text_sum += err[m == 1].sum().item()
            vision_sum += err[m == 2].sum().item()
            n_text, n_vision = n_text + int((m == 1).sum()), n_vision + int((m == 2).sum())
        c = w.shape[0]
        results.append({
            "alpha": alpha,
            "loss": (text_sum + vision_weight * vision_sum) / ((n_text + n_vision) * c),
            "text": text_sum / (n_text * c),
            "vision": vision_sum / (n_vision * c),
        })
    return results


def _down_proj_case(path, rows):
    """Layer 0's down_proj of a fresh model: its weight, its inputs per row, the rows' loss masks and
    the mean |x| over all tokens (what both oracles start from)."""
    model = _load(path)
    xs = _down_proj_inputs(model, rows)
    masks = [torch.tensor(rows[i]["loss_mask"]).reshape(-1) for i in range(len(rows))]
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    return decoder_layers(model)[0].mlp.down_proj.weight.detach(), xs, masks, flat.abs().sum(0) / flat.shape[0]


def _down_proj_inputs(model, rows):
    down = decoder_layers(model)[0].mlp.down_proj
    xs = []
    handle = down.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()))
    with torch.no_grad():
        for i in range(len(rows)):
            batch = data.collate_fn([rows[i]])
            batch.pop("loss_mask")
            model(**batch)
    handle.remove()
    return xs


def test_diagnostics_match_the_written_out_search_and_reach_the_run_record(llava):
    """Per mapping: the chosen exponent and the identity-vs-chosen loss per modality equal an
    independent computation (float32 sums over ~10^4 elements in another order: rel 1e-4), and the
    whole record is what the run record gets (JSON, one entry per searched mapping)."""
    import json

    from qvlm_modifiers.mbq.diagnostics import last_run_diagnostics, take_run_diagnostics

    path, processor, rows = llava
    mbq = SpyMBQ(vision_weight=0.3)
    _, rec = _run(path, processor, rows, mbq, _quant(W3_G128))
    oracle = _oracle_diagnostics(path, rows, 0.3)
    best = min(range(len(oracle)), key=lambda i: oracle[i]["loss"])
    [record] = [m for m in mbq.diagnostics()["mappings"] if m["mapping"] == "model.language_model.layers.0.mlp.up_proj"]
    assert record["alpha"] == oracle[best]["alpha"] and record["duo_scaling"] is False and best > 0
    assert record["vision_weight"] == 0.3
    for key, oracle_key in (("loss", "loss"), ("text_error", "text"), ("vision_error", "vision")):
        assert record[key]["identity"] == pytest.approx(oracle[0][oracle_key], rel=1e-4), key
        assert record[key]["chosen"] == pytest.approx(oracle[best][oracle_key], rel=1e-4), key
    assert record["loss"]["chosen"] < record["loss"]["identity"]
    published = last_run_diagnostics()
    assert json.loads(json.dumps(published)) == published
    assert {m["mapping"] for m in published["mappings"]} == set(rec["mbq"])
    assert published["settings"]["vision_weight"] == 0.3 and published["sensitivity"] is None
    # with computed sensitivities the record carries them (per-layer gradients, ratios, zero-gradient rows)
    _run(path, processor, rows, SpyMBQ(), _quant(W3_G128))
    sens = take_run_diagnostics()["sensitivity"]
    assert set(sens["ratios"]) == {"0", "1"} and sens["zero_text_grad_samples"] == 0
    assert last_run_diagnostics() is None and take_run_diagnostics() is None  # taken once


@pytest.mark.parametrize("wa", [False, True], ids=["w3_g128", "w4a8"])
def test_scale_choice_matches_independent_search(llava, wa):
    path, processor, rows = llava
    expected, margin = _oracle_down_proj_scales(path, rows, vision_weight=0.3, wa=wa)
    quant = _quant(W4_CHANNEL_SYM, A8_TOKEN) if wa else _quant(W3_G128)
    _, rec = _run(path, processor, rows, SpyMBQ(vision_weight=0.3), quant)
    got = rec["mbq"]["model.language_model.layers.0.mlp.up_proj"]
    # the oracle's best alpha beats the runner-up by `margin` (relative), far above float32 noise
    assert margin > 1e-5
    assert (expected - 1).abs().max() > 0.01  # a non-trivial alpha (not the identity candidate, s == 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def answer_only_rows(llava, calib_pairs):
    path, processor, _ = llava
    return data.build_calibration_dataset(calib_pairs.select(range(4)), processor, _load(path),
                                          prompt_column="question", text_mask="answer")


def test_wa_mode_inferred_from_scheme_and_changes_choice(llava, answer_only_rows):
    path, processor, _ = llava
    # answer-only text labels: on these 4 tiny rows the assistant-turn labels happen to give the same
    # choice with and without activation quantization; the answer-only ones do not
    rows = answer_only_rows
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


# ---------------------------------------------------------------- clip search inside the modifier
CLIPPED: dict[str, torch.Tensor] = {}


class ClipSpyMBQ(SpyMBQ):
    """Records the balance layers' (unscaled) weights the smoothing will scale, after the clip search."""

    def _compute_best_scale(self, mapping, fp16_outputs, orig_layer_weights):
        best = super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
        for name, layer in zip(mapping.balance_names, mapping.balance_layers):
            CLIPPED[name] = orig_layer_weights[layer].clone()
        return best


def _oracle_clipped_down_proj(path, rows, scales, token_weight):
    """AWQ auto_clip for layer 0's down_proj on the scaled weight W*s and inputs x/s, written out with
    matmuls and the plain-torch group quantizer: per ratio 1 - i/20 (i < 10) the per-group squared
    partial-output error, token-weighted, first minimum; returns clamp(W, -m/s, m/s)."""
    model = _load(path)
    w = decoder_layers(model)[0].mlp.down_proj.weight.detach()
    xs = _down_proj_inputs(model, rows)
    masks = [torch.tensor(rows[i]["loss_mask"]).reshape(-1) for i in range(len(rows))]
    x = torch.cat([xi[0] for xi in xs]) / scales
    tw = torch.cat([token_weight(m) for m in masks])
    keep = tw > 0
    x, tw = x[keep].double(), tw[keep].double()
    ws = w * scales
    out_f, in_f = ws.shape
    n_groups = in_f // 128
    ref = torch.stack([x[:, g * 128:(g + 1) * 128] @ ws[:, g * 128:(g + 1) * 128].double().T for g in range(n_groups)])
    org_max = ws.reshape(out_f, n_groups, 128).abs().amax(-1)
    errs = []
    for i in range(10):
        m = org_max * (1 - i / 20)
        bound = m.repeat_interleave(128, dim=1)
        q = _fq_group_asym(torch.clamp(ws, -bound, bound), 3, 128).double()
        out = torch.stack([x[:, g * 128:(g + 1) * 128] @ q[:, g * 128:(g + 1) * 128].T for g in range(n_groups)])
        errs.append(((out - ref) ** 2 * tw[None, :, None]).sum(1).T)  # (out, groups)
    errs = torch.stack(errs)  # (ratios, out, groups)
    idx = errs.argmin(0)  # first minimum
    ratio = 1 - idx.double() / 20
    bound = (org_max.double() * ratio).repeat_interleave(128, dim=1) / scales.double()
    return torch.clamp(w.double(), -bound, bound).float(), idx


@pytest.mark.parametrize("uniform", [False, True], ids=["mbq_weights", "uniform_awq_baseline"])
def test_clip_search_matches_written_out_auto_clip(llava, uniform):
    """clip_search: true on W3 g128 with every calibration token sampled (clip_tokens large): the
    clipped down_proj of layer 0 equals the written-out search with MBQ's token weights (text 1,
    vision r, others 0; pooled) or, for the AWQ baseline (vision_weight 1, all_text), weight 1 on
    every token. float32 einsum vs float64 loops pick the same ratio; the weights agree to rounding."""
    path, processor, rows = llava
    kwargs = dict(vision_weight=1.0, text_tokens="all_text") if uniform else dict(vision_weight=0.3)
    CLIPPED.clear()
    mbq = ClipSpyMBQ(clip_search=True, clip_tokens=10**6, **kwargs)
    _, rec = _run(path, processor, rows, mbq, _quant(W3_G128))
    scales = rec["mbq"]["model.language_model.layers.0.mlp.up_proj"]

    def token_weight(m):
        return torch.ones(m.shape) if uniform else (m == 1).float() + 0.3 * (m == 2).float()

    expected, idx = _oracle_clipped_down_proj(path, rows, scales, token_weight)
    got = CLIPPED["model.language_model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (idx > 0).any()  # some group was clipped: the check is not the identity
    # q/k projections are not clipped (AWQ); v/gate/up/down are recorded in the diagnostics
    [record] = [m for m in mbq.diagnostics()["mappings"] if m["mapping"].endswith("layers.0.input_layernorm")]
    assert set(record["clip"]) == {"model.language_model.layers.0.self_attn.v_proj"}


def test_clip_search_refuses_unsupported_weight_schemes(llava):
    from qvlm_modifiers.errors import RecipeError

    path, processor, rows = llava
    tensor_scheme = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"}
    with pytest.raises(RecipeError, match="clip_search: false"):
        _run(path, processor, rows, SpyMBQ(vision_weight=0.3, clip_search=True), _quant(tensor_scheme))


def test_wa_mode_with_duo_scaling_uses_the_duo_candidates(llava):
    """W-A mode with duo_scaling: the activation hook gets one scale vector per grid candidate, the
    identity first (AWQ's duo grid), and every chosen candidate is on that grid."""
    from qvlm_modifiers.mbq.scale_search import duo_grid

    seen = []

    class WASpy(SpyMBQ):
        def _compute_loss(self, fp16_outputs, int_w_outputs):
            seen.append(self._wa_scales.clone())
            return super()._compute_loss(fp16_outputs, int_w_outputs)

    path, processor, rows = llava
    mbq = WASpy(vision_weight=0.3, duo_scaling=True)
    _, rec = _run(path, processor, rows, mbq, _quant(W4_CHANNEL_SYM, A8_TOKEN))
    assert len(seen) == 20 * len(rec["mbq"])
    assert torch.equal(seen[0], torch.ones_like(seen[0]))  # the identity candidate comes first
    for record in mbq.diagnostics()["mappings"]:
        assert (record["alpha"], record["duo_scaling"]) in duo_grid(20, True)


def test_new_options_on_plain_rows_without_loss_mask(llava):
    """Plain processor rows (no loss_mask, no use_loss_mask) with duo scaling and clip search: labels
    derived per row (qvlm_modifiers.modality), every mapping searched, clipped and recorded."""
    path, processor, rows = llava
    plain = rows.remove_columns("loss_mask")
    mbq = SpyMBQ(vision_weight=0.3, duo_scaling=True, clip_search=True)
    _, rec = _run(path, processor, plain, mbq, _quant(W3_G128), use_loss_mask=False)
    records = mbq.diagnostics()["mappings"]
    assert {r["mapping"] for r in records} == set(rec["mbq"]) and len(records) >= 6
    assert all(r["text_error"]["identity"] is not None and r["vision_error"]["identity"] is not None for r in records)
    assert all(r["clip"] for r in records)  # every mapping has a clipped (non-q/k) balance layer
