"""The classification job: files -> decode -> segment -> Triton -> per-file results.

Each file streams: a worker thread decodes and segments it while its segments are already
in flight, and a bounded queue between them holds memory to a few segments per file.
Results reach the writer as each file finishes, so a long batch job loses nothing when
it stops. Every failure that belongs to one file becomes that file's error row; only an
unreachable server stops the job (and `--resume` finishes it).

With `JobOptions.parties` (`--channels split`) the file is decoded once with its channels
kept apart: each channel has its own resampler, VAD and cutter, and its segments make
that party's result (client/parties.py), the same as the channel alone in a mono file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from e2v.client.audio import AudioError, AudioSource, stream_audio
from e2v.client.inputs import open_input
from e2v.client.names import display_name, one_line
from e2v.client.parties import split_result
from e2v.client.results import FileResult, aggregate, restrict_scores, segment_result
from e2v.client.segment import Segment, SegmentCutter, SegmentMode, segment_stream
from e2v.client.triton import (
    InferenceError,
    ServerError,
    ServerUnavailable,
    TritonEmotionClient,
)

from e2v.contract import (
    MAX_DURATION_S,
    MIN_SAMPLES,
    MODEL_NAME,
    SAMPLE_RATE,
    TRITON_REQUESTS_IN_FLIGHT,
    TRITON_RETRIES,
    TRITON_URL,
)

# Segments decoded ahead of the requests, per file: enough to keep requests flowing.
SEGMENTS_AHEAD = 4


@dataclass(frozen=True)
class JobOptions:
    url: str = TRITON_URL
    protocol: str = "grpc"
    model: str = MODEL_NAME
    segment: SegmentMode | None = None  # None: VAD
    concurrency: int = TRITON_REQUESTS_IN_FLIGHT  # requests in flight
    thresholds: dict[str, float] | None = None
    retries: int = TRITON_RETRIES
    max_duration_s: float = MAX_DURATION_S
    workers: int = 0  # decoding threads in each process; 0: one per core, at least 2
    processes: int = 1  # worker processes (--workers): >1 spreads files over processes
    labels: tuple[str, ...] | None = None  # --labels: scores renormalised over these
    # --channels split: one party per channel, named in order (None: channels mixed)
    parties: tuple[str, ...] | None = None
    # split: --alert thresholds per party (None: `thresholds` for every party)
    party_thresholds: dict[str, dict[str, float]] | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"decoding threads must be >= 0, not {self.workers}")
        if self.processes < 1:
            raise ValueError(f"--workers must be >= 1, not {self.processes}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {self.concurrency}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, not {self.retries}")
        if not 0 < self.max_duration_s < float("inf"):
            raise ValueError(f"max duration must be a positive number of seconds, not {self}")
        if self.parties is not None and not self.parties:
            raise ValueError("--channels split needs at least one party name")


@dataclass
class StageTimes:
    """Where one file's time went (filled in when passed to `classify_source`)."""

    decode_s: float = 0.0  # demux, decode, resample (worker thread)
    vad_s: float = 0.0  # segmentation (worker thread)
    inference_s: list[float] = field(default_factory=list)  # each Triton call, with retries


async def classify_files(
    items: Iterable[str | FileResult],
    client: TritonEmotionClient,
    options: JobOptions,
    on_result: Callable[[FileResult], None],
    on_audio: Callable[[float], None] | None = None,
) -> None:
    """Classify every path or URI with a connected `client`, calling `on_result` once per
    item as it completes (an item that is already a FileResult, e.g. an input that could
    not be listed, is passed through). `items` is consumed lazily, in a worker thread, so
    it may be a long stream that lists object storage.

    Raises ServerUnavailable (after retries) when the server goes away: items not yet
    reported are left for a `--resume` run. Everything runs in this process: the batch
    job spreads files over worker processes itself (`options.processes`,
    client/batch/workers.py), each running this function.
    """
    requests = asyncio.Semaphore(options.concurrency)
    threads = options.workers or max(2, os.cpu_count() or 1)
    # More files in flight than decoding threads: short files have one request each, and
    # the dynamic batcher needs `concurrency` of them at once.
    workers = max(threads, options.concurrency)
    source = SharedIterator(iter(items))
    decoders = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="e2v-decode")

    async def worker() -> None:
        while (item := await source.next()) is not None:
            if isinstance(item, FileResult):
                on_result(item)
                continue
            result = await classify_source(item, client, requests, options, decoders)
            if on_audio and result.duration_s:
                on_audio(result.duration_s)
            on_result(result)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await _gather_stop_on_unavailable(tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        decoders.shutdown(wait=False, cancel_futures=True)


class SharedIterator:
    """One iterator shared by the workers; each `next` runs in a thread (listing may block)."""

    def __init__(self, iterator: Iterator):
        self._iterator = iterator
        self._lock = asyncio.Lock()

    async def next(self):
        async with self._lock:
            return await asyncio.to_thread(next, self._iterator, None)


async def _gather_stop_on_unavailable(tasks: list[asyncio.Task]) -> None:
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error


async def classify_source(
    source: AudioSource,
    client: TritonEmotionClient,
    requests: asyncio.Semaphore,
    options: JobOptions,
    decoders: concurrent.futures.Executor | None = None,
    name: str | None = None,
    times: StageTimes | None = None,
) -> FileResult:
    """One file's result, or its error row. Only ServerUnavailable escapes.

    `times`, when given, receives the time spent decoding, segmenting and in inference."""
    info = client.info if client.info is not None else await client.connect()
    label = name if name is not None else display_name(str(source))

    def error(kind: str, message: str) -> FileResult:
        return FileResult(
            file=label,
            error=one_line(message),
            error_kind=kind,
            model=info.name,
            synthetic=info.synthetic,
        )

    try:
        found, producer = await _predict_stream(
            source, client, requests, options, decoders, times or StageTimes()
        )
    except ServerUnavailable:
        raise
    except ChannelsError as exc:
        return error("channels", str(exc))
    except AudioError as exc:
        return error(exc.kind, str(exc))
    except InferenceError as exc:
        return error("inference", f"server rejected the request: {exc}")
    except ServerError as exc:
        return error("server", f"server error (retried; --resume tries again): {exc}")
    except MemoryError:
        return error("internal", "out of memory while processing this file")
    except Exception as exc:  # noqa: BLE001 - one file's failure must not stop the job
        return error("internal", f"unexpected {type(exc).__name__}: {exc}")
    results = [(channel, segment_result(s, p, info)) for channel, s, p in found]
    if options.labels:
        for _, result in results:
            result.scores = restrict_scores(result.scores, options.labels)
    duration_s = producer.samples / SAMPLE_RATE
    if options.parties is None:
        segments = [result for _, result in results]
        return aggregate(label, duration_s, segments, info, options.thresholds or {})
    names = options.parties[: producer.channels]
    return _split(label, duration_s, results, names, info, options)


def _split(label, duration_s, results, names: tuple[str, ...], info, options) -> FileResult:
    """Channel i is party i (`names`): its segments alone, its own alert thresholds."""
    thresholds = options.party_thresholds
    if thresholds is None:
        thresholds = {name: options.thresholds or {} for name in names}
    by_channel = [(name, [r for c, r in results if c == i]) for i, name in enumerate(names)]
    return split_result(label, duration_s, by_channel, info, thresholds)


async def _predict_stream(source, client, requests, options, decoders, times):
    """[(channel, segment, prediction)] and the producer (samples, channels), requests
    sent while decoding."""
    tasks: list[asyncio.Task] = []
    segments: list[tuple[int, Segment]] = []
    producer = _SegmentProducer(source, options, client.info.max_samples, times)
    try:
        async for channel, segment, samples in producer.run(decoders):
            if len(samples) < MIN_SAMPLES:
                continue
            await requests.acquire()
            segments.append((channel, segment))
            tasks.append(asyncio.create_task(_predict(client, samples, requests, times)))
        predictions = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [(c, s, p) for (c, s), p in zip(segments, predictions)], producer


async def _predict(client: TritonEmotionClient, samples: np.ndarray, requests, times):
    start = time.perf_counter()
    try:
        return await client.predict(samples)
    finally:
        requests.release()
        times.inference_s.append(time.perf_counter() - start)


class ChannelsError(ValueError):
    """A `--channels split` file with more channels than party names."""


class _Stopped(Exception):
    """The consumer went away: the decoding thread stops at its next step."""


class _SegmentProducer:
    """Decodes and segments one source in a worker thread, feeding a bounded queue with
    (channel, segment, samples): channel 0 of the mix, or each channel on its own
    (`options.parties`: one decode, one resampler, VAD and cutter per channel)."""

    def __init__(
        self, source: AudioSource, options: JobOptions, max_samples: int, times: StageTimes
    ):
        self.source, self.times = source, times
        self.mode = options.segment or SegmentMode("vad")
        self.max_segment_s = max_samples / SAMPLE_RATE
        self.max_duration_s = options.max_duration_s
        self.parties = options.parties
        self.samples = 0  # per channel
        self.channels = 0
        self._stop = threading.Event()

    async def run(self, decoders) -> AsyncIterator[tuple[int, Segment, np.ndarray]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(SEGMENTS_AHEAD)
        thread = loop.run_in_executor(decoders, self._produce, loop, queue)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "segment":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            self._stop.set()
            while not queue.empty():  # unblock a put in flight
                queue.get_nowait()
            await asyncio.gather(thread, return_exceptions=True)

    def _produce(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        segments = self._mixed() if self.parties is None else self._split(self.parties)
        try:
            while (item := self._timed_next(segments)) is not None:
                self._put(loop, queue, ("segment", item))
            self._put(loop, queue, ("done", None))
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which decides
            try:
                self._put(loop, queue, ("error", exc))
            except _Stopped:
                return

    def _mixed(self) -> Iterator[tuple[int, Segment, np.ndarray]]:
        self.channels = 1
        for segment, samples in segment_stream(
            self._chunks(), self.mode, self.max_segment_s, self._count
        ):
            yield 0, segment, samples

    def _split(self, parties: tuple[str, ...]) -> Iterator[tuple[int, Segment, np.ndarray]]:
        """`segment_stream` per channel, fed from one decode of (channels, n) chunks."""
        cutters: list[SegmentCutter] = []
        for chunk in self._chunks(mix=False):
            if not cutters:
                self._check_channels(len(chunk), parties)
                cutters = [SegmentCutter(self.mode, self.max_segment_s) for _ in chunk]
            self._count(chunk.shape[-1])
            for channel, (cutter, row) in enumerate(zip(cutters, chunk)):
                for segment, samples in cutter.push(row):
                    yield channel, segment, samples
        for channel, cutter in enumerate(cutters):
            for segment, samples in cutter.finish():
                yield channel, segment, samples

    def _check_channels(self, channels: int, parties: tuple[str, ...]) -> None:
        if channels > len(parties):
            names = ",".join(parties)
            raise ChannelsError(
                f"{channels} channels but {len(parties)} party name(s) ({names}): "
                f"give --parties one name per channel"
            )
        self.channels = channels

    def _timed_next(self, segments: Iterator) -> tuple[int, Segment, np.ndarray] | None:
        """The next segment or None; the time taken, less decoding, counts as VAD."""
        decoded, start = self.times.decode_s, time.perf_counter()
        try:
            return next(segments, None)
        finally:
            self.times.vad_s += time.perf_counter() - start - (self.times.decode_s - decoded)

    def _chunks(self, mix: bool = True) -> Iterator[np.ndarray]:
        named = isinstance(self.source, (str, Path))
        source = self.source
        if isinstance(source, (str, Path)):
            source = open_input(str(source))
        name = display_name(str(self.source)) if named else None
        chunks = stream_audio(source, max_duration_s=self.max_duration_s, name=name, mix=mix)
        try:
            while True:
                start = time.perf_counter()
                try:
                    chunk = next(chunks, None)
                finally:
                    self.times.decode_s += time.perf_counter() - start
                if chunk is None:
                    return
                if self._stop.is_set():
                    raise _Stopped
                yield chunk
        finally:
            if named:
                source.close()

    def _count(self, samples: int) -> None:
        self.samples += samples

    def _put(self, loop, queue: asyncio.Queue, item) -> None:
        future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    future.cancel()
                    raise _Stopped from None


__all__ = [
    "ChannelsError",
    "JobOptions",
    "ServerUnavailable",
    "StageTimes",
    "classify_files",
    "classify_source",
]
