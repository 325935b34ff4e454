"""The benchmark suite's harness (``python -m benchmarks``): every study is listed, runnable with
its own arguments and has a smoke run. The smoke runs themselves (which also import every
study as a package module) are a CI step of their own (``.ci/run``), not part of this suite."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
#: modules of the package that are not studies (no ``main``); every other one must be a study
HELPERS = {"fields.py"}
STUDY_FILES = sorted(
    p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.name not in HELPERS
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_list_names_every_study_without_starting_jax():
    code = (
        "import sys, runpy; sys.argv = ['benchmarks', '--list'];\n"
        "try:\n    runpy.run_module('benchmarks', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'jax' not in sys.modules, 'listing imported jax'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()}
    assert set(listed) == {p.stem for p in STUDY_FILES}
    assert all(len(summary) > 20 for summary in listed.values())


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_every_study_has_main_taking_argv_and_a_smoke_run(path):
    tree = ast.parse(path.read_text())
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and mains[0].args.args and mains[0].args.args[0].arg == "argv"
    smoke = [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "SMOKE" for t in n.targets)
    ]
    assert smoke, f"{path.name} has no SMOKE arguments"
    runs = ast.literal_eval(smoke[0].value)
    runs = runs if isinstance(runs[0], list) else [runs]
    assert all(run and all(isinstance(a, str) for a in run) for run in runs)
    # no script puts its own folder on sys.path: the studies are a package
    assert "sys.path.insert" not in path.read_text()


def test_a_study_runs_with_its_own_arguments():
    out = _run("sky", "--help")
    assert out.returncode == 0, out.stderr
    assert "--fields" in out.stdout and "--offsets" in out.stdout


def test_unknown_studies_are_refused_by_name():
    out = _run("no_such_study")
    assert out.returncode == 2 and "no_such_study" in out.stderr
    out = _run("--smoke", "sky", "no_such_study")
    assert out.returncode != 0 and "unknown studies: no_such_study" in out.stderr


def test_results_directory_follows_the_environment(tmp_path):
    code = "from benchmarks._common import RESULTS; print(RESULTS)"
    env = {"MADNESS_BENCH_RESULTS": str(tmp_path), "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == str(tmp_path), out.stderr


def test_benchmarks_readme_gives_one_command_per_study():
    readme = (BENCHMARKS / "README.md").read_text()
    for path in STUDY_FILES:
        assert f"| `{path.stem}` |" in readme, f"no row for {path.stem}"
        assert f"python -m benchmarks {path.stem}" in readme, f"no command for {path.stem}"
    assert "python benchmarks/" not in readme
