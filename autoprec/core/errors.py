"""Errors a user can act on.

Every :class:`AutoprecError` carries a one-line message saying what is wrong and how to fix it;
the CLI prints that line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class AutoprecError(Exception):
    """Base of all user-facing errors. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(AutoprecError):
    """Bad command-line input or bad arguments to the library API."""

    exit_code = 2


class ModelSpecError(AutoprecError):
    """A model file does not follow the contract in models/README.md."""


class CaptureError(AutoprecError):
    """Neither torch.fx nor torch.export could capture the model."""


class PlanError(AutoprecError):
    """A plan does not fit the model it is applied to, or is malformed."""


class ProfileError(AutoprecError):
    """A sensitivity profile (profile.json) is malformed or was made for another model: a failure
    (exit 1), as a corrupt plan is; a profile path that does not exist is a UsageError (exit 2)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__

