"""eval/bench_memory.py's verdicts on synthetic run records (the benchmark itself is run by hand:
it builds and quantizes models up to 32 layers, too slow for CI)."""

from __future__ import annotations


from qvlm_eval import bench_memory
from qvlm_modifiers.resources import proc_status_kib


def _run(layers, width, working_mib, seconds, series="depth"):
    return {"recipe": "gptq_w4a16", "series": series, "layers": layers, "width": width,
            "weights_bytes": layers * 12 * width * width * 2, "working_bytes": working_mib * 2**20,
            "seconds": seconds, "seconds_per_layer": seconds / layers, "mean_seq_len": 40.0, "num_samples": 8}


def test_flat_memory_and_linear_time_pass():
    runs = [_run(L, 256, 70 + 0.1 * L, 20 + 3 * L) for L in (4, 8, 16, 32)]
    ok, lines = bench_memory.summarize(runs, ["gptq_w4a16"], 8)
    assert ok, lines
    assert "FLAT" in lines[0] and "LINEAR" in lines[1]
    assert "3.00 s/layer" in lines[1] and "20.0 s" in lines[1]  # the exact line through the points


def test_memory_growing_with_depth_fails():
    runs = [_run(L, 256, 10 * L, 20 + 3 * L) for L in (4, 8, 16, 32)]
    ok, lines = bench_memory.summarize(runs, ["gptq_w4a16"], 8)
    assert not ok and "NOT flat" in lines[0]


def test_superlinear_time_fails():
    runs = [_run(L, 256, 70, 0.5 * L * L) for L in (4, 8, 16, 32)]
    ok, lines = bench_memory.summarize(runs, ["gptq_w4a16"], 8)
    assert not ok and "NOT linear" in lines[1]


def test_projection_recovers_a_known_linear_law():
    """Working memory generated as exactly 50 MiB + 1.0 x analytic(W) must be fitted back and
    projected to the analytic value at 7B size."""
    tokens = 8 * 40.0
    runs = []
    for w in (128, 256, 512):
        mem = 50 * 2**20 + bench_memory.analytic_bytes(w, 2 * w, tokens)
        r = _run(2, w, 0, 10.0, series="width")
        r["working_bytes"] = mem
        runs.append(r)
    lines = bench_memory.project(runs, 8, 40.0)
    assert "50.0 MiB + 1.00 x analytic(W)" in lines[0]
    expected_7b = (50 * 2**20 + bench_memory.analytic_bytes(4096, 11008, tokens)) / 2**30
    assert f"{expected_7b:6.2f} GiB" in lines[1]


def test_anonymous_peak_sees_a_transient_allocation():
    """The anonymous-memory peak must catch a 64 MiB tensor that lives only inside the block."""
    import time

    import torch

    with bench_memory._AnonPeak(poll_s=0.001) as peak:  # noqa: SLF001
        base = proc_status_kib("RssAnon") * 1024
        t = torch.ones(16 * 2**20)  # 64 MiB, written (resident)
        deadline = time.monotonic() + 2.0  # the sampling thread may be slow to run on a loaded machine
        while peak.peak - base < 60 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        del t
    assert peak.peak - base >= 60 * 2**20
    assert proc_status_kib("RssAnon") * 1024 < peak.peak  # freed after the block


def test_disk_offload_runs_are_judged_on_peak_rss():
    """With disk offload the model is not resident: the verdict uses the peak RSS itself, which here
    is flat although peak - baseline doubles."""
    runs = []
    for L in (4, 32):
        r = _run(L, 256, 30 if L == 4 else 60, 20 + 3 * L)
        r.update(offload_dir="/tmp/off", peak_rss=600 * 2**20 + r["working_bytes"])
        runs.append(r)
    ok, lines = bench_memory.summarize(runs, ["gptq_w4a16"], 8)
    assert ok and "peak RSS (disk offload) x1.048" in lines[0]


def test_disk_offload_puts_the_weights_on_disk(tmp_path):
    """--disk-offload must measure disk offload: compressed-tensors' auto_offload alone keeps every
    weight in CPU memory when it fits (it did on every machine we ran the bench on), so the bench
    gives it a tiny CPU budget and reports how many tensors went to disk. One real child run on a
    2-layer, width-128 model, in its own process (the bench changes the process-wide heap setting)."""
    import json
    import subprocess
    import sys

    from qvlm_modifiers.testing import zoo

    model_dir, pairs = tmp_path / "model", tmp_path / "pairs"
    subprocess.run([sys.executable, "-m", "qvlm_eval.bench_memory", "--child-build", str(model_dir), "--layers", "2", "--width", "128"],
                   check=True, capture_output=True, timeout=600)
    zoo.sample_pairs(4, seed=0).save_to_disk(str(pairs))
    out = subprocess.run([sys.executable, "-m", "qvlm_eval.bench_memory", "--child-measure", str(model_dir), "--pairs", str(pairs),
                          "--recipe", "gptq_w4a16", "--num-samples", "2", "--offload-dir", str(tmp_path / "off")],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # every decoder Linear weight at least (2 layers x 7) is on disk, not in CPU memory
    assert result["disk_offloaded_tensors"] >= 14
    assert result["offload_dir"] == str(tmp_path / "off")
