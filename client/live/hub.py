"""The gateway's live sessions: the slot limit, each socket's bounded outbox, subscriptions
by call id, webhooks, metrics and the drain on shutdown.

Every event a session publishes goes, without ever blocking, to
- its socket's `Outbox` (bounded in events and bytes: a client that stops reading
  overflows it, and its session ends with CLOSE_SLOW_READER; no other session waits);
- the subscribers of its call id (each with its own bounded queue, dropped the same way);
- the webhook sender, for alerts and the summary (its queue is bounded too).

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
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass

from e2v.client.live.errors import LiveError
from e2v.client.live.limits import CLOSE_WAIT_S, LiveLimits
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
    EVENT_ALERT,
    EVENT_RESULT,
    EVENT_SUMMARY,
    EVENT_UTTERANCE_END,
)

log = logging.getLogger("e2v.live")

# A busy gateway tells clients to come back after this long (the `retry_after_s` field).
RETRY_AFTER_S = 5.0
# After the drain deadline, a session still open gets this long to score what it holds
# (open utterances become finals, the summary is sent) before it is closed.
DRAIN_FINISH_S = 5.0
# Subscribers per call, and how long one may wait for a call that is not live yet (a
# Twilio subscriber may connect before the stream starts).
SUBSCRIBERS_PER_CALL = 16
SUBSCRIBE_WAIT_S = 30.0
# Events of a live call kept for subscribers that join late or reconnect (Last-Event-ID).
REPLAY_EVENTS = 64
# Subscriptions in all, per session slot (each holds a bounded queue).
SUBSCRIPTIONS_PER_SESSION = 2
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
    seq: int = 0
    ended: bool = False
    finishing: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.subscribers: set[Outbox] = set()
        self.recent: deque[tuple[dict, str]] = deque(maxlen=REPLAY_EVENTS)


class LiveHub:
    """Session registry and limit, fan-out of events, drain. One per gateway."""

    def __init__(self, services: LiveServices, limits: LiveLimits):
        self.services, self.limits = services, limits
        self.metrics, self.webhook = services.metrics, services.webhook
        self.scheduler: Scheduler | None = None
        self.draining = False
        self._sockets: set[Outbox] = set()  # every admitted socket (handshakes included)
        self._calls: dict[str, _Call] = {}
        self._pending: dict[str, set[Outbox]] = {}  # subscribers waiting for their call
        self._subscriptions = 0
        self._changed: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """After the application's start (the scheduler shares its Triton client)."""
        self.scheduler = Scheduler(self.services.client(), max_in_flight=self.in_flight_limit)
        self._changed = asyncio.Event()
        if self.webhook is not None:
            await self.webhook.start()

    async def stop(self) -> None:
        """Close what is left (the server drained before it stopped, see shutdown.py)."""
        if self._changed is None:
            return
        await self.drain(0)
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.webhook is not None:
            await self.webhook.stop(DRAIN_FINISH_S)

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
        return self._subscriptions

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
        call = self._open(call_id, fmt, settings, outbox, protocol)
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
            self._close(call)
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

    def _open(self, call_id, fmt, settings, outbox: Outbox, protocol: str) -> _Call:
        if self.draining:
            raise LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON)
        call_id = call_id or f"call-{secrets.token_hex(8)}"
        if call_id in self._calls:
            raise LiveError(CLOSE_BAD_MESSAGE, "call_in_use", f"call_id {call_id} is already live")
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
        self._calls[call_id] = call
        for queue in self._pending.pop(call_id, set()):
            self._attach(call, queue, 0)
        return call

    def _close(self, call: _Call) -> None:
        call.ended = True
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        for subscriber in call.subscribers:
            subscriber.close()

    def finishing(self, session: LiveSession) -> asyncio.Task:
        """`session.finish()` as one task however often it is asked for: a protocol awaits
        it (shielded) on stop, and the drain's going-away close waits for the same one."""
        call = next(c for c in self._calls.values() if c.session is session)
        if call.finishing is None:
            call.finishing = asyncio.ensure_future(session.finish())
            # Its failure is raised to whoever awaits it; none may (an abort came first).
            call.finishing.add_done_callback(lambda t: t.cancelled() or t.exception())
        return call.finishing

    def session_id(self, session: LiveSession) -> str:
        """The id `started` names (one per session; the call id may come again later)."""
        return next(c.session_id for c in self._calls.values() if c.session is session)

    async def _end_with(self, call: _Call, exc: LiveError) -> None:
        """Going away (drain deadline): score what was heard first. Then stop the work
        and publish the `error` event."""
        if exc.code == CLOSE_GOING_AWAY:
            try:
                await asyncio.wait_for(asyncio.shield(self.finishing(call.session)), DRAIN_FINISH_S)
            except Exception as finish_error:  # noqa: BLE001 - closing anyway; log why
                log.warning("call %s: not finished before close: %r", call.call_id, finish_error)
        await _quietly(call.session.abort())
        self._publish(call, error_event(exc, call.call_id), last=True)

    # ------------------------------------------------------------------ events

    def _publish(self, call: _Call, event: dict, last: bool = False) -> None:
        """Number `event` and fan it out; never blocks, never raises into the session."""
        if call.ended:
            return
        call.seq += 1
        event["seq"] = call.seq
        event.setdefault("call_id", call.call_id)
        try:
            text = event_json(event)
        except (TypeError, ValueError) as exc:  # a bug upstream: one event lost, said loudly
            log.error("call %s: event not JSON (%r): %r", call.call_id, exc, event)
            return
        kind = event.get("type", "?")
        self.metrics.live_events.labels(kind).inc()
        if kind in LATENCY_KINDS:
            self._observe_latency(call, kind, event)
        call.recent.append((event, text))
        call.outbox.put(event, text, last=last)
        for subscriber in list(call.subscribers):
            if not subscriber.put(event, text, last=last):
                call.subscribers.discard(subscriber)
        if self.webhook is not None and kind in (EVENT_ALERT, EVENT_SUMMARY):
            self.webhook.post(event)

    def _observe_latency(self, call: _Call, kind: str, event: dict) -> None:
        """Interims carry `lag_s`; for finals it is the audio received past their end."""
        lag = event.get("lag_s")
        if lag is None and isinstance(event.get("end_s"), (int, float)):
            lag = call.session.audio_s - event["end_s"]
        if isinstance(lag, (int, float)) and lag >= 0:
            self.metrics.live_latency.labels(LATENCY_KINDS[kind]).observe(lag)

    @contextlib.contextmanager
    def subscription(self, call_id: str, after_seq: int = 0) -> Iterator[Outbox]:
        """A queue of every event of `call_id` from now on (with those after `after_seq`
        still kept), closed when the session ends. A call not live yet is waited for up
        to SUBSCRIBE_WAIT_S. The queue is bounded like an outbox: a subscriber that falls
        behind is stopped (`guard` raises CLOSE_SLOW_READER), as are those past the limits."""
        if self.draining:
            raise LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON)
        if self._subscriptions >= SUBSCRIPTIONS_PER_SESSION * self.limits.sessions:
            self.metrics.live_refused.labels("busy").inc()
            raise LiveError(
                CLOSE_TRY_AGAIN,
                "busy",
                f"busy: {self._subscriptions} subscriptions; retry in {RETRY_AFTER_S:g} s",
                retry_after_s=RETRY_AFTER_S,
            )
        queue = Outbox(self.limits.outbox_events, self.limits.outbox_bytes)
        call = self._calls.get(call_id)
        timer = None
        if call is not None:
            self._attach(call, queue, after_seq)
        else:
            self._pending.setdefault(call_id, set()).add(queue)
            timer = asyncio.get_running_loop().call_later(
                SUBSCRIBE_WAIT_S,
                queue.stop,
                LiveError(
                    CLOSE_TIMEOUT,
                    "no_such_call",
                    f"no live call {call_id} within {SUBSCRIBE_WAIT_S:g} s",
                ),
            )
        self._subscriptions += 1
        try:
            yield queue
        finally:
            self._subscriptions -= 1
            if timer is not None:
                timer.cancel()
            pending = self._pending.get(call_id)
            if pending is not None:
                pending.discard(queue)
                if not pending:
                    del self._pending[call_id]
            for live in self._calls.values():
                live.subscribers.discard(queue)

    def _attach(self, call: _Call, queue: Outbox, after_seq: int) -> None:
        if len(call.subscribers) >= SUBSCRIBERS_PER_CALL:
            queue.stop(
                LiveError(
                    CLOSE_TRY_AGAIN,
                    "busy",
                    f"call {call.call_id} has {SUBSCRIBERS_PER_CALL} subscribers already",
                    retry_after_s=RETRY_AFTER_S,
                )
            )
            return
        for event, text in call.recent:
            if event["seq"] > after_seq:
                queue.put(event, text)
        call.subscribers.add(queue)

    # ------------------------------------------------------------------ drain

    async def drain(self, deadline_s: float) -> None:
        """Refuse new sessions and subscriptions; let live sessions end by themselves for
        up to `deadline_s`, then stop each socket with CLOSE_GOING_AWAY (a started session
        is scored first, DRAIN_FINISH_S at most) and wait for them to close."""
        self.draining = True
        for outbox in self._sockets:
            outbox.drain()
        for pending in self._pending.values():
            for queue in pending:
                queue.stop(LiveError(CLOSE_GOING_AWAY, "draining", GOING_AWAY_REASON))
        if self._sockets:
            log.warning("draining %d live sessions (up to %g s)", len(self._sockets), deadline_s)
        await self._until_empty(deadline_s)
        for outbox in list(self._sockets):
            outbox.stop(LiveError(CLOSE_GOING_AWAY, "going_away", GOING_AWAY_REASON))
        await self._until_empty(DRAIN_FINISH_S + CLOSE_WAIT_S)
        if self._sockets:
            log.warning("%d live sockets still open after the drain", len(self._sockets))

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
