"""eval/train_vision.py: the pure parts (labels read off the questions, batch composition, answer-token
targets, the stage-1 cache key). The full training run is checked by its committed log, not here."""

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
    assert set(tv.QUESTION_TYPES) == {"yes/no", "colour", "shape"}


@pytest.mark.parametrize("batch,photo,mix,expected", [
    (32, 0.06, "0.6,0.2,0.2", (2, [18, 6, 6])),  # the committed setting: 2 photos + 30 questions
    (32, 0.0, "1,1,1", (0, [12, 10, 10])),       # rounding remainder goes to yes/no
    (64, 0.06, "0.74,0.13,0.13", (4, [46, 7, 7])),
    (8, 0.0, "0,0,1", (0, [0, 0, 8])),
])
def test_batch_composition(tv, batch, photo, mix, expected):
    n_photo, counts = tv.batch_composition(batch, photo, mix)
    assert (n_photo, counts) == expected
    assert n_photo + sum(counts) == batch


@pytest.mark.parametrize("mix", ["0.6,0.4", "a,b,c", "-1,1,1", "0,0,0"])
def test_batch_composition_rejects_bad_mix_with_the_fix(tv, mix):
    with pytest.raises(SystemExit, match="three non-negative shares.*e.g. 0.6,0.2,0.2"):
        tv.batch_composition(32, 0.06, mix)


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


def test_stage1_cache_key_covers_what_stage1_depends_on(tv):
    base = dict(seed=0, align_steps=3000, align_batch_size=32, align_lr=2e-3, align_ce=1.0, align_temperature=0.05,
                no_bf16=False, device="cpu", steps=1200, lr=2e-3, type_mix="0.6,0.2,0.2")
    key = tv.stage1_args(argparse.Namespace(**base))
    # stage-2 options do not invalidate the cache ...
    assert tv.stage1_args(argparse.Namespace(**{**base, "steps": 600, "lr": 1e-3})) == key
    # ... every stage-1 option and the device do
    for name, other in (("seed", 1), ("align_steps", 10), ("align_lr", 1e-3), ("align_ce", 0.0), ("device", "cuda")):
        assert tv.stage1_args(argparse.Namespace(**{**base, name: other})) != key, name
