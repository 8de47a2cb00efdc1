"""Evaluation metrics for full-precision vs quantized VLMs.

* :func:`vqa_accuracy`: exact match on normalized answers with a bootstrap 95% interval
  (greedy generation via :func:`generate_answers`).
* :func:`answer_logprobs` + :func:`assistant_turn_kl`: KL(full precision || quantized) of the
  next-token distributions at every assistant-turn token (content + end of turn) of held-out rows,
  teacher forced, overall and per row kind (``caption`` / ``answer``) with the per-row values that
  paired comparisons need; :func:`assistant_turn_rows` builds those rows (easy-vqa test questions
  and composed captions of easy-vqa test images, ``qvlm_eval.captions``).
* :func:`perplexity`: text-only perplexity on a real corpus (:func:`load_text_corpus`, default the
  Lee news corpus from gensim's test data).
* :func:`measure_resources`: wall time, peak RSS and (on GPU) CUDA max allocated of a callable.
* :func:`checkpoint_size`: bytes on disk of a checkpoint directory.

Generic over any supported VLM that has a processor with a chat template; VQA data from the
``easy-vqa`` package, a ``datasets.save_to_disk`` folder or a hub dataset name with ``image``,
``question`` and ``answer`` columns. Command line::

    python -m qvlm_eval.metrics --model DIR [--quantized DIR] --data easy-vqa --num-questions 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from qvlm_modifiers.errors import CalibrationDataError, CheckpointError, UnsupportedModelError
from qvlm_modifiers.resources import ResourceUsage, measure_resources  # noqa: F401  (re-exported)
from qvlm_modifiers.scoring import kl_divergence, mean_kl, next_token_logprobs  # noqa: F401  (re-exported)

__all__ = [
    "EvalDataError",
    "normalize_answer",
    "bootstrap_ci",
    "vqa_accuracy",
    "load_vqa_dataset",
    "check_evaluable",
    "build_prompt",
    "generate_answers",
    "evaluate_vqa",
    "answer_logprobs",
    "kl_divergence",
    "mean_kl",
    "assistant_turn_kl",
    "caption_dataset",
    "assistant_turn_rows",
    "load_text_corpus",
    "perplexity",
    "ResourceUsage",
    "measure_resources",
    "checkpoint_size",
    "load_model_and_processor",
]


class EvalDataError(CalibrationDataError):
    """Evaluation data is missing, unknown, or lacks the columns the metric needs."""


# --------------------------------------------------------------------------------------- VQA accuracy
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower-case, first line only, punctuation and articles removed, whitespace collapsed.

    ``"Yes."`` -> ``"yes"``, ``" The  Circle!\\n..."`` -> ``"circle"``.
    """
    text = str(text).strip().split("\n", 1)[0].lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def bootstrap_ci(hits: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``hits`` (0/1 per question)."""
    values = np.asarray(hits, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str], n_resamples: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """Exact match of normalized answers: ``{"accuracy", "ci_low", "ci_high", "n"}`` (95% bootstrap)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)]
    low, high = bootstrap_ci(hits, n_resamples=n_resamples, seed=seed)
    return {"accuracy": float(np.mean(hits)), "ci_low": low, "ci_high": high, "n": len(hits),
            "hits": [int(h) for h in hits]}


# --------------------------------------------------------------------------------------- VQA data
def _easy_vqa_split(split: str):
    import datasets

    try:
        import easy_vqa
    except ModuleNotFoundError as err:
        raise EvalDataError("The `easy-vqa` data set needs the easy-vqa package: `pip install -e '.[eval]'`.") from err
    if split not in ("train", "test"):
        raise EvalDataError(f"easy-vqa has the splits 'train' and 'test', not {split!r}.")
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()

    def rows():
        for q, a, i in zip(texts, answers, image_ids):
            yield {"image": paths[i], "question": q, "answer": a, "image_id": int(i)}

    ds = datasets.Dataset.from_list(list(rows()))
    return ds.cast_column("image", datasets.Image())


def load_vqa_dataset(source: str | os.PathLike | Any = "easy-vqa", split: str = "test",
                     num_samples: int | None = None, seed: int = 0,
                     image_column: str = "image", question_column: str = "question",
                     answer_column: str = "answer"):
    """VQA rows with columns ``image``, ``question``, ``answer``.

    :param source: ``"easy-vqa"`` (the package's own split), a ``datasets.Dataset``, a
        ``save_to_disk`` folder, or a hub dataset name
    :param num_samples: a seeded random subset of this size (``None`` = all rows)
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        ds = source
    elif str(source) == "easy-vqa":
        ds = _easy_vqa_split(split)
    elif Path(str(source)).exists():
        try:
            ds = datasets.load_from_disk(str(source))
        except Exception as err:  # noqa: BLE001 - anything unreadable
            raise EvalDataError(
                f"{source} is not a `datasets` folder (save_to_disk) that can be read: {err}. "
                "Fix: pass 'easy-vqa', a hub dataset name, or a folder written by Dataset.save_to_disk."
            ) from err
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise EvalDataError(f"{source} has splits {list(ds)}, not {split!r}. Fix: pass --split.")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(str(source), split=split)
        except Exception as err:  # noqa: BLE001
            raise EvalDataError(
                f"Could not load the VQA data set {source!r} (split {split!r}): {err}. Fix: pass 'easy-vqa', "
                "a local save_to_disk folder, or a reachable hub data set name."
            ) from err
    missing = [c for c in (image_column, question_column, answer_column) if c not in ds.column_names]
    if missing:
        raise EvalDataError(
            f"The VQA data set lacks the column(s) {missing} (it has {ds.column_names}). Fix: rename them to "
            f"image/question/answer or pass image_column/question_column/answer_column."
        )
    if len(ds) == 0:
        raise EvalDataError("The VQA data set has no rows.")
    if (image_column, question_column, answer_column) != ("image", "question", "answer"):
        ds = ds.select_columns([image_column, question_column, answer_column])
        ds = ds.rename_columns({image_column: "image", question_column: "question", answer_column: "answer"})
    if num_samples is not None and num_samples < len(ds):
        rng = np.random.default_rng(seed)
        ds = ds.select(sorted(rng.choice(len(ds), size=num_samples, replace=False).tolist()))
    return ds


def caption_dataset(split: str = "test", num_samples: int | None = None, seed: int = 0, photos: bool = False):
    """Caption rows (``image``, ``question``, ``answer`` = the caption, ``kind`` = "caption") of easy-vqa
    images of ``split`` (captions composed from each image's facts), plus the package photos' hand
    captions when ``photos`` (used for calibration: the photos are in the vision side's training data);
    a seeded subset of ``num_samples`` rows."""
    import datasets

    from qvlm_eval.captions import easy_vqa_caption_rows, photo_caption_rows

    if split not in ("train", "test"):
        raise EvalDataError(f"easy-vqa has the splits 'train' and 'test', not {split!r}.")
    rows = easy_vqa_caption_rows(split) + (photo_caption_rows() if photos else [])
    if num_samples is not None and num_samples < len(rows):
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=num_samples, replace=False).tolist())]
    ds = datasets.Dataset.from_list([{"image": r["image"], "question": r["question"], "answer": r["answer"],
                                      "kind": "caption"} for r in rows])
    return ds.cast_column("image", datasets.Image())


def assistant_turn_rows(answer_rows: int, caption_rows: int, seed: int = 0, split: str = "test"):
    """Held-out rows for the assistant-turn KL: ``answer_rows`` easy-vqa questions then ``caption_rows``
    composed captions, both seeded subsets of ``split``, with a ``kind`` column ("answer"/"caption")."""
    import datasets

    parts = []
    if answer_rows:
        vqa = load_vqa_dataset("easy-vqa", split=split, num_samples=answer_rows, seed=seed)
        vqa = vqa.select_columns(["image", "question", "answer"])
        parts.append(vqa.add_column("kind", ["answer"] * len(vqa)))
    if caption_rows:
        parts.append(caption_dataset(split, caption_rows, seed))
    if not parts:
        raise EvalDataError("assistant_turn_rows needs at least one answer or caption row.")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------------------- model access
def check_evaluable(model: Any, processor: Any) -> None:
    """Raise UnsupportedModelError unless the model can be prompted with images and a chat template."""
    if processor is None:
        raise UnsupportedModelError(
            "The evaluator needs the model's processor, but there is none. Fix: save the processor next to "
            "the model (processor.save_pretrained(DIR)) or pass processor=AutoProcessor.from_pretrained(...)."
        )
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UnsupportedModelError(
            f"{type(processor).__name__} is not a multimodal processor (no image_processor/tokenizer). Fix: "
            "load the VLM's processor with AutoProcessor, not its tokenizer."
        )
    if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        raise UnsupportedModelError(
            f"The processor of {type(model).__name__} has no chat template, so prompts with an image cannot be "
            "built. Fix: set processor.chat_template (a Jinja template accepting image/text content parts)."
        )
    if model is not None:
        from qvlm_modifiers.families import get_family

        get_family(model)


def load_model_and_processor(path: str | os.PathLike, dtype: torch.dtype | str = "auto"):
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from a directory or hub id, checked."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Could not load a VLM from {path}: {err}. Fix: pass a checkpoint directory "
                              "written by save_pretrained or a hub id of a supported VLM.") from err
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        processor = None
    check_evaluable(model, processor)
    model.eval()
    return model, processor


def build_prompt(processor: Any, question: str) -> str:
    """The chat prompt for one image followed by ``question``, ending where the answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to_model(batch: dict, model) -> dict:
    device, dtype = _device(model), next(model.parameters()).dtype
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


@torch.no_grad()
def generate_answers(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str],
                     max_new_tokens: int = 6, batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) for image/question pairs."""
    check_evaluable(None, processor)
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    try:
        for start in starts:
            qs = questions[start : start + batch_size]
            ims = [im.convert("RGB") if hasattr(im, "convert") else im for im in images[start : start + batch_size]]
            prompts = [build_prompt(processor, q) for q in qs]
            batch = processor(text=prompts, images=[[im] for im in ims], padding=True, return_tensors="pt")
            batch = _to_model(dict(batch), model)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return answers


def evaluate_vqa(model: Any, processor: Any, dataset: Any, batch_size: int = 8, max_new_tokens: int = 6,
                 progress: bool = False) -> dict[str, Any]:
    """Accuracy (+ 95% CI) of greedy answers on a :func:`load_vqa_dataset` data set."""
    predictions = generate_answers(model, processor, dataset["image"], dataset["question"],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    result = vqa_accuracy(predictions, dataset["answer"])
    result["predictions"] = predictions
    return result


# --------------------------------------------------------------------------------------- KL on answer tokens
def _answer_positions(processor, image, question: str, answer: str):
    """Processor batch for prompt+answer and the mask of its answer tokens (scored by
    :func:`qvlm_modifiers.scoring.next_token_logprobs`)."""
    prompt = build_prompt(processor, question)
    end = getattr(processor.tokenizer, "eos_token", None) or ""
    prompt_ids = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"][0]
    full = processor(text=[prompt + answer + end], images=[[image]], return_tensors="pt")
    ids = full["input_ids"][0]
    n = prompt_ids.shape[0]
    if ids.shape[0] <= n or not torch.equal(ids[:n], prompt_ids):
        raise UnsupportedModelError(
            "The tokenized prompt is not a prefix of prompt+answer for this processor, so answer tokens cannot "
            "be located. Fix: use a chat template whose generation prompt ends the user turn cleanly."
        )
    target = torch.zeros(ids.shape[0], dtype=torch.bool)
    target[n:] = True  # the answer (and end-of-turn) tokens
    return full, target


@torch.no_grad()
def answer_logprobs(model: Any, processor: Any, dataset: Any, progress: bool = False) -> list[torch.Tensor]:
    """Per row: log-softmax (float32, CPU) of the next-token logits at the answer tokens (teacher forced)."""
    check_evaluable(None, processor)
    rows = range(len(dataset))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="answer logits", unit="row")
    out = []
    for i in rows:
        record = dataset[i]
        image = record["image"].convert("RGB") if hasattr(record["image"], "convert") else record["image"]
        batch, target = _answer_positions(processor, image, record["question"], str(record["answer"]))
        logits = model(**_to_model(dict(batch), model)).logits[0]
        out.append(next_token_logprobs(logits, target).cpu())
    return out


def assistant_turn_kl(reference: Sequence[torch.Tensor], quantized: Sequence[torch.Tensor],
                      kinds: Sequence[str] | None = None) -> dict[str, Any]:
    """KL(FP || quantized) over every scored assistant-turn token, from :func:`answer_logprobs` rows.

    Returns :func:`mean_kl`'s ``kl_mean``/``kl_max``/``tokens`` over all tokens of all rows, the same per
    row kind under ``by_kind`` (e.g. ``{"caption": {...}, "answer": {...}}``), and per row the mean KL
    and the token count (``per_row``, ``tokens_per_row``, in row order) for paired comparisons."""
    if len(reference) != len(quantized):
        raise ValueError(f"{len(reference)} reference rows vs {len(quantized)} quantized rows")
    kinds = list(kinds) if kinds is not None else ["answer"] * len(reference)
    if len(kinds) != len(reference):
        raise ValueError(f"{len(kinds)} row kinds for {len(reference)} rows")
    per_token = [kl_divergence(p, q) for p, q in zip(reference, quantized)]
    out: dict[str, Any] = mean_kl(reference, quantized)
    out["by_kind"] = {}
    for kind in sorted(set(kinds)):
        values = torch.cat([v for v, k in zip(per_token, kinds) if k == kind])
        out["by_kind"][kind] = {"kl_mean": float(values.mean()), "kl_max": float(values.max()),
                                "tokens": int(values.numel()), "rows": kinds.count(kind)}
    out["per_row"] = [float(v.mean()) for v in per_token]
    out["tokens_per_row"] = [int(v.numel()) for v in per_token]
    out["kinds"] = kinds
    return out


# --------------------------------------------------------------------------------------- perplexity
def load_text_corpus(name: str = "lee") -> str:
    """Real English text: ``"lee"`` = the Lee news corpus (gensim test data, lee_background.cor), or a path."""
    if name == "lee":
        try:
            from gensim.test.utils import datapath
        except ModuleNotFoundError as err:
            raise EvalDataError("The Lee corpus ships with gensim: `pip install -e '.[eval]'` (or pip install "
                                "gensim), or pass a text file path.") from err
        return Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace")
    path = Path(name)
    if not path.is_file():
        raise EvalDataError(f"No text corpus {name!r}: pass 'lee' or the path of a UTF-8 text file.")
    return path.read_text(encoding="utf-8", errors="replace")


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, text: str, max_tokens: int = 2048, window: int = 256) -> dict[str, float]:
    """exp(mean NLL) over the first ``max_tokens`` tokens of ``text``, in non-overlapping windows.

    Each window is scored on its own (the first token of a window only conditions), so the number of
    scored tokens is ``sum(len(w) - 1)``. Works for causal LMs and for VLMs on text-only input.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:max_tokens]
    if ids.numel() < 2:
        raise EvalDataError("The perplexity text has fewer than 2 tokens.")
    device = _device(model)
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start : start + window]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[None].to(device)).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:].to(device), reduction="sum").item()
        count += chunk.numel() - 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def checkpoint_size(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path`` (weights, config, processor files)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist. Fix: pass the directory the checkpoint was saved to.")
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="VQA accuracy / KL / perplexity / size of a VLM (vs a quantized one)")
    parser.add_argument("--model", required=True, help="full-precision model: directory or hub id")
    parser.add_argument("--quantized", help="quantized checkpoint to compare with --model")
    parser.add_argument("--data", default="easy-vqa", help="'easy-vqa', a save_to_disk folder or a hub name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-questions", type=int, default=200)
    parser.add_argument("--kl-rows", type=int, default=32)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--corpus", default="lee")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    from qvlm_modifiers.errors import QVLMError

    try:
        data = load_vqa_dataset(args.data, split=args.split, num_samples=args.num_questions)
        kl_data = load_vqa_dataset(args.data, split=args.split, num_samples=args.kl_rows, seed=1)
        text = load_text_corpus(args.corpus)
        results: dict[str, Any] = {}
        reference_logprobs = None
        for role, path in (("fp", args.model), ("quantized", args.quantized)):
            if path is None:
                continue
            model, processor = load_model_and_processor(path)
            vqa = evaluate_vqa(model, processor, data, batch_size=args.batch_size, progress=True)
            vqa.pop("predictions")
            entry = {"vqa": vqa, "ppl": perplexity(model, processor.tokenizer, text, max_tokens=args.ppl_tokens)}
            if Path(str(path)).exists():
                entry["size_bytes"] = checkpoint_size(path)
            logprobs = answer_logprobs(model, processor, kl_data)
            if role == "fp":
                reference_logprobs = logprobs
            else:
                entry["kl"] = mean_kl(reference_logprobs, logprobs)
            results[role] = entry
            del model
    except QVLMError as err:
        parser.exit(err.exit_code, f"error: {err}\n")
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
