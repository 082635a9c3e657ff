"""The live tier's endpoints (docs/live.md): `add_live_routes(app, hub)` registers the
WebSockets; the gateway registers the Server-Sent Events route (an HTTP route, with its
errors) around `event_stream`.

    WS  /v1/live                          our protocol (native.py)
    WS  /v1/audiohook, /v1/twilio         telephony protocols (audiohook.py, twilio.py)
    WS  /v1/calls/{call_id}/events/ws     the events of one call as JSON text frames
    GET /v1/calls/{call_id}/events        the same as Server-Sent Events (`event_stream`)

Subscriptions take the gateway's key in a header (Authorization: Bearer or X-API-Key); the
WebSocket also as `?key=` (a browser's, which cannot set headers).
The SSE stream numbers events by `seq` (`id:`), so a client that reconnects with
Last-Event-ID gets the events it missed (`?after=SEQ` on the WebSocket), within what the
bus keeps (client/live/bus.py: the last 64 in process, the stream's retention with --bus).
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures.

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

from e2v.client.live.audiohook import AudioHookWire
from e2v.client.live.connection import serve
from e2v.client.live.errors import LiveError, bad
from e2v.client.live.hub import LiveHub
from e2v.client.live.native import LiveWire
from e2v.client.live.outbox import Outbox, error_event, event_json
from e2v.client.live.services import authorize
from e2v.client.live.sockets import Socket
from e2v.client.live.twilio import TwilioWire

from e2v.contract import (
    AUDIOHOOK_PATH,
    CALL_EVENTS_WS_PATH,
    CALL_ID_PATTERN,
    LIVE_PATH,
    TWILIO_PATH,
)

# SSE: a comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
# What a reconnecting EventSource waits (the SSE `retry:` field), in milliseconds.
SSE_RETRY_MS = 5000
SUBSCRIBER_MESSAGE_BYTES = 4096  # subscribers send nothing; a little slack for pings
CALL_ID = re.compile(CALL_ID_PATTERN)
CALL_ID_RULE = f"call_id must match {CALL_ID_PATTERN}"
MISSING_KEY = "API key required (Authorization: Bearer KEY or X-API-Key)"
PROTOCOLS = {LIVE_PATH: LiveWire, AUDIOHOOK_PATH: AudioHookWire, TWILIO_PATH: TwilioWire}


def add_live_routes(app, hub: LiveHub) -> None:
    """Register the live WebSockets on `app` (a FastAPI or Starlette app)."""
    from fastapi import WebSocket

    for path, wire in PROTOCOLS.items():
        app.add_api_websocket_route(path, _endpoint(hub, wire))

    async def call_events_ws(websocket: WebSocket, call_id: str):
        after = after_seq(websocket.query_params.get("after"))
        await _subscription_socket(websocket, hub, call_id, after)

    app.add_api_websocket_route(CALL_EVENTS_WS_PATH, call_events_ws)


def _endpoint(hub: LiveHub, wire):
    from fastapi import WebSocket

    async def endpoint(websocket: WebSocket):
        await serve(websocket, hub, wire)

    return endpoint


def valid_call_id(call_id: str) -> bool:
    return CALL_ID.fullmatch(call_id) is not None


def after_seq(text: str | None) -> int:
    """The seq a subscriber resumes after: SSE's Last-Event-ID, the WebSocket's `?after=`
    (anything else: from the call's start)."""
    text = text or ""
    return int(text) if text.isdigit() and len(text) < 12 else 0


async def event_stream(hub: LiveHub, call_id: str, after_seq: int) -> AsyncIterator[str]:
    """Server-Sent Events of `call_id` (after `after_seq`) until its session ends; a
    refusal or an overflow as one `error` event."""
    yield f"retry: {SSE_RETRY_MS}\n\n"
    try:
        async with hub.subscription(call_id, after_seq) as queue:
            while True:
                try:
                    item = await queue.guard(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is None:
                    return
                event, text = item
                yield f"id: {event['seq']}\nevent: {event['type']}\ndata: {text}\n\n"
    except LiveError as exc:
        yield f"event: error\ndata: {event_json(error_event(exc, call_id))}\n\n"


async def _subscription_socket(websocket, hub: LiveHub, call_id: str, after: int = 0) -> None:
    """Events of `call_id` as text frames until the call ends (close 1000). The client
    sends nothing: a message from it, or its close, ends the subscription."""
    socket = Socket(websocket, SUBSCRIBER_MESSAGE_BYTES)
    error = None
    try:
        await socket.accept(query_key=True)  # the page's Calls view: browsers set no headers
        authorize(hub.services, socket.headers, socket.query_key, missing=MISSING_KEY)
        if not valid_call_id(call_id):
            raise bad("call_id", CALL_ID_RULE)
        async with hub.subscription(call_id, after) as queue:
            socket.attach(queue, _as_text)
            await _until_done(socket, queue)
    except LiveError as exc:
        error = exc
        event = error_event(exc, None)
        await socket.refuse(event, event_json(event))
    await socket.flush()
    await socket.close(error)


def _as_text(event: dict, text: str) -> str:
    return text


async def _until_done(socket: Socket, queue: Outbox) -> None:
    """Until the writer has sent everything (the call ended) or the client speaks or goes."""
    receiving = asyncio.ensure_future(socket.receive())
    try:
        await queue.guard(
            asyncio.wait({receiving, socket.writer}, return_when=asyncio.FIRST_COMPLETED)
        )
    finally:
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await receiving
