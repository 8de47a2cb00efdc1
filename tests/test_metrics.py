"""Metrics, each on a case with a known answer (independent references, not the code under test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qvlm_eval import metrics
from qvlm_modifiers.scoring import next_token_logprobs, predicting_positions
from qvlm_modifiers.errors import CalibrationDataError, CheckpointError, UnsupportedModelError


# ------------------------------------------------------------------ VQA accuracy + bootstrap
@pytest.mark.parametrize(
    "raw, expected",
    [("Yes.", "yes"), ("  The Circle!\nmore text", "circle"), ("a  blue   shape", "blue shape"), ("TEAL", "teal")],
)
def test_normalize_answer(raw, expected):
    assert metrics.normalize_answer(raw) == expected


def test_vqa_accuracy_counts_exact_matches_after_normalization():
    result = metrics.vqa_accuracy(["Yes.", "no", "circle", "red"], ["yes", "No", "rectangle", "red"])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["n"] == 4
    assert 0.0 <= result["ci_low"] <= 0.75 <= result["ci_high"] <= 1.0


def test_bootstrap_interval_matches_normal_approximation():
    # 400 questions, 200 right: the binomial 95% interval is 0.5 +- 1.96*sqrt(0.25/400) = 0.5 +- 0.049.
    # The percentile bootstrap converges to it; 2000 resamples leave ~0.005 Monte-Carlo error, so 0.012.
    hits = np.array([1] * 200 + [0] * 200)
    low, high = metrics.bootstrap_ci(hits, n_resamples=2000, seed=0)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert low == pytest.approx(0.5 - half, abs=0.012)
    assert high == pytest.approx(0.5 + half, abs=0.012)
    assert metrics.bootstrap_ci([1, 1, 1, 1]) == (1.0, 1.0)  # no variation, no width


def test_vqa_accuracy_rejects_length_mismatch():
    with pytest.raises(ValueError):
        metrics.vqa_accuracy(["yes"], ["yes", "no"])


# ------------------------------------------------------------------ KL divergence
def test_kl_divergence_matches_closed_form_and_torch():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    kl = metrics.kl_divergence(p.log(), q.log())
    closed = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl[0].item() == pytest.approx(closed, rel=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    # torch's kl_div(input=log q, target=log p, log_target=True) is sum p (log p - log q)
    ref = torch.nn.functional.kl_div(q.log(), p.log(), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, ref)
    summary = metrics.mean_kl([p.log()], [q.log()])
    assert summary["kl_mean"] == pytest.approx(closed / 2, rel=1e-6)
    assert summary["kl_max"] == pytest.approx(closed, rel=1e-6)
    assert summary["tokens"] == 2


@pytest.fixture(scope="module")
def tiny_idefics3(saved_vlm):
    return metrics.load_model_and_processor(saved_vlm("idefics3"), dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_vqa(calib_pairs):
    return calib_pairs.rename_column("text", "answer").select(range(4))


def test_answer_kl_is_zero_for_the_same_model_and_positive_for_a_perturbed_one(tiny_idefics3, tiny_vqa):
    model, processor = tiny_idefics3
    ref = metrics.answer_logprobs(model, processor, tiny_vqa)
    for row, logp in zip(tiny_vqa, ref):
        # one distribution per answer token (+ the end token), each a normalized log-softmax
        n_answer = len(processor.tokenizer(row["answer"], add_special_tokens=False)["input_ids"])
        assert logp.shape[0] >= n_answer
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(logp.shape[0]))
    assert metrics.mean_kl(ref, metrics.answer_logprobs(model, processor, tiny_vqa))["kl_mean"] == 0.0
    layer = model.model.text_model.layers[0].mlp.down_proj
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight) * 0.5)
        assert metrics.mean_kl(ref, metrics.answer_logprobs(model, processor, tiny_vqa))["kl_mean"] > 1e-6
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def test_answer_positions_point_at_the_answer_tokens(tiny_idefics3, tiny_vqa):
    _, processor = tiny_idefics3
    row = tiny_vqa[0]
    batch, target = metrics._answer_positions(processor, row["image"], row["question"], row["answer"])
    ids = batch["input_ids"][0]
    positions = predicting_positions(target)
    predicted = processor.tokenizer.decode(ids[positions + 1], skip_special_tokens=True)
    assert predicted.strip() == row["answer"].strip()
    # scoring: position t predicts token t + 1; the log-probs are those of exactly these positions
    logits = torch.randn(len(ids), 7)
    expected = torch.log_softmax(logits[positions], dim=-1)
    torch.testing.assert_close(next_token_logprobs(logits, target), expected, rtol=0, atol=0)


# ------------------------------------------------------------------ generation / accuracy on a model
def test_evaluate_vqa_runs_batched_generation(tiny_idefics3, tiny_vqa):
    model, processor = tiny_idefics3
    result = metrics.evaluate_vqa(model, processor, tiny_vqa, batch_size=2, max_new_tokens=3)
    assert len(result["predictions"]) == len(tiny_vqa)
    # the accuracy is recomputed independently from the returned predictions
    expected = np.mean([metrics.normalize_answer(p) == metrics.normalize_answer(a)
                        for p, a in zip(result["predictions"], tiny_vqa["answer"])])
    assert result["accuracy"] == pytest.approx(expected)
    # batching must not change greedy answers (left padding handled)
    single = metrics.generate_answers(model, processor, tiny_vqa["image"][:2], tiny_vqa["question"][:2],
                                      max_new_tokens=3, batch_size=1)
    assert single == result["predictions"][:2]


# ------------------------------------------------------------------ perplexity
def _tiny_llama(vocab=97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


class _ByteTokenizer:
    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = torch.tensor([[b % 97 for b in text.encode()]])
        return {"input_ids": ids}


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = _tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0 -> uniform over 97 tokens -> ppl exactly 97
    result = metrics.perplexity(model, _ByteTokenizer(), "some real text " * 40, max_tokens=300, window=64)
    assert result["perplexity"] == pytest.approx(97.0, rel=1e-5)
    # 300 tokens in windows of 64: 4 full windows (63 scored each) + one of 44 (43 scored)
    assert result["tokens"] == 4 * 63 + 43


def test_perplexity_matches_a_direct_cross_entropy():
    model = _tiny_llama()
    text = "the quick brown fox jumps over the lazy dog"
    ids = _ByteTokenizer()(text)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    result = metrics.perplexity(model, _ByteTokenizer(), text, window=1000)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_lee_corpus_is_real_english_text():
    text = metrics.load_text_corpus("lee")
    assert len(text) > 100_000 and " the " in text


# ------------------------------------------------------------------ resources / size
def test_measure_resources_sees_a_known_allocation_and_wall_time():
    import time

    def work():
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        time.sleep(0.2)
        return float(block[-1])

    result, usage = metrics.measure_resources(work)
    assert result == 1.0
    assert usage.wall_s >= 0.2
    assert usage.peak_rss_bytes - usage.rss_before_bytes >= 250 * 2**20
    assert (usage.cuda_max_allocated_bytes is None) == (not torch.cuda.is_available())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA max allocated is only measured on a GPU")
def test_measure_resources_sees_a_known_cuda_allocation():
    """256 MiB allocated on the GPU inside the measured call: its CUDA peak is at least that, and the
    peak is reset before the call (a larger allocation made and freed before does not count)."""
    big = torch.empty(1024 * 2**20, dtype=torch.uint8, device="cuda")
    del big

    def work():
        block = torch.ones(256 * 2**20, dtype=torch.uint8, device="cuda")
        return int(block[-1])

    result, usage = metrics.measure_resources(work)
    assert result == 1
    assert 256 * 2**20 <= usage.cuda_max_allocated_bytes < 1024 * 2**20


def test_checkpoint_size_sums_the_files(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 234)
    assert metrics.checkpoint_size(tmp_path) == 1234
    with pytest.raises(CheckpointError, match="does not exist"):
        metrics.checkpoint_size(tmp_path / "missing")


# ------------------------------------------------------------------ bad input
def test_dataset_without_needed_columns_is_a_clear_error(calib_pairs):
    with pytest.raises(metrics.EvalDataError, match=r"lacks the column\(s\) \['answer'\]"):
        metrics.load_vqa_dataset(calib_pairs)
    assert issubclass(metrics.EvalDataError, CalibrationDataError)
    with pytest.raises(metrics.EvalDataError, match="not a `datasets` folder"):
        metrics.load_vqa_dataset(__file__)


def test_easy_vqa_test_split_loads_with_columns():
    ds = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=5)
    assert len(ds) == 5 and set(ds.column_names) >= {"image", "question", "answer"}
    assert ds[0]["image"].size == (64, 64)
    with pytest.raises(metrics.EvalDataError, match="splits"):
        metrics.load_vqa_dataset("easy-vqa", split="validation")


def test_model_without_processor_or_chat_template_is_a_clear_error(tiny_idefics3):
    model, processor = tiny_idefics3
    with pytest.raises(UnsupportedModelError, match="processor"):
        metrics.check_evaluable(model, None)
    with pytest.raises(UnsupportedModelError, match="not a multimodal processor"):
        metrics.check_evaluable(model, processor.tokenizer)
    template, tok_template = processor.chat_template, processor.tokenizer.chat_template
    try:
        processor.chat_template = None
        processor.tokenizer.chat_template = None
        with pytest.raises(UnsupportedModelError, match="no chat template"):
            metrics.check_evaluable(model, processor)
    finally:
        processor.chat_template, processor.tokenizer.chat_template = template, tok_template


def test_folder_saved_without_its_processor_is_a_clear_error(tiny_idefics3, tmp_path):
    """A checkpoint folder with the model but no processor files (a common save mistake): refused by
    the loader with the fix, not a crash later inside generation."""
    model, _ = tiny_idefics3
    model.save_pretrained(tmp_path / "model_only")
    with pytest.raises(UnsupportedModelError, match=r"processor.save_pretrained"):
        metrics.load_model_and_processor(tmp_path / "model_only")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="Could not load a VLM"):
        metrics.load_model_and_processor(tmp_path / "nothing-here")


def test_metrics_command_runs_on_a_model_folder_and_a_save_to_disk_dataset(saved_vlm, tiny_vqa, tmp_path, capsys):
    """`python -m qvlm_eval.metrics --model M --quantized Q --data FOLDER --split S`: the user's own
    model and VQA data (a DatasetDict written by save_to_disk). The same checkpoint as both model and
    "quantized" has KL exactly 0, the same accuracy and the same size (KL > 0 for a changed model is
    test_answer_kl_is_zero_for_the_same_model_and_positive_for_a_perturbed_one)."""
    import datasets
    import json

    folder = tmp_path / "my_vqa"
    datasets.DatasetDict({"validation": tiny_vqa}).save_to_disk(str(folder))
    path = saved_vlm("idefics3")
    out = tmp_path / "metrics.json"
    argv = ["--model", str(path), "--quantized", str(path), "--data", str(folder), "--split", "validation",
            "--num-questions", "4", "--kl-rows", "2", "--ppl-tokens", "64", "--batch-size", "2", "--output", str(out)]
    assert metrics.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["fp"]["vqa"]["n"] == 4 and result["quantized"]["kl"]["kl_mean"] == 0.0
    assert result["fp"]["vqa"]["accuracy"] == result["quantized"]["vqa"]["accuracy"]
    assert result["fp"]["size_bytes"] == result["quantized"]["size_bytes"] == metrics.checkpoint_size(path)
    assert result["fp"]["ppl"]["tokens"] > 0
    # a split the folder does not have: a clear error naming the splits and the fix, exit code != 0
    with pytest.raises(SystemExit) as exc:
        metrics.main(["--model", str(path), "--data", str(folder), "--split", "test"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "validation" in err and "--split" in err


def test_vqa_columns_under_other_names_are_renamed(tiny_vqa):
    renamed = tiny_vqa.rename_columns({"image": "img", "question": "q", "answer": "multiple_choice_answer"})
    ds = metrics.load_vqa_dataset(renamed, image_column="img", question_column="q",
                                  answer_column="multiple_choice_answer")
    assert ds.column_names == ["image", "question", "answer"] and ds["answer"] == tiny_vqa["answer"]
