"""Read a labelled set of recordings: a CSV / JSON Lines manifest or one folder per label.

Manifests have `path` and `label` columns (other columns, e.g. `speaker`, are kept);
relative paths are relative to the manifest. An optional `party` or `channel` column
says whose speech of a stereo call a row labels (`--channels split`): the same file may
then appear once per party. Problems with the manifest as a whole (not
UTF-8, no rows, no `label` column, a malformed line, over the size limits) raise
`DatasetError` with a one-line reason. Problems with one row (an empty cell, a missing
file, a path that is not a regular file, a repeated path) are recorded on that row, so
the caller can list it instead of dropping it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

# A manifest is a list of file names, not data: these bounds stop a wrong file (a
# recording, a database dump, /dev/zero) from being read into memory.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_ROWS = 200_000
MAX_CELL_CHARS = 4096
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class DatasetError(ValueError):
    """The labelled set cannot be read at all; `str(err)` says why, in one line."""


@dataclass(frozen=True)
class LabelledItem:
    row: int  # 1-based data row of the manifest (folders: position in sorted order)
    path: str  # the file to open: relative paths already joined to the manifest's folder
    label: str  # as written, surrounding whitespace removed
    fields: dict[str, str] = field(default_factory=dict)  # every column, as written
    error: str | None = None  # this row cannot be used (empty cell, missing file, ...)
    error_kind: str | None = None  # "empty_cell", "not_found", "unreadable"
    duplicate_of: int | None = None  # row of the first occurrence of the same file

    @property
    def usable(self) -> bool:
        return self.error is None and self.duplicate_of is None


@dataclass(frozen=True)
class LabelledSet:
    source: Path
    kind: Literal["csv", "jsonl", "folders"]
    columns: list[str]  # manifest columns ("path", "label" for folders)
    items: list[LabelledItem]
    warnings: list[str] = field(default_factory=list)


def read_labelled(
    source: str | Path,
    audio_suffixes: set[str] | None = None,
    max_rows: int = MAX_ROWS,
    max_bytes: int = MAX_MANIFEST_BYTES,
) -> LabelledSet:
    """Read a labelled set from a `.csv` / `.jsonl` manifest or a folder of label folders.

    `audio_suffixes` selects files inside label folders (default: the client's list).
    Raises DatasetError when the set as a whole is unusable.
    """
    source = Path(source)
    try:
        mode = source.stat().st_mode
    except FileNotFoundError:
        raise DatasetError(f"no such manifest or folder: {source}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {source}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        return _read_folders(source, audio_suffixes or _default_suffixes(), max_rows)
    kind = MANIFEST_SUFFIXES.get(source.suffix.lower())
    if kind is None:
        raise DatasetError(
            f"{source}: a manifest must end in .csv or .jsonl (or pass a folder with one "
            "sub-folder per label)"
        )
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise DatasetError(f"{source} is not a regular file")
    text = _read_text(source, max_bytes)
    rows, columns = _csv_rows(source, text) if kind == "csv" else _jsonl_rows(source, text)
    if len(rows) > max_rows:
        raise DatasetError(f"{source}: {len(rows)} rows exceed the limit of {max_rows}")
    if not rows:
        raise DatasetError(f"{source}: the manifest has no rows")
    base = source.parent
    items = [_item(number, fields, base) for number, fields in enumerate(rows, start=1)]
    return LabelledSet(source, kind, columns, _mark_duplicates(items))


def _default_suffixes() -> set[str]:
    from e2v.client.audio import AUDIO_SUFFIXES

    return AUDIO_SUFFIXES


def _read_text(path: Path, max_bytes: int) -> str:
    with open(path, "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DatasetError(f"{path}: larger than the {max_bytes // 2**20} MiB manifest limit")
    try:
        return data.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the manifest as UTF-8"
        ) from None


def _csv_rows(path: Path, text: str) -> tuple[list[dict[str, str]], list[str]]:
    if "\0" in text:
        raise DatasetError(f"{path}: contains NUL bytes; is it really a CSV file?")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}: the manifest is empty")
        columns = _columns(path, [name.strip().lower() for name in header])
        rows = []
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # blank line
            if len(cells) != len(columns):
                raise DatasetError(
                    f"{path} line {reader.line_num}: {len(cells)} fields, the header has "
                    f"{len(columns)}"
                )
            rows.append(dict(zip(columns, (_cell(path, reader.line_num, c) for c in cells))))
    except csv.Error as exc:
        raise DatasetError(f"{path} line {reader.line_num}: {exc}") from None
    return rows, columns


def _jsonl_rows(path: Path, text: str) -> tuple[list[dict[str, str]], list[str]]:
    rows, columns = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{path} line {number}: expected a JSON object")
        row = {str(k).strip().lower(): _cell(path, number, _json_text(v)) for k, v in data.items()}
        columns |= dict.fromkeys(row)
        rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: the manifest is empty")
    names = _columns(path, list(columns))
    return [{name: row.get(name, "") for name in names} for row in rows], names


def _columns(path: Path, names: list[str]) -> list[str]:
    missing = [name for name in ("path", "label") if name not in names]
    if missing:
        found = ", ".join(repr(n) for n in names if n) or "none"
        raise DatasetError(
            f"{path}: no {' or '.join(repr(m) for m in missing)} column (found: {found}); "
            "a manifest needs path,label"
        )
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: repeated column names in the header")
    return names


def _cell(path: Path, line: int, value: str) -> str:
    if len(value) > MAX_CELL_CHARS:
        raise DatasetError(f"{path} line {line}: a cell longer than {MAX_CELL_CHARS} characters")
    return value


def _json_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _item(row: int, fields: dict[str, str], base: Path) -> LabelledItem:
    raw_path, label = fields["path"].strip(), fields["label"].strip()
    path = str(base / raw_path) if raw_path else ""
    if not raw_path:
        return LabelledItem(row, path, label, fields, "empty path cell", "empty_cell")
    if not label:
        return LabelledItem(row, path, label, fields, "empty label cell", "empty_cell")
    return LabelledItem(row, path, label, fields, *file_problem(path))


def file_problem(path: str | Path) -> tuple[str | None, str | None]:
    """(reason, kind) when `path` cannot be a recording, found without opening it (a FIFO
    would block); (None, None) for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"file not found: {path}", "not_found"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}", "unreadable"
    if stat.S_ISDIR(mode):
        return f"is a directory, not a file: {path}", "unreadable"
    if not stat.S_ISREG(mode):
        return f"not a regular file (FIFO, socket or device): {path}", "unreadable"
    return None, None


def _mark_duplicates(items: list[LabelledItem]) -> list[LabelledItem]:
    """Later rows naming a file already listed point at its first usable row (a first row
    with, say, an empty label does not hide a good one further down)."""
    first: dict[str, LabelledItem] = {}
    marked = []
    for item in items:
        key = None
        if item.path:
            party = tuple(item.fields.get(c, "").strip() for c in ("party", "channel"))
            key = (os.path.normcase(os.path.abspath(item.path)), party)
        if key in first:
            item = replace(item, duplicate_of=first[key].row)
        elif key is not None and item.error is None:
            first[key] = item
        marked.append(item)
    return marked


def _read_folders(root: Path, suffixes: set[str], max_rows: int) -> LabelledSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    warnings = [
        f"ignored {p.name}: files at the top level have no label folder"
        for p in sorted(root.iterdir())
        if p.is_file() and p.suffix.lower() in suffixes
    ]
    items: list[LabelledItem] = []
    for folder in folders:
        files = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in suffixes and not p.is_dir()
        )
        if not files:
            warnings.append(f"label folder {folder.name!r} has no audio files")
        for path in files:
            if len(items) >= max_rows:
                raise DatasetError(f"{root}: more than {max_rows} files")
            fields = {"path": str(path.relative_to(root)), "label": folder.name}
            row = len(items) + 1
            items.append(LabelledItem(row, str(path), folder.name, fields, *file_problem(path)))
    if not items:
        raise DatasetError(f"{root}: no label sub-folders with audio files")
    return LabelledSet(root, "folders", ["path", "label"], items, warnings)


def group_column(dataset: LabelledSet, name: str | None) -> str | None:
    """The `--group-by` column as stored (lower case), or None; ValueError if absent."""
    if not name:
        return None
    column = name.strip().lower()
    if column not in dataset.columns:
        raise ValueError(
            f"--group-by {name!r}: no such column (columns: {', '.join(dataset.columns)})"
        )
    return column
