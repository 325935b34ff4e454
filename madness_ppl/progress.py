"""Progress bars (rich), one look for the whole package.

:func:`progress_bar` gives a :class:`rich.progress.Progress` (description, bar, done/total,
optional text columns, time); with ``enabled=False`` it draws nothing but still accepts
``add_task``/``update``/``advance``, so callers need no branches. :func:`progress_counter`
wraps one task and yields an ``advance(n)`` function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["progress_bar", "progress_counter"]


def progress_bar(
    enabled: bool,
    *fields: str,
    transient: bool = False,
    remaining: bool = False,
) -> Progress:
    """A rich progress bar, disabled (silent) unless ``enabled``.

    Parameters
    ----------
    enabled
        Draw the bar.
    *fields
        Extra text columns after the ``done/total`` count, as rich templates (e.g.
        ``"loss {task.fields[loss]:.4g}"``; every task must then set those fields).
    transient
        Remove the bar when it finishes.
    remaining
        Show the estimated time remaining instead of the time elapsed.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeRemainingColumn() if remaining else TimeElapsedColumn(),
        transient=transient,
        disable=not enabled,
    )


@contextlib.contextmanager
def progress_counter(
    enabled: bool,
    description: str,
    total: int,
    *,
    transient: bool = False,
    until_first: str | None = None,
) -> Iterator[Callable[[int], None]]:
    """One progress task of ``total`` units; yields ``advance(n)`` (a no-op when disabled).

    ``until_first``: the description shown until the first unit is done (e.g. "compiling",
    which can take minutes before a sampler's first iteration), so the bar never sits blank.
    """
    if not enabled:
        yield lambda n: None
        return
    with progress_bar(True, transient=transient) as bar:
        task = bar.add_task(until_first or description, total=total)
        waiting = [until_first is not None]

        def advance(n: int) -> None:
            if waiting[0]:
                waiting[0] = False
                bar.update(task, description=description)
            bar.advance(task, n)

        yield advance
