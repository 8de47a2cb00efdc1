"""Bad input to ``qvlm``: every case exits with code 2, prints a message that names the problem and
the fix (no traceback), and writes nothing.

The commands run in-process through ``main([...])``; only the kill-during-save test needs a real
process. The checks run before any weight is loaded, so each case costs well under a second once
the tiny model (:mod:`qvlm_modifiers.testing.zoo`) is built.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvlm_modifiers.cli import RUN_RECORD_NAME, main



# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def assets(cli_assets):
    return cli_assets


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quantize_args(assets, out, **over):
    args = {
        "model": assets["model"], "--recipe": "w8a8", "--dataset": assets["pairs"], "--num-samples": 4,
        "--output": out,
    }
    args.update(over)
    argv = ["quantize", args.pop("model")]
    for k, v in args.items():
        argv += [k, v]
    return argv


def assert_clean_failure(code, err, *must_contain, out_path: Path | None = None):
    assert code == 2, err
    assert "Traceback" not in err, err
    assert "qvlm: error:" in err
    low = err.lower()
    for text in must_contain:
        assert text.lower() in low, f"{text!r} not in: {err}"
    if out_path is not None:
        assert not out_path.exists(), f"{out_path} was created"
        partial = [p.name for p in out_path.parent.glob(f".{out_path.name}*")]
        assert not partial, f"temporary output left behind: {partial}"


def copy_model(assets, dst: Path, skip=()) -> Path:
    shutil.copytree(assets["model"], dst, ignore=shutil.ignore_patterns(*skip))
    return dst


# ------------------------------------------------------------------------------------ model
def test_missing_model_path(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=tmp_path / "no-such-model"))
    assert_clean_failure(code, err, "does not exist", "existing model directory", out_path=out)


def test_path_that_is_not_a_model(assets, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=tmp_path / "notes"))
    assert_clean_failure(code, err, "is not a model", "config.json", out_path=out)


def test_text_only_architecture_lists_supported_vlms(assets, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qvlm_modifiers.families import supported_architectures

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=tmp_path / "llama"))
    assert_clean_failure(code, err, "'llama'", "not a supported vision-language model", out_path=out)
    for arch in supported_architectures():
        assert arch in err


def test_unknown_model_type_lists_supported_vlms(assets, tmp_path, capsys):
    model = copy_model(assets, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "fancy_new_vlm"
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=model))
    assert_clean_failure(code, err, "fancy_new_vlm", "Qwen2_5_VLForConditionalGeneration", out_path=out)


def test_custom_code_needs_trust_remote_code(assets, tmp_path, capsys):
    model = copy_model(assets, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "custom_vlm"
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "configuration_custom.py").write_text("raise SystemExit('custom code must not run')\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=model))
    assert_clean_failure(code, err, "custom code", "--trust-remote-code", out_path=out)


def test_pickle_only_weights_are_refused(assets, tmp_path, capsys):
    model = copy_model(assets, tmp_path / "m", skip=("*.safetensors",))
    (model / "pytorch_model.bin").write_bytes(b"not loaded: qvlm never unpickles")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=model))
    assert_clean_failure(code, err, "pickle", "safetensors", out_path=out)


def test_missing_processor(assets, tmp_path, capsys):
    model = copy_model(assets, tmp_path / "m", skip=("processor_config.json", "preprocessor_config.json",
                                                     "tokenizer*", "chat_template*"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=model))
    assert_clean_failure(code, err, "processor", "missing or broken", "save_pretrained(model_dir)", out_path=out)


def test_broken_processor(assets, tmp_path, capsys):
    model = copy_model(assets, tmp_path / "m")
    names = [p for p in ("processor_config.json", "preprocessor_config.json") if (model / p).exists()]
    assert names
    for name in names:
        (model / name).write_text("{ this is not json")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=model))
    assert_clean_failure(code, err, "processor", "missing or broken", out_path=out)


def test_truncated_model_weights(assets, tmp_path, capsys):
    model = copy_model(assets, tmp_path / "m")
    weights = next(model.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, model=model))
    assert_clean_failure(code, err, "safetensors", out_path=out)


def test_failed_load_removes_its_offload_folder(assets, tmp_path, capsys):
    """A run that fails after the offload folder exists still removes it (and --offload-dir when the
    run created it); files already in --offload-dir are not touched."""
    model = copy_model(assets, tmp_path / "m")
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    shared = tmp_path / "shared-offload"
    shared.mkdir()
    (shared / "someone-elses.bin").write_text("keep")
    for offload in (shared, tmp_path / "new-offload"):
        out = tmp_path / f"out-{offload.name}"
        code, _, err = run_cli(capsys, *quantize_args(assets, out, model=model, **{"--offload-dir": offload}))
        assert_clean_failure(code, err, "safetensors", out_path=out)
    assert [p.name for p in shared.iterdir()] == ["someone-elses.bin"]
    assert not (tmp_path / "new-offload").exists()


def test_offload_dir_that_is_a_file(assets, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--offload-dir": blocker}))
    assert_clean_failure(code, err, "--offload-dir", "not a directory", out_path=out)
    assert blocker.read_text() == ""


def test_max_cpu_memory_without_offload_dir(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--max-cpu-memory": "1MB"}))
    assert_clean_failure(code, err, "--max-cpu-memory needs --offload-dir", out_path=out)


# ------------------------------------------------------------------------------------ recipe
def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


RECIPE_HEAD = "quant_stage:\n  quant_modifiers:\n"


def test_recipe_missing(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": tmp_path / "nope.yaml"}))
    assert_clean_failure(code, err, "nope.yaml", "does not exist", "shipped recipe", out_path=out)


def test_recipe_not_yaml(assets, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, "quant_stage:\n  quant_modifiers: [unclosed\n    QuantizationModifier: {\n")
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": recipe}))
    assert_clean_failure(code, err, "not valid YAML", "line", out_path=out)


def test_recipe_unknown_modifier(assets, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, RECIPE_HEAD + "    GPTQModifer:\n      targets: [Linear]\n      scheme: W4A16\n")
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": recipe}))
    assert_clean_failure(code, err, "unknown Modifier", "GPTQModifer", "Did you mean GPTQModifier", out_path=out)


def test_recipe_unknown_field(assets, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, RECIPE_HEAD + "    QuantizationModifier:\n      targets: [Linear]\n"
                     "      scheme: W8A8\n      ignored: [lm_head]\n")
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": recipe}))
    assert_clean_failure(code, err, "has no field 'ignored'", "Did you mean 'ignore'", out_path=out)


@pytest.mark.parametrize("bits", [1, 16])
def test_recipe_unsupported_weight_bits_names_supported_ones(assets, tmp_path, capsys, bits):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, RECIPE_HEAD + (
        "    QuantizationModifier:\n      ignore: [lm_head]\n      config_groups:\n        group_0:\n"
        "          targets: [Linear]\n          weights:\n"
        f"            num_bits: {bits}\n            type: int\n            symmetric: true\n"
        "            strategy: channel\n"))
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": recipe}))
    assert_clean_failure(code, err, f"{bits}-bit integer weights are not supported", "[2, 3, 4, 5, 6, 7, 8]",
                         out_path=out)


def test_recipe_unsupported_activation_bits(assets, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, RECIPE_HEAD + "    QuantizationModifier:\n      targets: [Linear]\n"
                     "      scheme: W4A4\n")
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": recipe}))
    assert_clean_failure(code, err, "4-bit input activations are not supported", "8-bit activations", out_path=out)


def test_recipe_scheme_that_cannot_be_resolved(assets, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, RECIPE_HEAD + "    GPTQModifier:\n      targets: [Linear]\n      scheme: W5A7_TURBO\n")
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": recipe}))
    assert_clean_failure(code, err, "scheme", "must either be a preset scheme name", out_path=out)


def test_recipe_scheme_the_modifier_cannot_do(assets, tmp_path, capsys):
    """A valid preset that this Modifier cannot run (Q-VLM searches integer ranges; FP8 has none):
    refused with an error naming the Modifier and the fix, nothing written."""
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, RECIPE_HEAD + "    QVLMModifier:\n      targets: [Linear]\n      scheme: FP8\n")
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--recipe": recipe}))
    assert_clean_failure(code, err, "QVLMModifier", out_path=out)


# ------------------------------------------------------------------------------------ data
def test_dataset_missing(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--dataset": tmp_path / "no-data"}))
    assert_clean_failure(code, err, "does not exist", "save_to_disk", out_path=out)


def test_dataset_empty_folder(assets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--dataset": tmp_path / "empty"}))
    assert_clean_failure(code, err, "is empty", "captions.jsonl", out_path=out)


def test_dataset_with_no_rows(assets, tmp_path, capsys):
    import datasets

    datasets.Dataset.from_dict({"image": [], "text": []}).save_to_disk(str(tmp_path / "zero"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--dataset": tmp_path / "zero"}))
    assert_clean_failure(code, err, "no rows", "image-text pairs", out_path=out)


def test_dataset_without_images(assets, tmp_path, capsys):
    import datasets

    datasets.Dataset.from_dict({"text": ["a cat"] * 8}).save_to_disk(str(tmp_path / "text-only"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--dataset": tmp_path / "text-only"}))
    assert_clean_failure(code, err, "no image column 'image'", "--image-column", out_path=out)


def test_image_folder_captions_without_images(assets, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "captions.jsonl").write_text('{"file": "a.png", "text": "a red circle"}\n')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--dataset": folder, "--num-samples": 1}))
    assert_clean_failure(code, err, "no images", "captions file", out_path=out)


def test_corrupt_image_in_saved_dataset_names_the_row(assets, tmp_path, capsys):
    import datasets

    pairs = datasets.load_from_disk(str(assets["pairs"])).cast_column("image", datasets.Image(decode=False))
    rows = pairs.to_dict()
    rows["image"][0] = {"bytes": b"\x89PNG\r\n\x1a\n this is not really a png", "path": "broken.png"}
    datasets.Dataset.from_dict(rows, features=pairs.features).save_to_disk(str(tmp_path / "corrupt"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--dataset": tmp_path / "corrupt",
                                                                "--num-samples": 8}))
    assert_clean_failure(code, err, "Row 0", "broken.png", "cannot be read", "replace it or remove the row",
                         out_path=out)


def test_corrupt_image_in_image_folder(assets, tmp_path, capsys, image_folder):
    folder = image_folder(3)
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:40])  # truncated PNG
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--dataset": folder, "--num-samples": 3}))
    assert_clean_failure(code, err, "1.png", "cannot be read", out_path=out)


def test_fewer_rows_than_num_samples(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--num-samples": 50}))
    assert_clean_failure(code, err, "has 8 rows, fewer than --num-samples 50", "at most 8", out_path=out)


def test_non_positive_num_samples(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(assets, out, **{"--num-samples": 0}))
    assert_clean_failure(code, err, "--num-samples must be positive", out_path=out)


# ------------------------------------------------------------------------------------ output
def test_output_not_empty_without_overwrite_is_left_untouched(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, *quantize_args(assets, out))
    assert_clean_failure(code, err, "not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_output_not_writable(assets, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # parent is a file: cannot be created, even as root
    code, _, err = run_cli(capsys, *quantize_args(assets, out))
    assert_clean_failure(code, err, str(out), "not a directory", "Choose an output directory")
    assert blocker.read_text() == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_in_read_only_directory(assets, tmp_path, capsys):  # pragma: no cover - CI runs as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, *quantize_args(assets, ro / "out"))
        assert_clean_failure(code, err, "not writable", out_path=ro / "out")
    finally:
        ro.chmod(0o755)


def test_unwritable_log_file(assets, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "recipes", "--log-file", blocker / "log.txt")
    assert_clean_failure(code, err, "log file", "writable --log-file")


# ------------------------------------------------------------------------------------ inspect
@pytest.fixture(scope="module")
def checkpoint(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "w8a8"
    assert main([str(a) for a in quantize_args(assets, out)] + ["--quiet"]) == 0
    return out


def test_inspect_truncated_safetensors(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    weights = next(bad.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(capsys, "inspect", bad)
    assert_clean_failure(code, err, weights.name, "truncated", "Re-create the checkpoint")


def test_inspect_corrupt_safetensors_header(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    weights = next(bad.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[8:24] = b"#not a json obj#"
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "inspect", bad)
    assert_clean_failure(code, err, weights.name, "corrupt", "not valid JSON")


def test_inspect_missing_shard(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    weights = next(bad.glob("*.safetensors"))
    header_names = ["a", "b"]
    index = {"metadata": {}, "weight_map": {"a": weights.name, "b": "model-00002-of-00002.safetensors"}}
    assert header_names
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(capsys, "inspect", bad)
    assert_clean_failure(code, err, "incomplete", "model-00002-of-00002.safetensors")


def test_inspect_not_a_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert_clean_failure(code, err, "no config.json")
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing")
    assert_clean_failure(code, err, "does not exist")


# ------------------------------------------------------------------------------------ usage
def test_usage_error_exits_2_with_usage(capsys):
    code, _, err = run_cli(capsys, "quantize", "some-model")
    assert code == 2 and "usage: qvlm quantize" in err and "--recipe" in err


# ------------------------------------------------------------------------------------ kill during save
#: Runs `qvlm ARGV` in a child process with a pause in the save path, so the test can SIGKILL it there.
#: The pause wraps qvlm_modifiers.save._commit (called once the whole checkpoint, processor and run
#: record are in the temporary sibling directory, right before it is renamed onto OUT): it writes that
#: directory's path to MARKER and sleeps. Production code has no hook for this.
_PAUSED_SAVE_DRIVER = """
import sys, time
from pathlib import Path

import qvlm_modifiers.save as save
from qvlm_modifiers.cli import main

marker, argv = Path(sys.argv[1]), sys.argv[2:]
commit = save._commit

def paused_commit(tmp, out):
    marker.with_name(marker.name + ".tmp").write_text(str(tmp))
    marker.with_name(marker.name + ".tmp").replace(marker)  # the test never reads a half-written marker
    time.sleep(120)
    commit(tmp, out)

save._commit = paused_commit
sys.exit(main(argv))
"""


def _quantize_in_subprocess(assets, out: Path, marker: Path, extra=()):
    env = dict(os.environ, TQDM_DISABLE="1")
    cmd = [sys.executable, "-c", _PAUSED_SAVE_DRIVER, str(marker), *map(str, quantize_args(assets, out)), "--quiet",
           *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_at_marker(proc, marker: Path, timeout: float = 150) -> str:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"qvlm exited ({proc.returncode}) before the save hook: {proc.stdout.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("save hook not reached in time")
        time.sleep(0.1)
    partial = Path(marker.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return str(partial)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_sigkill_during_save_leaves_no_output_or_the_previous_checkpoint(assets, checkpoint, tmp_path):
    """A real process is killed in the save path (its temporary directory already holds weights,
    config, processor and run record; the rename onto OUT has not happened). Fresh output: nothing at OUT. --overwrite of a
    complete checkpoint: OUT still holds exactly the previous checkpoint."""
    # fresh output directory
    out = tmp_path / "fresh"
    marker = tmp_path / "marker-fresh"
    proc = _quantize_in_subprocess(assets, out, marker)
    partial = Path(_kill_at_marker(proc, marker))
    assert partial.parent == out.parent and partial.name.startswith(".fresh"), partial
    assert any(partial.glob("*.safetensors")), "the hook must fire after weights were written"
    assert not out.exists()

    # overwrite of a previous complete checkpoint
    out = tmp_path / "previous"
    shutil.copytree(checkpoint, out)
    before = _snapshot(out)
    marker = tmp_path / "marker-overwrite"
    proc = _quantize_in_subprocess(assets, out, marker, extra=["--overwrite", "--seed", "1"])
    partial = Path(_kill_at_marker(proc, marker))
    assert (partial / RUN_RECORD_NAME).is_file()
    assert _snapshot(out) == before
