"""eval/run_experiments.py: one cell on the tiny zoo Idefics3, outputs written, finished cells skipped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _load(name):
    sys.path.insert(0, str(EVAL))
    try:
        spec = importlib.util.spec_from_file_location(name, EVAL / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EVAL))


def test_run_experiments_writes_results_and_skips_done_cells(saved_vlm, tmp_path, capsys, monkeypatch):
    run = _load("run_experiments")
    # pin the code version: in a shared working tree other edits would change it between the runs
    monkeypatch.setattr(run, "code_version", lambda: "pinned")
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "zoo-idefics3", "path": str(saved_vlm("idefics3"))}],
        "recipes": ["w8a8"],
        "settings": {"vqa_questions": 4, "kl_rows": 2, "ppl_tokens": 64, "calib_samples": 2, "batch_size": 4},
    }))
    argv = ["--config", str(config), "--results-root", str(tmp_path / "results")]
    assert run.main(argv) == 0
    out_dir = tmp_path / "results" / "zoo-idefics3"
    results = json.loads((out_dir / "results.json").read_text())
    cell = results["cells"]["w8a8"]
    assert cell["quantized"]["reload"]["max_abs_logit_diff"] <= 1e-3
    assert cell["quantized"]["vqa"]["n"] == 4
    table = (out_dir / "results.md").read_text()
    assert "| w8a8 |" in table and "Q4_1" in table
    assert (out_dir / "metrics.png").stat().st_size > 0
    capsys.readouterr()
    assert run.main(argv) == 0  # same code, recipe, model, settings: skipped
    assert "done (key" in capsys.readouterr().out
    # a different setting is a different cell key
    assert run.cell_key(run.main_job.recipe_location("w8a8"), "m", {"a": 1}, "v") != \
        run.cell_key(run.main_job.recipe_location("w8a8"), "m", {"a": 2}, "v")
