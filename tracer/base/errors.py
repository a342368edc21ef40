"""The one error type users see: what is wrong and what to do, on one line."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class LuotraceError(Exception):
    """An error to print as one line with a hint, then exit non-zero."""

    def __init__(self, what: str, hint: str = "", exit_code: int = 1):
        super().__init__(what)
        self.what = what
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.what}; {self.hint}" if self.hint else self.what


# what a damaged JSON part of a recording raises when it is read as numbers
CONTENT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


@contextmanager
def corrupt_content(what: str = "recording content") -> Iterator[None]:
    """A recording whose checksums hold but whose JSON parts say nonsense (a
    broken writer, an edit by hand) ends in one line, not a traceback."""
    try:
        yield
    except CONTENT_ERRORS as e:
        raise LuotraceError(f"{what} is corrupt ({type(e).__name__}: {e})",
                            "the file was damaged after it was written; record again") from None
