"""Typed errors and warnings for bad user input.

Every check of user input (files, arrays, options) raises a :class:`MadnessInputError` or one of
its subclasses, carrying the offending ``value`` (as galsim's ``GalSimValueError`` does). They
subclass :class:`ValueError`, so ``except ValueError`` keeps working. The command line turns
exactly these (and missing/existing-file errors) into one line and exit code 2; anything else is
a bug and shows its traceback.

>>> from madness_ppl.errors import MadnessInputError
>>> err = MadnessInputError("n must be positive", -3)
>>> isinstance(err, ValueError), err.value
(True, -3)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FieldFormatError",
    "MadnessInputError",
    "MadnessInputWarning",
    "OutputDirectoryError",
    "PositionsError",
    "PriorFileError",
]


class MadnessInputError(ValueError):
    """A user input is invalid; ``value`` is the offending value (or ``None``)."""

    def __init__(self, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.value = value


class FieldFormatError(MadnessInputError):
    """A field file (FITS) or array cannot be read as a multi-band image."""


class PositionsError(MadnessInputError):
    """Source positions (array or table) are malformed, off the image or missing values."""


class PriorFileError(MadnessInputError):
    """A prior directory is unreadable: bad JSON, unknown keys, bad or non-finite tensors."""


class OutputDirectoryError(MadnessInputError):
    """An output path cannot be used: a file, inside the input, or a directory we did not write."""


class MadnessInputWarning(UserWarning):
    """Input that is accepted but probably wrong (duplicate positions, noise off by 10x, ...)."""
