"""Calibration data built the way llm-compressor's VLM examples build it (no project helpers).

Each row is the processor's output for one chat (``apply_chat_template`` + ``processor(text=...,
images=...)``): no ``loss_mask``, and ``labels`` only when asked for. Rows hold one or two images of
different sizes and aspect ratios, so crop grids, image splitting and pan-and-scan all produce
rows with different image-token counts.
"""

from __future__ import annotations

import datasets
import torch

from qvlm_modifiers.testing import zoo


def _images(pairs, index: int) -> list:
    first = pairs[index]["image"]
    if index % 2 == 0:
        return [first]
    second = pairs[(index + 1) % len(pairs)]["image"]
    wide = second.resize((2 * second.width, second.height))  # a wide image: pan-and-scan, anyres
    return [first, wide]


def plain_rows(processor, n: int = 4, labels: bool = False, seed: int = 0, image_size: int = 64) -> datasets.Dataset:
    """``n`` rows of processor outputs (lists, batch dimension 1), as llm-compressor's examples map them."""
    pairs = zoo.sample_pairs(n, seed=seed, image_size=image_size)
    # Gemma 3's processor call overrides its image processor's pan-and-scan settings with its own
    # defaults (off, 256-px crops); its users pass them per call
    ip = processor.image_processor
    extra = {}
    if getattr(ip, "do_pan_and_scan", False):
        extra = {k: getattr(ip, k) for k in ("do_pan_and_scan", "pan_and_scan_min_crop_size",
                                            "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")}
    rows = []
    for i in range(n):
        images = _images(pairs, i)
        user = [{"type": "image"} for _ in images] + [{"type": "text", "text": pairs[i]["question"]}]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": pairs[i]["text"]}]},
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        row = dict(processor(text=[text], images=[images], **extra))
        if labels:  # supervise the assistant turn only, as SFT data does
            prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            n_prompt = len(processor(text=[prompt], images=[images], **extra)["input_ids"][0])
            ids = list(row["input_ids"][0])
            row["labels"] = [[-100] * n_prompt + ids[n_prompt:]]
        rows.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()})
    return datasets.Dataset.from_list(rows)


def data_collator(batch):
    """llm-compressor's VLM examples' collator: one row, every column as a tensor."""
    assert len(batch) == 1
    return {key: torch.tensor(value) for key, value in batch[0].items()}
