"""Audio work of every live session, in ticks, off the event loop.

A tick takes the audio each session has received since the previous tick and processes
all of it in one step of an audio thread: each party stream's new audio decoded and
resampled, then the VAD of every stream with new samples in one batched call
(`vad.feed_streams`, each stream's own probabilities, the same bits as alone), then each
stream's cutter and interim windows. The event loop only appends messages to their
session and, once per tick, hands the batch over and acts on what came back: no task, no
future and no thread hand-off per message, and ONNX Runtime runs a few calls per tick
instead of two per party and message.

Ticks start at most every TICK_S and one at a time (per event loop and executor), so the
audio of a busy gateway goes in fewer, larger steps, and a session's chunks stay in order.
A session fails alone: its decode or cut raising fails that session, not the tick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from e2v.client.live.party import Action, PartyStream, push_parties

# The least time between the starts of two ticks: audio waits at most this long before
# its work starts (plus a tick still running); at 100 ms frames a tick takes the frames
# of about a fifth of the calls.
TICK_S = 0.02

Actions = list[tuple[int, Action]]  # (party index, action), in order


class Ticking(Protocol):
    """A session as the ticks drive it (`LiveSession`)."""

    parties: list[PartyStream]

    def take_items(self) -> list[tuple]:
        """Loop side: the items queued since the last tick (they are then the tick's)."""

    def prepare(self, items: list[tuple]) -> tuple[list[tuple[int, np.ndarray]], list[tuple]]:
        """Audio thread: each party's audio of `items` up to the first control item,
        decoded at the source rate (at most one chunk per party), and the items left."""

    def process(self, items: list[tuple]) -> Actions:
        """Audio thread: `items` one by one (control items: pause, finish)."""

    def ticked(self, items: list[tuple], result: Actions | BaseException) -> None:
        """Loop side: the tick that took `items` is done: its actions, or why it failed."""


@functools.lru_cache(maxsize=1)
def audio_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The threads live audio work runs on (ONNX Runtime and numpy release the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(
        max(2, os.cpu_count() or 1), thread_name_prefix="e2v-live"
    )


class AudioTicks:
    """The ticks of one event loop over one executor (see the module)."""

    def __init__(self, executor: concurrent.futures.Executor, tick_s: float = TICK_S) -> None:
        self._executor, self.tick_s = executor, tick_s
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[Ticking, None] = {}  # sessions with items, in arrival order
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._last = float("-inf")

    def wake(self, session: Ticking) -> None:
        """`session` has items: they go in the next tick."""
        self._waiting[session] = None
        if not self._running and self._timer is None:
            self._schedule()

    def forget(self, session: Ticking) -> None:
        """`session` ended: its waiting items are not processed."""
        self._waiting.pop(session, None)

    def _schedule(self) -> None:
        delay = self._last + self.tick_s - self._loop.time()
        self._timer = self._loop.call_later(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        sessions, self._waiting = list(self._waiting), {}
        batch = [(s, items) for s in sessions if (items := s.take_items())]
        if not batch:
            return
        self._running, self._last = True, self._loop.time()
        try:
            future = self._loop.run_in_executor(self._executor, run_tick, batch)
        except RuntimeError as exc:  # the executor is shut down (the gateway is stopping)
            self._finish(batch, [exc] * len(batch))
            return
        future.add_done_callback(functools.partial(self._done, batch))

    def _done(self, batch: list, future: asyncio.Future) -> None:
        if future.cancelled():
            results: Sequence = [asyncio.CancelledError()] * len(batch)
        elif future.exception() is not None:
            results = [future.exception()] * len(batch)
        else:
            results = future.result()
        self._finish(batch, results)

    def _finish(self, batch: list, results: Sequence) -> None:
        self._running = False
        for (session, items), result in zip(batch, results, strict=True):
            session.ticked(items, result)
        if self._waiting and self._timer is None:
            self._schedule()


def run_tick(batch: list[tuple[Ticking, list[tuple]]]) -> list[Actions | BaseException]:
    """Audio thread: one tick's work (see the module); per session its actions, in its
    items' order, or the exception that failed it."""
    results: list[Actions | BaseException] = []
    rests: list[list[tuple]] = []
    parties: list[PartyStream] = []
    chunks: list[np.ndarray] = []
    owners: list[tuple[int, int]] = []  # (session, party index) of each chunk
    for k, (session, items) in enumerate(batch):
        results.append([])
        rests.append([])
        try:
            pushes, rests[k] = session.prepare(items)
        except Exception as exc:  # noqa: BLE001 - this session's failure only
            results[k] = exc
            continue
        for index, chunk in pushes:
            parties.append(session.parties[index])
            chunks.append(chunk)
            owners.append((k, index))
    _push(parties, chunks, owners, results)
    for k, (session, _) in enumerate(batch):
        if rests[k] and not isinstance(results[k], BaseException):
            results[k] = _guarded(results[k], session.process, rests[k])
    return results


def _push(parties, chunks, owners, results) -> None:
    """Every party's chunk of the tick, the VAD batched; actions to their sessions. The
    batched VAD failing (ONNX Runtime) fails the tick's sessions; a party's own failure
    fails its session."""
    try:
        pushed = push_parties(parties, chunks)
    except Exception as exc:  # noqa: BLE001 - handed to each session of the tick
        pushed = [exc] * len(parties)
    for (k, index), actions in zip(owners, pushed, strict=True):
        if isinstance(results[k], BaseException):
            continue
        if isinstance(actions, BaseException):
            results[k] = actions
        else:
            results[k].extend((index, action) for action in actions)


def _guarded(done: Actions, process: Callable[[list], Actions], items: list) -> Actions | Exception:
    try:
        return done + process(items)
    except Exception as exc:  # noqa: BLE001 - this session's failure only
        return exc


_TICKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> {executor: ticks}


def ticks_for(executor: concurrent.futures.Executor) -> AudioTicks:
    """The ticks of this event loop over `executor`."""
    ticks = _TICKS.setdefault(asyncio.get_running_loop(), {})
    if executor not in ticks:
        ticks[executor] = AudioTicks(executor)
    return ticks[executor]
