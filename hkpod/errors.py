"""The one error type that hkpod shows to users as a single line."""

from __future__ import annotations


class HkpodError(Exception):
    """A failure the user can act on: printed as one line plus an optional hint, exit 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message
