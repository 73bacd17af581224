"""One algorithm file plus common/ is all a project needs: no file under algorithms/ imports
another, and each of the six, copied alone with common/ into an empty folder, trains there."""

import ast
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = ("rlpd", "wsrl", "off2on", "calql", "cql", "iql")

# A few steps of each script on the tiny PointMaze dataset: one offline chunk where the script
# has an offline phase, a few online steps with updates, one evaluation at the end.
SMALL = ["--batch-size", "32", "--eval-episodes", "1", "--progress", "False"]
FLAGS = {
    "rlpd": ["--online-steps", "60", "--start-training", "30", "--utd", "2", "--hidden-dims", "32", "32",
             "--eval-every", "60"],
    "wsrl": ["--offline-steps", "20", "--online-steps", "60", "--warmup-steps", "30", "--actor-hidden-dims", "32",
             "32", "--critic-hidden-dims", "32", "32", "--ensemble-size", "2", "--cql-n-actions", "2",
             "--eval-every", "60"],
    "off2on": ["--offline-steps", "20", "--online-steps", "60", "--epoch-steps", "30", "--first-epoch-multiplier",
               "1", "--ensemble-size", "2", "--actor-hidden-dims", "32", "32", "--critic-hidden-dims", "32", "32",
               "--density-hidden-dims", "32", "32", "--cql-n-actions", "2", "--eval-every", "60"],
    "calql": ["--offline-steps", "20", "--online-steps", "60", "--actor-hidden-dims", "32", "32",
              "--critic-hidden-dims", "32", "32", "--cql-n-actions", "2", "--eval-every", "60", "--log-every", "20"],
    "cql": ["--offline-steps", "20", "--online-steps", "60", "--actor-hidden-dims", "32", "32",
            "--critic-hidden-dims", "32", "32", "--cql-n-actions", "2", "--eval-every", "60", "--log-every", "20"],
    "iql": ["--offline-steps", "20", "--online-steps", "60", "--hidden-dims", "32", "32", "--eval-every", "60",
            "--log-every", "20"],
}


def imported_modules(path) -> set[str]:
    """Every module name an `import` statement of the file names (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" if module else alias.name for alias in node.names)
    return names


def test_no_algorithm_file_imports_another():
    files = sorted((REPO / "algorithms").glob("*.py"))
    siblings = {path.stem for path in files} - {"__init__"}
    assert siblings >= set(SCRIPTS)
    for path in files:
        offending = {name for name in imported_modules(path)
                     if name.split(".")[0] == "algorithms" or name.split(".")[0] in siblings}
        assert not offending, f"{path.name} imports {sorted(offending)}: each algorithm file must stand alone"


def test_the_import_check_sees_every_form_of_import(tmp_path):
    """The check above can fail: each way of importing a sibling is seen."""
    for line in ("import cql", "from algorithms import cql", "from algorithms.cql import train",
                 "import algorithms.cql as c", "def f():\n    from cql import train"):
        path = tmp_path / "example.py"
        path.write_text(line + "\n")
        names = imported_modules(path)
        assert any(name.split(".")[0] in ("cql", "algorithms") for name in names), line


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_file_alone_with_common_trains(name, tiny_pointmaze, tmp_path):
    project = tmp_path / "my_project"
    (project / "algorithms").mkdir(parents=True)
    shutil.copy(REPO / "algorithms" / f"{name}.py", project / "algorithms" / f"{name}.py")
    shutil.copytree(REPO / "common", project / "common", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, f"algorithms/{name}.py", "--env", tiny_pointmaze, *FLAGS[name], *SMALL,
                             "--log-dir", str(tmp_path / "runs")],
                            cwd=project, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Summary:" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "evaluations.jsonl").read_text().strip()
    imported = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, '.'); import algorithms.{name}; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                               "('common', 'algorithms', 'benchmarks', 'tests')))"],
                              cwd=project, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "benchmarks" not in imported.stdout and "'common.run'" in imported.stdout
