"""eval/main_job.py end to end on the tiny Idefics3 zoo model (the default model's run is in eval/README.md)."""

from __future__ import annotations

import json

import pytest



def test_main_job_quantizes_evaluates_and_reloads(saved_vlm, tmp_path, capsys, eval_script):
    main_job = eval_script("main_job")
    rc = main_job.main([
        "--model", str(saved_vlm("idefics3")), "--recipe", "gptq_w4a16",
        "--output-dir", str(tmp_path / "q"), "--results-dir", str(tmp_path / "results"),
        "--vqa-questions", "4", "--kl-rows", "2", "--kl-caption-rows", "2", "--calib-samples", "4",
        "--calib-caption-fraction", "0.5", "--ppl-tokens", "128",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reload check passed" in out and "Q4_1 GGUF" in out
    record = json.loads((tmp_path / "results" / "main_job_gptq_w4a16.json").read_text())
    q, fp = record["quantized"], record["fp"]
    assert q["reload"]["load_problems"] == {} and q["reload"]["max_abs_logit_diff"] <= 1e-3
    assert q["vqa"]["n"] == fp["vqa"]["n"] == 4
    assert q["kl"]["tokens"] > 0 and q["kl"]["kl_mean"] >= 0
    # the KL covers both kinds of assistant turn, each reported, and per row for paired comparisons
    kinds = q["kl"]["by_kind"]
    assert set(kinds) == {"answer", "caption"} and kinds["caption"]["rows"] == kinds["answer"]["rows"] == 2
    assert kinds["caption"]["tokens"] >= 2 * 15  # captions are caption-length, not one word
    assert kinds["caption"]["tokens"] + kinds["answer"]["tokens"] == q["kl"]["tokens"]
    assert q["kl_row_kinds"] == ["answer", "answer", "caption", "caption"]
    assert sum(q["kl_tokens_per_row"]) == q["kl"]["tokens"]
    per_row_total = sum(m * n for m, n in zip(q["kl_per_row"], q["kl_tokens_per_row"]))
    assert per_row_total / q["kl"]["tokens"] == pytest.approx(q["kl"]["kl_mean"], rel=1e-5)
    assert len(q["vqa"]["hits"]) == 4 and set(q["vqa"]["hits"]) <= {0, 1}
    assert sum(q["vqa"]["hits"]) / 4 == pytest.approx(q["vqa"]["accuracy"])
    assert "of which caption tokens" in out
    assert q["calibration"]["wall_s"] > 0 and q["calibration"]["peak_rss_bytes"] > 0
    # int4 packing shrinks the decoder weights: the quantized checkpoint is smaller
    assert q["size_bytes"] < fp["size_bytes"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_config" in config


def test_main_job_reports_an_unknown_recipe_clearly(saved_vlm, tmp_path, capsys, eval_script):
    main_job = eval_script("main_job")
    rc = main_job.main(["--model", str(saved_vlm("idefics3")), "--recipe", "no_such_recipe",
                        "--output-dir", str(tmp_path / "q"), "--results-dir", str(tmp_path / "r")])
    assert rc != 0
    assert "no_such_recipe" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_default_model_folders_follow_the_default_test_bed(eval_script):
    """The scripts' default model folder is the default test bed's (a stale literal would quietly
    benchmark the archived v1 model)."""
    from qvlm_eval import default_model as dm

    expected = dm.MODELS_DIR / dm.testbed().model_name
    assert eval_script("main_job").DEFAULT_MODEL_DIR == expected
    assert eval_script("sweep_vision_opt").DEFAULT_MODEL_DIR == expected


def test_device_option_resolves_or_names_the_fix(eval_script):
    import torch

    from qvlm_modifiers.errors import QVLMError

    main_job = eval_script("main_job")
    assert main_job.resolve_device("cpu") == torch.device("cpu")
    assert main_job.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(QVLMError, match="only cpu and cuda"):
        main_job.resolve_device("meta")
    with pytest.raises(QVLMError, match="not a device"):
        main_job.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(QVLMError, match="sees no CUDA device; pass --device cpu"):
            main_job.resolve_device("cuda")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_main_job_on_cuda_without_a_gpu_fails_before_writing(saved_vlm, tmp_path, capsys, eval_script):
    main_job = eval_script("main_job")
    rc = main_job.main(["--model", str(saved_vlm("idefics3")), "--recipe", "gptq_w4a16", "--device", "cuda",
                        "--output-dir", str(tmp_path / "q"), "--results-dir", str(tmp_path / "r")])
    assert rc != 0
    assert "--device cuda" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


def test_fp_cache_key_separates_devices_and_keeps_cpu_keys(eval_script, saved_vlm):
    import argparse
    from pathlib import Path

    main_job = eval_script("main_job")
    args = argparse.Namespace(vqa_questions=4, kl_rows=2, ppl_tokens=128, batch_size=16, seed=0, kl_caption_rows=0,
                              device="cpu")
    model = Path(saved_vlm("idefics3"))
    cpu = main_job.fp_cache_key(model, args)
    assert main_job.fp_cache_key(model, argparse.Namespace(**{**vars(args), "device": "cuda"})) != cpu


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (the lent-device script runs it)")
def test_main_job_runs_on_cuda(saved_vlm, tmp_path, capsys, eval_script):
    """The GPU path end to end: calibration, evaluation and the packed reload on the GPU."""
    main_job = eval_script("main_job")
    rc = main_job.main([
        "--model", str(saved_vlm("idefics3")), "--recipe", "gptq_w4a16", "--device", "cuda",
        "--output-dir", str(tmp_path / "q"), "--results-dir", str(tmp_path / "results"),
        "--vqa-questions", "4", "--kl-rows", "2", "--kl-caption-rows", "2", "--calib-samples", "4",
        "--calib-caption-fraction", "0.5", "--ppl-tokens", "128",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    record = json.loads((tmp_path / "results" / "main_job_gptq_w4a16.json").read_text())
    assert record["args"]["device"] == "cuda"
    assert record["quantized"]["reload"]["max_abs_logit_diff"] <= 1e-3
    assert record["quantized"]["calibration"]["cuda_max_allocated_bytes"] > 0
