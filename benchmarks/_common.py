"""Shared helpers of the benchmark studies: where results go, how a study runs itself in a worker
process, and the stamped JSON + markdown writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from madness_ppl.atomic import atomic_write_text
from madness_ppl.machine import describe_machine

#: The repository root (the directory holding the ``benchmarks`` package).
ROOT = Path(__file__).resolve().parent.parent

#: Environment variable naming another results directory (the smoke runs write there, so a
#: smoke run never touches the committed ``benchmarks/results``).
RESULTS_ENV = "MADNESS_BENCH_RESULTS"

#: Where studies write their tables and keep their records.
RESULTS = Path(os.environ.get(RESULTS_ENV) or Path(__file__).parent / "results")


def study_command(study: str, *args: str) -> list[str]:
    """The command that runs ``study`` (a module of this package) with ``args`` in a fresh
    Python process: ``[python, -m, benchmarks.<study>, *args]``; run it with ``cwd=ROOT``
    (:func:`run_study`)."""
    return [sys.executable, "-m", f"benchmarks.{study}", *args]


def run_study(study: str, *args: str) -> None:
    """Run ``study`` with ``args`` in a worker process from the repository root (the results
    directory and every other environment variable are inherited); raise on failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(study_command(study, *args), check=True, env=env, cwd=ROOT)


#: Packages whose versions every results JSON records (those installed).
PACKAGES = ("madness_ppl", "jax", "jaxlib", "numpyro", "dm-haiku", "numpy", "galsim", "scarlet2")


def provenance() -> dict:
    """The code that made a result: git commit (and whether the package or the benchmarks had
    uncommitted changes) and the versions of the packages that matter."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.rstrip()  # porcelain lines start with a status column: keep it

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    # the code only: results written by runs (benchmarks/results) are not code changes
    changed = git(
        "status", "--porcelain", "--", "madness_ppl", "benchmarks", ":!benchmarks/results"
    )
    files = [line[3:] for line in changed.splitlines() if line.strip()]
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
        "uncommitted_changes": bool(files),
        "uncommitted_files": files[:20],
        "packages": versions,
    }


def records_by(path: Path, key: str) -> dict:
    """JSON lines of ``path`` keyed by their field ``key`` (the last record of a key wins; torn
    lines, from a run killed while writing, are skipped); empty when the file is absent."""
    out: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[record[key]] = record
    return out


def records_by_seed(path: Path) -> dict[int, dict]:
    """:func:`records_by` ``seed``."""
    return records_by(path, "seed")


def machine() -> dict:
    """What ran the benchmark (see :func:`madness_ppl.machine.describe_machine`)."""
    return describe_machine()


def machine_of_records(records: Iterable[dict], who: str) -> dict:
    """The machine the fits ran on, from per-run summaries carrying ``cores_used`` and ``cpus``
    (records made before they carried them were fitted on the machine that rebuilds the
    tables); ``who`` names the processes in the taskset note."""
    records = list(records)
    out = {**describe_machine(), "cores": os.cpu_count()}
    cores = {c for e in records for c in e.get("cores_used", [])}
    cpus = {c for e in records for c in e.get("cpus", [])}
    if len(cpus) == 1:
        out["cpu"] = cpus.pop()
    if cores:
        limits = " or ".join(str(c) for c in sorted(cores))
        out["note"] = f"{who} in a process limited to {limits} core(s) by taskset"
    return out


def write_results(
    name: str, payload: dict, table: str, *, machine: dict | None = None
) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically; return both paths.

    Every JSON carries ``provenance`` (:func:`provenance`: commit and package versions) and
    the markdown's header line names the commit. A table rebuilt from stored records names
    the commit that wrote the table; the scripts name the code of the records where it differs.

    ``machine``: the description of the machine that produced the numbers, when the file is
    regenerated from stored results (default: this machine). Its ``note``, if any, is printed
    in the header line of the markdown.
    """
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine or describe_machine(), "provenance": provenance(), **payload}
    out_json, out_md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    m = payload["machine"]
    header = f"Machine: {m['cpu']}, {m['cores']} cores" + (
        f", JAX devices {m['devices']}" if "devices" in m else ""
    )
    if m.get("note"):
        header += f" ({m['note']})"
    made = payload["provenance"]
    header += f"; tables written by code {made['commit']}" + (
        f" with uncommitted changes ({', '.join(made['uncommitted_files'][:5])})"
        if made["uncommitted_changes"]
        else ""
    )
    for path, text in (
        (out_json, json.dumps(payload, indent=2)),
        (out_md, f"{header}\n\n{table}\n"),
    ):
        atomic_write_text(path, text)
    return out_json, out_md
