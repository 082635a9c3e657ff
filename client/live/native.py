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
finished: the finals and the summary go to subscribers and webhooks. The session path
(connection.py) does the rest; this module translates the messages.
"""

from __future__ import annotations

import json
import re

from e2v.client.alerts import MAX_ALERT_WINDOWS
from e2v.client.live.errors import bad
from e2v.client.live.limits import LiveLimits
from e2v.client.live.outbox import error_event
from e2v.client.live.services import authorize
from e2v.client.live.session import LiveSession, LiveSettings, StreamFormat
from e2v.client.live.wire import AudioStream, Opening, Wire
from e2v.client.results import model_labels

from e2v.contract import (
    CALL_ID_PATTERN,
    LIVE_MAX_CHANNELS,
    LIVE_START,
    LIVE_STARTED,
    LIVE_STOP,
)

CALL_ID = re.compile(CALL_ID_PATTERN)
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
MISSING_KEY = "API key required (Authorization: Bearer KEY or X-API-Key, or ?key= from a browser)"


class LiveWire(Wire):
    """Our protocol: JSON text for control, binary frames for audio, events as JSON."""

    name, first, audio, query_key = "live", LIVE_START, "audio", True

    def authenticate(self) -> None:
        authorize(self.services, self.socket.headers, self.socket.query_key, missing=MISSING_KEY)

    async def handshake(self, message: str | bytes) -> Opening:
        if isinstance(message, bytes):
            raise bad("order", "audio before the start message")
        start = parse_json(message)
        if start["type"] != LIVE_START:
            raise bad("order", f"the first message must be start, not {start['type']!r}")
        return Opening(*parse_start(start))

    async def opened(self, session: LiveSession | None, session_id: str | None) -> None:
        self.socket.outbox.put(started(self.limits, session, session_id))

    async def message(self, message: str | bytes, stream: AudioStream) -> bool:
        if isinstance(message, bytes):
            await stream.audio(message)
            return False
        request = parse_json(message)
        if request["type"] == LIVE_STOP:
            return True
        if request["type"] == LIVE_START:
            raise bad("order", "start was already received")
        raise bad("type", f"unknown message type {request['type']!r}: start or stop")

    def frame(self, event: dict, text: str) -> str:
        return text

    def refusal(self, error) -> dict:
        return error_event(error, None)


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
        raise bad("call_id", f"call_id must match {CALL_ID_PATTERN}")
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


def started(limits: LiveLimits, session: LiveSession, session_id: str) -> dict:
    """The answer to `start`: ids, the model (synthetic models' labels mean nothing), the
    parties and the bounds this session runs under."""
    info = session.info
    return {
        "type": LIVE_STARTED,
        "session_id": session_id,
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
