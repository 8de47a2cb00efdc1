"""Shared fixtures: tiny saved VLMs and synthetic calibration pairs.

Fixtures for every test module:

* ``saved_vlm`` (session): a factory ``saved_vlm(family, seed=0, num_layers=2, checkpoint_like=False) -> Path`` giving the
  directory of a tiny random-weight model of ``family`` (one of :data:`qvlm_modifiers.testing.zoo.FAMILY_NAMES`)
  with ``num_layers`` decoder layers, saved with ``save_pretrained`` together with its processor.
  Each (family, seed, num_layers) is built once per test session in a temporary directory; treat the directory as read-only (load it with
  ``AutoModelForImageTextToText.from_pretrained(path)`` / ``AutoProcessor.from_pretrained(path)``
  and save results elsewhere).
* ``calib_pairs`` (session): ``zoo.sample_pairs(8, seed=0)``, a :class:`datasets.Dataset` with
  columns ``image`` (48 px PIL RGB), ``text`` (answer) and ``question`` (prompt). Do not modify it.
* ``cli_assets`` (session): ``{"model": Path, "pairs": Path}``, a saved bf16 tiny LLaVA and 8 pairs
  written with ``save_to_disk``, the inputs of the ``qvlm`` CLI tests. Read-only.
* ``tiny_family_names``: the tuple of family names, for ``pytest.mark.parametrize`` use
  ``qvlm_modifiers.testing.zoo.FAMILY_NAMES`` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from qvlm_modifiers.testing import zoo

# One intra-op thread for the whole suite: the tiny models gain nothing from threads, and
# oversubscribed threads on a busy 2-core CI machine (2 pytest-xdist workers with `-n 2`, the
# README's test command) slow every small matmul down by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def saved_vlm(tmp_path_factory) -> Callable[..., Path]:
    """``saved_vlm(family, seed=0, num_layers=2, checkpoint_like=False) -> Path`` of a tiny saved model +
    processor (built once; ``checkpoint_like``: see ``zoo.build``)."""
    root = tmp_path_factory.mktemp("tiny_vlms")
    cache: dict[tuple[str, int, int, bool], Path] = {}

    def get(family: str, seed: int = 0, num_layers: int = 2, checkpoint_like: bool = False) -> Path:
        key = (family, seed, num_layers, checkpoint_like)
        if key not in cache:
            tag = "-ckptlike" if checkpoint_like else ""
            cache[key] = zoo.save(family, root / f"{family}-seed{seed}-layers{num_layers}{tag}", seed=seed,
                                  num_layers=num_layers, checkpoint_like=checkpoint_like)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def calib_pairs():
    """8 synthetic image/question/answer rows (``zoo.sample_pairs(8, seed=0)``)."""
    return zoo.sample_pairs(8, seed=0)


@pytest.fixture(scope="session")
def tiny_family_names() -> tuple[str, ...]:
    return zoo.FAMILY_NAMES


@pytest.fixture(scope="session")
def cli_assets(tmp_path_factory) -> dict[str, Path]:
    """For the CLI tests: a saved bf16 tiny LLaVA (``model``) and 8 image-text pairs written with
    ``save_to_disk`` (``pairs``). Read-only: write outputs elsewhere."""
    root = tmp_path_factory.mktemp("cli-assets")
    model = zoo.save("llava", root / "model", dtype=torch.bfloat16)
    zoo.sample_pairs(8).save_to_disk(str(root / "pairs"))
    return {"model": model, "pairs": root / "pairs"}


@pytest.fixture
def image_folder(tmp_path) -> Callable[[int], Path]:
    """``image_folder(n) -> Path``: the CLI's second dataset kind, n zoo images + a captions.jsonl."""
    import json

    def make(n: int) -> Path:
        folder = tmp_path / "imgs"
        folder.mkdir()
        lines = []
        for i, row in enumerate(zoo.sample_pairs(n)):
            row["image"].save(folder / f"{i}.png")
            lines.append(json.dumps({"file": f"{i}.png", "text": row["text"]}))
        (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
        return folder

    return make


@pytest.fixture
def eval_script():
    """A module of the evaluation lab (package ``qvlm_eval``, installed from eval/) by name."""
    import importlib

    def load(name: str):
        return importlib.import_module(f"qvlm_eval.{name}")

    return load


@pytest.fixture(scope="session")
def vllm_script():
    """A script of the vLLM stage (``tests/vllm/<name>.py``, not a package: the stage runs them by path,
    partly in vLLM's own venv) loaded as a module by name."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parent / "vllm" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"vllm_stage_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
