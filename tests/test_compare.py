"""benchmarks/compare.py without installing or timing anything: the ratio table, the interleaving,
the dry run's commands, the settings both sides get, and the shared timing loop."""

from __future__ import annotations

import dataclasses
import importlib
import json
import time

import pytest

from benchmarks import compare
from benchmarks.offline_speed import parse_overrides
from benchmarks.reference.timing import time_calls


def line(algorithm, side, steps, compile_seconds=1.0):
    return {"algorithm": algorithm, "side": side, "steps_per_second": steps, "compile_seconds": compile_seconds}


def table_row(table: str, algorithm: str) -> list[str]:
    row = next(row for row in table.splitlines() if row.startswith(f"| {algorithm} "))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_ratio_table_reports_median_range_and_ratio_of_medians():
    lines = [line("cql", "theirs", 10.0, 30.0), line("cql", "ours", 40.0, 2.0), line("cql", "theirs", 30.0, 50.0),
             line("cql", "ours", 60.0, 4.0), line("cql", "theirs", 20.0, 40.0), line("cql", "ours", 50.0, 3.0),
             {"algorithm": "cql", "side": "ours", "steps_per_second": None, "error": "boom"}]  # a failed run
    cells = table_row(compare.ratio_table(lines), "cql")
    assert cells[1] == "updates/s"
    assert cells[2] == "20.0 (10.0-30.0), n=3"
    assert cells[3] == "50.0 (40.0-60.0), n=3"  # the failed run is left out
    assert cells[4] == "2.50"
    assert cells[5] == "40.0 / 3.0"


def test_ratio_table_without_one_side_has_no_ratio():
    lines = [line("rlpd", "theirs", 40.0), line("iql", "theirs", 100.0), line("iql", "ours", 300.0)]
    table = compare.ratio_table(lines)
    assert table_row(table, "rlpd")[3:5] == ["n/a", "n/a"]
    assert table_row(table, "iql")[4] == "3.00"
    assert table.index("| rlpd ") < table.index("| iql ")  # in the order measured


def test_schedule_interleaves_sides_and_alternates_their_order():
    order = compare.schedule(4, ("rlpd", "cql"))
    assert len(order) == 4 * 2 * 2
    for round_number in range(1, 5):
        this_round = [(algorithm, side) for r, algorithm, side in order if r == round_number]
        first = "theirs" if round_number % 2 == 1 else "ours"
        second = "ours" if first == "theirs" else "theirs"
        assert this_round == [("rlpd", first), ("rlpd", second), ("cql", first), ("cql", second)]
    assert [r for r, _, _ in order] == sorted(r for r, _, _ in order)  # rounds run one after another


def test_dry_run_prints_setup_and_both_sides_commands_and_runs_nothing(tmp_path, capsys):
    args = compare.CompareArgs(rounds=1, algorithms=("rlpd", "cql"), cache_dir=str(tmp_path / "cache"),
                               dry_run=True, offline_rows=1234)
    assert compare.main(args) == 0
    output = capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # nothing cloned, installed or measured
    jax_version = compare.installed_versions()["jax"]
    assert f"jax=={jax_version}" in output and "tfp-nightly" in output and "distrax" in output
    assert compare.REFERENCES["rlpd"].commit in output and compare.REFERENCES["jax-corl"].commit in output
    commands = [row for row in output.splitlines() if not row.startswith("#")]
    rlpd_theirs = next(row for row in commands if "rlpd_update.py" in row)
    rlpd_ours = next(row for row in commands if "benchmarks/speed.py" in row)
    cql_theirs = next(row for row in commands if "jax_corl_update.py" in row)
    cql_ours = next(row for row in commands if "offline_speed.py" in row)
    assert "venv-rlpd/bin/python" in rlpd_theirs and "venv-jax-corl/bin/python" in cql_theirs
    for command in (rlpd_theirs, rlpd_ours, cql_theirs, cql_ours):
        assert "--offline-rows 1234" in command and "--observation-dim 29" in command
    assert "--utd 20" in rlpd_theirs and "--utd 20" in rlpd_ours
    assert "--algorithm cql" in cql_theirs and "--algorithms cql" in cql_ours
    assert "cql_max_target_backup=False" in cql_theirs and " max_target_backup=False" in cql_ours
    assert "'hidden_dims=(256,256,256)'" in cql_theirs and "'critic_hidden_dims=(256,256,256)'" in cql_ours
    assert not any("iql" in row for row in commands)


def test_cql_switches_reach_both_sides():
    args = compare.CompareArgs(cql_lagrange=True, cql_max_target_backup=True, batch_size=128)
    ours, theirs = compare.matched_pairs("cql", args)
    assert {"cql_lagrange=True", "max_target_backup=True", "batch_size=128", "recipe=jaxcql"} <= set(ours)
    assert {"cql_lagrange=True", "cql_max_target_backup=True", "batch_size=128"} <= set(theirs)
    gap = f"cql_target_action_gap={compare.CQL_TARGET_ACTION_GAP}"
    assert gap in ours and gap in theirs


@pytest.mark.parametrize("algorithm", ["iql", "cql"])
def test_our_matched_settings_are_fields_of_our_scripts(algorithm):
    """A misspelt or mistyped name in MATCHED would make our side run other settings (or fail)."""
    module = importlib.import_module(f"algorithms.{algorithm}")
    ours, _ = compare.matched_pairs(algorithm, compare.CompareArgs())
    overrides = parse_overrides(tuple(ours))
    fields = {field.name for field in dataclasses.fields(module.Args)}
    assert set(overrides) <= fields
    resolved = module.apply_preset(module.Args(**overrides), "antmaze" if algorithm == "iql" else "locomotion")
    for name, value in overrides.items():
        assert getattr(resolved, name) == value  # the preset does not undo a matched setting
    if algorithm == "cql":
        assert resolved.actor_hidden_dims == resolved.critic_hidden_dims == (256, 256, 256)
        assert resolved.bc_steps == 0


def test_results_are_read_from_the_last_json_line_and_normalised():
    output = "Not loading checkpointing functionality.\n{\"ignored\": 1}\n" + json.dumps(
        {"steps_per_second": 12.5, "steps_per_call": 8, "compile_seconds": 3.0, "timed_calls": 9,
         "timed_seconds": 5.8, "device": "cpu", "settings": {"hidden_dims": [256, 256]}})
    fields = compare.normalise("iql", "theirs", compare.last_json_line(output))
    assert fields["steps_per_second"] == 12.5 and fields["steps_per_call"] == 8
    assert fields["reference_config"] == {"hidden_dims": [256, 256]}
    speed = {"critic_steps_per_second": 50.0, "utd": 20, "compile_seconds": 3.0, "timed_calls": 13,
             "timed_seconds": 5.2, "device": "cpu"}
    assert compare.normalise("rlpd", "ours", speed)["steps_per_second"] == 50.0
    with pytest.raises(ValueError):
        compare.last_json_line("no result\n")


def test_time_calls_counts_warmup_apart_and_reaches_the_minimum_time():
    calls = []

    def step(state):
        calls.append(state)
        time.sleep(0.01)
        return state + 1

    state, timed, seconds = time_calls(step, 0, lambda state: state, min_seconds=0.0, min_calls=3)
    assert (state, timed, len(calls)) == (4, 3, 4)  # one warm-up call, then exactly 3 timed
    assert seconds >= 0.03
    calls.clear()
    state, timed, seconds = time_calls(step, 0, lambda state: state, min_seconds=0.1, warmup_calls=2)
    assert seconds >= 0.1 and timed >= 2 and len(calls) == timed + 2  # blocks added until 0.1 s
