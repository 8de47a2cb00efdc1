"""The ``qvlm`` command line: quantize, evaluate, list recipes, inspect checkpoints, benchmark.

::

    qvlm quantize MODEL --recipe R --dataset D --num-samples N --output OUT
    qvlm eval CKPT --dataset D [--reference MODEL]
    qvlm recipes
    qvlm inspect CKPT [--all] [--no-reload] [--json]
    qvlm bench {kernels,e2e,memory} [ARGS...]

Every user-facing failure is a :class:`~qvlm_modifiers.errors.QVLMError`; :func:`main` prints its
message (which names the problem and the fix) and returns its exit code (2) instead of a traceback.
``quantize`` checks everything it can (output directory, recipe, model files, processor, data)
*before* loading weights, and writes the checkpoint atomically (temporary sibling directory,
renamed at the end, via :func:`qvlm_modifiers.save.save_pretrained`), so a failure or a kill
never leaves a half-written output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from qvlm_modifiers.errors import (
    CalibrationDataError,
    CheckpointError,
    QVLMError,
    UnsupportedModelError,
)

__all__ = ["main", "build_parser", "RUN_RECORD_NAME"]

log = logging.getLogger("qvlm")

RUN_RECORD_NAME = "qvlm_run.json"
#: test hook: when set to a file path, ``quantize`` creates that file once the checkpoint is
#: partly written into its temporary directory and then sleeps, so a test can SIGKILL it there.
PAUSE_DURING_SAVE_ENV = "QVLM_TEST_PAUSE_DURING_SAVE"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UsageError(QVLMError):
    """A command-line argument is invalid (a value, not the syntax)."""


# --------------------------------------------------------------------------------------------
# Output: logging, progress bars, quiet mode
# --------------------------------------------------------------------------------------------


def _setup_logging(quiet: bool, log_file: str | None) -> list[logging.Handler]:
    """Console handler (INFO, WARNING with --quiet) + optional file handler (DEBUG); the same
    levels are applied to llm-compressor's loguru logger and transformers' logger."""
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    handlers.append(console)
    if log_file:
        try:
            Path(log_file).expanduser().parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(log_file).expanduser(), encoding="utf-8")
        except OSError as err:
            raise UsageError(
                f"Cannot open the log file {log_file!r} ({err.strerror or err}). Pass a writable --log-file path."
            ) from err
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    log.handlers.clear()
    for h in handlers:
        log.addHandler(h)
    log.setLevel(logging.DEBUG)
    log.propagate = False

    # transformers uses stdlib logging
    try:
        import transformers

        transformers.logging.set_verbosity_error() if quiet else transformers.logging.set_verbosity_warning()
    except Exception:  # noqa: BLE001 - transformers missing is reported where it is needed
        pass
    # llm-compressor / compressed-tensors log through loguru
    try:
        from loguru import logger as loguru_logger

        loguru_logger.remove()
        loguru_logger.add(sys.stderr, level="WARNING" if quiet else "INFO",
                          format="{time:HH:mm:ss} | {level} | {message}")
        if log_file:
            loguru_logger.add(str(Path(log_file).expanduser()), level="DEBUG",
                              format="{time} {level} llmcompressor: {message}")
        os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "false"
    except Exception:  # noqa: BLE001
        pass
    return handlers


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False`` every tqdm bar created meanwhile (ours, llm-compressor's,
    datasets') is disabled; tqdm reads its ``TQDM_*`` environment only at import, so the
    default is patched for the duration instead."""
    if enabled:
        yield
        return
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    @functools.wraps(original)
    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = quiet_init
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
        try:
            import datasets

            datasets.enable_progress_bars()
        except Exception:  # noqa: BLE001
            pass


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _peak_memory() -> dict[str, int | None]:
    """Peak resident set size of this process (bytes) and CUDA max allocated, if any."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cuda = None
    try:
        import torch

        if torch.cuda.is_available():
            cuda = int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001
        pass
    return {"peak_rss_bytes": int(peak_rss), "cuda_max_allocated_bytes": cuda}


# --------------------------------------------------------------------------------------------
# Input checks (all before any weight is loaded)
# --------------------------------------------------------------------------------------------


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


def data_fingerprint(calib) -> str:
    """sha256 over the calibration rows as the model sees them (token ids, pixel values, masks)."""
    import numpy as np

    digest = hashlib.sha256()
    for row in calib:
        for key in sorted(row):
            digest.update(key.encode())
            digest.update(np.asarray(row[key]).tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("qvlm-modifiers", "torch", "transformers", "llmcompressor", "compressed-tensors",
                 "datasets", "accelerate", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------


def _load_model(source: str, trust_remote_code: bool, device_map: str | None, offload_folder: str | None,
                max_cpu_memory: str | None = None):
    """Load the VLM (safetensors only). ``device_map``/``offload_folder`` load it offloaded through
    compressed-tensors' ``load_offloaded_model`` so the sequential pipeline onloads one layer at a
    time; ``max_cpu_memory`` caps the CPU memory given to weights (the rest goes to the folder)."""
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = dict(dtype="auto", use_safetensors=True, trust_remote_code=trust_remote_code)
    try:
        if offload_folder or (device_map and device_map not in ("cpu", "none")):
            from compressed_tensors.offload import load_offloaded_model

            kwargs["device_map"] = device_map or "auto_offload"
            if offload_folder:
                kwargs["offload_folder"] = str(offload_folder)
            if max_cpu_memory:
                kwargs["max_memory"] = {"cpu": max_cpu_memory}
            with load_offloaded_model(AutoModelForImageTextToText):
                model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        else:
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except QVLMError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors/accelerate/torch raise many types here
        raise CheckpointError(
            f"Cannot load the weights of {source!r} ({type(err).__name__}: {str(err).splitlines()[0][:300]}). "
            "Check that the *.safetensors files are complete (re-download or re-save the model)."
        ) from err
    return model


OFFLOAD_PREFIX = "qvlm-offload-"


@contextlib.contextmanager
def _offload_folder(offload_dir: str | None) -> Iterator[Path | None]:
    """A fresh folder for this run's offloaded weights inside ``--offload-dir``, removed at the end
    (also on errors). compressed-tensors writes offloaded tensors (and symlinks to the checkpoint's
    files) under fixed names and never deletes them: a shared folder would keep gigabytes after the
    run, and a second run could collide with the first one's names. Only a killed process (SIGKILL)
    leaves a ``qvlm-offload-*`` folder behind; it is safe to delete."""
    if not offload_dir:
        yield None
        return
    import shutil
    import tempfile

    root = Path(offload_dir)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--offload-dir {root} exists and is not a directory. Pass a directory (it may be new).")
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=OFFLOAD_PREFIX, dir=root))
    except OSError as err:
        raise UsageError(f"Cannot write to --offload-dir {root} ({err.strerror}). Pass a writable directory "
                         "on a disk with room for the model's weights.") from err
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if still empty


def disk_offloaded_tensors(folder: str | os.PathLike) -> int:
    """How many weights compressed-tensors' disk cache keeps in ``folder`` (0: all of them fit in CPU
    memory)."""
    from compressed_tensors.offload.cache.disk import DiskCache

    prefix = str(Path(folder).resolve())
    return sum(1 for info in DiskCache.index.values() if str(info.get("safetensors_file", "")).startswith(prefix))


def _install_save_extras(processor, record: dict[str, Any]) -> None:
    """Make ``processor.save_pretrained`` (this instance) also write ``qvlm_run.json`` into the same
    directory. Our atomic save writes the processor into the temporary directory just before the
    rename, so the run record is part of the atomic checkpoint. Also hosts the kill-test hook."""
    inner = processor.save_pretrained

    @functools.wraps(inner)
    def save_with_run_record(save_directory, *args, **kwargs):
        result = inner(save_directory, *args, **kwargs)
        record["wall_time_s"] = round(time.perf_counter() - record.pop("_t0"), 3) if "_t0" in record else record.get(
            "wall_time_s")
        record.update(_peak_memory())
        tmp = Path(save_directory) / (RUN_RECORD_NAME + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        tmp.replace(Path(save_directory) / RUN_RECORD_NAME)
        marker = os.environ.get(PAUSE_DURING_SAVE_ENV)
        if marker:
            Path(marker).write_text(str(save_directory))
            time.sleep(float(os.environ.get(PAUSE_DURING_SAVE_ENV + "_SECONDS", "120")))
        return result

    processor.save_pretrained = save_with_run_record


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from qvlm_modifiers import recipe_path
    from qvlm_modifiers.heap import fix_malloc_mmap_threshold
    from qvlm_modifiers.recipe_check import load_recipe
    from qvlm_modifiers.save import check_output_dir

    # before any weight is loaded: keeps CPU calibration's heap from growing layer by layer
    # (qvlm_modifiers.heap; QVLM_MALLOC_TUNING=0 turns it off)
    fix_malloc_mmap_threshold()
    t0 = time.perf_counter()
    if args.num_samples <= 0:
        raise UsageError(f"--num-samples must be positive, got {args.num_samples}. Pass e.g. --num-samples 128.")
    if args.max_seq_length is not None and args.max_seq_length <= 0:
        raise UsageError(f"--max-seq-length must be positive, got {args.max_seq_length}.")
    if args.max_cpu_memory and not args.offload_dir:
        raise UsageError("--max-cpu-memory needs --offload-dir: the weights above the cap go to disk. "
                         "Pass e.g. --offload-dir /scratch/qvlm-offload.")

    # 1. everything that can be checked without loading weights, cheapest first
    out = check_output_dir(args.output, overwrite=args.overwrite)
    recipe = load_recipe(args.recipe)
    recipe_file = recipe_path(args.recipe)
    source = resolve_model_source(args.model)
    config = load_config(source, args.trust_remote_code)
    processor = load_processor(source, args.trust_remote_code)
    pairs = load_calibration_pairs(args.dataset, args.image_column, args.text_column)
    pairs = check_pairs(pairs, args.image_column, args.text_column, args.num_samples)

    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.families import get_family

    family = get_family(config)
    log.info("qvlm: %s (%s), recipe %s, %d calibration samples -> %s", source, family.architecture,
             recipe_file.name, args.num_samples, out)
    prompt_column = args.prompt_column
    if prompt_column is None and "question" in pairs.column_names:
        prompt_column = "question"
    calib = build_calibration_dataset(
        pairs, processor, config, num_samples=args.num_samples, image_column=args.image_column,
        text_column=args.text_column, prompt_column=prompt_column, seed=args.seed,
        max_seq_length=args.max_seq_length,
    )
    fingerprint = data_fingerprint(calib)

    # 2. load and quantize
    torch.manual_seed(args.seed)
    record: dict[str, Any] = {
        "command": ["qvlm", *args._argv],
        "model": source,
        "architecture": family.architecture,
        "recipe_file": str(recipe_file),
        "recipe": recipe_file.read_text(),
        "dataset": args.dataset,
        "num_samples": args.num_samples,
        "max_seq_length": args.max_seq_length,
        "data_fingerprint_sha256": fingerprint,
        "seed": args.seed,
        "versions": _versions(),
        "_t0": t0,
    }
    _install_save_extras(processor, record)

    from qvlm_modifiers.api import oneshot

    oneshot_kwargs: dict[str, Any] = {}  # (use_loss_mask: set by the wrapper for MBQ / Q-VLM recipes)
    if args.offload_dir or (args.device_map and args.device_map not in ("cpu", "none")):
        oneshot_kwargs["sequential_offload_device"] = "cpu"
    with _offload_folder(args.offload_dir) as offload_folder:
        model = _load_model(source, args.trust_remote_code, args.device_map, offload_folder, args.max_cpu_memory)
        if offload_folder is not None:
            record["offload"] = {"dir": str(args.offload_dir), "max_cpu_memory": args.max_cpu_memory,
                                 "disk_offloaded_tensors": disk_offloaded_tensors(offload_folder)}
        oneshot(
            model=model, processor=processor, dataset=calib, recipe=recipe, output_dir=str(out),
            overwrite=args.overwrite, num_calibration_samples=args.num_samples,
            max_seq_length=args.max_seq_length or 2048, **oneshot_kwargs,
        )
    if not (out / RUN_RECORD_NAME).is_file():  # the save path did not call processor.save_pretrained
        raise CheckpointError(f"{out} was written without {RUN_RECORD_NAME}; the save path changed. Report this bug.")

    from qvlm_modifiers.inspect_ckpt import inspect_checkpoint

    report = inspect_checkpoint(out)
    run = json.loads((out / RUN_RECORD_NAME).read_text())
    schemes = ", ".join(sorted({s.split(" ")[0] for s in report.config_groups.values()})) or "dense"
    print(
        f"qvlm: quantized {Path(source).name} with {recipe_file.stem} ({schemes}) on {args.num_samples} samples in "
        f"{run.get('wall_time_s', 0):.1f} s -> {out} ({_human_bytes(report.size_on_disk)}, "
        f"{report.compression_vs_bf16:.2f}x smaller than bf16; peak RSS {_human_bytes(run['peak_rss_bytes'])})"
    )
    return 0


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def _answer_token_stats(model, row) -> tuple[Any, Any]:
    """Log-probs over the vocabulary at every position that predicts an answer token (loss_mask 1),
    and the answer token ids."""
    import torch

    from qvlm_modifiers.data import TEXT, collate_fn

    batch = collate_fn([row])
    mask = batch.pop("loss_mask")[0]
    with torch.no_grad():
        logits = model(**batch).logits[0].float()
    targets = batch["input_ids"][0][1:]
    predicts_text = mask[1:] == TEXT
    logprobs = torch.log_softmax(logits[:-1][predicts_text], dim=-1)
    return logprobs, targets[predicts_text]


def cmd_eval(args: argparse.Namespace) -> int:
    """Answer-token negative log-likelihood of a checkpoint on image-text pairs, optionally against a
    reference model (KL and top-1 agreement on the same tokens)."""
    import math

    from tqdm import tqdm

    from qvlm_modifiers.data import build_calibration_dataset
    from qvlm_modifiers.metrics import kl_divergence

    source = resolve_model_source(args.checkpoint)
    config = load_config(source, args.trust_remote_code)
    processor = load_processor(source, args.trust_remote_code)
    pairs = load_calibration_pairs(args.dataset, args.image_column, args.text_column)
    pairs = check_pairs(pairs, args.image_column, args.text_column, args.num_samples)
    prompt_column = args.prompt_column or ("question" if "question" in pairs.column_names else None)
    rows = build_calibration_dataset(pairs, processor, config, num_samples=args.num_samples,
                                     image_column=args.image_column, text_column=args.text_column,
                                     prompt_column=prompt_column, seed=args.seed, max_seq_length=args.max_seq_length)
    model = _load_model(source, args.trust_remote_code, None, None).eval()
    reference = None
    if args.reference:
        ref_source = resolve_model_source(args.reference)
        load_config(ref_source, args.trust_remote_code)
        reference = _load_model(ref_source, args.trust_remote_code, None, None).eval()

    nll_sum, tokens, kl_sum, agree, ref_nll_sum = 0.0, 0, 0.0, 0, 0.0
    for row in tqdm(rows, desc="eval", unit="sample"):
        logprobs, targets = _answer_token_stats(model, row)
        nll_sum += -logprobs.gather(1, targets[:, None]).sum().item()
        tokens += len(targets)
        if reference is not None:
            ref_lp, _ = _answer_token_stats(reference, row)
            ref_nll_sum += -ref_lp.gather(1, targets[:, None]).sum().item()
            kl_sum += kl_divergence(ref_lp, logprobs).sum().item()  # KL(reference || checkpoint), per token
            agree += int((ref_lp.argmax(-1) == logprobs.argmax(-1)).sum())
    if tokens == 0:
        raise CalibrationDataError("The evaluation rows contain no answer tokens. Give every image a non-empty text.")
    result: dict[str, Any] = {
        "checkpoint": source, "samples": len(rows), "answer_tokens": tokens,
        "nll": nll_sum / tokens, "perplexity": math.exp(nll_sum / tokens),
    }
    if reference is not None:
        result.update(reference=args.reference, reference_nll=ref_nll_sum / tokens,
                      reference_perplexity=math.exp(ref_nll_sum / tokens), kl_ref_to_ckpt=kl_sum / tokens,
                      top1_agreement=agree / tokens)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    line = (f"qvlm eval: {Path(source).name} on {len(rows)} samples / {tokens} answer tokens: "
            f"NLL {result['nll']:.4f} (ppl {result['perplexity']:.3f})")
    if reference is not None:
        line += (f"; reference NLL {result['reference_nll']:.4f}, KL {result['kl_ref_to_ckpt']:.5f}, "
                 f"top-1 agreement {result['top1_agreement']:.1%}")
    print(line)
    return 0


# --------------------------------------------------------------------------------------------
# recipes / inspect / bench
# --------------------------------------------------------------------------------------------


def recipe_description(path: Path) -> str:
    """First sentence-line of a recipe's header comment (the lines starting with '#')."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if text:
            return text
    return "(no description: add a '# ...' header comment to the recipe)"


def cmd_recipes(args: argparse.Namespace) -> int:
    from qvlm_modifiers import list_recipes

    recipes = list_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}")
    log.info("%d recipes; pass a name to `qvlm quantize --recipe NAME`, or a path to your own YAML.", len(recipes))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qvlm_modifiers.inspect_ckpt import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, reload=not args.no_reload)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(format_report(report, all_modules=args.all))
    if report.reload is not None and not report.reload.get("exact"):
        return 1
    return 0


def _bench_scripts() -> dict[str, Path]:
    import qvlm_modifiers.kernels as kernels

    repo = Path(__file__).resolve().parents[2]
    return {
        "kernels": Path(kernels.__file__).parent / "bench.py",
        # kernels/bench.py prints the end-to-end decode line itself; "e2e" runs only that line
        "e2e": Path(kernels.__file__).parent / "bench.py",
        "memory": repo / "eval" / "bench_memory.py",
    }


def cmd_bench(args: argparse.Namespace) -> int:
    script = _bench_scripts()[args.which]
    if not script.is_file():
        raise UsageError(
            f"The {args.which} benchmark ({script}) is not in this installation: the eval/ scripts ship with the "
            "source tree only. Run `qvlm bench` from a git checkout installed with `pip install -e .`."
        )
    extra = ["--e2e", "only"] if args.which == "e2e" else []
    cmd = [sys.executable, str(script), *extra, *args.bench_args]
    log.info("qvlm bench: %s", " ".join(cmd))
    env = dict(os.environ)
    if args.quiet:
        env["TQDM_DISABLE"] = "1"
    return subprocess.call(cmd, env=env)


# --------------------------------------------------------------------------------------------
# parser / main
# --------------------------------------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="only warnings, errors and the final summary line; no progress bars")
    parser.add_argument("--log-file", default=default, metavar="PATH",
                        help="also write a detailed log (DEBUG, incl. llm-compressor's) to PATH")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="show the full traceback of unexpected errors")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, metavar="D",
                   help="a Dataset.save_to_disk folder, a folder of images with captions.jsonl/captions.tsv, "
                        "or a hub dataset name (image + text columns)")
    p.add_argument("--num-samples", type=int, required=True, metavar="N", help="number of image-text pairs to use")
    p.add_argument("--image-column", default="image", help="column with the images (default: image)")
    p.add_argument("--text-column", default="text", help="column with the caption/answer (default: text)")
    p.add_argument("--prompt-column", default=None,
                   help="column with the question/prompt (default: 'question' when present, else none)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="L", help="truncate longer rows")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model's repository (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvlm", description="Quantize vision-language models with MBQ / Q-VLM / llm-compressor recipes.")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("quantize", help="quantize a VLM with a recipe and save a compressed-tensors checkpoint")
    _common_options(p, suppress=True)
    p.add_argument("model", metavar="MODEL", help="local model directory or hub id")
    p.add_argument("--recipe", required=True, metavar="R", help="recipe YAML path or shipped recipe name (qvlm recipes)")
    _data_options(p)
    p.add_argument("--output", required=True, metavar="OUT", help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--device-map", default=None,
                   help="how to place the model while calibrating: cpu (default), auto_offload (CPU, then disk), "
                        "or any transformers device_map; the sequential pipeline onloads one layer at a time")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="offload weights that do not fit in CPU memory to a fresh folder in DIR, removed at the end "
                        "(implies --device-map auto_offload)")
    p.add_argument("--max-cpu-memory", default=None, metavar="SIZE",
                   help="CPU memory the weights may use with --offload-dir, e.g. 40GiB; the rest goes to disk "
                        "(default: what is free)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="answer-token NLL of a checkpoint on image-text pairs (vs a reference)")
    _common_options(p, suppress=True)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (or hub id)")
    _data_options(p)
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="unquantized model to compare with (KL, top-1 agreement)")
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    _common_options(p, suppress=True)
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("inspect", help="schemes, ignored modules, bits, size and reload check of a checkpoint")
    _common_options(p, suppress=True)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--all", action="store_true", help="list every module")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-reload", action="store_true", help="skip the transformers reload check")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="run a benchmark script (kernels, e2e, memory); extra args are passed on")
    _common_options(p, suppress=True)
    p.add_argument("which", choices=["kernels", "e2e", "memory"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qvlm`` console script; returns the exit code.

    0 success; 1 an inspected checkpoint does not reload exactly, or an unexpected error;
    2 bad input (any :class:`QVLMError`, or a usage error); 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), message already printed
        return int(exc.code or 0)
    args._argv = argv
    try:
        _setup_logging(args.quiet, args.log_file)
    except QVLMError as err:
        print(f"qvlm: error: {err}", file=sys.stderr)
        return err.exit_code
    try:
        import qvlm_modifiers  # noqa: F401 - registers our Modifiers before a recipe is parsed

        with _progress_bars(not args.quiet):
            return int(args.func(args) or 0)
    except QVLMError as err:
        log.debug("%s", err, exc_info=True)  # traceback only in --log-file
        print(f"qvlm: error: {err}", file=sys.stderr)
        if args.debug:
            raise
        return err.exit_code
    except KeyboardInterrupt:
        print("qvlm: interrupted; no output directory was committed.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: a message, not a traceback
        log.debug("unexpected error", exc_info=True)
        if args.debug:
            raise
        print(
            f"qvlm: internal error: {type(err).__name__}: {err}\nThis is a bug in qvlm or an unsupported setup; "
            "rerun with --debug for the traceback (or --log-file PATH to record it) and report it.",
            file=sys.stderr,
        )
        return 1
    finally:
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
