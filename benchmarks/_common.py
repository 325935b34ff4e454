"""Shared helpers for the benchmark scripts: machine description and JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """What ran the benchmark: CPU model and core count, and JAX devices if JAX is loaded."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    import sys

    if "jax" in sys.modules:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [str(d) for d in jax.devices()]
    return info


def write_results(name: str, payload: dict, table: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically; return both paths."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine(), **payload}
    out_json, out_md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    m = payload["machine"]
    header = f"Machine: {m['cpu']}, {m['cores']} cores" + (
        f", JAX devices {m['devices']}" if "devices" in m else ""
    )
    for path, text in (
        (out_json, json.dumps(payload, indent=2)),
        (out_md, f"{header}\n\n{table}\n"),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return out_json, out_md
