"""The gateway's live endpoints (docs/live.md): `add_live_routes(app, gateway)`.

    WS  /v1/live                          our protocol (native.py)
    WS  /v1/audiohook, /v1/twilio         telephony protocols (audiohook.py, twilio.py)
    GET /v1/calls/{call_id}/events        Server-Sent Events of one call
    WS  /v1/calls/{call_id}/events/ws     the same events as JSON text frames

Subscriptions take the gateway's key in a header (Authorization: Bearer or X-API-Key).
The SSE stream numbers events by `seq` (`id:`), so a client that reconnects with
Last-Event-ID gets the recent events it missed.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures.

import asyncio
import contextlib

from client.live import native
from client.live.hub import LiveHub, Outbox, error_event, event_json
from client.live.session import LiveError
from client.live.sockets import Socket
from e2v.contract import (
    AUDIOHOOK_PATH,
    CALL_EVENTS_PATH,
    CALL_EVENTS_WS_PATH,
    CLOSE_BAD_MESSAGE,
    LIVE_PATH,
    TWILIO_PATH,
)

# SSE: a comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
# What a reconnecting EventSource waits (the SSE `retry:` field), in milliseconds.
SSE_RETRY_MS = 5000
SUBSCRIBER_MESSAGE_BYTES = 4096  # subscribers send nothing; a little slack for pings
CALL_ID_RULE = "call_id must match [A-Za-z0-9._:-]{1,128}"
SSE_HEADERS = {"X-Accel-Buffering": "no"}  # nginx: do not buffer the stream


def add_live_routes(app, gateway) -> None:
    """Register the live endpoints on `app` (the gateway's FastAPI app)."""
    from fastapi import Path, Request, WebSocket
    from fastapi.responses import StreamingResponse

    from client.gateway.app import check_key
    from client.gateway.errors import BAD_PARAMETER, GatewayError
    from client.gateway.schemas import ErrorOut

    hub: LiveHub = gateway.live

    @app.websocket(LIVE_PATH)
    async def live(websocket: WebSocket):
        await native.serve(websocket, hub)

    for path, module, name in (
        (AUDIOHOOK_PATH, "client.live.audiohook", "serve_audiohook"),
        (TWILIO_PATH, "client.live.twilio", "serve_twilio"),
    ):
        handler = _protocol_handler(module, name)
        if handler is not None:
            app.add_api_websocket_route(path, _bind(handler, hub))

    @app.get(
        CALL_EVENTS_PATH,
        tags=["live"],
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "events of the call"},
            400: {"model": ErrorOut, "description": "call_id is not [A-Za-z0-9._:-]{1,128}"},
            401: {"model": ErrorOut, "description": "API key missing or wrong"},
        },
    )
    async def call_events(
        request: Request,
        # Published, and checked below (a 400 that names the rule): not validated twice.
        call_id: str = Path(json_schema_extra={"pattern": f"^{native.CALL_ID.pattern}$"}),
    ):
        """Server-Sent Events: every event of the live call `call_id` (`event:` is its
        type, `id:` its seq, `data:` its JSON), until its summary; waits up to
        --live-subscribe-wait-s (30 s) for a call that has not started. A refusal or an
        overflow comes as an `error` event."""
        check_key(request, gateway.config.api_key)
        if not native.CALL_ID.fullmatch(call_id):
            raise GatewayError(400, BAD_PARAMETER, CALL_ID_RULE)
        after = request.headers.get("last-event-id", "")
        after_seq = int(after) if after.isdigit() and len(after) < 12 else 0
        return StreamingResponse(
            _sse(hub, call_id, after_seq), media_type="text/event-stream", headers=SSE_HEADERS
        )

    @app.websocket(CALL_EVENTS_WS_PATH)
    async def call_events_ws(websocket: WebSocket, call_id: str):
        await _subscription_socket(websocket, hub, call_id)


def _protocol_handler(module: str, name: str):
    """A telephony protocol's `serve(websocket, hub)`, once its module is there."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None


def _bind(handler, hub: LiveHub):
    from fastapi import WebSocket

    async def endpoint(websocket: WebSocket):
        await handler(websocket, hub)

    return endpoint


async def _sse(hub: LiveHub, call_id: str, after_seq: int):
    yield f"retry: {SSE_RETRY_MS}\n\n"
    try:
        with hub.subscription(call_id, after_seq) as queue:
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


async def _subscription_socket(websocket, hub: LiveHub, call_id: str) -> None:
    """Events of `call_id` as text frames until the call ends (close 1000). The client
    sends nothing: a message from it, or its close, ends the subscription."""
    socket = Socket(websocket, SUBSCRIBER_MESSAGE_BYTES)
    try:
        await socket.accept(hub.gateway.config.api_key, query_key=False)
        if not native.CALL_ID.fullmatch(call_id):
            raise LiveError(CLOSE_BAD_MESSAGE, "call_id", CALL_ID_RULE)
        with hub.subscription(call_id) as queue:
            socket.attach(queue)
            await _until_done(socket, queue)
    except LiveError as exc:
        await socket.close(exc)
        return
    await socket.close()


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
