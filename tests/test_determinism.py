"""One seed drives everything: the same flags and seed give the same evaluations and the same final
agent, in both phases, for each of the six scripts (in one process, one run after the other)."""

from __future__ import annotations

import pytest

from tests.conftest import scores
from tests.test_slurm import SCRIPTS, assert_same_agent, run_main

BOTH_PHASES = ["--offline-steps", "100", "--online-steps", "200", "--eval-every", "100", "--log-every", "100"]
OWN_FLAGS = {
    "rlpd": ["--start-training", "100"],  # online updates after 100 random actions
    "off2on": ["--epoch-steps", "100", "--first-epoch-multiplier", "1", "--offline-eval-every", "50"],
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_same_seed_gives_the_same_run(name, tiny_pointmaze, tmp_path):
    module, tiny = SCRIPTS[name]
    flags = ["--env", tiny_pointmaze, *BOTH_PHASES, *tiny, *OWN_FLAGS.get(name, [])]
    first, second = (run_main(module, flags, tmp_path / folder) for folder in ("first", "second"))
    evaluations = scores(first)
    assert {record["phase"] for record in evaluations} == {"offline", "online"}, evaluations
    assert evaluations == scores(second)
    assert_same_agent(first, second)
