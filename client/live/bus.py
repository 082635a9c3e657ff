"""The event bus of live calls: one interface, an in-process engine (the default) and NATS
JetStream (`--bus nats://...`, nats_bus.py) for a fleet of gateway replicas.

A session claims its call id (`Bus.claim`) when it starts and publishes every event through
its `Claim`; subscribers follow a call (`Bus.subscription`) wherever it runs; `Bus.calls`
lists the live calls. The claim is the call's handle on the bus:
- `publish(event, text)` never blocks: events wait in the bus's bounded `EventBuffer`;
- the claim's `record` (the row of `GET /v1/calls`) follows the events: each party's latest
  final and the alerts fired;
- `await draining(until)` says that the call will move (its replica drains): a claim of the same
  id elsewhere is then a successor, not a duplicate;
- `hand_over(carry)` offers the call to that successor: it takes the call over (`taken`
  resolves) with `previous` (the last seq and the carried state, client/live/moves.py);
- `release()` ends it; `lost` resolves if the call goes to another replica meanwhile.

Subscribers get events through an `EventSink` (the hub's `Outbox`): `put` never blocks, a
sink that falls behind stops itself. A subscription ends after the call's `summary` or
`error`; a call that does not start within `wait_s` ends it with `no_such_call`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from e2v.client.live.errors import LiveError
from e2v.client.live.outbox import error_event

from e2v.contract import (
    CLOSE_BAD_MESSAGE,
    CLOSE_INTERNAL,
    CLOSE_TIMEOUT,
    EVENT_ALERT,
    EVENT_ERROR,
    EVENT_RESULT,
    EVENT_SUMMARY,
    EVENT_UTTERANCE_END,
    EVENT_UTTERANCE_START,
)

if TYPE_CHECKING:
    from e2v.client.live.bus_metrics import BusMetrics
    from e2v.client.webhooks import WebhookSender

log = logging.getLogger("e2v.bus")

# Events that end a call's stream: a subscription ends after one of them.
TERMINAL_EVENTS = frozenset({EVENT_SUMMARY, EVENT_ERROR})
# Events a webhook receives (alerts as they fire, the summary at the end).
WEBHOOK_EVENTS = (EVENT_ALERT, EVENT_SUMMARY)
# The local buffer: what waits for the bus (an outage) is bounded in events and bytes.
BUFFER_EVENTS = 20_000
BUFFER_BYTES = 32 << 20
# How long a subscriber waits for a call that has not started (a Twilio subscriber may
# connect before the stream does), and how many recent events the in-process bus replays.
SUBSCRIBE_WAIT_S = 30.0
REPLAY_EVENTS = 64
# Alerts a call's record keeps (the newest), and how often a changed record is written.
RECORD_ALERTS = 20
RECORD_WRITE_S = 1.0
# error_kind of the events the bus itself adds.
REPLICA_LOST = "replica_lost"
ABORTED = "aborted"
NO_SUCH_CALL = "no_such_call"


class CallInUse(Exception):
    """The call id is live on this or another replica."""


class EventSink(Protocol):
    """Where a subscription delivers (the hub's Outbox): `put` never blocks and returns
    False once the sink is full or closed; `close` ends it after what it holds; `stop`
    ends it with a reason (a LiveError, sent as the `error` event)."""

    def put(self, event: dict, text: str | None = None, *, last: bool = False) -> bool: ...

    def close(self) -> None: ...

    def stop(self, reason: Exception) -> None: ...


def replica_name() -> str:
    """This process's name on the bus: the host (the pod's name in Kubernetes) and a
    random suffix, so a restarted pod is a new replica."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


def event_priority(kind: str) -> int:
    """Which buffered events an overflow drops first: interims (0), then utterance starts
    (1); finals, alerts, summaries and errors (2) only when nothing else is left."""
    if kind == EVENT_RESULT:
        return 0
    return 1 if kind == EVENT_UTTERANCE_START else 2


def event_id(token: str, seq: int) -> str:
    """The id of a call's event: its claim token (one per call, kept across moves) and its
    seq. JetStream drops a republished duplicate by it; webhooks send it for dedupe."""
    return f"{token}-{seq}"


def bus_error(call_id: str, seq: int, code: int, kind: str, message: str) -> dict:
    """An `error` event the bus adds to a call (a lost replica, an aborted session)."""
    return error_event(LiveError(code, kind, message), call_id, seq)


def to_json(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------- buffer


@dataclass
class BusItem:
    """One event waiting for the bus."""

    call_id: str
    kind: str
    seq: int
    event_id: str
    data: bytes
    queued: float = field(default_factory=time.monotonic)


class EventBuffer:
    """Events waiting to be published, in order, bounded in events and bytes. `put` never
    blocks: past a bound it drops the oldest event of the lowest priority held (interims
    first, finals last; see `event_priority`), the incoming one included, and counts it.

    Each priority keeps its own queue of keys in the same order as the whole, so the
    oldest event overall is the oldest of its priority: `take` pops both ends alike."""

    def __init__(self, max_events: int = BUFFER_EVENTS, max_bytes: int = BUFFER_BYTES):
        if max_events < 1 or max_bytes < 1:
            raise ValueError("the bus buffer needs room for at least one event")
        self.max_events, self.max_bytes = max_events, max_bytes
        self.bytes = 0
        self.dropped: dict[str, int] = {}
        self._items: OrderedDict[int, BusItem] = OrderedDict()
        self._by_priority: tuple[deque[int], ...] = (deque(), deque(), deque())
        self._per_call: dict[str, int] = {}
        self._back = 0  # the next key at the back; keys given back go below the front
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def pending(self, call_id: str) -> int:
        """Events of `call_id` still buffered."""
        return self._per_call.get(call_id, 0)

    def put(self, item: BusItem) -> None:
        self._insert(self._back, item, back=True)
        self._back += 1
        self._bound()

    def take(self, n: int) -> list[BusItem]:
        """Up to `n` of the oldest events, removed (`give_back` the unpublished ones)."""
        taken = []
        while self._items and len(taken) < n:
            key, item = self._items.popitem(last=False)
            self._by_priority[event_priority(item.kind)].popleft()
            self._forget(item)
            taken.append(item)
        if not self._items:
            self.ready.clear()
        return taken

    def give_back(self, items: list[BusItem]) -> None:
        """Put unpublished `items` back in front, in their order (a failed publish)."""
        front = next(iter(self._items), self._back)
        for item in reversed(items):
            front -= 1
            self._insert(front, item, back=False)
        self._bound()

    def _insert(self, key: int, item: BusItem, back: bool) -> None:
        self._items[key] = item
        queue = self._by_priority[event_priority(item.kind)]
        if back:
            queue.append(key)
        else:
            self._items.move_to_end(key, last=False)
            queue.appendleft(key)
        self.bytes += len(item.data)
        self._per_call[item.call_id] = self._per_call.get(item.call_id, 0) + 1
        self.ready.set()

    def _forget(self, item: BusItem) -> None:
        self.bytes -= len(item.data)
        left = self._per_call[item.call_id] - 1
        if left:
            self._per_call[item.call_id] = left
        else:
            del self._per_call[item.call_id]

    def _bound(self) -> None:
        while len(self._items) > self.max_events or self.bytes > self.max_bytes:
            queue = next(q for q in self._by_priority if q)
            item = self._items.pop(queue.popleft())
            self._forget(item)
            self.dropped[item.kind] = self.dropped.get(item.kind, 0) + 1
            if sum(self.dropped.values()) % 1000 == 1:
                log.warning("bus buffer full: dropped a %s (so far %s)", item.kind, self.dropped)
        if not self._items:
            self.ready.clear()


# --------------------------------------------------------------------------- claims


def new_record(call_id: str, protocol: str, parties: list[str], replica: str) -> dict:
    """A call's row in the registry (`GET /v1/calls`), as the owner writes it."""
    return {
        "call_id": call_id,
        "protocol": protocol,
        "parties": list(parties),
        "started": time.time(),
        "replica": replica,
        "state": "live",
        "seq": 0,
        "latest": {},
        "alerts": [],
    }


def note_event(record: dict, event: dict) -> bool:
    """Update `record` from one published event; True when a listing would change."""
    kind = event.get("type")
    record["seq"] = max(record.get("seq", 0), event.get("seq", 0))
    party = event.get("party")
    if kind == EVENT_UTTERANCE_END and party is not None:
        record["latest"][party] = {
            "emotion": event.get("emotion"),
            "confidence": event.get("confidence"),
            "end_s": event.get("end_s"),
        }
        return True
    if kind == EVENT_ALERT:
        alert = {k: event.get(k) for k in ("party", "label", "score", "threshold", "end_s")}
        record["alerts"] = (record["alerts"] + [alert])[-RECORD_ALERTS:]
        return True
    return False


def listing(records: list[dict], alerting: bool = False) -> list[dict]:
    """Rows of `GET /v1/calls`: alerting calls first, then the newest first."""
    rows = [public_record(r) for r in records if r.get("alerts") or not alerting]
    rows.sort(key=lambda r: (not r["alerts"], -r["started"]))
    return rows


def public_record(record: dict) -> dict:
    """The fields of a record a client sees (the handoff state stays internal)."""
    return {k: v for k, v in record.items() if k not in ("token", "carry")}


class Claim(abc.ABC):
    """One call held by this replica: publish its events, keep its record, end it.

    `taken` resolves once the call is this replica's: at once for a new call; for a
    successor (the call is moving here from a draining replica) when the previous owner
    has handed it over, with `previous` its last record (seq and carry). `lost` resolves
    (with a reason) if the call is not, or no longer, this replica's."""

    def __init__(self, bus: Bus, record: dict, previous: dict | None = None):
        self.bus, self.record, self.previous = bus, record, previous
        self.call_id: str = record["call_id"]
        self.token: str = record["token"]
        self.ended = False
        self.terminal_published = False
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.taken: asyncio.Future[None] = loop.create_future()

    @property
    def last_seq(self) -> int:
        """The seq of the last event published for this call (by any replica)."""
        return self.record["seq"]

    def publish(self, event: dict, text: str) -> None:
        """Queue `event` (numbered, its JSON `text`) for every subscriber; never blocks."""
        if self.ended:
            return
        if note_event(self.record, event):
            self._changed()
        self.terminal_published |= event.get("type") in TERMINAL_EVENTS
        self.bus._publish(self, event, text)

    async def draining(self, until: float) -> None:  # noqa: B027 - only a shared bus moves
        """This replica drains: the call may move before `until` (Unix time), so a claim
        of its id on another replica waits for it instead of being refused (written when
        this returns)."""

    async def hand_over(self, carry: dict, wait_s: float) -> bool:
        """Offer the call to the next claim of its id for up to `wait_s` (after this
        replica's events of it are on the bus); True once another replica took it."""
        return False

    async def release(self) -> None:
        """End the call: an `error` (aborted) first if neither summary nor error went out,
        so that subscribers never wait for an end that cannot come."""
        if self.ended:
            return
        if not self.taken.done():  # a successor that never took the call over: not its to end
            self.ended = True
            await self._end()
            return
        if not self.terminal_published:
            seq = self.record["seq"] + 1
            message = f"call {self.call_id} ended without a summary"
            event = bus_error(self.call_id, seq, CLOSE_INTERNAL, ABORTED, message)
            self.publish(event, to_json(event))
        self.ended = True
        await self._end()

    def _changed(self) -> None:  # noqa: B027 - only a shared registry writes records
        """The record changed (a final, an alert): written soon."""

    @abc.abstractmethod
    async def _end(self) -> None: ...


class Bus(abc.ABC):
    """What the live tier needs of the fleet: events, call registry, webhooks."""

    def __init__(
        self,
        replica: str | None = None,
        webhook: WebhookSender | None = None,
        metrics: BusMetrics | None = None,
        buffer: EventBuffer | None = None,
    ):
        from e2v.client.live.bus_metrics import BusMetrics

        self.replica = replica or replica_name()
        self.webhook = webhook
        self.metrics = metrics or BusMetrics()
        self.buffer = buffer or EventBuffer()
        self.metrics.bind_bus(self)

    # Whether other replicas share this bus (a call can move, a listing is the fleet's).
    shared = False

    @property
    def engine(self) -> str:
        return type(self).__name__

    async def start(self) -> None:
        if self.webhook is not None:
            await self.webhook.start()

    async def stop(self, drain_s: float = 5.0) -> None:
        if self.webhook is not None:
            await self.webhook.stop(drain_s)

    @abc.abstractmethod
    async def claim(self, call_id: str, protocol: str, parties: list[str]) -> Claim:
        """Claim `call_id` for a session starting here; CallInUse if it is live (here or
        elsewhere) and not moving. A call that is moving here gives a successor claim,
        whose `taken` resolves at the hand-over."""

    @abc.abstractmethod
    async def calls(self) -> list[dict]:
        """The records of the live calls (every replica's, on a shared bus)."""

    @abc.abstractmethod
    def subscription(
        self, call_id: str, sink: EventSink, after_seq: int = 0, wait_s: float = SUBSCRIBE_WAIT_S
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Deliver `call_id`'s events after `after_seq` to `sink`, in seq order, until the
        call's summary or error (then the sink is closed) or the context exits."""

    @abc.abstractmethod
    def _publish(self, claim: Claim, event: dict, text: str) -> None: ...


def no_such_call(call_id: str, wait_s: float) -> LiveError:
    return LiveError(CLOSE_TIMEOUT, NO_SUCH_CALL, f"no live call {call_id} within {wait_s:g} s")


def call_in_use(call_id: str) -> LiveError:
    return LiveError(CLOSE_BAD_MESSAGE, "call_in_use", f"call_id {call_id} is already live")


# --------------------------------------------------------------------------- in process


@dataclass
class _LocalCall:
    claim: LocalClaim
    recent: deque = field(default_factory=lambda: deque(maxlen=REPLAY_EVENTS))
    sinks: set = field(default_factory=set)


class LocalClaim(Claim):
    async def _end(self) -> None:
        self.bus._end(self)


class LocalBus(Bus):
    """One gateway's bus, in process (no `--bus`): its own calls, subscribers on this
    gateway, the last REPLAY_EVENTS events of each live call for Last-Event-ID, and
    webhooks from a bounded in-memory queue (lost if the process dies)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._calls: dict[str, _LocalCall] = {}
        # Subscribers of calls not live yet, each with its no_such_call timer.
        self._waiting: dict[str, dict[EventSink, asyncio.TimerHandle]] = {}

    async def claim(self, call_id, protocol, parties) -> Claim:
        if call_id in self._calls:
            raise CallInUse(call_id)
        record = new_record(call_id, protocol, parties, self.replica)
        record["token"] = secrets.token_hex(8)
        claim = LocalClaim(self, record)
        claim.taken.set_result(None)
        call = self._calls[call_id] = _LocalCall(claim)
        for sink, timer in self._waiting.pop(call_id, {}).items():
            timer.cancel()
            call.sinks.add(sink)
        return claim

    async def calls(self) -> list[dict]:
        return [call.claim.record for call in self._calls.values()]

    def _publish(self, claim: Claim, event: dict, text: str) -> None:
        call = self._calls.get(claim.call_id)
        if call is None or call.claim is not claim:
            return
        started = time.monotonic()
        call.recent.append((event, text))
        terminal = event.get("type") in TERMINAL_EVENTS
        for sink in list(call.sinks):
            if not sink.put(event, text, last=terminal):
                call.sinks.discard(sink)
            elif terminal:
                sink.close()
        self.metrics.published(event.get("type", "?"), time.monotonic() - started)
        if self.webhook is not None and event.get("type") in WEBHOOK_EVENTS:
            self.webhook.post(event, text.encode())  # the same JSON, not made again

    def _end(self, claim: Claim) -> None:
        call = self._calls.get(claim.call_id)
        if call is not None and call.claim is claim:
            del self._calls[claim.call_id]
            for sink in call.sinks:
                sink.close()

    @contextlib.asynccontextmanager
    async def subscription(
        self, call_id: str, sink: EventSink, after_seq: int = 0, wait_s: float = SUBSCRIBE_WAIT_S
    ) -> AsyncIterator[None]:
        call = self._calls.get(call_id)
        if call is not None:
            for event, text in call.recent:
                if event["seq"] > after_seq:
                    sink.put(event, text)
            call.sinks.add(sink)
        else:
            timer = asyncio.get_running_loop().call_later(
                wait_s, sink.stop, no_such_call(call_id, wait_s)
            )
            self._waiting.setdefault(call_id, {})[sink] = timer
        try:
            yield
        finally:
            waiting = self._waiting.get(call_id)
            if waiting is not None and sink in waiting:
                waiting.pop(sink).cancel()
                if not waiting:
                    del self._waiting[call_id]
            live = self._calls.get(call_id)
            if live is not None:
                live.sinks.discard(sink)
