"""Atomic file writers: write to a temporary name in the same directory, then ``os.replace``.

A reader (or a run killed half-way) therefore sees either the previous file or the complete new
one, never a partial file; the temporary file is removed on any error, Ctrl-C included.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["atomic_savez", "atomic_write_text"]


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``numpy.savez`` the arrays to ``path`` atomically; return the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
