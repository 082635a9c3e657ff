"""The gateway's live sessions: the slot limit, each socket's bounded outbox, the call's
claim on the bus, subscriptions by call id, metrics and the drain on shutdown.

Every event a session publishes goes, without ever blocking, to
- its socket's `Outbox` (bounded in events and bytes: a client that stops reading
  overflows it, and its session ends with CLOSE_SLOW_READER; no other session waits);
- the bus, through the call's `Claim` (client/live/bus.py): subscribers of the call id on
  any replica (each with its own bounded queue, dropped the same way), webhooks for alerts
  and the summary, `GET /v1/calls`. The bus is in process by default (`LocalBus`), NATS
  JetStream with `--bus` (nats_bus.py); the hub is the same for both.

A call id is claimed on the bus when its session starts (a duplicate anywhere is refused
with 4400). With a shared bus a draining gateway's calls move: moves.py says how.

A socket takes a slot as soon as it is accepted (`admit`), before its first message, so
sockets that never speak are bounded by the same limit and lose their slot after the
handshake timeout. The session path (connection.py) uses `admit`, `session` (or
`time_limit` for a probe), `session_id` and `finishing`, nothing else of the hub; what the
hub needs from the gateway comes in `LiveServices` (services.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from e2v.client.live.bus import CallInUse, LocalBus, call_in_use, listing
from e2v.client.live.errors import LiveError
from e2v.client.live.limits import CLOSE_WAIT_S, LiveLimits
from e2v.client.live.moves import CallEvents, hand_over
from e2v.client.live.outbox import Outbox, error_event, event_json
from e2v.client.live.scheduler import Scheduler
from e2v.client.live.services import LiveServices
from e2v.client.live.session import LiveSession, LiveSettings, StreamFormat

from e2v.contract import (
    CLOSE_BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_TIMEOUT,
    CLOSE_TRY_AGAIN,
    EVENT_RESULT,
    EVENT_UTTERANCE_END,
)

if TYPE_CHECKING:
    from e2v.client.live.bus import Claim

log = logging.getLogger("e2v.live")

# A busy gateway tells clients to come back after this long (the `retry_after_s` field).
RETRY_AFTER_S = 5.0
# After the drain deadline, a session still open gets this long to score what it holds
# (open utterances become finals, the summary is sent) before it is closed.
DRAIN_FINISH_S = 5.0
# Subscribers of one call on this gateway (how long one waits for a call that is not live
# yet is LiveLimits.subscribe_wait_s; the bus replays what Last-Event-ID asks for).
SUBSCRIBERS_PER_CALL = 16
# Subscriptions in all, per session slot (each holds a bounded queue).
SUBSCRIPTIONS_PER_SESSION = 2
# A call moving away (shared bus): how long its old replica waits for the next one to take
# it over before it ends the call here with the summary; and how long the drain waits for
# the claims to say that they will move.
HANDOVER_WAIT_S = 10.0
CLAIM_WRITE_S = 2.0
CLOSE_ABNORMAL = 1006  # the label of sessions that ended by an exception (a bug) in /metrics
GOING_AWAY_REASON = "the gateway is shutting down: reconnect to another instance"
# Events whose `lag_s` is the latency metric's sample, and the metric's label.
LATENCY_KINDS = {EVENT_RESULT: "interim", EVENT_UTTERANCE_END: "final"}


@dataclass
class _Call:
    """A live call: its session's events fan out from here."""

    call_id: str
    session_id: str
    protocol: str
    outbox: Outbox
    started: float
    session: LiveSession | None = None
    claim: Claim | None = None
    events: CallEvents | None = None  # numbering (and the shift of a call moved here)
    ended: bool = False
    moving: bool = False  # handed over (or being): its events go to the socket only
    finishing: asyncio.Task | None = None


class LiveHub:
    """Session registry and limit, fan-out of events, drain. One per gateway."""

    def __init__(self, services: LiveServices, limits: LiveLimits):
        self.services, self.limits = services, limits
        self.metrics = services.metrics
        self.bus = services.bus or LocalBus()
        self.webhook = self.bus.webhook
        self.scheduler: Scheduler | None = None
        self.draining = False
        self._sockets: set[Outbox] = set()  # every admitted socket (handshakes included)
        self._calls: dict[str, _Call] = {}
        self._subscribers: dict[Outbox, str] = {}  # subscription queue -> its call id
        self._moves: set[asyncio.Task] = set()  # calls being handed over
        self._changed: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """After the application's start (the scheduler shares its Triton client)."""
        self.scheduler = Scheduler(self.services.client(), max_in_flight=self.in_flight_limit)
        self._changed = asyncio.Event()
        await self.bus.start()

    async def stop(self) -> None:
        """Close what is left (the server drained before it stopped, see shutdown.py)."""
        if self._changed is None:
            return
        await self.drain(0)
        if self.scheduler is not None:
            await self.scheduler.close()
        await self.bus.stop(DRAIN_FINISH_S)

    @property
    def in_flight_limit(self) -> int:
        """Triton requests in flight for live windows: enough to fill the dynamic batcher
        from many calls, bounded so uploads keep their share."""
        return max(8, 4 * self.services.slots)

    @property
    def sessions(self) -> int:
        """Sockets holding a slot (started sessions and handshakes)."""
        return len(self._sockets)

    @property
    def live_calls(self) -> int:
        return len(self._calls)

    @property
    def subscriptions(self) -> int:
        return len(self._subscribers)

    # ------------------------------------------------------------------ sessions

    def admit(self) -> Outbox:
        """A slot for a socket just accepted, as the socket's Outbox (`release` it, or use
        it as a context manager); LiveError when draining or full."""
        if self.draining:
            self.metrics.live_refused.labels("draining").inc()
            raise LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON)
        if len(self._sockets) >= self.limits.sessions:
            self.metrics.live_refused.labels("busy").inc()
            raise LiveError(
                CLOSE_TRY_AGAIN,
                "busy",
                f"busy: {len(self._sockets)} live sessions (the gateway's --live-sessions); "
                f"retry in {RETRY_AFTER_S:g} s",
                retry_after_s=RETRY_AFTER_S,
            )
        outbox = Outbox(self.limits.outbox_events, self.limits.outbox_bytes, self._release)
        self._sockets.add(outbox)
        return outbox

    def _release(self, outbox: Outbox) -> None:
        self._sockets.discard(outbox)
        self._changed.set()

    @contextlib.asynccontextmanager
    async def session(
        self,
        outbox: Outbox,
        call_id: str | None,
        fmt: StreamFormat,
        settings: LiveSettings,
        protocol: str = "live",
    ) -> AsyncIterator[LiveSession]:
        """A started session of the socket that holds `outbox` (from `admit`; the caller
        releases it after the close, so the drain waits for the close frame). A LiveError
        raised inside, or the outbox's stop reason, ends the session: it is published as
        the `error` event and re-raised; the caller then flushes the outbox and closes the
        socket with its code."""
        call = await self._open(call_id, fmt, settings, outbox, protocol)
        timer = self.time_limit(outbox)
        code = CLOSE_NORMAL
        try:
            yield call.session
        except LiveError as exc:
            code = exc.code
            await self._end_with(call, exc)
            raise
        except BaseException:
            code = CLOSE_ABNORMAL
            await _quietly(call.session.abort())
            raise
        finally:
            timer.cancel()
            await self._close(call)
            self.metrics.live_ended.labels(protocol, str(code)).inc()
            self.metrics.live_duration.observe(time.monotonic() - call.started)

    def time_limit(self, outbox: Outbox) -> asyncio.TimerHandle:
        """Stop `outbox`'s session once it has lasted --live-max-duration-s (cancel the
        handle when it ends)."""
        return asyncio.get_running_loop().call_later(
            self.limits.max_duration_s,
            outbox.stop,
            LiveError(
                CLOSE_TIMEOUT,
                "max_duration",
                f"the session passed the longest allowed ({self.limits.max_duration_s:g} s)",
            ),
        )

    async def _open(self, call_id, fmt, settings, outbox: Outbox, protocol: str) -> _Call:
        if self.draining:
            raise LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON)
        call_id = call_id or f"call-{secrets.token_hex(8)}"
        if call_id in self._calls:
            raise call_in_use(call_id)
        info = self.services.model()
        if info is None:
            raise LiveError(
                CLOSE_TRY_AGAIN,
                "unavailable",
                f"Triton's model is not ready yet; retry in {RETRY_AFTER_S:g} s",
                retry_after_s=RETRY_AFTER_S,
            )
        call = _Call(call_id, secrets.token_hex(8), protocol, outbox, time.monotonic())
        call.session = LiveSession(
            call_id,
            fmt,
            settings,
            self.scheduler,
            info,
            lambda event: self._publish(call, event),
        )
        try:
            call.claim = await self.bus.claim(call_id, protocol, list(fmt.parties))
        except CallInUse:
            raise call_in_use(call_id) from None
        if self.draining:  # began meanwhile: its claims are marked already, not this one
            await call.claim.release()
            raise LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON)
        call.events = CallEvents(call.claim)
        call.claim.lost.add_done_callback(lambda lost: self._lost(call, lost.result()))
        if call.events.waiting:
            call.claim.taken.add_done_callback(lambda _: self._taken(call))
        self._calls[call_id] = call
        return call

    def _lost(self, call: _Call, why: str) -> None:
        """The call is another replica's now (or never moved here): this session ends."""
        if not call.ended:
            call.outbox.stop(LiveError(CLOSE_BAD_MESSAGE, "call_in_use", why))

    def _taken(self, call: _Call) -> None:
        """The call moved here: what the session published meanwhile goes out now."""
        if call.ended:
            return
        for event in call.events.take_over():
            self._fan_out(call, event)

    async def _close(self, call: _Call) -> None:
        call.ended = True
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        if not call.moving:  # a moving call is released by its hand-over
            await call.claim.release()

    def finishing(self, session: LiveSession, move: bool = False) -> asyncio.Task:
        """`session.finish()` as one task however often it is asked for: a protocol awaits
        it (shielded) on stop, and the drain's going-away close waits for the same one.
        `move`: the call goes on on another replica (a shared bus only): the finals, but
        no summary; the call is handed over (moves.py)."""
        call = next(c for c in self._calls.values() if c.session is session)
        if call.finishing is None:
            moving = move and self.bus.shared
            call.finishing = asyncio.ensure_future(
                self._finish_moving(call) if moving else session.finish()
            )
            # Its failure is raised to whoever awaits it; none may (an abort came first).
            call.finishing.add_done_callback(lambda t: t.cancelled() or t.exception())
        return call.finishing

    def session_id(self, session: LiveSession) -> str:
        """The id `started` names (one per session; the call id may come again later)."""
        return next(c.session_id for c in self._calls.values() if c.session is session)

    async def _finish_moving(self, call: _Call) -> dict:
        """Finals of what was heard here; the call is then handed over in the background
        (the client reconnects elsewhere once this socket closes)."""
        summary = await call.session.finish(publish_summary=False)
        call.moving = True
        task = asyncio.create_task(hand_over(call.claim, call.events, summary, HANDOVER_WAIT_S))
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)
        return summary

    async def _end_with(self, call: _Call, exc: LiveError) -> None:
        """Going away (drain deadline): score what was heard first (with a shared bus the
        call moves: no summary). Then stop the work and publish the `error` event (to the
        socket only, for a call that moves)."""
        if exc.code == CLOSE_GOING_AWAY:
            try:
                finishing = self.finishing(call.session, move=True)
                await asyncio.wait_for(asyncio.shield(finishing), DRAIN_FINISH_S)
            except Exception as finish_error:  # noqa: BLE001 - closing anyway; log why
                log.warning("call %s: not finished before close: %r", call.call_id, finish_error)
        await _quietly(call.session.abort())
        self._publish(call, error_event(exc, call.call_id), last=True)

    # ------------------------------------------------------------------ events

    def _publish(self, call: _Call, event: dict, last: bool = False) -> None:
        """Number `event` and fan it out; never blocks, never raises into the session."""
        if call.ended:
            return
        event.setdefault("call_id", call.call_id)
        if call.moving:  # the call goes on elsewhere: only this socket hears (its close)
            event["seq"] = call.events.seq + 1
            self._fan_out(call, event, last, bus=False)
            return
        numbered = call.events.number(event)
        if numbered is not None:  # else held until the call is handed over to us
            self._fan_out(call, numbered, last)

    def _fan_out(self, call: _Call, event: dict, last: bool = False, bus: bool = True) -> None:
        try:
            text = event_json(event)
        except (TypeError, ValueError) as exc:  # a bug upstream: one event lost, said loudly
            log.error("call %s: event not JSON (%r): %r", call.call_id, exc, event)
            return
        kind = event.get("type", "?")
        self.metrics.live_events.labels(kind).inc()
        if kind in LATENCY_KINDS:
            self._observe_latency(call, kind, event)
        call.outbox.put(event, text, last=last)
        if bus:
            call.claim.publish(event, text)

    def _observe_latency(self, call: _Call, kind: str, event: dict) -> None:
        """Interims carry `lag_s`; for finals it is the audio received past their end."""
        lag = event.get("lag_s")
        if lag is None and isinstance(event.get("end_s"), (int, float)):
            lag = call.session.audio_s + call.events.offset_s - event["end_s"]
        if isinstance(lag, (int, float)) and lag >= 0:
            self.metrics.live_latency.labels(LATENCY_KINDS[kind]).observe(lag)

    @contextlib.asynccontextmanager
    async def subscription(self, call_id: str, after_seq: int = 0) -> AsyncIterator[Outbox]:
        """A queue of every event of `call_id` (on any replica, with a shared bus) after
        `after_seq`, closed after the call's summary or error. A call not live yet is
        waited for up to `limits.subscribe_wait_s`. The queue is bounded like an outbox: a
        subscriber that falls behind is stopped (`guard` raises CLOSE_SLOW_READER); those
        past the limits are refused (LiveError)."""
        if self.draining:
            raise LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON)
        if len(self._subscribers) >= SUBSCRIPTIONS_PER_SESSION * self.limits.sessions:
            self.metrics.live_refused.labels("busy").inc()
            raise LiveError(
                CLOSE_TRY_AGAIN,
                "busy",
                f"busy: {len(self._subscribers)} subscriptions; retry in {RETRY_AFTER_S:g} s",
                retry_after_s=RETRY_AFTER_S,
            )
        if sum(1 for c in self._subscribers.values() if c == call_id) >= SUBSCRIBERS_PER_CALL:
            raise LiveError(
                CLOSE_TRY_AGAIN,
                "busy",
                f"call {call_id} has {SUBSCRIBERS_PER_CALL} subscribers here already",
                retry_after_s=RETRY_AFTER_S,
            )
        queue = Outbox(self.limits.outbox_events, self.limits.outbox_bytes)
        self._subscribers[queue] = call_id
        try:
            async with self.bus.subscription(
                call_id, queue, after_seq, wait_s=self.limits.subscribe_wait_s
            ):
                yield queue
        finally:
            del self._subscribers[queue]

    async def calls(self, alerting: bool = False) -> list[dict]:
        """The live calls (`GET /v1/calls`): the fleet's with a shared bus, else this
        gateway's; alerting calls first, then the newest."""
        return listing(await self.bus.calls(), alerting)

    # ------------------------------------------------------------------ drain

    async def drain(self, deadline_s: float) -> None:
        """Refuse new sessions and subscriptions; let live sessions end by themselves for
        up to `deadline_s`, then stop each socket with CLOSE_GOING_AWAY (a started session
        is scored first, DRAIN_FINISH_S at most) and wait for them to close."""
        first = not self.draining
        self.draining = True
        if first and self.bus.shared:  # before AudioHook's `reconnect`: the claims say so
            await self._claims_draining(deadline_s)
        for outbox in self._sockets:
            outbox.drain()
        self._stop_subscribers(lambda call_id: call_id not in self._calls or self.bus.shared)
        if self._sockets:
            log.warning("draining %d live sessions (up to %g s)", len(self._sockets), deadline_s)
        await self._until_empty(deadline_s)
        for outbox in list(self._sockets):
            outbox.stop(LiveError(CLOSE_GOING_AWAY, "going_away", GOING_AWAY_REASON))
        await self._until_empty(DRAIN_FINISH_S + CLOSE_WAIT_S)
        if self._sockets:
            log.warning("%d live sockets still open after the drain", len(self._sockets))
        if self._moves:
            await asyncio.wait(set(self._moves), timeout=HANDOVER_WAIT_S + CLOSE_WAIT_S)
        self._stop_subscribers(lambda call_id: True)

    async def _claims_draining(self, deadline_s: float) -> None:
        """Mark every call's claim as moving soon, so that another replica takes the call
        over instead of refusing it (written before the sockets hear of the drain)."""
        until = time.time() + deadline_s + DRAIN_FINISH_S + HANDOVER_WAIT_S
        claims = [c.claim.draining(until) for c in self._calls.values()]
        if claims:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(c) for c in claims], timeout=CLAIM_WRITE_S
            )
            for task in pending:
                task.cancel()

    def _stop_subscribers(self, which) -> None:
        """Subscriptions still open (not yet closed by their call's end) whose call id
        `which` picks get 1001: a subscriber reconnects elsewhere, with Last-Event-ID."""
        for queue, call_id in self._subscribers.items():
            if not queue.closed and which(call_id):
                queue.stop(LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON))

    async def _until_empty(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._sockets and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


async def _quietly(awaitable: Awaitable) -> None:
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001 - cleanup of an ending session: log, go on
        log.warning("live session cleanup failed: %r", exc)
