"""Where calibration image-text pairs come from: a folder of images with captions, a saved dataset.

:func:`load_pairs` turns any accepted source into a :class:`datasets.Dataset` of pairs (see
:mod:`qvlm_modifiers.data` for the list); :func:`load_image_folder` reads a folder with a
``captions.jsonl`` or ``captions.tsv``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qvlm_modifiers.errors import CalibrationDataError

__all__ = ["CAPTION_FILES", "load_image_folder", "load_pairs"]

CAPTION_FILES = ("captions.jsonl", "captions.tsv")


# --------------------------------------------------------------------------------------------
# Loading sources
# --------------------------------------------------------------------------------------------


def load_image_folder(folder: str | os.PathLike):
    """A folder of images + ``captions.jsonl`` or ``captions.tsv`` -> a :class:`datasets.Dataset`.

    Columns: ``image`` (absolute file path; opened later), ``text`` and ``question`` (empty
    string when absent). See the module docstring for the file formats.
    """
    import datasets

    folder = Path(folder)
    found = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if not found:
        raise CalibrationDataError(
            f"{folder} is neither a dataset saved with Dataset.save_to_disk nor an image folder with a "
            f"captions file: it has no {' or '.join(CAPTION_FILES)}. Add captions.jsonl with one "
            '{"file": "<image file>", "text": "<caption>", "question": "<optional prompt>"} per line, '
            "or captions.tsv with 'file<TAB>text[<TAB>question]' lines."
        )
    captions = found[0]
    rows: dict[str, list[str]] = {"image": [], "text": [], "question": []}
    lines = captions.read_text(encoding="utf-8").splitlines()
    if captions.suffix == ".jsonl":
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationDataError(
                    f"{captions}, line {lineno} is not valid JSON ({err.msg}). Write one object per line: "
                    '{"file": "<image file>", "text": "<caption>", "question": "<optional prompt>"}.'
                ) from err
            if not isinstance(record, dict) or "file" not in record:
                raise CalibrationDataError(
                    f"{captions}, line {lineno} has no \"file\" key. Write one object per line: "
                    '{"file": "<image file>", "text": "<caption>", "question": "<optional prompt>"}.'
                )
            rows["image"].append(str(folder / str(record["file"])))
            rows["text"].append(record.get("text"))
            rows["question"].append(record.get("question") or "")
    else:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if lineno == 1 and [f.strip().lower() for f in fields[:2]] == ["file", "text"]:
                continue  # header
            if len(fields) < 2:
                raise CalibrationDataError(
                    f"{captions}, line {lineno} has {len(fields)} tab-separated field(s); expected "
                    "'file<TAB>text[<TAB>question]'. Separate the image file and its caption with a tab."
                )
            rows["image"].append(str(folder / fields[0].strip()))
            rows["text"].append(fields[1])
            rows["question"].append(fields[2] if len(fields) > 2 else "")
    if not rows["image"]:
        raise CalibrationDataError(f"{captions} lists no images. Add at least one line to it.")
    return datasets.Dataset.from_dict(rows)


def load_pairs(source: Any):
    """Any supported source (see module docstring) -> :class:`datasets.Dataset`."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _single_split(source, "the DatasetDict")
    if isinstance(source, list) and all(isinstance(row, dict) for row in source):
        if not source:
            raise CalibrationDataError("Calibration data has no rows. Provide at least one image-text pair.")
        return datasets.Dataset.from_list(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(
                f"Calibration data {str(path)!r} does not exist. Pass a datasets.Dataset, a directory "
                "written by Dataset.save_to_disk, or a folder of images with captions.jsonl/captions.tsv."
            )
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _single_split(loaded, str(path))
            return loaded
        if path.is_dir():
            return load_image_folder(path)
        raise CalibrationDataError(
            f"Calibration data {str(path)!r} is a file. Pass the folder that holds the images and "
            "captions.jsonl/captions.tsv, or a directory written by Dataset.save_to_disk."
        )
    raise CalibrationDataError(
        f"Cannot use a {type(source).__name__} as calibration data. Pass a datasets.Dataset, a directory "
        "written by Dataset.save_to_disk, or a folder of images with captions.jsonl/captions.tsv."
    )


def _is_image_folder(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    return path.is_dir() and any((path / name).is_file() for name in CAPTION_FILES) and not (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _single_split(dsd, where: str):
    if "train" in dsd:
        return dsd["train"]
    if len(dsd) == 1:
        return next(iter(dsd.values()))
    raise CalibrationDataError(
        f"{where} has several splits ({', '.join(dsd)}) and none is 'train'. Pass the split to use, "
        "e.g. dataset_dict['validation']."
    )
