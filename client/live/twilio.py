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
are published. The session path (connection.py) does all but the translation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re

from e2v.client.alerts import MAX_ALERT_WINDOWS
from e2v.client.live.errors import LiveError, bad
from e2v.client.live.services import authorize
from e2v.client.live.session import LiveSettings, StreamFormat
from e2v.client.live.wire import AudioStream, Opening, Wire

from e2v.contract import CALL_ID_PATTERN, CLOSE_TOO_BIG, CLOSE_TOO_FAST, TWILIO_PARTIES

RATE = 8000
ENCODING = "audio/x-mulaw"
SILENCE = b"\xff"  # mu-law zero
SID = re.compile(CALL_ID_PATTERN)
DIGITS = re.compile(r"[0-9]{1,12}")
# A track may lag its timestamps by this much before the gap is filled (packet jitter).
GAP_TOLERANCE_MS = 60
MAX_PARAMETERS = 64  # customParameters entries (TwiML <Parameter> elements)
MAX_PARAMETER_CHARS = 4096
EVENTS = ("connected", "start", "media", "stop", "mark", "dtmf")
MISSING_KEY = "API key required: customParameters api_key (or X-API-Key)"

try:  # 100 media messages a second per call: orjson parses them ~4x faster than json
    from orjson import loads as json_loads
except ImportError:  # the gateway extra installs it
    from json import loads as json_loads


# ------------------------------------------------------------------------ parsing


def parse_message(text: str) -> dict:
    try:
        message = json_loads(text)
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
    if type(value) is str and len(value) <= 12 and value.isascii() and value.isdigit():
        return int(value)  # the usual case, without the pattern: 100 messages a second
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
            raise bad("start", f"start.{name} must match {CALL_ID_PATTERN}")
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


class TwilioWire(Wire):
    """One Media Streams connection: `connected`, `start`, tracks of audio, `stop`. Nothing
    goes back on the socket."""

    name, first, audio = "twilio", "start", "media"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.sequence: int | None = None  # the last sequenceNumber
        self.stream_sid: str | None = None
        self.tracks: tuple[str, ...] = ()
        self.samples: list[int] = []  # per track, silence fills included
        self.first_media: float | None = None

    async def handshake(self, text: str | bytes) -> Opening | None:
        """`connected` (optional), then `start`: the key, tracks and settings."""
        message = self._checked(text)
        if message["event"] == "connected":
            return None
        if message["event"] != "start":
            raise bad("order", f"{message['event']} before start")
        call_sid, self.stream_sid, self.tracks, custom = parse_start(message)
        authorize(self.services, self.socket.headers, custom.get("api_key"), missing=MISSING_KEY)
        fmt = StreamFormat("mulaw", RATE, tuple(TWILIO_PARTIES[t] for t in self.tracks))
        settings = settings_of(custom)
        self.samples = [0] * len(self.tracks)
        return Opening(call_sid, fmt, settings)

    async def message(self, text: str | bytes, stream: AudioStream) -> bool:
        message = self._checked(text)
        event = message["event"]
        if event == "media":
            await self._media(message, stream)
        elif event == "stop":
            return True
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
        return False

    def _checked(self, text: str | bytes) -> dict:
        """A message, checked for order: sequenceNumber one up, the start's streamSid."""
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

    async def _media(self, message: dict, stream: AudioStream) -> None:
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
        await self._fill_gap(stream, index, timestamp_ms)
        await stream.audio(audio, index)
        self.samples[index] += len(audio)

    async def _fill_gap(self, stream: AudioStream, index: int, timestamp_ms: int) -> None:
        """Silence up to `timestamp_ms` on a track that lags it (Twilio sent nothing for a
        while). Timestamps may run ahead of the wall clock no more than audio may."""
        now = asyncio.get_running_loop().time()
        self.first_media = self.first_media if self.first_media is not None else now
        limits = self.limits
        allowed_s = (now - self.first_media) * limits.max_speed + limits.burst_s
        if timestamp_ms / 1000 > allowed_s:
            raise LiveError(
                CLOSE_TOO_FAST,
                "too_fast",
                f"media timestamp {timestamp_ms} ms runs ahead of real time "
                f"({limits.max_speed:g}x after a {limits.burst_s:g} s burst)",
            )
        gap = timestamp_ms * RATE // 1000 - self.samples[index]
        if gap * 1000 <= GAP_TOLERANCE_MS * RATE:
            return
        while gap > 0:  # a second at a time: memory stays one message's worth
            part = min(gap, RATE)
            await stream.audio(SILENCE * part, index, paced=False)
            self.samples[index] += part
            gap -= part
