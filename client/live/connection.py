"""The one path of every live WebSocket, whatever its protocol. Protocol modules (native.py,
twilio.py, audiohook.py) only translate their wire format (wire.py); this is the rest:

    accept, key (wire.authenticate), a slot (hub.admit), events out (Socket.attach)
    handshake: messages until the opening, within --live-handshake-s
    the session (hub.session), the protocol's answer (wire.opened)
    the stream: messages until the client's end, within --live-idle-s of audio; audio
        enters the session in `Connection.audio`; the drain is noticed in passing
    finish: every final and the summary, within FINISH_S (wire.finished)
    close: the refusal where no session published one, the events flushed,
        wire.farewell, the close frame with the contract's code

Audio goes in through one method, `audio` (paced per stream, then `LiveSession.feed`), and
events come out through one place, the hub's fan-out into this socket's outbox, framed by
the protocol in the socket's writer: per-tick audio work and event fan-out live there.
Nothing here makes a task per message.
"""

from __future__ import annotations

import asyncio
import logging

from e2v.client.live.errors import LiveError
from e2v.client.live.hub import GOING_AWAY_REASON, LiveHub
from e2v.client.live.limits import AudioPace
from e2v.client.live.outbox import event_json
from e2v.client.live.session import LiveSession, StreamFormat
from e2v.client.live.sockets import WOKEN, Socket
from e2v.client.live.wire import ENDED, Opening, Wire

from e2v.contract import CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_TIMEOUT

log = logging.getLogger("e2v.live")

# The client's end (stop, close) -> every final scored and the summary sent, within this
# (Triton restarting included: the scheduler retries finals); past it, CLOSE_INTERNAL.
FINISH_S = 120.0
INTERNAL_MESSAGE = "internal error (a bug; the gateway log has details)"
GONE, DRAINED = object(), object()  # how a stream ends besides the client's own end


async def serve(websocket, hub: LiveHub, wire: type[Wire]) -> None:
    """One WebSocket of protocol `wire`, from the upgrade to the close."""
    await Connection(websocket, hub, wire).run()


class Connection:
    """One live WebSocket on the session path (see the module)."""

    def __init__(self, websocket, hub: LiveHub, wire: type[Wire]):
        self.hub, self.limits = hub, hub.limits
        self.socket = Socket(websocket, hub.limits.max_message_bytes)
        self.wire = wire(self.socket, hub.limits, hub.services)
        self.session: LiveSession | None = None
        self._loop = asyncio.get_running_loop()
        self._in_session = False  # from here on the hub publishes a session's error
        self._widths: dict[int | None, int] = {}  # bytes per second of audio, per stream
        self._paces: dict[int | None, AudioPace] = {}
        self._paused = False
        self._last_audio = 0.0
        self._drain_seen = False
        self._drain_end: float | None = None

    async def run(self) -> None:
        try:
            await self.socket.accept(self.wire.query_key)
            self.wire.authenticate()
            outbox = self.hub.admit()
        except Exception as exc:  # noqa: BLE001 - refused (or a bug): said, then closed
            await self._close(self._failure(exc), published=False)
            return
        with outbox:  # the slot is held until the close frame is sent (the drain waits for it)
            self.socket.attach(outbox, self.wire.frame)
            try:
                error, published = await self._serve(), True
            except Exception as exc:  # noqa: BLE001 - this session's own close, never the gateway's
                # Inside a session the hub published a LiveError, not a bug's (it aborts).
                error = self._failure(exc)
                published = self._in_session and error is exc
            await self._close(error, published)

    def _failure(self, exc: Exception) -> LiveError:
        """`exc` if it is a LiveError; a bug (logged) is CLOSE_INTERNAL."""
        if isinstance(exc, LiveError):
            return exc
        log.error("live %s session failed", self.wire.name, exc_info=exc)
        return LiveError(CLOSE_INTERNAL, "internal", INTERNAL_MESSAGE)

    async def _serve(self) -> LiveError | None:
        """Handshake, session, stream, finish; the going-away error after our own drain
        deadline (the session ended normally: finals and summary were published)."""
        opening = await self._handshake()
        if opening is None or opening is ENDED:
            return None
        self._set_format(opening.fmt)
        if opening.probe:
            ending = await self._probe()
        else:
            ending = await self._session(opening)
        if ending is DRAINED:
            return LiveError(CLOSE_GOING_AWAY, "going_away", GOING_AWAY_REASON)
        return None

    async def _session(self, opening: Opening) -> object:
        hub, outbox = self.hub, self.socket.outbox
        call_id, fmt, settings = opening.call_id, opening.fmt, opening.settings
        async with hub.session(outbox, call_id, fmt, settings, self.wire.name) as session:
            self._in_session, self.session = True, session
            await self.wire.opened(session, hub.session_id(session))
            ending = await self._stream()
            if ending is GONE:  # gone without its end: finish for subscribers and webhooks
                outbox.close()
            await self._finish(session)
            if ending is ENDED:
                await self.wire.finished()
        return ending

    async def _probe(self) -> object:
        """A connection check: the protocol's answers, no session, no events."""
        timer = self.hub.time_limit(self.socket.outbox)
        try:
            await self.wire.opened(None, None)
            ending = await self._stream()
            if ending is ENDED:
                await self.wire.finished()
            return ending
        finally:
            timer.cancel()

    # ------------------------------------------------------------------ receiving

    async def _handshake(self) -> Opening | object | None:
        """The wire's opening (or ENDED); None when the client left first."""
        deadline = self._loop.time() + self.limits.handshake_s
        while True:
            try:
                message = await self.socket.next(deadline - self._loop.time())
            except asyncio.TimeoutError:
                raise LiveError(
                    CLOSE_TIMEOUT,
                    "handshake",
                    f"no {self.wire.first} message within {self.limits.handshake_s:g} s",
                ) from None
            if message is None:
                return None
            if message is WOKEN:
                continue
            opening = await self.wire.handshake(message)
            if opening is not None:
                return opening

    async def _stream(self) -> object:
        """Messages until the client's end (ENDED), its leaving (GONE) or our own drain
        deadline (DRAINED); no audio for --live-idle-s (unpaused) ends the session."""
        socket, wire, outbox = self.socket, self.wire, self.socket.outbox
        self._last_audio = self._loop.time()
        while True:
            if not self._drain_seen and outbox.draining.done():
                await self._drained()
            wait, drain_first = self._wait_s()
            try:
                message = await socket.next(wait)
            except asyncio.TimeoutError:
                if drain_first:
                    return DRAINED
                if not self._paused:
                    raise LiveError(
                        CLOSE_TIMEOUT, "idle", f"no {wire.audio} for {self.limits.idle_s:g} s"
                    ) from None
                continue
            if message is None:
                return GONE
            if message is not WOKEN and await wire.message(message, self):
                return ENDED

    def _wait_s(self) -> tuple[float | None, bool]:
        """How long the next message may take, and whether our drain deadline comes first."""
        now = self._loop.time()
        wait = None if self._paused else self._last_audio + self.limits.idle_s - now
        if self._drain_end is not None and (wait is None or self._drain_end - now <= wait):
            return self._drain_end - now, True
        return wait, False

    async def _drained(self) -> None:
        """The gateway drains: a protocol with a drain margin ends its own session that
        long before the drain deadline (AudioHook); others wait for the hub's going-away."""
        self._drain_seen = True
        margin = self.wire.drain_margin_s
        if margin is not None:
            self._drain_end = self._loop.time() + max(0.0, self.limits.drain_s - margin)
            await self.wire.draining()

    # ------------------------------------------------------------------ audio

    def _set_format(self, fmt: StreamFormat) -> None:
        """Bytes per second of audio: interleaved frames, and each channel's on its own."""
        self._widths[None] = fmt.frame_bytes * fmt.sample_rate
        for channel in range(fmt.channels):
            self._widths[channel] = fmt.frame_bytes // fmt.channels * fmt.sample_rate

    async def audio(self, data: bytes, channel: int | None = None, paced: bool = True) -> None:
        """Where audio enters the session: interleaved frames (`channel` None) or one
        channel's, paced per stream (--live-max-speed), counted against idle, then fed. An
        empty message is no audio: it keeps nothing alive. A probe's audio goes no further."""
        if paced:
            pace = self._paces.get(channel)
            if pace is None:
                pace = self._paces[channel] = AudioPace(self.limits.max_speed, self.limits.burst_s)
            pace.take(len(data) / self._widths[channel])
        if not data:
            return
        if self.session is not None:
            # Not guarded: feed waits only while this session's audio is processed.
            if channel is None:
                await self.session.feed(data)
            else:
                await self.session.feed_channel(channel, data)
        self._last_audio = self._loop.time()

    def pause(self) -> None:
        """No audio until `resume` (AudioHook `paused`): the open utterances end; not idle."""
        self._paused = True
        if self.session is not None:
            self.session.pause()

    def resume(self) -> None:
        self._paused = False
        self._last_audio = self._loop.time()
        if self.session is not None:
            self.session.resume()

    # ------------------------------------------------------------------ ending

    async def _finish(self, session: LiveSession) -> None:
        try:  # shielded: a drain deadline meanwhile waits for this same finish
            finishing = asyncio.shield(self.hub.finishing(session, move=self.wire.moving))
            await self.socket.outbox.guard(finishing, FINISH_S)
        except asyncio.TimeoutError:
            raise LiveError(
                CLOSE_INTERNAL, "finish_timeout", f"finals not scored within {FINISH_S:g} s"
            ) from None

    async def _close(self, error: LiveError | None, published: bool) -> None:
        """The refusal (unless the hub published the error), the events, the protocol's
        farewell, then the close frame: 1000, or the error's code and reason."""
        socket, wire = self.socket, self.wire
        if error is not None and error.code != CLOSE_NORMAL:
            log.info("live %s: %s (%s): %s", wire.name, error.kind, error.code, error)
        if error is not None and not published:
            event = wire.refusal(error)
            if event is not None:
                await socket.refuse(event, wire.frame(event, event_json(event)))
        await socket.flush()
        await wire.farewell(error)
        await socket.close(error)
