"""Admission: a fixed number of requests at work, a short bounded queue, refusal beyond it.

A request takes a slot once its body is in (bodies arriving are bounded apart, by
uploads.UploadPool, so slow senders hold no slot), and keeps it while its audio is
decoded and classified: decoding threads and Triton requests are bounded by the slot
count. A request is refused before its body is read when the slots and the queue are
already full (`check_room`). When every slot is taken, a few requests may wait briefly
for one; the rest, and those whose wait runs out, are refused at once with 429 and
Retry-After. Overload is pushed back to the senders (or to the
autoscaler, through the in-flight and queued gauges), never absorbed into memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from e2v.client.gateway.errors import BUSY, GatewayError


class Admission:
    def __init__(self, slots: int, queue: int, wait_s: float):
        if slots < 1 or queue < 0 or wait_s < 0:
            raise ValueError("slots must be >= 1, queue and wait >= 0")
        self.slots, self.queue, self.wait_s = slots, queue, wait_s
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def check_room(self) -> None:
        """429 now, before a body is read, when a slot could not be had."""
        if self.active >= self.slots and len(self._waiters) >= self.queue:
            raise self._busy()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.active < self.slots and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue:
            raise self._busy()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:  # 3.10: not TimeoutError
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over just as the wait ended: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._busy() from None

    def _release(self) -> None:
        """Hand the slot to the oldest waiter (the active count stays), or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    def _busy(self) -> GatewayError:
        return GatewayError(
            429,
            BUSY,
            f"busy: {self.active} requests in progress and {len(self._waiters)} waiting "
            f"(the gateway's --concurrency); retry later",
        )
