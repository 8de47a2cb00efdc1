"""eval/bench_mbq_calibration.py refuses a --group-size it cannot apply, before any work starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "eval" / "bench_mbq_calibration.py"
_spec = importlib.util.spec_from_file_location("bench_mbq_calibration", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "w4a8", "--group-size", "64"], "group schemes"),
    (["--scheme", "w4", "--group-size", "-8"], "must be positive"),
])
def test_bad_group_size_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
