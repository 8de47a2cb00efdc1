"""eval/cost_bench.py: the measurement both calibration-cost benchmarks rely on."""

from __future__ import annotations

import json
import sys

import pytest

from qvlm_eval import cost_bench
from qvlm_modifiers.resources import reset_peak_rss


def test_measure_sees_time_and_a_peak_above_the_baseline():
    import numpy as np

    with cost_bench.measure() as result:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched, freed before the block ends
        total = float(block.sum())
        del block
    assert total == 64 * 2**20 // 8
    assert result["seconds"] > 0 and result["cpu_seconds"] > 0
    assert result["device"] == "cpu"
    if reset_peak_rss():  # the kernel lets the high-water mark be reset (Linux)
        # the freed 64 MiB still count in the peak; allow 8 MiB for allocator rounding
        assert result["peak_rss_delta_mib"] >= 56
        assert result["peak_rss_total_mib"] >= result["peak_rss_delta_mib"]
    else:
        assert result["peak_rss_delta_mib"] is None


def test_summarize_takes_medians_and_the_largest_peak():
    runs = [
        {"seconds": 3.0, "cpu_seconds": 5.0, "peak_rss_delta_mib": 10.0, "device": "cpu"},
        {"seconds": 1.0, "cpu_seconds": 2.0, "peak_rss_delta_mib": None, "device": "cpu"},
        {"seconds": 2.0, "cpu_seconds": 9.0, "peak_rss_delta_mib": 30.0, "device": "cpu"},
    ]
    s = cost_bench.summarize(runs)
    assert (s["seconds_median"], s["cpu_seconds_median"]) == (2.0, 5.0)
    assert s["peak_rss_delta_mib"] == 30.0 and s["peak_gpu_delta_mib"] is None
    assert s["seconds_all"] == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="no runs"):
        cost_bench.summarize([])


def test_ratio_is_none_when_a_side_is_unknown():
    assert cost_bench.ratio(3.0, 2.0) == 1.5
    assert cost_bench.ratio(None, 2.0) is None and cost_bench.ratio(1.0, None) is None
    assert cost_bench.ratio(1.0, 0) is None


def test_spawn_returns_the_childs_json_and_names_a_failed_child(tmp_path, capsys):
    out = tmp_path / "m.json"
    code = f"import json; open({str(out)!r}, 'w').write(json.dumps({{'seconds': 1.5}}))"
    assert cost_bench.spawn([sys.executable, "-c", code], out, "ok") == {"seconds": 1.5}
    with pytest.raises(SystemExit, match="awq: calibration failed"):
        cost_bench.spawn([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "x.json", "awq")
    assert "boom" in capsys.readouterr().err
    json.loads(out.read_text())


def test_page_in_reads_in_place_or_copies_to_fresh_storage():
    import torch

    from qvlm_eval import cost_bench

    layer = torch.nn.Linear(8, 4)
    before = layer.weight.data_ptr()
    cost_bench.page_in(layer.parameters())
    assert layer.weight.data_ptr() == before  # read once, storage kept
    values = layer.weight.detach().clone()
    cost_bench.page_in(layer.parameters(), copy=True)
    assert layer.weight.data_ptr() != before and torch.equal(layer.weight, values)
    assert isinstance(layer.weight, torch.nn.Parameter)
