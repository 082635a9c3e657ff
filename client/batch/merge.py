"""`e2v merge DEST/ --out FILE`: the parts of a sharded job as one table, and a summary.

Parts are `part-KKKKK-of-NNNNN.<fmt>` files (local, appended) and their chunks
`part-KKKKK-of-NNNNN-CCCCC.<fmt>` (object storage, Parquet). A file classified twice (a
server-side error retried by --resume) keeps its last row, or its last group of party
rows (`--channels split`: one row per party). The summary counts files, failures by
kind and hours of audio.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator

from e2v.client.batch.parts import decode, encode
from e2v.client.inputs import filesystem, is_uri

PART = re.compile(r"^part-(\d{5})-of-(\d{5})(?:-(\d{5,}))?\.(jsonl|csv|parquet)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="combine the parts of a sharded classify job", description=__doc__
    )
    parser.add_argument("dest", metavar="DEST/", help="the folder or prefix given to classify")
    parser.add_argument("--out", help="one .jsonl, .csv or .parquet file (local or URI)")
    parser.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    try:
        fs, folder = _folder(args.dest)
        parts = list_parts(fs, folder)
        if not parts:
            raise ValueError(f"no part-*.jsonl/csv/parquet files in {args.dest}")
        rows = latest_rows(fs, parts)
        if args.out:
            write_table(rows, args.out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary(rows, parts), indent=2))
    return 0


def _folder(dest: str):
    if is_uri(dest):
        return filesystem(dest.rstrip("/") + "/")
    import fsspec

    return fsspec.filesystem("file"), dest.rstrip("/") or "."


def list_parts(fs, folder: str) -> list[tuple[tuple[int, int, int], str, str]]:
    """((shard, count, chunk), path, format) of every part, in shard then chunk order."""
    found = []
    for path in fs.ls(folder, detail=False):
        match = PART.match(path.rsplit("/", 1)[-1])
        if match:
            shard, count, chunk, fmt = match.groups()
            key = (int(shard), int(count), int(chunk) if chunk else -1)
            found.append((key, path, fmt))
    counts = {key[1] for key, _, _ in found}
    if len(counts) > 1:
        raise ValueError(f"parts of different shard counts ({sorted(counts)}) in one folder")
    return sorted(found)


def latest_rows(fs, parts) -> list[dict]:
    """The last row of each file across the parts (dict order: first appearance); for a
    split file the last group of its party rows (a party seen again starts a new group)."""
    rows: dict[str, dict[str | None, dict]] = {}
    for row in _all_rows(fs, parts):
        party = row.get("party") or None
        group = rows.get(row["file"])
        if group is None or party is None or None in group or party in group:
            group = rows[row["file"]] = {}
        group[party] = row
    return [row for group in rows.values() for row in group.values()]


def _all_rows(fs, parts) -> Iterator[dict]:
    for _, path, fmt in parts:
        data = fs.cat_file(path)
        if fmt != "parquet" and data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]  # a local part cut by a crash
        yield from decode(data, fmt, path)


def write_table(rows: list[dict], out: str) -> None:
    fmt = out.rsplit(".", 1)[-1]
    if fmt not in ("jsonl", "csv", "parquet"):
        raise ValueError(f"--out {out}: use a .jsonl, .csv or .parquet name")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    fs, path = filesystem(out) if is_uri(out) else _local(out)
    fs.pipe_file(path, encode(rows, fields, fmt))


def _local(path: str):
    import fsspec

    return fsspec.filesystem("file"), path


def summary(rows: list[dict], parts) -> dict:
    """Files, failures by kind, audio hours and which shards are present."""
    files = {row["file"]: row for row in rows}  # a split file's party rows count once
    failures = Counter(row.get("error_kind") for row in files.values() if row.get("error_kind"))
    seconds = sum(float(row.get("duration_s") or 0) for row in files.values())
    shards = sorted({key[0] for key, _, _ in parts})
    count = parts[0][0][1] if parts else 0
    return {
        "files": len(files),
        "ok": len(files) - sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "audio_hours": round(seconds / 3600, 4),
        "shards_present": f"{len(shards)} of {count}",
        "missing_shards": [k for k in range(count) if k not in shards],
    }
