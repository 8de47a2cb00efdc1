"""Calibration data: loss masks against hand-counted token positions, sources, bad rows, oneshot."""

from __future__ import annotations

import json
from itertools import groupby

import datasets
import pytest
import torch
from PIL import Image

from qvlm_modifiers import families
from qvlm_modifiers.testing import zoo
from qvlm_modifiers.data import (
    IGNORE,
    TEXT,
    VISION,
    build_calibration_dataset,
    collate_fn,
)
from qvlm_modifiers.errors import CalibrationDataError

QUESTION, ANSWER = "Hi?", "A dog."

# Hand-counted loss masks for one row: a 48x48 image, question "Hi?", answer "A dog.".
# The zoo tokenizers are byte-level (one token per character; special tokens are one token),
# so each run below is counted from the chat template text written next to it.
# Runs are (loss_mask value, number of tokens), 0 = ignored, 1 = text, 2 = vision.
EXPECTED_RUNS = {
    # text_mask="assistant_turn" (default): the whole assistant turn is text, header and end-of-turn
    # included -- the MBQ reference's labels != -100. Same rows as EXPECTED_RUNS_ANSWER below.
    # ... "\n" "Hi?" " " | "ASSISTANT:" " " "A dog." " "
    "llava": [(0, 7), (2, 16), (0, 1 + 3 + 1), (1, 10 + 1 + 6 + 1)],
    # ... "\n" "Hi?" "<|im_end|>" | "<|im_start|>" "assistant \n" "A dog." "<|im_end|>"
    "llava_onevision": [(0, 6), (2, 36), (0, 1 + 3 + 1), (1, 1 + 11 + 6 + 1)],
    # ... "<|vision_end|>" "Hi?" "<|im_end|>" "\n" | "<|im_start|>" "assistant\n" "A dog." "<|im_end|>" "\n"
    # (the reference's Qwen2-VL rule: everything from the last <|im_start|> on)
    "qwen2_vl": [(0, 45), (2, 9), (0, 1 + 3 + 1 + 1), (1, 1 + 10 + 6 + 1 + 1)],
    "qwen2_5_vl": [(0, 45), (2, 9), (0, 1 + 3 + 1 + 1), (1, 1 + 10 + 6 + 1 + 1)],
    # ... "<fake_token_around_image>" "Hi?" "<end_of_utterance>" "\n" | "Assistant: " "A dog."
    # "<end_of_utterance>" "\n"
    "idefics3": [(0, 8), (2, 16), (0, 1 + 3 + 1 + 1), (1, 11 + 6 + 1 + 1)],
    # ... "<end_of_image>" "\n\n" "Hi?" "<end_of_turn>" "\n" | "<start_of_turn>" "model\n" "A dog."
    # "<end_of_turn>" "\n"
    "gemma3": [(0, 10), (2, 16), (0, 1 + 2 + 3 + 1 + 1), (1, 1 + 6 + 6 + 1 + 1)],
}

# text_mask="answer" (a departure from the reference): only the answer's own tokens are text.
EXPECTED_RUNS_ANSWER = {
    # "<s>" "USER: " | <image> x16 (4x4 CLIP patches, CLS dropped) | "\n" "Hi?" " " "ASSISTANT:" " "
    # | "A dog." | " "
    "llava": [(0, 1 + 6), (2, 16), (0, 1 + 3 + 1 + 10 + 1), (1, 6), (0, 1)],
    # "<|im_start|>" "user " | <image> x36 (16 base + 16 anyres tile + 4 row newlines)
    # | "\n" "Hi?" "<|im_end|>" "<|im_start|>" "assistant \n" | "A dog." | "<|im_end|>"
    "llava_onevision": [(0, 1 + 5), (2, 36), (0, 1 + 3 + 1 + 1 + 11), (1, 6), (0, 1)],
    # "<|im_start|>" "system\n" "You are a helpful assistant." "<|im_end|>" "\n" "<|im_start|>" "user\n"
    # "<|vision_start|>" | <|image_pad|> x9 (6x6 patches of 8 px, 2x2 merge) | "<|vision_end|>" "Hi?"
    # "<|im_end|>" "\n" "<|im_start|>" "assistant\n" | "A dog." | "<|im_end|>" "\n"
    "qwen2_vl": [(0, 1 + 7 + 28 + 1 + 1 + 1 + 5 + 1), (2, 9), (0, 1 + 3 + 1 + 1 + 1 + 10), (1, 6), (0, 2)],
    "qwen2_5_vl": [(0, 1 + 7 + 28 + 1 + 1 + 1 + 5 + 1), (2, 9), (0, 1 + 3 + 1 + 1 + 1 + 10), (1, 6), (0, 2)],
    # "<|begin_of_text|>" "User:" "<fake_token_around_image>" "<global-img>" | <image> x16 (8x8 patches,
    # pixel shuffle 2) | "<fake_token_around_image>" "Hi?" "<end_of_utterance>" "\n" "Assistant: "
    # | "A dog." | "<end_of_utterance>" "\n"
    "idefics3": [(0, 1 + 5 + 1 + 1), (2, 16), (0, 1 + 3 + 1 + 1 + 11), (1, 6), (0, 2)],
    # "<bos>" "<start_of_turn>" "user\n" "\n\n" "<start_of_image>" | <image_soft_token> x16 |
    # "<end_of_image>" "\n\n" "Hi?" "<end_of_turn>" "\n" "<start_of_turn>" "model\n" | "A dog." |
    # "<end_of_turn>" "\n"   (one <bos>: the template writes it, the tokenizer must not add another)
    "gemma3": [(0, 1 + 1 + 5 + 2 + 1), (2, 16), (0, 1 + 2 + 3 + 1 + 1 + 1 + 6), (1, 6), (0, 2)],
}

# Same row with count_prompt_as_text=True: the 3 tokens of "Hi?" become text.
EXPECTED_RUNS_PROMPT_AS_TEXT = {
    "llava": [(0, 7), (2, 16), (0, 1), (1, 3), (0, 1), (1, 18)],
    "llava_onevision": [(0, 6), (2, 36), (0, 1), (1, 3), (0, 1), (1, 19)],
    "qwen2_vl": [(0, 45), (2, 9), (0, 1), (1, 3), (0, 1 + 1), (1, 19)],
    "qwen2_5_vl": [(0, 45), (2, 9), (0, 1), (1, 3), (0, 1 + 1), (1, 19)],
    "idefics3": [(0, 8), (2, 16), (0, 1), (1, 3), (0, 1 + 1), (1, 19)],
    "gemma3": [(0, 10), (2, 16), (0, 1 + 2), (1, 3), (0, 1 + 1), (1, 15)],
}


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    return [(value, len(list(group))) for value, group in groupby(mask)]


def _one_row(image=None, question=QUESTION, answer=ANSWER):
    image = image if image is not None else Image.new("RGB", (48, 48), (120, 130, 140))
    return datasets.Dataset.from_dict({"image": [image], "text": [answer], "question": [question]})


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = zoo.build(family)
        return cache[family]

    return get


@pytest.mark.parametrize("text_mask", ["assistant_turn", "answer"])
@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
def test_loss_mask_matches_hand_counted_positions(family, text_mask, built):
    model, processor = built(family)
    ds = build_calibration_dataset(_one_row(), processor, model, prompt_column="question", text_mask=text_mask)
    batch = collate_fn([ds[0]])
    mask = batch["loss_mask"][0].tolist()
    ids = batch["input_ids"][0]
    assert batch["loss_mask"].shape == batch["input_ids"].shape
    expected = EXPECTED_RUNS if text_mask == "assistant_turn" else EXPECTED_RUNS_ANSWER
    assert _runs(mask) == expected[family]
    # and the positions hold what they should
    mask_t = batch["loss_mask"][0]
    text = processor.tokenizer.decode(ids[mask_t == TEXT])
    if text_mask == "answer":
        assert text == ANSWER
    else:  # the assistant turn as the template renders it, from its header to the end of the row
        full = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
             {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], tokenize=False)
        assert ANSWER in text and full.endswith(text) and len(text) > len(ANSWER) + 2
        assert mask_t[-1] == TEXT  # the end-of-turn token(s) are the last text positions
    assert (ids[mask_t == VISION] == families.image_token_id(model)).all()
    assert ((ids == families.image_token_id(model)) == (mask_t == VISION)).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_assistant_turn_mask_equals_reference_labels_rule(family, built):
    """The MBQ reference's Qwen2-VL labels (every token before the last ``<|im_start|>`` is -100),
    written on the token ids, give through the derived-mask path (text = labels != -100) exactly the
    builder's default loss_mask."""
    from qvlm_modifiers.modality import derive_loss_mask

    model, processor = built(family)
    row = build_calibration_dataset(_one_row(), processor, model, prompt_column="question")[0]
    ids = torch.tensor(row["input_ids"][0])
    im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    last = int((ids == im_start).nonzero().max())
    labels = ids.clone()
    labels[:last] = -100
    derived, _rule = derive_loss_mask(ids, model.config, labels=labels,
                                      mm_token_type_ids=row.get("mm_token_type_ids", [None])[0])
    assert derived.tolist() == row["loss_mask"][0]


def test_bad_text_mask_names_the_choices(built):
    model, processor = built("llava")
    with pytest.raises(CalibrationDataError, match="assistant_turn"):
        build_calibration_dataset(_one_row(), processor, model, text_mask="caption")


@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
def test_count_prompt_as_text(family, built):
    model, processor = built(family)
    ds = build_calibration_dataset(_one_row(), processor, model, prompt_column="question",
                                   count_prompt_as_text=True)
    batch = collate_fn([ds[0]])
    assert _runs(batch["loss_mask"][0].tolist()) == EXPECTED_RUNS_PROMPT_AS_TEXT[family]
    text_ids = batch["input_ids"][0][batch["loss_mask"][0] == TEXT]
    assert processor.tokenizer.decode(text_ids).startswith(QUESTION)
    ds = build_calibration_dataset(_one_row(), processor, model, prompt_column="question",
                                   count_prompt_as_text=True, text_mask="answer")
    batch = collate_fn([ds[0]])
    text_ids = batch["input_ids"][0][batch["loss_mask"][0] == TEXT]
    assert processor.tokenizer.decode(text_ids) == QUESTION + ANSWER


def test_qwen_vision_mask_follows_mm_token_type_ids(built):
    model, processor = built("qwen2_vl")
    batch = collate_fn([build_calibration_dataset(_one_row(), processor, model, prompt_column="question")[0]])
    assert torch.equal(batch["mm_token_type_ids"][0] == 1, batch["loss_mask"][0] == VISION)


def test_caption_without_question(built):
    model, processor = built("llava")
    ds = build_calibration_dataset(_one_row(question=""), processor, model)  # prompt_column=None
    batch = collate_fn([ds[0]])
    # "<s>" "USER: " | <image> x16 | "\n" | "ASSISTANT:" " " "A dog." " "
    assert _runs(batch["loss_mask"][0].tolist()) == [(0, 7), (2, 16), (0, 1), (1, 18)]
    ds = build_calibration_dataset(_one_row(question=""), processor, model, default_prompt="Hi?")
    assert _runs(ds[0]["loss_mask"][0]) == EXPECTED_RUNS["llava"]


def test_rows_keep_processor_outputs(built, calib_pairs):
    model, processor = built("qwen2_vl")
    ds = build_calibration_dataset(calib_pairs, processor, model, prompt_column="question", num_samples=3)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                    "image_grid_thw", "loss_mask"}
    batch = collate_fn([ds[1]])
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert batch["pixel_values"].shape == (36, 3 * 2 * 8 * 8)
    assert batch["input_ids"].dtype == torch.long and batch["pixel_values"].dtype == torch.float32


def test_num_samples_and_seed(built, calib_pairs):
    model, processor = built("llava")

    def ids(**kw):
        ds = build_calibration_dataset(calib_pairs, processor, model, prompt_column="question", **kw)
        return [tuple(row[0]) for row in ds["input_ids"]]

    a, b, c = ids(num_samples=4, seed=0), ids(num_samples=4, seed=0), ids(num_samples=4, seed=1)
    assert len(a) == 4 and a == b and a != c
    unshuffled = ids(shuffle=False)
    assert len(unshuffled) == len(calib_pairs)
    assert set(a) <= set(unshuffled)
    assert ids(num_samples=100, shuffle=False) == unshuffled  # more than there is: all rows


def test_max_seq_length(built):
    model, processor = built("llava")
    row = _one_row()
    # 46 tokens; the image ends at token 23; the assistant turn starts at token 28, the answer at 39
    ds = build_calibration_dataset(row, processor, model, prompt_column="question", max_seq_length=42)
    batch = collate_fn([ds[0]])
    assert batch["input_ids"].shape == (1, 42) and batch["attention_mask"].shape == (1, 42)
    assert _runs(batch["loss_mask"][0].tolist()) == [(0, 7), (2, 16), (0, 5), (1, 14)]
    ds = build_calibration_dataset(row, processor, model, prompt_column="question", max_seq_length=42,
                                   text_mask="answer")
    assert _runs(ds[0]["loss_mask"][0]) == [(0, 7), (2, 16), (0, 16), (1, 3)]
    with pytest.raises(CalibrationDataError, match=r"Row 0.*max_seq_length=20.*image"):
        build_calibration_dataset(row, processor, model, prompt_column="question", max_seq_length=20)
    with pytest.raises(CalibrationDataError, match=r"Row 0.*no text token"):
        build_calibration_dataset(row, processor, model, prompt_column="question", max_seq_length=28)


def test_sources_save_to_disk_and_image_folders(built, tmp_path):
    model, processor = built("idefics3")
    pairs = zoo.sample_pairs(3, seed=5)
    reference = build_calibration_dataset(pairs, processor, model, prompt_column="question", shuffle=False)

    as_list = build_calibration_dataset(pairs.to_list(), processor, model, prompt_column="question", shuffle=False)
    assert as_list["input_ids"] == reference["input_ids"]

    saved = tmp_path / "saved"
    pairs.save_to_disk(str(saved))
    from_disk = build_calibration_dataset(saved, processor, model, prompt_column="question", shuffle=False)
    assert from_disk["input_ids"] == reference["input_ids"]
    assert from_disk["loss_mask"] == reference["loss_mask"]

    jsonl_dir, tsv_dir = tmp_path / "jsonl", tmp_path / "tsv"
    jsonl_dir.mkdir()
    tsv_dir.mkdir()
    lines, tsv = [], ["file\ttext\tquestion"]
    for i, row in enumerate(pairs):
        row["image"].save(jsonl_dir / f"img{i}.png")
        row["image"].save(tsv_dir / f"img{i}.png")
        lines.append(json.dumps({"file": f"img{i}.png", "text": row["text"], "question": row["question"]}))
        tsv.append(f"img{i}.png\t{row['text']}\t{row['question']}")
    (jsonl_dir / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (tsv_dir / "captions.tsv").write_text("\n".join(tsv) + "\n")
    for folder in (jsonl_dir, tsv_dir):  # the question column is picked up without prompt_column
        ds = build_calibration_dataset(folder, processor, model, shuffle=False)
        assert ds["input_ids"] == reference["input_ids"], folder
        assert ds["loss_mask"] == reference["loss_mask"], folder


# ------------------------------------------------------------------------------------------
# Bad input: every error names the row (and file) and says what to do
# ------------------------------------------------------------------------------------------


def test_missing_image_row(built):
    model, processor = built("llava")
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (48, 48)), None], "text": ["ok", "fine"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    with pytest.raises(CalibrationDataError, match=r"Row 1 has no image.*Remove the row"):
        build_calibration_dataset(ds, processor, model, shuffle=False)


def test_empty_text_row(built):
    model, processor = built("llava")
    img = Image.new("RGB", (48, 48))
    ds = datasets.Dataset.from_dict({"image": [img, img, img], "text": ["ok", "fine", "  "]})
    with pytest.raises(CalibrationDataError, match=r"Row 2 has an empty text.*'text'.*remove the row"):
        build_calibration_dataset(ds, processor, model, shuffle=False)


def test_no_image_column(built):
    model, processor = built("llava")
    ds = datasets.Dataset.from_dict({"picture": ["a.png"], "caption": ["x"]})
    with pytest.raises(CalibrationDataError, match=r"no image column 'image'.*\['picture', 'caption'\].*image_column"):
        build_calibration_dataset(ds, processor, model)
    with pytest.raises(CalibrationDataError, match=r"no text column 'text'.*text_column"):
        build_calibration_dataset(ds, processor, model, image_column="picture")


def test_corrupt_and_missing_files_in_folder(built, tmp_path):
    model, processor = built("llava")
    Image.new("RGB", (48, 48)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"file": "good.png", "text": "fine"}) + "\n" + json.dumps({"file": "bad.png", "text": "x"}) + "\n"
    )
    with pytest.raises(CalibrationDataError, match=r"Row 1 \(.*bad\.png\).*cannot be read.*replace it or remove"):
        build_calibration_dataset(tmp_path, processor, model, shuffle=False)

    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(CalibrationDataError, match=r"Row 0 \(.*gone\.png\).*not found"):
        build_calibration_dataset(tmp_path, processor, model)

    (tmp_path / "captions.jsonl").write_text('{"file": "good.png", "text": \n')
    with pytest.raises(CalibrationDataError, match=r"captions\.jsonl, line 1 is not valid JSON"):
        build_calibration_dataset(tmp_path, processor, model)


def test_bad_tsv_line_and_missing_prompt_column(built, tmp_path, calib_pairs):
    model, processor = built("llava")
    Image.new("RGB", (48, 48)).save(tmp_path / "a.png")
    (tmp_path / "captions.tsv").write_text("a.png\tfine\na.png only-one-field\n")
    with pytest.raises(CalibrationDataError, match=r"captions\.tsv, line 2 has 1 tab-separated field"):
        build_calibration_dataset(tmp_path, processor, model)
    with pytest.raises(CalibrationDataError, match=r"no prompt column 'prompt'.*prompt_column=None"):
        build_calibration_dataset(calib_pairs, processor, model, prompt_column="prompt")


def test_folder_without_captions_and_missing_path(built, tmp_path):
    model, processor = built("llava")
    with pytest.raises(CalibrationDataError, match=r"captions\.jsonl or captions\.tsv"):
        build_calibration_dataset(tmp_path, processor, model)
    with pytest.raises(CalibrationDataError, match=r"does not exist"):
        build_calibration_dataset(tmp_path / "nope", processor, model)


@pytest.mark.parametrize("decode", [True, False])
def test_corrupt_embedded_image_bytes(built, decode):
    model, processor = built("llava")
    good = Image.new("RGB", (48, 48))
    ds = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"garbage", "path": "x.jpg"}], "text": ["t", "u"]},
        features=datasets.Features({"image": datasets.Image(decode=decode), "text": datasets.Value("string")}),
    )
    with pytest.raises(CalibrationDataError, match=r"Row 1 \(x\.jpg\).*cannot be read"):
        build_calibration_dataset(ds, processor, model, shuffle=False)


def test_model_given_as_checkpoint_dir_and_wrong_processor(built, saved_vlm, calib_pairs):
    model, processor = built("gemma3")
    by_model = build_calibration_dataset(calib_pairs, processor, model, num_samples=2)
    by_path = build_calibration_dataset(calib_pairs, processor, saved_vlm("gemma3"), num_samples=2)
    assert by_path["loss_mask"] == by_model["loss_mask"]
    with pytest.raises(CalibrationDataError, match="AutoProcessor.from_pretrained"):
        build_calibration_dataset(calib_pairs, processor.tokenizer, model)


def test_empty_dataset_and_collate_batch_size(built, calib_pairs):
    model, processor = built("llava")
    with pytest.raises(CalibrationDataError, match="no rows"):
        build_calibration_dataset(calib_pairs.select([]), processor, model)
    ds = build_calibration_dataset(calib_pairs, processor, model, num_samples=2)
    with pytest.raises(CalibrationDataError, match="batch_size=1"):
        collate_fn([ds[0], ds[1]])


# ------------------------------------------------------------------------------------------
# oneshot consumes the dataset through collate_fn
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,pipeline",
    [("qwen2_vl", "sequential"), ("idefics3", "sequential"), ("gemma3", "sequential"), ("llava", "basic")],
)
def test_oneshot_w4a16_through_collate_fn(family, pipeline, saved_vlm, calib_pairs):
    """A plain W4A16 QuantizationModifier run with our dataset: calibration batches flow through
    both the sequential pipeline (traced subgraphs) and the basic one (``model(**batch)``), the
    ``loss_mask`` rows reach ``state.loss_masks`` and only the language model gets quantized."""
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = saved_vlm(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    fam = families.get_family(model)
    ds = build_calibration_dataset(calib_pairs, processor, model, prompt_column="question", num_samples=3)
    recipe = QuantizationModifier(targets="Linear", scheme="W4A16", ignore=fam.default_ignore)
    oneshot(model=model, processor=processor, dataset=ds, data_collator=collate_fn, recipe=recipe,
            pipeline=pipeline, use_loss_mask=True, num_calibration_samples=3,
            sequential_targets=[families.decoder_layer_class_name(model)])

    loss_masks = active_session().state.loss_masks
    assert loss_masks is not None and len(loss_masks) == 3
    got = sorted(tuple(m[0].tolist()) for m in loss_masks)
    assert got == sorted(tuple(m[0]) for m in ds["loss_mask"])

    quantized = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    lm_linears = {n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith(fam.layers + ".")}
    assert quantized == lm_linears and len(lm_linears) == 2 * 7
    assert all(hasattr(model.get_submodule(n), "weight_scale") for n in lm_linears)


def test_idefics3_tiled_image(built):
    """Real SmolVLM/Idefics3 processors split large images into tiles + a global view: every tile's
    <image> run is vision, the row/column markers between them are not."""
    model, _ = built("idefics3")
    _, processor = zoo.build("idefics3")  # own copy: the image processor is changed below
    processor.image_processor.do_image_splitting = True
    processor.image_processor.size = {"longest_edge": 128}
    row = _one_row(image=Image.new("RGB", (96, 64), (1, 2, 3)))
    batch = collate_fn([build_calibration_dataset(row, processor, model, prompt_column="question")[0]])
    assert batch["pixel_values"].shape[:2] == (1, 5)  # 2x2 tiles of 64 px + the global image
    # "<|begin_of_text|>" "User:" "<fake_token_around_image>" "<row_1_col_1>" | 16 | "<fake..>" "<row_1_col_2>"
    # | 16 | "\n" "<fake..>" "<row_2_col_1>" | 16 | "<fake..>" "<row_2_col_2>" | 16 |
    # "\n" "\n" "<fake..>" "<global-img>" | 16 | "<fake..>" "Hi?" "<end_of_utterance>" "\n" |
    # "Assistant: " "A dog." "<end_of_utterance>" "\n"   (the assistant turn: text)
    assert _runs(batch["loss_mask"][0].tolist()) == [
        (0, 8), (2, 16), (0, 2), (2, 16), (0, 3), (2, 16), (0, 2), (2, 16), (0, 4), (2, 16),
        (0, 1 + 3 + 1 + 1), (1, 11 + 6 + 1 + 1),
    ]
    with torch.no_grad():
        assert torch.isfinite(model(**{k: v for k, v in batch.items() if k != "loss_mask"}).logits).all()
