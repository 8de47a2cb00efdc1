"""Safetensors files read without trusting them: headers only (8-byte little-endian length + JSON).

A truncated or corrupt file becomes a :class:`~qvlm_modifiers.errors.CheckpointError` naming the file
and the fix, never a traceback, and nothing is unpickled. Used by ``qvlm inspect``
(:mod:`qvlm_modifiers.inspect_ckpt`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlm_modifiers.errors import CheckpointError

__all__ = ["DTYPE_BYTES", "QUANT_PARAM_SUFFIXES", "SafetensorsHeader", "read_safetensors_header", "checkpoint_files"]

# bytes per element of each safetensors dtype
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# Tensors that carry quantization parameters rather than model weights.
QUANT_PARAM_SUFFIXES = (
    "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight_global_scale",
    "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
    "k_scale", "v_scale",
)
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    file_size: int


def _fix_hint(path: Path) -> str:
    return (
        f"Re-create the checkpoint (e.g. run `qvlm quantize ... --output {path.parent} --overwrite`) or "
        "copy it again from its source; a partial download or an interrupted copy leaves files like this."
    )


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate one ``.safetensors`` file's header; raise CheckpointError if it is damaged.

    Checks: the 8-byte length prefix, that the header is JSON, that every tensor's byte range has
    the size its dtype and shape imply, and that the file is exactly as long as its tensors say
    (shorter = truncated, longer = trailing garbage).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path} is truncated: {size} bytes, too short to hold a safetensors header. "
                    + _fix_hint(path)
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path} is truncated or is not a safetensors file: its header claims {header_len} "
                    f"bytes but the file has {size}. " + _fix_hint(path)
                )
            raw = fh.read(header_len)
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err.strerror or err}. Check the path and permissions.") from err
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({err}). " + _fix_hint(path)) from err
    metadata = header.pop("__metadata__", None) or {}
    data_len = 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is corrupt: entry {name!r} of its header is malformed. " + _fix_hint(path)) from err
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} ({dtype}{list(shape)}) spans {end - begin} bytes, "
                f"expected {expected}. " + _fix_hint(path)
            )
        data_len = max(data_len, end)
    actual = size - 8 - header_len
    if actual < data_len:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {data_len} bytes of data but only {actual} are "
            "present. " + _fix_hint(path)
        )
    if actual > data_len:
        raise CheckpointError(
            f"{path} is corrupt: {actual - data_len} bytes follow the last tensor. " + _fix_hint(path)
        )
    return SafetensorsHeader(path=path, tensors=header, metadata=metadata, file_size=size)


def checkpoint_files(ckpt: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (shards checked against the index)."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise CheckpointError(f"Checkpoint {ckpt} does not exist. Pass the directory written by `qvlm quantize`.")
    if not ckpt.is_dir():
        raise CheckpointError(f"Checkpoint {ckpt} is a file, not a directory. Pass the directory that holds config.json.")
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(
            f"{ckpt} is not a checkpoint: it has no config.json. Pass the directory written by "
            "`qvlm quantize` (or by save_pretrained)."
        )
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is corrupt ({err}). " + _fix_hint(index)) from err
        files = sorted({ckpt / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"Checkpoint {ckpt} is incomplete: shard(s) {', '.join(missing)} listed in "
                f"{index.name} are missing. " + _fix_hint(index)
            )
        return files
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in ckpt.glob("*.bin")) + sorted(p.name for p in ckpt.glob("*.pt"))
        extra = (
            f" It holds pickle weights ({', '.join(pickles)}), which this tool never loads: convert them "
            "to safetensors first." if pickles else ""
        )
        raise CheckpointError(f"Checkpoint {ckpt} has no .safetensors weights.{extra} Re-save it with save_pretrained.")
    return files
