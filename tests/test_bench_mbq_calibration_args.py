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


def test_mbq_set_fields_reach_the_modifier():
    """--mbq-set KEY=VALUE sets MBQModifier fields on the MBQ side (so the cost of the shipped form,
    e.g. with clip search, is what gets measured); a malformed pair is refused with the expected form."""
    from qvlm_modifiers.mbq.modifier import MBQModifier

    fields = bench.mbq_overrides(["clip_search=true", "duo_scaling = false", "clip_grid=10"])
    assert fields == {"clip_search": True, "duo_scaling": False, "clip_grid": 10}
    modifier = MBQModifier(**fields)
    assert modifier.clip_search is True and modifier.clip_grid == 10
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.mbq_overrides(["clip_search"])
