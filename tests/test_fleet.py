"""Live calls across a fleet of gateways (docs/deploy.md, "Live calls across replicas").

Real processes on free loopback ports: a NATS server with JetStream (the pip-installed
`nats-server`), `e2v gateway --bus nats://...` replicas, the tiny Triton server; the
callers and subscribers are real WebSockets, SSE over HTTP, `e2v live` and, for the Calls
view, headless chromium. Replicas that must die are started by their test and killed
with SIGKILL (or drained with SIGTERM); a NATS restart goes last (the server is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.loadtest.gateway_process import GatewayProcess
from servers import NatsServer, free_ports

from e2v.contract import (
    CALL_EVENTS_PATH,
    CALL_EVENTS_WS_PATH,
    CALLS_PATH,
    CLOSE_BAD_MESSAGE,
    CLOSE_NORMAL,
    LIVE_PATH,
    WEBHOOK_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
)

pytest.importorskip("nats", reason="the bus extra (nats-py) is not installed")
pytest.importorskip("fastapi", reason="the gateway extra is not installed")
websockets = pytest.importorskip("websockets")

KEY = "fleet-test-key-5b1d9e"
AUTH = {"Authorization": f"Bearer {KEY}"}
TTL_S = 3.0  # the replicas' --bus-claim-ttl-s: a dead replica's calls go within seconds
MAX_SPEED = 40  # the replicas' --live-max-speed (calls are played faster than real time)
RATE = 8000
VAD_FRAME_S = 512 / 16_000
SCORE_TOLERANCE = 1e-4
# Two parties, each longer than a VAD segment is allowed to grow.
CUSTOMER = [("speech", 5), ("silence", 2), ("speech", 7), ("silence", 2.5), ("speech", 4)]
CUSTOMER += [("silence", 6), ("speech", 5), ("silence", 1.5)]
AGENT = [("silence", 3), ("speech", 3), ("silence", 8), ("speech", 6), ("silence", 2)]
AGENT += [("speech", 5), ("silence", 6)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fleet-key") / "key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture(scope="module")
def nats(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("fleet-nats")) as server:
        yield server


def replica(tiny_server, nats, key_file, *extra: str) -> GatewayProcess:
    return GatewayProcess(
        tiny_server.config.grpc_url,
        "--api-key-file",
        str(key_file),
        "--bus",
        nats.url,
        "--bus-claim-ttl-s",
        str(TTL_S),
        "--live-max-speed",
        str(MAX_SPEED),
        *extra,
    )


@pytest.fixture(scope="module")
def fleet(tiny_server, nats, key_file):
    """Replicas A and B, for the whole module."""
    with replica(tiny_server, nats, key_file) as a, replica(tiny_server, nats, key_file) as b:
        yield a, b


@pytest.fixture(scope="module")
def label(fleet) -> str:
    """A label of the served model (alert rules name one)."""
    with urllib.request.urlopen(fleet[0].url + "/ready", timeout=10) as response:
        labels = json.loads(response.read())["labels"]
    return next(label for label in labels if not label.startswith(("unuse", "<")))


@pytest.fixture(scope="module")
def call_audio() -> dict[str, np.ndarray]:
    customer, _ = fx.bursts(CUSTOMER, sr=RATE, seed=11)
    agent, _ = fx.bursts(AGENT, sr=RATE, seed=31)
    return {"customer": customer, "agent": agent}


# ------------------------------------------------------------------------------ helpers


def ws(gateway: GatewayProcess, path: str = LIVE_PATH) -> str:
    return gateway.url.replace("http://", "ws://") + path


def pcm(channels: list[np.ndarray]) -> bytes:
    """Interleaved pcm_s16le frames of the channels."""
    stacked = np.stack(channels, axis=1).reshape(-1)
    return (np.clip(stacked, -1, 1) * 32767).astype("<i2").tobytes()


class Call:
    """One /v1/live call played by the test: `start`, audio at `speed` times real time in
    100 ms frames, `stop`; `events` are what the caller's socket got (after `started`)."""

    def __init__(self, gateway, call_id, channels, speed=10.0, **start):
        self.url, self.call_id, self.speed = ws(gateway), call_id, speed
        self.audio = pcm(channels)
        self.width = 2 * len(channels)
        self.start = {
            "type": "start",
            "call_id": call_id,
            "encoding": "pcm_s16le",
            "sample_rate": RATE,
            "channels": len(channels),
        } | start
        self.events: list[dict] = []
        self.close_code = self.close_reason = None
        self.streaming = asyncio.Event()  # set once the first audio went out

    async def run(self, stop: asyncio.Event | None = None) -> Call:
        """The whole call; with `stop`, the audio loops until it is set (a held call)."""
        async with websockets.connect(self.url, additional_headers=AUTH) as sock:
            await sock.send(json.dumps(self.start))
            first = json.loads(await asyncio.wait_for(sock.recv(), 15))
            if first["type"] != "started":
                self.events.append(first)
                await self._drain(sock)
                return self
            reader = asyncio.create_task(self._drain(sock))
            frame = round(0.1 * RATE) * self.width
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    for i in range(0, len(self.audio), frame):
                        await sock.send(self.audio[i : i + frame])
                        self.streaming.set()
                        await asyncio.sleep(0.1 / self.speed)
                        if reader.done() or (stop is not None and stop.is_set()):
                            break
                    if stop is None or stop.is_set() or reader.done():
                        break
                await sock.send(json.dumps({"type": "stop"}))
            await asyncio.wait_for(reader, 120)
        return self

    async def _drain(self, sock) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in sock:
                self.events.append(json.loads(message))
        self.close_code, self.close_reason = sock.close_code, sock.close_reason


async def subscribe(
    gateway, call_id: str, after: int | None = None, events: list | None = None
) -> tuple[list[dict], int]:
    """Every event of `call_id` through the subscription WebSocket (appended to `events`
    as they come), and its close code."""
    path = CALL_EVENTS_WS_PATH.format(call_id=call_id)
    if after is not None:
        path += f"?after={after}"
    events = [] if events is None else events
    async with websockets.connect(ws(gateway, path), additional_headers=AUTH) as sock:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in sock:
                events.append(json.loads(message))
    return events, sock.close_code


def read_sse(gateway, call_id: str, last_event_id: int | None = None) -> list[dict]:
    headers = dict(AUTH)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    request = urllib.request.Request(
        gateway.url + CALL_EVENTS_PATH.format(call_id=call_id), headers=headers
    )
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def get_calls(gateway, query: str = "", headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        gateway.url + CALLS_PATH + query, headers=AUTH if headers is None else headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def until(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    """`predicate()`'s first truthy value within `timeout_s` (run in a thread)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(poll_s)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


def listed(gateway, call_ids: set[str]):
    """The rows of `call_ids` in the gateway's GET /v1/calls once all are there."""
    status, body = get_calls(gateway)
    rows = {row["call_id"]: row for row in body.get("calls", [])}
    return rows if status == 200 and call_ids <= set(rows) else None


def run(coro, timeout_s: float = 300):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# ----------------------------------------------------------------------------- events


def test_a_subscriber_on_b_gets_every_event_of_a_call_on_a(fleet, call_audio, label):
    """The WebSocket and SSE subscribers on B, joined before the call started on A, get
    exactly what A's caller got, in seq order, ending with the summary; Last-Event-ID on B
    replays from the stream after the call ended."""
    a, b = fleet
    call_id = "fleet.call:1"  # '.' and ':' are escaped on the bus

    async def scenario():
        sub = asyncio.create_task(subscribe(b, call_id))
        sse = asyncio.create_task(asyncio.to_thread(read_sse, b, call_id))
        await asyncio.sleep(0.5)
        channels = [call_audio["customer"][: 20 * RATE], call_audio["agent"][: 20 * RATE]]
        alerts = f"customer:{label}=0.01"  # fires: every window scores above 1 %
        call = await Call(a, call_id, channels, hop_s=0.5, alerts=alerts).run()
        return call, await sub, await sse

    call, (ws_events, code), sse_events = run(scenario())
    assert call.close_code == CLOSE_NORMAL and call.events[-1]["type"] == "summary"
    kinds = {e["type"] for e in call.events}
    assert {"utterance.start", "result", "utterance.end", "alert", "summary"} <= kinds
    assert [e["seq"] for e in call.events] == list(range(1, len(call.events) + 1))
    assert ws_events == call.events and code == CLOSE_NORMAL
    assert sse_events == call.events
    again = read_sse(b, call_id, last_event_id=7)
    assert again == call.events[7:]
    resumed, _ = run(subscribe(b, call_id, after=len(call.events) - 3))
    assert resumed == call.events[-3:]


def test_the_same_call_id_is_refused_on_every_replica(fleet, call_audio):
    a, b = fleet
    call_id = "fleet-dup"

    async def scenario():
        stop = asyncio.Event()
        first = Call(a, call_id, [call_audio["customer"]], speed=2)
        held = asyncio.create_task(first.run(stop))
        await asyncio.wait_for(first.streaming.wait(), 15)
        dups = [await Call(g, call_id, [call_audio["agent"]]).run() for g in (b, a)]
        stop.set()
        await held
        free = await Call(b, call_id, [call_audio["agent"][: 3 * RATE]]).run()
        return first, dups, free

    first, dups, free = run(scenario())
    for dup in dups:
        assert dup.close_code == CLOSE_BAD_MESSAGE, (dup.close_code, dup.events)
        assert f"call_id {call_id} is already live" in dup.close_reason
        (event,) = dup.events
        assert event["error_kind"] == "call_in_use" and event["code"] == CLOSE_BAD_MESSAGE
    assert first.close_code == CLOSE_NORMAL and first.events[-1]["type"] == "summary"
    assert free.close_code == CLOSE_NORMAL  # released once the first call ended


def test_calls_on_either_replica_lists_both_replicas_calls(fleet, call_audio, label):
    a, b = fleet

    async def scenario():
        stop = asyncio.Event()
        on_a = Call(a, "fleet-on-a", [call_audio["customer"]], speed=2, alerts=f"{label}=0.01")
        on_b = Call(b, "fleet-on-b", [call_audio["agent"], call_audio["customer"]], speed=2)
        held = [asyncio.create_task(c.run(stop)) for c in (on_a, on_b)]
        try:

            def alerting_with_emotions():
                rows = listed(a, {"fleet-on-a", "fleet-on-b"})
                ok = rows and rows["fleet-on-a"]["alerts"] and rows["fleet-on-a"]["latest"]
                return rows if ok else None

            await until(alerting_with_emotions, 60, "both calls, an alert and a final on A")
            views = [get_calls(g)[1] for g in (a, b)]
            alerting = [get_calls(g, "?alerting=true")[1] for g in (a, b)]
            refused = get_calls(b, headers={})
        finally:
            stop.set()
            await asyncio.gather(*held)
        return views, alerting, refused

    views, alerting, refused = run(scenario())
    replicas = set()
    for view in views:
        assert view["fleet"] is True
        rows = {row["call_id"]: row for row in view["calls"]}
        assert [r["call_id"] for r in view["calls"]][0] == "fleet-on-a"  # alerting first
        on_a, on_b = rows["fleet-on-a"], rows["fleet-on-b"]
        assert (on_a["protocol"], on_a["parties"]) == ("live", ["caller"])
        assert on_b["parties"] == ["customer", "agent"]
        assert on_a["replica"] != on_b["replica"]
        replicas |= {on_a["replica"], on_b["replica"]}
        latest = on_a["latest"]["caller"]
        assert latest["emotion"] and 0 < latest["confidence"] <= 1
        assert on_a["alerts"][0]["label"] == label and on_a["alerts"][0]["party"] == "caller"
        assert "token" not in on_a and "carry" not in on_a
    assert len(replicas) == 2
    for view in alerting:
        assert "fleet-on-a" in [r["call_id"] for r in view["calls"]]
        assert "fleet-on-b" not in [r["call_id"] for r in view["calls"]]
    assert refused[0] == 401 and refused[1]["error_kind"] == "unauthorized"


# ------------------------------------------------------------------------ dying replicas


def test_sigkill_of_a_replica_expires_its_calls_and_tells_their_subscribers(
    fleet, tiny_server, nats, key_file, call_audio
):
    """C dies mid-call: within the claim TTL its call leaves GET /v1/calls on B, and B's
    subscriber gets `error` with error_kind replica_lost (no hang)."""
    _, b = fleet
    call_id = "fleet-doomed"
    with replica(tiny_server, nats, key_file) as c:

        async def scenario():
            stop = asyncio.Event()
            call = Call(c, call_id, [call_audio["customer"]], speed=2)
            held = asyncio.create_task(call.run(stop))
            sub = asyncio.create_task(subscribe(b, call_id))
            await until(lambda: listed(b, {call_id}), 30, "the call listed on B")
            await until(lambda: len(call.events) >= 3, 30, "events of the call")
            c.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            events, code = await asyncio.wait_for(sub, TTL_S + 10)
            lost_after = time.monotonic() - killed
            await until(lambda: listed(b, set()) is not None and not listed(b, {call_id}), 10, "")
            gone_after = time.monotonic() - killed
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(held, 30)
            return events, code, lost_after, gone_after

        events, code, lost_after, gone_after = run(scenario())
    assert events[-1]["type"] == "error" and events[-1]["error_kind"] == "replica_lost"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert code == CLOSE_NORMAL
    print(f"replica_lost after {lost_after:.1f} s, unlisted after {gone_after:.1f} s")
    assert lost_after <= TTL_S + 3.0  # the TTL, a subscriber's poll and a fetch
    assert gone_after <= TTL_S + 3.0


class Receiver:
    """A webhook receiver (aiohttp) that answers 503 until `accepting`, recording every
    attempt (its id, whether it was accepted, the body and whether the signature held)."""

    def __init__(self, secret: bytes):
        self.secret, self.attempts, self.accepting = secret, [], False
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self):
        from aiohttp import web
        from e2v.client.webhooks import verify

        async def hook(request):
            body = await request.read()
            signed = verify(self.secret, request.headers[WEBHOOK_SIGNATURE_HEADER], body)
            accepted = self.accepting
            self.attempts.append(
                (request.headers[WEBHOOK_ID_HEADER], accepted, json.loads(body), signed)
            )
            return web.Response(status=204 if accepted else 503)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def test_a_webhook_survives_the_death_of_the_replica_that_published_it(
    fleet, tiny_server, nats, key_file, call_audio, tmp_path
):
    """C publishes a call's summary and starts delivering it (the receiver answers 503,
    C retries), then dies. D, a replica started afterwards, delivers the same event, with
    the same id and a valid signature, once the bus's ack wait has passed."""
    secret = b"fleet-webhook-secret-0123456789"
    (tmp_path / "secret").write_bytes(secret + b"\n")

    async def scenario():
        async with Receiver(secret) as receiver:
            hooks = ["--webhook", receiver.url, "--webhook-secret-file", str(tmp_path / "secret")]
            hooks += ["--bus-webhook-ack-wait-s", "3"]
            c = replica(tiny_server, nats, key_file, *hooks)
            d = replica(tiny_server, nats, key_file, *hooks)
            with c:
                channels = [call_audio["customer"][: 8 * RATE]]
                call = await Call(c, "fleet-hooked", channels).run()
                await until(lambda: receiver.attempts, 30, "C's first delivery attempt")
                c.process.send_signal(signal.SIGKILL)
                c.process.wait()
            receiver.accepting = True
            with d:
                delivered = await until(
                    lambda: [a for a in receiver.attempts if a[1]], 60, "D's delivery"
                )
            return call, receiver.attempts, delivered

    call, attempts, delivered = run(scenario())
    summary = call.events[-1]
    assert summary["type"] == "summary"
    (failed_id, _, body, signed), *_ = attempts
    assert body == summary and signed
    (delivered_id, _, body, signed), *_ = delivered
    assert body == summary and signed
    assert delivered_id == failed_id and delivered_id.endswith(f"-{summary['seq']}")


# --------------------------------------------------------------------------------- moves


def classify_segments(tiny_server, paths: list[Path]) -> dict[str, list[dict]]:
    result = subprocess.run(
        [sys.executable, "-m", "e2v", "classify", "--no-progress", "--json", "--segment", "vad"]
        + ["--url", tiny_server.config.grpc_url, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {Path(row["file"]).stem: row["segments"] for row in rows}


def assert_finals_equal(finals: list[dict], segments: list[dict], shift_s: float) -> None:
    assert len(finals) == len(segments), (finals, segments)
    for final, segment in zip(finals, segments):
        for edge in ("start_s", "end_s"):
            assert abs(final[edge] - (segment[edge] + shift_s)) <= VAD_FRAME_S + 1e-5
        moved = sum(abs(final[e] - segment[e] - shift_s) for e in ("start_s", "end_s"))
        if moved < 1e-5:
            assert final["emotion"] == segment["emotion"]
            for name, score in segment["scores"].items():
                assert abs(final["scores"][name] - score) <= SCORE_TOLERANCE


def test_an_audiohook_call_moves_to_another_replica_when_its_replica_drains(
    fleet, tiny_server, nats, key_file, call_audio, tmp_path
):
    """`e2v live --protocol audiohook` plays a two-party call into E; E drains (SIGTERM)
    and says `reconnect`; the player opens the conversation on B and closes it on E. A
    subscriber on B sees one call: seq 1..N without a gap, one summary of the whole call.
    E's finals are classify's on the audio E received (the cut utterances end at the
    cut), B's are classify's on the audio B received, shifted by the cut."""
    _, b = fleet
    call_id = str(uuid.uuid4())
    # 93 s: the call, 27 s in which the customer speaks 24 s on end (33-57 s), the call
    # again. The drain starts once 36 s were heard, so the cut falls in that long
    # utterance; each side of it is longer than a segment may be, so classify cuts it at
    # its pauses as the live VAD does (a recording up to 30 s is one segment to classify).
    middle = {
        "customer": fx.bursts([("speech", 24), ("silence", 3)], sr=RATE, seed=51)[0],
        "agent": fx.bursts([("silence", 26), ("speech", 1)], sr=RATE, seed=61)[0],
    }
    audio = {party: np.concatenate([wav, middle[party], wav]) for party, wav in call_audio.items()}
    stereo = fx.write_audio(
        tmp_path / "call.wav",
        np.stack([audio["customer"], audio["agent"]]),
        RATE,
        codec="pcm_mulaw",
    )
    e = replica(tiny_server, nats, key_file)
    with e:
        command = [sys.executable, "-m", "e2v", "live", str(stereo), "--json"]
        command += ["--protocol", "audiohook", "--speed", "4", "--call-id", call_id]
        command += ["--url", f"{ws(e, '')},{ws(b, '')}", "--api-key-file", str(key_file)]

        async def scenario():
            heard: list[dict] = []
            sub = asyncio.create_task(subscribe(b, call_id, events=heard))
            player = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            await until(
                lambda: any((ev.get("end_s") or 0) >= 36 for ev in heard), 60, "36 s of the call"
            )
            e.process.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(player.communicate(), 120)
            events, code = await asyncio.wait_for(sub, 60)
            return player.returncode, out.decode(), err.decode(), events, code

        rc, out, err, events, code = run(scenario())
        # E drained and exited by itself (uvicorn re-raises the SIGTERM it caught).
        assert e.process.wait(60) in (0, -signal.SIGTERM)
    assert rc == 0, err
    cut_s = float(err.split("reconnect at ")[1].split(" s")[0])
    assert 34 < cut_s < 56, err  # in the customer's long utterance
    played = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert code == CLOSE_NORMAL
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("summary") == 1 and events[-1]["type"] == "summary"
    assert not [e for e in events if e["type"] == "error"]
    assert sorted(played, key=lambda e: e["seq"]) == events  # both legs: the same call
    summary = events[-1]
    duration_s = len(audio["customer"]) / RATE
    assert abs(summary["duration_s"] - duration_s) < 0.05
    cut = round(cut_s * RATE)
    pieces = {}
    for party, wav in audio.items():
        for side, piece in (("before", wav[:cut]), ("after", wav[cut:])):
            path = tmp_path / f"{party}-{side}.wav"
            pieces[path.stem] = fx.write_audio(path, piece, RATE, codec="pcm_mulaw")
    offline = classify_segments(tiny_server, list(pieces.values()))
    parties = {"customer": "customer", "agent": "agent"}  # AudioHook: external, internal
    for party in parties:
        finals = [e for e in events if e["type"] == "utterance.end" and e["party"] == party]
        before = [f for f in finals if f["end_s"] <= cut_s + 1e-6]
        after = finals[len(before) :]
        assert all(f["start_s"] >= cut_s - 1e-6 for f in after), (party, cut_s, finals)
        assert_finals_equal(before, offline[f"{party}-before"], 0.0)
        assert_finals_equal(after, offline[f"{party}-after"], cut_s)
        if party == "customer":  # the utterance cut by the move: a final on each side
            assert abs(before[-1]["end_s"] - cut_s) < 0.1, (before[-1], cut_s)
            # B's VAD starts fresh at the cut, as classify's does on the same piece
            # (asserted above): up to ~0.7 s in, where the cut falls among syllables.
            assert 0 <= after[0]["start_s"] - cut_s < 1.0, (after[0], cut_s)
        utterances = [f["utterance"] for f in finals]
        assert utterances == sorted(set(utterances))  # numbered on across the move
        (row,) = [p for p in summary["parties"] if p["party"] == party]
        assert row["segments"] == len(finals)
        # The whole call's summary: score means weighted by speech over both sides' finals.
        weights = np.array([f["end_s"] - f["start_s"] for f in finals])
        assert abs(row["speech_s"] - weights.sum()) < 1e-3
        for label, score in row["scores"].items():
            mean = sum(w * f["scores"][label] for w, f in zip(weights, finals)) / weights.sum()
            assert abs(score - mean) < 1e-4, (party, label)


def test_a_live_call_retried_on_another_replica_after_the_drain_goes_on(
    fleet, tiny_server, nats, key_file, call_audio
):
    """/v1/live on F; F drains (SIGTERM, --live-drain-s 1): the call is scored and closed
    with 1001; the client sends the same `start` to B and the rest of its audio. The 1001's
    `error` went to the caller only: B's subscriber sees one call, seq without a gap,
    utterances numbered on, one summary covering the audio of both replicas."""
    _, b = fleet
    call_id = "fleet-retried"
    audio = pcm([call_audio["customer"], call_audio["agent"]])
    frame = round(0.1 * RATE) * 4
    start = {"type": "start", "call_id": call_id, "encoding": "pcm_s16le"}
    start |= {"sample_rate": RATE, "channels": 2}
    f = replica(tiny_server, nats, key_file, "--live-drain-s", "1")
    with f:

        async def leg(gateway, offset: int, on_streaming=None) -> tuple[list, int, int]:
            """Frames from `offset` until the gateway closes or the audio ends (then stop):
            the events, the close code and where the audio stopped."""
            events = []
            async with websockets.connect(ws(gateway), additional_headers=AUTH) as sock:
                await sock.send(json.dumps(start))
                assert json.loads(await sock.recv())["type"] == "started"

                async def read():
                    with contextlib.suppress(websockets.ConnectionClosed):
                        async for message in sock:
                            events.append(json.loads(message))

                reader = asyncio.create_task(read())
                with contextlib.suppress(websockets.ConnectionClosed):
                    while offset < len(audio) and not reader.done():
                        await sock.send(audio[offset : offset + frame])
                        offset += frame
                        if on_streaming is not None and offset >= 8 * RATE * 4:
                            on_streaming()
                            on_streaming = None
                        await asyncio.sleep(0.1 / 4)  # 4x real time
                    if offset >= len(audio):
                        await sock.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(reader, 60)
            return events, sock.close_code, offset

        async def scenario():
            sub = asyncio.create_task(subscribe(b, call_id))
            await asyncio.sleep(0.3)
            first = await leg(f, 0, lambda: f.process.send_signal(signal.SIGTERM))
            second = await leg(b, first[2])
            return first, second, await asyncio.wait_for(sub, 60)

        (on_f, f_code, cut), (on_b, b_code, _), (events, code) = run(scenario())
    assert f_code == 1001 and on_f[-1]["error_kind"] == "going_away", on_f[-3:]
    assert "summary" not in [e["type"] for e in on_f]  # the call went on elsewhere
    assert b_code == CLOSE_NORMAL and on_b[-1]["type"] == "summary"
    assert code == CLOSE_NORMAL and events == on_f[:-1] + on_b  # one call, no 1001 error
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    finals = [e for e in events if e["type"] == "utterance.end"]
    for party in ("customer", "agent"):
        utterances = [e["utterance"] for e in finals if e["party"] == party]
        assert utterances == sorted(set(utterances))
    # B's audio continues the call where F's stopped (F may have dropped the last frames
    # the client sent while it closed): the summary's duration is both replicas' audio.
    f_heard_s = events[-1]["duration_s"] - (len(audio) - cut) / 4 / RATE
    f_ends = [e["end_s"] for e in on_f if isinstance(e.get("end_s"), float)]
    assert max(f_ends) - 1e-3 <= f_heard_s <= cut / 4 / RATE + 1e-3
    assert any(e["start_s"] >= f_heard_s - 1e-3 for e in finals)  # B's, in call time


def test_a_call_nobody_takes_over_ends_on_its_replica_with_its_summary(
    fleet, tiny_server, nats, key_file, call_audio
):
    """G drains (--live-drain-s 1) and closes its call with 1001; the client does not come
    back: after the hand-over wait G publishes the summary of what it heard, and B's
    subscriber ends with it (no error), then G exits."""
    _, b = fleet
    call_id = "fleet-orphan"
    g = replica(tiny_server, nats, key_file, "--live-drain-s", "1")
    with g:

        async def scenario():
            sub = asyncio.create_task(subscribe(b, call_id))
            await asyncio.sleep(0.3)
            call = Call(g, call_id, [call_audio["customer"]], speed=4)
            playing = asyncio.create_task(call.run(asyncio.Event()))
            await until(lambda: len(call.events) >= 3, 30, "events of the call")
            g.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(playing, 30)
            return call, await asyncio.wait_for(sub, 60)

        call, (events, code) = run(scenario())
        assert g.process.wait(60) in (0, -signal.SIGTERM)
    assert call.close_code == 1001 and call.events[-1]["error_kind"] == "going_away"
    assert code == CLOSE_NORMAL and events[-1]["type"] == "summary"
    assert events[:-1] == call.events[:-1]  # the caller's 1001 error never reached the bus
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    heard = max(e["end_s"] for e in events[:-1] if isinstance(e.get("end_s"), float))
    assert heard <= events[-1]["duration_s"] < heard + 5


# ------------------------------------------------------------------------- the page


def test_the_calls_view_lists_the_fleets_calls_and_follows_one(fleet, call_audio, label):
    """Headless chromium on B's page: the Calls view lists A's and B's live calls, the
    alerting one (on A) first with each party's current emotion; a click follows its
    timeline (finals drawn per party) until the call's summary."""
    from test_gateway import _browser

    webdriver, options, driver_path = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    a, b = fleet
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    quiet = Call(b, "fleet-page-quiet", [call_audio["agent"]], speed=1.5)
    angry = Call(a, "fleet-page-angry", [call_audio["customer"]], speed=1.5, alerts=f"{label}=0.01")
    calls = [loop.create_task(c.run(stop)) for c in (quiet, angry)]
    runner = asyncio.ensure_future(asyncio.gather(*calls), loop=loop)
    import threading

    thread = threading.Thread(target=loop.run_until_complete, args=(runner,), daemon=True)
    thread.start()
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    # The table is drawn again at every poll: read it, and the followed card, in one go.
    table = """return [...document.querySelectorAll('#calls-body tr.call')].map((row) => ({
        id: row.dataset.callId, alerting: row.classList.contains('alerting'),
        cells: [...row.cells].map((cell) => cell.textContent),
        emotions: [...row.querySelectorAll('.party-chip')].map((c) => c.dataset.emotion)}));"""
    followed = """const card = document.querySelector('#call-follow .followed-call');
        return card && {id: card.dataset.callId, seq: Number(card.dataset.seq || 0),
          lanes: [...card.querySelectorAll('.lane')].map((lane) => lane.dataset.party),
          finals: card.querySelectorAll('.lane .segment:not(.interim)').length,
          alerts: card.querySelectorAll('.alerts .alert').length,
          state: card.querySelector('.emotion').textContent};"""
    try:
        browser.get(b.url + "/")
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "calls-toggle").click()
        wait = WebDriverWait(browser, 60, poll_frequency=0.25)

        def rows(_):
            found = browser.execute_script(table)
            mine = {row["id"]: row for row in found if row["id"].startswith("fleet-page-")}
            angry = mine.get("fleet-page-angry")
            ready = len(mine) == 2 and angry and angry["emotions"][0] and angry["alerting"]
            return found if ready else None

        found = wait.until(rows)
        assert found[0]["id"] == "fleet-page-angry" and found[0]["alerting"]  # first
        status = browser.find_element(By.ID, "calls-status").text
        assert "across the fleet" in status and "alerting" in status
        call_cell, parties_cell, alerts_cell, _, _ = found[0]["cells"]
        assert "fleet-page-angry" in call_cell and label in alerts_cell
        assert parties_cell.startswith("caller: ") and "%" in parties_cell
        replicas = {row["cells"][3] for row in found if row["id"].startswith("fleet-page-")}
        assert len(replicas) == 2  # one call on each replica
        browser.execute_script(
            "document.querySelector('tr[data-call-id=\"fleet-page-angry\"]').click();"
        )
        card = wait.until(lambda _: (c := browser.execute_script(followed)) and c["finals"] and c)
        assert card["id"] == "fleet-page-angry" and card["lanes"] == ["caller"]
        loop.call_soon_threadsafe(stop.set)
        card = wait.until(
            lambda _: (c := browser.execute_script(followed)) and "ended" in c["state"] and c
        )
        assert card["alerts"] >= 1
    finally:
        browser.quit()
        loop.call_soon_threadsafe(stop.set)
        thread.join(120)
    assert angry.events[-1]["type"] == "summary"
    assert angry.events[-1]["seq"] == card["seq"]  # the timeline followed to the end
    finals = [e for e in angry.events if e["type"] == "utterance.end"]
    assert card["finals"] == len(finals)


# --------------------------------------------------------------------------- the bus


def test_a_nats_restart_mid_call_loses_no_final(fleet, nats, call_audio):
    """Last (the server is shared): NATS goes down for 2 s while a call plays on A; the
    call goes on, and B's subscriber gets every event the caller got, finals included."""
    a, b = fleet
    call_id = "fleet-through-restart"

    async def scenario():
        sub = asyncio.create_task(subscribe(b, call_id))
        await asyncio.sleep(0.5)
        channels = [call_audio["customer"][: 24 * RATE], call_audio["agent"][: 24 * RATE]]
        call = Call(a, call_id, channels, speed=2)
        playing = asyncio.create_task(call.run())
        await asyncio.wait_for(call.streaming.wait(), 15)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(nats.restart, 2.0)
        await playing
        return call, await asyncio.wait_for(sub, 120)

    call, (events, code) = run(scenario())
    assert call.close_code == CLOSE_NORMAL and call.events[-1]["type"] == "summary"
    finals = [e for e in call.events if e["type"] == "utterance.end"]
    assert len(finals) >= 4
    assert events == call.events and code == CLOSE_NORMAL
