"""The bus on NATS JetStream (`e2v gateway --bus nats://HOST:PORT[,...]`): every replica of
a gateway fleet shares live calls' events, the call registry and webhooks.

- **Events**: one stream (`--bus-stream`) over `e2v.calls.<call>.events.<type>`
  (contract.call_events_subject). Each event is its socket JSON, with its id
  (`<claim token>-<seq>`) as `Nats-Msg-Id`, so a republished event is stored once. A publisher
  task drains the local `EventBuffer` in batches; an outage keeps events there (bounded,
  interims dropped first) and the batch that failed is sent again once the bus is back.
- **Subscriptions**: an ephemeral pull consumer per subscriber, filtered on the call's
  subjects, from the start of the stream (events up to Last-Event-ID are skipped); after a
  lost connection it is made again from the next stream sequence. Events go out in `seq`
  order: a gap waits up to REORDER_HOLD_S for the event that fills it (a batch resent after
  an outage may store a later event first).
- **Registry**: a KV bucket (`--bus-calls-bucket`) whose entries expire `--bus-claim-ttl-s`
  after their last write. A claim is `create` (refused while the key exists: CallInUse); the
  owner rewrites it every third of the TTL, and sooner after a final or an alert (the row of
  `GET /v1/calls`). A replica that dies stops writing, so its claims expire within the TTL;
  a subscriber that finds its call's claim gone without a summary ends with `replica_lost`
  (also published, once, under a deterministic id, for webhooks and other consumers).
- **Moves**: `hand_over` marks the record `moving` with the last seq and the carried state;
  the next claim of the id takes it over by revision (no two owners), continuing the seq.
- **Webhooks**: a durable pull consumer (`--bus-webhook-consumer`) on every call's alerts and
  summaries, shared by the replicas that have `--webhook`: each fetches, delivers with the
  WebhookSender's signing and retries (the event id as X-E2V-Webhook-Id) and acks. A replica
  that dies mid-delivery stops reporting progress; after `--bus-webhook-ack-wait-s` another
  replica gets the event (at least once: receivers drop duplicates by the id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from e2v.client.live.bus import (
    RECORD_WRITE_S,
    REPLICA_LOST,
    SUBSCRIBE_WAIT_S,
    TERMINAL_EVENTS,
    Bus,
    BusItem,
    CallInUse,
    Claim,
    EventSink,
    bus_error,
    event_id,
    new_record,
    no_such_call,
    to_json,
)
from e2v.client.live.errors import LiveError

from e2v.contract import (
    BUS_CALLS_BUCKET,
    BUS_CLAIM_TTL_S,
    BUS_EVENT_ID_HEADER,
    BUS_EVENTS_PER_CALL,
    BUS_EVENTS_STREAM,
    BUS_MAX_AGE_S,
    BUS_MAX_BYTES,
    BUS_WEBHOOK_CONSUMER,
    CLOSE_INTERNAL,
    EVENT_ALERT,
    EVENT_SUMMARY,
    all_calls_subject,
    bus_token,
    call_events_subject,
)

log = logging.getLogger("e2v.bus")

PUBLISH_BATCH = 32  # events in flight to the bus at once (order is kept within a call)
PUBLISH_TIMEOUT_S = 2.0
RETRY_S = (0.05, 2.0)  # a failed publish waits this long, doubling up to the second
DUPLICATE_WINDOW_S = 120.0  # JetStream drops a republished event id within this window
POLL_S = 1.0  # a quiet subscriber checks its call's claim this often
REORDER_HOLD_S = 5.0
SUBSCRIBER_BATCH = 64
SUBSCRIBER_INACTIVE_S = 60.0  # the server removes a dead subscriber's consumer after this
WEBHOOK_ACK_WAIT_S = 30.0
WEBHOOK_MAX_DELIVER = 10
LAG_EVERY_S = 5.0
LIST_LIMIT = 10_000  # calls `GET /v1/calls` reads at most
CONNECT_TIMEOUT_S = 5.0
PING_S = 5.0  # a silent server is noticed after 3 pings
MAX_RECORD_BYTES = 64 << 10
HANDOVER_POLL_S = 0.2
RELEASE_WAIT_S = 2.0  # an ended call's claim is deleted before its socket closes, up to this
# A successor waits for the hand-over until the draining owner's `moving_by` (plus this),
# and never longer than MAX_SUCCESSOR_WAIT_S.
SUCCESSOR_GRACE_S = 5.0
MAX_SUCCESSOR_WAIT_S = 600.0
LIVE, DRAINING, MOVING = "live", "draining", "moving"  # a record's state


@dataclass
class NatsOptions:
    """What `--bus*` flags set (client/live/bus_options.py)."""

    servers: list[str]
    creds_file: Path | None = None
    ca_file: Path | None = None
    stream: str = BUS_EVENTS_STREAM
    bucket: str = BUS_CALLS_BUCKET
    webhook_consumer: str = BUS_WEBHOOK_CONSUMER
    max_age_s: float = BUS_MAX_AGE_S
    max_bytes: int = BUS_MAX_BYTES
    events_per_call: int = BUS_EVENTS_PER_CALL
    claim_ttl_s: float = BUS_CLAIM_TTL_S
    webhook_ack_wait_s: float = WEBHOOK_ACK_WAIT_S
    replicas: int = 1  # JetStream replicas of the stream and bucket (3 on a NATS cluster)

    @property
    def keepalive_s(self) -> float:
        return self.claim_ttl_s / 3


def parse_servers(url: str) -> list[str]:
    """`nats://h:p[,nats://h2:p]` (or tls://) as a list; ValueError for anything else. A
    password in the URL is refused: argv is visible to every process on the host."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("--bus needs nats://HOST:PORT")
    for server in servers:
        try:
            parts = urlsplit(server)
            parts.port  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            raise ValueError(f"--bus: {server!r} is not a URL") from None
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError(f"--bus: {server!r} must be nats://HOST:PORT or tls://HOST:PORT")
        if "@" in parts.netloc:
            raise ValueError("--bus must not carry credentials: use --bus-creds-file")
    return servers


def credentials(path: Path) -> dict:
    """nats.connect's options for a credentials file: a `.creds` file (a user JWT and its
    NKey seed, as `nsc` writes it) or a bare NKey user seed (`SU...`)."""
    try:
        text = path.read_text(errors="replace")[:65536]
    except OSError as exc:
        raise ValueError(f"cannot read --bus-creds-file {path}: {exc.strerror or exc}") from None
    if "BEGIN NATS USER JWT" in text:
        return {"user_credentials": str(path)}
    if text.strip().startswith("SU"):
        return {"nkeys_seed": str(path)}
    raise ValueError(
        f"--bus-creds-file {path} is neither a NATS .creds file nor an NKey user seed (SU...)"
    )


class NatsBus(Bus):
    shared = True

    def __init__(self, options: NatsOptions, **kwargs):
        super().__init__(**kwargs)
        self.options = options
        self.nc = self.js = self.kv = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._connected_since = 0.0
        self._sending: dict[str, int] = {}  # events of each call in flight to the bus
        self._errors: list[Exception] = []  # the last error the client reported

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        opts = self.options
        connect = {
            "servers": opts.servers,
            "name": f"e2v-gateway {self.replica}",
            "connect_timeout": CONNECT_TIMEOUT_S,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "ping_interval": PING_S,
            "max_outstanding_pings": 3,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
        }
        if opts.creds_file is not None:
            connect |= credentials(opts.creds_file)
        if opts.ca_file is not None or any(s.startswith("tls://") for s in opts.servers):
            connect["tls"] = ssl.create_default_context(
                cafile=str(opts.ca_file) if opts.ca_file else None
            )
        self.nc = await _connect(connect, self._errors)
        self._connected_since = time.monotonic()
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        await self._ensure_stream()
        self.kv = await self._ensure_bucket()
        await super().start()
        self._tasks = [asyncio.create_task(self._publisher(), name="bus-publisher")]
        if self.webhook is not None:
            await self._ensure_webhook_consumer()
            self._tasks.append(asyncio.create_task(self._webhooks(), name="bus-webhooks"))

    async def stop(self, drain_s: float = 5.0) -> None:
        """Publish what is buffered (up to `drain_s`), end the background work, close."""
        if self.nc is None:
            return
        deadline = time.monotonic() + drain_s
        while self._background and time.monotonic() < deadline:
            await asyncio.wait(self._background, timeout=deadline - time.monotonic())
        while len(self.buffer) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(self.buffer):
            log.warning("bus: %d events not published at stop", len(self.buffer))
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await super().stop(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            await self.nc.close()
        self.nc = None

    async def _ensure_stream(self) -> None:
        from nats.js.api import DiscardPolicy, StorageType, StreamConfig
        from nats.js.errors import BadRequestError

        opts = self.options
        config = StreamConfig(
            name=opts.stream,
            description="e2v live call events (docs/events.schema.json)",
            subjects=[all_calls_subject()],
            max_age=opts.max_age_s,
            max_bytes=opts.max_bytes,
            max_msgs_per_subject=opts.events_per_call,
            discard=DiscardPolicy.OLD,
            storage=StorageType.FILE,
            num_replicas=opts.replicas,
            duplicate_window=min(DUPLICATE_WINDOW_S, opts.max_age_s),
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:  # it exists with other limits: these flags win
            await self.js.update_stream(config)

    async def _ensure_bucket(self):
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BadRequestError

        opts = self.options
        config = KeyValueConfig(
            bucket=opts.bucket,
            description="e2v live calls: call token -> record (GET /v1/calls)",
            history=1,
            ttl=opts.claim_ttl_s,
            max_value_size=MAX_RECORD_BYTES,
            storage=StorageType.FILE,
            replicas=opts.replicas,
        )
        try:
            return await self.js.create_key_value(config)
        except BadRequestError:  # exists with another TTL: take it as it is, say so
            log.warning("bus: bucket %s exists with other settings; using it", opts.bucket)
            return await self.js.key_value(opts.bucket)

    async def _ensure_webhook_consumer(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import BadRequestError

        opts = self.options
        config = ConsumerConfig(
            durable_name=opts.webhook_consumer,
            description="e2v webhooks: every call's alerts and summaries",
            filter_subjects=[all_calls_subject(EVENT_ALERT), all_calls_subject(EVENT_SUMMARY)],
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=opts.webhook_ack_wait_s,
            max_deliver=WEBHOOK_MAX_DELIVER,
            max_ack_pending=1000,
        )
        try:
            await self.js.add_consumer(opts.stream, config)
        except BadRequestError as exc:  # exists with other settings (another replica's)
            log.info("bus: webhook consumer %s kept as it is: %s", opts.webhook_consumer, exc)

    async def _disconnected(self) -> None:
        self.metrics.connected = 0
        if self._tasks and not self._tasks[0].done():  # not our own close at stop
            log.warning("bus: disconnected; events wait in the buffer (%d)", len(self.buffer))

    async def _reconnected(self) -> None:
        self.metrics.connected = 1
        self._connected_since = time.monotonic()
        self.metrics.reconnected()
        log.warning("bus: reconnected to %s", self.nc.connected_url.netloc)

    async def _error(self, exc: Exception) -> None:
        self._errors.append(exc)
        del self._errors[:-1]
        log.info("bus: %r", exc)

    @property
    def steady(self) -> bool:
        """Connected for a whole keep-alive period: a claim missing now is really gone (not
        one the bus expired during an outage that its owner has not rewritten yet)."""
        return (
            self.nc is not None
            and self.nc.is_connected
            and time.monotonic() - self._connected_since > self.options.keepalive_s + POLL_S
        )

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ events

    def _publish(self, claim: Claim, event: dict, text: str) -> None:
        kind = event.get("type", "?")
        item = BusItem(
            claim.call_id, kind, event["seq"], event_id(claim.token, event["seq"]), text.encode()
        )
        self.buffer.put(item)

    async def _publisher(self) -> None:
        from nats.js.errors import APIError

        delay = RETRY_S[0]
        while True:
            await self.buffer.ready.wait()
            batch = self.buffer.take(PUBLISH_BATCH)
            self._count_sending(batch, 1)
            try:
                results = await asyncio.gather(*map(self._send, batch), return_exceptions=True)
            finally:
                self._count_sending(batch, -1)
            failed = next((i for i, r in enumerate(results) if isinstance(r, Exception)), None)
            for item in batch if failed is None else batch[:failed]:
                self.metrics.published(item.kind, time.monotonic() - item.queued)
            if failed is None:
                delay = RETRY_S[0]
                continue
            error = results[failed]
            if isinstance(error, APIError) and error.code not in (None, 503):
                # Refused for good (e.g. over the stream's message size): drop that event.
                log.error(
                    "bus refused %s %s: %r", batch[failed].kind, batch[failed].event_id, error
                )
                self.buffer.dropped["refused"] = self.buffer.dropped.get("refused", 0) + 1
                self.buffer.give_back(batch[failed + 1 :])
                continue
            # Resend from the first failure: events stored already are dropped by their id.
            self.buffer.give_back(batch[failed:])
            log.debug("bus publish failed (%r); retry in %g s", error, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_S[1])

    async def _send(self, item: BusItem) -> None:
        await self.js.publish(
            call_events_subject(item.call_id, item.kind),
            item.data,
            timeout=PUBLISH_TIMEOUT_S,
            headers={BUS_EVENT_ID_HEADER: item.event_id},
        )

    async def flushed(self, call_id: str, timeout_s: float) -> bool:
        """Whether `call_id`'s buffered events reached the bus within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.buffer.pending(call_id) or self._in_flight(call_id):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _in_flight(self, call_id: str) -> bool:
        return self._sending.get(call_id, 0) > 0

    def _count_sending(self, batch: list[BusItem], step: int) -> None:
        for item in batch:
            left = self._sending.get(item.call_id, 0) + step
            if left:
                self._sending[item.call_id] = left
            else:
                self._sending.pop(item.call_id, None)

    # ------------------------------------------------------------------ subscriptions

    @contextlib.asynccontextmanager
    async def subscription(
        self, call_id: str, sink: EventSink, after_seq: int = 0, wait_s: float = SUBSCRIBE_WAIT_S
    ) -> AsyncIterator[None]:
        task = asyncio.create_task(_Follower(self, call_id, sink, after_seq, wait_s).run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _consumer(self, call_id: str, start_seq: int | None):
        """An ephemeral pull consumer of `call_id`'s events (from stream seq `start_seq`)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            inactive_threshold=SUBSCRIBER_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
            deliver_policy=DeliverPolicy.ALL
            if start_seq is None
            else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
        )
        sub = await self.js.pull_subscribe(
            call_events_subject(call_id),
            stream=self.options.stream,
            config=config,
            pending_msgs_limit=4 * SUBSCRIBER_BATCH,
        )
        return sub, config.name  # pull_subscribe names the consumer

    # ------------------------------------------------------------------ registry

    async def claim(self, call_id, protocol, parties) -> Claim:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        key = bus_token(call_id)
        record = new_record(call_id, protocol, parties, self.replica)
        record["token"] = secrets.token_hex(8)
        for _ in range(3):  # a claim that expires between our create and get: again
            try:
                revision = await self.kv.create(key, _encode(record))
            except KeyWrongLastSequenceError:
                pass
            else:
                claim = NatsClaim(self, record, revision)
                claim.taken.set_result(None)
                claim.keep_alive()
                return claim
            try:
                current = json.loads((await self.kv.get(key)).value)
            except KeyNotFoundError:
                continue
            if current.get("state") not in (MOVING, DRAINING):
                raise CallInUse(call_id)
            claim = NatsClaim(self, record, None)
            claim.succeed(current)
            return claim
        raise CallInUse(call_id)

    async def record(self, call_id: str) -> dict | None:
        """`call_id`'s record if it is claimed now; None if not; raises if the bus is down."""
        from nats.js.errors import KeyNotFoundError

        try:
            return json.loads((await self.kv.get(bus_token(call_id))).value)
        except KeyNotFoundError:
            return None

    async def calls(self) -> list[dict]:
        watcher = await self.kv.watchall(ignore_deletes=True)
        records = []
        try:
            while len(records) < LIST_LIMIT:
                entry = await watcher.updates(timeout=PUBLISH_TIMEOUT_S)
                if entry is None:
                    break
                with contextlib.suppress(ValueError):
                    records.append(json.loads(entry.value))
        finally:
            await watcher.stop()
        return records

    # ------------------------------------------------------------------ webhooks

    async def _webhooks(self) -> None:
        """Fetch alerts and summaries from the durable consumer and deliver them."""
        sub, delay, lag_at = None, RETRY_S[0], 0.0
        while True:
            try:
                if sub is None:
                    sub = await self.js.pull_subscribe_bind(
                        durable=self.options.webhook_consumer, stream=self.options.stream
                    )
                if time.monotonic() >= lag_at:
                    info = await sub.consumer_info()
                    self.metrics.webhook_pending = info.num_pending + info.num_ack_pending
                    lag_at = time.monotonic() + LAG_EVERY_S
                msgs = await _fetch(sub, self.webhook.workers, LAG_EVERY_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the bus is down: wait, bind again
                log.debug("bus webhooks: %r; retry in %g s", exc, delay)
                sub = None
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_S[1])
                continue
            delay = RETRY_S[0]
            await asyncio.gather(*map(self._deliver_webhook, msgs))

    async def _deliver_webhook(self, msg) -> None:
        delivery_id = (msg.headers or {}).get(BUS_EVENT_ID_HEADER) or (
            f"{self.options.stream}-{msg.metadata.sequence.stream}"
        )
        progress = asyncio.create_task(self._in_progress(msg))
        try:
            error = await self.webhook.send(delivery_id, msg.data)
        finally:
            progress.cancel()
        try:
            # Failed after its retries: terminated, as a failed delivery is dropped today.
            await (msg.ack() if error is None else msg.term())
        except Exception as exc:  # noqa: BLE001 - redelivered after ack_wait: at least once
            log.warning("bus webhooks: ack of %s failed (%r)", delivery_id, exc)

    async def _in_progress(self, msg) -> None:
        """Tell the bus the delivery goes on (retries), so no other replica takes it."""
        while True:
            await asyncio.sleep(self.options.webhook_ack_wait_s / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()


class NatsClaim(Claim):
    """A call's claim in the KV bucket: kept alive by `keep_alive`, or, for a successor,
    first taken over from the draining replica (`succeed`)."""

    def __init__(self, bus: NatsBus, record: dict, revision: int | None):
        super().__init__(bus, record)
        self.key = bus_token(self.call_id)
        self.revision = revision
        self._dirty = asyncio.Event()
        self._writing = asyncio.Lock()
        self._keeper: asyncio.Task | None = None
        self._successor: asyncio.Task | None = None

    def keep_alive(self) -> None:
        self._keeper = asyncio.create_task(self._keep_alive())

    def _changed(self) -> None:
        self._dirty.set()

    async def _keep_alive(self) -> None:
        """Rewrite the record every third of the TTL, or RECORD_WRITE_S after a change."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.bus.options.keepalive_s)
                await asyncio.sleep(RECORD_WRITE_S)
            self._dirty.clear()
            if not await self._write():
                return

    async def _write(self) -> bool:
        """Write the record; False once the claim is lost (taken by another replica)."""
        async with self._writing:  # one write at a time: each names the last revision
            return await self._write_now()

    async def _write_now(self) -> bool:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        kv = self.bus.kv
        try:
            self.revision = await kv.update(self.key, _encode(self.record), last=self.revision)
            return True
        except KeyWrongLastSequenceError:
            pass
        except Exception as exc:  # noqa: BLE001 - the bus is down: the next tick retries
            log.debug("call %s: claim not renewed (%r)", self.call_id, exc)
            return True
        try:  # expired (a bus outage longer than the TTL) and free: claim it again
            await kv.get(self.key)
        except KeyNotFoundError:
            with contextlib.suppress(KeyWrongLastSequenceError):
                self.revision = await kv.create(self.key, _encode(self.record))
                return True
        except Exception:  # noqa: BLE001
            return True
        log.warning("call %s: claim lost to another replica", self.call_id)
        self.bus.metrics.claim_lost()
        self._lose("the call was taken over by another replica")
        return False

    def _lose(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)

    # ------------------------------------------------------------------ moves

    async def draining(self, until: float) -> None:
        if self.taken.done() and not self.ended:
            self.record |= {"state": DRAINING, "moving_by": round(until, 3)}
            await self._write()

    async def hand_over(self, carry: dict, wait_s: float) -> bool:
        bus: NatsBus = self.bus
        deadline = time.monotonic() + wait_s
        if not self.taken.done() or not await bus.flushed(self.call_id, wait_s):
            return False
        self.record |= {"state": MOVING, "carry": carry}
        await self._stop_keeper()
        if not await self._write():
            return False
        renew_at = time.monotonic() + bus.options.keepalive_s
        while time.monotonic() < deadline:
            await asyncio.sleep(HANDOVER_POLL_S)
            with contextlib.suppress(Exception):
                current = await bus.record(self.call_id)
                if current is not None and current.get("replica") != bus.replica:
                    self.ended = True
                    log.info("call %s: handed over to %s", self.call_id, current["replica"])
                    return True
            if time.monotonic() >= renew_at:  # still ours: kept alive while it waits
                renew_at = time.monotonic() + bus.options.keepalive_s
                with contextlib.suppress(Exception):  # taken meanwhile: the next read says so
                    self.revision = await bus.kv.update(
                        self.key, _encode(self.record), last=self.revision
                    )
        self.record["state"] = LIVE
        self.record.pop("carry", None)
        if await self._write():
            self.keep_alive()
        return False

    def succeed(self, current: dict) -> None:
        """Take the call over from its draining owner once it hands it over (`taken`), or
        give up (`lost`) when it has not by the time it said (`moving_by`)."""
        until = min(current.get("moving_by") or 0.0, time.time() + MAX_SUCCESSOR_WAIT_S)
        task = self._succeed(until + SUCCESSOR_GRACE_S, current.get("seq", 0))
        self._successor = asyncio.create_task(task)

    async def _succeed(self, until: float, last_seq: int) -> None:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        kv = self.bus.kv
        while time.time() < until:
            try:
                entry = await kv.get(self.key)
                current = json.loads(entry.value)
            except KeyNotFoundError:  # its owner ended it (or died): a new call, seq on
                self.record["seq"] = last_seq + 1  # (past a replica_lost error's seq)
                with contextlib.suppress(KeyWrongLastSequenceError):
                    self.revision = await kv.create(self.key, _encode(self.record))
                    return self._took(None)
                continue
            except Exception as exc:  # noqa: BLE001 - the bus is down: try again
                log.debug("call %s: takeover waits (%r)", self.call_id, exc)
                await asyncio.sleep(HANDOVER_POLL_S)
                continue
            last_seq = current.get("seq", last_seq)
            state = current.get("state")
            if state == MOVING:
                record = self.record | {
                    k: current[k] for k in ("token", "started", "seq", "latest", "alerts")
                }
                with contextlib.suppress(KeyWrongLastSequenceError):
                    self.revision = await kv.update(self.key, _encode(record), last=entry.revision)
                    self.record = record
                    self.token = record["token"]
                    return self._took(current)
            elif state != DRAINING:
                return self._lose(f"call {self.call_id} went live on {current.get('replica')}")
            await asyncio.sleep(HANDOVER_POLL_S)
        self._lose(f"call {self.call_id} was not handed over in time")

    def _took(self, previous: dict | None) -> None:
        self.previous = previous
        if previous is not None:
            log.info("call %s moved here from %s", self.call_id, previous.get("replica"))
        self.keep_alive()
        self.taken.set_result(None)

    # ------------------------------------------------------------------ end

    async def _stop_keeper(self) -> None:
        for task in (self._keeper, self._successor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._keeper = self._successor = None

    async def _end(self) -> None:
        """Delete the claim once this call's events are on the bus: waited for up to
        RELEASE_WAIT_S (so the id is free when the caller's socket closes), then in the
        background: a session does not wait out an outage (the claim is kept alive)."""
        if not self.taken.done():  # a successor that never took the call: nothing to end
            await self._stop_keeper()
            return
        deleting = self.bus._spawn(self._delete_when_published())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(deleting), RELEASE_WAIT_S)

    async def _delete_when_published(self) -> None:
        bus: NatsBus = self.bus
        await bus.flushed(self.call_id, bus.options.max_age_s)
        await self._stop_keeper()
        with contextlib.suppress(Exception):
            await bus.kv.delete(self.key, last=self.revision)


class _Follower:
    """Delivers one call's events to one subscriber's sink (NatsBus.subscription)."""

    def __init__(self, bus: NatsBus, call_id: str, sink: EventSink, after_seq: int, wait_s):
        self.bus, self.call_id, self.sink = bus, call_id, sink
        self.next_seq = after_seq + 1
        self.wait_s = wait_s
        self.held: dict[int, tuple[dict, str]] = {}
        self.held_since: float | None = None
        self.start_seq: int | None = None  # the stream sequence to resume from
        self.seen = False  # the call was live (a claim or an event) while we followed
        self.token: str | None = None
        self.last_kind: str | None = None
        self.sub = self.consumer_name = None

    async def run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must end the subscriber, loudly
            log.exception("call %s: subscription failed", self.call_id)
            self.sink.stop(LiveError(CLOSE_INTERNAL, "internal", f"subscription failed: {exc!r}"))
        finally:
            await asyncio.shield(self._unsubscribe())

    async def _unsubscribe(self) -> None:
        """Remove this subscriber's consumer now (the server would after it idles)."""
        sub, self.sub = self.sub, None
        if sub is None:
            return
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
            await asyncio.wait_for(
                self.bus.js.delete_consumer(self.bus.options.stream, self.consumer_name),
                PUBLISH_TIMEOUT_S,
            )

    async def _follow(self) -> None:
        deadline = time.monotonic() + self.wait_s
        delay = RETRY_S[0]
        with contextlib.suppress(Exception):  # a live call: its events only (by its token)
            record = await self.bus.record(self.call_id)
            if record is not None:
                self.token, self.seen = record["token"], True
        while True:
            try:
                if self.sub is None:
                    self.sub, self.consumer_name = await self.bus._consumer(
                        self.call_id, self.start_seq
                    )
                msgs = await _fetch(self.sub, SUBSCRIBER_BATCH, POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the bus is down: wait, subscribe again
                log.debug("call %s: subscription interrupted (%r)", self.call_id, exc)
                await self._unsubscribe()
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_S[1])
                continue
            delay = RETRY_S[0]
            if msgs:
                self.seen = True
                if not self._take(msgs):
                    return
                continue
            if self._release_held():
                return
            if await self._gone(deadline):
                return

    def _take(self, msgs) -> bool:
        """Hold and deliver `msgs`; False once the subscription is over."""
        now = time.time()
        for msg in msgs:
            self.start_seq = msg.metadata.sequence.stream + 1
            self.bus.metrics.delivered(now - msg.metadata.timestamp.timestamp())
            if not self._of_this_call(msg):
                continue
            try:
                event = json.loads(msg.data)
                seq = int(event["seq"])
            except (ValueError, KeyError, TypeError):
                log.error("call %s: unreadable event on the bus", self.call_id)
                continue
            self.last_kind = event.get("type")
            if seq >= self.next_seq:
                self.held[seq] = (event, msg.data.decode())
        return self._deliver()

    def _of_this_call(self, msg) -> bool:
        """False for an event of an earlier call under the same id (within retention),
        told apart by the token in its id once the live call's token is known."""
        token = (msg.headers or {}).get(BUS_EVENT_ID_HEADER, "").rpartition("-")[0]
        return self.token is None or not token or token == self.token

    def _deliver(self) -> bool:
        while self.next_seq in self.held:
            event, text = self.held.pop(self.next_seq)
            self.next_seq += 1
            terminal = event.get("type") in TERMINAL_EVENTS
            if not self.sink.put(event, text, last=terminal):
                return False  # the sink stopped itself (a slow reader)
            if terminal:
                self.sink.close()
                return False
        self.held_since = (self.held_since or time.monotonic()) if self.held else None
        return True

    def _release_held(self) -> bool:
        """A gap held past REORDER_HOLD_S is skipped (its event is not coming); True once
        the subscription is over."""
        if not self.held or time.monotonic() - self.held_since < REORDER_HOLD_S:
            return False
        log.warning(
            "call %s: events %d-%d missing; skipped",
            self.call_id,
            self.next_seq,
            min(self.held) - 1,
        )
        self.next_seq = min(self.held)
        return not self._deliver()

    async def _gone(self, deadline: float) -> bool:
        """After a quiet poll: whether the subscription is over (no call, a lost replica)."""
        if self.last_kind in TERMINAL_EVENTS:  # replayed to its end (Last-Event-ID past it)
            self.sink.close()
            return True
        try:
            record = await self.bus.record(self.call_id)
        except Exception:  # noqa: BLE001 - the bus is down: keep waiting
            return False
        if record is not None:
            self.seen = True
            self.token = record["token"]
            return False
        if not self.seen:
            if time.monotonic() < deadline:
                return False
            self.sink.stop(no_such_call(self.call_id, self.wait_s))
            return True
        if not self.bus.steady:
            return False
        await self._replica_lost()
        return True

    async def _replica_lost(self) -> None:
        """The call's claim expired without a summary: its replica died. The error goes to
        the sink and, once (a deterministic id), to the bus for webhooks and consumers."""
        seq = max([self.next_seq, *(held + 1 for held in self.held)])
        message = f"the replica of call {self.call_id} stopped (its claim expired)"
        event = bus_error(self.call_id, seq, CLOSE_INTERNAL, REPLICA_LOST, message)
        text = to_json(event)
        self.bus.metrics.replica_lost()
        for held_seq in sorted(self.held):
            held_event, held_text = self.held.pop(held_seq)
            self.sink.put(held_event, held_text)
        self.sink.put(event, text, last=True)
        self.sink.close()
        if self.token is not None:
            item = BusItem(
                self.call_id, event["type"], seq, event_id(self.token, seq), text.encode()
            )
            self.bus.buffer.put(item)


async def _connect(options: dict, errors: list[Exception]):
    """A connected client, or RuntimeError within CONNECT_TIMEOUT_S (the client itself
    retries a refused first connection, authentication or TLS included, for ever)."""
    from nats.aio.client import Client

    client = Client()
    try:
        await asyncio.wait_for(client.connect(**options), 2 * CONNECT_TIMEOUT_S)
        return client
    except Exception as exc:  # noqa: BLE001 - one line for the operator, the cause named
        with contextlib.suppress(Exception):
            await client.close()
        why = errors[-1] if errors else exc
        where = ",".join(options["servers"])
        raise RuntimeError(f"cannot connect to the bus {where}: {why!r}") from None


async def _fetch(sub, batch: int, timeout_s: float) -> list:
    """Up to `batch` messages, or [] after `timeout_s` without any."""
    import nats.errors

    try:
        return await sub.fetch(batch, timeout=timeout_s)
    except nats.errors.TimeoutError:
        return []


def _encode(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()
