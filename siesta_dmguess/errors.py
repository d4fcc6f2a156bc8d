"""Exceptions raised by siesta_dmguess.

Every error a user can trigger with bad input derives from :class:`DMGuessError`,
names the offending file (or model) and says what is wrong; the CLI prints the
message without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class DMGuessError(Exception):
    """Base class for user-facing errors (bad files, incompatible models, missing SIESTA)."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.message = message  # without the path, for lists that name the file already
        super().__init__(f"{path}: {message}" if path is not None else message)


class InputFileError(DMGuessError):
    """A structure, fdf, basis or .DM file is missing, unreadable or inconsistent."""


class ModelCompatibilityError(DMGuessError):
    """A model cannot be used for a structure (species, basis, XC or format mismatch)."""


class UnreliablePredictionError(DMGuessError):
    """A structure lies so far outside a model's training data that its prediction would start SIESTA further
    from the answer than the atomic guess (see ``Prediction.far_out_of_distribution``); ``prediction`` holds it."""

    def __init__(self, message: str, path: str | Path | None = None, prediction=None):
        super().__init__(message, path)
        self.prediction = prediction


class SiestaError(DMGuessError):
    """SIESTA is missing, crashed or did not converge."""


class SiestaNotFoundError(SiestaError):
    """No SIESTA executable could be located."""
