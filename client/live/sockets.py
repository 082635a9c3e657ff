"""A live WebSocket, whatever its protocol: accepted, messages in bounded and read by the
session's own task, events out through a writer task, other messages sent bounded in time,
closed with a code and a reason. The session path (connection.py) drives it.

Refusals are sent after the accept, as the protocol words them and a close code, because
a browser (and most WebSocket libraries) cannot read an HTTP answer to an upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from e2v.client.live.errors import LiveError
from e2v.client.live.limits import CLOSE_WAIT_S, SEND_TIMEOUT_S
from e2v.client.live.outbox import Outbox

from e2v.contract import CLOSE_BAD_MESSAGE, CLOSE_NORMAL, CLOSE_SLOW_READER, CLOSE_TOO_BIG

log = logging.getLogger("e2v.live")

# A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455, 5.5).
MAX_REASON_BYTES = 123
# What `Socket.next` returns when it was woken by the drain and no message waits.
WOKEN = object()
# An outbox event as the protocol's text frame (None: not sent on this socket).
Frame = Callable[[dict, str], "str | None"]


def _gone_errors() -> tuple[type[Exception], ...]:
    """The errors that mean the client is gone (starlette's, uvicorn's OSError, the OS's)."""
    from starlette import websockets

    named = ("WebSocketDisconnect", "WebSocketDisconnected")
    found = tuple(getattr(websockets, n) for n in named if hasattr(websockets, n))
    return (OSError, RuntimeError, *found)


_GONE = _gone_errors()
_TIMEOUT, _WAKE = object(), object()  # what wakes `Socket.next` besides a message


class Socket:
    """One accepted WebSocket. `next` gives text or bytes (None once the client has gone);
    after `attach(outbox, frame)` a writer task sends the outbox's events in order, and
    `send` other messages between them."""

    def __init__(self, websocket, max_message_bytes: int):
        self.ws = websocket
        self.max_message_bytes = max_message_bytes
        self.outbox: Outbox | None = None
        self.gone = False
        self.writer: asyncio.Task | None = None
        self._waiting: asyncio.Task | None = None  # the task in `next`, while it waits
        self._interrupted: object | None = None  # why `next` was woken: _TIMEOUT or _WAKE
        self._lock = asyncio.Lock()  # one message at a time on the wire, in order
        self._deadline: float | None = None  # of the `next` waiting now (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.query_key: str | None = None  # `?key=`, when the protocol takes one

    @property
    def headers(self):
        return self.ws.headers

    async def accept(self, query_key: bool = False) -> None:
        """Accept the upgrade; LiveError(CLOSE_NORMAL, "gone") if the client left. With
        `query_key` (browsers cannot set headers), `?key=` is taken into `query_key` and
        removed from the request first, so no access log line shows it."""
        if query_key:
            self.query_key = _pop_query_key(self.ws.scope)
        try:
            await self.ws.accept()
        except _GONE:
            self.gone = True
            raise LiveError(CLOSE_NORMAL, "gone", "the client left during the upgrade") from None

    # ------------------------------------------------------------------ receiving

    async def receive(self) -> str | bytes | None:
        """The next message; None when the client has closed. LiveError(CLOSE_TOO_BIG)
        past the message limit."""
        try:
            message = await self.ws.receive()
        except _GONE:
            message = {"type": "websocket.disconnect"}
        if message["type"] == "websocket.disconnect":
            self.gone = True
            return None
        data = message.get("bytes")
        if data is None:
            data = message.get("text")
            if data is None:
                raise LiveError(CLOSE_BAD_MESSAGE, "malformed", "an empty WebSocket message")
            size = len(data) if len(data) * 4 <= self.max_message_bytes else len(data.encode())
        else:
            size = len(data)
        if size > self.max_message_bytes:
            raise LiveError(
                CLOSE_TOO_BIG,
                "too_big",
                f"a message of {size} bytes: the limit is {self.max_message_bytes}",
            )
        return data

    async def next(self, timeout_s: float | None, stoppable: bool = True) -> str | bytes | None:
        """`receive`, unless `timeout_s` passes first (asyncio.TimeoutError), the session
        is stopped (its reason is raised; not when `stoppable` is False: a close
        transaction), or the gateway starts draining (WOKEN, once). The hot path of every
        message: the caller's task reads the socket itself (no reader task, no queue hop);
        the socket's one timer, its stop and the drain interrupt that read, which loses no
        message (uvicorn's queue keeps it for the next read)."""
        outbox = self.outbox if stoppable else None
        if outbox is not None and outbox.stopped.done():
            raise outbox.stopped.result()
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout_s is None else loop.time() + max(0.0, timeout_s)
        if self._deadline is not None and (self._timer is None or self._timer_at > self._deadline):
            self._arm(self._deadline)
        self._waiting = asyncio.current_task()
        try:
            item = await self.receive()
        except asyncio.CancelledError:
            item, self._interrupted = self._interrupted, None
            if item is None:
                raise  # cancelled from outside: the session ends
            _uncancel(self._waiting)
        finally:
            self._waiting, self._deadline = None, None  # no timeout between calls
        if outbox is not None and outbox.stopped.done():
            raise outbox.stopped.result()
        if item is _TIMEOUT:
            raise asyncio.TimeoutError
        if item is _WAKE:
            return WOKEN
        return item

    def _arm(self, at: float) -> None:
        """One timer per socket, moved only when a deadline comes earlier: a message moves
        the idle deadline later, and the timer re-arms itself when it fires early."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_at(at, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        if self._deadline > asyncio.get_running_loop().time():
            self._arm(self._deadline)  # a message came meanwhile: the deadline moved
        else:
            self._deadline = None
            self._wake(_TIMEOUT)

    def _wake(self, marker: object) -> None:
        """Interrupt a `next` waiting for a message, with `marker` as its answer."""
        waiting = self._waiting
        if waiting is not None and self._interrupted is None:
            self._interrupted = marker
            waiting.cancel()

    # ------------------------------------------------------------------ sending

    def attach(self, outbox: Outbox, frame: Frame) -> None:
        """Send `outbox`'s events from now on (a writer task per socket), each as
        `frame(event, text)` makes it. The outbox's stop and drain wake `next`."""
        self.outbox = outbox
        outbox.stopped.add_done_callback(lambda _: self._wake(_WAKE))
        outbox.draining.add_done_callback(lambda _: self._wake(_WAKE))
        self.writer = asyncio.create_task(self._write(outbox, frame))

    async def _write(self, outbox: Outbox, frame: Frame) -> None:
        try:
            while (item := await outbox.get()) is not None:
                async with self._lock:
                    text = frame(*item)
                    if text is not None:
                        await self.ws.send_text(text)
        except _GONE:
            self.gone = True
            outbox.close()  # nobody reads it: events stop queueing (subscribers still get them)

    async def send(self, make_text: Callable[[], str], timeout_s: float = SEND_TIMEOUT_S) -> None:
        """One message outside the outbox, in order with its events (`make_text` runs when
        its turn comes: AudioHook numbers messages). LiveError(CLOSE_SLOW_READER) when the
        client does not take it within `timeout_s`; nothing when it has gone."""
        try:
            await asyncio.wait_for(self._send(make_text), timeout_s)
        except asyncio.TimeoutError:
            raise LiveError(
                CLOSE_SLOW_READER, "slow_reader", f"the client has not read for {timeout_s:g} s"
            ) from None
        except _GONE:
            self.gone = True

    async def _send(self, make_text: Callable[[], str]) -> None:
        async with self._lock:
            await self.ws.send_text(make_text())

    async def refuse(self, event: dict, text: str | None) -> None:
        """The message that says why the socket closes (`text`, the event as the protocol
        frames it): last in the outbox, or sent at once (CLOSE_WAIT_S at most, errors
        ignored) when there is none or it is closed."""
        if self.outbox is not None and self.outbox.put(event, last=True):
            return
        if text is None or self.gone:
            return
        with contextlib.suppress(LiveError):
            await self.send(lambda: text, CLOSE_WAIT_S)

    # ------------------------------------------------------------------ closing

    async def flush(self) -> None:
        """Send what the outbox holds, CLOSE_WAIT_S at most; no more events after this."""
        if self.outbox is not None:
            self.outbox.close()
        if self.writer is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.writer), CLOSE_WAIT_S)
        except asyncio.TimeoutError:
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)
            log.info("live socket: events not read in %g s; closing anyway", CLOSE_WAIT_S)

    async def close(self, error: LiveError | None) -> None:
        """Stop reading, then the close frame (unless the client has gone), bounded: 1000,
        or `error`'s code and reason."""
        code, reason = (CLOSE_NORMAL, "done") if error is None else (error.code, str(error))
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
        if self.gone:
            return
        self.gone = True  # closed once
        with contextlib.suppress(asyncio.TimeoutError, *_GONE):
            await asyncio.wait_for(self.ws.close(code, close_reason(reason)), CLOSE_WAIT_S)


def _uncancel(task: asyncio.Task) -> None:
    """Take back our own interruption (Python 3.11+ counts cancellations)."""
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


def close_reason(text: str) -> str:
    """`text` cut to a close frame's 123 bytes, on a character boundary."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


def _pop_query_key(scope: dict) -> str | None:
    """The `key` query value, removed from the scope's query string."""
    from urllib.parse import parse_qsl, urlencode

    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    keys = [v for k, v in pairs if k == "key"]
    if keys:
        rest = [(k, v) for k, v in pairs if k != "key"]
        scope["query_string"] = urlencode(rest).encode("latin-1")
    return keys[0] if keys else None
