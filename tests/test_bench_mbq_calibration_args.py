"""eval/bench_mbq_calibration.py refuses a --group-size it cannot apply, before any work starts."""

from __future__ import annotations


import pytest

from qvlm_eval import bench_mbq_calibration as bench


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "w4a8", "--group-size", "64"], "group schemes"),
    (["--scheme", "w4", "--group-size", "-8"], "must be positive"),
])
def test_bad_group_size_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
