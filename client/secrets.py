"""Secrets from files (API keys, signing secrets), never from argv: bounded, one-line errors."""

from __future__ import annotations

from pathlib import Path

MAX_SECRET_FILE_BYTES = 4096


def read_secret_file(path: Path, flag: str, what: str = "key", min_chars: int = 1) -> bytes:
    """The one printable-ASCII `what` in `path` (surrounding whitespace removed), read at
    most MAX_SECRET_FILE_BYTES; ValueError naming `flag` with a one-line reason."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    secret = data.strip()
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"{flag} {path} is longer than {MAX_SECRET_FILE_BYTES} bytes")
    too_short = len(secret) < max(min_chars, 1)
    if any(b < 0x21 or b > 0x7E for b in secret) or (too_short and min_chars <= 1):
        raise ValueError(f"{flag} {path} must hold one printable ASCII {what}")
    if too_short:
        raise ValueError(
            f"{flag} {path}: the {what} needs at least {min_chars} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    return secret
