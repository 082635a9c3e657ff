"""`/v1/twilio`: Twilio Media Streams (`<Start><Stream track="both_tracks">`).

Twilio sends JSON text frames (twilio.com/docs/voice/media-streams/websocket-messages):
`connected` {protocol, version}, once `start` {sequenceNumber, streamSid, start: {streamSid,
accountSid, callSid, tracks, customParameters, mediaFormat {encoding "audio/x-mulaw",
sampleRate 8000, channels 1}}}, then `media` {media: {track, chunk, timestamp, payload}}
with base64 mu-law, `dtmf`, `mark`, and `stop`. Each track is a party, fed on its own
(`feed_channel`): inbound -> `caller`, outbound -> `callee`. A track's `timestamp` (ms from
the stream start) ahead of the audio received on it is a gap (Twilio sends no packets
while a leg is silent): it is filled with mu-law silence so both parties keep one clock.

No results go back on this socket (a one-way stream takes nothing back; a bidirectional
one only media, mark and clear): they reach `/v1/calls/{callSid}/events` subscribers and
webhooks. The call id is the `callSid`. `customParameters` (TwiML `<Parameter>`) may set
`window_s`, `hop_s`, `alerts`, `alert_windows`, and carry the API key as `api_key` (Twilio
cannot add headers or a query string to the stream URL); an `X-API-Key` or bearer header
counts too.

Everything is checked: order (`start` before media, one `start`, `sequenceNumber` one up
from the last, the start's `streamSid`), tracks, base64, sizes, the format. A failure
closes the socket with the contract's code and a reason. After `stop` (or when Twilio
drops the socket) the session is finished: open utterances end, finals and the summary
are published.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re

from e2v.client.live.hub import LiveHub, Outbox
from e2v.client.live.session import LiveError, LiveSettings, StreamFormat
from e2v.client.live.sockets import Socket

from e2v.contract import (
    CLOSE_BAD_MESSAGE,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TIMEOUT,
    CLOSE_TOO_BIG,
    CLOSE_TOO_FAST,
    TWILIO_PARTIES,
)

log = logging.getLogger("e2v.live.twilio")

RATE = 8000
ENCODING = "audio/x-mulaw"
SILENCE = b"\xff"  # mu-law zero
SID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DIGITS = re.compile(r"[0-9]{1,12}")
# A track may lag its timestamps by this much before the gap is filled (packet jitter).
GAP_TOLERANCE_MS = 60
MAX_PARAMETERS = 64  # customParameters entries (TwiML <Parameter> elements)
MAX_PARAMETER_CHARS = 4096
MAX_ALERT_WINDOWS = 100
FINISH_S = 120.0  # every final scored after `stop` (Triton restarts included)
EVENTS = ("connected", "start", "media", "stop", "mark", "dtmf")


def bad(kind: str, message: str) -> LiveError:
    return LiveError(CLOSE_BAD_MESSAGE, kind, message)


# ------------------------------------------------------------------------ parsing


def parse_message(text: str) -> dict:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise bad("malformed", "a text message that is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise bad("malformed", 'a Twilio message must be a JSON object with an "event"')
    if message["event"] not in EVENTS:
        raise bad("event", f"unknown event {message['event'][:40]!r}: one of {', '.join(EVENTS)}")
    return message


def _number(message: dict, *keys: str) -> int:
    """A decimal string field (Twilio sends numbers as strings), nested by `keys`."""
    value = message
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not DIGITS.fullmatch(value):
        raise bad("malformed", f"{'.'.join(keys)} must be a decimal number string")
    return int(value)


def _object(message: dict, key: str) -> dict:
    value = message.get(key)
    if not isinstance(value, dict):
        raise bad("malformed", f"a {message['event']} message needs a {key!r} object")
    return value


def parse_start(message: dict) -> tuple[str, str, tuple[str, ...], dict[str, str]]:
    """callSid, streamSid, tracks and customParameters of a `start` message."""
    start = _object(message, "start")
    call_sid, stream_sid = start.get("callSid"), start.get("streamSid")
    for name, value in (("callSid", call_sid), ("streamSid", stream_sid)):
        if not isinstance(value, str) or not SID.fullmatch(value):
            raise bad("start", f"start.{name} must match [A-Za-z0-9._:-]{{1,128}}")
    if message.get("streamSid", stream_sid) != stream_sid:
        raise bad("start", "streamSid differs from start.streamSid")
    tracks = start.get("tracks", ["inbound"])
    if (
        not isinstance(tracks, list)
        or not 1 <= len(tracks) <= len(TWILIO_PARTIES)
        or any(t not in TWILIO_PARTIES for t in tracks)
        or len(set(tracks)) != len(tracks)
    ):
        raise bad("tracks", "start.tracks must list inbound and/or outbound, once each")
    media = start.get("mediaFormat")
    if not isinstance(media, dict) or (
        media.get("encoding"),
        media.get("sampleRate"),
        media.get("channels", 1),
    ) != (ENCODING, RATE, 1):
        raise bad(
            "encoding",
            f"start.mediaFormat must be {ENCODING} at {RATE} Hz, one channel per track",
        )
    custom = start.get("customParameters", {})
    if (
        not isinstance(custom, dict)
        or len(custom) > MAX_PARAMETERS
        or any(not isinstance(v, str) or len(v) > MAX_PARAMETER_CHARS for v in custom.values())
    ):
        raise bad("start", f"start.customParameters: at most {MAX_PARAMETERS} string values")
    ordered = tuple(t for t in TWILIO_PARTIES if t in tracks)  # inbound first
    return call_sid, stream_sid, ordered, custom


def settings_of(custom: dict[str, str]) -> LiveSettings:
    """LiveSettings from customParameters (strings, as TwiML <Parameter> values are)."""
    values: dict = {}
    try:
        for name in ("window_s", "hop_s"):
            if name in custom:
                values[name] = float(custom[name])
        if "alert_windows" in custom:
            values["alert_windows"] = int(custom["alert_windows"])
    except ValueError:
        raise bad("start", "customParameters window_s, hop_s, alert_windows: numbers") from None
    if not 1 <= values.get("alert_windows", 1) <= MAX_ALERT_WINDOWS:
        raise bad("alert_windows", f"alert_windows must be 1 to {MAX_ALERT_WINDOWS}")
    if "alerts" in custom:
        values["alerts"] = custom["alerts"]
    return LiveSettings(**values)


def decode_payload(payload, max_bytes: int) -> bytes:
    """The mu-law bytes of a media payload: strict base64, at most `max_bytes` decoded."""
    if not isinstance(payload, str) or not payload:
        raise bad("payload", "media.payload must be a non-empty base64 string")
    if len(payload) > 4 * ((max_bytes + 2) // 3):
        raise LiveError(
            CLOSE_TOO_BIG, "too_big", f"a media payload over {max_bytes} bytes of audio"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad("payload", "media.payload is not valid base64") from None


# ------------------------------------------------------------------------ the stream


class TwilioStream:
    """One Media Streams connection: `connected`, `start`, tracks of audio, `stop`."""

    def __init__(self, websocket, hub: LiveHub):
        self.hub, self.limits = hub, hub.limits
        self.socket = Socket(websocket, self.limits.max_message_bytes)
        self.sequence: int | None = None  # the last sequenceNumber
        self.stream_sid: str | None = None
        self.tracks: tuple[str, ...] = ()
        self.samples: list[int] = []  # per track, silence fills included
        self.paces: list = []
        self.last_audio = 0.0
        self.first_media: float | None = None

    async def run(self) -> None:
        socket = self.socket
        try:
            await socket.accept(None, query_key=False)  # the key may come in `start`
            with self.hub.admit() as outbox:
                start = await self._until_start(outbox)
                call_sid, self.stream_sid, self.tracks, custom = parse_start(start)
                self._authenticate(custom)
                fmt = StreamFormat("mulaw", RATE, tuple(TWILIO_PARTIES[t] for t in self.tracks))
                settings = settings_of(custom)
                self.samples = [0] * len(self.tracks)
                self.paces = [self.hub.pace() for _ in self.tracks]
                async with self.hub.session(
                    call_sid, fmt, settings, outbox=outbox, protocol="twilio"
                ) as (session, _):
                    sink = asyncio.create_task(_discard(outbox))  # no events on this socket
                    try:
                        await self._stream(session, outbox)
                    finally:
                        sink.cancel()
                        await asyncio.gather(sink, return_exceptions=True)
        except LiveError as exc:
            log.info("twilio stream %s: %s (%s): %s", self.stream_sid, exc.kind, exc.code, exc)
            # Nothing but the close goes to Twilio; inside a session the hub has published
            # the error event to subscribers.
            await socket.close(exc, published=True)
            return
        await socket.close()

    def _authenticate(self, custom: dict[str, str]) -> None:
        key = self.hub.gateway.config.api_key
        if key is None:
            return
        headers = self.socket.ws.headers
        supplied = headers.get("x-api-key")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if supplied is None and scheme.lower() == "bearer":
            supplied = token.strip()
        if supplied is None:
            supplied = custom.get("api_key")
        if not supplied:
            raise LiveError(
                CLOSE_POLICY,
                "unauthorized",
                "API key required: customParameters api_key (or X-API-Key)",
            )
        if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), key):
            raise LiveError(CLOSE_POLICY, "unauthorized", "wrong API key")

    async def _next(self, outbox: Outbox, timeout_s: float, what: str) -> dict | None:
        """The next message, checked for order; None when Twilio closed the socket."""
        try:
            text = await outbox.guard(self.socket.receive(), max(0.0, timeout_s))
        except asyncio.TimeoutError:
            raise LiveError(CLOSE_TIMEOUT, what, _TIMEOUTS[what].format(self.limits)) from None
        if text is None:
            return None
        if isinstance(text, bytes):
            raise bad("binary", "Twilio Media Streams send JSON text frames only")
        message = parse_message(text)
        if message["event"] == "connected":
            if self.sequence is not None:
                raise bad("order", "connected after the stream started")
            return message
        number = _number(message, "sequenceNumber")
        if self.sequence is not None and number != self.sequence + 1:
            raise bad(
                "order", f"sequenceNumber {number} after {self.sequence}: messages out of order"
            )
        self.sequence = number
        if self.stream_sid is not None and message.get("streamSid") != self.stream_sid:
            raise bad("order", "a message of another streamSid")
        return message

    async def _until_start(self, outbox: Outbox) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.handshake_s
        while True:
            message = await self._next(outbox, deadline - loop.time(), "handshake")
            if message is None:
                raise bad("order", "the socket closed before start")
            if message["event"] == "start":
                return message
            if message["event"] != "connected":
                raise bad("order", f"{message['event']} before start")

    async def _stream(self, session, outbox: Outbox) -> None:
        loop = asyncio.get_running_loop()
        self.last_audio = loop.time()
        while True:
            idle_left = self.limits.idle_s - (loop.time() - self.last_audio)
            message = await self._next(outbox, idle_left, "idle")
            if message is None:  # dropped without stop: finish for subscribers and webhooks
                return await self._finish(session, outbox)
            event = message["event"]
            if event == "media":
                await self._media(session, outbox, message)
                self.last_audio = loop.time()
            elif event == "stop":
                return await self._finish(session, outbox)
            elif event == "start":
                raise bad("order", "a second start")
            elif event == "connected":
                raise bad("order", "connected after start")
            elif event == "mark":
                name = _object(message, "mark").get("name")
                if not isinstance(name, str):
                    raise bad("malformed", "mark.name must be a string")
            elif event == "dtmf":
                digit = _object(message, "dtmf").get("digit")
                if not isinstance(digit, str) or len(digit) != 1:
                    raise bad("malformed", "dtmf.digit must be one character")

    async def _media(self, session, outbox: Outbox, message: dict) -> None:
        media = _object(message, "media")
        track = media.get("track", self.tracks[0] if len(self.tracks) == 1 else None)
        if track not in self.tracks:
            raise bad(
                "track",
                f"media of track {str(track)[:20]!r}: the stream has {', '.join(self.tracks)}",
            )
        index = self.tracks.index(track)
        _number(message, "media", "chunk")
        timestamp_ms = _number(message, "media", "timestamp")
        audio = decode_payload(media.get("payload"), self.limits.max_message_bytes)
        self.paces[index].take(len(audio) / RATE)
        await self._fill_gap(session, outbox, index, timestamp_ms)
        self.samples[index] += len(audio)
        await outbox.guard(session.feed_channel(index, audio))

    async def _fill_gap(self, session, outbox: Outbox, index: int, timestamp_ms: int) -> None:
        """Silence up to `timestamp_ms` on a track that lags it (Twilio sent nothing for a
        while). Timestamps may run ahead of the wall clock no more than audio may."""
        now = asyncio.get_running_loop().time()
        self.first_media = self.first_media if self.first_media is not None else now
        allowed_s = (now - self.first_media) * self.limits.max_speed + self.limits.burst_s
        if timestamp_ms / 1000 > allowed_s:
            raise LiveError(
                CLOSE_TOO_FAST,
                "too_fast",
                f"media timestamp {timestamp_ms} ms runs ahead of real time "
                f"({self.limits.max_speed:g}x after a {self.limits.burst_s:g} s burst)",
            )
        gap = timestamp_ms * RATE // 1000 - self.samples[index]
        if gap * 1000 <= GAP_TOLERANCE_MS * RATE:
            return
        while gap > 0:  # a second at a time: memory stays one message's worth
            part = min(gap, RATE)
            await outbox.guard(session.feed_channel(index, SILENCE * part))
            self.samples[index] += part
            gap -= part

    async def _finish(self, session, outbox: Outbox) -> None:
        try:
            await outbox.guard(session.finish(), FINISH_S)
        except asyncio.TimeoutError:
            raise LiveError(
                CLOSE_INTERNAL, "finish_timeout", f"finals not scored within {FINISH_S:g} s"
            ) from None


_TIMEOUTS = {
    "handshake": "no start message within {0.handshake_s:g} s",
    "idle": "no media for {0.idle_s:g} s",
}


async def _discard(outbox: Outbox) -> None:
    """Empty the socket's outbox: events reach subscribers and webhooks, not Twilio."""
    while await outbox.get() is not None:
        pass


async def serve_twilio(websocket, hub: LiveHub) -> None:
    """The `/v1/twilio` WebSocket endpoint (routes.py registers it)."""
    await TwilioStream(websocket, hub).run()
