"""eval/run_experiments.py: one cell on the tiny zoo Idefics3, outputs written, finished cells skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml



def test_run_experiments_writes_results_and_skips_done_cells(saved_vlm, tmp_path, capsys, monkeypatch, eval_script):
    run = eval_script("run_experiments")
    # pin the code version: in a shared working tree other edits would change it between the runs
    monkeypatch.setattr(run, "code_version", lambda *a: "pinned")
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "zoo-idefics3", "path": str(saved_vlm("idefics3")), "group_size": 16}],
        "cells": [{"method": "RTN", "scheme": "W8A8", "recipe": "w8a8"},
                  {"method": "RTN", "scheme": "W4A16", "recipe": "rtn_w4a16"}],
        "settings": {"vqa_questions": 4, "kl_rows": 2, "ppl_tokens": 64, "calib_samples": 2, "batch_size": 4},
    }))
    argv = ["--config", str(config), "--results-root", str(tmp_path / "results")]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "full-precision metrics from the cache" in out  # FP evaluated once, reused by the second cell
    out_dir = tmp_path / "results" / "zoo-idefics3"
    results = json.loads((out_dir / "results.json").read_text())
    cell = results["cells"]["w8a8"]
    assert cell["quantized"]["reload"]["max_abs_logit_diff"] <= 1e-3
    assert cell["quantized"]["vqa"]["n"] == 4
    assert cell["method"] == "RTN" and cell["scheme"] == "W8A8" and cell["wall_s"] > 0
    # the group override reached the recipe that ran (the zoo model's widths are not multiples of 128)
    assert "group_size: 16" in results["cells"]["rtn_w4a16"]["recipe_text"]
    assert results["cells"]["rtn_w4a16"]["fp"] == cell["fp"]
    table = (out_dir / "results.md").read_text()
    assert "| W8A8 | RTN | w8a8 |" in table and "| W4A16 | RTN | rtn_w4a16 |" in table and "Q4_1" in table
    assert (out_dir / "metrics.png").stat().st_size > 0
    assert run.main(argv) == 0  # same code, recipe, model, settings: skipped
    assert capsys.readouterr().out.count("done (key") == 2
    # a different setting is a different cell key
    text = Path(run.main_job.recipe_location("w8a8")).read_text()
    assert run.cell_key(text, "m", {"a": 1}, "v") != run.cell_key(text, "m", {"a": 2}, "v")
    # results written by other code: refused with an error naming the file, unless --rerun-stale
    monkeypatch.setattr(run, "code_version", lambda *a: "changed")
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "other code" in err and "--rerun-stale" in err
    assert run.main(argv + ["--list"]) == 0  # listing is not refused: it names the stale cells
    assert capsys.readouterr().out.count(": stale (code)") == 2
    # --rerun-stale gets past the refusal (listing only here: nothing runs)
    run.check_versions(json.loads((out_dir / "results.json").read_text()), out_dir / "results.json", True)
    # a stale cell that this run does not include is named too (a run would refuse because of it)
    assert run.main(argv + ["--list", "--only", "w8a8"]) == 0
    assert "rtn_w4a16: stale (code), not in this run's cells" in capsys.readouterr().out
    # --rekey-as-equivalent: cells stale for code only get the new key, keep their numbers and record
    # the old key with the evidence; a cell whose settings also changed is left for a rerun
    before = json.loads((out_dir / "results.json").read_text())["cells"]
    changed = tmp_path / "changed.yaml"
    changed.write_text(config.read_text().replace("kl_rows: 2", "kl_rows: 3"))
    assert run.main(["--config", str(changed), "--results-root", str(tmp_path / "results"),
                     "--rekey-as-equivalent", "spot rerun identical"]) == 0
    assert "re-keyed 0 cells" in capsys.readouterr().out
    assert run.main(argv + ["--rekey-as-equivalent", "spot rerun identical"]) == 0
    assert "re-keyed 2 cells: w8a8, rtn_w4a16" in capsys.readouterr().out
    after = json.loads((out_dir / "results.json").read_text())["cells"]
    for cid in ("w8a8", "rtn_w4a16"):
        assert after[cid]["code_version"] == "changed" and after[cid]["quantized"] == before[cid]["quantized"]
        assert after[cid]["rekeyed"][0]["from_key"] == before[cid]["key"] != after[cid]["key"]
        assert after[cid]["rekeyed"][0]["reason"] == "spot rerun identical"
    assert run.main(argv) == 0  # current again: skipped, not rerun
    assert capsys.readouterr().out.count("done (key") == 2
    # the same path holding other model files is another model: refused the same way
    monkeypatch.setattr(run, "model_fingerprint", lambda *a: "retrained")
    assert run.main(argv) == 2
    assert "(model files)" in capsys.readouterr().err


def test_code_version_covers_only_the_method_packages_a_recipe_names(eval_script):
    run = eval_script("run_experiments")
    gptq = [str(p) for p in run.code_files("GPTQModifier: {}")]
    qvlm = [str(p) for p in run.code_files("QVLMModifier: {}")]
    assert not any("/qvlm_modifiers/qvlm/" in p or "/qvlm_modifiers/mbq/" in p for p in gptq)
    assert any("/qvlm_modifiers/qvlm/" in p for p in qvlm) and not any("/qvlm_modifiers/mbq/" in p for p in qvlm)
    assert any(p.endswith("main_job.py") for p in gptq) and any(p.endswith("/data.py") for p in gptq)
    assert run.code_version("GPTQModifier: {}") != run.code_version("QVLMModifier: {}")
    # the orchestration script is not code a cell runs: the arguments it hands the job are keyed instead
    assert not any(p.endswith("run_experiments.py") for p in gptq)
    # nor the command line (no cell imports it: test_a_real_cell_imports_nothing_outside_its_key)
    assert not any("/qvlm_modifiers/cli/" in p or p.endswith(("/__main__.py", "/inspect_ckpt.py")) for p in gptq + qvlm)
    # the lab modules the job runs are (the metrics define the numbers)
    assert {"main_job.py", "metrics.py", "default_model.py"} <= {Path(p).name for p in gptq}


def test_cell_key_covers_the_job_arguments_but_not_where_outputs_go(eval_script, tmp_path):
    run = eval_script("run_experiments")
    cell = {"id": "w8a8", "recipe": "w8a8", "calib_seed": None}
    settings = {"vqa_questions": 4, "calib_samples": 2}

    def key(**change):
        args = {"cell": cell, "path": "/m", "fingerprint": "f", "settings": settings, "group_size": 16,
                "out_dir": tmp_path / "a", **change}
        return run.plan_cell(**args)["key"]

    base = key()
    assert key(out_dir=tmp_path / "b") == base  # another results folder: same cell
    assert key(group_size=32) != base
    assert key(cell={**cell, "calib_seed": 1}) != base
    assert key(settings={**settings, "calib_samples": 3}) != base
    assert key(fingerprint="g") != base
    argv = run.plan_cell(cell, "/m", "f", settings, 16, tmp_path)["argv"]
    assert run.keyed_arguments(argv) == ["--vqa-questions", "4", "--kl-rows", "32", "--ppl-tokens", "2048",
                                         "--calib-samples", "2", "--batch-size", "16", "--seed", "0",
                                         "--group-size", "16"]
    # test bed v2's settings reach main_job and the key; configurations without them keep their keys
    v2 = {**settings, "kl_caption_rows": 72, "calib_caption_fraction": 0.5}
    assert key(settings=v2) != base
    argv = run.plan_cell(cell, "/m", "f", v2, 16, tmp_path)["argv"]
    assert run.keyed_arguments(argv)[-6:] == ["--kl-caption-rows", "72", "--calib-caption-fraction", "0.5",
                                              "--group-size", "16"]


def test_a_gpu_run_is_keyed_and_stored_apart_from_the_cpu_matrix(eval_script, tmp_path, capsys):
    """--device cuda: the device reaches main_job and the key, results go to <model>-cuda; CPU keys unchanged."""
    import torch

    run = eval_script("run_experiments")
    cell = {"id": "w8a8", "recipe": "w8a8", "calib_seed": None}
    settings = {"vqa_questions": 4, "calib_samples": 2}
    cpu = run.plan_cell(cell, "/m", "f", settings, 16, tmp_path)
    gpu = run.plan_cell(cell, "/m", "f", {**settings, "device": "cuda"}, 16, tmp_path)
    assert "--device" not in cpu["argv"] and gpu["key"] != cpu["key"]
    assert run.keyed_arguments(gpu["argv"])[-4:] == ["--device", "cuda", "--group-size", "16"]
    assert run.results_folder("m", "cpu") == "m" and run.results_folder("m", "cuda:1") == "m-cuda1"
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(tmp_path)}],
                                      "cells": [{"recipe": "w8a8"}], "settings": {}}))
    # "auto" is resolved before it reaches a key or a folder name; a name that is no device is refused
    assert run.main(["--config", str(config), "--device", "auto", "--list", "--results-root", str(tmp_path / "l")]) == 0
    assert [d.name for d in (tmp_path / "l").iterdir()] == ["m-cuda" if torch.cuda.is_available() else "m"]
    assert run.main(["--config", str(config), "--device", "gpu0", "--results-root", str(tmp_path / "r")]) == 2
    assert "not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run.main(["--config", str(config), "--device", "cuda", "--results-root", str(tmp_path / "r")]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_a_default_model_entry_names_its_test_bed_folder(eval_script):
    run = eval_script("run_experiments")
    from qvlm_eval import default_model as dm

    assert run.default_model_path({"path": "default", "testbed": "v2"}) == str(dm.MODELS_DIR / "smolvlm-tiny-v2")
    assert run.default_model_path({"path": "default"}) == str(dm.MODELS_DIR / dm.testbed().model_name)
    with pytest.raises(ValueError, match="known: v1, v2"):
        run.default_model_path({"path": "default", "testbed": "v9"})


def test_list_states(eval_script):
    run = eval_script("run_experiments")
    current = run.code_version("GPTQModifier: {}")
    done = {"key": "k", "code_version": current, "recipe_text": "GPTQModifier: {}", "model_fingerprint": "f"}
    assert run.list_state(None, "k", "f", False) == "to run"
    assert run.list_state(done, "k", "f", False) == "done"
    assert run.list_state(done, "k", "f", True) == "done, rerun by --force"
    assert run.list_state(done, "other", "f", False).startswith("will rerun")
    assert run.list_state({**done, "code_version": "old"}, "other", "f", False) == "stale (code)"
    assert run.list_state(done, "other", "g", False) == "stale (model files)"


def test_unknown_cell_is_a_clear_error(tmp_path, capsys, eval_script):
    run = eval_script("run_experiments")
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(tmp_path)}],
                                      "cells": [{"recipe": "w8a8"}], "settings": {}}))
    assert run.main(["--config", str(config), "--only", "nope", "--results-root", str(tmp_path / "r")]) == 2
    assert "no cell ['nope']" in capsys.readouterr().err


def test_group_size_override_expands_presets_and_leaves_channel_schemes():
    from qvlm_modifiers import recipe_path
    from qvlm_modifiers.recipe_check import override_group_size

    text, changed = override_group_size(recipe_path("rtn_w4a16").read_text(), 64)
    recipe = yaml.safe_load(text)
    args = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert changed == 1 and "scheme" not in args
    assert args["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64, "dynamic": False}
    assert "lm_head" in args["ignore"]
    # per-channel W4A8 weights have no group: unchanged
    assert override_group_size(recipe_path("mbq_w4a8").read_text(), 64)[1] == 0


def test_every_matrix_cell_and_eval_recipe_is_valid(eval_script, tmp_path):
    """Each cell of eval/experiments.yaml resolves to a recipe that passes the recipe check (known
    Modifiers and fields, supported bits), also after the model's group-size override, and every
    eval-only recipe is used by some cell or by the main job (no stale files)."""
    from pathlib import Path

    from qvlm_modifiers.recipe_check import load_recipe

    run = eval_script("run_experiments")
    eval_dir = Path(run.__file__).resolve().parent
    config = yaml.safe_load((eval_dir / "experiments.yaml").read_text())
    used = set()
    for k, cell in enumerate(config["cells"]):
        path = Path(run.resolve_recipe(cell["recipe"]))
        used.add(path.resolve())
        for model in config["models"]:
            patched = tmp_path / f"{k}_{model['name']}.yaml"
            patched.write_text(run.effective_recipe_text(str(path), model.get("group_size")))
            load_recipe(patched)
    used |= {p.resolve() for p in (eval_dir / "recipes").glob("*.yaml")
             if p.name in (eval_dir / "main_job.py").read_text()}  # the main job's default recipe
    eval_only = {p.resolve() for p in (eval_dir / "recipes").glob("*.yaml")}
    assert eval_only - used == set(), f"eval recipes no cell uses: {sorted(p.name for p in eval_only - used)}"


def test_cells_run_while_the_code_changes_are_recorded_stale(eval_script, monkeypatch):
    """Cells run in-process: a cell whose code version differs between process start, cell start and
    cell end is not recorded under the current version."""
    run = eval_script("run_experiments")
    monkeypatch.setattr(run, "code_version", lambda *a: "v2")
    assert run.code_changed_during_run("v2", "GPTQModifier: {}", "v2") is None
    assert "after this process imported it" in run.code_changed_during_run("v1", "GPTQModifier: {}", "v2")
    monkeypatch.setattr(run, "code_version", lambda *a: "v3")
    assert "while the cell ran" in run.code_changed_during_run("v2", "GPTQModifier: {}", "v2")
    monkeypatch.setattr(run, "code_version", lambda *a: "v2")
    why = run.code_changed_during_run("v2", "GPTQModifier: {}", "v2", ["qvlm_modifiers.cli"])
    assert "qvlm_modifiers.cli" in why and "leaves out" in why


def test_a_real_cell_imports_nothing_outside_its_key(saved_vlm, tmp_path, eval_script):
    """The CLI modules are left out of the cell key (OUTSIDE_CELL_CODE) because no cell imports them.
    Checked in a fresh process (pytest has imported the CLI already): one real cell runs and is not
    recorded stale by the import guard."""
    import subprocess
    import sys

    run = eval_script("run_experiments")
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "zoo", "path": str(saved_vlm("idefics3")), "group_size": 16}],
        "cells": [{"method": "RTN", "scheme": "W4A16", "recipe": "rtn_w4a16"}],
        "settings": {"vqa_questions": 2, "kl_rows": 1, "ppl_tokens": 32, "calib_samples": 2, "batch_size": 2},
    }))
    proc = subprocess.run([sys.executable, str(Path(run.__file__)), "--config", str(config), "--results-root",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = json.loads((tmp_path / "results" / "zoo" / "results.json").read_text())["cells"]["rtn_w4a16"]
    assert "imported" not in cell["code_version"], cell["code_version"]
    assert cell["code_version"] == run.code_version(cell["recipe_text"])


CODE_SAMPLE = '''"""Module doc."""
import os  # why


class A:
    """Class doc
    on two lines."""
    x: int = 10  # the paper's value

    def f(self, y=2):
        """f doc."""
        # a comment line
        return self.x * y  # trailing


def g():
    return "not a docstring"
'''


def test_code_text_ignores_comments_and_docstrings_but_not_code(eval_script):
    """Editing a comment or a docstring does not change a cell's code version; editing code does
    (a default value, or a string that is not a docstring, included)."""
    run = eval_script("run_experiments")
    base = run.code_text(CODE_SAMPLE)
    assert not any(doc in base for doc in ("Module doc", "Class doc", "on two lines", "f doc"))
    assert "#" not in base and "return self.x * y" in base and '"not a docstring"' in base
    edited_docs = (CODE_SAMPLE.replace("Module doc.", "Other words.").replace("on two lines.", "changed")
                   .replace("# why", "# because").replace("# a comment line", "# more\n        # comments"))
    assert run.code_text(edited_docs) == base
    for code_edit in (CODE_SAMPLE.replace("x: int = 10", "x: int = 3"), CODE_SAMPLE.replace("y=2", "y=3"),
                      CODE_SAMPLE.replace('"not a docstring"', '"other"'),
                      CODE_SAMPLE.replace("self.x * y", "self.x + y")):
        assert run.code_text(code_edit) != base, code_edit
    # every module a cell runs parses
    assert all(run.code_text(p.read_text()) for p in run.code_files(None) if p.stat().st_size)


def _fake_cell(method, scheme, acc, kl, group_size=64):
    vqa = {"accuracy": acc, "ci_low": acc - 0.03, "ci_high": acc + 0.03, "n": 500}
    return {"method": method, "scheme": scheme, "group_size": group_size, "answers_identical_to_fp": 0.9,
            "git_commit": "abc", "code_version": "v",
            "fp": {"vqa": {"accuracy": 0.878, "ci_low": 0.85, "ci_high": 0.9, "n": 500},
                   "ppl": {"perplexity": 30.0, "tokens": 2040}, "size_bytes": 2**29},
            "quantized": {"vqa": vqa, "kl": {"kl_mean": kl, "kl_max": 10 * kl},
                          "ppl": {"perplexity": 31.0}, "size_bytes": 2**27,
                          "calibration": {"wall_s": 60.0, "peak_rss_bytes": 2**31}}}


def test_plot_draws_one_line_per_method_against_bits_per_panel(eval_script, tmp_path, monkeypatch):
    """Weight-only cells go on a weight-bits axis, weight-activation cells on an axis ordered by
    activation then weight bits; no line joins the two; a cell's seeds make one point (their mean) with
    an error bar (min..max for 2 seeds)."""
    run = eval_script("run_experiments")
    cells = {"gptq_w3": _fake_cell("GPTQ", "W3A16", 0.80, 0.04), "gptq_w4": _fake_cell("GPTQ", "W4A16", 0.87, 0.006),
             "gptq_w4a8": _fake_cell("GPTQ", "W4A8", 0.79, 0.16), "gptq_w8a8": _fake_cell("GPTQ", "W8A8", 0.84, 0.03),
             "rtn_w4a4": _fake_cell("RTN", "W4A4", 0.0, 10.3), "rtn_w6a6": _fake_cell("RTN", "W6A6", 0.46, 0.84),
             "gptq_w3@seed1": {**_fake_cell("GPTQ", "W3A16", 0.78, 0.05), "calib_seed": 1}}
    lines = run.plot_lines(cells)
    assert set(lines) == {("weight-only", "GPTQ"), ("weight-activation", "GPTQ"), ("weight-activation", "RTN")}
    assert [(x, acc) for x, acc, *_ in lines[("weight-only", "GPTQ")]] == [(3, pytest.approx(79.0)), (4, 87.0)]
    (w3, w4) = lines[("weight-only", "GPTQ")]
    assert w3[4]["acc"] == pytest.approx((78.0, 80.0)) and w3[4]["kl"] == pytest.approx((0.04, 0.05)) and w4[4] is None
    # W4A4 < W6A6 < W4A8 < W8A8
    assert [(x, s) for x, _, _, s, _ in lines[("weight-activation", "GPTQ")]] == [(2, "W4A8"), (3, "W8A8")]
    assert [(x, s) for x, _, _, s, _ in lines[("weight-activation", "RTN")]] == [(0, "W4A4"), (1, "W6A6")]
    assert run.scheme_bits("W6A6") == (6, 6)
    with pytest.raises(ValueError, match="W<bits>A<bits>"):
        run.scheme_bits("int4-awq")
    # the figure has one drawn line per (panel, method), plus the full-precision line in each accuracy panel
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    original_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: drawn.setdefault("fig", fig))  # keep the figure to inspect
    (path,) = run.plot(cells, tmp_path)
    assert path.stat().st_size > 0
    labels = [[line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
              for ax in drawn["fig"].axes[:4]]
    assert labels == [["GPTQ", "full precision"], ["GPTQ"], ["GPTQ", "RTN", "full precision"], ["GPTQ", "RTN"]]
    # the seed interval of gptq_w3 is drawn as an error bar in both weight-only panels, none elsewhere
    assert [len(ax.containers) for ax in drawn["fig"].axes[:4]] == [1, 1, 0, 0]
    styles = {line.get_label(): (line.get_color(), line.get_marker(), line.get_linestyle())
              for line in drawn["fig"].axes[2].get_lines()}
    assert styles["GPTQ"] != styles["RTN"]
    original_close(drawn["fig"])


def test_report_rewrites_the_table_and_plot_from_results_json(eval_script, tmp_path, capsys):
    run = eval_script("run_experiments")
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(tmp_path / "absent"), "group_size": 64}],
                                      "cells": [{"method": "RTN", "scheme": "W4A16", "recipe": "rtn_w4a16"}]}))
    out_dir = tmp_path / "results" / "m"
    out_dir.mkdir(parents=True)
    (out_dir / "results.json").write_text(json.dumps({"cells": {"gptq_w4": _fake_cell("GPTQ", "W4A16", 0.87, 0.006)}}))
    assert run.main(["--config", str(config), "--results-root", str(tmp_path / "results"), "--report"]) == 0
    table = (out_dir / "results.md").read_text()
    assert "| W4A16 | GPTQ | gptq_w4 | 87.0 [84.0, 90.0] |" in table and "group size 64" in table and "Q4_1" in table
    # the configured cell that has not run is listed as such, with no numbers
    assert "| W4A16 | RTN | rtn_w4a16 | to run |  |" in table
    assert (out_dir / "metrics.png").stat().st_size > 0
    assert "from 1 cells" in capsys.readouterr().out
    assert set(json.loads((out_dir / "results.json").read_text())) == {"cells", "summary", "comparisons"}


def test_the_default_matrix_holds_every_method_at_every_scheme_the_issue_names(eval_script):
    """Full precision is every table's baseline; the cells: RTN, GPTQ, AWQ, MBQ, MBQ+GPTQ, Q-VLM at
    W3A16/W4A16; the same at W4A8/W8A8 with SmoothQuant as the AWQ-family activation method (AWQ itself
    is weight-only), and the activation methods at W4A4/W6A6."""
    from pathlib import Path

    run = eval_script("run_experiments")
    config = yaml.safe_load((Path(run.__file__).resolve().parent / "experiments.yaml").read_text())
    have = {(c["method"], c["scheme"]) for c in run.parse_cells(config) if c["calib_seed"] is None}
    required = {(m, s) for s in ("W3A16", "W4A16") for m in ("RTN", "GPTQ", "AWQ", "MBQ", "MBQ+GPTQ", "Q-VLM")}
    required |= {(m, s) for s in ("W4A8", "W8A8") for m in ("RTN", "GPTQ", "SmoothQuant", "MBQ", "MBQ+GPTQ", "Q-VLM")}
    required -= {("SmoothQuant", "W8A8")}  # W8A8 smooths with GPTQ after it (SmoothQuant+GPTQ)
    required |= {("SmoothQuant+GPTQ", "W8A8")}
    required |= {(m, s) for s in ("W4A4", "W6A6") for m in ("RTN", "SmoothQuant", "MBQ", "Q-VLM")}
    assert required - have == set()
    # two cells rerun with another calibration seed: the noise level
    assert sum(1 for c in run.parse_cells(config) if c["calib_seed"] is not None) >= 2


# ------------------------------------------------------------------ seeds, summaries, comparisons (issue #22)
GOLDEN_RECIPE = "quant_stage:\n  quant_modifiers:\n    GPTQModifier: {targets: [Linear], scheme: W4A16}\n"
GOLDEN_SETTINGS = {"vqa_questions": 500, "kl_rows": 64, "ppl_tokens": 2048, "calib_samples": 128, "batch_size": 16,
                   "seed": 0}


def test_seed_runs_keep_the_keys_of_seedless_and_calib_seed_cells(eval_script, tmp_path, monkeypatch):
    """A cell with ``seeds: [0, 1, 2]`` runs as <cell>, <cell>@seed1, <cell>@seed2: the base-seed run has
    the key a seed-less cell always had and seed 1 the key of the former ``calib_seed: 1`` cell (golden
    keys computed with the code before seeds existed, commit fcc15a4), so stored results stay done."""
    run = eval_script("run_experiments")
    monkeypatch.setattr(run, "code_version", lambda *a: "pinned")
    recipe = tmp_path / "golden_recipe.yaml"
    recipe.write_text(GOLDEN_RECIPE)
    cell = {"method": "GPTQ", "scheme": "W4A16", "recipe": str(recipe)}
    runs = run.parse_cells({"cells": [{**cell, "seeds": [0, 1, 2]}], "settings": GOLDEN_SETTINGS})
    assert [(r["id"], r["calib_seed"], r["seed"], r["cell"]) for r in runs] == [
        ("golden_recipe", None, 0, "golden_recipe"), ("golden_recipe@seed1", 1, 1, "golden_recipe"),
        ("golden_recipe@seed2", 2, 2, "golden_recipe")]
    keys = [run.plan_cell(r, "/m", "f", GOLDEN_SETTINGS, None, tmp_path / "out")["key"] for r in runs]
    assert keys[:2] == ["f535b19259c409ec", "079f03636019fefd"] and len(set(keys)) == 3
    # the old spellings give the same runs
    legacy = run.parse_cells({"cells": [cell, {**cell, "calib_seed": 1}], "settings": GOLDEN_SETTINGS})
    assert [(r["id"], r["calib_seed"]) for r in legacy] == [("golden_recipe", None), ("golden_recipe@seed1", 1)]
    assert [run.plan_cell(r, "/m", "f", GOLDEN_SETTINGS, None, tmp_path)["key"] for r in legacy] == keys[:2]
    # the seed reaches the job as --calib-seed, except at the base seed
    argv = [run.plan_cell(r, "/m", "f", GOLDEN_SETTINGS, None, tmp_path)["argv"] for r in runs]
    assert "--calib-seed" not in argv[0] and argv[2][argv[2].index("--calib-seed") + 1] == "2"


def test_parse_cells_seeds_from_cell_group_top_level_or_the_command_line(eval_script):
    run = eval_script("run_experiments")
    config = {"seeds": [0, 1], "settings": {"seed": 0}, "cells": [
        {"method": "RTN", "scheme": "W4A16", "recipe": "rtn_w4a16"},                  # top-level default
        {"method": "GPTQ", "scheme": "W4A16", "recipe": "gptq_w4a16", "seeds": [0, 1, 2]},  # its own
        {"group": "W3", "scheme": "W3A16", "seeds": [3], "cells": [
            {"method": "RTN", "recipe": "rtn_w3a16"},                                  # the group's
            {"method": "GPTQ", "recipe": "gptq_w3a16", "seeds": [0]}]},                # its own again
        {"method": "AWQ", "scheme": "W3A16", "recipe": "awq_w3a16", "calib_seed": 5},  # legacy single run
    ]}
    runs = run.parse_cells(config)
    assert [r["id"] for r in runs] == ["rtn_w4a16", "rtn_w4a16@seed1", "gptq_w4a16", "gptq_w4a16@seed1",
                                       "gptq_w4a16@seed2", "rtn_w3a16@seed3", "gptq_w3a16", "awq_w3a16@seed5"]
    assert runs[5]["scheme"] == "W3A16" and runs[5]["method"] == "RTN" and runs[5]["calib_seed"] == 3
    # --seeds replaces every configured list (not a legacy calib_seed run)
    assert [r["id"] for r in run.parse_cells(config, [2])] == [
        "rtn_w4a16@seed2", "gptq_w4a16@seed2", "rtn_w3a16@seed2", "gptq_w3a16@seed2", "awq_w3a16@seed5"]
    # another base seed: that seed is the plain id (no --calib-seed), seed 0 an @seed0 run
    based = run.parse_cells({"settings": {"seed": 7}, "cells": [{"recipe": "w8a8", "seeds": [7, 0]}]})
    assert [(r["id"], r["calib_seed"]) for r in based] == [("w8a8", None), ("w8a8@seed0", 0)]
    assert [r["id"] for r in run.parse_cells({"cells": ["w8a8"]})] == ["w8a8"]  # default: the base seed only
    selected, unknown = run.select_runs(runs, ["gptq_w4a16", "rtn_w4a16@seed1", "nope"])
    assert [r["id"] for r in selected] == ["rtn_w4a16@seed1", "gptq_w4a16", "gptq_w4a16@seed1", "gptq_w4a16@seed2"]
    assert unknown == ["nope"]
    for bad, match in (({"cells": [{"recipe": "w8a8", "seeds": []}]}, "non-empty"),
                       ({"cells": [{"recipe": "w8a8", "seeds": [1, 1]}]}, "repeated"),
                       ({"cells": [{"recipe": "w8a8", "seeds": ["a"]}]}, "integers"),
                       ({"cells": [{"recipe": "w8a8", "seeds": [0, 1], "calib_seed": 1}]}, "either calib_seed"),
                       ({"cells": [{"recipe": "w8a8", "seeds": [0, 1]}, {"recipe": "w8a8", "calib_seed": 1}]},
                        "duplicate")):
        with pytest.raises(ValueError, match=match):
            run.parse_cells(bad)


def test_stored_results_are_runs_of_the_expanded_matrix(eval_script):
    """Every run stored in eval/results/<model>/results.json is a run of experiments.yaml under the same
    id and calibration seed (the former @seed cells included), so the seed expansion orphans none."""
    run = eval_script("run_experiments")
    eval_dir = Path(run.__file__).resolve().parent
    config = yaml.safe_load((eval_dir / "experiments.yaml").read_text())
    runs = {r["id"]: r for r in run.parse_cells(config)}
    checked = 0
    for model in config["models"]:
        results_file = eval_dir / "results" / model["name"] / "results.json"
        if not results_file.exists():
            continue
        for rid, record in json.loads(results_file.read_text())["cells"].items():
            assert rid in runs, f"stored run {rid} is no run of experiments.yaml"
            assert runs[rid]["calib_seed"] == record.get("calib_seed"), rid
            assert runs[rid]["seed"] == run.record_seed(record), rid
            checked += 1
    if not checked:
        pytest.skip("no stored results")


def _with_rows(cell, kl_rows=None, hits=None, seed=None):
    cell = json.loads(json.dumps(cell))
    if kl_rows is not None:
        cell["quantized"]["kl_per_row"] = kl_rows
    if hits is not None:
        cell["quantized"]["vqa"]["hits"] = hits
    if seed is not None:
        cell["calib_seed"] = seed
    return cell


def test_summary_over_seeds(eval_script):
    run = eval_script("run_experiments")
    cells = {"mbq_w3": {**_fake_cell("MBQ", "W3A16", 0.10, 3.0), "args": {"seed": 0}},  # legacy: no seed field
             "mbq_w3@seed1": _with_rows(_fake_cell("MBQ", "W3A16", 0.20, 4.0), seed=1),
             "mbq_w3@seed2": {**_fake_cell("MBQ", "W3A16", 0.30, 5.0), "seed": 2, "cell": "mbq_w3"},
             "gptq_w3": _fake_cell("GPTQ", "W3A16", 0.8, 0.04),
             "awq_w3@seed1": _with_rows(_fake_cell("AWQ", "W3A16", 0.1, 2.0), seed=1),
             "awq_w3": _fake_cell("AWQ", "W3A16", 0.3, 2.2)}
    assert [run.record_seed(cells[c]) for c in ("mbq_w3", "mbq_w3@seed1", "mbq_w3@seed2")] == [0, 1, 2]
    summary = run.summarize_cells(cells)
    assert set(summary) == {"mbq_w3", "gptq_w3", "awq_w3"}
    mbq = summary["mbq_w3"]
    assert mbq["seeds"] == [0, 1, 2] and mbq["runs"] == ["mbq_w3", "mbq_w3@seed1", "mbq_w3@seed2"]
    half = 4.302653 * 0.1 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(3), sd = 0.1
    assert mbq["accuracy"]["kind"] == "t95" and mbq["accuracy"]["mean"] == pytest.approx(0.2)
    assert mbq["accuracy"]["high"] == pytest.approx(0.2 + half)
    assert mbq["kl_mean"]["mean"] == pytest.approx(4.0)
    assert summary["awq_w3"]["accuracy"]["kind"] == "min..max" and summary["awq_w3"]["seeds"] == [0, 1]
    assert summary["awq_w3"]["accuracy"]["low"] == pytest.approx(0.1)
    assert summary["gptq_w3"]["accuracy"]["kind"] == "single seed"
    table = run.markdown_table(cells)
    assert "| W3A16 | MBQ | mbq_w3 | 20.0 ± 24.8 |" in table
    assert "| W3A16 | AWQ | awq_w3 | 20.0 (10.0..30.0) |" in table
    assert "| W3A16 | GPTQ | gptq_w3 | 80.0 [77.0, 83.0] |" in table
    assert "| W3A16 | MBQ | mbq_w3@seed2 | 30.0 [27.0, 33.0] |" in table  # the per-seed runs are listed too


def test_markdown_comparisons_with_to_run_and_missing_per_row_data(eval_script):
    run = eval_script("run_experiments")
    config = {"cells": [{"method": "MBQ", "scheme": "W3A16", "recipe": "mbq_w3", "seeds": [0, 1]},
                        {"method": "AWQ", "scheme": "W3A16", "recipe": "awq_w3a16", "seeds": [0, 1]},
                        {"method": "MBQ", "scheme": "W4A16", "recipe": "mbq_w4"},
                        {"method": "AWQ", "scheme": "W4A16", "recipe": "awq_w4a16"},
                        {"method": "Q-VLM", "scheme": "W4A16", "recipe": "qvlm_w4_s32"},
                        {"method": "RTN", "scheme": "W4A16", "recipe": "rtn_w4a16"}],
              "comparisons": [{"a": "MBQ", "b": "AWQ", "schemes": ["W3A16", "W4A16"]}, {"a": "qvlm_w4_s32", "b": "rtn_w4a16"}]}
    planned = run.parse_cells(config)
    pairs = run.resolve_comparisons(config, planned)
    assert pairs == [{"name": "MBQ vs AWQ", "scheme": "W3A16", "a": "mbq_w3", "b": "awq_w3a16"},
                     {"name": "MBQ vs AWQ", "scheme": "W4A16", "a": "mbq_w4", "b": "awq_w4a16"},
                     {"name": "Q-VLM vs RTN", "scheme": "W4A16", "a": "qvlm_w4_s32", "b": "rtn_w4a16"}]
    hits_mbq, hits_awq = [1, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 0]
    cells = {  # W3A16: both seeds with per-row data; W4A16: old records without it; Q-VLM vs RTN: RTN not run
        "mbq_w3": _with_rows(_fake_cell("MBQ", "W3A16", 4 / 6, 3.0), [0.1, 0.2, 0.3], hits_mbq),
        "mbq_w3@seed1": _with_rows(_fake_cell("MBQ", "W3A16", 4 / 6, 3.2), [0.2, 0.2, 0.3], hits_mbq, seed=1),
        "awq_w3a16": _with_rows(_fake_cell("AWQ", "W3A16", 2 / 6, 2.4), [0.3, 0.3, 0.5], hits_awq),
        "awq_w3a16@seed1": _with_rows(_fake_cell("AWQ", "W3A16", 2 / 6, 2.5), [0.3, 0.4, 0.5], hits_awq, seed=1),
        "mbq_w4": _fake_cell("MBQ", "W4A16", 0.62, 0.24),
        "awq_w4a16": _fake_cell("AWQ", "W4A16", 0.65, 0.18),
        "qvlm_w4_s32": _fake_cell("Q-VLM", "W4A16", 0.47, 1.2),
    }
    comparisons = run.compute_comparisons(cells, pairs, n_resamples=500)
    assert [c["status"] for c in comparisons] == ["ok", "missing per-row data", "to run"]
    w3 = comparisons[0]
    assert w3["seeds"] == [0, 1] and w3["kl"]["mean_diff"] == pytest.approx(-1 / 6)
    assert [(m["b"], m["c"]) for m in w3["hits"]["mcnemar"]] == [(2, 0), (2, 0)]
    table = run.markdown_table(cells, planned, comparisons)
    rows = {line.split(" | ")[2]: line for line in table.splitlines() if line.startswith("| MBQ vs") or line.startswith("| Q-VLM vs")}
    assert "| 0,1 | -0.1667 [" in rows["mbq_w3 / awq_w3a16"] and "2 / 0, p=0.5 (s0); 2 / 0, p=0.5 (s1)" in rows["mbq_w3 / awq_w3a16"]
    assert "+33.3 [" in rows["mbq_w3 / awq_w3a16"]
    # no kl_tokens_per_row in these records: the rows weigh equally, and the table says so
    assert "] rows |" in rows["mbq_w3 / awq_w3a16"] and "KL weighted by rows (no quantized.kl_tokens_per_row" in table
    old = rows["mbq_w4 / awq_w4a16"]
    assert "no per-row KL" in old and "-3.0 (no CI)" in old and "no per-question hits" in old
    assert "no quantized.kl_per_row nor quantized.vqa.hits in mbq_w4 (seed 0), awq_w4a16 (seed 0)" in old
    missing = rows["qvlm_w4_s32 / rtn_w4a16"]
    assert missing.count("to run") == 4 and "rtn_w4a16 not run yet" in missing
    assert not any(ch.isdigit() for ch in missing.split("rtn_w4a16 |", 1)[1].replace("rtn_w4a16", ""))  # no numbers
    # the RTN cell itself is "to run" in the main table, never numbers
    assert "| W4A16 | RTN | rtn_w4a16 | to run |  |  |  |  |  |  |  | (0 to run) |" in table


def test_comparisons_of_the_matrix_resolve_and_bad_ones_are_named(eval_script):
    run = eval_script("run_experiments")
    config = yaml.safe_load((Path(run.__file__).resolve().parent / "experiments.yaml").read_text())
    runs = run.parse_cells(config)
    pairs = {(p["a"], p["b"]) for p in run.resolve_comparisons(config, runs)}
    matched = {(f"mbq_{b}{v}", f"mbq_{b}{u}") for b in ("w3", "w4")
               for v, u in (("", "_uniform"), ("_duo", "_duo_uniform"), ("_clip", "_uniform_clip"))}
    # the shipped mbq_w3 / mbq_w4 have duo scales: their activation-only twins are mbq_w*_reference
    matched = (matched - {("mbq_w3", "mbq_w3_uniform"), ("mbq_w4", "mbq_w4_uniform")}
               | {("mbq_w3_reference", "mbq_w3_uniform"), ("mbq_w4_reference", "mbq_w4_uniform")})
    assert pairs == {("mbq_w3", "awq_w3a16"), ("mbq_w4", "awq_w4a16"), ("mbq_w4a8", "smoothquant_w4a8"),
                     ("qvlm_w4_norealign", "rtn_w4a16"), ("qvlm_w6a6", "rtn_w6a6"), ("qvlm_w4a8", "rtn_w4a8"),
                     ("qvlm_w4_gptq", "gptq_w4a16"), ("qvlm_w4_norealign", "gptq_w4a16"),
                     ("qvlm_w3_gptqchoice", "gptq_w3a16"),
                     ("mbq_gptq_w3", "gptq_w3a16"), ("mbq_gptq_w4a8", "gptq_w4a8"),
                     ("mbq_gptq_w4a8", "smoothquant_gptq_w4a8"),
                     ("mbq_gptq_w3", "mbq_gptq_w3_uniform"), ("mbq_gptq_w4a8", "mbq_gptq_w4a8_uniform"),
                     ("qvlm_w4_rtn", "rtn_w4a16"), ("qvlm_w4_norealign", "qvlm_w4_gptq_blocks1"),
                     ("qvlm_w4_norealign", "qvlm_w4_gptq_blocks3"), ("mbq_w3_duo_clip", "mbq_w3_duo_uniform_clip"),
                     ("mbq_w3_duo_clip", "mbq_w3"), ("mbq_w4", "mbq_w4_noclip"),
                     ("mbq_w4_duo_clip", "mbq_w4_duo_uniform_clip")} | matched
    # the compared cells run at the same seeds on both sides
    seeds = {}
    for r in runs:
        seeds.setdefault(r["cell"], set()).add(r["seed"])
    assert all(seeds[a] == seeds[b] and len(seeds[a]) >= 3 for a, b in pairs)
    with pytest.raises(ValueError, match="matches no cell"):
        run.resolve_comparisons({"comparisons": [{"a": "MBQ", "b": "Nope", "schemes": ["W3A16"]}]}, runs)
    with pytest.raises(ValueError, match="not a cell of the matrix"):
        run.resolve_comparisons({"comparisons": [{"a": "mbq_w3", "b": "nope"}]}, runs)


def test_second_machine_matrix_pairs_the_shipped_qvlm_w4_with_gptq_and_keeps_the_main_keys(eval_script):
    """eval/experiments_amd_epyc.yaml (the shipped qvlm_w4 against GPTQ on one other machine) resolves its
    comparisons, and runs its cells with the main matrix's settings, so that a cell present in both has
    the same key; qvlm_w4_norealign is the former shipped recipe verbatim, but for realign_stream."""
    import qvlm_modifiers

    run = eval_script("run_experiments")
    here = Path(run.__file__).resolve().parent
    config = yaml.safe_load((here / "experiments_amd_epyc.yaml").read_text())
    main = yaml.safe_load((here / "experiments.yaml").read_text())
    pairs = {(p["a"], p["b"]) for p in run.resolve_comparisons(config, run.parse_cells(config))}
    assert pairs == {("qvlm_w4", "gptq_w4a16"), ("qvlm_w4_norealign", "gptq_w4a16"), ("qvlm_w4", "qvlm_w4_norealign")}
    assert config["models"] == main["models"] and config["settings"] == main["settings"]
    shipped = qvlm_modifiers.recipe_path("qvlm_w4").read_text().splitlines()
    former = (here / "recipes" / "qvlm_w4_norealign.yaml").read_text().splitlines()
    assert [line for line in shipped if "realign_stream" not in line] == former
    assert "cpu" in run.machine()
    info = ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n")
    assert run.cpu_model(info) == "AMD EPYC (avx2)"
    intel = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_vnni amx_tile\n"
    assert run.cpu_model(intel) == "Intel Xeon (avx2, avx512f, avx512_vnni, amx_tile)"


def test_matched_mbq_comparisons_differ_only_in_the_modality_weighting(eval_script):
    """Each "matched" MBQ comparison (MBQ against its uniform-weight twin) is read in the README as the
    effect of the modality weighting alone: the two recipes must be the same but for MBQModifier's
    vision_weight and text_tokens (uniform: 1.0 and all_text), GPTQ stage and everything else included."""
    run = eval_script("run_experiments")
    config = yaml.safe_load((Path(run.__file__).resolve().parent / "experiments.yaml").read_text())
    pairs = [(p["a"], p["b"]) for p in run.resolve_comparisons(config, run.parse_cells(config))]
    twins = [(a, b) for a, b in pairs if b.startswith("mbq_") and "uniform" in b]
    assert {("mbq_gptq_w3", "mbq_gptq_w3_uniform"), ("mbq_gptq_w4a8", "mbq_gptq_w4a8_uniform")} <= set(twins)
    assert len(twins) >= 10

    from qvlm_modifiers.mbq import MBQModifier

    def stages(cell):  # the recipe with MBQModifier's defaults written out, and its two weighting fields
        recipe = yaml.safe_load(Path(run.resolve_recipe(cell)).read_text())
        mbq = recipe["quant_stage"]["quant_modifiers"]["MBQModifier"]
        for name, field in MBQModifier.model_fields.items():
            if not field.is_required():
                mbq.setdefault(name, field.get_default(call_default_factory=True))
        return recipe, {k: mbq.pop(k) for k in ("vision_weight", "text_tokens")}

    for a, b in twins:
        (recipe_a, weighting_a), (recipe_b, weighting_b) = stages(a), stages(b)
        assert recipe_a == recipe_b, (a, b)
        assert weighting_b == {"vision_weight": 1.0, "text_tokens": "all_text"}, b
        assert weighting_a == {"vision_weight": None, "text_tokens": "answer"}, a


def test_budget_counts_pending_runs_and_estimates_their_time(eval_script, tmp_path, capsys, monkeypatch):
    run = eval_script("run_experiments")
    done = {"mbq_w3": {**_fake_cell("MBQ", "W3A16", 0.1, 3.0), "wall_s": 600.0},
            "mbq_w4": {**_fake_cell("MBQ", "W4A16", 0.6, 0.2), "wall_s": 1800.0},
            "gptq_w3": {**_fake_cell("GPTQ", "W3A16", 0.8, 0.04), "wall_s": 120.0}}
    runs = run.parse_cells({"cells": [{"method": "MBQ", "scheme": "W3A16", "recipe": "mbq_w3", "seeds": [0, 1, 2]},
                                      {"method": "MBQ", "scheme": "W8A8", "recipe": "mbq_w8a8"},
                                      {"method": "X", "scheme": "W8A8", "recipe": "x_w8a8"}]})
    assert run.estimate_wall_s(runs[1], done) == (600.0, "this cell")
    assert run.estimate_wall_s(runs[3], done) == (1200.0, "this method")  # median of MBQ's 600 and 1800
    assert run.estimate_wall_s(runs[4], done) == (600.0, "all runs")
    assert run.estimate_wall_s(runs[4], {}) == (None, "no record")
    states = [(runs[0], "done"), (runs[1], "to run"), (runs[2], "to run"), (runs[3], "stale (code)"),
              (runs[4], "will rerun (recipe, settings or job arguments changed)")]
    lines = run.budget_lines("m", states, done)
    assert lines[0] == ("[budget] m: 4 of 5 (cell, seed) runs pending (1 stale, 2 to run, 1 will rerun), 1 done; "
                        "about 0.8 h at the recorded wall times")
    assert "[budget]   mbq_w3: seeds 1,2 ~20 min" in lines
    # the command line: --budget prints the summary only, --list every run and the summary (keys mocked: no model)
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(tmp_path / "absent")}],
                                      "cells": [{"method": "MBQ", "scheme": "W3A16", "recipe": "mbq_w3", "seeds": [0, 1, 2]}],
                                      "settings": {}}))
    out_dir = tmp_path / "results" / "m"
    out_dir.mkdir(parents=True)
    (out_dir / "results.json").write_text(json.dumps({"cells": {"mbq_w3": {**done["mbq_w3"], "key": "k-mbq_w3"}}}))
    monkeypatch.setattr(run, "plan_cell", lambda cell, *a: {"recipe_file": "r", "recipe_text": "t", "version": "v",
                                                            "argv": [], "key": f"k-{cell['id']}"})
    monkeypatch.setattr(run, "stale_cells", lambda *a: {})
    argv = ["--config", str(config), "--results-root", str(tmp_path / "results")]
    assert run.main(argv + ["--budget"]) == 0
    out = capsys.readouterr().out
    assert "[budget] m: 2 of 3 (cell, seed) runs pending (2 to run), 1 done; about 0.3 h" in out and "x mbq_w3" not in out
    assert run.main(argv + ["--list", "--only", "mbq_w3@seed2"]) == 0
    out = capsys.readouterr().out
    assert "m x mbq_w3@seed2 (MBQ W3A16): to run" in out and "1 of 1 (cell, seed) runs pending" in out


def test_a_run_records_its_seed_and_writes_summary_and_comparisons(eval_script, tmp_path, capsys, monkeypatch):
    """The run loop with main_job mocked (no model): each (cell, seed) run passes its --calib-seed, is
    stored under its id with ``seed`` and ``cell``, and results.json / results.md get the seed summary and
    the comparisons after every run; a second invocation skips every run."""
    run = eval_script("run_experiments")
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "m", "path": str(tmp_path / "absent")}],
        "cells": [{"method": "MBQ", "scheme": "W3A16", "recipe": "mbq_w3", "seeds": [0, 1]},
                  {"method": "AWQ", "scheme": "W3A16", "recipe": "awq_w3a16", "seeds": [0, 1]}],
        "comparisons": [{"a": "MBQ", "b": "AWQ", "schemes": ["W3A16"]}], "settings": {"seed": 0}}))
    monkeypatch.setattr(run, "plan_cell", lambda cell, path, fp, settings, gs, out_dir: {
        "recipe_file": f"{cell['cell']}.yaml", "recipe_text": "t", "version": "v", "key": f"k-{cell['id']}",
        "argv": ["--results-dir", str(out_dir), "--recipe", cell["cell"]]
                + (["--calib-seed", str(cell["calib_seed"])] if cell["calib_seed"] is not None else [])})
    monkeypatch.setattr(run, "code_version", lambda *a: "v")
    monkeypatch.setattr(run, "machine", lambda: {})
    calls = []

    def fake_job(argv):
        calls.append(argv)
        out_dir, recipe = Path(argv[1]), argv[3]
        seed = int(argv[argv.index("--calib-seed") + 1]) if "--calib-seed" in argv else 0
        acc = {"mbq_w3": 0.5, "awq_w3a16": 0.25}[recipe] + 0.01 * seed
        cell = _with_rows(_fake_cell("?", "?", acc, 1.0), [acc, acc / 2, acc / 3], [1, 1, 0, 0] if recipe == "mbq_w3" else [1, 0, 0, 0])
        cell["quantized"]["vqa"]["predictions"] = ["x"] * 4
        (out_dir / f"main_job_{recipe}.json").write_text(json.dumps(cell))
        return 0

    monkeypatch.setattr(run.main_job, "main", fake_job)
    argv = ["--config", str(config), "--results-root", str(tmp_path / "results")]
    assert run.main(argv) == 0
    assert [("--calib-seed" in a) for a in calls] == [False, True, False, True]
    results = json.loads((tmp_path / "results" / "m" / "results.json").read_text())
    assert list(results["cells"]) == ["mbq_w3", "mbq_w3@seed1", "awq_w3a16", "awq_w3a16@seed1"]
    rec = results["cells"]["mbq_w3@seed1"]
    assert (rec["seed"], rec["calib_seed"], rec["cell"], rec["key"]) == (1, 1, "mbq_w3", "k-mbq_w3@seed1")
    assert "predictions" not in rec["quantized"]["vqa"] and rec["quantized"]["vqa"]["hits"] == [1, 1, 0, 0]
    assert results["summary"]["mbq_w3"]["seeds"] == [0, 1]
    assert results["summary"]["mbq_w3"]["accuracy"]["mean"] == pytest.approx(0.505)
    (comp,) = results["comparisons"]
    assert comp["status"] == "ok" and comp["seeds"] == [0, 1]
    assert comp["accuracy_diff"] == pytest.approx(0.25)
    assert [(m["b"], m["c"]) for m in comp["hits"]["mcnemar"]] == [(1, 0), (1, 0)]
    table = (tmp_path / "results" / "m" / "results.md").read_text()
    assert "| MBQ vs AWQ | W3A16 | mbq_w3 / awq_w3a16 | 0,1 |" in table
    capsys.readouterr()
    assert run.main(argv) == 0 and len(calls) == 4
    assert capsys.readouterr().out.count("done (key") == 4


def test_compare_archived_pairs_an_archive_with_a_current_cell_by_seed(eval_script, tmp_path, capsys):
    """eval/compare_archived.py: the archived cell's runs (seeds 0, 1) against the current cell's (0, 1,
    2) are paired on the common seeds with the matrix's statistics; an unknown cell is an error."""
    compare = eval_script("compare_archived")
    hits_new, hits_old = [1, 1, 0, 1], [1, 0, 0, 1]
    current = {"q": _with_rows(_fake_cell("Q-VLM", "W4A16", 0.75, 0.2), [0.1, 0.2, 0.3], hits_new),
               "q@seed1": _with_rows(_fake_cell("Q-VLM", "W4A16", 0.75, 0.2), [0.1, 0.3, 0.3], hits_new, seed=1),
               "q@seed2": _with_rows(_fake_cell("Q-VLM", "W4A16", 0.75, 0.2), [0.1, 0.3, 0.3], hits_new, seed=2)}
    archived = {"q_old": _with_rows(_fake_cell("Q-VLM old", "W4A16", 0.5, 0.3), [0.2, 0.3, 0.4], hits_old),
                "q_old@seed1": _with_rows(_fake_cell("Q-VLM old", "W4A16", 0.5, 0.3), [0.2, 0.4, 0.4], hits_old, seed=1)}
    folder = tmp_path / "m"
    (folder / "archive").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"cells": current}))
    (folder / "archive" / "old.json").write_text(json.dumps({"cells": archived}))
    assert compare.main(["q", "archive/old.json", "q_old", "--model", "m", "--results-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["status"] == "ok" and result["seeds"] == [0, 1] and result["unpaired_seeds"] == {"q": [2]}
    assert result["kl"]["mean_diff"] == pytest.approx(-0.1)  # every row 0.1 lower at both seeds
    assert [(m["b"], m["c"]) for m in result["hits"]["mcnemar"]] == [(1, 0), (1, 0)]
    assert compare.main(["nope", "archive/old.json", "q_old", "--model", "m", "--results-root", str(tmp_path)]) == 2
    # two current cells: results.json as the file, only the common seeds paired
    assert compare.main(["q", "results.json", "q", "--model", "m", "--results-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["seeds"] == [0, 1, 2] and result["kl"]["mean_diff"] == 0.0
