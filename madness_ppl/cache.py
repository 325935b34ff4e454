"""Persistent compilation cache: compiled fit programs are reused by later processes.

Every new ``madness-ppl`` process would otherwise compile the MAP programs of each source-count
bucket again (several seconds each on a CPU). JAX can store compiled XLA executables on disk
and load them in a later process whose program is identical (same JAX/XLA version, shapes,
options and device); :func:`use_compilation_cache` switches that on for this process and the
worker processes it starts.

Where: ``$MADNESS_PPL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/madness_ppl/jax`` (default
``~/.cache/madness_ppl/jax``). Off switch: ``MADNESS_PPL_NO_COMPILE_CACHE=1`` or
``madness-ppl --no-compile-cache ...``. The cache holds only files JAX writes (one per
program, written to a temporary name and renamed); removing the directory is always safe.

The programs do not depend on Python's string-hash seed (``PYTHONHASHSEED``), so a process
finds what any earlier one stored (until 7 Dec 2026 the L-BFGS step lowered to one of two
variants: numpyro's ``Trace_ELBO`` summed its sites in ``set`` order).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["CACHE_DIR_ENV", "NO_CACHE_ENV", "default_cache_dir", "use_compilation_cache"]

CACHE_DIR_ENV = "MADNESS_PPL_CACHE_DIR"
NO_CACHE_ENV = "MADNESS_PPL_NO_COMPILE_CACHE"

#: Programs that compile faster than this are not worth a disk entry (JAX's default is 1 s,
#: which would leave out the per-step programs of small buckets that are compiled most often).
MIN_COMPILE_SECONDS = 0.2


def default_cache_dir() -> Path:
    """``$MADNESS_PPL_CACHE_DIR``, else ``$XDG_CACHE_HOME/madness_ppl/jax`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "madness_ppl" / "jax"


def use_compilation_cache(
    path: str | os.PathLike | None = None, *, min_compile_seconds: float = MIN_COMPILE_SECONDS
) -> Path | None:
    """Store and reuse compiled programs in ``path`` (default :func:`default_cache_dir`).

    Sets JAX's ``jax_compilation_cache_dir`` (and a compile-time threshold) through the environment, so processes started afterwards
    (dask workers) use the same cache, and through ``jax.config`` when JAX is already imported.

    Parameters
    ----------
    path
        Cache directory; created if missing.
    min_compile_seconds
        Programs that compile faster are not stored.

    Returns
    -------
    pathlib.Path or None
        The directory in use, or ``None`` when ``MADNESS_PPL_NO_COMPILE_CACHE`` is set (or the
        directory cannot be created: the cache is an optimisation, never a reason to fail).
    """
    if os.environ.get(NO_CACHE_ENV, "").strip() not in ("", "0"):
        return None
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    settings = {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": float(min_compile_seconds),
    }
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
    return directory
