"""Loading the VLM for ``quantize`` and ``eval``, in CPU memory or offloaded to disk.

Large models do not fit in CPU memory: ``--offload-dir`` loads them through compressed-tensors'
offloading (weights that do not fit go to a folder on disk) and llm-compressor's sequential
pipeline onloads one decoder layer at a time. This module owns that folder's lifetime.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from qvlm_modifiers.cli.checks import UsageError
from qvlm_modifiers.errors import CheckpointError, QVLMError

__all__ = ["OFFLOAD_PREFIX", "load_model", "offloads", "offload_folder", "disk_offloaded_tensors"]

#: name prefix of a run's own folder inside --offload-dir
OFFLOAD_PREFIX = "qvlm-offload-"


def offloads(device_map: str | None, offload_dir: str | os.PathLike | None) -> bool:
    """Whether the model is loaded offloaded (then calibration onloads layer by layer from CPU)."""
    return bool(offload_dir) or bool(device_map and device_map not in ("cpu", "none"))


def load_model(source: str, trust_remote_code: bool, device_map: str | None, offload_folder: str | os.PathLike | None,
               max_cpu_memory: str | None = None):
    """Load the VLM (safetensors only). ``device_map``/``offload_folder`` load it offloaded through
    compressed-tensors' ``load_offloaded_model`` so the sequential pipeline onloads one layer at a
    time; ``max_cpu_memory`` caps the CPU memory given to weights (the rest goes to the folder)."""
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = dict(dtype="auto", use_safetensors=True, trust_remote_code=trust_remote_code)
    try:
        if offloads(device_map, offload_folder):
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


@contextlib.contextmanager
def offload_folder(offload_dir: str | None) -> Iterator[Path | None]:
    """A fresh folder for this run's offloaded weights inside ``--offload-dir``, removed at the end
    (also on errors). compressed-tensors writes offloaded tensors (and symlinks to the checkpoint's
    files) under fixed names and never deletes them: a shared folder would keep gigabytes after the
    run, and a second run could collide with the first one's names. Only a killed process (SIGKILL)
    leaves a ``qvlm-offload-*`` folder behind; it is safe to delete.

    ``--offload-dir`` was checked not to be a file (:func:`~qvlm_modifiers.cli.checks.check_offload_dir`);
    a directory that cannot be written fails here, when the folder is created."""
    if not offload_dir:
        yield None
        return
    import shutil
    import tempfile

    root = Path(offload_dir)
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
