"""Calibration data for VLMs: image-text pairs -> one processor output per row + a token loss mask.

:func:`build_calibration_dataset` is the one entry point. It renders each pair with the
family's chat template (user turn = image + optional question, assistant turn = the text),
runs the model's own processor on it (so image placeholders are expanded exactly as at
inference) and adds a per-token ``loss_mask``:

* ``0`` ignored: system prompt, user prompt, chat-template tokens, padding
* ``1`` text: the whole assistant turn (``text_mask="assistant_turn"``, the default): its header
  (``<|im_start|>assistant\n``, ``ASSISTANT:``, ...), the answer/caption and the end-of-turn
  token(s) -- exactly the positions the MBQ reference labels (``labels != -100``, its
  ``caption_mask``). ``text_mask="answer"`` marks only the answer's own tokens (a departure from
  the reference; with short answers the last labelled position, whose output gradient is exactly
  0, is most of the text, and MBQ's vision/text ratio degenerates). With
  ``count_prompt_as_text=True`` the question's tokens are text too.
* ``2`` vision: the image placeholder tokens the vision features replace (the family's image
  token id, or ``mm_token_type_ids == 1`` for Qwen2/2.5-VL)

Rows have the layout of llm-compressor's multimodal examples (every value keeps the processor's
batch dimension of 1), so :func:`collate_fn` rebuilds a batch with ``torch.tensor``. Use both
with ``oneshot``::

    ds = build_calibration_dataset(pairs, processor, model, num_samples=64)
    oneshot(model=model, processor=processor, dataset=ds, data_collator=collate_fn,
            recipe=..., use_loss_mask=True)   # use_loss_mask fills state.loss_masks

llm-compressor uses a dataset that has an ``input_ids`` column as-is. Its sequential pipeline
(GPTQ/AWQ/...) traces ``model.forward`` and feeds every subgraph only the inputs it consumes,
so ``loss_mask`` never reaches the model; with ``use_loss_mask=True`` it reads ``loss_mask``
from the cached batches into ``state.loss_masks``. The basic pipeline calls ``model(**batch)``;
transformers' VLM forwards accept and ignore the extra keyword.

Sources accepted by :func:`build_calibration_dataset`:

* a :class:`datasets.Dataset` (or a list of row dicts) with an image column (PIL images,
  ``{"bytes", "path"}`` dicts, or file paths) and a text column, optionally a prompt/question
  column;
* a path written by :meth:`datasets.Dataset.save_to_disk` (a ``DatasetDict`` must have a
  ``train`` split or a single split);
* a folder of images with a captions file (see :func:`load_image_folder`):

  - ``captions.jsonl``: one JSON object per line,
    ``{"file": "cat.png", "text": "A cat on a mat.", "question": "What is this?"}``
    (``question`` optional; ``file`` relative to the folder);
  - ``captions.tsv``: ``file<TAB>text[<TAB>question]`` per line, an optional first line
    ``file<TAB>text[<TAB>question]`` is treated as a header.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qvlm_modifiers.errors import CalibrationDataError
from qvlm_modifiers.families import VLMFamily, get_family, image_token_id
from qvlm_modifiers.data_sources import CAPTION_FILES, _is_image_folder, load_image_folder, load_pairs  # noqa: F401
from qvlm_modifiers.modality import IGNORE, TEXT, VISION  # ``loss_mask`` values

__all__ = [
    "TEXT_MASKS",
    "IGNORE",
    "TEXT",
    "VISION",
    "build_calibration_dataset",
    "collate_fn",
    "load_image_folder",
    "load_pairs",
]

logger = logging.getLogger(__name__)



#: ``text_mask`` choices of :func:`build_calibration_dataset`
TEXT_MASKS = ("assistant_turn", "answer")

# processor outputs that are per-token (truncated together with input_ids)
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "loss_mask")


# --------------------------------------------------------------------------------------------
# Row checks
# --------------------------------------------------------------------------------------------


def _open_image(value: Any, row: int, image_column: str):
    """A PIL RGB image from a row's image value, or a :class:`CalibrationDataError`."""
    from PIL import Image, UnidentifiedImageError

    where = f"Row {row}"
    if value is None:
        raise CalibrationDataError(
            f"{where} has no image (column {image_column!r} is empty). Remove the row or give it an image."
        )
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            if value.get("bytes") is not None:
                where = f"Row {row} ({value.get('path') or 'embedded bytes'})"
                image = Image.open(io.BytesIO(value["bytes"]))
            else:
                where = f"Row {row} ({value['path']})"
                image = Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            where = f"Row {row} ({value})"
            if not Path(value).is_file():
                raise CalibrationDataError(
                    f"{where}: image file not found. Fix the path in the captions file/column or remove the row."
                )
            image = Image.open(value)
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            raise CalibrationDataError(
                f"{where}: column {image_column!r} holds a {type(value).__name__}, not an image. Store PIL "
                "images (datasets.Image feature), image bytes or file paths in it."
            )
        image.load()
        return image.convert("RGB")
    except CalibrationDataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CalibrationDataError(
            f"{where}: the image cannot be read ({type(err).__name__}: {err}). The file is corrupt or not an "
            "image; replace it or remove the row."
        ) from err


def _check_columns(dataset, image_column: str, text_column: str, prompt_column: str | None) -> None:
    columns = list(dataset.column_names)
    if image_column not in columns:
        raise CalibrationDataError(
            f"Calibration data has no image column {image_column!r}; its columns are {columns}. VLM calibration "
            "needs an image per row: pass image_column=<the column with the images>, or use image-text pairs."
        )
    if text_column not in columns:
        raise CalibrationDataError(
            f"Calibration data has no text column {text_column!r}; its columns are {columns}. Pass "
            "text_column=<the column with the answer/caption text>."
        )
    if prompt_column is not None and prompt_column not in columns:
        raise CalibrationDataError(
            f"Calibration data has no prompt column {prompt_column!r}; its columns are {columns}. Pass "
            "prompt_column=<the column with the questions>, or prompt_column=None for captions."
        )


# --------------------------------------------------------------------------------------------
# Loss mask
# --------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _messages(question: str, answer: str | None) -> list[dict]:
    user: list[dict] = [{"type": "image"}]
    if question:
        user.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class _RowEncoder:
    """Encodes one (image, question, answer) with the processor and builds its loss mask."""

    def __init__(
        self,
        processor,
        family: VLMFamily,
        image_token: int,
        count_prompt_as_text: bool,
        text_mask: str = "assistant_turn",
    ):
        self.processor = processor
        self.text_mask = text_mask
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.family = family
        self.image_token = image_token
        self.count_prompt_as_text = count_prompt_as_text
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise CalibrationDataError(
                f"The {type(processor).__name__} has no chat template, so prompts cannot be laid out the way "
                f"the model was trained. Load the processor from the model's checkpoint "
                f"(AutoProcessor.from_pretrained) or set processor.chat_template."
            )

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, image, text: str) -> dict[str, np.ndarray]:
        bos = getattr(self.tokenizer, "bos_token", None)
        # templates that write the BOS themselves (Gemma 3, Idefics3) must not get a second one
        add_special = not (bos and text.startswith(bos))
        out = self.processor(images=[image], text=[text], return_tensors="np", add_special_tokens=add_special)
        return {k: np.asarray(v) for k, v in out.items()}

    def _ids(self, image, text: str) -> list[int]:
        return self._encode(image, text)["input_ids"][0].tolist()

    def _assistant_turn_start(self, question: str, full: str, ans_start: int, row: int) -> int:
        """Character offset in ``full`` where the assistant turn begins: the end of the conversation
        rendered without the assistant turn (and without a generation prompt), i.e. the start of the
        assistant header."""
        user_only = self._render(_messages(question, None), add_generation_prompt=False)
        start = len(user_only) if full.startswith(user_only) else _common_prefix(list(user_only), list(full))
        if start > ans_start:
            raise CalibrationDataError(
                f"Row {row}: the chat template of {type(self.processor).__name__} renders the user turn past the "
                "start of the answer, so the assistant turn cannot be located. Use text_mask='answer'."
            )
        return start

    def __call__(self, image, question: str, answer: str, row: int) -> dict[str, np.ndarray]:
        full = self._render(_messages(question, answer), add_generation_prompt=False)
        prompt = self._render(_messages(question, None), add_generation_prompt=True)
        search_from = len(prompt) if full.startswith(prompt) else 0
        ans_start = full.find(answer, search_from)
        if ans_start < 0:
            ans_start = full.rfind(answer)
        if ans_start < 0:
            raise CalibrationDataError(
                f"Row {row}: the chat template of {type(self.processor).__name__} does not reproduce the answer "
                f"text {answer[:40]!r} verbatim, so answer tokens cannot be located. Strip unusual whitespace "
                "from the text column."
            )
        ans_end = ans_start + len(answer)

        enc = self._encode(image, full)
        ids = enc["input_ids"][0].tolist()
        mask = np.zeros(len(ids), dtype=np.int64)

        def span(start_char: int, end_char: int) -> tuple[int, int]:
            # tokens shared with the prefix's tokenization end at or before start_char; the next
            # token of `ids` starts at start_char or straddles it (then it holds text chars too)
            start = _common_prefix(ids, self._ids(image, full[:start_char]))
            if end_char >= len(full):  # to the end of the text: every token (no second encode)
                return start, len(ids)
            end_prefix = self._ids(image, full[:end_char])
            end = _common_prefix(ids, end_prefix)
            if end < len(end_prefix):  # the token at `end` straddles end_char: it holds text chars too
                end += 1
            return start, end

        if self.text_mask == "assistant_turn":
            # the reference's labels != -100: from the end of the rendered user turn (the assistant
            # header) to the end of the text (answer and end-of-turn tokens)
            turn_start = self._assistant_turn_start(question, full, ans_start, row)
            a0, a1 = span(turn_start, len(full))
        else:
            a0, a1 = span(ans_start, ans_end)
        mask[a0:a1] = TEXT
        if self.count_prompt_as_text and question:
            q_start = full.rfind(question, 0, ans_start)
            if q_start >= 0:
                q0, q1 = span(q_start, q_start + len(question))
                mask[q0:q1] = TEXT

        if self.family.uses_mm_token_type_ids and "mm_token_type_ids" in enc:
            vision = enc["mm_token_type_ids"][0] == 1
        else:
            vision = np.asarray(ids) == self.image_token
        if not vision.any():
            raise CalibrationDataError(
                f"Row {row}: the processor produced no image tokens (id {self.image_token}) for this row. The "
                "processor does not match the model: load both from the same checkpoint."
            )
        mask[vision] = VISION
        if "attention_mask" in enc:
            mask[enc["attention_mask"][0] == 0] = IGNORE
        enc["loss_mask"] = mask[None, :]
        return enc


def _truncate(enc: dict[str, np.ndarray], max_seq_length: int, row: int) -> dict[str, np.ndarray]:
    length = enc["input_ids"].shape[-1]
    if length <= max_seq_length:
        return enc
    vision_positions = np.nonzero(enc["loss_mask"][0] == VISION)[0]
    last_vision = int(vision_positions[-1])
    if last_vision >= max_seq_length:
        raise CalibrationDataError(
            f"Row {row}: max_seq_length={max_seq_length} would cut through the image tokens (the image ends at "
            f"token {last_vision + 1} of {length}); a half image cannot be fed to the model. Raise max_seq_length "
            f"to at least {length}, or use smaller images."
        )
    out = dict(enc)
    for key in _TOKEN_KEYS:
        if key in out:
            out[key] = out[key][..., :max_seq_length]
    if not (out["loss_mask"] == TEXT).any():
        raise CalibrationDataError(
            f"Row {row}: after truncating to max_seq_length={max_seq_length} no text token is left (the row has "
            f"{length} tokens). Raise max_seq_length to at least {length}, or shorten the prompt."
        )
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def build_calibration_dataset(
    source: Any,
    processor: Any,
    model_or_config: Any,
    num_samples: int | None = None,
    image_column: str = "image",
    text_column: str = "text",
    prompt_column: str | None = None,
    seed: int = 0,
    shuffle: bool = True,
    max_seq_length: int | None = None,
    count_prompt_as_text: bool = False,
    default_prompt: str | None = None,
    text_mask: str = "assistant_turn",
):
    """Image-text pairs -> a :class:`datasets.Dataset` of processor outputs with a ``loss_mask``.

    :param source: a :class:`datasets.Dataset` (or list of row dicts), a ``save_to_disk`` directory,
        or an image folder with ``captions.jsonl``/``captions.tsv`` (see the module docstring)
    :param processor: the model's processor (``AutoProcessor.from_pretrained(model_dir)``)
    :param model_or_config: the model, its config, or its checkpoint directory (gives the family and
        the image token id)
    :param num_samples: rows to use (after shuffling); ``None`` = all
    :param image_column: column holding the images (PIL, ``{"bytes","path"}`` or paths)
    :param text_column: column holding the answer/caption (the assistant turn)
    :param prompt_column: column holding the question (the user turn's text); ``None`` = image only
        (or ``default_prompt``). For image folders the ``question`` column is used when present.
    :param seed: shuffling seed
    :param shuffle: shuffle before taking ``num_samples``
    :param max_seq_length: truncate longer rows; a row whose image would be cut raises
    :param count_prompt_as_text: also mark the question's tokens as text (``loss_mask == 1``)
    :param default_prompt: question for rows without one
    :param text_mask: which tokens get ``loss_mask == 1``: ``"assistant_turn"`` (default; the MBQ
        reference's ``labels != -100``: assistant header, answer, end-of-turn tokens) or ``"answer"``
        (the answer's own tokens only; a departure from the reference, kept for comparison: the
        last labelled position has an exactly-zero output gradient, which on short answers makes
        MBQ's vision/text sensitivity ratio explode)
    :return: dataset with one processor output per row (batch dim kept) plus ``loss_mask``
    """
    import datasets

    if text_mask not in TEXT_MASKS:
        raise CalibrationDataError(
            f"text_mask must be one of {TEXT_MASKS}, got {text_mask!r}. 'assistant_turn' labels the whole "
            "assistant turn as the MBQ reference does; 'answer' only the answer's tokens."
        )
    dataset = load_pairs(source)
    if prompt_column is None and _is_image_folder(source):
        prompt_column = "question"  # image folders: questions (possibly empty) come with the captions
    _check_columns(dataset, image_column, text_column, prompt_column)
    if len(dataset) == 0:
        raise CalibrationDataError("Calibration data has no rows. Provide at least one image-text pair.")

    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, (str, os.PathLike)) and Path(config).is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(config))
    family = get_family(config)
    if isinstance(config, (str, os.PathLike)):
        raise CalibrationDataError(
            "build_calibration_dataset needs the model, its config or its checkpoint directory (for the image "
            f"token id), not only the name {str(config)!r}. Pass model, model.config or the model's path."
        )
    if getattr(processor, "image_processor", None) is None:
        raise CalibrationDataError(
            f"The processor is a {type(processor).__name__} without an image processor; VLM calibration needs "
            "the model's multimodal processor. Load it with AutoProcessor.from_pretrained(<model path>)."
        )
    encoder = _RowEncoder(processor, family, image_token_id(config), count_prompt_as_text, text_mask)

    feature = dataset.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        # decode ourselves, so an unreadable image raises a CalibrationDataError naming its row
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    indices = list(range(len(dataset)))
    if shuffle:
        rng = np.random.default_rng(seed)
        indices = rng.permutation(len(dataset)).tolist()
    if num_samples is not None:
        if num_samples <= 0:
            raise CalibrationDataError(f"num_samples must be positive, got {num_samples}.")
        if num_samples > len(indices):
            logger.warning("Asked for %d calibration samples but the data has %d rows; using all of them.",
                           num_samples, len(indices))
        indices = indices[:num_samples]

    rows: list[dict[str, Any]] = []
    for row in indices:
        record = dataset[row]
        text = record[text_column]
        if text is None or not str(text).strip():
            raise CalibrationDataError(
                f"Row {row} has an empty text (column {text_column!r}). Give every image a caption/answer or "
                "remove the row."
            )
        question = record[prompt_column] if prompt_column is not None else None
        question = str(question).strip() if question else (default_prompt or "")
        image = _open_image(record[image_column], row, image_column)
        enc = encoder(image, question, str(text).strip(), row)
        if max_seq_length is not None:
            enc = _truncate(enc, max_seq_length, row)
        rows.append(enc)
    return datasets.Dataset.from_list(rows)


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch-size-1 collator for ``oneshot(data_collator=collate_fn)``: the row's processor output
    as tensors (with their batch dimension of 1), ``loss_mask`` included."""
    if len(batch) != 1:
        raise CalibrationDataError(
            f"collate_fn takes batches of one row (each row is a full processor output), got {len(batch)}. "
            "Run oneshot with batch_size=1."
        )
    return {key: torch.tensor(value) for key, value in batch[0].items()}
