"""`--workers N`: the classification job spread over N worker processes.

Measured with `e2v bench client` on 2 cores, decoding and the VAD in threads do not scale
on short recordings (1.01x with 2 threads: per-frame Python work holds the GIL), worker
processes do (1.75x on utterances, 1.94x on 5-minute calls). Each worker process runs the
same pipeline as a single-process job (its own Triton client, streaming decode, requests
in flight) on batches of files; this process lists the inputs and writes every row, so
outputs, resume and shards work unchanged.

A worker that dies (a decoder crash on a hostile file, the OOM killer) fails only the
files it had in hand: they get an `internal` row, which `--resume` retries, and a fresh
pool takes over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import signal
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from client.results import FileResult
from client.triton import ServerUnavailable, TritonEmotionClient

# Batches per worker kept queued, so no worker waits for the next one.
BATCHES_AHEAD = 2

_worker: dict[str, Any] = {}  # per worker process: its event loop, client and options


async def classify_in_processes(
    items: Iterable[str | FileResult],
    client: TritonEmotionClient,
    options,
    on_result: Callable[[FileResult], None],
    on_audio: Callable[[float], None] | None = None,
) -> None:
    """`classify_files` with `options.processes` worker processes (see the module doc)."""
    from client.classify import _SharedIterator

    count = options.processes
    batch_size = max(1, options.concurrency // count)  # each worker's share of the requests
    worker_options = replace(options, processes=1, workers=1, concurrency=batch_size)
    settings = (client.url, client.protocol, client.model, client.retries, worker_options)
    source = _SharedIterator(iter(items))
    loop = asyncio.get_running_loop()
    pool = _new_pool(count, settings)
    pending: dict[asyncio.Future, list[str]] = {}
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < BATCHES_AHEAD * count:
                batch, exhausted = await _next_batch(source, batch_size, on_result)
                if batch:
                    pending[loop.run_in_executor(pool, _classify_batch, batch)] = batch
            if not pending:
                return
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                batch = pending.pop(future)
                try:
                    results, unavailable = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    results, unavailable = [_died(name) for name in batch], None
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = _new_pool(count, settings)
                for result in results:
                    if on_audio and result.duration_s:
                        on_audio(result.duration_s)
                    on_result(result)
                if unavailable:
                    raise ServerUnavailable(unavailable)
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


async def _next_batch(source, size: int, on_result) -> tuple[list[str], bool]:
    """Up to `size` names from the shared input stream; (batch, stream exhausted)."""
    batch: list[str] = []
    while len(batch) < size:
        item = await source.next()
        if item is None:
            return batch, True
        if isinstance(item, FileResult):  # an input that could not be listed
            on_result(item)
        else:
            batch.append(item)
    return batch, False


def _new_pool(count: int, settings: tuple) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(
        count,
        mp_context=multiprocessing.get_context("spawn"),  # no fork of gRPC or decoder threads
        initializer=_start_worker,
        initargs=settings,
    )


def _died(name: str) -> FileResult:
    from client.names import display_name

    return FileResult(
        file=display_name(name),
        error="a worker process died while this file was in hand (--resume retries it)",
        error_kind="internal",
    )


def _start_worker(url: str, protocol: str, model: str, retries: int, options) -> None:
    """In each worker process: one event loop and one connected Triton client."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the gRPC channel binds to the loop current at creation
    client = TritonEmotionClient(url, protocol, model, retries=retries)
    _worker.update(loop=loop, client=client, options=options, error=None)
    try:
        loop.run_until_complete(client.connect())
    except ServerUnavailable as exc:
        _worker["error"] = str(exc)


def _classify_batch(names: list[str]) -> tuple[list[FileResult], str | None]:
    """(results of the files finished, why the server became unreachable or None)."""
    from client.classify import classify_files

    if _worker["error"]:
        return [], _worker["error"]
    results: list[FileResult] = []
    job = classify_files(names, _worker["client"], _worker["options"], results.append)
    try:
        _worker["loop"].run_until_complete(job)
    except ServerUnavailable as exc:
        return results, str(exc)
    return results, None
