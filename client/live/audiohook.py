"""`/v1/audiohook`: Genesys AudioHook protocol v2, as the reference implementation speaks it.

The rules are those of purecloudlabs/audiohook-reference-implementation
(app/audiohook/src/protocol/*.ts, server/serversessionimpl.ts), which the tests drive with
the reference's own TypeScript client:

- Text frames are JSON messages `{version: "2", id, type, seq, parameters}`; the client adds
  `serverseq` and `position` (an ISO-8601 duration such as `PT1.5S`), we add `clientseq`.
  A client `seq` that is not the last one plus 1, a `serverseq` above ours, another session
  id, an unknown type or bad parameters are protocol errors, with the reference's texts.
- `open` offers media; `opened` answers with exactly one we decode: PCMU or L16 at 8000 Hz,
  stereo (`external` + `internal`, either order) first, else one channel. Channels are the
  parties: external -> `customer`, internal -> `agent`. Binary frames are that audio,
  interleaved. `customConfig` may carry `window_s`, `hop_s`, `alerts`, `alert_windows`.
- `ping` -> `pong`, `update` -> `updated`, `paused` / `resumed` pause the session (no audio,
  not idle), `discarded` and `error` are noted, `close` -> every final and the summary, then
  `closed`. The call id for subscribers and webhooks is the `conversationId`.
- Results go back as `event` messages whose one entity is `{type: "e2v.emotion", data: EVENT}`.
- A failure is a `disconnect` (reason `error`, or `unauthorized` for a bad key or signature,
  info = the reason), the client's close transaction (`close` -> `closed`), then the
  WebSocket closes with the contract's code (`CLOSE_*`, the same as `/v1/live`'s).
- Draining (SIGTERM): `reconnect` at once, so Genesys moves the stream to another instance;
  a session still open DRAIN_MARGIN_S before the drain deadline is finished (finals,
  summary), `disconnect`ed (reason `completed`) and closed with 1001, its slot held until
  then so the server does not stop under it.
- Admission (busy, draining) and every bound of docs/live.md come from the hub: refusals
  and limits end in a `disconnect` and the contract's close code too.

Authentication: `X-API-KEY` must be the gateway's key when it has one; with
`--audiohook-secret-file`, the upgrade's HTTP message signature must verify too
(client/live/audiohook_signature.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time

from e2v.client.live.session import LiveError, LiveSettings, StreamFormat
from e2v.client.live.sockets import close_reason

from e2v.contract import (
    AUDIOHOOK_ENTITY_TYPE,
    AUDIOHOOK_PARTIES,
    CLOSE_BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_SLOW_READER,
    CLOSE_TIMEOUT,
    CLOSE_TOO_BIG,
    CLOSE_TOO_FAST,
)

log = logging.getLogger("e2v.live.audiohook")

VERSION = "2"
NULL_UUID = "00000000-0000-0000-0000-000000000000"  # a connection probe's conversationId
MAX_TEXT_CHARS = 65535  # the reference's largest text message
RATE = 8000
# L16 little-endian, as the reference reads and writes it (host order; RFC 2586 would say
# big-endian): taken only when no PCMU of as many channels is offered.
FORMATS = {"PCMU": "mulaw", "L16": "pcm_s16le"}
# How long the client gets for its side of a close transaction, and to close the socket.
CLOSE_WAIT_S = 5.0
SEND_TIMEOUT_S = 10.0  # longest wait for the client to take one message
POLL_S = 0.5  # longest receive wait, so drain and deadlines are seen in time
# Draining: a session still open this long before the hub's deadline (--live-drain-s) is
# ended by us, so its finals, summary and close transaction all fit before the deadline.
DRAIN_MARGIN_S = 2.0

UUID = re.compile(
    r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-5][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-"
    r"[0-9a-fA-F]{12}|00000000-0000-0000-0000-000000000000)$"
)
DURATION = re.compile(r"^PT(\d+\.\d*|\.?\d+)S$")
LANGUAGE = re.compile(r"^[a-z]{2,3}-[A-Za-z]{2,3}$")
SETTINGS = ("window_s", "hop_s", "alerts", "alert_windows")


class Disconnect(LiveError):
    """A LiveError with the AudioHook `disconnect` reason to send (error / unauthorized /
    completed)."""

    def __init__(self, code: int, kind: str, message: str, reason: str = "error"):
        super().__init__(code, kind, message)
        self.reason = reason


def _protocol(info: str) -> Disconnect:
    return Disconnect(CLOSE_BAD_MESSAGE, "protocol", info)


def _unauthorized(info: str) -> Disconnect:
    return Disconnect(CLOSE_POLICY, "unauthorized", info, reason="unauthorized")


# `disconnect` reasons of closes that are neither the client's fault nor a key problem.
_REASONS = {CLOSE_GOING_AWAY: "completed", CLOSE_POLICY: "unauthorized"}
GOING_AWAY_INFO = "the gateway is shutting down: reconnect to another instance"


# ------------------------------------------------------------------------ validators
# The reference's validators.ts, one to one: required keys must be there and valid,
# optional ones valid when present, others are ignored.


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
        raise Disconnect(exc.code, exc.kind, f"customConfig: {exc}") from None


# ------------------------------------------------------------------------ the session


class AudioHookSession:
    """One AudioHook connection, from the upgrade to the WebSocket close."""

    def __init__(self, websocket, hub):
        self.ws, self.hub = websocket, hub
        self.limits = hub.limits
        self.pace = None  # AudioPace once the format is known (hub.pace)
        self.last_audio = time.monotonic()  # idle counts from the later of this and `opened`
        self.close_info = "done"
        self.id = NULL_UUID
        self.seq = 0  # ours (server messages sent)
        self.clientseq = 0  # the client's last seq
        self.state = "PREPARING"  # -> ACTIVE <-> PAUSED -> CLOSING | ERROR
        self.media: dict | None = None
        self.fmt: StreamFormat | None = None
        self.session = None  # the LiveSession (none for a connection probe)
        self.outbox = None  # this socket's slot and event queue (hub.admit)
        self.pump: asyncio.Task | None = None
        self.call_id: str | None = None
        self.position_s = 0.0  # the client's position, from its last message
        self.received_s = 0.0  # audio received (frames / rate)
        self.discarded_s = 0.0  # audio the client says it dropped or held back (pauses)
        self.opened_at: float | None = None
        self.draining_since: float | None = None
        self.close_code = CLOSE_NORMAL
        self._send_lock = asyncio.Lock()
        self._client_closed = False

    # ------------------------------------------------------------- entry

    async def run(self) -> None:
        session_id = self.ws.headers.get("audiohook-session-id", "")
        self.id = session_id if is_uuid(session_id) else NULL_UUID  # checked in _authenticate
        await self.ws.accept()
        try:
            self.outbox = self.hub.admit()
        except LiveError as exc:  # busy or draining: said, then closed
            await self._fail(exc)
            return await self._close_socket()
        with self.outbox:
            try:
                self._authenticate()
                await self._serve()
            except LiveError as exc:
                await self._fail(exc)
            except _ClientGone:
                return
            except Exception:  # noqa: BLE001 - a bug ends this session only, said to the client
                log.exception("audiohook %s: internal error", self.id)
                await self._fail(LiveError(CLOSE_INTERNAL, "internal", "internal server error"))
        await self._close_socket()
        log.info(
            "audiohook %s: ended (%s), %.1f s of audio, %.1f s discarded by the client",
            self.id,
            self.close_code,
            self.received_s,
            self.discarded_s,
        )

    # ------------------------------------------------------------- auth

    def _authenticate(self) -> None:
        headers = self.ws.headers
        session_id = headers.get("audiohook-session-id", "")
        if not is_uuid(session_id):
            raise _protocol('Missing or invalid "audiohook-session-id" header field')
        config = self.hub.gateway.config
        supplied = headers.get("x-api-key", "")
        if config.api_key is not None and not hmac.compare_digest(
            supplied.encode("utf-8", "surrogateescape"), config.api_key
        ):
            raise _unauthorized("missing X-API-KEY header" if not supplied else "wrong X-API-KEY")
        if config.audiohook_secret is not None:
            lines = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.raw]
            problem = _verifier(config.audiohook_secret).verify(
                lines, _request_target(self.ws.scope)
            )
            if problem is not None:
                raise _unauthorized(problem)

    # ------------------------------------------------------------- protocol

    async def _serve(self) -> None:
        message = await self._until_open()
        if message is None:  # closed before opening
            return
        params = message["parameters"]
        organization = self.ws.headers.get("audiohook-organization-id")
        if organization is not None and organization != params["organizationId"]:
            raise _unauthorized(
                'Mismatch between "organizationId" open parameter and '
                '"audiohook-organization-id" header field'
            )
        media = choose_media(params["media"])
        if media is None:
            raise Disconnect(
                CLOSE_BAD_MESSAGE,
                "encoding",
                "no offered media is supported: PCMU or L16 at 8000 Hz, 1 or 2 channels",
            )
        fmt, settings = stream_format(media), live_settings(params.get("customConfig"))
        self.media, self.fmt = media, fmt
        opened = {"media": [media], "startPaused": False}
        if params.get("supportedLanguages"):
            opened["supportedLanguages"] = []  # emotion2vec does not depend on the language
        if params["conversationId"] == NULL_UUID:  # connection probe: no session, no events
            self.call_id = self.id
            await self._opened(opened)
            await self._end(await self._stream())
            return
        self.call_id = params["conversationId"]
        try:
            async with self.hub.session(
                self.call_id, fmt, settings, outbox=self.outbox, protocol="audiohook"
            ) as (session, outbox):
                self.session = session
                await self._opened(opened)
                self.pump = asyncio.create_task(self._pump(outbox))
                ending = await self._stream()
                await outbox.guard(session.finish())
                await self._flush()
                # Still inside: the slot is held until the client has its answer, so a
                # drain does not stop the server before it.
                await self._end(ending)
        finally:
            await self._flush()

    async def _end(self, ending: str) -> None:
        """After the client's `close`: `closed`. At our drain deadline: `disconnect`
        (reason completed), the close transaction, and close 1001."""
        if ending == "closed":
            await self._send("closed", {})
            return
        await self._fail(
            Disconnect(CLOSE_GOING_AWAY, "going_away", GOING_AWAY_INFO, reason="completed")
        )
        await self._close_socket()

    async def _opened(self, parameters: dict) -> None:
        await self._send("opened", parameters)
        self.state = "ACTIVE"
        self.opened_at = self.last_audio = time.monotonic()
        self.pace = self.hub.pace()

    async def _until_open(self) -> dict | None:
        """Messages before `open` (ping, error, close); None when the client closes first."""
        deadline = time.monotonic() + self.limits.handshake_s
        while True:
            item = await self._receive(deadline)
            if isinstance(item, bytes):
                raise _protocol("Received audio in state PREPARING")
            if item["type"] == "open":
                return item
            if item["type"] == "close":
                self.state = "CLOSING"
                await self._send("closed", {})
                return None
            await self._common(item)

    async def _stream(self) -> str:
        """Audio and messages until the client's `close` ("closed") or, while the gateway
        drains, our deadline ("drained")."""
        while True:
            item = await self._receive(None)
            if item is _DRAINED:
                return "drained"
            if isinstance(item, bytes):
                await self._audio(item)
                continue
            kind = item["type"]
            if kind == "close":
                self.state = "CLOSING"
                return "closed"
            if kind == "paused":
                if self.state == "ACTIVE":
                    self.state = "PAUSED"
                    if self.session is not None:
                        self.session.pause()
            elif kind == "resumed":
                if self.state == "PAUSED":
                    self.state, self.last_audio = "ACTIVE", time.monotonic()
                    self.discarded_s += parse_duration(item["parameters"]["discarded"])
                    if self.session is not None:
                        self.session.resume()
            elif kind == "discarded":
                self.discarded_s += parse_duration(item["parameters"]["discarded"])
            else:
                await self._common(item)

    async def _common(self, item: dict) -> None:
        """ping (any state), update (once open), error (noted); others are ignored."""
        kind = item["type"]
        if kind == "ping":
            await self._send("pong", {})
        elif kind == "update" and self.state in ("ACTIVE", "PAUSED"):  # as the reference
            await self._send("updated", {})
        elif kind == "error":
            p = item["parameters"]
            log.warning("audiohook %s: client error %s: %s", self.id, p["code"], p["message"])
        else:  # open again, update or paused/resumed/discarded before open: the reference ignores
            log.info("audiohook %s: ignoring %s in state %s", self.id, kind, self.state)

    async def _audio(self, data: bytes) -> None:
        if self.state != "ACTIVE":
            raise _protocol(f"Received audio in state {self.state}")
        fmt = self.fmt
        if len(data) % fmt.frame_bytes:
            raise _protocol(
                "Binary data not a valid audio frame. Error: "
                f"{len(data)} bytes is not a whole number of {fmt.frame_bytes}-byte "
                f"{'+'.join(self.media['channels'])} {self.media['format']} frames"
            )
        seconds = len(data) / fmt.frame_bytes / RATE
        self.pace.take(seconds)
        self.received_s += seconds
        self.last_audio = time.monotonic()
        if self.session is not None:
            await self.outbox.guard(self.session.feed(data))

    # ------------------------------------------------------------- receiving

    async def _receive(self, deadline: float | None):
        """The next client message (validated dict) or audio frame (bytes). Raises
        LiveError for timeouts, protocol errors and the hub's stops (drain, slow reader,
        longest session), _ClientGone when the client closed the socket."""
        while True:
            wait = self._wait_s(deadline)
            if wait is _DRAINED:
                return _DRAINED
            try:
                message = await self.outbox.guard(self.ws.receive(), timeout_s=wait)
            except asyncio.TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                self._client_closed = True
                raise _ClientGone()
            if message.get("bytes") is not None:
                data = message["bytes"]
                if len(data) > self.limits.max_message_bytes:
                    raise Disconnect(
                        CLOSE_TOO_BIG,
                        "too_big",
                        f"binary message of {len(data)} bytes "
                        f"(limit {self.limits.max_message_bytes})",
                    )
                return data
            return self._parse(message.get("text") or "")

    def _wait_s(self, deadline: float | None) -> float | object:
        """Seconds to wait for the next message, once every deadline is checked."""
        now = time.monotonic()
        waits = [POLL_S]
        if deadline is not None:
            if now >= deadline:
                raise Disconnect(
                    CLOSE_TIMEOUT,
                    "handshake",
                    f"no open message within {self.limits.handshake_s:g} s",
                )
            waits.append(deadline - now)
        if self.state == "ACTIVE":  # paused: no audio is expected
            idle_left = self.last_audio + self.limits.idle_s - now
            if idle_left <= 0:
                raise Disconnect(CLOSE_TIMEOUT, "idle", f"no audio for {self.limits.idle_s:g} s")
            waits.append(idle_left)
        probe = self.session is None and self.opened_at is not None  # no hub timer
        if probe and now - self.opened_at >= self.limits.max_duration_s:
            raise Disconnect(CLOSE_TIMEOUT, "max_duration", "the probe passed the longest session")
        if self.hub.draining and self.state in ("ACTIVE", "PAUSED"):
            if self.draining_since is None:  # Genesys opens a session elsewhere, then closes
                self.draining_since = now
                self._background(self._send("reconnect", {"info": GOING_AWAY_INFO}))
            end = self.draining_since + max(0.0, self.limits.drain_s - DRAIN_MARGIN_S)
            if now >= end and deadline is None:  # (before `open` the handshake bound rules)
                return _DRAINED
            waits.append(max(0.0, end - now))
        return max(0.001, min(waits))

    def _parse(self, text: str) -> dict:
        """A validated client message (the reference's onTextMessage checks, in order)."""
        if len(text) > MAX_TEXT_CHARS:
            raise Disconnect(
                CLOSE_TOO_BIG, "too_big", f"Text message too large (>64K). Length: {len(text)}"
            )
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            raise _protocol("Text message not valid JSON") from None
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
            raise _protocol("Message not a well-formed client message")
        if message["seq"] != self.clientseq + 1:
            raise _protocol("Invalid seq value (not monotonically increasing)")
        self.clientseq = message["seq"]
        if message["serverseq"] > self.seq:
            raise _protocol("Invalid serverseq value")
        if message["id"] != self.id:
            raise _protocol("Session identifier mismatch")
        check = PARAMETERS.get(message["type"])
        if check is None:
            raise _protocol(
                f"Invalid Message: '{message['type'][:64]}' is not a supported client message"
            )
        if not check(message["parameters"]):
            raise _protocol("Invalid Message: Invalid/missing parameters")
        self.position_s = parse_duration(message["position"])
        return message

    # ------------------------------------------------------------- sending

    async def _send(self, kind: str, parameters: dict) -> None:
        await self._send_json(kind, json.dumps(parameters, separators=(",", ":")))

    async def _send_json(self, kind: str, parameters: str) -> None:
        """One server message whose parameters are JSON text already (events come from the
        hub as JSON: spliced in rather than parsed and written again). A client that does
        not read for SEND_TIMEOUT_S ends the session (CLOSE_SLOW_READER)."""
        try:
            await asyncio.wait_for(self._write(kind, parameters), SEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise LiveError(
                CLOSE_SLOW_READER,
                "slow_reader",
                f"the client has not read for {SEND_TIMEOUT_S:g} s",
            ) from None

    async def _write(self, kind: str, parameters: str) -> None:
        async with self._send_lock:
            self.seq += 1
            head = {
                "version": VERSION,
                "type": kind,
                "id": self.id,
                "seq": self.seq,
                "clientseq": self.clientseq,
            }
            text = json.dumps(head, separators=(",", ":"))[:-1] + f',"parameters":{parameters}}}'
            await self.ws.send_text(text)

    async def _pump(self, outbox) -> None:
        """This socket's events, in order, as `event` messages (one entity each)."""
        try:
            while (item := await outbox.get()) is not None:
                entity = f'{{"type":"{AUDIOHOOK_ENTITY_TYPE}","data":{item[1]}}}'
                await self._send_json("event", f'{{"entities":[{entity}]}}')
        except LiveError as exc:  # not reading: the session ends (receive sees the stop)
            outbox.stop(exc)

    async def _flush(self) -> None:
        """Send what the outbox holds (the error event last, on a failure), CLOSE_WAIT_S at
        most, then stop the pump."""
        if self.pump is None:
            return
        self.outbox.close()
        # The client gone or not reading: stop sending.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.pump), CLOSE_WAIT_S)
        self.pump.cancel()
        await asyncio.gather(self.pump, return_exceptions=True)

    def _background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ------------------------------------------------------------- ending

    async def _fail(self, failure: LiveError) -> None:
        """`disconnect`, the client's close transaction, and the close code to use."""
        self.close_code, self.close_info = failure.code, str(failure)
        log.info("audiohook %s: %s (%s): %s", self.id, failure.kind, failure.code, failure)
        reason = getattr(failure, "reason", None) or _REASONS.get(failure.code, "error")
        info = str(failure)
        if failure.code in (CLOSE_BAD_MESSAGE, CLOSE_TOO_BIG, CLOSE_TOO_FAST, CLOSE_TIMEOUT):
            info = f"Client Error: {info}"  # the reference's prefix for the client's faults
        self.state = "ERROR"
        if failure.code == CLOSE_SLOW_READER:  # it would not read a disconnect either
            return
        try:
            await self._send("disconnect", {"reason": reason, "info": info})
            await self._await_close()
        except (_ClientGone, LiveError, OSError, RuntimeError):
            self._client_closed = True

    async def _await_close(self) -> None:
        """The client's `close` (answered `closed`) within CLOSE_WAIT_S; other messages are
        dropped. Raises _ClientGone when the client closes the socket instead."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while (wait := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=wait)
            except asyncio.TimeoutError:
                return
            if message["type"] == "websocket.disconnect":
                self._client_closed = True
                raise _ClientGone()
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                parsed = json.loads(message.get("text") or "null")
                if parsed.get("type") == "close":
                    if is_seq(parsed.get("seq")):
                        self.clientseq = parsed["seq"]
                    await self._send("closed", {})
                    return

    async def _close_socket(self) -> None:
        """After a normal `closed`, let the client close first (AudioHook clients do) for
        CLOSE_WAIT_S; after a failure's close transaction, close with its code at once."""
        if self._client_closed:
            return
        with contextlib.suppress(Exception):
            if self.close_code != CLOSE_NORMAL:
                raise TimeoutError
            deadline = time.monotonic() + CLOSE_WAIT_S
            while (wait := deadline - time.monotonic()) > 0:
                message = await asyncio.wait_for(self.ws.receive(), timeout=wait)
                if message["type"] == "websocket.disconnect":
                    return
        self._client_closed = True  # closed once
        with contextlib.suppress(Exception):  # bounded: a client not reading takes no frame
            await asyncio.wait_for(
                self.ws.close(self.close_code, close_reason(self.close_info)), CLOSE_WAIT_S
            )


class _ClientGone(Exception):
    """The client closed the WebSocket."""


_DRAINED = object()
_verifiers: dict[bytes, object] = {}


def _verifier(secret: bytes):
    """One verifier per secret for the process, so nonces are remembered across sessions."""
    from e2v.client.live.audiohook_signature import SignatureVerifier

    if secret not in _verifiers:
        _verifiers[secret] = SignatureVerifier(secret)
    return _verifiers[secret]


def _request_target(scope: dict) -> str:
    path = scope.get("raw_path") or scope.get("path", "/").encode()
    query = scope.get("query_string") or b""
    target = path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target


async def serve_audiohook(websocket, hub) -> None:
    """The `/v1/audiohook` WebSocket endpoint (routes.py registers it)."""
    await AudioHookSession(websocket, hub).run()
