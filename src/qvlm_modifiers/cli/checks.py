"""Every input check of the ``qvlm`` commands, run once, before any weight is loaded.

Loading a VLM and calibrating it takes minutes to hours; a typo in the output path or a dataset
without images must fail in a second, with a message that names the problem and the fix, and
leave nothing behind. So ``quantize`` and ``eval`` start with :func:`check_quantize_inputs` /
:func:`check_eval_inputs`, which check (cheapest first) the option values, the output directory,
the recipe, the model files, its config (a supported VLM family), its processor and the
calibration data, and hand the checked objects on; the commands do not check again.

The checks the library entry point :func:`qvlm_modifiers.oneshot` shares with the CLI have one home
each in the library, used by both: the output directory
(:func:`qvlm_modifiers.save.check_output_dir`), the recipe
(:func:`qvlm_modifiers.recipe_check.load_recipe`) and the model family
(:func:`qvlm_modifiers.families.get_family`). They stay there, not here, because the library must
not import the command line. The CLI saves the checkpoint itself (``oneshot(output_dir=None)``
followed by :func:`qvlm_modifiers.save.save_pretrained`), so the wrapper does not validate the
output directory a second time.

Rows are decoded (and a corrupt image is reported by row) by
:func:`qvlm_modifiers.data.build_calibration_dataset`, which the commands call right after these
checks, still before loading weights.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlm_modifiers.errors import CalibrationDataError, QVLMError, UnsupportedModelError

__all__ = [
    "UsageError", "QuantizeInputs", "EvalInputs", "check_quantize_inputs", "check_eval_inputs",
    "resolve_model_source", "load_config", "load_processor", "load_calibration_pairs", "check_pairs",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UsageError(QVLMError):
    """A command-line argument is invalid (a value, not the syntax)."""


# --------------------------------------------------------------------------------------------
# Per command: everything, in order, once
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizeInputs:
    """What ``qvlm quantize`` needs after its checks passed."""

    out: Path  #: absolute output directory (new, empty, or --overwrite; writable)
    recipe: Any  #: the validated llm-compressor Recipe
    recipe_file: Path  #: the recipe's YAML file (its text goes into the run record)
    source: str  #: model directory or hub id, for from_pretrained
    config: Any  #: the model's config, of a supported VLM family
    processor: Any  #: its processor (image processor, tokenizer, chat template)
    pairs: Any  #: the calibration image-text pairs (datasets.Dataset, images undecoded)
    prompt_column: str | None  #: column with the prompt, if any


@dataclass
class EvalInputs:
    """What ``qvlm eval`` needs after its checks passed."""

    source: str
    config: Any
    processor: Any
    pairs: Any
    prompt_column: str | None
    reference: str | None  #: the reference model's directory or hub id, if one was given


def check_quantize_inputs(args: argparse.Namespace) -> QuantizeInputs:
    """All checks of ``qvlm quantize``, cheapest first; raises a :class:`QVLMError` at the first
    problem. Writes nothing (the output directory is probed, not created)."""
    from qvlm_modifiers import recipe_path
    from qvlm_modifiers.recipe_check import load_recipe
    from qvlm_modifiers.save import check_output_dir

    if args.num_samples <= 0:
        raise UsageError(f"--num-samples must be positive, got {args.num_samples}. Pass e.g. --num-samples 128.")
    if args.max_seq_length is not None and args.max_seq_length <= 0:
        raise UsageError(f"--max-seq-length must be positive, got {args.max_seq_length}.")
    if args.max_cpu_memory and not args.offload_dir:
        raise UsageError("--max-cpu-memory needs --offload-dir: the weights above the cap go to disk. "
                         "Pass e.g. --offload-dir /scratch/qvlm-offload.")

    out = check_output_dir(args.output, overwrite=args.overwrite)
    recipe = load_recipe(args.recipe)
    recipe_file = recipe_path(args.recipe)
    source = resolve_model_source(args.model)
    config = load_config(source, args.trust_remote_code)
    processor = load_processor(source, args.trust_remote_code)
    pairs = load_calibration_pairs(args.dataset, args.image_column, args.text_column)
    pairs = check_pairs(pairs, args.image_column, args.text_column, args.num_samples)
    if args.offload_dir:
        check_offload_dir(args.offload_dir)
    return QuantizeInputs(out=out, recipe=recipe, recipe_file=recipe_file, source=source, config=config,
                          processor=processor, pairs=pairs, prompt_column=_prompt_column(args, pairs))


def check_eval_inputs(args: argparse.Namespace) -> EvalInputs:
    """All checks of ``qvlm eval``: the checkpoint, its processor, the data and the reference model
    (its files and config), before either model is loaded."""
    source = resolve_model_source(args.checkpoint)
    config = load_config(source, args.trust_remote_code)
    processor = load_processor(source, args.trust_remote_code)
    pairs = load_calibration_pairs(args.dataset, args.image_column, args.text_column)
    pairs = check_pairs(pairs, args.image_column, args.text_column, args.num_samples)
    reference = None
    if args.reference:
        reference = resolve_model_source(args.reference)
        load_config(reference, args.trust_remote_code)
    return EvalInputs(source=source, config=config, processor=processor, pairs=pairs,
                      prompt_column=_prompt_column(args, pairs), reference=reference)


def _prompt_column(args: argparse.Namespace, pairs) -> str | None:
    """--prompt-column, or 'question' when the data has that column (zoo pairs, VQA sets)."""
    if args.prompt_column is not None:
        return args.prompt_column
    return "question" if "question" in pairs.column_names else None


# --------------------------------------------------------------------------------------------
# The single checks
# --------------------------------------------------------------------------------------------


def check_offload_dir(offload_dir: str) -> None:
    """--offload-dir may be new or an existing directory, never a file. (Whether it is writable shows
    when the run's folder is created in it: :func:`qvlm_modifiers.cli.loading.offload_folder`.)"""
    root = Path(offload_dir)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--offload-dir {root} exists and is not a directory. Pass a directory (it may be new).")


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def resolve_model_source(model: str) -> str:
    """Check a model argument: an existing checkpoint directory, or a hub id. Returns the string
    to pass to ``from_pretrained``. Raises with a message that names the problem and the fix."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UnsupportedModelError(
                f"Model path {str(path)!r} is a file, not a model directory. Pass the directory that holds "
                "config.json and the *.safetensors weights (what save_pretrained writes)."
            )
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(
                f"{str(path)!r} is not a model: it has no config.json. Pass a directory written by "
                "save_pretrained (config.json + *.safetensors + processor files) or a hub id such as "
                "Qwen/Qwen2.5-VL-3B-Instruct."
            )
        weights = list(path.glob("*.safetensors"))
        if not weights:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            if pickles:
                raise UnsupportedModelError(
                    f"Model {str(path)!r} only has pickle weights ({', '.join(pickles[:3])}); qvlm loads "
                    "safetensors only, never pickles. Convert it once with "
                    "`AutoModelForImageTextToText.from_pretrained(path).save_pretrained(new_path)` in an "
                    "environment you trust, then pass new_path."
                )
            raise UnsupportedModelError(
                f"Model {str(path)!r} has no *.safetensors weights. Pass a complete checkpoint directory "
                "(config.json + model*.safetensors)."
            )
        from qvlm_modifiers.inspect_ckpt import checkpoint_files, read_safetensors_header

        for weights_file in checkpoint_files(path):  # headers only: truncated/corrupt files fail here
            read_safetensors_header(weights_file)
        return str(path)
    if _looks_like_hub_id(model):
        return model
    raise UnsupportedModelError(
        f"Model path {model!r} does not exist. Pass an existing model directory or a hub id of the form "
        "org/name (e.g. Qwen/Qwen2.5-VL-3B-Instruct)."
    )


def load_config(source: str, trust_remote_code: bool):
    """``AutoConfig`` of a model, checked to be a supported VLM family."""
    from transformers import AutoConfig

    from qvlm_modifiers.families import get_family, supported_architectures

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        if Path(source).exists():
            raise UnsupportedModelError(
                f"Cannot read the config of {source!r} ({err}). Check that config.json is complete and valid JSON."
            ) from err
        raise UnsupportedModelError(
            f"Cannot fetch model {source!r} from the Hugging Face hub ({str(err).splitlines()[0]}). Check the "
            "name and your network (HF_HUB_OFFLINE / HF_TOKEN), or download it and pass the local directory."
        ) from err
    except ValueError as err:
        msg = str(err)
        if "trust_remote_code" in msg:
            raise UnsupportedModelError(
                f"Model {source!r} needs custom code from its repository to load. Custom code runs on your "
                "machine; if you trust it, pass --trust-remote-code. Supported architectures that need no "
                f"custom code: {', '.join(supported_architectures())}."
            ) from err
        raise UnsupportedModelError(
            f"Model {source!r} has an architecture this transformers version does not know ({msg.splitlines()[0]}). "
            f"Supported VLM architectures: {', '.join(supported_architectures())}."
        ) from err
    except json.JSONDecodeError as err:  # pragma: no cover - raised as OSError/ValueError by transformers
        raise UnsupportedModelError(f"config.json of {source!r} is not valid JSON ({err}).") from err
    get_family(config)  # UnsupportedModelError listing the supported architectures
    return config


def load_processor(source: str, trust_remote_code: bool):
    """The model's processor, checked to have both an image processor and a tokenizer."""
    from transformers import AutoProcessor

    fix = (
        "Copy the processor files of the original model (preprocessor_config.json or processor_config.json, "
        "tokenizer.json/tokenizer_config.json, chat_template) into the model directory, or save them with "
        "AutoProcessor.from_pretrained(original).save_pretrained(model_dir)."
    )
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many types here; all mean the same
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(
            f"The processor of {source!r} is missing or broken ({type(err).__name__}: {first[:300]}). {fix}"
        ) from err
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise UnsupportedModelError(
            f"{source!r} has no complete multimodal processor: AutoProcessor gave a {type(processor).__name__} "
            f"without an image processor and a tokenizer. {fix}"
        )
    if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        raise UnsupportedModelError(f"The processor of {source!r} has no chat template. {fix}")
    return processor


def load_calibration_pairs(source: str, image_column: str, text_column: str):
    """A dataset argument -> ``datasets.Dataset`` of pairs (save_to_disk folder, image folder with
    a captions file, or a hub dataset name)."""
    import datasets

    from qvlm_modifiers.data import load_pairs

    path = Path(source).expanduser()
    if path.exists() or not _looks_like_hub_id(source):
        if path.is_dir() and not any(path.iterdir()):
            raise CalibrationDataError(
                f"Calibration data folder {str(path)!r} is empty. Put images and a captions.jsonl/captions.tsv "
                "in it, or pass a directory written by Dataset.save_to_disk."
            )
        if path.is_dir() and not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            has_captions = (path / "captions.jsonl").is_file() or (path / "captions.tsv").is_file()
            has_images = any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.iterdir())
            if has_captions and not has_images:
                raise CalibrationDataError(
                    f"Calibration data folder {str(path)!r} has a captions file but no images "
                    f"({', '.join(sorted(_IMAGE_SUFFIXES))}). Put the image files next to the captions file."
                )
        state = path / "state.json"
        if state.is_file():
            try:
                no_data = not json.loads(state.read_text()).get("_data_files")
            except ValueError:
                no_data = False  # reported by load_pairs below
            if no_data:
                raise CalibrationDataError(
                    f"Calibration data {str(path)!r} (a Dataset.save_to_disk folder) has no rows. Save image-text "
                    "pairs into it (at least --num-samples of them)."
                )
        try:
            return load_pairs(str(path))
        except QVLMError:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. a broken save_to_disk folder
            raise CalibrationDataError(
                f"Calibration data {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:300]}). Pass a "
                "directory written by Dataset.save_to_disk or a folder of images with captions.jsonl/captions.tsv."
            ) from err
    try:
        loaded = datasets.load_dataset(source, split="train")
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        raise CalibrationDataError(
            f"Calibration data {source!r} is neither an existing path nor a dataset that could be loaded from the "
            f"hub ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). Pass a local folder "
            "(Dataset.save_to_disk output, or images + captions.jsonl) or a reachable hub dataset name."
        ) from err
    return loaded


def check_pairs(pairs, image_column: str, text_column: str, num_samples: int):
    """Row count and columns of the pairs; returns them with the image column left undecoded, so
    a corrupt image is reported by row (by :mod:`qvlm_modifiers.data`) instead of failing inside
    ``datasets``."""
    import datasets

    columns = list(pairs.column_names)
    if len(pairs) == 0:
        raise CalibrationDataError(
            "Calibration data has no rows. Provide image-text pairs (at least --num-samples of them)."
        )
    if image_column not in columns:
        raise CalibrationDataError(
            f"Calibration data has no image column {image_column!r} (columns: {columns}). VLM calibration needs "
            "an image per row: pass --image-column <column with the images>, or use image-text pairs."
        )
    if text_column not in columns:
        raise CalibrationDataError(
            f"Calibration data has no text column {text_column!r} (columns: {columns}). Pass --text-column "
            "<column with the caption/answer>."
        )
    if len(pairs) < num_samples:
        raise CalibrationDataError(
            f"Calibration data has {len(pairs)} rows, fewer than --num-samples {num_samples}. Lower --num-samples "
            f"to at most {len(pairs)} or add more image-text pairs."
        )
    feature = pairs.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        pairs = pairs.cast_column(image_column, datasets.Image(decode=False))
    return pairs
