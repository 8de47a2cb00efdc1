"""eval/measure_mbq_sensitivity.py on the tiny Idefics3 zoo model: the assistant-turn mask gives every row
a text gradient, the answer-only mask does not (the last labelled position's output gradient is 0), and
the report carries both with the paper's figure."""

from __future__ import annotations

import argparse

import pytest


def test_sensitivity_with_both_masks(saved_vlm, eval_script):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qvlm_modifiers.testing import zoo

    script = eval_script("measure_mbq_sensitivity")
    path = saved_vlm("idefics3")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    pairs = zoo.sample_pairs(3, seed=0)
    pairs = pairs.map(lambda r: {"text": r["text"].split()[0]})  # one-word answers, as easy-vqa's
    turn, answer = (script.measure(model, processor, pairs, mask) for mask in ("assistant_turn", "answer"))
    assert turn["rows"] == answer["rows"] == 3
    # a one-token answer + answer-only mask: the only labelled position is the last one -> gradient 0
    assert answer["sensitivity"]["zero_text_grad_samples"] >= 1
    assert turn["sensitivity"]["zero_text_grad_samples"] == 0
    assert 0 <= turn["min"] <= turn["median"] <= turn["max"]
    text = script.markdown("tiny", argparse.Namespace(testbed="v2", rows=3, seed=0, caption_fraction=0.5),
                           [turn, answer])
    assert "| assistant_turn | 3 | 0 |" in text and "| answer | 3 |" in text and "r ~ 0.08" in text
