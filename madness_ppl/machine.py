"""A short description of the machine a measurement ran on (for benchmarks and model cards)."""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["describe_machine"]


def describe_machine() -> dict:
    """CPU model, usable cores, Python version, and JAX version and devices if JAX is loaded.

    >>> sorted(describe_machine())[:2]
    ['cores', 'cpu']
    """
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
    if "jax" in sys.modules:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [str(d) for d in jax.devices()]
    return info
