"""Our save path and the oneshot wrapper: output-dir checks before calibration, atomic save,
the config fix, the llm-compressor hook and the wrapper's argument handling."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import qvlm_modifiers
from qvlm_modifiers import data, save, upstream
from qvlm_modifiers.testing import zoo
from qvlm_modifiers.errors import OutputDirError, RecipeError


def _quantized_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")]


def _rtn_quantized_llava():
    model, processor = zoo.build("llava")
    qvlm_modifiers.oneshot(model=model, processor=processor, recipe="rtn_w4a16")
    return model, processor


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# ---------------------------------------------------------------------------- output directory
def test_nonempty_output_dir_raises_before_calibration(tmp_path, calib_pairs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    model, processor = zoo.build("llava")
    ds = data.build_calibration_dataset(calib_pairs, processor, model, num_samples=2)
    with pytest.raises(OutputDirError) as err:
        qvlm_modifiers.oneshot(model=model, processor=processor, dataset=ds, recipe="gptq_w4a16", output_dir=out)
    message = str(err.value)
    assert str(out) in message and "not empty" in message and "overwrite=True" in message
    assert not _quantized_modules(model), "calibration started before the output-dir check"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        save.check_output_dir(target)


def _unwritable_dir(tmp_path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        fd, probe = tempfile.mkstemp(dir=locked)
    except OSError:
        return locked
    os.close(fd)
    os.unlink(probe)  # root ignores permission bits: use a read-only filesystem instead
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable directory available on this machine")


def test_unwritable_output_dir_raises_before_calibration(tmp_path):
    parent = _unwritable_dir(tmp_path)
    out = parent / "qvlm-out"
    model, processor = zoo.build("llava")
    with pytest.raises(OutputDirError) as err:
        qvlm_modifiers.oneshot(model=model, processor=processor, recipe="rtn_w4a16", output_dir=out)
    assert str(out) in str(err.value) and "not writable" in str(err.value)
    assert not _quantized_modules(model)
    (tmp_path / "locked").chmod(0o755)


def test_empty_existing_dir_is_accepted_and_overwrite_replaces(tmp_path):
    model, processor = _rtn_quantized_llava()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save.save_pretrained(model, processor, empty) == empty.absolute()
    assert (empty / "config.json").is_file()

    old = tmp_path / "old"
    old.mkdir()
    (old / "stale.bin").write_text("stale")
    with pytest.raises(OutputDirError):
        save.save_pretrained(model, processor, old)
    save.save_pretrained(model, processor, old, overwrite=True)
    assert not (old / "stale.bin").exists() and (old / "config.json").is_file()
    assert _siblings(old) == ["empty"]  # no temporary or backup directories left


# ---------------------------------------------------------------------------- atomic save
class _Boom(RuntimeError):
    pass


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    model, processor = _rtn_quantized_llava()
    out = tmp_path / "out"
    written = {}

    def fail_after_model_written(save_directory, *args, **kwargs):
        written["files"] = sorted(os.listdir(save_directory))  # the model is on disk by now
        raise _Boom("disk full")

    monkeypatch.setattr(processor, "save_pretrained", fail_after_model_written)
    with pytest.raises(_Boom):
        save.save_pretrained(model, processor, out)
    assert "config.json" in written["files"] and any(f.endswith(".safetensors") for f in written["files"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "a partial directory was left behind"


def test_failure_during_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    model, processor = _rtn_quantized_llava()
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("previous run")

    def boom(*args, **kwargs):
        raise _Boom("killed while fixing the config")

    monkeypatch.setattr(save, "fix_saved_config", boom)
    with pytest.raises(_Boom):
        save.save_pretrained(model, processor, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------- the config fix
def test_ignore_lists_in_memory_and_on_disk_names(tmp_path):
    model, processor = _rtn_quantized_llava()
    out = save.save_pretrained(model, processor, tmp_path / "out")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    # on-disk names compressed-tensors writes (what vLLM maps) ...
    assert "multi_modal_projector.linear_1" in ignore and "language_model.lm_head" in ignore
    # ... and the in-memory names transformers matches
    assert "model.multi_modal_projector.linear_1" in ignore and "lm_head" in ignore
    vision_linears = [
        n for n, m in model.named_modules() if n.startswith("model.vision_tower.") and isinstance(m, torch.nn.Linear)
    ]
    assert vision_linears and set(vision_linears) <= set(ignore)
    assert len(ignore) == len(set(ignore))
    # no decoder layer is ignored
    assert not any(".layers." in n and "vision" not in n for n in ignore)
    # idempotent
    assert save.fix_saved_config(out, model) is False


def test_hook_is_idempotent_and_per_instance():
    import llmcompressor.entrypoints.utils as lc_entry_utils
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    hooked = lc_entry_utils.modify_save_pretrained
    assert getattr(hooked, "_qvlm_hook", False)
    upstream.install_oneshot_save_hook()
    assert lc_entry_utils.modify_save_pretrained is hooked

    model, _ = zoo.build("llava")
    other, _ = zoo.build("llava")
    hooked(model)
    first = model.save_pretrained
    hooked(model)
    upstream.wrap_model_save(model)
    assert model.save_pretrained is first and first._qvlm_config_fix
    assert "save_pretrained" not in vars(other)  # other instances untouched
    modify_save_pretrained(other)  # llm-compressor's own wrapper elsewhere stays as is
    assert not getattr(other.save_pretrained, "_qvlm_config_fix", False)


# ---------------------------------------------------------------------------- wrapper arguments
def _captured_oneshot_kwargs(monkeypatch, **wrapper_kwargs) -> dict:
    import llmcompressor

    captured = {}

    def fake_oneshot(**kwargs):
        captured.update(kwargs)
        from transformers import AutoConfig

        AutoConfig.from_pretrained(kwargs["model"].config._name_or_path)  # what llm-compressor does
        return kwargs["model"]

    monkeypatch.setattr(llmcompressor, "oneshot", fake_oneshot)
    qvlm_modifiers.oneshot(**wrapper_kwargs)
    return captured


@pytest.mark.parametrize(
    "family,layer_class", [("qwen2_vl", "Qwen2VLDecoderLayer"), ("idefics3", "LlamaDecoderLayer")]
)
def test_wrapper_fills_sequential_targets_for_calibrating_recipes(monkeypatch, calib_pairs, family, layer_class):
    model, processor = zoo.build(family)
    ds = data.build_calibration_dataset(calib_pairs, processor, model, num_samples=2)
    kwargs = _captured_oneshot_kwargs(
        monkeypatch, model=model, processor=processor, dataset=ds, recipe="gptq_w4a16"
    )
    assert kwargs["sequential_targets"] == [layer_class]
    assert kwargs["processor"] is processor
    assert kwargs["data_collator"] is data.collate_fn
    assert kwargs["output_dir"] is None  # saving goes through our path
    assert model.config._name_or_path == ""  # the temporary config dir is gone again

    kwargs = _captured_oneshot_kwargs(monkeypatch, model=model, processor=processor, recipe="rtn_w4a16")
    assert kwargs["sequential_targets"] is None  # datafree recipe: nothing to split
    kwargs = _captured_oneshot_kwargs(
        monkeypatch, model=model, processor=processor, dataset=ds, recipe="gptq_w4a16",
        sequential_targets=["MyLayer"],
    )
    assert kwargs["sequential_targets"] == ["MyLayer"]


def test_wrapper_validates_recipe_before_calibration(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant_stage:\n  quant_modifiers:\n    NoSuchModifier: {}\n")
    model, processor = zoo.build("llava")
    with pytest.raises(RecipeError, match="NoSuchModifier"):
        qvlm_modifiers.oneshot(model=model, processor=processor, recipe=bad, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _quantized_modules(model)


def test_wrapper_loads_model_path_and_saves(saved_vlm, tmp_path):
    out = tmp_path / "out"
    model = qvlm_modifiers.oneshot(model=str(saved_vlm("gemma3")), recipe="w8a8", output_dir=out)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert (out / "config.json").is_file()
    assert any((out / n).exists() for n in ("processor_config.json", "preprocessor_config.json"))


def test_wrapper_needs_processor_for_calibration(calib_pairs, saved_vlm, monkeypatch):
    from qvlm_modifiers.errors import CalibrationDataError

    model, processor = zoo.build("llava")  # never saved: no processor to load
    ds = data.build_calibration_dataset(calib_pairs, processor, model, num_samples=2)
    with pytest.raises(CalibrationDataError, match="processor="):
        qvlm_modifiers.oneshot(model=model, dataset=ds, recipe="gptq_w4a16")
    assert not _quantized_modules(model)

    from transformers import AutoModelForImageTextToText

    saved = AutoModelForImageTextToText.from_pretrained(saved_vlm("llava"))
    kwargs = _captured_oneshot_kwargs(monkeypatch, model=saved, dataset=ds, recipe="gptq_w4a16")
    assert kwargs["processor"] is not None  # loaded from the model's directory
