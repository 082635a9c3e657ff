"""`/v1/live`, our own protocol (docs/live.md): a JSON `start`, binary audio frames, `stop`.

    client                                   gateway
    {"type": "start", "encoding": ...}  ->
                                         <-  {"type": "started", "session_id", "call_id", ...}
    binary audio (interleaved frames)   ->   events: utterance.start, result, utterance.end,
    ...                                      alert (as they happen)
    {"type": "stop"}                    ->
                                         <-  the last finals, `summary`, close 1000

Any bound or bad message ends the session with an `error` event and a close code
(e2v/contract.py CLOSE_*). A client that disconnects without `stop` still has its call
finished: the finals and the summary go to subscribers and webhooks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from e2v.client.live.hub import LiveHub, Outbox
from e2v.client.live.session import LiveError, LiveSession, LiveSettings, StreamFormat
from e2v.client.live.sockets import Socket
from e2v.client.results import model_labels

from e2v.contract import (
    CLOSE_BAD_MESSAGE,
    CLOSE_INTERNAL,
    CLOSE_TIMEOUT,
    LIVE_MAX_CHANNELS,
)

log = logging.getLogger("e2v.live")

CALL_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_PARTIES = {1: ("caller",), 2: ("customer", "agent")}
START_FIELDS = frozenset(
    {
        "type",
        "call_id",
        "encoding",
        "sample_rate",
        "channels",
        "parties",
        "window_s",
        "hop_s",
        "alerts",
        "alert_windows",
    }
)
MAX_ALERT_WINDOWS = 100
# `stop` -> every final scored and the summary sent, within this (Triton restarting
# included: the scheduler retries finals); past it the session ends with CLOSE_INTERNAL.
FINISH_S = 120.0
INTERNAL_MESSAGE = "internal error (a bug; the gateway log has details)"


def bad(kind: str, message: str) -> LiveError:
    return LiveError(CLOSE_BAD_MESSAGE, kind, message)


async def serve(websocket, hub: LiveHub) -> None:
    """One /v1/live connection, from the upgrade to the close."""
    socket = Socket(websocket, hub.limits.max_message_bytes)
    try:
        await socket.accept(hub.gateway.config.api_key, query_key=True)
        outbox = hub.admit()
    except LiveError as exc:
        await socket.close(exc)
        return
    with outbox:  # the slot is held until the close frame is sent (the drain waits for it)
        socket.attach(outbox)
        error, published = None, False
        try:
            start = await _handshake(socket, outbox, hub.limits.handshake_s)
            call_id, fmt, settings = parse_start(start)
            async with hub.session(call_id, fmt, settings, outbox=outbox) as (session, _):
                published = True  # from here the hub publishes the error event
                outbox.put(started(hub, session))
                await _stream(socket, session, outbox, hub)
        except LiveError as exc:
            error = exc
        except Exception:  # a bug: this session's own close, never the gateway's
            log.exception("live session failed")
            error = LiveError(CLOSE_INTERNAL, "internal", INTERNAL_MESSAGE)
            published = False
        await socket.close(error, published)


async def _handshake(socket: Socket, outbox: Outbox, timeout_s: float) -> dict:
    try:
        message = await socket.next(outbox, timeout_s)
    except asyncio.TimeoutError:
        raise LiveError(
            CLOSE_TIMEOUT, "handshake", f"no start message within {timeout_s:g} s"
        ) from None
    if message is None:
        raise bad("order", "the client left before start")
    if isinstance(message, bytes):
        raise bad("order", "audio before the start message")
    start = parse_json(message)
    if start["type"] != "start":
        raise bad("order", f"the first message must be start, not {start['type']!r}")
    return start


async def _stream(socket: Socket, session: LiveSession, outbox: Outbox, hub: LiveHub) -> None:
    """Audio and messages until `stop` (or the client leaves); the summary is published."""
    limits, fmt = hub.limits, session.fmt
    second_bytes = fmt.frame_bytes * fmt.sample_rate
    pace = hub.pace()
    loop = asyncio.get_running_loop()
    last_audio = loop.time()
    while True:
        idle_left = limits.idle_s - (loop.time() - last_audio)
        try:
            message = await socket.next(outbox, idle_left)
        except asyncio.TimeoutError:
            raise LiveError(CLOSE_TIMEOUT, "idle", f"no audio for {limits.idle_s:g} s") from None
        if message is None:  # gone without stop: finish for subscribers and webhooks
            outbox.close()
            await _finish(hub, session, outbox)
            return
        if isinstance(message, bytes):
            pace.take(len(message) / second_bytes)
            if message:  # empty frames are no audio: they keep nothing alive
                # Not guarded: feed waits only while this session's audio is processed.
                await session.feed(message)
                last_audio = loop.time()
            continue
        request = parse_json(message)
        if request["type"] == "stop":
            await _finish(hub, session, outbox)
            return
        if request["type"] == "start":
            raise bad("order", "start was already received")
        raise bad("type", f"unknown message type {request['type']!r}: start or stop")


async def _finish(hub: LiveHub, session: LiveSession, outbox: Outbox) -> None:
    try:  # shielded: a drain deadline meanwhile waits for this same finish
        await outbox.guard(asyncio.shield(hub.finishing(session)), FINISH_S)
    except asyncio.TimeoutError:
        raise LiveError(
            CLOSE_INTERNAL, "finish_timeout", f"finals not scored within {FINISH_S:g} s"
        ) from None


def parse_json(text: str) -> dict:
    """A JSON object with a string `type`; LiveError(CLOSE_BAD_MESSAGE) otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        raise bad("malformed", "a text message that is not JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("malformed", 'a text message must be a JSON object with a "type"')
    return value


def parse_start(start: dict) -> tuple[str | None, StreamFormat, LiveSettings]:
    """The call id, stream format and settings of a `start` message (docs/live.md)."""
    unknown = sorted(set(start) - START_FIELDS)
    if unknown:
        raise bad("start", f"unknown start field(s): {', '.join(unknown)}")
    call_id = start.get("call_id")
    if call_id is not None and (not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id)):
        raise bad("call_id", "call_id must match [A-Za-z0-9._:-]{1,128}")
    channels = start.get("channels", 1)
    if not _integer(channels) or not 1 <= channels <= LIVE_MAX_CHANNELS:
        raise bad("channels", f"channels must be 1 to {LIVE_MAX_CHANNELS}")
    parties = start.get("parties", DEFAULT_PARTIES[channels])
    if not isinstance(parties, (list, tuple)) or len(parties) != channels:
        raise bad("parties", f"parties must list {channels} name(s), one per channel")
    rate = start.get("sample_rate")
    if not _integer(rate):
        raise bad("sample_rate", "sample_rate must be an integer: 8000 or 16000")
    encoding = start.get("encoding")
    if not isinstance(encoding, str):
        raise bad("encoding", "encoding must be pcm_s16le, mulaw or alaw")
    fmt = StreamFormat(encoding, rate, tuple(parties))
    windows = start.get("alert_windows", LiveSettings.alert_windows)
    if not _integer(windows) or not 1 <= windows <= MAX_ALERT_WINDOWS:
        raise bad("alert_windows", f"alert_windows must be 1 to {MAX_ALERT_WINDOWS}")
    options = {k: start[k] for k in ("window_s", "hop_s", "alerts") if k in start}
    return call_id, fmt, LiveSettings(**options, alert_windows=windows)


def started(hub: LiveHub, session: LiveSession) -> dict:
    """The answer to `start`: ids, the model (synthetic models' labels mean nothing), the
    parties and the bounds this session runs under."""
    limits, info = hub.limits, session.info
    return {
        "type": "started",
        "session_id": hub.session_id(session),
        "call_id": session.call_id,
        "model": info.name,
        "synthetic": info.synthetic,
        "labels": model_labels(info),
        "parties": list(session.fmt.parties),
        "window_s": session.settings.window_s,
        "hop_s": session.settings.hop_s,
        "limits": {
            "max_message_bytes": limits.max_message_bytes,
            "max_speed": limits.max_speed,
            "burst_s": limits.burst_s,
            "idle_s": limits.idle_s,
            "max_duration_s": limits.max_duration_s,
            "outbox_events": limits.outbox_events,
            "outbox_bytes": limits.outbox_bytes,
        },
    }


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
