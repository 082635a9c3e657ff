"""A live WebSocket, whatever its protocol: accepted, authenticated, messages in bounded,
events out through the hub's Outbox, closed with a code and a reason.

Refusals are sent after the accept, as an `error` event and a close code, because a
browser (and most WebSocket libraries) cannot read an HTTP answer to an upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from e2v.client.live.hub import CLOSE_WAIT_S, Outbox, error_event, event_json
from e2v.client.live.session import LiveError

from e2v.contract import CLOSE_BAD_MESSAGE, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TOO_BIG

log = logging.getLogger("e2v.live")

# A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455, 5.5).
MAX_REASON_BYTES = 123


def _gone_errors() -> tuple[type[Exception], ...]:
    """The errors that mean the client is gone (starlette's, uvicorn's OSError, the OS's)."""
    from starlette import websockets

    named = ("WebSocketDisconnect", "WebSocketDisconnected")
    found = tuple(getattr(websockets, n) for n in named if hasattr(websockets, n))
    return (OSError, RuntimeError, *found)


_GONE = _gone_errors()
_TIMEOUT, _STOPPED = object(), object()  # what wakes `Socket.next` besides a message


class Socket:
    """One accepted WebSocket. `receive` gives text or bytes (None once the client has
    gone); after `attach(outbox)` a writer task sends the outbox's events in order."""

    def __init__(self, websocket, max_message_bytes: int):
        self.ws = websocket
        self.max_message_bytes = max_message_bytes
        self.outbox: Outbox | None = None
        self.gone = False
        self.writer: asyncio.Task | None = None
        self._inbox: asyncio.Queue | None = None
        self._reader: asyncio.Task | None = None

    async def accept(self, key: bytes | None, query_key: bool) -> None:
        """Accept, then LiveError(CLOSE_POLICY) unless the key is right. `?key=` counts
        when `query_key` (browsers cannot set headers); it is removed from the scope first,
        so no access log line shows it."""
        supplied = _header_key(self.ws.headers)
        if query_key:
            from_query = _pop_query_key(self.ws.scope)
            supplied = supplied if supplied is not None else from_query
        try:
            await self.ws.accept()
        except _GONE:
            self.gone = True
            raise LiveError(CLOSE_NORMAL, "gone", "the client left during the upgrade") from None
        if key is None:
            return
        if not supplied:
            raise LiveError(
                CLOSE_POLICY,
                "unauthorized",
                "API key required (Authorization: Bearer KEY or X-API-Key"
                + (", or ?key= from a browser)" if query_key else ")"),
            )
        if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), key):
            raise LiveError(CLOSE_POLICY, "unauthorized", "wrong API key")

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

    async def next(self, outbox: Outbox, timeout_s: float) -> str | bytes | None:
        """`receive`, unless `timeout_s` passes first (asyncio.TimeoutError) or the session
        is stopped (its reason is raised). The hot path of every audio frame: a reader task
        reads one message ahead into a one-place queue, so no task is made per message."""
        if self._inbox is None:
            self._inbox = asyncio.Queue(1)
            self._reader = asyncio.create_task(self._read())
            outbox.stopped.add_done_callback(lambda _: self._wake(_STOPPED))
        if outbox.stopped.done():
            raise outbox.stopped.result()
        timer = asyncio.get_running_loop().call_later(max(0.0, timeout_s), self._wake, _TIMEOUT)
        try:
            item = await self._inbox.get()
        finally:
            timer.cancel()
        if outbox.stopped.done():
            raise outbox.stopped.result()
        if item is _TIMEOUT:
            raise asyncio.TimeoutError
        if isinstance(item, LiveError):
            raise item
        return item

    def _wake(self, marker: object) -> None:
        if self._inbox is not None and self._inbox.empty():
            self._inbox.put_nowait(marker)  # else a message waits: it is taken first

    async def _read(self) -> None:
        while True:
            try:
                item = await self.receive()
            except LiveError as exc:
                item = exc
            await self._inbox.put(item)
            if item is None or isinstance(item, LiveError):
                return

    def attach(self, outbox: Outbox) -> None:
        """Send `outbox`'s events from now on (a writer task per socket)."""
        self.outbox = outbox
        self.writer = asyncio.create_task(self._write(outbox))

    async def _write(self, outbox: Outbox) -> None:
        try:
            while (item := await outbox.get()) is not None:
                await self.ws.send_text(item[1])
        except _GONE:
            self.gone = True
            outbox.close()  # nobody reads it: events stop queueing (subscribers still get them)

    async def send_now(self, message: dict) -> None:
        """A message outside the outbox (before there is one), bounded in time."""
        with contextlib.suppress(asyncio.TimeoutError, *_GONE):
            await asyncio.wait_for(self.ws.send_text(event_json(message)), CLOSE_WAIT_S)

    async def close(self, error: LiveError | None = None, published: bool = False) -> None:
        """Flush the outbox (CLOSE_WAIT_S at most), then close: 1000, or `error`'s code
        and reason after its `error` event (sent here unless the hub `published` it)."""
        if error is not None and not published:
            event = error_event(error, None)
            if self.outbox is None or not self.outbox.put(event, last=True):
                await self.send_now(event)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.outbox is not None:
            self.outbox.close()
        if self.writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.writer), CLOSE_WAIT_S)
            except asyncio.TimeoutError:
                self.writer.cancel()
                await asyncio.gather(self.writer, return_exceptions=True)
                log.info("live socket: events not read in %g s; closing anyway", CLOSE_WAIT_S)
        if self.gone:
            return
        code, reason = (CLOSE_NORMAL, "done") if error is None else (error.code, str(error))
        with contextlib.suppress(asyncio.TimeoutError, *_GONE):
            await asyncio.wait_for(self.ws.close(code, close_reason(reason)), CLOSE_WAIT_S)
        self.gone = True


def close_reason(text: str) -> str:
    """`text` cut to a close frame's 123 bytes, on a character boundary."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


def _header_key(headers) -> str | None:
    supplied = headers.get("x-api-key")
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if supplied is None and scheme.lower() == "bearer":
        supplied = token.strip()
    return supplied


def _pop_query_key(scope: dict) -> str | None:
    """The `key` query value, removed from the scope's query string."""
    from urllib.parse import parse_qsl, urlencode

    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    keys = [v for k, v in pairs if k == "key"]
    if keys:
        rest = [(k, v) for k, v in pairs if k != "key"]
        scope["query_string"] = urlencode(rest).encode("latin-1")
    return keys[0] if keys else None
