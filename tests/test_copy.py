"""An algorithm file plus common/ is all a project needs: copied alone, iql.py trains."""

import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_iql_and_common_alone_make_a_working_copy(tiny_pointmaze, tmp_path):
    project = tmp_path / "my_project"
    (project / "algorithms").mkdir(parents=True)
    shutil.copy(REPO / "algorithms" / "iql.py", project / "algorithms" / "iql.py")
    shutil.copytree(REPO / "common", project / "common", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "algorithms/iql.py", "--env", tiny_pointmaze, "--offline-steps", "100", "--online-steps",
         "50", "--eval-every", "50", "--eval-episodes", "2", "--hidden-dims", "32", "32", "--batch-size", "32",
         "--progress", "False", "--log-dir", str(tmp_path / "runs")],
        cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Summary:" in result.stdout and "150 steps" in result.stdout
    imported = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import algorithms.iql; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                               "('common', 'algorithms', 'benchmarks', 'tests')))"],
                              cwd=project, capture_output=True, text=True, timeout=120)
    assert "benchmarks" not in imported.stdout and "'common.run'" in imported.stdout
