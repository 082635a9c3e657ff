"""Embeddings of a labelled set from the served base model, through the classify pipeline.

A row is a whole file (every segment of it carries the row's label) or, with `start` and
`end` columns (seconds), a labelled span of a file; with `--channels split` (or a
`party` / `channel` column) a row is one channel's speech, its party's. Whole files go through
`classify_source` exactly as `e2v classify` sends them; a span is decoded, cut out and
segmented the same way. Each row's result is cached (`cache.EmbeddingCache`), so only
new or changed files reach the server.

Rows that cannot be used keep their reason (`error` for failures, `excluded` for rows
the data set itself rules out), as in `e2v evaluate`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from e2v.client.audio import AudioError, stream_audio
from e2v.client.classify import JobOptions, classify_source
from e2v.client.evaluation.dataset import LabelledItem, LabelledSet
from e2v.client.heads.cache import Embedded, EmbeddingCache, file_sha256
from e2v.client.names import one_line
from e2v.client.parties import manifest_channel, party_result
from e2v.client.segment import SegmentMode, segment_stream
from e2v.client.triton import InferenceError, ServerError, ServerUnavailable, TritonEmotionClient

from e2v.contract import MAX_DURATION_S, MIN_SAMPLES, SAMPLE_RATE

SPAN_COLUMNS = ("start", "end")


@dataclass
class Row:
    """One manifest row: its label (after --map), span, and embeddings or why there are none."""

    item: LabelledItem
    label: str
    span: tuple[float, float] | None = None
    channel: int | None = None  # --channels split: the party's channel (0-based)
    embedded: Embedded | None = None
    error: str | None = None
    error_kind: str | None = None
    excluded: str | None = None

    @property
    def used(self) -> bool:
        return self.error is None and self.excluded is None and self.embedded is not None


def plan_rows(
    dataset: LabelledSet, mapping: dict[str, str], parties: tuple[str, ...] | None = None
) -> list[Row]:
    """Rows with labels mapped, spans parsed, and data-set problems recorded on each row;
    with `parties` (split), each row's channel (its `party` / `channel` cell, else 0)."""
    spans = all(column in dataset.columns for column in SPAN_COLUMNS)
    rows, seen = [], {}
    for item in dataset.items:
        label = mapping.get(item.label.strip().lower(), item.label.strip())
        row = Row(item, label)
        rows.append(row)
        if item.error is not None:
            row.error, row.error_kind = item.error, item.error_kind
            continue
        if parties is not None:
            try:
                row.channel = manifest_channel(item.fields, parties) or 0
            except ValueError as exc:
                row.error, row.error_kind = f"row {item.row}: {exc}", "bad_party"
                continue
        if spans:
            try:
                row.span = parse_span(item.fields.get("start", ""), item.fields.get("end", ""))
            except ValueError as exc:
                row.error, row.error_kind = f"row {item.row}: {exc}", "bad_span"
                continue
        elif item.duplicate_of is not None:
            row.excluded = f"duplicate of row {item.duplicate_of}"
            continue
        key = (item.path, row.span, row.channel)
        if key in seen:
            row.excluded = f"duplicate of row {seen[key]}"
        else:
            seen[key] = item.row
    return rows


def parse_span(start: str, end: str) -> tuple[float, float] | None:
    """(start, end) seconds of a labelled span; None when both cells are empty (whole file)."""
    if not start.strip() and not end.strip():
        return None
    try:
        a, b = float(start), float(end)
    except ValueError:
        raise ValueError(f"start/end must be seconds, got {start!r}, {end!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and 0 <= a < b <= MAX_DURATION_S):
        raise ValueError(f"need 0 <= start < end <= {MAX_DURATION_S:g} s, got {a:g}, {b:g}")
    if (b - a) * SAMPLE_RATE < MIN_SAMPLES:
        raise ValueError(f"span of {b - a:g} s is shorter than one model frame")
    return a, b


async def embed_rows(
    rows: list[Row],
    client: TritonEmotionClient,
    options: JobOptions,
    cache: EmbeddingCache | None,
    log: Callable[[str], None] = lambda message: None,
) -> None:
    """Fill `embedded` (or `error` / `excluded`) of every row still to do, in place.

    `client` must be connected. Raises ServerUnavailable when the server goes away; the
    rows embedded so far are already in the cache.
    """
    todo = [row for row in rows if row.error is None and row.excluded is None]
    options = replace(options, segment=options.segment or SegmentMode("vad"))
    requests = asyncio.Semaphore(options.concurrency)
    workers = max(2, options.concurrency // 2)
    decoders = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="e2v-decode")
    hashes: dict[str, asyncio.Task] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for row in todo:
        queue.put_nowait(row)
    done = [0]

    async def worker() -> None:
        while not queue.empty():
            row = queue.get_nowait()
            await _embed_row(row, client, options, cache, requests, decoders, hashes)
            done[0] += 1
            if done[0] % 100 == 0:
                log(f"embedded {done[0]}/{len(todo)} rows")

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        decoders.shutdown(wait=False, cancel_futures=True)


async def _embed_row(row, client, options, cache, requests, decoders, hashes) -> None:
    path = row.item.path
    if path not in hashes:  # one hash per file, however many spans it has
        hashes[path] = asyncio.ensure_future(asyncio.to_thread(file_sha256, path))
    try:
        sha256 = await hashes[path]
    except (OSError, ValueError) as exc:  # ValueError: a name the OS refuses
        reason = getattr(exc, "strerror", None) or exc
        row.error, row.error_kind = one_line(f"cannot read {path}: {reason}"), "unreadable"
        return
    key = cache.key(sha256, str(options.segment), row.span, row.channel) if cache else None
    if cache is not None and (hit := cache.get(key, client.info.embed_dim)) is not None:
        row.embedded = hit
        _mark_no_speech(row)
        return
    try:
        if row.span is None:
            row.embedded = await _embed_file(path, row.channel, client, options, requests, decoders)
        else:
            row.embedded = await _embed_span(
                path, row.span, row.channel, client, options, requests, decoders
            )
    except ServerUnavailable:
        raise
    except _RowFailed as exc:
        row.error, row.error_kind = exc.message, exc.kind
        return
    except AudioError as exc:
        row.error, row.error_kind = one_line(str(exc)), exc.kind
        return
    except InferenceError as exc:
        row.error, row.error_kind = one_line(f"server rejected the request: {exc}"), "inference"
        return
    except ServerError as exc:
        row.error, row.error_kind = one_line(f"server error: {exc}"), "server"
        return
    except Exception as exc:  # noqa: BLE001 - one row's failure must not stop training
        row.error, row.error_kind = one_line(f"unexpected {type(exc).__name__}: {exc}"), "internal"
        return
    if cache is not None:
        await asyncio.to_thread(cache.put, key, row.embedded)
    _mark_no_speech(row)


def _mark_no_speech(row: Row) -> None:
    if row.embedded is not None and len(row.embedded.embeddings) == 0:
        row.excluded = "no speech found (try --segment none or fixed:SECONDS for non-speech)"


class _RowFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, one_line(message)


async def _embed_file(path, channel, client, options, requests, decoders) -> Embedded:
    result = await classify_source(path, client, requests, options, decoders, name=path)
    result = party_result(result, channel)
    if not result.ok:
        raise _RowFailed(result.error_kind or "internal", result.error or "failed")
    vectors = [segment.embedding for segment in result.segments]
    bounds = [(segment.start_s, segment.end_s) for segment in result.segments]
    return _embedded(vectors, bounds, result.duration_s or 0.0, client.info.embed_dim)


async def _embed_span(path, span, channel, client, options, requests, decoders) -> Embedded:
    """Decode `path` up to the span's end, cut it (from `channel` alone unless None),
    segment it, and embed every segment."""
    loop = asyncio.get_running_loop()
    max_segment_s = client.info.max_samples / SAMPLE_RATE
    pieces, covered = await loop.run_in_executor(
        decoders, _cut_span, path, span, options.segment, max_segment_s, channel
    )

    async def embed(samples: np.ndarray) -> np.ndarray:
        async with requests:
            return (await client.predict(samples)).embedding

    vectors = await asyncio.gather(*(embed(samples) for _, samples in pieces))
    bounds = [(span[0] + s.start_s, span[0] + s.end_s) for s, _ in pieces]
    return _embedded(list(vectors), bounds, covered / SAMPLE_RATE, client.info.embed_dim)


def _cut_span(path, span, mode, max_segment_s, channel=None) -> tuple[list, int]:
    """([(segment, samples)], samples covered) for the span [start, end) of `path` (cut
    at the audio's end; one channel's samples unless `channel` is None), holding only
    the span in memory."""
    first, last = (round(t * SAMPLE_RATE) for t in span)
    kept, position = [], 0
    for chunk in stream_audio(path, max_duration_s=MAX_DURATION_S, mix=channel is None):
        if channel is not None:
            if channel >= len(chunk):
                raise _RowFailed(
                    "channels", f"the file has {len(chunk)} channel(s), the row names {channel}"
                )
            chunk = chunk[channel]
        lo, hi = max(first - position, 0), min(last - position, len(chunk))
        if lo < hi:
            kept.append(chunk[lo:hi])
        position += len(chunk)
        if position >= last:
            break
    if position <= first:
        ends = position / SAMPLE_RATE
        raise _RowFailed("bad_span", f"span starts at {span[0]:g} s, the audio ends at {ends:g} s")
    audio = np.concatenate(kept)
    pieces = segment_stream([audio], mode, max_segment_s)
    return [(s, samples) for s, samples in pieces if len(samples) >= MIN_SAMPLES], len(audio)


def _embedded(vectors: list, bounds: list, duration_s: float, dim: int) -> Embedded:
    embeddings = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), dim)
    return Embedded(embeddings, np.asarray(bounds, dtype=np.float64).reshape(-1, 2), duration_s)
