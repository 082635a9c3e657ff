"""Windows of every live session -> Triton, through the gateway's one TritonEmotionClient.

Each window is an ordinary request of a contract bucket shape (scores only: live events
carry no embedding), and many are in flight at
once (bounded), so Triton's dynamic batcher groups windows of different calls. Under
overload the scheduler degrades visibly, never silently:
- a final (an utterance's whole segment) is never dropped: it waits for a slot ahead of
  any interim, and a failed request is retried with capped backoff, across a Triton
  restart, until it succeeds or its session ends (cancellation);
- each key (session, party) has at most one interim in flight, so a slow model makes
  windows wait here, where they are counted, instead of queueing inside Triton and coming
  back late; one call cannot take more than its share of the slots either;
- an interim window still waiting for a slot is replaced by the newer window of the same
  key: the newer one carries how many it replaced (`coalesced`), and an interim that fails
  is reported as None rather than retried (a newer one is coming).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
from e2v.client.triton import InferenceError, Prediction, ServerError, TritonEmotionClient

# Finals: backoff between attempts doubles from FINAL_BACKOFF_S up to this (each attempt
# already retries inside the client), so a restart of any length is waited out.
FINAL_BACKOFF_S = 0.5
FINAL_BACKOFF_CAP_S = 5.0
# A final the server keeps failing on (its own errors, not unavailability) gives up after
# this many attempts (minutes, at the capped backoff), so one poison input cannot hold a
# session open for ever; an unavailable server is waited for without limit.
FINAL_SERVER_ERRORS = 20
# An interim older than this is no longer news: it gives up (done(None)).
INTERIM_TIMEOUT_S = 10.0

Done = Callable[[Prediction | None, int], None]
log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    samples: np.ndarray
    size: int | None
    done: Done
    coalesced: int
    since: float


@dataclass
class SchedulerStats:
    """Counters, exported by the hub in /metrics."""

    finals: int = 0  # finals scored
    final_retries: int = 0  # failed final attempts that were retried
    interims: int = 0  # interim windows scored
    coalesced: int = 0  # interim windows replaced by a newer one before they were sent
    interim_failures: int = 0  # interim windows that failed (reported as None)
    stale: int = 0  # interim results not sent: their utterance's final was cut meanwhile


class Scheduler:
    """Bounded requests in flight; finals first and retried; interims coalesced per key."""

    def __init__(
        self,
        client: TritonEmotionClient,
        max_in_flight: int = 64,
        interim_timeout_s: float = INTERIM_TIMEOUT_S,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight}")
        self.client = client
        self.max_in_flight = max_in_flight
        self.interim_timeout_s = interim_timeout_s
        self.stats = SchedulerStats()
        self._free = max_in_flight
        self._finals: deque[asyncio.Future] = deque()  # finals waiting for a slot
        self._interims: OrderedDict[Hashable, _Waiting] = OrderedDict()
        self._sending: set[Hashable] = set()  # keys with an interim in flight
        self._tasks: set[asyncio.Task] = set()

    @property
    def in_flight(self) -> int:
        return self.max_in_flight - self._free

    @property
    def waiting(self) -> int:
        return len(self._finals) + len(self._interims)

    async def final(self, samples: np.ndarray) -> Prediction:
        """The prediction for an utterance: retried until it succeeds (or is cancelled).

        Raised: InferenceError (the server refuses this input: retrying cannot help) and
        ServerError after FINAL_SERVER_ERRORS attempts that the server failed."""
        delay, server_errors = FINAL_BACKOFF_S, 0
        while True:
            await self._acquire()
            try:
                prediction = await self.client.predict(samples, embedding=False)
            except InferenceError:
                raise
            except ServerError:
                server_errors += 1
                if server_errors >= FINAL_SERVER_ERRORS:
                    raise
                self.stats.final_retries += 1
            except Exception:  # noqa: BLE001 - unavailable, restart, connection: retry
                self.stats.final_retries += 1
            else:
                self.stats.finals += 1
                return prediction
            finally:
                self._release()
            await asyncio.sleep(delay)
            delay = min(FINAL_BACKOFF_CAP_S, delay * 2)

    def interim(
        self,
        key: Hashable,
        samples: np.ndarray,
        done: Done,
        size: int | None = None,
        skipped: int = 0,
    ) -> None:
        """Score `samples` (padded to the bucket of `size` samples) and call `done` once
        with the prediction (None on failure) and the windows this one replaced.

        A window of `key` still waiting is replaced: its `done` is never called.
        `skipped`: windows the caller already left out for this one (counted the same)."""
        replaced = self._interims.pop(key, None)
        coalesced = skipped
        self.stats.coalesced += skipped
        if replaced is not None:
            coalesced += replaced.coalesced + 1
            self.stats.coalesced += 1
        self._interims[key] = _Waiting(samples, size, done, coalesced, time.monotonic())
        self._dispatch()

    def forget(self, key: Hashable) -> None:
        """Drop the waiting window of `key` (its session ended)."""
        self._interims.pop(key, None)

    async def close(self) -> None:
        """Cancel interims in flight (finals belong to their sessions' tasks)."""
        self._interims.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ slots

    async def _acquire(self) -> None:
        if self._free > 0 and not self._finals:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._finals.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as we were cancelled
            else:
                self._finals.remove(waiter)
            raise

    def _release(self) -> None:
        while self._finals:
            waiter = self._finals.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to a waiting final
                return
        self._free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        if self._finals or not self._interims:
            return
        for key in [k for k in self._interims if k not in self._sending]:  # oldest first
            if self._free <= 0:
                return
            window = self._interims.pop(key)
            self._free -= 1
            self._sending.add(key)
            task = asyncio.create_task(self._send_interim(key, window))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_interim(self, key: Hashable, window: _Waiting) -> None:
        prediction = None
        try:
            left = self.interim_timeout_s - (time.monotonic() - window.since)
            if left > 0:
                prediction = await asyncio.wait_for(
                    self.client.predict(window.samples, window.size, embedding=False), left
                )
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - any failure of an interim is reported as None
            prediction = None
        finally:
            self._sending.discard(key)  # before the release, which dispatches this key's next
            self._release()
        if prediction is None:
            self.stats.interim_failures += 1
        else:
            self.stats.interims += 1
        try:
            window.done(prediction, window.coalesced)
        except Exception:  # a bug in one session's callback must not reach the others
            log.exception("interim result callback failed")
