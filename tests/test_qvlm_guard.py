"""Q-VLM never worse than round-to-nearest (qvlm_modifiers.qvlm.guard, issue #24): min/max is
candidate 0 and the start of every search, the search never sees the held-out rows, and a block whose
searched ranges raise the objective on them reverts to min/max. The RTN objectives are recomputed
here in plain PyTorch with a textbook quantizer."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle import initialize_module_for_quantization
from transformers import AutoModelForImageTextToText, AutoProcessor

import qvlm_modifiers
from qvlm_modifiers import data
from qvlm_modifiers.families import decoder_layers
from qvlm_modifiers.qvlm import QVLMModifier
from qvlm_modifiers.qvlm.block_search import search_block
from qvlm_modifiers.qvlm.cached_forward import quantization_enabled
from qvlm_modifiers.qvlm.guard import guard_decision, holdout_batch_indices
from qvlm_modifiers.qvlm.objective import batch_squared_errors, subset_loss, token_error_weights
from qvlm_modifiers.qvlm.range_variables import qparam_variable
from qvlm_modifiers.qvlm.ranges import flatten_for_ranges, minmax_range

W4C = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="channel")


def _textbook_rtn(weight: torch.Tensor, group: int, bits: int = 4, symmetric: bool = False) -> torch.Tensor:
    """Min/max round-to-nearest per (row, group) on the signed grid [-2^(b-1), 2^(b-1)-1]:
    asymmetric (range widened to contain 0) or symmetric (scale = max|w| / ((qmax - qmin) / 2))."""
    out = torch.empty_like(weight)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for g in range(0, weight.shape[1], group):
        w = weight[:, g:g + group]
        if symmetric:
            scale = w.abs().amax(1, keepdim=True) / ((qmax - qmin) / 2)
            zp = torch.zeros_like(scale)
        else:
            low = w.amin(1, keepdim=True).clamp(max=0)
            high = w.amax(1, keepdim=True).clamp(min=0)
            scale = (high - low) / (qmax - qmin)
            zp = torch.clamp(torch.round(qmin - low / scale), qmin, qmax)
        out[:, g:g + group] = (torch.clamp(torch.round(w / scale) + zp, qmin, qmax) - zp) * scale
    return out


def test_holdout_split():
    assert holdout_batch_indices(1, 0.25) == [] and holdout_batch_indices(8, 0.0) == []
    assert holdout_batch_indices(2, 0.25) == [1] and holdout_batch_indices(8, 0.25) == [3, 7]
    for n in range(2, 40):
        for f in (0.1, 0.25, 0.5, 0.9):
            held = holdout_batch_indices(n, f)
            assert 1 <= len(held) <= n - 1 and 0 not in held and len(set(held)) == len(held)
    with pytest.raises(ValueError):
        holdout_batch_indices(4, 1.0)


def test_guard_decision_compares_held_out_rows():
    rtn = [(4.0, 2), (4.0, 2), (4.0, 2)]
    better_everywhere = [(1.0, 2), (1.0, 2), (3.0, 2)]
    overfit = [(0.0, 2), (0.0, 2), (6.0, 2)]  # better on the search rows, worse on the held-out row
    assert guard_decision(better_everywhere, rtn, [2]).winner == "searched"
    d = guard_decision(overfit, rtn, [2])
    assert d.winner == "rtn" and d.holdout_loss_searched == 3.0 and d.holdout_loss_rtn == 2.0
    assert d.loss_searched == pytest.approx(1.0) and d.loss_rtn == pytest.approx(2.0)
    assert guard_decision(rtn, rtn, [2]).winner == "searched"  # "does not rise": ties keep the search
    assert guard_decision(overfit, rtn, []).winner == "searched"  # no held-out rows: all rows decide
    assert subset_loss(overfit, [0, 1]) == 0.0
    # min/max run on the held-out row only: decided there, its all-rows objective unknown (None)
    d = guard_decision(better_everywhere, [None, None, (4.0, 2)], [2])
    assert d.winner == "searched" and d.holdout_loss_rtn == 2.0 and d.loss_rtn is None
    with pytest.raises(ValueError, match="run the batches"):
        guard_decision(better_everywhere, [None, None, (4.0, 2)], [])


def test_sink_free_objective_drops_position_zero():
    y = torch.randn(2, 5, 3)
    w = token_error_weights(y, "mse_skip_first")
    assert w.shape == (2, 5, 1) and w[:, 0].eq(0).all() and w[:, 1:].eq(1).all()


def _overfit_case(held_out_silent: bool):
    """One Linear (4 outputs, 16 inputs, int4 per channel): input channel 3 carries every row's
    largest weight. On the search batches 0-1 that channel is silent, so a range clipped to 30% of
    min/max (finer steps for the other weights, channel 3 clipped) looks far better than RTN; on the
    held-out batch 2 channel 3 is loud (unless ``held_out_silent``) and the clip is far worse."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        w = torch.randn(4, 16, generator=g) * 0.1
        w[:, 3] = torch.tensor([5.0, -5.0, 4.0, -4.5])
        lin.weight.copy_(w)
    initialize_module_for_quantization(lin, QuantizationScheme(targets=["Linear"], weights=W4C))
    observed = flatten_for_ranges(lin.weight.detach(), "weight", W4C)
    low, high = minmax_range(observed)
    var = qparam_variable(lin, "weight", observed, W4C, "lin", (), [1.0], [(low * 0.3, high * 0.3, "clip 0.3")])
    assert var.labels == ["rtn", "clip 0.3"] and var.current == 0
    inputs = []
    for b in range(3):
        x = torch.randn(1, 32, 16, generator=g)
        if b < 2 or held_out_silent:
            x[..., 3] = 0.0
        else:
            x[..., 3] *= 3.0
        inputs.append(x)
    with torch.no_grad(), quantization_enabled([lin], False):
        targets = [lin(x) for x in inputs]
    return lin, var, inputs, targets


@torch.no_grad()
@pytest.mark.parametrize("held_out_silent", [False, True])
def test_guard_reverts_an_overfit_search_to_rtn(held_out_silent):
    lin, var, inputs, targets = _overfit_case(held_out_silent)
    layers = [lambda h, b: lin(h)]

    def quantized(on):
        return quantization_enabled([lin], on)

    holdout = holdout_batch_indices(3, 0.25)
    assert holdout == [2]
    search_block(layers, [[var]], quantized, inputs, [targets], epochs=5, train_batches=[0, 1])
    assert var.label == "clip 0.3"  # the search, seeing batches 0-1 only, takes the clip

    def errors(state):
        var.current = state
        var.set(state)
        with quantized(True):
            return batch_squared_errors([lin(x) for x in inputs], targets)

    searched, rtn = errors(1), errors(0)
    decision = guard_decision(searched, rtn, holdout)
    # RTN's objective, independently: textbook min/max int4 per row, squared error per element
    w_rtn = _textbook_rtn(lin.weight.detach(), 16)
    for b, x in enumerate(inputs):
        ref = ((x @ w_rtn.T - targets[b]) ** 2).sum().item()
        assert rtn[b][0] == pytest.approx(ref, rel=1e-5)  # float32 sums in another order
    ref_holdout = ((inputs[2] @ w_rtn.T - targets[2]) ** 2).mean().item()
    assert decision.holdout_loss_rtn == pytest.approx(ref_holdout, rel=1e-5)
    if held_out_silent:  # the clip generalises: kept
        assert decision.winner == "searched"
        assert decision.holdout_loss_searched <= decision.holdout_loss_rtn and decision.loss_searched <= decision.loss_rtn
    else:  # overfit: better on the search rows, worse on the held-out row -> back to RTN
        assert subset_loss(searched, [0, 1]) < subset_loss(rtn, [0, 1])
        assert decision.holdout_loss_searched > decision.holdout_loss_rtn
        assert decision.winner == "rtn"


def _block_outputs(model, rows, layer: int):
    outs = []
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda _m, _a, out: outs.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        for i in range(len(rows)):
            batch = data.collate_fn([rows[i]])
            batch.pop("loss_mask", None)
            model(**batch)
    handle.remove()
    return outs


def test_modifier_never_worse_than_rtn_on_any_block(saved_vlm, calib_pairs):
    """Shipped defaults at W4A16 (AWQ clip candidates, 25% held out) on 4 rows: every block's final
    objective is <= min/max's on the held-out rows, a block that reverted holds min/max ranges only,
    and the held-out RTN objective of block [0] equals an independent forward of the model with
    textbook min/max int4 weights in layer 0 (float32 sums in another order: rel 1e-4)."""
    path = saved_vlm("llava", num_layers=4)
    processor = AutoProcessor.from_pretrained(path)
    fp_model = AutoModelForImageTextToText.from_pretrained(path)
    rows = data.build_calibration_dataset(calib_pairs.select(range(4)), processor, fp_model, prompt_column="question")
    fp_out = _block_outputs(fp_model, rows, 0)
    rtn_model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        for m in decoder_layers(rtn_model)[0].modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(_textbook_rtn(m.weight, 128, symmetric=True))  # W4A16: int4 sym, group 128
    rtn_out = _block_outputs(rtn_model, rows, 0)

    model = AutoModelForImageTextToText.from_pretrained(path)
    qvlm_modifiers.oneshot(model, processor=processor, dataset=rows, num_calibration_samples=4, shuffle_calibration_samples=False,
                           recipe=QVLMModifier(scheme="W4A16", targets=["Linear"], max_block_layers=1, search_epochs=2))
    records = model.config.qvlm_blocks["block_losses"]
    assert [r["layers"] for r in records] == [[0], [1], [2], [3]]
    for rec in records:
        guard = rec["guard"]
        assert guard["holdout_batches"] == 1
        if guard["winner"] == "rtn":  # min/max then ran on every row
            assert rec["loss"] == guard["loss_rtn"]
        final_holdout = guard["holdout_loss_searched"] if guard["winner"] == "searched" else guard["holdout_loss_rtn"]
        assert final_holdout <= guard["holdout_loss_rtn"]
        if guard["winner"] == "rtn":
            assert set(rec["choices"].values()) == {"rtn"}
        assert any(v.startswith("clip") for v in rec["choices"].values()) or guard["winner"] == "rtn"
    # the default objective, token_relative_mse: mean over tokens of ||out_t - y_t||^2 / ||y_t||^2
    d = fp_out[0].shape[-1]
    rel = [((a - b) ** 2).reshape(-1, d).sum(-1) / (b**2).reshape(-1, d).sum(-1) for a, b in zip(rtn_out, fp_out)]
    held = holdout_batch_indices(4, 0.25)  # min/max runs on the held-out rows (all rows where it wins)
    ref = torch.cat([rel[b] for b in held]).mean().item()
    assert records[0]["guard"]["holdout_loss_rtn"] == pytest.approx(ref, rel=1e-4)


def test_a_block_the_guard_rejects_is_exactly_rtn(saved_vlm, calib_pairs, monkeypatch):
    """Min/max runs on the held-out rows only; when it wins, the Modifier re-runs it on every row
    (the next block's inputs) and leaves min/max ranges. Forced here (the guard always picks RTN):
    the quantized model's output equals textbook min/max int4 in every layer, within float32
    rounding, and every block reports min/max's objective on all rows."""
    import qvlm_modifiers.qvlm.base as base

    real = base.guard_decision

    def always_rtn(searched, rtn, holdout):
        decision = real(searched, rtn, holdout)
        decision.winner = "rtn"
        return decision

    monkeypatch.setattr(base, "guard_decision", always_rtn)
    path = saved_vlm("llava", num_layers=3)
    processor = AutoProcessor.from_pretrained(path)
    rows = data.build_calibration_dataset(calib_pairs.select(range(4)), processor,
                                          AutoModelForImageTextToText.from_pretrained(path), prompt_column="question")
    rtn_model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        for layer in decoder_layers(rtn_model):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(_textbook_rtn(m.weight, 128, symmetric=True))
    model = AutoModelForImageTextToText.from_pretrained(path)
    qvlm_modifiers.oneshot(model, processor=processor, dataset=rows, num_calibration_samples=4,
                           shuffle_calibration_samples=False,
                           recipe=QVLMModifier(scheme="W4A16", targets=["Linear"], max_block_layers=1))
    records = model.config.qvlm_blocks["block_losses"]
    assert len(records) == 3
    for rec in records:
        assert rec["guard"]["winner"] == "rtn" and set(rec["choices"].values()) == {"rtn"}
        assert rec["guard"]["loss_rtn"] is not None and rec["loss"] == rec["guard"]["loss_rtn"]
    batch = data.collate_fn([rows[0]])
    batch.pop("loss_mask", None)
    with torch.no_grad():
        ours, ref = model(**batch).logits, rtn_model(**batch).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
