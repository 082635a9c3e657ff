"""`--workers N`: the classification job spread over N worker processes.

Measured with `e2v bench client` on 2 cores, decoding and the VAD in threads do not scale
on short recordings (1.01x with 2 threads: per-frame Python work holds the GIL), worker
processes do (1.75x on utterances, 1.94x on 5-minute calls). Each worker process runs the
same pipeline as a single-process job (its own Triton client, streaming decode, requests
in flight) on batches of files; this process lists the inputs and writes every row, so
outputs, resume and shards work unchanged.

Each worker has its own pipe: this process knows which batches each one holds, and each
row comes back as soon as its file is done. A worker that dies (a decoder crash on a
hostile file, the OOM killer) fails only the files it had in hand, the unfinished ones of
the batch it was working on: they get an `internal` row, which `--resume` retries. Its
batches not yet started go to the other workers, a fresh process takes its place, and
the other workers never notice. (concurrent.futures' process pool cannot do this: one
dead worker breaks the whole pool and fails every batch in flight.)
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from itertools import count as counter
from typing import Any

from e2v.client.classify import SharedIterator, classify_files
from e2v.client.names import display_name
from e2v.client.results import FileResult
from e2v.client.triton import ServerUnavailable, TritonEmotionClient

# Batches per worker sent ahead, so no worker waits for the next one.
BATCHES_AHEAD = 2
# Seconds a worker gets to finish after being told to stop, before it is killed.
STOP_S = 5.0


async def classify_in_processes(
    items: Iterable[str | FileResult],
    client: TritonEmotionClient,
    options,
    on_result: Callable[[FileResult], None],
    on_audio: Callable[[float], None] | None = None,
    requests: Counter | None = None,
) -> None:
    """`classify_files` with `options.processes` worker processes (see the module doc).
    `requests` gets the workers' Triton requests per replica as their batches end."""
    batch_size = max(1, options.concurrency // options.processes)  # each worker's share
    worker_options = replace(options, processes=1, workers=1, concurrency=batch_size)
    settings = (client.url, client.protocol, client.model, client.retries, worker_options)
    source = SharedIterator(iter(items))
    pool = _Pool(options.processes, settings, requests if requests is not None else Counter())

    def report(result: FileResult) -> None:
        if on_audio and result.duration_s:
            on_audio(result.duration_s)
        on_result(result)

    exhausted, finished = False, False
    try:
        while True:
            while pool.has_room() and (pool.retry or not exhausted):
                if pool.retry:
                    pool.submit(pool.retry.popleft())
                    continue
                batch, exhausted = await _next_batch(source, batch_size, on_result)
                if batch:
                    pool.submit(batch)
            if not pool.busy():
                finished = True
                return
            pool.handle(await pool.events.get(), report)
    finally:
        pool.stop(graceful=finished)


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


class _Worker:
    """One worker process, its pipe, and the batches it holds (in the order it runs them)."""

    def __init__(self, context, settings: tuple, events: asyncio.Queue):
        self.requests: Counter = Counter()  # its Triton requests per replica, last reported
        here, there = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(there, settings), daemon=True)
        self.process.start()
        there.close()
        self.conn = here
        self.batches: dict[int, list[str]] = {}  # batch id -> names not yet reported
        self.alive = True
        self._loop = asyncio.get_running_loop()
        self._events = events
        self._loop.add_reader(self.conn.fileno(), self._readable)
        self._loop.add_reader(self.process.sentinel, self._died)

    def _readable(self) -> None:
        try:
            while self.alive and self.conn.poll():
                self._events.put_nowait((self, self.conn.recv()))
        except (EOFError, OSError):
            self._died()

    def _died(self) -> None:
        if self.alive:
            self._readable_final()
            self.close()
            self._events.put_nowait((self, ("died",)))

    def _readable_final(self) -> None:
        """Rows the worker sent before it died are still in the pipe: keep them."""
        try:
            while self.conn.poll():
                self._events.put_nowait((self, self.conn.recv()))
        except (EOFError, OSError):
            pass

    def close(self) -> None:
        if self.alive:
            self.alive = False
            self._loop.remove_reader(self.conn.fileno())
            self._loop.remove_reader(self.process.sentinel)

    def send(self, message) -> None:
        with contextlib.suppress(OSError):  # it died: its sentinel reports it
            self.conn.send(message)


class _Pool:
    """`count` workers, replaced one by one as they die."""

    def __init__(self, count: int, settings: tuple, requests: Counter):
        self.count, self.settings = count, settings
        self.requests = requests  # every worker's, dead ones' included
        self.context = multiprocessing.get_context("spawn")  # no fork of gRPC or decoder threads
        self.events: asyncio.Queue = asyncio.Queue()
        self.workers = [_Worker(self.context, settings, self.events) for _ in range(count)]
        self.retry: deque[list[str]] = deque()  # batches a dead worker had not started
        self._ids = counter()
        self._idle_deaths = 0

    def has_room(self) -> bool:
        return any(w.alive and len(w.batches) < BATCHES_AHEAD for w in self.workers)

    def busy(self) -> bool:
        return bool(self.retry) or any(w.batches for w in self.workers)

    def submit(self, names: list[str]) -> None:
        alive = [w for w in self.workers if w.alive]  # a dead one waits for its replacement
        worker = min(alive, key=lambda w: len(w.batches))
        batch_id = next(self._ids)
        worker.batches[batch_id] = list(names)
        worker.send((batch_id, names))

    def handle(self, event: tuple[_Worker, tuple], report: Callable[[FileResult], None]) -> None:
        worker, message = event
        kind = message[0]
        if kind == "row":
            _, batch_id, result = message
            _forget(worker.batches.get(batch_id, []), result.file)
            report(result)
        elif kind == "end":
            _, batch_id, unavailable, requests = message
            worker.batches.pop(batch_id, None)
            self.requests.update(Counter(requests) - worker.requests)
            worker.requests = Counter(requests)
            if unavailable:
                raise ServerUnavailable(unavailable)
        elif kind == "died":
            self._replace(worker, report)

    def _replace(self, dead: _Worker, report: Callable[[FileResult], None]) -> None:
        """The dead worker's current batch fails (what is left of it); the rest is redone."""
        batches = list(dead.batches.values())
        dead.batches.clear()
        dead.process.join(1)
        if batches:
            self._idle_deaths = 0
            for name in batches[0]:
                report(_died(name))
            self.retry.extend(batches[1:])
        else:
            self._idle_deaths += 1
            if self._idle_deaths > self.count:  # dying before any work: no point going on
                code = dead.process.exitcode
                raise RuntimeError(f"worker processes keep dying (exit code {code})")
        self.workers[self.workers.index(dead)] = _Worker(self.context, self.settings, self.events)

    def stop(self, graceful: bool) -> None:
        """Tell every worker to stop; kill those still running after STOP_S (or at once
        when the job failed or was interrupted)."""
        for worker in self.workers:
            worker.close()
            worker.send(None)
        for worker in self.workers:
            if graceful:
                worker.process.join(STOP_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


def _forget(names: list[str], shown: str) -> None:
    """Drop the first of `names` whose row is called `shown` (a row came back for it)."""
    for i, name in enumerate(names):
        if display_name(name) == shown:
            del names[i]
            return


def _died(name: str) -> FileResult:
    return FileResult(
        file=display_name(name),
        error="a worker process died while this file was in hand (--resume retries it)",
        error_kind="internal",
    )


# ------------------------------------------------------------------ in the worker process


def _worker_main(conn, settings: tuple) -> None:
    """A worker: one event loop, one connected Triton client, batches until told to stop.
    Each row goes back as soon as its file is done, then ("end", id, unavailable, its
    requests per replica so far)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    url, protocol, model, retries, options = settings
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the gRPC channel binds to the loop current at creation
    client = TritonEmotionClient(url, protocol, model, retries=retries)
    error: str | None = None
    try:
        loop.run_until_complete(client.connect())
    except ServerUnavailable as exc:
        error = str(exc)
    try:
        while (message := _receive(conn)) is not None:
            batch_id, names = message
            unavailable = error
            if unavailable is None:
                job = classify_files(
                    names, client, options, lambda r, b=batch_id: conn.send(("row", b, r))
                )
                try:
                    loop.run_until_complete(job)
                except ServerUnavailable as exc:
                    unavailable = str(exc)
            conn.send(("end", batch_id, unavailable, dict(client.replica_requests())))
    finally:
        loop.run_until_complete(client.close())
        loop.close()


def _receive(conn) -> Any:
    try:
        return conn.recv()
    except EOFError:  # the parent went away
        return None
