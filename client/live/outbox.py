"""One socket's (or subscriber's) side of the hub: a bounded queue of events, the session
slot it holds, and why its session must stop.

Events go in as (event, JSON text): the text is made once per event, whoever receives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

from e2v.client.live.errors import LiveError

from e2v.contract import CLOSE_BAD_MESSAGE, CLOSE_SLOW_READER, EVENT_ERROR

T = TypeVar("T")

# Outbox items past the bound that are still let in: the one error event before a close.
ERROR_HEADROOM = 1


class Outbox:
    """One socket's side of the hub, from its accept to its close: the session slot it
    holds, its bounded queue of events, the reason, once there is one, that its session
    must stop (`stopped`; raised by `guard`), and whether the gateway drains (`draining`).

    `put` never blocks: past `max_events` or `max_bytes` it refuses the event and stops
    the session with CLOSE_SLOW_READER. Items are (event, JSON text)."""

    def __init__(self, max_events: int, max_bytes: int, on_release=None):
        self.max_events, self.max_bytes = max_events, max_bytes
        self.bytes = 0
        self._items: deque[tuple[dict, str]] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._on_release = on_release
        loop = asyncio.get_running_loop()
        self.stopped: asyncio.Future[Exception] = loop.create_future()
        self.draining: asyncio.Future[None] = loop.create_future()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """No more puts (`close`): what is left is being read out."""
        return self._closed

    def put(self, event: dict, text: str | None = None, *, last: bool = False) -> bool:
        """Queue `event` (its JSON `text`, made here if not given); False once closed or
        full. `last`: the error event before a close, let in past the bound."""
        if self._closed:
            return False
        text = text if text is not None else event_json(event)
        headroom = ERROR_HEADROOM if last else 0
        if len(self._items) >= self.max_events + headroom or self.bytes + len(
            text
        ) > self.max_bytes + headroom * len(text):
            self.stop(
                LiveError(
                    CLOSE_SLOW_READER,
                    "slow_reader",
                    f"the client is not reading its events ({len(self._items)} queued, "
                    f"{self.bytes} bytes): closed",
                )
            )
            return False
        self._items.append((event, text))
        self.bytes += len(text)
        self._ready.set()
        return True

    async def get(self) -> tuple[dict, str] | None:
        """The next item; None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        event, text = self._items.popleft()
        self.bytes -= len(text)
        return event, text

    def close(self) -> None:
        """No more puts; `get` returns what is left, then None."""
        self._closed = True
        self._ready.set()

    def stop(self, reason: Exception) -> None:
        """End the session with `reason` (the first reason wins)."""
        if not self.stopped.done():
            self.stopped.set_result(reason)

    def drain(self) -> None:
        """Tell the socket that the gateway drains (a protocol may act on it: AudioHook)."""
        if not self.draining.done():
            self.draining.set_result(None)

    async def guard(self, awaitable: Awaitable[T], timeout_s: float | None = None) -> T:
        """`awaitable`'s result, unless the session is stopped first (the reason is raised)
        or `timeout_s` passes (asyncio.TimeoutError); either way the awaitable is cancelled."""
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait(
                {task, self.stopped}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self.stopped.done():
            raise self.stopped.result()
        raise asyncio.TimeoutError

    def release(self) -> None:
        """Give the session slot back (idempotent)."""
        if self._on_release is not None:
            release, self._on_release = self._on_release, None
            release(self)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def error_event(exc: Exception, call_id: str | None, seq: int = 1) -> dict:
    """The `error` event sent before a close that is not 1000."""
    event = {
        "type": EVENT_ERROR,
        "call_id": call_id,
        "seq": seq,
        "party": None,
        "start_s": None,
        "end_s": None,
        "code": getattr(exc, "code", CLOSE_BAD_MESSAGE),
        "error_kind": getattr(exc, "kind", "error"),
        "message": str(exc),
    }
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        event["retry_after_s"] = retry
    return event


def event_json(event: dict) -> str:
    """Compact JSON, ASCII (so its length is its size in bytes); numpy scalars and arrays
    become numbers and lists. Made once per event: every socket, subscriber, webhook (its
    bytes) and protocol frame carries this same text."""
    return json.dumps(event, separators=(",", ":"), allow_nan=False, default=_plain)


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")
