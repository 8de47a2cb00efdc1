"""Caption-length assistant turns for the default model's test bed (issue #22).

The papers calibrate and evaluate on rows whose assistant turn is a sentence or more (COCO captions,
ShareGPT4V answers), not one word. easy-vqa has only one-word answers, so each easy-vqa image gets a
caption composed from its own facts: its colour and shape (read off the image's own questions and
answers, :func:`easy_vqa_labels`) and what it is not (another colour and another shape, chosen by a
generator seeded with the image id, so a caption is a pure function of the image). The package photos
keep their hand-written captions (``eval/data/photo_captions.jsonl``).

Every composed caption is 20+ tokens with the SmolLM2 tokenizer (checked in tests/test_captions.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["COLORS", "SHAPES", "CAPTION_PROMPT", "PHOTO_FILE", "easy_vqa_labels", "compose_caption",
           "easy_vqa_caption_rows", "photo_path", "photo_caption_rows"]

#: hand-written questions and captions of the photos shipped with scikit-image / matplotlib
PHOTO_FILE = Path(__file__).resolve().parent / "data" / "photo_captions.jsonl"

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
#: the user turn of every caption row (the photos' captions use the same prompt)
CAPTION_PROMPT = "describe the image briefly."

_TEMPLATES = (
    "a {color} {shape} drawn on a plain background. the shape is a {shape}, not a {not_shape}, "
    "and its color is {color}, not {not_color}.",
    "this image shows a single {color} {shape}. it is not a {not_shape}, and the {shape} is not "
    "{not_color}; it is a simple flat drawing.",
    "a simple picture of one {shape}, colored {color}. there is no {not_shape} here, and the "
    "{shape} is {color} rather than {not_color}.",
)


def easy_vqa_labels(texts, answers, image_ids) -> dict[int, tuple[str, str]]:
    """(colour, shape) of each easy-vqa image, read off its own questions and answers.

    Images whose questions do not reveal both (a few percent) are left out."""
    color, shape = {}, {}
    for q, a, i in zip(texts, answers, image_ids):
        words = q.rstrip("?").split()
        named_colors = [w for w in words if w in COLORS]
        named_shapes = [w for w in words if w in SHAPES]
        if a in COLORS:
            color[i] = a
            if named_shapes:
                shape[i] = named_shapes[0]
        elif a in SHAPES:
            shape[i] = a
            if named_colors:
                color[i] = named_colors[0]
        else:  # yes/no: a positive statement about a named attribute tells us the attribute
            positive = (a == "yes") != ("not" in words or "no" in words)
            if positive and named_colors:
                color[i] = named_colors[0]
            if positive and named_shapes:
                shape[i] = named_shapes[0]
    return {i: (color[i], shape[i]) for i in color if i in shape}


def compose_caption(color: str, shape: str, image_id: int) -> str:
    """A caption of an easy-vqa image from its facts; template and negatives seeded by ``image_id``."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown easy-vqa colour/shape {color!r}/{shape!r}; expected one of {COLORS} / {SHAPES}")
    rng = random.Random(image_id)
    template = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
    not_color = rng.choice([c for c in COLORS if c != color])
    not_shape = rng.choice([s for s in SHAPES if s != shape])
    return template.format(color=color, shape=shape, not_color=not_color, not_shape=not_shape)


def easy_vqa_caption_rows(split: str) -> list[dict]:
    """One caption row per labelled image of an easy-vqa split: ``image`` (file path), ``question``
    (:data:`CAPTION_PROMPT`), ``answer`` (the composed caption), ``image_id``; ordered by image id."""
    import easy_vqa

    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    labels = easy_vqa_labels(texts, answers, image_ids)
    return [{"image": paths[i], "question": CAPTION_PROMPT, "answer": compose_caption(c, s, i), "image_id": int(i)}
            for i, (c, s) in sorted(labels.items())]


def photo_path(ref: str) -> Path:
    """``skimage:NAME`` / ``matplotlib:NAME`` -> the image file inside the installed package's data."""
    source, name = ref.split(":", 1)
    if source == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent / name
    if source == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name
    raise ValueError(f"unknown image source {source!r} in {ref!r}; expected skimage:NAME or matplotlib:NAME")


def photo_caption_rows(path: Path = PHOTO_FILE) -> list[dict]:
    """One caption row per photo (its hand caption), ordered by first appearance in the file."""
    rows, seen = [], set()
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["image"] not in seen:
                seen.add(row["image"])
                rows.append({"image": str(photo_path(row["image"])), "question": CAPTION_PROMPT,
                             "answer": row["caption"], "image_id": -len(seen)})
    return rows
