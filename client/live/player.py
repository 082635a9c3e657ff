"""`e2v live FILE|URI`: play a recording into a gateway as a telephony client would.

    e2v gateway --url 127.0.0.1:8001 &
    e2v live samples/call-8k-stereo.wav                      # our protocol, /v1/live
    e2v live call.wav --protocol audiohook --json            # Genesys AudioHook v2
    e2v live s3://bucket/call.mp3 --protocol twilio --speed 2

Any file or URI `e2v classify` reads is decoded by the same decoder; a stereo file is two
parties (one channel each). The audio is paced at --speed times real time, in frames of
100 ms (our protocol), 200 ms (AudioHook, as its reference client) or 20 ms media messages
(Twilio), and every event the gateway sends is printed as it arrives: one line each, or
JSON Lines with --json. Twilio carries no results back, so the player subscribes to the
call's events (/v1/calls/{callSid}/events/ws) before it starts streaming.

Exit status: 0 the call ended normally (its summary arrived); 1 it failed (no gateway,
refused, a key the gateway rejects, closed early, undecodable audio, no answer in time):
one line on stderr says why, with the close code and reason; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2v.client.arguments import add_json_argument

from e2v.contract import (
    AUDIOHOOK_ENTITY_TYPE,
    AUDIOHOOK_PATH,
    CALL_EVENTS_WS_PATH,
    CLOSE_NORMAL,
    EVENT_ERROR,
    EVENT_SUMMARY,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    GATEWAY_PORT,
    LIVE_ENCODINGS,
    LIVE_EVENT_TYPES,
    LIVE_MAX_CHANNELS,
    LIVE_PATH,
    LIVE_SAMPLE_RATES,
    LIVE_START,
    LIVE_STARTED,
    LIVE_STOP,
    SAMPLE_RATE,
    TWILIO_PATH,
)

EXIT_FAILED = EXIT_INTERNAL  # the call failed: no summary came back
PROTOCOLS = ("live", "audiohook", "twilio")
ENDPOINTS = {"live": LIVE_PATH, "audiohook": AUDIOHOOK_PATH, "twilio": TWILIO_PATH}
# Audio per paced frame: ours ~100 ms (Hume's realtime API's size), AudioHook's reference
# client sends 200 ms; Twilio sends 20 ms media messages, paced here in groups of 100 ms.
FRAME_S = {"live": 0.1, "audiohook": 0.2, "twilio": 0.1}
TWILIO_MEDIA_S = 0.02
MAX_SPEED = 100.0
CONNECT_TIMEOUT_S = 10.0  # TCP + WebSocket handshake
ANSWER_TIMEOUT_S = 15.0  # `started` / `opened` after our first message
SEND_TIMEOUT_S = 30.0  # one frame stuck this long: the gateway stopped reading
END_TIMEOUT_S = 60.0  # after `stop`, longest silence before the summary
POLL_S = 0.5
MAX_MESSAGE_BYTES = 1 << 20  # an event is a few hundred bytes; a summary a few KiB
SYNTHETIC_NOTE = "note: the served model is SYNTHETIC (random weights): labels are meaningless"


class PlayError(Exception):
    """The call failed; str() is the one line printed (exit status 1). When the gateway
    ended the session, `close_code` and `close_reason` are its close frame's."""

    close_code: int | None = None
    close_reason: str = ""


class UsageError(PlayError):
    """Arguments that cannot work with this recording (exit status 2)."""


@dataclass(frozen=True)
class PlayOptions:
    source: str
    url: str = f"ws://127.0.0.1:{GATEWAY_PORT}"
    protocol: str = "live"
    speed: float = 1.0
    parties: tuple[str, ...] | None = None
    api_key: str | None = None
    call_id: str | None = None
    encoding: str = "pcm_s16le"  # our protocol only; AudioHook and Twilio are mu-law 8 kHz
    sample_rate: int = SAMPLE_RATE

    @property
    def format(self) -> tuple[str, int]:
        """(encoding, sample rate) on the wire."""
        return (self.encoding, self.sample_rate) if self.protocol == "live" else ("mulaw", 8000)


# ------------------------------------------------------------------------------ the CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "live",
        help="play a recording into a gateway's live endpoint, printing events as they come",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="FILE|URI", help="any file or URI classify reads")
    parser.add_argument(
        "--url",
        default=PlayOptions.url,
        help="the gateway, ws://HOST:PORT[/PREFIX], or the protocol's own endpoint on it "
        "(ws://HOST:PORT/v1/live for --protocol live); URL,URL2,...: where an AudioHook call "
        "goes when a draining gateway asks it to reconnect (in turn; one URL behind a load "
        "balancer)",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="live")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="times real time (the gateway allows ~2)"
    )
    add_json_argument(parser, "one event per line")
    parser.add_argument(
        "--parties",
        metavar="NAME[,NAME]",
        help="party names, one per channel (--protocol live; default caller, or customer,agent "
        "for stereo); one name mixes a stereo file into one party",
    )
    parser.add_argument(
        "--encoding",
        choices=LIVE_ENCODINGS,
        default="pcm_s16le",
        help="--protocol live only (AudioHook and Twilio send mu-law 8 kHz)",
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        choices=LIVE_SAMPLE_RATES,
        help="--protocol live only (default 16000 for pcm_s16le, 8000 for G.711)",
    )
    parser.add_argument("--api-key-file", type=Path, metavar="FILE", help="the gateway's key")
    parser.add_argument(
        "--call-id",
        metavar="ID",
        help="the call's id ([A-Za-z0-9._:-]{1,128}; AudioHook conversation id, Twilio "
        "callSid); default a random one",
    )
    parser.set_defaults(func=run_live)


def run_live(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    emit = _print_json if args.json else _print_line
    try:
        asyncio.run(play(options, emit))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PlayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _options(args: argparse.Namespace) -> PlayOptions:
    try:
        import websockets  # noqa: F401
    except ImportError:
        raise UsageError("e2v live needs websockets: pip install './[live]' in the clone") from None
    if not 0 < args.speed <= MAX_SPEED:
        raise UsageError(f"--speed must be in (0, {MAX_SPEED:g}], not {args.speed:g}")
    if args.protocol != "live" and (
        args.parties or args.sample_rate or args.encoding != "pcm_s16le"
    ):
        raise UsageError(
            "--parties, --encoding and --sample-rate apply to --protocol live "
            "(AudioHook and Twilio name their channels and send mu-law 8 kHz)"
        )
    parties = None
    if args.parties is not None:
        parties = tuple(name.strip() for name in args.parties.split(","))
        if not 1 <= len(parties) <= LIVE_MAX_CHANNELS or not all(parties):
            raise UsageError(
                f"--parties takes 1 or {LIVE_MAX_CHANNELS} names, not {args.parties!r}"
            )
    api_key = None
    if args.api_key_file:
        from e2v.client.secrets import read_secret_file

        try:
            api_key = read_secret_file(args.api_key_file, "--api-key-file").decode("ascii")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    rate = args.sample_rate or (SAMPLE_RATE if args.encoding == "pcm_s16le" else 8000)
    return PlayOptions(
        source=args.source,
        url=",".join(gateway_url(u.strip(), args.protocol) for u in args.url.split(",")),
        protocol=args.protocol,
        speed=args.speed,
        parties=parties,
        api_key=api_key,
        call_id=args.call_id,
        encoding=args.encoding,
        sample_rate=rate,
    )


def gateway_url(url: str, protocol: str) -> str:
    """--url as the gateway's base: the base itself, or the endpoint of `protocol` on it
    (what users paste: ws://HOST:PORT/v1/live). Another protocol's endpoint is a
    UsageError that names the right one."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    own = ENDPOINTS[protocol]
    if path.endswith(own):
        return urlunsplit(parts._replace(path=path[: -len(own)]))
    for other, endpoint in ENDPOINTS.items():
        if path.endswith(endpoint):
            base = urlunsplit(parts._replace(path=path[: -len(endpoint)]))
            raise UsageError(
                f"--url {url} is the {endpoint} endpoint of --protocol {other}; --protocol "
                f"{protocol} connects to {base}{own} (give that, or the gateway's base URL "
                f"{base}), or pass --protocol {other}"
            )
    return url


# ------------------------------------------------------------------------- the player


async def play(options: PlayOptions, emit: Callable[[dict], None]) -> dict:
    """Stream `options.source` to the gateway; `emit` each event; return the summary."""
    audio = await Recording.open(options)
    client = {"live": NativeClient, "audiohook": AudioHookClient, "twilio": TwilioClient}
    try:
        return await client[options.protocol](options, audio, emit).run()
    finally:
        audio.close()


class Recording:
    """The recording decoded at the wire's rate, one row per party, served in paced frames."""

    def __init__(self, options: PlayOptions, chunks, first: np.ndarray, file=None):
        self.options, self._chunks, self._pending, self._file = options, chunks, [first], file
        self.rate = options.format[1]
        self.channels = 1 if options.parties and len(options.parties) == 1 else len(first)
        self.sent_s = 0.0

    @classmethod
    async def open(cls, options: PlayOptions) -> Recording:
        """Decode the first chunk (so the channel count is known before connecting)."""
        from e2v.client.audio import AudioError, stream_audio
        from e2v.client.inputs import InputError, is_uri, open_input

        rate, file = options.format[1], None
        try:
            file = open_input(options.source) if is_uri(options.source) else None
            chunks = stream_audio(file or options.source, rate, name=options.source, mix=False)
            first = await asyncio.to_thread(next, chunks, None)
        except (AudioError, InputError) as exc:
            if file is not None:
                file.close()
            raise PlayError(str(exc)) from None
        channels = len(first)
        if options.parties and len(options.parties) > channels:
            raise UsageError(
                f"--parties names {len(options.parties)} parties; {options.source} has "
                f"{channels} channel(s)"
            )
        if channels > LIVE_MAX_CHANNELS and not (options.parties and len(options.parties) == 1):
            raise UsageError(
                f"{options.source} has {channels} channels; a live stream carries 1 or "
                f"{LIVE_MAX_CHANNELS} (--parties NAME mixes them into one)"
            )
        return cls(options, chunks, first, file)

    async def frames(self, frame_s: float) -> AsyncIterator[np.ndarray]:
        """(channels, n) float32 frames of `frame_s`, each once its time has come."""
        from e2v.client.audio import AudioError

        size = round(frame_s * self.rate)
        started, buffered = time.monotonic(), sum(chunk.shape[1] for chunk in self._pending)
        while True:
            while buffered < size:
                try:
                    chunk = await asyncio.to_thread(next, self._chunks, None)
                except AudioError as exc:
                    raise PlayError(str(exc)) from None
                if chunk is None:
                    break
                self._pending.append(chunk)
                buffered += chunk.shape[1]
            if not buffered:
                return
            joined = np.concatenate(self._pending, axis=1)
            frame, rest = joined[:, :size], joined[:, size:]
            self._pending, buffered = [rest], rest.shape[1]
            delay = started + self.sent_s / self.options.speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.sent_s += frame.shape[1] / self.rate
            yield frame.mean(axis=0, keepdims=True) if self.channels == 1 else frame

    def close(self) -> None:
        with contextlib.suppress(ValueError):  # still running in a thread (a cancelled read)
            self._chunks.close()
        if self._file is not None:
            self._file.close()


def _encode(frame: np.ndarray, encoding: str) -> bytes:
    """Interleave the channels sample by sample and encode (the gateway's own codecs)."""
    from e2v.client.live.codecs import encode

    return encode(np.ascontiguousarray(frame.T).reshape(-1), encoding)


# ----------------------------------------------------------------------- the transport


class Client:
    """What every protocol shares: connect, read events until the end, bounded waits."""

    compression: str | None = "deflate"  # websockets' default; a load test turns it off
    frame_s = FRAME_S["live"]  # audio per paced frame (a load test sets its own)

    def __init__(self, options: PlayOptions, audio: Recording, emit: Callable[[dict], None]):
        self.options, self.audio, self.emit = options, audio, emit
        self.call_id = options.call_id or self.default_call_id()
        self.summary: dict | None = None
        self.stopped_at: float | None = None

    def default_call_id(self) -> str:
        return str(uuid.uuid4())

    def url(self, path: str, index: int = 0) -> str:
        """--url (the gateway, with any path prefix of a proxy) + `path`; http(s) is ws(s).
        Of a list (`URL,URL2`), the `index`th (round): where a moved call goes next."""
        urls = [u.strip() for u in self.options.url.split(",") if u.strip()] or [""]
        base = urls[index % len(urls)].rstrip("/")
        for old, new in (("http://", "ws://"), ("https://", "wss://")):
            base = new + base[len(old) :] if base.startswith(old) else base
        if not base.startswith(("ws://", "wss://")):
            raise UsageError(f"--url must be ws://HOST:PORT or wss://..., not {self.options.url!r}")
        return base + path

    def headers(self) -> dict[str, str]:
        key = self.options.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def connect(self, url: str, headers: dict[str, str]):
        """An open WebSocket, or PlayError with why not (refused, timed out, HTTP status)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

        try:
            return await connect(
                url,
                additional_headers=headers,
                open_timeout=CONNECT_TIMEOUT_S,
                max_size=MAX_MESSAGE_BYTES,
                compression=self.compression,
                close_timeout=5,
                user_agent_header="e2v-live",
            )
        except InvalidURI as exc:
            raise UsageError(f"--url: {exc}") from None
        except InvalidStatus as exc:
            response = exc.response
            body = response.body.decode("utf-8", "replace").strip()[:200] if response.body else ""
            raise PlayError(
                f"{url} refused the connection: HTTP {response.status_code}"
                + (f" ({body})" if body else "")
            ) from None
        except (TimeoutError, asyncio.TimeoutError):
            raise PlayError(
                f"{url}: no WebSocket handshake within {CONNECT_TIMEOUT_S:g} s"
            ) from None
        except (OSError, InvalidHandshake) as exc:
            raise PlayError(f"cannot connect to {url}: {exc}") from None

    async def answer(self, ws, what: str) -> dict:
        """The next JSON message, within ANSWER_TIMEOUT_S."""
        try:
            message = await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError):
            raise PlayError(f"no {what} from the gateway within {ANSWER_TIMEOUT_S:g} s") from None
        except self.closed_errors():
            raise self.gateway_closed(ws, f"before {what}") from None
        return self.parse(message)

    async def send(self, ws, message: str | bytes) -> bool:
        """Send within SEND_TIMEOUT_S; False once the gateway has closed the socket."""
        try:
            await asyncio.wait_for(ws.send(message), SEND_TIMEOUT_S)
        except self.closed_errors():
            return False
        except (TimeoutError, asyncio.TimeoutError):
            raise PlayError(
                f"the gateway stopped reading: one frame unsent for {SEND_TIMEOUT_S:g} s"
            ) from None
        return True

    async def messages(self, ws) -> AsyncIterator[dict]:
        """JSON messages until the socket closes; after stop, silence is bounded (polled,
        since stop comes while a receive is pending: websockets' recv is cancel-safe)."""
        last = time.monotonic()
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), POLL_S)
            except self.closed_errors():
                return
            except (TimeoutError, asyncio.TimeoutError):
                since = max(last, self.stopped_at or 0.0)
                if self.stopped_at is not None and time.monotonic() - since > END_TIMEOUT_S:
                    raise PlayError(
                        f"no answer from the gateway for {END_TIMEOUT_S:g} s after the end "
                        "of the audio (no summary)"
                    ) from None
                continue
            last = time.monotonic()
            yield self.parse(message)

    def event(self, event: dict) -> None:
        """Print one event; remember the summary."""
        self.emit(event)
        if event.get("type") == EVENT_SUMMARY:
            self.summary = event
            if event.get("synthetic") and self.options.protocol != "live":  # no `started`
                print(SYNTHETIC_NOTE, file=sys.stderr)

    def stop(self) -> None:
        self.stopped_at = time.monotonic()

    def parse(self, message: str | bytes) -> dict:
        if isinstance(message, bytes):
            raise PlayError("the gateway sent a binary message where JSON was expected")
        try:
            data = json.loads(message)
        except ValueError:
            raise PlayError(f"the gateway sent invalid JSON: {message[:120]!r}") from None
        if not isinstance(data, dict):
            raise PlayError(f"the gateway sent JSON that is not an object: {message[:120]!r}")
        return data

    @staticmethod
    def closed_errors() -> tuple[type[BaseException], ...]:
        from websockets.exceptions import ConnectionClosed

        return (ConnectionClosed,)

    def gateway_closed(self, ws, when: str = "") -> PlayError:
        """The error of a session the gateway ended (or dropped), with its close code."""
        error = PlayError(self.closed_reason(ws, when))
        error.close_code, error.close_reason = ws.close_code, ws.close_reason or ""
        return error

    @staticmethod
    def closed_reason(ws, when: str = "") -> str:
        code, reason, when = ws.close_code, ws.close_reason, f" {when}" if when else ""
        if code in (None, 1006):  # 1006: no close frame came
            return f"the connection to the gateway dropped{when} (no close frame)"
        return f"the gateway closed the connection{when}: {code}" + (f" {reason}" if reason else "")

    def finished(self, ws) -> dict:
        """The summary when the session closed normally after it; PlayError otherwise."""
        if ws.close_code not in (CLOSE_NORMAL, None) or self.summary is None:
            raise self.gateway_closed(ws)
        return self.summary


class NativeClient(Client):
    """`/v1/live`: JSON `start`, `started`, binary frames, `stop`, events until close 1000."""

    async def run(self) -> dict:
        ws = await self.connect(self.url(LIVE_PATH), self.headers())
        async with ws:
            await self.send(ws, json.dumps(self.start_message()))
            started = await self.answer(ws, f"'{LIVE_STARTED}'")
            if started.get("type") != LIVE_STARTED:
                self.unexpected(started)
                await self.drain(ws)
                raise self.gateway_closed(ws)
            self.note_model(started)
            reader = asyncio.create_task(self.drain(ws))
            try:
                async for payload in self.payloads():
                    if reader.done() or not await self.send(ws, payload):
                        break
                else:
                    await self.send(ws, json.dumps({"type": LIVE_STOP}))
                self.stop()
                await reader
            finally:
                reader.cancel()
            return self.finished(ws)

    def start_message(self) -> dict:
        encoding, rate = self.options.format
        start = {"type": LIVE_START, "call_id": self.call_id, "encoding": encoding}
        start |= {"sample_rate": rate, "channels": self.audio.channels}
        if self.options.parties:
            start["parties"] = list(self.options.parties)
        return start

    async def payloads(self) -> AsyncIterator[bytes]:
        """The audio as the wire carries it: frames encoded, each once its time has come."""
        encoding = self.options.format[0]
        async for frame in self.audio.frames(self.frame_s):
            yield _encode(frame, encoding)

    def note_model(self, started: dict) -> None:
        _note_model(started, self.options.speed)

    async def drain(self, ws) -> None:
        async for message in self.messages(ws):
            if message.get("type") in LIVE_EVENT_TYPES:
                self.event(message)
            else:
                self.unexpected(message)

    def unexpected(self, message: dict) -> None:
        if message.get("type") == EVENT_ERROR:
            self.event(message)
        else:
            print(f"note: unexpected message {json.dumps(message)[:200]}", file=sys.stderr)


class AudioHookClient(Client):
    """`/v1/audiohook`, as Genesys Cloud speaks AudioHook v2: `open` with one media offer,
    `opened`, PCMU frames, `close`/`closed`; results come back in `event` messages. A
    `disconnect` from the gateway is answered with `close`, as the protocol asks.

    `reconnect` from a draining gateway moves the conversation: a new session opens on
    the next --url (or the same one, behind a load balancer that has taken the draining
    instance out) with `continuedSessions` naming this one; once it is `opened` the audio
    goes on there, frame after frame, and this session is closed with reason `reconnect`
    (its last finals still arrive on it)."""

    CHANNELS = {1: ["external"], 2: ["external", "internal"]}  # customer, agent
    MAX_MOVES = 8
    frame_s = FRAME_S["audiohook"]

    def __init__(self, *args) -> None:
        super().__init__(*args)
        if not _is_uuid(self.call_id):
            raise UsageError("--call-id must be a UUID for AudioHook (its conversationId)")
        self.organization_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, "e2v-live"))
        self.moves = 0

    def opening(self, continued: list[dict] | None) -> dict:
        media = {"type": "audio", "format": "PCMU", "rate": 8000}
        media["channels"] = self.CHANNELS[self.audio.channels]
        participant = {"id": str(uuid.uuid4()), "ani": "+15550100", "aniName": "e2v live"}
        opening = {
            "organizationId": self.organization_id,
            "conversationId": self.call_id,
            "participant": participant | {"dnis": "+15550199"},
            "media": [media],
            "language": "en-US",
        }
        if continued:
            opening["continuedSessions"] = continued
        return opening

    async def run(self) -> dict:
        async with contextlib.AsyncExitStack() as stack:
            leg = await self.open_leg(stack, None)
            left: list[_Leg] = []
            async for frame in self.audio.frames(self.frame_s):
                if leg.reader.done() or self.stopped_at is not None:
                    break
                if leg.reconnect and self.moves < self.MAX_MOVES:
                    cut_s = self.audio.sent_s - frame.shape[1] / self.audio.rate
                    leg = await self.move(stack, leg, cut_s)
                    left.append(leg.previous)
                if not await self.send(leg.ws, _encode(frame, "mulaw")):
                    break
            if self.stopped_at is None and not leg.reader.done():
                await self.send(leg.ws, leg.message("close", {"reason": "end"}))
            self.stop()
            for each in [*left, leg]:
                await each.reader
            return self.finished_leg(leg)

    async def open_leg(
        self, stack: contextlib.AsyncExitStack, previous: _Leg | None, start_s: float = 0.0
    ) -> _Leg:
        """A session of the conversation from `start_s` of the audio, `opened` (PlayError
        otherwise)."""
        leg = _Leg(self, previous, start_s)
        leg.ws = await stack.enter_async_context(
            await self.connect(self.url(AUDIOHOOK_PATH, self.moves), leg.headers())
        )
        continued = previous and [previous.continued()]
        await self.send(leg.ws, leg.message("open", self.opening(continued)))
        leg.reader = asyncio.create_task(leg.drain())
        stack.callback(leg.reader.cancel)
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while not leg.opened and not leg.reader.done():
            if time.monotonic() > deadline:
                raise PlayError(f"no 'opened' from the gateway within {ANSWER_TIMEOUT_S:g} s")
            await asyncio.sleep(0.02)
        if not leg.opened:
            await leg.reader
            self.finished_leg(leg)  # raises: why it ended before `opened`
        return leg

    async def move(self, stack: contextlib.AsyncExitStack, leg: _Leg, cut_s: float) -> _Leg:
        """The gateway asked to reconnect: open the next session (its audio from `cut_s`
        on), then close this one."""
        self.moves += 1
        print(
            f"note: the gateway asked to reconnect at {cut_s:.3f} s of audio; the call "
            f"moves to {self.url('', self.moves)}",
            file=sys.stderr,
        )
        new = await self.open_leg(stack, leg, cut_s)
        await self.send(leg.ws, leg.message("close", {"reason": "reconnect"}))
        return new

    def finished_leg(self, leg: _Leg) -> dict:
        if leg.disconnect is not None:
            info = f"{leg.disconnect.get('reason')}: {leg.disconnect.get('info', '')}"
            raise PlayError(f"{self.closed_reason(leg.ws)} (AudioHook disconnect {info})")
        if not leg.closed:
            raise self.gateway_closed(leg.ws, "before 'closed'")
        if self.summary is None:
            raise PlayError("AudioHook: 'closed' came without a summary event")
        return self.summary

    def on_event(self, message: dict) -> None:
        for entity in message.get("parameters", {}).get("entities", []):
            if not isinstance(entity, dict) or entity.get("type") != AUDIOHOOK_ENTITY_TYPE:
                continue
            data = entity.get("data")
            if isinstance(data, dict) and data.get("type") in LIVE_EVENT_TYPES:
                self.event(data)


class _Leg:
    """One AudioHook session (one WebSocket) of a conversation: its id, sequence numbers
    and state, read by its own reader task."""

    def __init__(self, client: AudioHookClient, previous: _Leg | None, start_s: float):
        self.client, self.previous = client, previous
        self.session_id = str(uuid.uuid4())
        self.seq = self.serverseq = 0
        self.start_s = start_s  # the conversation's audio before this session
        self.opened = self.closed = self.reconnect = False
        self.disconnect: dict | None = None  # the gateway's `disconnect` parameters
        self.ws = self.reader = None

    def headers(self) -> dict[str, str]:
        headers = {
            "Audiohook-Organization-Id": self.client.organization_id,
            "Audiohook-Session-Id": self.session_id,
            "Audiohook-Correlation-Id": str(uuid.uuid4()),
        }
        if self.client.options.api_key:
            headers["X-API-KEY"] = self.client.options.api_key
        return headers

    def message(self, type_: str, parameters: dict) -> str:
        self.seq += 1
        message = {"version": "2", "id": self.session_id, "type": type_, "seq": self.seq}
        position = f"PT{self.client.audio.sent_s - self.start_s:.3f}S"
        message |= {"serverseq": self.serverseq, "position": position, "parameters": parameters}
        return json.dumps(message)

    def continued(self) -> dict:
        """This session as the next one's `continuedSessions` entry names it."""
        return {"id": self.session_id, "serverseq": self.serverseq, "clientseq": self.seq}

    async def drain(self) -> None:
        client = self.client
        async for message in client.messages(self.ws):
            self.serverseq = message.get("seq", self.serverseq)
            kind = message.get("type")
            if kind == "opened":
                self.opened = True
            elif kind == "event":
                client.on_event(message)
            elif kind == "reconnect":
                self.reconnect = True
            elif kind == "disconnect":  # the gateway ends the session: close, as asked
                self.disconnect = message.get("parameters") or {}
                client.stop()
                await client.send(self.ws, self.message("close", {"reason": "disconnect"}))
            elif kind == "closed":
                self.closed = True
                if self.disconnect is None:  # the client ends the socket, as Genesys does
                    await self.ws.close()
                    return
                # after a disconnect the gateway closes with its code: read it


class TwilioClient(Client):
    """`/v1/twilio`, as Twilio Media Streams speaks it: `connected`, `start`, 20 ms `media`
    messages per track (inbound: the caller, outbound: the callee), `stop`. Results are read
    from the call's event subscription, opened first so that none is missed."""

    TRACKS = ("inbound", "outbound")
    frame_s = FRAME_S["twilio"]  # media messages of 20 ms, sent in groups of this

    def default_call_id(self) -> str:
        return "CA" + uuid.uuid4().hex  # a Twilio callSid

    async def run(self) -> dict:
        stream_sid = "MZ" + uuid.uuid4().hex
        events_path = CALL_EVENTS_WS_PATH.format(call_id=self.call_id)
        subscription = await self.connect(self.url(events_path), self.headers())
        async with subscription:
            reader = asyncio.create_task(self.drain(subscription))
            try:
                await self.stream(stream_sid, reader)
                self.stop()
                await reader
            finally:
                reader.cancel()
            if self.summary is None:
                raise self.gateway_closed(subscription, "before the summary")
            return self.summary

    async def stream(self, stream_sid: str, reader: asyncio.Task) -> None:
        """The Media Stream itself; it ends early only when the gateway or the
        subscription closes, and a close that is not normal fails the call."""
        tracks = list(self.TRACKS[: self.audio.channels])
        ws = await self.connect(self.url(TWILIO_PATH), {})
        async with ws:
            async for message in self.twilio_messages(stream_sid, tracks):
                if reader.done():
                    return
                if not await self.send(ws, message):
                    raise self.gateway_closed(ws, "mid-stream")
        if ws.close_code not in (CLOSE_NORMAL, None):  # refused what came last (`stop`)
            raise self.gateway_closed(ws, "at the end of the stream")

    async def twilio_messages(self, stream_sid: str, tracks: list[str]) -> AsyncIterator[str]:
        """connected, start, media per 20 ms per track, stop: Twilio's JSON text frames."""
        seq = 0

        def message(event: str, **body) -> str:
            nonlocal seq
            seq += 1
            return json.dumps(
                {"event": event, "sequenceNumber": str(seq), "streamSid": stream_sid} | body
            )

        yield json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        start = {"accountSid": "AC" + "0" * 32, "callSid": self.call_id, "streamSid": stream_sid}
        # Twilio cannot add headers to the stream's URL: the key is a TwiML <Parameter>.
        custom = {"api_key": self.options.api_key} if self.options.api_key else {}
        start |= {"tracks": tracks, "customParameters": custom, "mediaFormat": media_format}
        yield message("start", start=start)
        size, chunk = round(TWILIO_MEDIA_S * 8000), 0
        async for frame in self.audio.frames(self.frame_s):
            for offset in range(0, frame.shape[1], size):
                chunk += 1
                timestamp = str(round((self.audio.sent_s * 8000 - frame.shape[1] + offset) / 8))
                for track, samples in zip(tracks, frame[:, offset : offset + size]):
                    payload = base64.b64encode(_encode(samples[None], "mulaw")).decode("ascii")
                    media = {"track": track, "chunk": str(chunk), "timestamp": timestamp}
                    yield message("media", media=media | {"payload": payload})
        yield message("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": self.call_id})

    async def drain(self, ws) -> None:
        async for message in self.messages(ws):
            if message.get("type") in LIVE_EVENT_TYPES:
                self.event(message)
                if message["type"] == EVENT_SUMMARY:
                    return


# ---------------------------------------------------------------------------- printing


def _note_model(started: dict, speed: float) -> None:
    model = started.get("model", "?")
    print(f"note: call {started.get('call_id')}, model {model}", file=sys.stderr)
    if started.get("synthetic"):
        print(SYNTHETIC_NOTE, file=sys.stderr)
    limit = (started.get("limits") or {}).get("max_speed")
    if isinstance(limit, (int, float)) and speed > limit:
        print(
            f"note: --speed {speed:g} is above this gateway's {limit:g}x: "
            "expect it to close the call as too fast",
            file=sys.stderr,
        )


def _print_json(event: dict) -> None:
    print(json.dumps(event, separators=(",", ":")), flush=True)


def _print_line(event: dict) -> None:
    print(format_event(event), flush=True)


def format_event(event: dict) -> str:
    """One readable line: audio time, party, type, what it says."""
    start, end = event.get("start_s"), event.get("end_s")
    timed = isinstance(start, (int, float)) and isinstance(end, (int, float))
    span = f"{start:7.2f}-{end:7.2f} s" if timed else ""
    party = str(event.get("party") or "-")
    return f"{span:<18} {party:<10} {event.get('type', '?'):<16} {_detail(event)}".rstrip()


def _detail(event: dict) -> str:
    kind = event.get("type")
    if kind == "utterance.start":
        return f"#{event.get('utterance', '?')}"
    if kind in ("result", "utterance.end"):
        text = f"{event.get('emotion') or '-'} {_pct(event.get('confidence'))}"
        if kind == "result":
            lag = event.get("lag_s")
            notes = ["interim"] + ([f"lag {lag:.2f} s"] if isinstance(lag, (int, float)) else [])
            if event.get("coalesced"):
                notes.append(f"{event['coalesced']} coalesced")
            return f"{text}  ({', '.join(notes)})"
        return f"{text}  #{event.get('utterance', '?')} final"
    if kind == "alert":
        return (
            f"ALERT {event.get('label')} {_pct(event.get('score'))} >= "
            f"{_pct(event.get('threshold'))}"
        )
    if kind == "summary":
        parts = [_party_summary(p) for p in event.get("parties") or [] if isinstance(p, dict)]
        synthetic = ["[synthetic model]"] if event.get("synthetic") else []
        return "; ".join(parts + [f"overlap {event.get('overlap_s') or 0:.1f} s"] + synthetic)
    if kind == "error":
        return f"{event.get('code', '')} {event.get('error_kind', '')}: {event.get('message', '')}"
    return json.dumps(event)[:200]


def _party_summary(party: dict) -> str:
    if party.get("no_speech"):
        verdict = "no speech"
    else:
        verdict = f"{party.get('emotion') or '-'} {_pct(party.get('confidence'))}"
    count, speech = party.get("segments", 0), party.get("speech_s") or 0
    return f"{party.get('party')}: {verdict}, {count} utterance(s), {speech:.1f} s speech"


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False
