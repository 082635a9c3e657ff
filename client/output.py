"""Writers for classification results: table, JSON Lines, CSV, embeddings; resume support.

Rows are written and flushed as each file completes, so an interrupted job keeps every
finished row and `--resume` can skip exactly those files.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO

import numpy as np

from client.results import FileResult

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


def done_files(*outputs: Path | None) -> set[str]:
    """Files already present in existing CSV / JSON Lines outputs (for --resume)."""
    done: set[str] = set()
    for path in outputs:
        if path is None or not path.exists():
            continue
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                done |= {row["file"] for row in csv.DictReader(f) if row.get("file")}
        else:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    done.add(json.loads(line)["file"])
                except (ValueError, KeyError):
                    continue  # a line cut short by a crash: that file is redone
    return done


class ResultWriter:
    """Fan one FileResult out to every requested output, flushing each row."""

    def __init__(
        self,
        labels: list[str],
        json_stream: IO[str] | None = None,
        jsonl_path: Path | None = None,
        csv_path: Path | None = None,
        table: bool = False,
        append: bool = False,
    ):
        self.labels = labels
        self.json_stream = json_stream
        self.table = table
        mode = "a" if append else "w"
        self._jsonl = open(jsonl_path, mode, encoding="utf-8") if jsonl_path else None  # noqa: SIM115
        self._csv_file = None
        self._csv = None
        if csv_path:
            write_header = not (append and csv_path.exists() and csv_path.stat().st_size > 0)
            self._csv_file = open(csv_path, mode, newline="", encoding="utf-8")  # noqa: SIM115
            self._csv = csv.DictWriter(
                self._csv_file, fieldnames=self.csv_fields(), extrasaction="ignore"
            )
            if write_header:
                self._csv.writeheader()
        self.results = 0
        if table:
            print(f"{'file':<48} {'dur_s':>7} {'emotion':<12} {'conf':>6}  note", flush=True)

    def csv_fields(self) -> list[str]:
        return CSV_FIXED[:4] + [f"score_{label}" for label in self.labels] + CSV_FIXED[4:]

    def write(self, result: FileResult) -> None:
        self.results += 1
        data = result.to_json()
        line = json.dumps(data, ensure_ascii=False)
        if self.json_stream is not None:
            print(line, file=self.json_stream, flush=True)
        if self._jsonl is not None:
            self._jsonl.write(line + "\n")
            self._jsonl.flush()
        if self._csv is not None:
            self._csv.writerow(self._csv_row(result))
            self._csv_file.flush()
        if self.table:
            print(_table_row(result), flush=True)

    def _csv_row(self, result: FileResult) -> dict:
        row = {
            "file": result.file,
            "duration_s": _fmt(result.duration_s),
            "emotion": result.emotion or "",
            "confidence": _fmt(result.confidence),
            "no_speech": int(result.no_speech) if result.ok else "",
            "segments": len(result.segments) if result.ok else "",
            "alert": ";".join(f"{a['label']}>={a['threshold']}" for a in result.alerts),
            "error": result.error or "",
            "error_kind": result.error_kind or "",
            "model": result.model or "",
            "synthetic": int(result.synthetic),
        }
        row |= {f"score_{label}": _fmt(result.scores.get(label)) for label in self.labels}
        return row

    def close(self) -> None:
        for f in (self._jsonl, self._csv_file):
            if f is not None:
                f.close()


def _table_row(result: FileResult) -> str:
    name = result.file if len(result.file) <= 48 else "..." + result.file[-45:]
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
    """Utterance (segment) embeddings to .npy (+ .index.csv) or .parquet, at job end."""

    def __init__(self, path: Path):
        if path.suffix not in (".npy", ".parquet"):
            raise ValueError(f"--embeddings must end in .npy or .parquet, not {path.name}")
        self.path = path
        self.rows: list[tuple[str, float, float]] = []
        self.vectors: list[np.ndarray] = []

    def add(self, result: FileResult) -> None:
        for segment in result.segments:
            self.rows.append((result.file, segment.start_s, segment.end_s))
            self.vectors.append(np.asarray(segment.embedding, dtype=np.float32))

    def close(self, append: bool = False) -> None:
        if not self.vectors:
            return
        matrix = np.stack(self.vectors)
        if self.path.suffix == ".npy":
            self._write_npy(matrix, append)
        else:
            self._write_parquet(matrix, append)

    def _write_npy(self, matrix: np.ndarray, append: bool) -> None:
        index = self.path.with_suffix(".index.csv")
        if append and self.path.exists():
            matrix = np.concatenate([np.load(self.path), matrix])
        np.save(self.path, matrix)
        new_index = not (append and index.exists())
        with open(index, "w" if new_index else "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new_index:
                writer.writerow(["row", "file", "start_s", "end_s"])
            start = len(matrix) - len(self.rows)
            for offset, (file, s, e) in enumerate(self.rows):
                writer.writerow([start + offset, file, f"{s:.3f}", f"{e:.3f}"])

    def _write_parquet(self, matrix: np.ndarray, append: bool) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise RuntimeError("writing .parquet needs pyarrow: pip install pyarrow") from exc
        table = pa.table(
            {
                "file": [r[0] for r in self.rows],
                "start_s": [r[1] for r in self.rows],
                "end_s": [r[2] for r in self.rows],
                "embedding": list(matrix),
            }
        )
        if append and self.path.exists():
            table = pa.concat_tables([pq.read_table(self.path), table])
        pq.write_table(table, self.path)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
