"""Atomic file writers: write to a temporary name in the same directory, then ``os.replace``.

A reader (or a run killed half-way) therefore sees either the previous file or the complete new
one, never a partial file; the temporary file is removed on any error, Ctrl-C included.

Output *directories* get the same treatment: :func:`new_output_dir` makes a fresh directory
beside the destination (with the :data:`OUTPUT_MARKER` file), :func:`swap_into_place` moves it
in, and :func:`check_output_dir` refuses to replace anything this program did not write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from madness_ppl.errors import MadnessInputError, OutputDirectoryError

__all__ = [
    "OUTPUT_MARKER",
    "atomic_savez",
    "atomic_write",
    "atomic_write_text",
    "check_output_dir",
    "check_output_path",
    "in_critical_section",
    "new_output_dir",
    "read_json",
    "remove_pending",
    "swap_into_place",
]


#: Temporary files and directories being written now; :func:`remove_pending` deletes them (the
#: command line's Ctrl-C handler calls it before it ends the process).
_PENDING: set[Path] = set()
_CRITICAL = [0]


def remove_pending() -> None:
    """Delete every temporary file or directory still being written (on Ctrl-C)."""
    for path in list(_PENDING):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        _PENDING.discard(path)


def in_critical_section() -> bool:
    """``True`` while :func:`swap_into_place` renames directories (do not stop the process)."""
    return _CRITICAL[0] > 0


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Path], Any],
    *,
    tmp: str | os.PathLike | None = None,
) -> Path:
    """Call ``write(tmp)``, then rename ``tmp`` to ``path``; return the path.

    ``tmp`` (default ``<path>.tmp``, in the same directory so the rename is atomic) is
    removed on any error, Ctrl-C included (:func:`remove_pending`). Give ``tmp`` when the
    writer infers the format from the file name (e.g. ``figure.tmp.png``).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp") if tmp is None else Path(tmp)
    _PENDING.add(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _PENDING.discard(tmp)
    return path


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``numpy.savez`` the arrays to ``path`` atomically; return the path."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: savez adds no ".npz" to the name
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def read_json(path: str | os.PathLike) -> Any:
    """``json.loads`` of a file, raising :class:`~madness_ppl.errors.MadnessInputError` naming
    the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MadnessInputError(
            f"{path} is not valid JSON ({err}); it is damaged: delete it or use a new directory",
            str(path),
        ) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


#: Marker file written into every output directory madness_ppl creates. Only a directory that
#: holds it (and nothing but the files the program writes) is ever replaced.
OUTPUT_MARKER = ".madness-ppl-output"


def check_output_path(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output directory",
) -> Path:
    """Raise :class:`~madness_ppl.errors.OutputDirectoryError` if ``out`` (or a parent) is a file,
    if the directory that would hold it is not writable (checked before any work), or if
    ``out`` is, or contains, one of ``inputs``; return ``out`` as a Path."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"is under the file {parent}"
            raise OutputDirectoryError(f"{what} {out} {where}; choose a directory", str(out))
    existing = next((d for d in [out.parent, *out.parent.parents] if d.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirectoryError(
            f"{what} {out} cannot be written: {existing} is not writable; choose another",
            str(out),
        )
    resolved = out.resolve()
    for item in inputs:
        item = Path(item).resolve()
        if item == resolved or resolved in item.parents:
            raise OutputDirectoryError(
                f"{what} {out} contains the input {item}; choose another directory", str(item)
            )
    return out


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    known: Iterable[str] = (),
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output directory",
    signature: str = "catalog.fits",
) -> Path:
    """Check that ``out`` may be written (and, if it exists, replaced); return it as a Path.

    Raises :class:`~madness_ppl.errors.OutputDirectoryError` when ``out`` (or a parent) is a
    file, when it contains or is one of ``inputs``, or when it exists and holds anything this
    program did not write (files outside ``known``, or neither :data:`OUTPUT_MARKER` nor the
    ``signature`` file of outputs written before the marker existed), and
    ``FileExistsError`` when it exists and ``overwrite`` is false.
    """
    out = check_output_path(out, inputs=inputs, what=what)
    if not out.exists():
        return out
    if not overwrite:
        raise FileExistsError(f"{what} {out} exists; pass --overwrite to replace it")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return out
    foreign = sorted(entries - set(known))
    if foreign or not ({OUTPUT_MARKER, signature} & entries):
        detail = f"it holds {foreign[:5]}" if foreign else f"it has no {OUTPUT_MARKER} marker"
        raise OutputDirectoryError(
            f"refusing to replace {out}: it was not written by madness-ppl ({detail}); "
            "choose a new output directory",
            str(out),
        )
    return out


def new_output_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` (same file system) holding the marker file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    _PENDING.add(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the output private
    (tmp / OUTPUT_MARKER).write_text("written by madness-ppl; safe to replace with --overwrite\n")
    return tmp


def swap_into_place(tmp: Path, out: Path, *, replace: bool = True) -> Path:
    """Move the finished directory ``tmp`` to ``out``, replacing an existing ``out``.

    The previous ``out`` is first renamed to a unique hidden name (so a stale ``<out>.old`` or
    any other leftover never blocks the swap), then ``tmp`` takes its place, then the previous
    one is deleted. If the second rename fails the previous ``out`` is put back.

    With ``replace=False`` (no ``--overwrite``) the move is a single ``rename``, which the
    kernel refuses when ``out`` is a non-empty directory: a run that finished ``out`` after
    this one checked it is never replaced (the check and the move are one atomic step);
    :class:`~madness_ppl.errors.OutputDirectoryError` says so and this run's output is dropped.
    """
    _CRITICAL[0] += 1
    try:
        if not replace:
            try:
                os.rename(tmp, out)
            except OSError as err:
                if out.exists():
                    raise OutputDirectoryError(
                        f"{out} was written by another run while this one worked; it is kept "
                        "and this run's output is discarded (pass --overwrite to replace it)",
                        str(out),
                    ) from None
                raise err
            return out
        if not out.exists():
            os.replace(tmp, out)
            return out
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        _PENDING.add(old)
        shutil.rmtree(old, ignore_errors=True)
        _PENDING.discard(old)
        return out
    finally:
        _PENDING.discard(tmp)
        _CRITICAL[0] -= 1
