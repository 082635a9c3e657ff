"""Results in object storage (and Parquet anywhere): rolling immutable chunks.

Object stores have no append. A destination `DEST` (say `s3://b/out/results.jsonl`, or a
shard's `s3://b/out/part-00007-of-00016.jsonl`) is written as chunks
`results-00000.jsonl`, `results-00001.jsonl`, ... beside it: each chunk is one complete
object written by one PUT (every CHUNK_ROWS rows or CHUNK_SECONDS), so a crash never
leaves a half-written row visible; the rows it had not flushed belong to files that
`--resume` redoes. Readers take the glob `results-*.jsonl` (pandas, DuckDB, pyarrow), or
`e2v merge` combines the chunks into one file. Parquet cannot be appended either, so
`--parquet` uses chunks on local disks too.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from e2v.client.inputs import filesystem, is_uri

CHUNK_ROWS = 500
CHUNK_SECONDS = 30.0
_CHUNK = re.compile(r"-(\d{5,})$")


@dataclass(frozen=True)
class ChunkSet:
    """The chunks of one destination: `<stem>-NNNNN<suffix>` in one folder or prefix."""

    fs: object
    folder: str
    stem: str
    suffix: str

    @classmethod
    def of(cls, dest: str) -> ChunkSet:
        if is_uri(dest):
            fs, path = filesystem(dest)
        else:
            import fsspec

            fs, path = fsspec.filesystem("file"), str(dest)
        folder, _, name = path.rpartition("/")
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:
            raise ValueError(f"{dest}: the name needs a suffix (.jsonl, .csv, .parquet)")
        return cls(fs, folder, stem, "." + ext)

    def path(self, number: int) -> str:
        return f"{self.folder}/{self.stem}-{number:05d}{self.suffix}"

    def existing(self) -> list[str]:
        """Chunk paths already written, in order."""
        try:
            names = self.fs.ls(self.folder or ".", detail=False)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith(self.stem + "-") and base.endswith(self.suffix):
                match = _CHUNK.search(base[: -len(self.suffix)])
                if match and base[: match.start()] == self.stem:
                    found.append((int(match.group(1)), name))
        return [name for _, name in sorted(found)]


class ChunkWriter:
    """Rows (dicts) for one destination, committed as immutable chunks."""

    def __init__(
        self,
        dest: str,
        fields: list[str],
        fmt: str,
        append: bool,
        rows: int = CHUNK_ROWS,
        seconds: float = CHUNK_SECONDS,
    ):
        self.chunks = ChunkSet.of(dest)
        self.max_rows, self.max_seconds = rows, seconds
        self.fields, self.fmt = fields, fmt
        existing = self.chunks.existing()
        if existing and not append:
            raise ValueError(
                f"{dest}: {len(existing)} chunk(s) already exist ({existing[0]}...); use "
                f"--resume to continue them or another destination"
            )
        self.next_number = _number(existing[-1]) + 1 if existing else 0
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()
        self._check_writable()

    def write(self, row: dict) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[dict]) -> None:
        """Rows that must land in one chunk (a split file's party rows): never cut apart."""
        self.rows.extend(rows)
        due = time.monotonic() - self.last_flush >= self.max_seconds
        if len(self.rows) >= self.max_rows or due:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            data = encode(self.rows, self.fields, self.fmt)
            self.chunks.fs.pipe_file(self.chunks.path(self.next_number), data)
            self.next_number += 1
            self.rows = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def _check_writable(self) -> None:
        """Fail before any inference when the destination cannot take a chunk."""
        probe = f"{self.chunks.folder}/.{self.chunks.stem}.write-check"
        try:
            if "file" in self.chunks.fs.protocol:  # object stores: no folders, never buckets
                self.chunks.fs.makedirs(self.chunks.folder or ".", exist_ok=True)
            self.chunks.fs.pipe_file(probe, b"")
            self.chunks.fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001 - every back end raises its own types
            raise ValueError(f"cannot write {self.chunks.folder}: {_one_line(exc)}") from None


def encode(rows: list[dict], fields: list[str], fmt: str) -> bytes:
    """Rows as one complete JSON Lines, CSV (with header) or Parquet object."""
    if fmt == "jsonl":
        return "".join(
            json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows
        ).encode()
    if fmt == "csv":
        import csv

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(fields)
        writer.writerows([[row.get(f, "") for f in fields] for row in rows])
        return buffer.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{f: row.get(f) for f in fields} for row in rows])
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def read_rows(dest: str, fmt: str) -> Iterator[dict]:
    """Every row of every chunk of `dest`, in chunk order."""
    chunks = ChunkSet.of(dest)
    for path in chunks.existing():
        data = chunks.fs.cat_file(path)
        yield from decode(data, fmt, path)


def decode(data: bytes, fmt: str, origin: str) -> Iterator[dict]:
    if fmt == "jsonl":
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    raise ValueError(f"{origin}: line {number} is not JSON") from None
    elif fmt == "csv":
        import csv

        yield from csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    else:
        import pyarrow.parquet as pq

        yield from pq.read_table(io.BytesIO(data)).to_pylist()


def _number(path: str) -> int:
    base = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return int(_CHUNK.search(base).group(1))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
