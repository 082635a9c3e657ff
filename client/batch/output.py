"""Writers for classification results (table, JSON Lines, CSV, embeddings) and resume.

Every row is one line written by one `write()` on an append-only descriptor, as each file
completes, so an interrupted job keeps every finished row. `--resume` reads the files
back: a line cut short by a crash is dropped (the file is redone), a file that is not
ours (another header, not UTF-8, a directory) is refused before any inference, and
files whose last row is a server-side error are tried again.

With `--channels split` a CSV / Parquet output has one row per (file, party), all of a
file's rows written together (one `write()`, one chunk), each saying how many `parties`
the file has: `--resume` counts a file done only when all its rows are there, and cuts
off an incomplete last group (a crash mid-write) so that redoing the file duplicates
nothing.

Embeddings go to an append-only journal (`FILE.part` + `FILE.index.csv`) while the job
runs and become `FILE.npy` / `FILE.parquet` when it ends; a resumed job continues the
journal, so killed jobs lose no embedding and write none twice.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from e2v.client.batch.parts import CHUNK_ROWS, ChunkWriter, read_rows
from e2v.client.inputs import is_uri
from e2v.client.names import csv_safe, csv_unsafe
from e2v.client.results import FileResult

CSV_FIXED = [
    "file",
    "duration_s",
    "emotion",
    "confidence",
    "no_speech",
    "segments",
    "alert",
    "error",
    "error_kind",
    "model",
    "synthetic",
]
# --channels split: after `file`, which party and channel; after `segments`, the party's
# speech and the call's conversation figures, and the number of party rows of the file.
CSV_PARTY = ["party", "channel"]
CSV_CONVERSATION = ["speech_s", "overlap_s", "silence_s", "longest_silence_s", "parties"]
INDEX_HEADER = ["row", "file", "start_s", "end_s"]
INDEX_HEADER_SPLIT = ["row", "file", "party", "start_s", "end_s"]
# Rows whose error is the server's or ours, not the file's: --resume tries these again.
RETRY_ON_RESUME = {"server", "internal", "storage"}


class OutputError(Exception):
    """An output that cannot be written or resumed; the message says why in one line."""


@dataclass(frozen=True)
class Finished:
    """What the last row of one file in a previous run says."""

    error_kind: str | None
    segments: int  # segments with an embedding (0 for errors and no speech)

    @property
    def final(self) -> bool:
        return self.error_kind not in RETRY_ON_RESUME


@dataclass(frozen=True)
class Output:
    """One results destination: a local file or URI, and its format."""

    dest: str
    fmt: str  # "jsonl" | "csv" | "parquet"

    @property
    def chunked(self) -> bool:
        """Object stores and Parquet get rolling chunks; local CSV / JSONL are appended."""
        return self.fmt == "parquet" or is_uri(self.dest)


def previous_results(
    outputs: list[Output], labels: list[str] | None = None, split: bool = False
) -> dict[str, Finished]:
    """The last row per file in existing outputs (for --resume); with `split`, a file
    whose party rows are not all there is left out (it is redone).

    Repairs a local tail cut by a crash (drops the partial line, or an incomplete last
    group of party rows, says so on stderr) and raises OutputError for an output that is
    not one of ours.
    """
    found: dict[str, Finished] = {}
    for output in outputs:
        rows = _previous_rows(output, labels, split)
        if split and output.fmt != "jsonl":
            rows = _complete(rows)
        for file, finished, *_ in rows:
            found[file] = finished
    return found


def _previous_rows(
    output: Output, labels: list[str] | None, split: bool
) -> Iterator[tuple[str, Finished, str | None, int]]:
    """(file, finished, party, parties) per row, in order."""
    if output.chunked:
        try:
            for row in read_rows(output.dest, output.fmt):
                yield _finished_from_row(row, output)
        except (ValueError, UnicodeDecodeError, KeyError) as exc:
            raise OutputError(f"{output.dest}: not results of e2v classify ({exc})") from None
        return
    path = Path(output.dest)
    if not path.exists():
        return
    _check_writable_file(path)
    dropped = repair_tail(path)
    if dropped:
        stderr(f"resume: dropped an incomplete last line ({dropped} bytes) in {path}")
    if output.fmt == "csv":
        if split:
            _repair_last_group(path)
        yield from _read_csv(path, labels, split)
    else:
        yield from _read_jsonl(path)


def _finished_from_row(row: dict, output: Output) -> tuple[str, Finished, str | None, int]:
    kind = row.get("error_kind") or None
    if output.fmt == "jsonl":
        return row["file"], Finished(kind, 0 if kind else _json_segments(row)), None, 1
    segments = row.get("segments")
    count = int(segments) if str(segments or "").isdigit() else 0
    file = row["file"]
    file = csv_unsafe(file) if output.fmt == "csv" else file
    return file, Finished(kind, count), row.get("party") or None, _parties(row)


def _json_segments(row: dict) -> int:
    """Segments of a JSON row, every party's for a split one."""
    parties = row.get("parties")
    if isinstance(parties, list):
        return sum(len(p.get("segments") or []) for p in parties if isinstance(p, dict))
    return len(row.get("segments") or [])


def _parties(row: dict) -> int:
    """How many party rows a split file has (an error row stands alone)."""
    value = str(row.get("parties") if row.get("parties") is not None else "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _complete(rows: Iterable[tuple[str, Finished, str | None, int]]) -> Iterator[tuple]:
    """(file, finished) for each file whose party rows are all there, consecutively (its
    segments summed); a file retried later replaces what came before."""
    group: list = []

    def done() -> Iterator[tuple[str, Finished]]:
        if group and len({party for _, _, party, _ in group}) == group[0][3]:
            segments = sum(f.segments for _, f, _, _ in group)
            yield group[0][0], Finished(group[-1][1].error_kind, segments)

    for row in rows:
        file, _, party, _ = row
        if group and (file != group[0][0] or any(p == party for _, _, p, _ in group)):
            yield from done()
            group = []
        group.append(row)
    yield from done()


def _repair_last_group(path: Path) -> None:
    """Cut off the last file's party rows when fewer than its `parties` (a crash between
    two lines of one write): that file is redone, and its rows must not stay twice."""
    tail: list[tuple] = []
    for row in _read_csv(path, None, True, offsets=True):
        file, _, party, _, _ = row
        if tail and (file != tail[0][0] or party is None or any(r[2] == party for r in tail)):
            tail = []
        tail.append(row)
    if not tail or tail[0][2] is None or len(tail) >= tail[0][3]:
        return
    start, size = tail[0][4], path.stat().st_size
    os.truncate(path, start)
    stderr(
        f"resume: dropped {len(tail)} row(s) of an unfinished file ({size - start} bytes) in {path}"
    )


def repair_tail(path: Path) -> int:
    """Cut a partial last line (no newline) off `path`; the number of bytes dropped."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(max(0, size - 65536))
        tail = f.read()
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else 0
        if cut < 0 and size > len(tail):
            raise OutputError(f"{path}: last line longer than 64 KiB, not written by e2v")
        f.truncate(keep)
        return size - keep


def _read_text_lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            yield from f
    except UnicodeDecodeError:
        raise OutputError(f"{path} is not UTF-8: not written by e2v classify") from None


def _read_csv(
    path: Path, labels: list[str] | None, split: bool = False, offsets: bool = False
) -> Iterator[tuple]:
    """(file, finished, party, parties) per row; with `offsets`, also where it starts."""
    lines = _OffsetLines(path)
    reader = csv.reader(line for line, _ in lines)
    header = next(reader, None)
    if header is None:
        return
    expected = csv_fields(labels, split) if labels is not None else None
    if (expected and header != expected) or header[:1] != ["file"]:
        hint = " or of another --channels mode" if expected else ""
        raise OutputError(
            f"{path} has another header ({','.join(header[:6])}...): not results of this "
            f"model{hint}; write to a new file instead of --resume"
        )
    for values in reader:
        row = dict(zip(header, values))
        if len(values) != len(header) or not row.get("file"):
            raise OutputError(f"{path}: malformed row {reader.line_num}; not written by e2v")
        kind = row.get("error_kind") or None
        segments = int(row["segments"]) if row.get("segments", "").isdigit() else 0
        found = (csv_unsafe(row["file"]), Finished(kind, segments))
        found += (row.get("party") or None, _parties(row))
        yield found + (lines.start,) if offsets else found


class _OffsetLines:
    """The text lines of a file, remembering the byte offset of the row being read (a
    CSV row is one line: e2v writes no newline inside a cell)."""

    def __init__(self, path: Path):
        self.path, self.start = path, 0

    def __iter__(self) -> Iterator[tuple[str, int]]:
        position = 0
        for line in _read_text_lines(self.path):
            self.start = position
            position += len(line.encode("utf-8"))
            yield line, self.start


def _read_jsonl(path: Path) -> Iterator[tuple[str, Finished, None, int]]:
    for number, line in enumerate(_read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file = row["file"]
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"{path}: line {number} is not a result of e2v classify") from None
        kind = row.get("error_kind")
        yield file, Finished(kind, 0 if kind else _json_segments(row)), None, 1


def csv_fields(labels: list[str], split: bool = False) -> list[str]:
    scores = [f"score_{label}" for label in labels]
    if not split:
        return CSV_FIXED[:4] + scores + CSV_FIXED[4:]
    head, tail = CSV_FIXED[1:4], CSV_FIXED[4:6]
    return ["file", *CSV_PARTY, *head, *scores, *tail, *CSV_CONVERSATION, *CSV_FIXED[6:]]


class LineFile:
    """An append-only text file written one whole line per `write()` system call."""

    def __init__(self, path: Path, append: bool):
        _check_writable_file(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags | (0 if append else os.O_TRUNC), 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        self.path = path
        self.empty = os.fstat(self.fd).st_size == 0

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        while data:
            written = os.write(self.fd, data)
            data = data[written:]
        self.empty = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_writable_file(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path} is not a regular file")


def _csv_line(values: list) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


class ResultWriter:
    """Fan one FileResult out to every requested output, one whole line or row each."""

    def __init__(
        self,
        labels: list[str],
        outputs: list[Output] = (),
        json_stream: IO[str] | None = None,
        table: bool = False,
        append: bool = False,
        chunk_rows: int = CHUNK_ROWS,
        split: bool = False,
    ):
        self.labels = labels
        self.split = split  # --channels split: one CSV / Parquet row per (file, party)
        self.chunk_rows = chunk_rows
        self.json_stream = json_stream
        self.table = table
        self._sinks: list[tuple[Output, LineFile | ChunkWriter]] = []
        try:
            for output in outputs:
                self._sinks.append((output, self._open(output, append)))
        except (OutputError, ValueError) as exc:
            self.close()
            raise OutputError(str(exc)) from None
        self.results = 0
        if table:
            print(f"{'file':<48} {'dur_s':>7} {'emotion':<12} {'conf':>6}  note", flush=True)

    def _open(self, output: Output, append: bool) -> LineFile | ChunkWriter:
        if output.chunked:
            fields = self.csv_fields()
            return ChunkWriter(output.dest, fields, output.fmt, append, rows=self.chunk_rows)
        sink = LineFile(Path(output.dest), append)
        if output.fmt == "csv" and sink.empty:
            sink.write(_csv_line(self.csv_fields()))
        return sink

    def csv_fields(self) -> list[str]:
        return csv_fields(self.labels, self.split)

    def write(self, result: FileResult) -> None:
        self.results += 1
        data = result.to_json()
        line = json.dumps(data, ensure_ascii=False, allow_nan=False)
        if self.json_stream is not None:
            print(line, file=self.json_stream, flush=True)
        for output, sink in self._sinks:
            if isinstance(sink, ChunkWriter):  # a file's rows always in one chunk
                rows = [data] if output.fmt == "jsonl" else self._table_rows(result, output.fmt)
                sink.write_rows(rows)
            elif output.fmt == "jsonl":
                sink.write(line + "\n")
            else:  # all of a file's rows in one write()
                rows = self._table_rows(result, "csv")
                fields = self.csv_fields()
                sink.write("".join(_csv_line([row[f] for f in fields]) for row in rows))
        if self.table:
            for row in _table_lines(result):
                print(row, flush=True)

    def _table_rows(self, result: FileResult, fmt: str) -> list[dict]:
        """The CSV columns of a file's rows: one per party with --channels split."""
        if not self.split:
            return [self._table_dict(result, fmt)]
        if not result.ok or result.parties is None:
            typed = self._typed(result) | dict.fromkeys(CSV_PARTY + CSV_CONVERSATION)
            return [self._formatted(typed, fmt)]
        talk = result.conversation or {}
        rows = []
        for party in result.parties:
            typed = self._typed(party.result) | {
                "party": party.party,
                "channel": party.channel,
                "speech_s": talk.get("speech_s", {}).get(party.party),
                "overlap_s": talk.get("overlap_s"),
                "silence_s": talk.get("silence_s"),
                "longest_silence_s": talk.get("longest_silence_s"),
                "parties": len(result.parties),
            }
            rows.append(self._formatted(typed, fmt))
        return rows

    def _table_dict(self, result: FileResult, fmt: str) -> dict:
        """The CSV columns: text for CSV (formulas neutralised), typed for Parquet."""
        return self._formatted(self._typed(result), fmt)

    def _typed(self, result: FileResult) -> dict:
        typed = {
            "file": result.file,
            "duration_s": result.duration_s,
            "emotion": result.emotion,
            "confidence": result.confidence,
            "no_speech": result.no_speech if result.ok else None,
            "segments": len(result.segments) if result.ok else None,
            "alert": ";".join(f"{a['label']}>={a['threshold']}" for a in result.alerts),
            "error": result.error,
            "error_kind": result.error_kind,
            "model": result.model,
            "synthetic": result.synthetic,
        }
        typed |= {f"score_{label}": result.scores.get(label) for label in self.labels}
        return typed

    def _formatted(self, typed: dict, fmt: str) -> dict:
        if fmt == "parquet":
            return typed
        row = {}
        for key, value in typed.items():
            if isinstance(value, bool):
                row[key] = int(value)
            elif isinstance(value, float):
                row[key] = _fmt(value)
            elif isinstance(value, str):
                row[key] = csv_safe(value)
            else:
                row[key] = "" if value is None else value
        return row

    def close(self) -> None:
        for _, sink in self._sinks:
            sink.close()


def _table_lines(result: FileResult) -> list[str]:
    """The terminal table: one line per file, or per party of a split file."""
    if not result.ok or result.parties is None:
        return [_table_row(result)]
    return [_table_row(p.result, f"{result.file} [{p.party}]") for p in result.parties]


def _table_row(result: FileResult, name: str | None = None) -> str:
    name = name or result.file
    name = name if len(name) <= 48 else "..." + name[-45:]
    if not result.ok:
        return f"{name:<48} {'':>7} {'ERROR':<12} {'':>6}  {result.error}"
    note = "no speech" if result.no_speech else f"{len(result.segments)} segment(s)"
    if result.alerts:
        note += "  ALERT " + ", ".join(f"{a['label']}={a['max_score']:.2f}" for a in result.alerts)
    if result.synthetic:
        note += "  [synthetic model]"
    emotion = result.emotion or "-"
    conf = f"{result.confidence:.3f}" if result.confidence is not None else "-"
    return f"{name:<48} {result.duration_s:>7.1f} {emotion:<12} {conf:>6}  {note}"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


class EmbeddingWriter:
    """Segment embeddings: a journal while the job runs, `.npy` or `.parquet` at the end.

    The journal is `FILE.part` (float32 rows) plus `FILE.index.csv` (row, file, start_s,
    end_s; with --channels split: row, file, party, start_s, end_s). A file's vectors are
    written before its index lines, and its index lines in one write, so after a crash
    the index says exactly which files are complete.
    """

    def __init__(self, path: Path, dim: int, resume: bool = False, split: bool = False):
        if path.suffix not in (".npy", ".parquet"):
            raise OutputError(f"--embeddings must end in .npy or .parquet, not {path.name}")
        _check_writable_file(path)
        self.path, self.dim = path, dim
        self.header = INDEX_HEADER_SPLIT if split else INDEX_HEADER
        self.part = path.with_name(path.name + ".part")
        self.index_path = path.with_suffix(".index.csv")
        self.row_bytes = 4 * dim
        self.counts: dict[str, int] = {}  # file -> rows in the journal
        if resume:
            self._recover()
        else:
            for stale in (self.part, self.index_path):
                stale.unlink(missing_ok=True)
        self.rows = sum(self.counts.values())
        self._data = LineFile(self.part, append=True)
        self._index = LineFile(self.index_path, append=True)
        if self._index.empty:
            self._index.write(_csv_line(self.header))

    def has(self, file: str) -> bool:
        return file in self.counts

    def drop_incomplete_last(self, expected: dict[str, Finished]) -> None:
        """Forget the last file of the journal when it holds fewer rows than its result
        row has segments (a crash cut its index lines short); it is then redone."""
        if not self.counts:
            return
        last = next(reversed(self.counts))
        finished = expected.get(last)
        if finished is None or self.counts[last] == finished.segments:
            return
        self._data.close()
        self._index.close()
        keep = self.rows - self.counts.pop(last)
        os.truncate(self.part, keep * self.row_bytes)
        lines = self.index_path.read_bytes().splitlines(keepends=True)
        self.index_path.write_bytes(b"".join(lines[: keep + 1]))
        self.rows = keep
        self._data = LineFile(self.part, append=True)
        self._index = LineFile(self.index_path, append=True)

    def add(self, result: FileResult) -> None:
        named = [(None, s) for s in result.segments]
        named += [(p.party, s) for p in result.parties or () for s in p.result.segments]
        if not named or result.file in self.counts:
            return
        matrix = np.stack([np.asarray(s.embedding, dtype=np.float32) for _, s in named])
        if matrix.shape[1] != self.dim:
            raise OutputError(f"embedding width {matrix.shape[1]} != {self.dim}")
        os.write(self._data.fd, matrix.tobytes())
        split = self.header is INDEX_HEADER_SPLIT
        lines = "".join(
            _csv_line(
                [self.rows + i, csv_safe(result.file)]
                + ([csv_safe(party or "")] if split else [])
                + [f"{s.start_s:.3f}", f"{s.end_s:.3f}"]
            )
            for i, (party, s) in enumerate(named)
        )
        self._index.write(lines)
        self.rows += len(named)
        self.counts[result.file] = len(named)

    def close(self) -> None:
        """Turn the journal into the final file (atomically) and remove it."""
        self._data.close()
        self._index.close()
        vectors = self._journal()
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        if self.path.suffix == ".npy":
            out = np.lib.format.open_memmap(temporary, "w+", np.float32, vectors.shape)
            out[:] = vectors
            out.flush()
            del out
        else:
            self._write_parquet(vectors, temporary)
        os.replace(temporary, self.path)
        self.part.unlink(missing_ok=True)

    def _journal(self) -> np.ndarray:
        if self.rows == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.memmap(self.part, np.float32, "r", shape=(self.rows, self.dim))

    def _recover(self) -> None:
        """Continue a previous run: its journal, or its final file turned back into one."""
        index = _read_index(self.index_path, self.header)
        if not self.part.exists() and self.path.exists():
            self._journal_from_final(len(index))
        data_rows = self.part.stat().st_size // self.row_bytes if self.part.exists() else 0
        if self.part.exists() and self.part.stat().st_size % self.row_bytes and not index:
            raise OutputError(f"{self.part} does not hold {self.dim}-wide float32 rows")
        if data_rows < len(index):
            raise OutputError(
                f"{self.part} holds {data_rows} vectors but {self.index_path} lists "
                f"{len(index)}; delete both to start the embeddings over"
            )
        if self.part.exists():
            os.truncate(self.part, len(index) * self.row_bytes)  # vectors of a cut-off file
        for row, (number, file) in enumerate(index):
            if number != row:
                raise OutputError(f"{self.index_path}: row {row} is numbered {number}")
            self.counts[file] = self.counts.get(file, 0) + 1

    def _journal_from_final(self, indexed: int) -> None:
        if self.path.suffix == ".npy":
            try:
                final = np.load(self.path, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise OutputError(f"{self.path} is not a NumPy file: {exc}") from None
        else:
            final = _read_parquet_vectors(self.path)
        if final.ndim != 2 or final.shape[1] != self.dim or final.dtype != np.float32:
            raise OutputError(
                f"{self.path} holds {final.dtype} vectors of shape {final.shape[1:]}, the "
                f"model's are float32 of width {self.dim}: another model's embeddings"
            )
        if len(final) != indexed:
            raise OutputError(f"{self.path} has {len(final)} rows, its index {indexed}")
        with open(self.part, "wb") as f:
            for start in range(0, len(final), 4096):
                f.write(np.ascontiguousarray(final[start : start + 4096]).tobytes())

    def _write_parquet(self, vectors: np.ndarray, path: Path) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise OutputError("writing .parquet needs pyarrow: pip install pyarrow") from exc
        index = _read_index_rows(self.index_path, self.header)
        columns = {name: [r[i] for r in index] for i, name in enumerate(self.header) if i}
        columns["start_s"] = [float(v) for v in columns["start_s"]]
        columns["end_s"] = [float(v) for v in columns["end_s"]]
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray(vectors).reshape(-1)), self.dim
        )
        table = pa.table(columns)
        pq.write_table(table, path)


def _read_index_rows(path: Path, header: list[str]) -> list[list[str]]:
    if not path.exists():
        return []
    repair_tail(path)
    rows = list(csv.reader(_read_text_lines(path)))
    if rows and rows[0] != header:
        other = (
            " (another --channels mode)" if rows[0] in (INDEX_HEADER, INDEX_HEADER_SPLIT) else ""
        )
        raise OutputError(f"{path} is not this job's embeddings index{other}: {rows[0][:5]}")
    body = rows[1:]
    if any(len(r) != len(header) or not r[0].isdigit() for r in body):
        raise OutputError(f"{path}: malformed rows; not written by e2v classify")
    text = {header.index(name) for name in ("file", "party") if name in header}
    return [[csv_unsafe(v) if i in text else v for i, v in enumerate(r)] for r in body]


def _read_index(path: Path, header: list[str]) -> list[tuple[int, str]]:
    return [(int(r[0]), r[1]) for r in _read_index_rows(path, header)]


def _read_parquet_vectors(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=["embedding"]).column("embedding")
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise OutputError(f"{path} is not an embeddings parquet file: {exc}") from None
    values = column.combine_chunks()
    width = values.type.list_size if hasattr(values.type, "list_size") else None
    flat = np.asarray(values.flatten(), dtype=np.float32)
    if width is None:
        width = len(flat) // max(1, len(values))
    return flat.reshape(len(values), width)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
