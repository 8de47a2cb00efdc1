"""eval/bench_heap_setting.py's parent process: it alternates the two settings in fresh child processes
(QVLM_MALLOC_TUNING=0/1, MALLOC_* variables removed), reports the median CPU time of each and their
ratio, and refuses to report when a child did not get the setting it asked for. The children (which
load the default model) are replaced by canned answers here."""

from __future__ import annotations

import json
import subprocess

import pytest

from qvlm_eval import bench_heap_setting as bench


def _fake_children(monkeypatch, cpu_by_setting, applied_by_setting=None):
    calls = []
    applied_by_setting = applied_by_setting or {"0": False, "1": True}

    def run(cmd, capture_output, text, env, check):
        setting = env["QVLM_MALLOC_TUNING"]
        calls.append((setting, dict(env), list(cmd)))
        cpu = cpu_by_setting[setting].pop(0)
        out = json.dumps({"applied": applied_by_setting[setting], "cpu_s": cpu, "wall_s": cpu, "accuracy": 0.5})
        return subprocess.CompletedProcess(cmd, 0, stdout="some log line\n" + out + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", run)
    return calls


def test_medians_and_ratio_from_alternating_fresh_processes(monkeypatch, capsys):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    calls = _fake_children(monkeypatch, {"0": [10.0, 12.0, 11.0], "1": [13.0, 30.0, 14.0]})
    assert bench.main(["--repeats", "3", "--questions", "7"]) == 0
    assert [c[0] for c in calls] == ["0", "1"] * 3  # alternated
    assert all("MALLOC_ARENA_MAX" not in env for _, env, _ in calls)
    assert all(cmd[-3:] == ["--child", "--questions", "7"] for _, _, cmd in calls)
    out = capsys.readouterr().out
    # medians 11 and 14 (the 30 s outlier does not count): 14 / 11
    assert "CPU  11.00 s" in out and "CPU  14.00 s" in out
    assert f"fixed / default CPU time: {14 / 11:.3f}" in out


@pytest.mark.parametrize("applied", [{"0": False, "1": False}, {"0": True, "1": True}])
def test_refuses_when_a_child_did_not_get_its_setting(monkeypatch, capsys, applied):
    _fake_children(monkeypatch, {"0": [1.0], "1": [1.0]}, applied)
    with pytest.raises(SystemExit, match="not applied as requested"):
        bench.main(["--repeats", "1"])
    assert "fixed / default" not in capsys.readouterr().out
