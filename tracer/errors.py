"""The one error type users see: what is wrong and what to do, on one line."""
from __future__ import annotations


class LuotraceError(Exception):
    """An error to print as one line with a hint, then exit non-zero."""

    def __init__(self, what: str, hint: str = "", exit_code: int = 1):
        super().__init__(what)
        self.what = what
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.what}; {self.hint}" if self.hint else self.what
