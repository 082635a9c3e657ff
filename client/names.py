"""File names and text cells, written safely into every output we produce.

File names are bytes on Linux: Python hands undecodable ones over with surrogate escapes,
and any name may hold newlines or other control characters. `display_name` turns each
into one printable line (undecodable bytes as `\\xNN`), so every JSON line, CSV row and
table row is valid UTF-8 on one physical line, and resume can compare names as written.

CSV cells that a spreadsheet would run as a formula are neutralised with OWASP's rule
(a leading `'`), reversibly, so a resumed job still recognises its own rows.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# OWASP CSV injection: cells starting with these are formulas in Excel, LibreOffice, Sheets.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def display_name(name: str) -> str:
    """`name` as one line of valid UTF-8: bad bytes and control characters as `\\xNN`."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(text: str, limit: int = 500) -> str:
    """An error message made safe for a row: one printable line, at most `limit` characters."""
    text = display_name(str(text).strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def csv_safe(cell: str) -> str:
    """Neutralise a text cell that a spreadsheet would evaluate (`=`, `+`, `-`, `@`, tab, CR).

    A leading `'` is also escaped, so `csv_unsafe` restores every value exactly.
    """
    return "'" + cell if cell.startswith((*_FORMULA_START, "'")) else cell


def csv_unsafe(cell: str) -> str:
    """The value `csv_safe` was given."""
    return cell[1:] if cell.startswith("'") else cell
