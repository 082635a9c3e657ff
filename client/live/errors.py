"""The error that ends a live session: a contract close code, a short kind and a reason."""

from __future__ import annotations

from e2v.contract import CLOSE_BAD_MESSAGE


class LiveError(Exception):
    """Ends a session: `code` is a contract CLOSE_*, `kind` a short word, str() the reason."""

    def __init__(self, code: int, kind: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.kind, self.retry_after_s = code, kind, retry_after_s


def bad(kind: str, message: str) -> LiveError:
    """A malformed, out-of-order or out-of-range message (CLOSE_BAD_MESSAGE)."""
    return LiveError(CLOSE_BAD_MESSAGE, kind, message)
