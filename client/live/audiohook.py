"""`/v1/audiohook`: Genesys AudioHook protocol v2, as the reference implementation speaks it.

The rules are those of purecloudlabs/audiohook-reference-implementation
(app/audiohook/src/protocol/*.ts, server/serversessionimpl.ts), which the tests drive with
the reference's own TypeScript client:

- Text frames are JSON messages `{version: "2", id, type, seq, parameters}`; the client adds
  `serverseq` and `position` (an ISO-8601 duration such as `PT1.5S`), we add `clientseq`.
  A client `seq` that is not the last one plus 1, a `serverseq` above ours, another session
  id, an unknown type or bad parameters are protocol errors, with the reference's texts
  (audiohook_messages.py).
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
- Draining (SIGTERM): `reconnect` at once, so the client opens the conversation on another
  instance and then closes this session with reason `reconnect`: with a shared bus
  (`--bus`) the call moves there (this session's finals, no summary; moves.py). A session
  still open DRAIN_MARGIN_S before the drain deadline is finished (finals, summary),
  `disconnect`ed (reason `completed`) and closed with 1001, its slot held until then so the
  server does not stop under it.

Admission, deadlines, message limits, pacing, the session and its finish are the session
path's (connection.py), as for every protocol. Authentication: `X-API-KEY` must be the
gateway's key when it has one; with `--audiohook-secret-file`, the upgrade's HTTP message
signature must verify too (client/live/audiohook_signature.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from e2v.client.live.audiohook_messages import (
    NULL_UUID,
    RATE,
    VERSION,
    check_parameters,
    choose_media,
    client_message,
    is_seq,
    is_uuid,
    live_settings,
    parse_duration,
    protocol_error,
    stream_format,
    unauthorized,
)
from e2v.client.live.errors import LiveError
from e2v.client.live.hub import GOING_AWAY_REASON
from e2v.client.live.limits import CLOSE_WAIT_S
from e2v.client.live.services import authorize
from e2v.client.live.session import LiveSession, StreamFormat
from e2v.client.live.wire import ENDED, AudioStream, Opening, Wire

from e2v.contract import (
    AUDIOHOOK_ENTITY_TYPE,
    CLOSE_BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_SLOW_READER,
    CLOSE_TIMEOUT,
    CLOSE_TOO_BIG,
    CLOSE_TOO_FAST,
)

log = logging.getLogger("e2v.live.audiohook")

# Draining: a session still open this long before the hub's deadline (--live-drain-s) is
# ended by us, so its finals, summary and close transaction all fit before the deadline.
DRAIN_MARGIN_S = 2.0
# `disconnect` reasons of closes that are neither the client's fault nor an error.
REASONS = {CLOSE_GOING_AWAY: "completed", CLOSE_POLICY: "unauthorized"}
# Closes the reference words as the client's fault ("Client Error: ...").
CLIENT_FAULTS = (CLOSE_BAD_MESSAGE, CLOSE_TOO_BIG, CLOSE_TOO_FAST, CLOSE_TIMEOUT)


class AudioHookWire(Wire):
    """One AudioHook connection's messages: its state (PREPARING -> ACTIVE <-> PAUSED ->
    CLOSING | ERROR), sequence numbers, answers and farewell."""

    name, first, audio = "audiohook", "open", "audio"
    drain_margin_s = DRAIN_MARGIN_S

    def __init__(self, *args) -> None:
        super().__init__(*args)
        session_id = self.socket.headers.get("audiohook-session-id", "")
        self.id = session_id if is_uuid(session_id) else NULL_UUID  # checked in authenticate
        self.seq = 0  # ours (server messages sent)
        self.clientseq = 0  # the client's last seq
        self.state = "PREPARING"
        self.media: dict | None = None
        self.fmt: StreamFormat | None = None
        self.opened_parameters: dict = {}
        self.received_s = 0.0  # audio received (frames / rate)
        self.discarded_s = 0.0  # audio the client says it dropped or held back (pauses)

    # ------------------------------------------------------------- opening

    def authenticate(self) -> None:
        headers = self.socket.headers
        if not is_uuid(headers.get("audiohook-session-id", "")):
            raise protocol_error('Missing or invalid "audiohook-session-id" header field')
        authorize(
            self.services, headers, missing="missing X-API-KEY header", wrong="wrong X-API-KEY"
        )
        secret = self.services.audiohook_secret
        if secret is not None:
            from e2v.client.live.audiohook_signature import verify_upgrade

            problem = verify_upgrade(secret, headers, self.socket.ws.scope)
            if problem is not None:
                raise unauthorized(problem)

    async def handshake(self, message: str | bytes) -> Opening | object | None:
        """Messages before `open` (ping, error, close)."""
        if isinstance(message, bytes):
            raise protocol_error("Received audio in state PREPARING")
        item = self._parse(message)
        if item["type"] == "open":
            return self._open(item["parameters"])
        if item["type"] == "close":
            self.state = "CLOSING"
            await self._send("closed", {})
            return ENDED
        await self._common(item)
        return None

    def _open(self, params: dict) -> Opening:
        organization = self.socket.headers.get("audiohook-organization-id")
        if organization is not None and organization != params["organizationId"]:
            raise unauthorized(
                'Mismatch between "organizationId" open parameter and '
                '"audiohook-organization-id" header field'
            )
        media = choose_media(params["media"])
        if media is None:
            raise LiveError(
                CLOSE_BAD_MESSAGE,
                "encoding",
                "no offered media is supported: PCMU or L16 at 8000 Hz, 1 or 2 channels",
            )
        fmt, settings = stream_format(media), live_settings(params.get("customConfig"))
        self.media, self.fmt = media, fmt
        self.opened_parameters = {"media": [media], "startPaused": False}
        if params.get("supportedLanguages"):
            self.opened_parameters["supportedLanguages"] = []  # emotion2vec: any language
        if params["conversationId"] == NULL_UUID:  # connection probe: no session, no events
            return Opening(self.id, fmt, settings, probe=True)
        return Opening(params["conversationId"], fmt, settings)

    async def opened(self, session: LiveSession | None, session_id: str | None) -> None:
        await self._send("opened", self.opened_parameters)
        self.state = "ACTIVE"

    # ------------------------------------------------------------- the stream

    async def message(self, message: str | bytes, stream: AudioStream) -> bool:
        """Audio and messages until the client's `close`."""
        if isinstance(message, bytes):
            await self._audio(message, stream)
            return False
        item = self._parse(message)
        kind = item["type"]
        if kind == "close":
            self.state = "CLOSING"
            # The client opened the conversation elsewhere (after our `reconnect`).
            self.moving = item["parameters"].get("reason") == "reconnect"
            return True
        if kind == "paused":
            if self.state == "ACTIVE":
                self.state = "PAUSED"
                stream.pause()
        elif kind == "resumed":
            if self.state == "PAUSED":
                self.state = "ACTIVE"
                self.discarded_s += parse_duration(item["parameters"]["discarded"])
                stream.resume()
        elif kind == "discarded":
            self.discarded_s += parse_duration(item["parameters"]["discarded"])
        else:
            await self._common(item)
        return False

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

    async def _audio(self, data: bytes, stream: AudioStream) -> None:
        if self.state != "ACTIVE":
            raise protocol_error(f"Received audio in state {self.state}")
        frame_bytes = self.fmt.frame_bytes
        if len(data) % frame_bytes:
            raise protocol_error(
                "Binary data not a valid audio frame. Error: "
                f"{len(data)} bytes is not a whole number of {frame_bytes}-byte "
                f"{'+'.join(self.media['channels'])} {self.media['format']} frames"
            )
        self.received_s += len(data) / frame_bytes / RATE
        await stream.audio(data)

    def _parse(self, text: str) -> dict:
        """A validated client message, in sequence, of this session."""
        message = client_message(text)
        if message["seq"] != self.clientseq + 1:
            raise protocol_error("Invalid seq value (not monotonically increasing)")
        self.clientseq = message["seq"]
        if message["serverseq"] > self.seq:
            raise protocol_error("Invalid serverseq value")
        if message["id"] != self.id:
            raise protocol_error("Session identifier mismatch")
        check_parameters(message)
        return message

    async def finished(self) -> None:
        """Every event first, then `closed`."""
        await self.socket.flush()
        await self._send("closed", {})

    async def draining(self) -> None:
        """Genesys opens a session elsewhere, then closes this one."""
        await self._send("reconnect", {"info": GOING_AWAY_REASON})

    # ------------------------------------------------------------- sending

    def frame(self, event: dict, text: str) -> str:
        """An event as an `event` message of one entity (its JSON spliced in, not parsed
        and written again)."""
        entity = f'{{"type":"{AUDIOHOOK_ENTITY_TYPE}","data":{text}}}'
        return self._message("event", f'{{"entities":[{entity}]}}')

    def _message(self, kind: str, parameters: str) -> str:
        """The next server message (our seq); `parameters` is JSON text already."""
        self.seq += 1
        head = {
            "version": VERSION,
            "type": kind,
            "id": self.id,
            "seq": self.seq,
            "clientseq": self.clientseq,
        }
        return json.dumps(head, separators=(",", ":"))[:-1] + f',"parameters":{parameters}}}'

    async def _send(self, kind: str, parameters: dict) -> None:
        """A server message in order with the events; a client that does not take it
        within SEND_TIMEOUT_S ends the session (CLOSE_SLOW_READER)."""
        text = json.dumps(parameters, separators=(",", ":"))
        await self.socket.send(lambda: self._message(kind, text))

    # ------------------------------------------------------------- ending

    async def farewell(self, error: LiveError | None) -> None:
        """After a failure: `disconnect` and the client's close transaction. After a normal
        end (`closed` sent): the client closes first, as AudioHook clients do."""
        if error is None:
            await self._until_client_closes()
        else:
            await self._disconnect(error)
        log.info(
            "audiohook %s: ended (%s), %.1f s of audio, %.1f s discarded by the client",
            self.id,
            CLOSE_NORMAL if error is None else error.code,
            self.received_s,
            self.discarded_s,
        )

    async def _disconnect(self, failure: LiveError) -> None:
        reason = REASONS.get(failure.code, "error")
        info = str(failure)
        if failure.code in CLIENT_FAULTS:
            info = f"Client Error: {info}"  # the reference's prefix for the client's faults
        self.state = "ERROR"
        if failure.code == CLOSE_SLOW_READER or self.socket.gone:  # it would not read it
            return
        try:
            await self._send("disconnect", {"reason": reason, "info": info})
        except LiveError:
            return
        await self._close_transaction()

    async def _close_transaction(self) -> None:
        """The client's `close` (answered `closed`) within CLOSE_WAIT_S; other messages are
        dropped."""
        async for text in self._last_messages():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                parsed = json.loads(text)
                if parsed.get("type") == "close":
                    if is_seq(parsed.get("seq")):
                        self.clientseq = parsed["seq"]
                    await self._send("closed", {})
                    return

    async def _until_client_closes(self) -> None:
        async for _ in self._last_messages():
            pass  # dropped

    async def _last_messages(self):
        """Text messages for CLOSE_WAIT_S, until the client closes the socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_S
        while not self.socket.gone:
            try:
                message = await self.socket.next(deadline - loop.time(), stoppable=False)
            except asyncio.TimeoutError:
                return
            except LiveError:
                continue  # a message too big: dropped
            if message is None:
                return
            if isinstance(message, str):
                yield message
