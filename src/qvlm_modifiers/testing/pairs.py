"""Synthetic image-question-answer rows for tests: a coloured shape on a coloured background."""

from __future__ import annotations

import random

__all__ = ["IMAGE_SIZE", "sample_pairs"]

#: side length (pixels) of the images produced by :func:`sample_pairs`
IMAGE_SIZE = 48


_COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")
_QUESTIONS = (
    "What shape is in the image?",
    "Describe the image.",
    "What color is the shape?",
    "What is shown here?",
)


def _draw(shape: str, fg, bg, rng: random.Random, size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    # a little texture so images differ beyond the shape
    for _ in range(rng.randint(3, 8)):
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def sample_pairs(n: int, seed: int = 0, image_size: int = IMAGE_SIZE):
    """``n`` synthetic image-question-answer rows (a coloured shape on a coloured background).

    :return: :class:`datasets.Dataset` with columns ``image`` (PIL RGB, ``image_size`` px square),
        ``text`` (the answer / caption) and ``question`` (the prompt)
    """
    import datasets

    rng = random.Random(seed)
    names = list(_COLORS)
    rows: dict[str, list] = {"image": [], "text": [], "question": []}
    for _ in range(n):
        shape = rng.choice(_SHAPES)
        fg_name, bg_name = rng.sample(names, 2)
        question = rng.choice(_QUESTIONS)
        if question.startswith("What shape"):
            text = f"A {shape}."
        elif question.startswith("What color"):
            text = f"It is {fg_name}."
        else:
            text = f"A {fg_name} {shape} on a {bg_name} background."
        rows["image"].append(_draw(shape, _COLORS[fg_name], _COLORS[bg_name], rng, image_size))
        rows["text"].append(text)
        rows["question"].append(question)
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "question": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(rows, features=features)


