"""AudioHook v2 messages as the reference implementation checks them (purecloudlabs/
audiohook-reference-implementation, app/audiohook/src/protocol/validators.ts, one to one):
a client message's shape, each type's parameters, the media we take, durations.

Required keys must be there and valid, optional ones valid when present, others are
ignored. A failure is a LiveError with the reference's own words (`protocol`).
"""

from __future__ import annotations

import json
import re

from e2v.client.live.errors import LiveError
from e2v.client.live.session import LiveSettings, StreamFormat

from e2v.contract import AUDIOHOOK_PARTIES, CLOSE_BAD_MESSAGE, CLOSE_POLICY, CLOSE_TOO_BIG

VERSION = "2"
NULL_UUID = "00000000-0000-0000-0000-000000000000"  # a connection probe's conversationId
MAX_TEXT_CHARS = 65535  # the reference's largest text message
RATE = 8000
# L16 little-endian, as the reference reads and writes it (host order; RFC 2586 would say
# big-endian): taken only when no PCMU of as many channels is offered.
FORMATS = {"PCMU": "mulaw", "L16": "pcm_s16le"}

UUID = re.compile(
    r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-5][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-"
    r"[0-9a-fA-F]{12}|00000000-0000-0000-0000-000000000000)$"
)
DURATION = re.compile(r"^PT(\d+\.\d*|\.?\d+)S$")
LANGUAGE = re.compile(r"^[a-z]{2,3}-[A-Za-z]{2,3}$")
SETTINGS = ("window_s", "hop_s", "alerts", "alert_windows")


def protocol_error(info: str) -> LiveError:
    """A protocol error: `disconnect` (reason error) and CLOSE_BAD_MESSAGE."""
    return LiveError(CLOSE_BAD_MESSAGE, "protocol", info)


def unauthorized(info: str) -> LiveError:
    """`disconnect` (reason unauthorized) and CLOSE_POLICY."""
    return LiveError(CLOSE_POLICY, "unauthorized", info)


def is_uuid(v) -> bool:
    return isinstance(v, str) and UUID.match(v) is not None


def is_seq(v) -> bool:
    return type(v) is int and v >= 0


def is_duration(v) -> bool:
    return isinstance(v, str) and DURATION.match(v) is not None


def parse_duration(text: str) -> float:
    """Seconds of an ISO-8601 duration as AudioHook writes it (`PT1.25S`)."""
    match = DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not a PT<seconds>S duration: {text!r}")
    return float(match.group(1))


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_media(v) -> bool:
    return (
        isinstance(v, dict)
        and v.get("type") == "audio"
        and v.get("format") in ("PCMU", "L16")
        and type(v.get("rate")) is int
        and v.get("rate") == RATE
        and isinstance(v.get("channels"), list)
        and 1 <= len(v["channels"]) <= 2
        and all(c in AUDIOHOOK_PARTIES for c in v["channels"])
    )


def _obj(required: dict, optional: dict | None = None):
    def check(v) -> bool:
        if not isinstance(v, dict):
            return False
        if any(k not in v or not fn(v[k]) for k, fn in required.items()):
            return False
        return all(k not in v or fn(v[k]) for k, fn in (optional or {}).items())

    return check


def _list_of(fn):
    return lambda v: isinstance(v, list) and all(fn(x) for x in v)


PARAMETERS = {
    "close": _obj({"reason": lambda v: v in ("end", "error", "disconnect", "reconnect")}),
    "discarded": _obj({"start": is_duration, "discarded": is_duration}),
    "error": _obj(
        {"code": lambda v: type(v) is int and 400 <= v < 10000, "message": _is_str},
        {"retryAfter": is_duration},
    ),
    "open": _obj(
        {
            "organizationId": is_uuid,
            "conversationId": is_uuid,
            "participant": _obj(
                {"id": is_uuid, "ani": _is_str, "aniName": _is_str, "dnis": _is_str}
            ),
            "media": _list_of(_is_media),
        },
        {
            "language": lambda v: isinstance(v, str) and LANGUAGE.match(v) is not None,
            "supportedLanguages": lambda v: isinstance(v, bool),
            "continuedSessions": _list_of(
                _obj({"id": is_uuid, "clientseq": is_seq, "serverseq": is_seq})
            ),
            "customConfig": lambda v: isinstance(v, dict),
        },
    ),
    "paused": _obj({}),
    "ping": _obj({}, {"rtt": is_duration}),
    "resumed": _obj({"start": is_duration, "discarded": is_duration}),
    "update": _obj({"language": lambda v: isinstance(v, str) and LANGUAGE.match(v) is not None}),
}


def client_message(text: str) -> dict:
    """A well-formed client message (the reference's onTextMessage checks, in order, up to
    the sequence numbers, which the session checks)."""
    if len(text) > MAX_TEXT_CHARS:
        raise LiveError(
            CLOSE_TOO_BIG, "too_big", f"Text message too large (>64K). Length: {len(text)}"
        )
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise protocol_error("Text message not valid JSON") from None
    if not (
        isinstance(message, dict)
        and message.get("version") == VERSION
        and is_uuid(message.get("id"))
        and isinstance(message.get("type"), str)
        and is_seq(message.get("seq"))
        and isinstance(message.get("parameters"), dict)
        and is_duration(message.get("position"))
        and is_seq(message.get("serverseq"))
    ):
        raise protocol_error("Message not a well-formed client message")
    return message


def check_parameters(message: dict) -> None:
    """The message's type is one a client sends, and its parameters are valid."""
    check = PARAMETERS.get(message["type"])
    if check is None:
        raise protocol_error(
            f"Invalid Message: '{message['type'][:64]}' is not a supported client message"
        )
    if not check(message["parameters"]):
        raise protocol_error("Invalid Message: Invalid/missing parameters")


def choose_media(offers: list[dict]) -> dict | None:
    """The offer we take: stereo first, then one channel; PCMU before L16 (the byte order
    of L16 is the one thing the reference leaves to the host), then the client's order."""
    usable = [m for m in offers if len(set(m["channels"])) == len(m["channels"])]
    ranked = sorted(usable, key=lambda m: (-len(m["channels"]), m["format"] != "PCMU"))
    return ranked[0] if ranked else None


def stream_format(media: dict) -> StreamFormat:
    parties = tuple(AUDIOHOOK_PARTIES[c] for c in media["channels"])
    return StreamFormat(FORMATS[media["format"]], RATE, parties)


def live_settings(custom: dict | None) -> LiveSettings:
    """Our settings from the `customConfig` of `open` (other keys are the integration's)."""
    values = {k: custom[k] for k in SETTINGS if isinstance(custom, dict) and k in custom}
    try:
        return LiveSettings(**values)
    except LiveError as exc:
        raise LiveError(exc.code, exc.kind, f"customConfig: {exc}") from None
