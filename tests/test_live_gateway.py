"""Live sessions through a real gateway: uvicorn serving the app on a free loopback port,
the tiny Triton server, the `websockets` client, SSE over HTTP, and `e2v gateway` as a
subprocess for the SIGTERM drain. Every bound of docs/live.md ends in an `error` event and
its close code. The synthetic model's labels are meaningless: only shapes are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

websockets = pytest.importorskip("websockets")
uvicorn = pytest.importorskip("uvicorn")

from e2v.client.gateway.config import GatewayConfig  # noqa: E402
from e2v.client.live.codecs import encode, interleave  # noqa: E402
from e2v.client.live.limits import LiveLimits  # noqa: E402
from e2v.loadtest.gateway_process import GatewayProcess  # noqa: E402
from e2v.loadtest.synth import speech_like  # noqa: E402

from e2v.contract import (  # noqa: E402
    CALL_EVENTS_PATH,
    CALL_EVENTS_WS_PATH,
    CALLS_PATH,
    CLOSE_BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_SLOW_READER,
    CLOSE_TIMEOUT,
    CLOSE_TOO_BIG,
    CLOSE_TOO_FAST,
    CLOSE_TRY_AGAIN,
    EVENT_ERROR,
    EVENT_RESULT,
    EVENT_SUMMARY,
    EVENT_UTTERANCE_END,
    EVENT_UTTERANCE_START,
    LIVE_PATH,
)

KEY = "live-test-key-0123456789"
RATE = 8000
FAST = {"max_speed": 1000.0, "burst_s": 1000.0}  # tests that are not about pacing


class InProcessGateway:
    """The gateway app served by uvicorn (the CLI's WebSocket options and drain) in a
    thread, on a free loopback port."""

    def __init__(self, triton: str, api_key: str | None = None, **limits):
        from e2v.client.gateway.app import create_app
        from e2v.client.live.shutdown import DrainingServer, websocket_options

        from e2v.serve import free_ports

        self.port = free_ports(1)[0]
        key = api_key.encode() if api_key else None
        self.config = GatewayConfig(
            triton=triton, port=self.port, api_key=key, live=LiveLimits(**limits)
        )
        app = create_app(self.config)
        self.hub = app.state.gateway.live
        self.server = DrainingServer(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                loop="asyncio",
                log_level="warning",
                **websocket_options(self.config.live),
            ),
            self.hub,
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def ws(self, path: str = LIVE_PATH) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> InProcessGateway:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if http_status(self.url + "/ready") == 200:
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("in-process gateway not ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


def http_status(url: str, headers: dict | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("e2v_live") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def speech(seconds: float, channels: int = 1, encoding: str = "pcm_s16le") -> bytes:
    parts = [speech_like(seconds, RATE, seed=7 + i) for i in range(channels)]
    return encode(interleave(parts) if channels > 1 else parts[0], encoding)


def start(**fields) -> str:
    return json.dumps({"type": "start", "encoding": "pcm_s16le", "sample_rate": RATE} | fields)


async def drain(ws) -> list[dict]:
    """Every message until the server closes."""
    out = []
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in ws:
            out.append(json.loads(message))
    return out


async def refused(url: str, first: str | bytes | None = None, **connect) -> tuple[dict, int, str]:
    """Connect (and send `first`), then the last event and the close code and reason."""
    async with websockets.connect(url, open_timeout=10, **connect) as ws:
        if first is not None:
            with contextlib.suppress(websockets.ConnectionClosed):  # refused before it spoke
                await ws.send(first)
        events = await asyncio.wait_for(drain(ws), 30)
    assert events, "no error event before the close"
    return events[-1], ws.close_code, ws.close_reason


def assert_error(event: dict, code: int, close_code: int, kind: str | None = None) -> None:
    assert event["type"] == EVENT_ERROR, event
    assert event["code"] == code == close_code, (event, close_code)
    if kind is not None:
        assert event["error_kind"] == kind, event
    assert event["message"]


async def stream(ws, audio: bytes, chunk: int, pause_s: float = 0.0) -> None:
    for i in range(0, len(audio), chunk):
        await ws.send(audio[i : i + chunk])
        if pause_s:
            await asyncio.sleep(pause_s)
    await ws.send(json.dumps({"type": "stop"}))


@pytest.fixture(scope="module")
def gateway(tiny_server):
    """Fast pacing, a key, a short handshake and idle time."""
    with InProcessGateway(
        tiny_server.config.grpc_url, api_key=KEY, handshake_s=1.5, idle_s=1.5, **FAST
    ) as gateway:
        yield gateway


AUTH = {"additional_headers": {"Authorization": f"Bearer {KEY}"}}


# ------------------------------------------------------------------ a whole call


def test_a_stereo_call_gives_events_in_order_to_the_socket_and_subscribers(gateway):
    """40 s of two-party speech: started, utterance starts, interims, finals, summary last,
    close 1000; an SSE and a WebSocket subscriber that joined before the call got the
    same events in the same order."""
    audio = speech(40, channels=2)

    async def run():
        sse = asyncio.create_task(asyncio.to_thread(read_sse, gateway, "call-7"))
        sub = asyncio.create_task(subscribe_ws(gateway, "call-7"))
        await asyncio.sleep(0.5)  # both wait for the call
        async with websockets.connect(gateway.ws(), **AUTH) as ws:
            await ws.send(start(channels=2, call_id="call-7", hop_s=0.5))
            started = json.loads(await ws.recv())
            # 0.4 s every 20 ms: interims keep up (at full speed they would be stale)
            sender = asyncio.create_task(stream(ws, audio, RATE * 4 // 10, 0.02))
            events = await asyncio.wait_for(drain(ws), 120)
            await sender
            code = ws.close_code
        return started, events, code, await sse, await sub

    started, events, code, sse_events, ws_events = asyncio.run(run())
    assert started["type"] == "started" and started["call_id"] == "call-7"
    assert started["parties"] == ["customer", "agent"] and started["synthetic"] is True
    assert started["limits"]["max_message_bytes"] == 256 * 1024
    assert code == CLOSE_NORMAL
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == EVENT_SUMMARY and kinds.count(EVENT_SUMMARY) == 1
    for party in ("customer", "agent"):
        mine = [e for e in events if e["party"] == party]
        assert any(e["type"] == EVENT_UTTERANCE_START for e in mine)
        assert any(e["type"] == EVENT_RESULT and e["interim"] for e in mine)
        finals = [e for e in mine if e["type"] == EVENT_UTTERANCE_END]
        assert finals and all(e["emotion"] and e["scores"] for e in finals)
    summary = events[-1]
    assert {p["party"] for p in summary["parties"]} == {"customer", "agent"}
    assert summary["duration_s"] == pytest.approx(40, abs=0.01)
    assert all(e["call_id"] == "call-7" for e in events)
    assert sse_events == events
    assert ws_events == events


def read_sse(gateway, call_id: str, last_event_id: int | None = None) -> list[dict]:
    headers = {"X-API-Key": KEY}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    request = urllib.request.Request(
        gateway.url + CALL_EVENTS_PATH.format(call_id=call_id), headers=headers
    )
    events, kind = [], None
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == kind
                events.append(event)
    return events


async def subscribe_ws(gateway, call_id: str) -> list[dict]:
    url = gateway.ws(CALL_EVENTS_WS_PATH.format(call_id=call_id))
    async with websockets.connect(url, **AUTH) as ws:
        events = await asyncio.wait_for(drain(ws), 120)
        assert ws.close_code == CLOSE_NORMAL
    return events


def test_a_client_that_leaves_without_stop_still_gets_its_call_finished(gateway):
    """The socket closes mid-call: the finals and the summary still reach a subscriber."""

    async def run():
        sub = asyncio.create_task(subscribe_ws(gateway, "call-left"))
        await asyncio.sleep(0.3)
        async with websockets.connect(gateway.ws(), **AUTH) as ws:
            await ws.send(start(call_id="call-left"))
            await ws.recv()
            audio = speech(12)
            for i in range(0, len(audio), RATE):
                await ws.send(audio[i : i + RATE])
        return await asyncio.wait_for(sub, 60)

    events = asyncio.run(run())
    assert events[-1]["type"] == EVENT_SUMMARY
    assert any(e["type"] == EVENT_UTTERANCE_END for e in events)


def test_an_sse_client_reconnecting_with_last_event_id_gets_what_it_missed(gateway):
    async def run():
        async with websockets.connect(gateway.ws(), **AUTH) as ws:
            await ws.send(start(call_id="call-again", hop_s=0.5))
            await ws.recv()
            await ws.send(speech(6))
            seen = [json.loads(await ws.recv()) for _ in range(3)]
            sse = asyncio.create_task(asyncio.to_thread(read_sse, gateway, "call-again", 2))
            while metrics(gateway.url)["e2v_live_subscriptions"] < 1:
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "stop"}))
            events = seen + await asyncio.wait_for(drain(ws), 60)
        return events, await sse

    events, replayed = asyncio.run(run())
    assert replayed == [e for e in events if e["seq"] > 2]
    assert replayed[0]["seq"] == 3 and replayed[-1]["type"] == EVENT_SUMMARY


def calls_listing(gateway, query: str = "", headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        gateway.url + CALLS_PATH + query, headers={"X-API-Key": KEY} if headers is None else headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def feed(ws, audio: bytes, done: asyncio.Event, chunk: int = RATE) -> None:
    """Audio in 0.5 s (mono) messages, 10 a second, until `done` or its end."""
    for i in range(0, len(audio), chunk):
        if done.is_set():
            return
        await ws.send(audio[i : i + chunk])
        await asyncio.sleep(0.1)


def test_calls_lists_this_gateways_live_calls_without_a_bus(gateway):
    """The single-gateway default (no --bus): GET /v1/calls lists the calls live here, each
    party's latest final and the alerts fired; ?alerting=true; the key applies."""

    async def run():
        async with (
            websockets.connect(gateway.ws(), **AUTH) as quiet,
            websockets.connect(gateway.ws(), **AUTH) as loud,
        ):
            await quiet.send(start(call_id="calls-quiet"))
            labels = json.loads(await quiet.recv())["labels"]
            label = next(x for x in labels if not x.startswith(("unuse", "<")))
            await loud.send(start(call_id="calls-loud", channels=2, alerts=f"{label}=0.01"))
            await loud.recv()
            done = asyncio.Event()
            feeders = [
                asyncio.create_task(feed(quiet, speech(30), done)),
                asyncio.create_task(feed(loud, speech(30, channels=2), done)),
            ]
            kinds = set()
            while not {"alert", EVENT_UTTERANCE_END} <= kinds:
                kinds.add(json.loads(await asyncio.wait_for(loud.recv(), 30))["type"])
            listed = await asyncio.to_thread(calls_listing, gateway)
            alerting = await asyncio.to_thread(calls_listing, gateway, "?alerting=true")
            done.set()
            await asyncio.gather(*feeders)
            for ws in (quiet, loud):
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(drain(ws), 60)
        after = await asyncio.to_thread(calls_listing, gateway)
        return label, listed, alerting, after

    label, (status, body), (_, alerting), (_, after) = asyncio.run(run())
    assert status == 200 and body["fleet"] is False
    rows = {row["call_id"]: row for row in body["calls"]}
    assert [row["call_id"] for row in body["calls"]][:2] == ["calls-loud", "calls-quiet"]
    loud = rows["calls-loud"]
    assert (loud["protocol"], loud["parties"], loud["state"]) == (
        "live",
        ["customer", "agent"],
        "live",
    )
    assert loud["alerts"] and loud["alerts"][0]["label"] == label
    assert any(latest["emotion"] for latest in loud["latest"].values())
    assert rows["calls-quiet"]["alerts"] == [] and loud["replica"] == rows["calls-quiet"]["replica"]
    assert [row["call_id"] for row in alerting["calls"]] == ["calls-loud"]
    assert not {"calls-loud", "calls-quiet"} & {row["call_id"] for row in after["calls"]}
    assert calls_listing(gateway, headers={})[0] == 401
    assert calls_listing(gateway, "?alerting=maybe")[0] == 400


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    "connect, code",
    [
        ({}, CLOSE_POLICY),
        ({"additional_headers": {"Authorization": "Bearer wrong-key"}}, CLOSE_POLICY),
        ({"additional_headers": {"X-API-Key": KEY + "x"}}, CLOSE_POLICY),
        ({"additional_headers": {"X-API-Key": KEY}}, None),
        (AUTH, None),
        ({"query": f"?key={KEY}"}, None),
    ],
    ids=["missing", "wrong-bearer", "wrong-x-api-key", "x-api-key", "bearer", "query"],
)
def test_the_key_is_required_and_a_refusal_reaches_the_client(gateway, connect, code):
    connect = dict(connect)
    url = gateway.ws() + connect.pop("query", "")

    async def run():
        async with websockets.connect(url, **connect) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):  # refused before start
                await ws.send(start())
            first = json.loads(await ws.recv())
            rest = await asyncio.wait_for(drain(ws), 10) if code else []
            return first, rest, ws.close_code, ws.close_reason

    first, rest, close_code, reason = asyncio.run(run())
    if code is None:
        assert first["type"] == "started"
    else:
        assert_error(first, code, close_code, "unauthorized")
        assert "key" in reason.lower() and not rest


def test_a_key_in_the_query_never_reaches_the_log(tiny_server, tmp_path):
    """`?key=` (browsers) is taken out of the request before uvicorn logs the upgrade."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    gateway = GatewayProcess(
        tiny_server.config.grpc_url, "--api-key-file", str(key_file), "--log-level", "info"
    )
    with gateway.start(ready=True):
        url = gateway.url.replace("http://", "ws://") + LIVE_PATH + f"?key={KEY}&x=1"

        async def run():
            async with websockets.connect(url) as ws:
                await ws.send(start())
                return json.loads(await ws.recv())

        answer = asyncio.run(run())
        time.sleep(0.5)
        log = gateway.log_path.read_text(errors="replace")
    assert answer["type"] == "started"
    assert "/v1/live?x=1" in log and "[accepted]" in log, log[-2000:]
    assert KEY not in log


def test_subscriptions_need_the_key_in_a_header(gateway):
    path = gateway.url + CALL_EVENTS_PATH.format(call_id="c1")
    assert http_status(path) == 401
    assert http_status(path + f"?key={KEY}") == 401
    assert (
        http_status(gateway.url + CALL_EVENTS_PATH.format(call_id="bad%20id"), {"X-API-Key": KEY})
        == 400
    )
    event, code, _ = asyncio.run(refused(gateway.ws(CALL_EVENTS_WS_PATH.format(call_id="c1"))))
    assert_error(event, CLOSE_POLICY, code, "unauthorized")


# ------------------------------------------------------------------ bad input


BAD = {
    "not-json": "{start",
    "json-array": "[1, 2]",
    "no-type": json.dumps({"encoding": "mulaw"}),
    "audio-first": b"\x00\x01" * 80,
    "stop-first": json.dumps({"type": "stop"}),
    "unknown-encoding": start(encoding="opus"),
    "unknown-rate": start(sample_rate=44100),
    "rate-as-string": start(sample_rate="8000"),
    "three-channels": start(channels=3),
    "parties-mismatch": start(channels=2, parties=["only-one"]),
    "same-parties": start(channels=2, parties=["a", "a"]),
    "bad-call-id": start(call_id="../../etc/passwd"),
    "unknown-field": start(bogus=1),
    "window-too-long": start(window_s=60),
    "hop-nan": '{"type": "start", "encoding": "pcm_s16le", "sample_rate": 8000, "hop_s": NaN}',
    "bad-alerts": start(alerts="nobody:angry=2"),
}


@pytest.mark.parametrize("first", BAD.values(), ids=BAD.keys())
def test_malformed_or_out_of_order_first_messages_close_4400(gateway, first):
    event, code, reason = asyncio.run(refused(gateway.ws(), first, **AUTH))
    assert_error(event, CLOSE_BAD_MESSAGE, code)
    assert reason and len(reason.encode()) <= 123


@pytest.mark.parametrize(
    "second",
    [start(), json.dumps({"type": "pause"}), "not json", json.dumps({"type": 7})],
    ids=["start-again", "unknown-type", "not-json", "type-not-a-string"],
)
def test_bad_messages_mid_session_close_4400_after_the_events(gateway, second):
    async def run():
        async with websockets.connect(gateway.ws(), **AUTH) as ws:
            await ws.send(start())
            assert json.loads(await ws.recv())["type"] == "started"
            await ws.send(speech(1))
            await ws.send(second)
            events = await asyncio.wait_for(drain(ws), 20)
            return events, ws.close_code

    events, code = asyncio.run(run())
    assert_error(events[-1], CLOSE_BAD_MESSAGE, code)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_a_call_id_already_live_is_refused_4400(gateway):
    async def run():
        async with websockets.connect(gateway.ws(), **AUTH) as first:
            await first.send(start(call_id="call-twice"))
            assert json.loads(await first.recv())["type"] == "started"
            second = await refused(gateway.ws(), start(call_id="call-twice"), **AUTH)
            await first.send(json.dumps({"type": "stop"}))
            await drain(first)
            return second, first.close_code

    (event, code, _), first_code = asyncio.run(run())
    assert_error(event, CLOSE_BAD_MESSAGE, code, "call_in_use")
    assert first_code == CLOSE_NORMAL


def test_a_message_over_the_limit_closes_1009(gateway):
    limit = gateway.config.live.max_message_bytes

    async def run(size: int):
        async with websockets.connect(gateway.ws(), max_size=None, **AUTH) as ws:
            await ws.send(start())
            await ws.recv()
            await ws.send(b"\x00" * size)
            return await asyncio.wait_for(drain(ws), 20), ws.close_code

    events, code = asyncio.run(run(limit + 2))
    assert_error(events[-1], CLOSE_TOO_BIG, code, "too_big")
    # Past uvicorn's frame limit (4x) the WebSocket layer closes 1009 before buffering it.
    events, code = asyncio.run(run(gateway.config.live.frame_limit_bytes + 2))
    assert code == CLOSE_TOO_BIG
    # A text message over the limit too.
    event, code, _ = asyncio.run(refused(gateway.ws(), " " * (limit + 1), **AUTH))
    assert_error(event, CLOSE_TOO_BIG, code)


# ------------------------------------------------------------------ timeouts, pace


def test_no_start_within_the_handshake_timeout_closes_4408_and_frees_the_slot(tiny_server):
    """A socket that never speaks holds its slot for the handshake time only."""
    with InProcessGateway(tiny_server.config.grpc_url, sessions=2, handshake_s=1.0) as gw:

        async def run():
            silent = [await websockets.connect(gw.ws()) for _ in range(2)]
            busy = await refused(gw.ws(), start())
            began = time.monotonic()
            results = [await asyncio.wait_for(drain(ws), 10) for ws in silent]
            waited = time.monotonic() - began
            codes = [ws.close_code for ws in silent]
            async with websockets.connect(gw.ws()) as ws:
                await ws.send(start())
                admitted = json.loads(await ws.recv())
            return busy, results, codes, waited, admitted

        busy, results, codes, waited, admitted = asyncio.run(run())
    event, code, reason = busy
    assert_error(event, CLOSE_TRY_AGAIN, code, "busy")
    assert event["retry_after_s"] > 0 and "retry" in reason
    for events, code in zip(results, codes):
        assert_error(events[-1], CLOSE_TIMEOUT, code, "handshake")
    assert waited < 2.5
    assert admitted["type"] == "started"


def test_the_session_limit_refuses_with_1013_and_a_retry_hint_not_a_queue(tiny_server):
    with InProcessGateway(tiny_server.config.grpc_url, sessions=2, **FAST) as gw:

        async def run():
            open_ = []
            for _ in range(2):
                ws = await websockets.connect(gw.ws())
                await ws.send(start())
                assert json.loads(await ws.recv())["type"] == "started"
                open_.append(ws)
            began = time.monotonic()
            busy = await refused(gw.ws(), start())
            answered = time.monotonic() - began
            counts = metrics(gw.url)
            for ws in open_:
                await ws.send(json.dumps({"type": "stop"}))
                await drain(ws)
            return busy, answered, counts

        (event, code, _), answered, counts = asyncio.run(run())
    assert_error(event, CLOSE_TRY_AGAIN, code, "busy")
    assert event["retry_after_s"] > 0
    assert answered < 2  # refused at once, not queued
    assert counts["e2v_live_sessions"] == 2
    assert counts['e2v_live_refused_total{reason="busy"}'] == 1


def test_no_audio_for_the_idle_time_closes_4408(gateway):
    async def run():
        async with websockets.connect(gateway.ws(), **AUTH) as ws:
            await ws.send(start())
            await ws.recv()
            await ws.send(speech(0.5))
            began = time.monotonic()
            events = await asyncio.wait_for(drain(ws), 20)
            return events, ws.close_code, time.monotonic() - began

    events, code, waited = asyncio.run(run())
    assert_error(events[-1], CLOSE_TIMEOUT, code, "idle")
    assert 1.0 < waited < 5


def test_the_longest_session_closes_4408(tiny_server):
    with InProcessGateway(tiny_server.config.grpc_url, max_duration_s=2, **FAST) as gw:

        async def run():
            async with websockets.connect(gw.ws()) as ws:
                await ws.send(start())
                await ws.recv()
                audio, began = speech(10), time.monotonic()
                with contextlib.suppress(websockets.ConnectionClosed):
                    for i in range(0, len(audio), RATE // 5):
                        await ws.send(audio[i : i + RATE // 5])
                        await asyncio.sleep(0.2)
                events = await asyncio.wait_for(drain(ws), 20)
                return events, ws.close_code, time.monotonic() - began

        events, code, took = asyncio.run(run())
    assert_error(events[-1], CLOSE_TIMEOUT, code, "max_duration")
    assert took < 6


def test_audio_faster_than_the_allowed_speed_closes_4429(tiny_server):
    """2x real time after a 2 s burst: real-time 200 ms frames pass; a client sending as
    fast as it can is closed once it is 2 s ahead."""
    with InProcessGateway(tiny_server.config.grpc_url, max_speed=2.0, burst_s=2.0) as gw:

        async def run(pause_s: float, seconds: float):
            async with websockets.connect(gw.ws()) as ws:
                await ws.send(start())
                await ws.recv()
                with contextlib.suppress(websockets.ConnectionClosed):
                    await stream(ws, speech(seconds), RATE * 2 // 50, pause_s)  # 20 ms
                return await asyncio.wait_for(drain(ws), 30), ws.close_code

        events, code = asyncio.run(run(0.0, 10))
        assert_error(events[-1], CLOSE_TOO_FAST, code, "too_fast")
        sent_s = max((e["end_s"] or 0) for e in events)
        assert sent_s <= 4.5  # closed within the burst (2 s) plus what 2x allowed meanwhile
        events, code = asyncio.run(run(0.02, 3))  # real time: never refused
        assert code == CLOSE_NORMAL and events[-1]["type"] == EVENT_SUMMARY


# ------------------------------------------------------------------ slow readers


def test_a_client_that_stops_reading_is_closed_4409_and_its_work_stops(tiny_server):
    """Its socket's outbox overflows: the session ends at once (the slot is free, no more
    Triton work) while the client still reads nothing; when it reads again it finds the
    error event and 4409. So the test need not fill megabytes of kernel buffers first,
    the client's receive buffer and, once the session is open, the server socket's send
    buffer and asyncio write buffer are made small (the gateway's code is unchanged)."""
    limits = dict(outbox_events=8, outbox_bytes=4096, **FAST)
    ended_key = 'e2v_live_sessions_ended_total{code="4409",protocol="live"}'
    with InProcessGateway(tiny_server.config.grpc_url, **limits) as gw:

        async def run():
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before the window
            raw.connect(("127.0.0.1", gw.port))
            async with websockets.connect(gw.ws(), sock=raw, max_queue=1) as slow:
                await slow.send(start(channels=2, hop_s=0.5, window_s=1))
                await asyncio.sleep(0.3)
                shrink_server_buffers(gw)
                other = asyncio.create_task(other_call())
                audio, ended = speech(120, channels=2), None
                began = time.monotonic()
                with contextlib.suppress(websockets.ConnectionClosed):
                    for i in range(0, len(audio), 6400):  # 0.2 s every 20 ms
                        await slow.send(audio[i : i + 6400])
                        await asyncio.sleep(0.02)
                        if i % 64_000 == 0 and (ended := metrics(gw.url).get(ended_key)):
                            break
                took = time.monotonic() - began
                after = metrics(gw.url)
                ended = after.get(ended_key)
                events = await asyncio.wait_for(drain(slow), 30)  # within the 5 s flush
                return ended, took, after, events, slow.close_code, await other

        async def other_call():  # a reading client meanwhile is not slowed down
            async with websockets.connect(gw.ws()) as ws:
                await ws.send(start())
                await ws.recv()
                began = time.monotonic()
                await stream(ws, speech(6), RATE * 2 // 5, 0.02)
                events = await asyncio.wait_for(drain(ws), 30)
                return events, ws.close_code, time.monotonic() - began

        ended, took, after, events, code, (other_events, other_code, other_s) = asyncio.run(run())
    assert ended == 1, after
    assert took < 20
    assert after["e2v_live_calls"] == 0  # its work stopped (the slot goes with the close)
    assert_error(events[-1], CLOSE_SLOW_READER, code, "slow_reader")
    assert events[0]["type"] == "started"
    assert other_code == CLOSE_NORMAL and other_events[-1]["type"] == EVENT_SUMMARY
    assert other_s < 10


def test_a_subscriber_that_stops_reading_is_dropped_4409_and_the_call_goes_on(tiny_server):
    """A WebSocket subscriber with small buffers reads nothing: its own queue overflows and
    it is dropped; the call it watched ends normally with every event on its socket."""
    limits = dict(outbox_events=8, outbox_bytes=4096, **FAST)
    with InProcessGateway(tiny_server.config.grpc_url, **limits) as gw:

        async def run():
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            raw.connect(("127.0.0.1", gw.port))
            url = gw.ws(CALL_EVENTS_WS_PATH.format(call_id="call-watched"))
            async with websockets.connect(url, sock=raw, max_queue=1) as slow:
                await asyncio.sleep(0.3)
                shrink_server_buffers(gw)
                async with websockets.connect(gw.ws()) as ws:
                    await ws.send(start(call_id="call-watched", channels=2, hop_s=0.5))
                    await ws.recv()
                    began = time.monotonic()
                    # 3 s of sending: the dropped subscriber reads again within the
                    # gateway's 5 s flush of its queue, so it sees the error and the code.
                    sender = asyncio.create_task(stream(ws, speech(30, 2), 6400, 0.02))
                    events = await asyncio.wait_for(drain(ws), 120)
                    await sender
                    call = (events, ws.close_code, time.monotonic() - began)
                dropped = await asyncio.wait_for(drain(slow), 30)
                return call, dropped, slow.close_code

        (events, code, took), dropped, slow_code = asyncio.run(run())
    assert code == CLOSE_NORMAL and events[-1]["type"] == EVENT_SUMMARY
    assert len(events) > 20 and took < 30
    assert_error(dropped[-1], CLOSE_SLOW_READER, slow_code, "slow_reader")
    assert len(dropped) < len(events)


def shrink_server_buffers(gw: InProcessGateway) -> None:
    """Small kernel send buffers and asyncio write limits on the gateway's open sockets."""
    for connection in list(gw.server.server_state.connections):
        transport = getattr(connection, "transport", None)
        if transport is None or transport.is_closing():
            continue
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        connection.loop.call_soon_threadsafe(transport.set_write_buffer_limits, 4096)


# ------------------------------------------------------------------ drain


def test_sigterm_drains_live_sessions_then_closes_them_with_1001(tiny_server):
    """`e2v gateway` gets SIGTERM with two calls live: /ready turns 503 and new sessions are
    refused with 1001 at once; a call that stops within the drain time ends normally; the
    other is scored and closed with 1001 and a reason to reconnect elsewhere at the
    deadline; the process then exits."""
    gateway = GatewayProcess(
        tiny_server.config.grpc_url, "--live-drain-s", "3", "--live-max-speed", "1000"
    )
    with gateway.start(ready=True):
        ws_url = gateway.url.replace("http://", "ws://") + LIVE_PATH

        async def call(name: str, stop_after_s: float | None):
            async with websockets.connect(ws_url) as ws:
                await ws.send(start(call_id=name))
                await ws.recv()
                audio, began = speech(30), time.monotonic()
                with contextlib.suppress(websockets.ConnectionClosed):
                    for i in range(0, len(audio), RATE // 5):
                        await ws.send(audio[i : i + RATE // 5])
                        await asyncio.sleep(0.1)
                        if stop_after_s and time.monotonic() - began > stop_after_s:
                            await ws.send(json.dumps({"type": "stop"}))
                            break
                events = await asyncio.wait_for(drain(ws), 60)
                return events, ws.close_code, ws.close_reason, time.monotonic() - began

        async def run():
            stopping = asyncio.create_task(call("stops", 2.0))
            going = asyncio.create_task(call("goes-on", None))
            await asyncio.sleep(1.0)
            sigterm_at = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            ready = await asyncio.to_thread(http_status, gateway.url + "/ready")
            late = await refused(ws_url, start())
            done = [await stopping, await going]
            exit_code = await asyncio.to_thread(gateway.process.wait, 30)
            return ready, late, done, exit_code, time.monotonic() - sigterm_at

        ready, late, done, exit_code, took = asyncio.run(run())
    assert ready == 503
    event, code, reason = late
    assert_error(event, CLOSE_GOING_AWAY, code, "draining")
    (stop_events, stop_code, _, _), (go_events, go_code, go_reason, _) = done
    assert stop_code == CLOSE_NORMAL and stop_events[-1]["type"] == EVENT_SUMMARY
    assert_error(go_events[-1], CLOSE_GOING_AWAY, go_code, "going_away")
    assert "reconnect" in go_reason
    assert go_events[-2]["type"] == EVENT_SUMMARY  # what it heard was scored first
    # uvicorn re-raises the SIGTERM it caught once it has shut down (the default action).
    assert exit_code in (0, -signal.SIGTERM)
    assert took < 3 + 10  # the drain deadline bounds the shutdown


# ------------------------------------------------------------------ Triton restart


def test_a_triton_restart_mid_call_loses_no_final_end_to_end(tiny_cpu_repo):
    """tritonserver killed mid-call and started again on the same ports: every final
    comes through /v1/live, the same utterances as a call with Triton up throughout."""
    from servers import start_server

    from e2v.serve import TritonServer

    server = start_server(tiny_cpu_repo)
    restarted = {}
    audio = speech(45)

    async def call(url: str, between=None) -> list[dict]:
        async with websockets.connect(url) as ws:
            await ws.send(start())
            await ws.recv()
            step = RATE * 2 // 2  # 0.5 s
            for i in range(0, len(audio), step):
                await ws.send(audio[i : i + step])
                await asyncio.sleep(0.01)
                if between:
                    await between(i / len(audio))
            await ws.send(json.dumps({"type": "stop"}))
            events = await asyncio.wait_for(drain(ws), 180)
            assert ws.close_code == CLOSE_NORMAL, events[-1]
            return events

    async def between(fraction: float) -> None:
        if fraction > 0.3 and "down" not in restarted:
            restarted["down"] = True
            await asyncio.to_thread(server.kill)
        elif fraction > 0.9 and "server" not in restarted:
            await asyncio.sleep(1.0)
            restarted["server"] = await asyncio.to_thread(TritonServer(server.config).start, 240)

    try:
        with InProcessGateway(server.config.grpc_url, idle_s=600, **FAST) as gw:
            steady = asyncio.run(call(gw.ws()))
            events = asyncio.run(call(gw.ws(), between))
            retries = metrics(gw.url)["e2v_live_final_retries_total"]
    finally:
        server.kill()
        if "server" in restarted:
            restarted["server"].stop()

    def finals(got):
        return [(e["start_s"], e["end_s"]) for e in got if e["type"] == EVENT_UTTERANCE_END]

    assert finals(events) == finals(steady) and len(finals(events)) >= 2
    assert all(e["emotion"] for e in events if e["type"] == EVENT_UTTERANCE_END)
    # Whether a final came due while Triton was down depends on how far the VAD had got
    # (it failed here on a quiet machine): tests/test_live_engine.py's restart test asserts
    # the retries; this one asserts that the gateway's finals survive a real restart.
    print(f"final retries during the restart: {retries:g}")
    assert re.fullmatch(r"call-[0-9a-f]{16}", events[0]["call_id"])
    assert np.isfinite(events[-1]["duration_s"])
