"""Audio work of live sessions, off the event loop: one shared thread pool, and a pump
that hands it many sessions' steps at a time.

Decoding, resampling and the VAD of one 20 ms frame take tens of microseconds; handing
each frame to a thread and back would cost about as much again (measured: a fifth of the
gateway's CPU at 40 calls). Steps submitted during one turn of the event loop therefore
leave together, split over the pool's threads, and come back with one wake-up of the
loop per thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import weakref
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def audio_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The threads every session's audio work shares (ONNX Runtime and numpy release the
    GIL; one per core)."""
    return concurrent.futures.ThreadPoolExecutor(
        max(2, os.cpu_count() or 1), thread_name_prefix="e2v-live"
    )


class AudioPump:
    """Runs audio steps in `executor`, many per thread hand-off (see the module).

    A session keeps at most one step out at a time, so its chunks stay in order."""

    def __init__(self, executor: concurrent.futures.Executor, threads: int) -> None:
        self._executor, self._threads = executor, max(1, threads)
        self._pending: list[tuple[Callable, tuple, asyncio.Future]] = []
        # One pump per loop (pump_for); a weak reference, so a closed loop can go.
        self._loop = weakref.ref(asyncio.get_running_loop())

    def run(self, fn: Callable, *args) -> asyncio.Future:
        loop = self._loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._dispatch)
        self._pending.append((fn, args, future))
        return future

    def _dispatch(self) -> None:
        steps, self._pending = self._pending, []
        groups = min(self._threads, len(steps))
        for i in range(groups):
            try:
                self._executor.submit(self._run, steps[i::groups])
            except RuntimeError as exc:  # the pool is shut down (gateway stopping)
                self._resolve([(f, None, exc) for _, _, f in steps[i::groups]])

    def _run(self, steps: list) -> None:
        done = []
        for fn, args, future in steps:
            try:
                done.append((future, fn(*args), None))
            except Exception as exc:  # noqa: BLE001 - handed to the step's session
                done.append((future, None, exc))
        loop = self._loop()
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(self._resolve, done)

    @staticmethod
    def _resolve(done: list) -> None:
        for future, value, exc in done:
            if future.cancelled():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(value)


_PUMPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> {executor: pump}


def pump_for(executor: concurrent.futures.Executor) -> AudioPump:
    """The pump of this event loop for `executor`."""
    pumps = _PUMPS.setdefault(asyncio.get_running_loop(), {})
    if executor not in pumps:
        threads = getattr(executor, "_max_workers", os.cpu_count() or 1)
        pumps[executor] = AudioPump(executor, threads)
    return pumps[executor]
