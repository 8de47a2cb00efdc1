"""eval/bench_recipe_cost.py refuses what it cannot measure before any work starts (its measurement runs
are recorded in eval/results/, not in CI)."""

from __future__ import annotations

import pytest

from qvlm_eval import bench_recipe_cost as bench


def test_recipes_resolve_from_the_three_places(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("quant_stage: {}\n")
    assert bench.resolve(str(own)) == own
    assert bench.resolve("gptq_w4a16_g64").name == "gptq_w4a16_g64.yaml"   # eval/recipes
    assert bench.resolve("qvlm_w4").name == "qvlm_w4.yaml"                 # shipped
    with pytest.raises(SystemExit, match="not a YAML file"):
        bench.resolve("no_such_recipe")


@pytest.mark.parametrize("argv, message", [
    (["qvlm_w4"], "baseline recipe and at least one"),
    (["gptq_w4a16_g64", "qvlm_w4", "--samples", "0"], "must be positive"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_child_command_parses_as_a_child(tmp_path):
    """The parent spawns this script with --child and no positional recipes (the first v2 run failed
    there with 'recipes are required'); its command line must parse back to the same settings."""
    parent = bench.build_parser().parse_args(["gptq_w4a16_g64", "qvlm_w4", "--model", "m", "--samples", "8",
                                              "--group-size", "64"])
    cmd = bench.child_command(tmp_path / "qvlm_w4.yaml", parent, tmp_path / "out.json")
    child = bench.build_parser().parse_args(cmd[2:])
    assert child.child == str(tmp_path / "qvlm_w4.yaml") and child.recipes == []
    assert (child.model, child.samples, child.group_size, child.child_out) == ("m", 8, 64, str(tmp_path / "out.json"))
    assert child.malloc_tuning is False
    tuned = bench.build_parser().parse_args(["gptq_w4a16_g64", "qvlm_w4", "--model", "m", "--malloc-tuning"])
    assert bench.build_parser().parse_args(bench.child_command(tmp_path / "x.yaml", tuned, tmp_path / "o.json")[2:]).malloc_tuning
