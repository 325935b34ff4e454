"""``python -m benchmarks``: list the studies, run one, or smoke-test them all.

* ``python -m benchmarks --list``: every study with its one-line summary;
* ``python -m benchmarks --sets``: the field sets of ``benchmarks/fields.py`` as a table;
* ``python -m benchmarks <study> [arguments]``: run a study (its ``--help`` lists its arguments);
* ``python -m benchmarks --smoke [study ...]``: run each study (default: all) with its ``SMOKE``
  arguments, one tiny field, in a fresh process whose results go to a scratch directory
  (``--keep DIR`` keeps them there, ``--jobs N`` runs N at once); a study fails its smoke run
  when it exits non-zero or writes no stamped results JSON, and its log is printed. The exit code is the number of failed studies (capped at 100).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import RESULTS_ENV, ROOT, study_command

PACKAGE = Path(__file__).parent


@dataclass(frozen=True)
class Study:
    """A study module, read without importing it (``--list`` does not start JAX).

    Attributes
    ----------
    name
        Module name, the study's name on the command line.
    summary
        First line of the module docstring.
    smoke
        The module's ``SMOKE`` runs: a literal list of argument lists, run in order (a study
        that records first and tabulates in a second call has two); ``None`` when it has none.
        A plain list of strings is one run.
    """

    name: str
    summary: str
    smoke: list[list[str]] | None


def _defines_main(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def read_study(path: Path) -> Study | None:
    """The :class:`Study` of module ``path`` (its docstring and literal ``SMOKE`` list); None
    when the module is not a study (it has no ``main``, e.g. ``fields.py``)."""
    tree = ast.parse(path.read_text())
    if not _defines_main(tree):
        return None
    doc = (ast.get_docstring(tree) or "").strip()
    smoke = None
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "SMOKE" for t in targets):
                value = ast.literal_eval(node.value)
                runs = value if value and isinstance(value[0], list | tuple) else [value]
                smoke = [[str(a) for a in run] for run in runs]
    summary = " ".join(doc.split("\n\n")[0].split())
    return Study(path.stem, summary, smoke)


def studies() -> dict[str, Study]:
    """Every study of the package (modules not starting with ``_`` that define ``main``)."""
    paths = sorted(p for p in PACKAGE.glob("*.py") if not p.name.startswith("_"))
    found = {p.stem: read_study(p) for p in paths}
    return {name: study for name, study in found.items() if study is not None}


def _smoke_one(study: Study, out: Path) -> tuple[str, float]:
    """Run ``study``'s smoke runs into ``out`` (output in ``out/smoke.log``); return the table
    cell (``ok`` or why not) and the seconds taken."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, RESULTS_ENV: str(out), "PYTHONUNBUFFERED": "1"}
    t0, code = time.perf_counter(), 0
    with (out / "smoke.log").open("w") as log:
        for run in study.smoke or []:
            cmd = study_command(study.name, *run)
            log.write(f"--- {' '.join(cmd[2:])}\n")
            log.flush()
            code = subprocess.run(
                cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False
            ).returncode
            if code:
                break
    seconds = time.perf_counter() - t0
    stamped = [p for p in out.glob("*.json") if "provenance" in json.loads(p.read_text())]
    if code:
        return f"FAILED (exit {code})", seconds
    return ("ok" if stamped else "FAILED (no stamped results JSON)"), seconds


def smoke(names: list[str], keep: Path | None = None, jobs: int = 1) -> int:
    """Run each study's smoke arguments in a fresh process; print a table; return the failures.

    Each study writes into its own scratch results directory (``keep/<name>`` when ``keep`` is
    given), never into ``benchmarks/results``; ``jobs`` studies run at once. A run passes when
    it exits with 0 and leaves at least one results JSON carrying ``provenance`` (commit and
    package versions); a failed run's log is printed.
    """
    every = studies()
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown studies: {', '.join(unknown)} (see --list)")
    missing = [n for n in names if every[n].smoke is None]
    if missing:
        raise SystemExit(f"studies without SMOKE arguments: {', '.join(missing)}")
    scratch = tempfile.TemporaryDirectory(prefix="madness-bench-smoke-") if keep is None else None
    base = Path(scratch.name) if scratch else keep
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        futures = {n: pool.submit(_smoke_one, every[n], base / n) for n in names}
        results = {}
        for name, future in futures.items():
            results[name] = future.result()
            print(f"smoke {name}: {results[name][0]} ({results[name][1]:.0f} s)", flush=True)
    failed = [n for n, (cell, _) in results.items() if cell != "ok"]
    for name in failed:
        lines = (base / name / "smoke.log").read_text().splitlines()
        print(f"\n===== {name}: last lines of its smoke log =====\n" + "\n".join(lines[-60:]))
    rows = [f"| {n} | {cell} | {sec:.0f} |" for n, (cell, sec) in results.items()]
    print("\n| study | smoke run | seconds |\n|---|---|---|\n" + "\n".join(rows))
    if scratch:
        scratch.cleanup()
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    every = studies()
    if argv and argv[0] in every:  # a study and its own arguments
        return subprocess.run(study_command(argv[0], *argv[1:]), cwd=ROOT, check=False).returncode
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--list", action="store_true", help="list the studies")
    parser.add_argument("--sets", action="store_true", help="table of the field sets")
    parser.add_argument("--smoke", nargs="*", metavar="STUDY", help="smoke-run studies (all)")
    parser.add_argument("--keep", type=Path, help="keep the smoke runs' results in this dir")
    parser.add_argument("--jobs", type=int, default=1, help="smoke runs at once")
    args = parser.parse_args(argv)
    if args.sets:
        from benchmarks.fields import markdown_table

        print(markdown_table())
        return 0
    if args.smoke is not None:
        return min(smoke(args.smoke or list(every), args.keep, args.jobs), 100)
    if args.list or not argv:
        width = max(len(n) for n in every)
        for study in every.values():
            print(f"{study.name:<{width}}  {study.summary}")
        return 0
    parser.error(f"unknown study {argv[0]!r} (see --list)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
