"""The output folder of ``qvlm quantize``: the checkpoint, its processor and ``qvlm_run.json``.

``qvlm_run.json`` (the run record) says how the checkpoint was made: the command, the recipe text,
a fingerprint of the calibration rows, the package versions, the seed, the wall time and the peak
memory. It must be part of the same atomic write as the weights, so that a checkpoint never exists
without its record and a killed run leaves neither: :func:`save_checkpoint` saves through
:func:`qvlm_modifiers.save.save_pretrained` (a temporary sibling folder, renamed onto the output at
the end) and :func:`attach_run_record` makes the processor's save, the last write into that
temporary folder, also write the record.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

from qvlm_modifiers.errors import CheckpointError

__all__ = ["RUN_RECORD_NAME", "data_fingerprint", "versions", "attach_run_record", "save_checkpoint"]

RUN_RECORD_NAME = "qvlm_run.json"


def data_fingerprint(calib) -> str:
    """sha256 over the calibration rows as the model sees them (token ids, pixel values, masks)."""
    import numpy as np

    digest = hashlib.sha256()
    for row in calib:
        for key in sorted(row):
            digest.update(key.encode())
            digest.update(np.asarray(row[key]).tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Python and the versions of the packages that decide what a checkpoint contains."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("qvlm-modifiers", "torch", "transformers", "llmcompressor", "compressed-tensors",
                 "datasets", "accelerate", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def attach_run_record(processor, record: dict[str, Any]) -> None:
    """Make ``processor.save_pretrained`` (this instance) also write ``qvlm_run.json`` into the same
    directory. The atomic save writes the processor into the temporary directory just before the
    rename, so the run record is part of the atomic checkpoint.

    ``record["_t0"]`` (a ``time.perf_counter()`` value, removed from the record) starts the wall
    time; the peak memory is read at the save (:func:`qvlm_modifiers.resources.peak_memory`)."""
    from qvlm_modifiers.resources import peak_memory

    inner = processor.save_pretrained

    @functools.wraps(inner)
    def save_with_run_record(save_directory, *args, **kwargs):
        result = inner(save_directory, *args, **kwargs)
        record["wall_time_s"] = round(time.perf_counter() - record.pop("_t0"), 3) if "_t0" in record else record.get(
            "wall_time_s")
        record.update(peak_memory())
        tmp = Path(save_directory) / (RUN_RECORD_NAME + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        tmp.replace(Path(save_directory) / RUN_RECORD_NAME)
        return result

    processor.save_pretrained = save_with_run_record


def save_checkpoint(model, processor, out: Path, overwrite: bool) -> dict[str, Any]:
    """Save the calibrated model, its processor and the run record (attached to ``processor`` by
    :func:`attach_run_record`) atomically into ``out``; returns the run record as written."""
    from qvlm_modifiers.save import save_pretrained

    save_pretrained(model, processor, out, overwrite=overwrite)
    if not (out / RUN_RECORD_NAME).is_file():  # the save path did not call processor.save_pretrained
        raise CheckpointError(f"{out} was written without {RUN_RECORD_NAME}; the save path changed. Report this bug.")
    return json.loads((out / RUN_RECORD_NAME).read_text())
