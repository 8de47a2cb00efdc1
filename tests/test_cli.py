"""``qvlm`` commands that succeed: quantize (data-free and calibrated), inspect, eval, recipes, bench,
quiet mode and log file. In-process through ``main([...])`` except the console-script check."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qvlm_modifiers
from qvlm_modifiers.cli import RUN_RECORD_NAME, main, recipe_description



@pytest.fixture(scope="module")
def assets(cli_assets):
    return cli_assets


def quantize(assets, out, recipe="w8a8", n=4, *extra):
    return main(["quantize", str(assets["model"]), "--recipe", recipe, "--dataset", str(assets["pairs"]),
                 "--num-samples", str(n), "--output", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def w8a8(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "ckpt"
    assert quantize(assets, out, "w8a8", 4, "--quiet") == 0
    return out


def test_quantize_writes_checkpoint_processor_and_run_record(assets, w8a8):
    names = {p.name for p in w8a8.iterdir()}
    assert {"config.json", RUN_RECORD_NAME, "chat_template.jinja"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert names & {"processor_config.json", "preprocessor_config.json"}
    assert not list(w8a8.parent.glob(".ckpt*")), "temporary directory left behind"
    record = json.loads((w8a8 / RUN_RECORD_NAME).read_text())
    assert record["recipe"] == qvlm_modifiers.recipe_path("w8a8").read_text()
    assert len(record["data_fingerprint_sha256"]) == 64
    assert record["seed"] == 0 and record["num_samples"] == 4
    assert record["versions"]["torch"] and record["versions"]["llmcompressor"] != "not installed"
    assert record["wall_time_s"] > 0 and record["peak_rss_bytes"] > 50 * 2**20
    assert record["command"][:2] == ["qvlm", "quantize"]
    qcfg = json.loads((w8a8 / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def test_data_fingerprint_follows_the_sampled_rows(assets, w8a8, tmp_path):
    """Same seed -> same rows -> same fingerprint; another seed samples other rows."""
    assert quantize(assets, tmp_path / "same", "w8a8", 4, "--quiet") == 0
    assert quantize(assets, tmp_path / "other", "w8a8", 4, "--quiet", "--seed", "3") == 0
    fp = lambda d: json.loads((d / RUN_RECORD_NAME).read_text())["data_fingerprint_sha256"]  # noqa: E731
    assert fp(tmp_path / "same") == fp(w8a8)
    assert fp(tmp_path / "other") != fp(w8a8)


def test_calibrated_recipe_shows_per_layer_progress_and_summary(assets, tmp_path, capsys):
    code = quantize(assets, tmp_path / "gptq", "gptq_w4a16", 2)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # llm-compressor's sequential pipeline: one bar per decoder layer (the tiny model has 2)
    assert "(1/" in captured.err and "Calibrating" in captured.err
    summary = [line for line in captured.out.splitlines() if line.startswith("qvlm: quantized")]
    assert len(summary) == 1 and "W4A16" in summary[0] and "smaller than bf16" in summary[0]
    qcfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized"


def test_quiet_prints_only_the_summary_and_log_file_gets_details(assets, tmp_path, capsys):
    log_file = tmp_path / "logs" / "run.log"
    code = quantize(assets, tmp_path / "q", "gptq_w4a16", 2, "--quiet", "--log-file", log_file)
    captured = capsys.readouterr()
    assert code == 0
    assert "Calibrating" not in captured.err and "%|" not in captured.err, captured.err
    assert [line for line in captured.out.splitlines() if line.strip()][-1].startswith("qvlm: quantized")
    text = log_file.read_text()
    assert "calibration samples" in text  # our INFO line
    assert "llmcompressor" in text  # llm-compressor's own log lines


def test_overwrite_replaces_a_previous_checkpoint(assets, w8a8, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(w8a8, out)
    (out / "stale.txt").write_text("from an older run")
    assert quantize(assets, out, "rtn_w4a16", 2, "--quiet", "--overwrite") == 0
    assert not (out / "stale.txt").exists()
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["num_bits"] == 4

    from qvlm_modifiers.inspect_ckpt import inspect_checkpoint

    report = inspect_checkpoint(out)
    down = [m for m in report.modules if m.name.endswith("layers.0.mlp.down_proj")]
    assert len(down) == 1 and down[0].format == "pack-quantized"
    assert down[0].weight_shape == (128, 256)  # zoo: hidden 128, MLP 256 (logical, unpacked shape)
    assert 4.0 < report.effective_bits_quantized < 4.5  # 4-bit codes + one scale/zero per 128 weights


# ------------------------------------------------------------------------------------ inspect
def test_inspect_reports_schemes_ignored_bits_size_and_exact_reload(w8a8, capsys):
    assert main(["inspect", str(w8a8), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reload"]["exact"] is True and report["reload"]["compared_tensors"] > 10
    quantized = [m for m in report["modules"] if m["scheme"].startswith("W8A8")]
    # LLaVA tiny: 7 Linear per decoder layer x 2 layers in the language model, nothing else
    assert len(quantized) == 14 and all(".layers." in m["name"] for m in quantized)
    assert any("vision_tower" in name for name in report["ignore"])
    assert report["nominal_weight_bits"] == [8]
    # independent size check: bytes of the files on disk
    on_disk = sum(p.stat().st_size for p in w8a8.glob("*.safetensors"))
    assert report["size_on_disk"] == on_disk and report["compression_vs_bf16"] > 1
    assert main(["inspect", str(w8a8)]) == 0
    text = capsys.readouterr().out
    assert "reload       exact" in text and "W8A8" in text


def test_inspect_detects_a_checkpoint_that_does_not_reload_exactly(w8a8, tmp_path, capsys):
    """Drop the in-memory names from ``ignore`` (what upstream writes): transformers then treats
    the vision tower as quantized and re-initializes it. ``inspect`` must say so and exit 1."""
    bad = tmp_path / "bad"
    shutil.copytree(w8a8, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = [n for n in cfg["quantization_config"]["ignore"]
                                            if not n.startswith("model.")]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(bad)]) == 1
    text = capsys.readouterr().out
    assert "NOT exact" in text


# ------------------------------------------------------------------------------------ eval
def test_eval_against_itself_and_against_the_quantized_model(assets, w8a8, tmp_path, capsys):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qvlm_modifiers.data import TEXT, build_calibration_dataset, collate_fn

    same = tmp_path / "same.json"
    assert main(["eval", str(assets["model"]), "--dataset", str(assets["pairs"]), "--num-samples", "3",
                 "--reference", str(assets["model"]), "--json-out", str(same), "--quiet"]) == 0
    res = json.loads(same.read_text())
    assert res["kl_ref_to_ckpt"] == pytest.approx(0.0, abs=1e-6) and res["top1_agreement"] == 1.0

    # independent NLL: plain cross-entropy over the answer tokens of the same rows
    model = AutoModelForImageTextToText.from_pretrained(assets["model"], dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(assets["model"])
    # the CLI's default: the 'question' column (present in zoo pairs) is the prompt
    # `qvlm eval` scores the answer's own tokens (text_mask="answer"), not the whole assistant turn
    rows = build_calibration_dataset(str(assets["pairs"]), processor, model, num_samples=3, seed=0,
                                     prompt_column="question", text_mask="answer")
    total, count = 0.0, 0
    for row in rows:
        batch = collate_fn([row])
        mask = batch.pop("loss_mask")[0]
        with torch.no_grad():
            logits = model(**batch).logits[0].float()
        keep = mask[1:] == TEXT
        total += torch.nn.functional.cross_entropy(logits[:-1][keep], batch["input_ids"][0][1:][keep],
                                                   reduction="sum").item()
        count += int(keep.sum())
    assert res["answer_tokens"] == count
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    q = tmp_path / "q.json"
    assert main(["eval", str(w8a8), "--dataset", str(assets["pairs"]), "--num-samples", "3",
                 "--reference", str(assets["model"]), "--json-out", str(q)]) == 0
    assert "qvlm eval:" in capsys.readouterr().out
    res_q = json.loads(q.read_text())
    assert res_q["kl_ref_to_ckpt"] > 0 and res_q["reference_nll"] == pytest.approx(res["nll"], rel=1e-5)


# ------------------------------------------------------------------------------------ recipes / bench
def test_recipes_lists_every_shipped_recipe_with_its_header(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    recipes = qvlm_modifiers.list_recipes()
    assert len(lines) == len(recipes)
    for line, (name, path) in zip(lines, recipes.items()):
        assert line.split()[0] == name
        first_comment = next(l for l in path.read_text().splitlines() if l.strip()).lstrip("#").strip()
        assert line.endswith(first_comment) and recipe_description(path) == first_comment


def test_bench_runs_the_script_with_its_arguments(tmp_path, monkeypatch, capfd):
    import qvlm_modifiers.cli.commands as commands

    script = tmp_path / "bench.py"
    script.write_text("import sys; print('ARGS', sys.argv[1:]); sys.exit(3)\n")
    monkeypatch.setattr(commands, "_bench_scripts", lambda: {"kernels": script, "e2e": script})
    assert main(["bench", "kernels", "--sizes", "64"]) == 3  # the script's exit code is passed on
    assert "ARGS ['--sizes', '64']" in capfd.readouterr().out
    assert main(["bench", "e2e"]) == 3
    assert "ARGS ['--e2e', 'only']" in capfd.readouterr().out  # e2e = the kernel bench's decode line only


def test_bench_memory_runs_the_installed_evaluation_lab(tmp_path, monkeypatch, capfd):
    """`qvlm bench memory` runs `python -m qvlm_eval.bench_memory` (an installed package, never a file
    of the source checkout); without qvlm_eval it exits 2 and says how to install it."""
    import qvlm_modifiers.cli.commands as commands

    monkeypatch.setattr(commands, "_eval_lab_installed", lambda: False)
    code = main(["bench", "memory"])
    err = capfd.readouterr().err
    assert code == 2 and "qvlm_eval" in err and "pip install -e eval" in err
    monkeypatch.undo()

    # a stand-in qvlm_eval, found first both here (find_spec) and in the child process
    lab = tmp_path / "lab" / "qvlm_eval"
    lab.mkdir(parents=True)
    (lab / "__init__.py").write_text("")
    (lab / "bench_memory.py").write_text("import sys; print('MEMORY', sys.argv[1:]); sys.exit(4)\n")
    monkeypatch.syspath_prepend(str(lab.parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(lab.parent), os.environ.get("PYTHONPATH")])))
    assert main(["bench", "memory", "--depths", "4"]) == 4
    assert "MEMORY ['--depths', '4']" in capfd.readouterr().out


def test_console_script_and_module_entry_point(tmp_path):
    qvlm = Path(sys.executable).parent / "qvlm"
    assert qvlm.is_file(), "pip install -e . creates the qvlm console script"
    res = subprocess.run([str(qvlm), "recipes", "--quiet"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "w8a8" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "qvlm_modifiers", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "quantize" in res.stdout and "inspect" in res.stdout


def test_mbq_recipe_gets_modality_labels(assets, tmp_path):
    """MBQModifier reads per-token text/vision labels (llm-compressor's use_loss_mask); the CLI turns
    that on for recipes with our Modifiers, so a shipped MBQ recipe runs end to end."""
    out = tmp_path / "mbq"
    assert quantize(assets, out, "mbq_w4", 2, "--quiet") == 0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["num_bits"] == 4


def test_quantize_with_the_model_offloaded_to_disk(assets, tmp_path):
    """--offload-dir loads through compressed-tensors' load_offloaded_model (accelerate device map
    converted to compressed-tensors offloading); a 1 MB --max-cpu-memory sends the weights to disk.
    The sequential pipeline onloads layer by layer, the checkpoint still reloads exactly, the run
    record says how many weights were on disk, and the offloaded files are gone afterwards while
    what was already in the folder stays."""
    from qvlm_modifiers.inspect_ckpt import check_reload

    out = tmp_path / "off"
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / "keep.txt").write_text("not ours")
    assert quantize(assets, out, "gptq_w4a16", 2, "--quiet", "--offload-dir", offload, "--max-cpu-memory", "1MB") == 0
    assert check_reload(out)["exact"]
    record = json.loads((out / RUN_RECORD_NAME).read_text())["offload"]
    assert record["disk_offloaded_tensors"] >= 10, record  # the tiny model's decoder weights went to disk
    assert sorted(p.name for p in offload.iterdir()) == ["keep.txt"]


def test_quantize_from_an_image_folder_with_captions(assets, tmp_path, image_folder):
    """The second dataset kind: a folder of images with a captions.jsonl (file, text[, question])."""
    folder = image_folder(3)
    out = tmp_path / "out"
    assert main(["quantize", str(assets["model"]), "--recipe", "w8a8", "--dataset", str(folder), "--num-samples", "3",
                 "--output", str(out), "--quiet"]) == 0
    record = json.loads((out / RUN_RECORD_NAME).read_text())
    assert record["num_samples"] == 3 and record["dataset"] == str(folder) and record["data_fingerprint_sha256"]
