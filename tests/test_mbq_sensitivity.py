"""MBQ modality sensitivity: the gradient pass against an independent autograd computation."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from qvlm_modifiers import data
from qvlm_modifiers.errors import CalibrationDataError
from qvlm_modifiers.families import decoder_layers
from qvlm_modifiers.mbq.sensitivity import (
    ModalitySensitivity,
    compute_modality_sensitivity,
    floor_at_median,
    modality_mean_abs_gradient,
    sensitivity_ratios,
)



@pytest.fixture(scope="module")
def llava_and_rows(saved_vlm, calib_pairs):
    path = saved_vlm("llava")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    rows = data.build_calibration_dataset(calib_pairs.select(range(3)), processor, model, prompt_column="question")
    return model, rows


def _independent_ratios(model, rows):
    """Plain autograd: retain_grad on every o_proj/down_proj output, hand-written shifted CE on
    answer tokens, then mean |grad| per modality, sample average, ratio."""
    layers = decoder_layers(model)
    stats = {}  # (layer, kind) -> ([gv per sample], [gt per sample])
    for row_idx in range(len(rows)):
        batch = data.collate_fn([rows[row_idx]])
        mask = batch.pop("loss_mask")[0]
        outputs = {}
        handles = []
        for i, layer in enumerate(layers):
            for kind, mod in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
                def keep(_m, _a, out, key=(i, kind)):
                    out.retain_grad()
                    outputs[key] = out
                handles.append(mod.register_forward_hook(keep))
        model.zero_grad(set_to_none=True)
        logits = model(**batch, use_cache=False).logits[0].double()
        for h in handles:
            h.remove()
        # next-token CE over positions whose *target* is an answer token
        target_is_answer = mask[1:] == 1
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll = -logp[torch.arange(len(mask) - 1), batch["input_ids"][0, 1:]]
        loss = nll[target_is_answer].mean()
        loss.backward()
        for key, out in outputs.items():
            g = out.grad[0].abs().double()
            gv, gt = stats.setdefault(key, ([], []))
            gv.append(g[mask == 2].mean().item())
            gt.append(g[mask == 1].mean().item())
    model.zero_grad(set_to_none=True)
    return {k: (sum(v) / len(v)) / (sum(t) / len(t)) for k, (v, t) in stats.items()}


def test_sensitivity_matches_independent_autograd(llava_and_rows):
    model, rows = llava_and_rows
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    expected = _independent_ratios(model, rows)

    got = compute_modality_sensitivity(model, rows, median_floor=False, collate_fn=data.collate_fn)
    assert got.num_samples == len(rows)
    n_layers = len(decoder_layers(model))
    for i in range(n_layers):
        for kind in ("attn", "mlp"):
            # float32 forward/backward in both; the reference CE is in float64 and sums in another
            # order, so relative agreement ~1e-6; 1e-4 leaves margin while a wrong mask, a wrong
            # gradient location or a missing sample average would be off by >> 1e-2.
            assert got.raw_ratios[i][kind] == pytest.approx(expected[(i, kind)], rel=1e-4)
            assert got.ratios[i][kind] == got.raw_ratios[i][kind]
            assert got.text_grad[i][kind] > 0
    # vision tokens reach the answer loss through later layers' attention only: non-zero before the
    # last layer, exactly zero at the last one (what the median floor is for)
    assert got.vision_grad[0]["attn"] > 0 and got.vision_grad[0]["mlp"] > 0
    assert got.vision_grad[n_layers - 1]["mlp"] == 0.0

    floored = compute_modality_sensitivity(model, rows, median_floor=True, collate_fn=data.collate_fn)
    for kind in ("attn", "mlp"):
        med = statistics.median(expected[(i, kind)] for i in range(n_layers))
        for i in range(n_layers):
            assert floored.ratios[i][kind] == pytest.approx(max(expected[(i, kind)], med), rel=1e-4)

    # the pass changes no weight and restores requires_grad
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]) and p.requires_grad == flags_before[n] and p.grad is None


def test_pure_helpers():
    grad = torch.tensor([[[1.0, -3.0], [2.0, 2.0], [-5.0, 1.0], [0.5, 0.5]]])
    mask = torch.tensor([[0, 1, 2, 1]])
    [(gv, gt)] = modality_mean_abs_gradient(grad, mask)
    assert gv == pytest.approx(3.0) and gt == pytest.approx((2 + 2 + 0.5 + 0.5) / 4)
    [(gv, gt)] = modality_mean_abs_gradient(grad, mask, "all_text")
    assert gt == pytest.approx((1 + 3 + 2 + 2 + 0.5 + 0.5) / 6)
    [(gv, gt)] = modality_mean_abs_gradient(grad, torch.tensor([[0, 1, 1, 1]]))
    assert gv is None
    assert sensitivity_ratios({"a": [1.0, 3.0]}, {"a": [4.0]}) == {"a": 0.5}
    assert floor_at_median({0: 0.1, 1: 0.5, 2: 0.3}) == {0: 0.3, 1: 0.5, 2: 0.3}
    with pytest.raises(CalibrationDataError, match="vision"):
        sensitivity_ratios({"a": []}, {"a": [1.0]})


def test_save_load_roundtrip_and_bad_file(tmp_path):
    sens = ModalitySensitivity(ratios={0: {"attn": 0.2, "mlp": 0.3}, 1: {"attn": 0.4, "mlp": 0.5}}, num_samples=3)
    path = sens.save(tmp_path / "sens.json")
    assert json.loads(path.read_text())["ratios"]["1"]["mlp"] == 0.5
    assert ModalitySensitivity.load(path).ratios == sens.ratios
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationDataError, match="Cannot read MBQ sensitivities"):
        ModalitySensitivity.load(tmp_path / "bad.json")


def test_rows_without_loss_mask_get_derived_labels(llava_and_rows):
    """Rows without a loss_mask (plain processor output): the pass derives the labels from the ids
    (no labels column: every non-image token is text), exactly as if the rows carried them; the
    answer-only labels of build_calibration_dataset give other ratios, so the labels matter."""
    from qvlm_modifiers.modality import derive_loss_mask

    model, rows = llava_and_rows
    plain = rows.remove_columns("loss_mask")
    derived = compute_modality_sensitivity(model, plain, collate_fn=data.collate_fn)

    def label(row):
        mask, _ = derive_loss_mask(row["input_ids"], model.config, attention_mask=row["attention_mask"])
        return {"loss_mask": mask.tolist()}

    explicit = compute_modality_sensitivity(model, plain.map(label), collate_fn=data.collate_fn)
    assert derived.ratios == explicit.ratios
    own = compute_modality_sensitivity(model, rows, collate_fn=data.collate_fn)
    assert own.ratios != derived.ratios


def test_layerwise_backward_equals_full_backward_and_counts_each_sample_once(saved_vlm, calib_pairs, monkeypatch):
    """The default path (each decoder layer under non-reentrant torch.utils.checkpoint, backward
    one layer at a time) against one plain backward through the whole model, on a 4-layer LLaVA:
    same statistics, the gradient hooks fire once per sample and tap (a hook that also fired on
    the recomputed forward would double-count without changing the averages), and the layers'
    forward methods are restored."""
    from qvlm_modifiers.mbq import sensitivity as sens_mod

    path = saved_vlm("llava", num_layers=4)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    rows = data.build_calibration_dataset(calib_pairs.select(range(2)), processor, model, prompt_column="question")
    layers = decoder_layers(model)
    forwards_before = [layer.__dict__.get("forward") for layer in layers]

    calls = []
    real = sens_mod.modality_mean_abs_gradient

    def counting(grad, mask, text_tokens="answer"):
        calls.append(grad.shape)
        return real(grad, mask, text_tokens)

    monkeypatch.setattr(sens_mod, "modality_mean_abs_gradient", counting)
    layerwise = compute_modality_sensitivity(model, rows, median_floor=False, collate_fn=data.collate_fn)
    assert len(calls) == len(rows) * len(layers) * 2
    calls.clear()
    full = compute_modality_sensitivity(model, rows, median_floor=False, collate_fn=data.collate_fn,
                                        checkpoint_layers=False)
    assert len(calls) == len(rows) * len(layers) * 2
    assert [layer.__dict__.get("forward") for layer in layers] == forwards_before

    for i in range(len(layers)):
        for kind in ("attn", "mlp"):
            # the recomputed forward is the same float32 computation; only the order in which
            # gradient contributions are summed may differ, so agreement is ~1e-7 relative
            for stat in ("raw_ratios", "vision_grad", "text_grad"):
                assert getattr(layerwise, stat)[i][kind] == pytest.approx(getattr(full, stat)[i][kind], rel=1e-5, abs=1e-12)


def test_layerwise_checkpointing_restores_forward_on_error(saved_vlm):
    from qvlm_modifiers.mbq.sensitivity import layerwise_checkpointing

    model = AutoModelForImageTextToText.from_pretrained(saved_vlm("llava"))
    layers = decoder_layers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with layerwise_checkpointing(layers):
            assert all("forward" in layer.__dict__ for layer in layers)
            raise RuntimeError("boom")
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_sensitivity_of_a_disk_offloaded_model_equals_the_in_memory_one(saved_vlm, llava_and_rows, tmp_path):
    """The standalone pass on a model offloaded to disk (compressed-tensors' load_offloaded_model with
    a 1 MB CPU budget, as `qvlm quantize --offload-dir DIR --max-cpu-memory 1MB` loads it) gives the
    in-memory model's ratios: what "compute it once, offloaded" relies on."""
    from compressed_tensors.offload import load_offloaded_model

    from qvlm_modifiers.cli import disk_offloaded_tensors

    model, rows = llava_and_rows
    expected = compute_modality_sensitivity(model, rows, median_floor=False, collate_fn=data.collate_fn)
    with load_offloaded_model(AutoModelForImageTextToText):
        offloaded = AutoModelForImageTextToText.from_pretrained(
            saved_vlm("llava"), device_map="auto_offload", offload_folder=str(tmp_path / "off"),
            max_memory={"cpu": 1_000_000})
    assert disk_offloaded_tensors(tmp_path / "off") >= 10, "the weights did not go to disk"
    got = compute_modality_sensitivity(offloaded, rows, median_floor=False, collate_fn=data.collate_fn)
    for i, per_kind in expected.raw_ratios.items():
        for kind, ratio in per_kind.items():
            # same float32 computation, other memory placement: equal up to summation order
            assert got.raw_ratios[i][kind] == pytest.approx(ratio, rel=1e-5), (i, kind)


def _last_text_only(row_mask):
    """The row's loss_mask with text (1) kept only at its last text position."""
    mask = torch.tensor(row_mask)
    last = int((mask[0] == 1).nonzero().max())
    mask[0][mask[0] == 1] = 0
    mask[0, last] = 1
    return mask.tolist()


def test_zero_text_gradients_are_counted_warned_once_and_ratios_logged(llava_and_rows):
    """A row whose only text token is its last labelled position has a text gradient of exactly 0
    (no later position carries loss). Reference count, from the masks alone: the rows edited that
    way. The pass reports that count, warns once, and logs one table line per layer with the
    ratios it returns."""
    from loguru import logger

    model, rows = llava_and_rows
    edited = [0, 2]
    masks = [_last_text_only(rows[i]["loss_mask"]) if i in edited else rows[i]["loss_mask"] for i in range(len(rows))]
    degenerate = rows.remove_columns("loss_mask").add_column("loss_mask", masks)
    lines = []
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO")
    try:
        sens = compute_modality_sensitivity(model, degenerate, collate_fn=data.collate_fn, median_floor=False)
    finally:
        logger.remove(sink)
    assert sens.zero_text_grad_samples == len(edited)
    warnings = [msg for level, msg in lines if level == "WARNING" and "exactly 0" in msg]
    assert len(warnings) == 1 and f"{len(edited)} calibration rows" in warnings[0]
    [table] = [msg for level, msg in lines if level == "INFO" and "G = mean |dL/dY|" in msg]
    body = table.splitlines()[2:]
    assert len(body) == len(sens.ratios)
    for i, line in enumerate(body):
        assert line.split("|")[0].strip() == str(i)
        for kind in ("attn", "mlp"):
            assert f"-> {sens.ratios[i][kind]:.4g}" in line
    # the recorded form carries the count; the healthy rows give none
    assert ModalitySensitivity.from_dict(sens.to_dict()).zero_text_grad_samples == len(edited)
    assert compute_modality_sensitivity(model, rows, collate_fn=data.collate_fn).zero_text_grad_samples == 0
