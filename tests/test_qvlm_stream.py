"""``realign_stream`` (qvlm_modifiers.qvlm.stream): each closed Q-VLM block hands its quantized-path
output to llm-compressor's pipeline, and one-layer blocks take their output rows from the pipeline's
propagation instead of a pass of their own. Unit tests of :class:`BlockHandover`, then the Modifier
on a tiny zoo model against the same recipe without it: where the partition is fixed, nothing may
change (weights, qparams, every block record), only the passes the Modifier runs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import qvlm_modifiers
import qvlm_modifiers.qvlm.gptq_rounding as gptq_rounding
from qvlm_modifiers import data
from qvlm_modifiers.families import decoder_layers
from qvlm_modifiers.qvlm import QVLMModifier
from qvlm_modifiers.qvlm.gptq_rounding import GPTQStatesResult
from qvlm_modifiers.qvlm.stream import BlockHandover


def _rows(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 5, generator=g) for _ in range(n)]


def test_handover_replaces_every_row_it_has():
    """All rows computed (a multi-layer block): the pipeline's outputs are replaced, row by row, in
    the output's structure (tuple or tensor)."""
    ours, pipeline = _rows(seed=0), _rows(seed=1)
    handover = BlockHandover(list(ours), complete=lambda: pytest.fail("nothing is missing"), keep=lambda t: t)
    for b in range(4):
        out = handover((pipeline[b], "cache")) if b % 2 else handover(pipeline[b])
        got = out[0] if b % 2 else out
        assert torch.equal(got, ours[b]) and (not b % 2 or out[1] == "cache")
    assert handover.done and not handover.mismatch


def test_handover_takes_the_missing_rows_once_batch_0_matches():
    ours = _rows()
    rows = [ours[0], None, ours[2], None]
    handover = BlockHandover(rows, complete=lambda: pytest.fail("the pipeline's rows are ours"), keep=lambda t: t.clone())
    results = [handover(ours[b]) for b in range(4)]
    assert results[1] is None and results[3] is None  # the pipeline's own output goes on
    assert all(torch.equal(rows[b], ours[b]) for b in range(4)) and handover.taken == [1, 3]
    assert not handover.mismatch and not handover.missing()


def test_handover_computes_the_rows_itself_when_batch_0_differs():
    """Batch 0 differs (e.g. activation quantization, which the pipeline's pass disables): every
    missing row is computed at once and handed over, nothing of the pipeline's is taken."""
    ours, pipeline = _rows(seed=0), _rows(seed=1)
    rows = [ours[0], None, None, ours[3]]

    def complete():
        rows[1], rows[2] = ours[1], ours[2]

    handover = BlockHandover(rows, complete=complete, keep=lambda t: t)
    out = [handover(pipeline[b]) for b in range(4)]
    assert handover.mismatch and handover.taken == []
    assert all(torch.equal(out[b], ours[b]) for b in range(4))


def test_handover_retakes_pipeline_rows_after_a_later_mismatch():
    """Batch 0 matched but a later computed row does not: the rows taken before it are recomputed
    when the Modifier settles the block (``settle(retake=True)``), which then hands every row to
    ``on_settled`` (the block's all-row loss), once."""
    ours, other = _rows(seed=0), _rows(seed=1)
    rows = [ours[0], None, ours[2], None]
    calls = []

    def complete():
        calls.append([b for b, r in enumerate(rows) if r is None])
        for b, r in enumerate(rows):
            if r is None:
                rows[b] = ours[b]

    settled = []
    handover = BlockHandover(rows, complete=complete, keep=lambda t: t, on_settled=settled.append)
    handover(ours[0])
    handover(other[1])  # taken: the pipeline's row, not ours
    handover(other[2])  # differs from our row 2: mismatch, row 3 computed by us
    assert handover.mismatch and calls == [[3]]
    handover(other[3])
    assert settled == []
    handover.settle(retake=True)
    assert calls == [[3], [1]] and all(torch.equal(rows[b], ours[b]) for b in range(4))
    # the block's all-row loss is written from the settled rows, once
    assert len(settled) == 1 and settled[0] is rows and handover.settled
    handover.settle(retake=True)
    assert calls == [[3], [1]] and len(settled) == 1


def test_handover_needs_batch_0():
    with pytest.raises(ValueError, match="batch 0"):
        BlockHandover([None, torch.zeros(1)], complete=lambda: None, keep=lambda t: t)


def test_states_result_completes_only_the_batches_asked_for():
    calls = []
    result = GPTQStatesResult(outputs=[[torch.zeros(1), None, None]], weights=[{}], choices=[{}])
    result._last = (lambda j, linears, tag, inputs, missing: calls.append(missing) or {b: torch.ones(1) for b in missing},
                    0, [[]], [], [None])
    result.complete(0, [1])
    assert calls == [[1]] and result.outputs[0][2] is None
    result.complete(0)
    assert calls == [[1], [2]] and result.outputs[0][2] is not None


def _run(path, pairs, n=8, **fields):
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    rows = data.build_calibration_dataset(pairs.select(range(n)), processor, model, prompt_column="question")
    qvlm_modifiers.oneshot(model, processor=processor, dataset=rows, num_calibration_samples=len(rows),
                           shuffle_calibration_samples=False,
                           recipe=QVLMModifier(scheme="W4A16", targets=["Linear"], gptq_rounding=True,
                                               gptq_weight_ranges="gptq", **fields))
    linears = {f"{k}.{name}": m for k, layer in enumerate(decoder_layers(model)) for name, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    return model, linears


def _strip_timings(records):
    return [{k: v for k, v in r.items() if k not in ("search_s", "search_cpu_s")} for r in records]


def _assert_same(a, b):
    (model_a, lin_a), (model_b, lin_b) = a, b
    assert lin_a.keys() == lin_b.keys() and lin_a
    for name, m in lin_a.items():
        for attr in ("weight", "weight_scale", "weight_zero_point"):
            assert torch.equal(getattr(m, attr), getattr(lin_b[name], attr)), (name, attr)
    assert (_strip_timings(model_a.config.qvlm_blocks["block_losses"])
            == _strip_timings(model_b.config.qvlm_blocks["block_losses"]))


def _count(monkeypatch, owner, name, counter):
    inner = getattr(owner, name)

    def counted(*args, **kwargs):
        counter.append(args)
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def test_one_layer_blocks_take_their_rows_from_the_pipeline_and_change_nothing(saved_vlm, calib_pairs, monkeypatch):
    """One-layer blocks (the pipeline's stream is already the quantized path): with ``realign_stream``
    the Modifier runs each non-final block's layer on batch 0 and the held-out batches only, takes
    the other rows from the pipeline's propagation, and ends with the same weights, qparams and
    block records (the all-row loss filled in once the rows arrive) as computing them itself."""
    path = saved_vlm("llava", num_layers=4)
    completed = []
    _count(monkeypatch, GPTQStatesResult, "complete", completed)
    plain = _run(path, calib_pairs, max_block_layers=1, entropy_threshold=-1.0)
    asked_plain = [args[2] if len(args) > 2 else None for args in completed]
    completed.clear()
    realigned = _run(path, calib_pairs, max_block_layers=1, entropy_threshold=-1.0, realign_stream=True)
    asked = [args[2] if len(args) > 2 else None for args in completed]
    assert asked_plain == [None] * 4
    # blocks [0], [1], [2]: batch 0 first, the rest only if the pipeline's batch 0 differed (it does not);
    # the last block [3] has no later layer to hand over to and computes every row
    assert asked == [[0], [0], [0], None]
    _assert_same(plain, realigned)
    records = realigned[0].config.qvlm_blocks["block_losses"]
    assert all(r["loss"] is not None for r in records)


def test_multi_layer_block_hands_its_output_to_the_pipeline(saved_vlm, calib_pairs, monkeypatch):
    """Block [0, 1, 2] then [3]: the pipeline propagated layers 0-1 in full precision, so without
    ``realign_stream`` its input to layer 3 is not the quantized path and layer 3's GPTQ Hessians
    need a pass of their own. With it, the block's output is handed over, layer 3's Hessians come
    from the pipeline's pass (checked equal input, bit for bit), and the result is the same."""
    path = saved_vlm("llava", num_layers=4)
    passes = []
    _count(monkeypatch, gptq_rounding, "_layer_hessians", passes)
    plain = _run(path, calib_pairs, max_block_layers=3, entropy_threshold=-1.0)
    plain_passes = len(passes)
    passes.clear()
    realigned = _run(path, calib_pairs, max_block_layers=3, entropy_threshold=-1.0, realign_stream=True)
    assert [r["layers"] for r in realigned[0].config.qvlm_blocks["block_losses"]] == [[0, 1, 2], [3]]
    # layers 1 and 2 always take their own (their input is the block's quantized path, not the
    # pipeline's); layer 3 only without the handover
    assert plain_passes == len(passes) + 1
    _assert_same(plain, realigned)


def test_realigned_stream_with_activation_quantization_falls_back(saved_vlm, calib_pairs, monkeypatch):
    """W8A8 (dynamic per-token activations): the pipeline's pass runs without activation quantization,
    so its batch 0 differs from the block's quantized path; the Modifier computes every row itself
    (from then on without asking the pipeline) and the result equals the run without ``realign_stream``."""
    path = saved_vlm("llava", num_layers=3)
    completed = []
    _count(monkeypatch, GPTQStatesResult, "complete", completed)
    fields = dict(max_block_layers=1, entropy_threshold=-1.0, gptq_weight_ranges="search", search_epochs=0)

    def run(**extra):
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path)
        rows = data.build_calibration_dataset(calib_pairs.select(range(8)), processor, model, prompt_column="question")
        qvlm_modifiers.oneshot(model, processor=processor, dataset=rows, num_calibration_samples=len(rows),
                               shuffle_calibration_samples=False,
                               recipe=QVLMModifier(scheme="W8A8", targets=["Linear"], gptq_rounding=True, **fields, **extra))
        return model, {f"{k}.{name}": m for k, layer in enumerate(decoder_layers(model))
                       for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}

    plain = run()
    completed.clear()
    realigned = run(realign_stream=True)
    # block [0]: batch 0, then every row after the mismatch; block [1]: every row at once; [2]: last block
    assert [args[2] if len(args) > 2 else None for args in completed] == [[0], None, None, None]
    _assert_same(plain, realigned)


def test_rows_the_pipeline_never_hands_over_are_computed_when_the_block_settles(saved_vlm, calib_pairs, monkeypatch):
    """``propagate_error=False``: the pipeline has no propagation pass, so no row is handed over; the
    next block computes the missing ones itself before it reads them (hooks off: no calibration
    records, no entropy updates), and the result equals the plain run."""
    path = saved_vlm("llava", num_layers=4)
    completed = []
    _count(monkeypatch, GPTQStatesResult, "complete", completed)
    plain = _run(path, calib_pairs, max_block_layers=1, entropy_threshold=-1.0)
    completed.clear()
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    rows = data.build_calibration_dataset(calib_pairs.select(range(8)), processor, model, prompt_column="question")
    qvlm_modifiers.oneshot(model, processor=processor, dataset=rows, num_calibration_samples=len(rows),
                           shuffle_calibration_samples=False, propagate_error=False,
                           recipe=QVLMModifier(scheme="W4A16", targets=["Linear"], gptq_rounding=True,
                                               gptq_weight_ranges="gptq", max_block_layers=1, entropy_threshold=-1.0,
                                               realign_stream=True))
    # per non-final block: batch 0 at close, the rest when the next block settles it; the last block: all rows
    assert [args[2] if len(args) > 2 else None for args in completed] == [[0], None, [0], None, [0], None, None]
    linears = {f"{k}.{name}": m for k, layer in enumerate(decoder_layers(model)) for name, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    _assert_same(plain, (model, linears))
