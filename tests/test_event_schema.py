"""docs/events.schema.json: the event a consumer of the bus (or a subscriber, or a webhook)
reads, checked against contract and against the events of a real call through a real
gateway (the tiny Triton server), alerts and an error included."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from e2v.contract import LIVE_EVENT_TYPES, LIVE_PATH

jsonschema = pytest.importorskip("jsonschema")
websockets = pytest.importorskip("websockets")

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[1] / "docs" / "events.schema.json").read_text()
)
RATE = 8000


def validator():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


def test_schema_names_every_event_type_of_the_contract():
    assert tuple(SCHEMA["properties"]["type"]["enum"]) == LIVE_EVENT_TYPES


def test_schema_refuses_what_is_not_an_event():
    check = validator()
    good = {
        "type": "error",
        "call_id": "c",
        "seq": 1,
        "party": None,
        "start_s": None,
        "end_s": None,
        "code": 4400,
        "error_kind": "bad_message",
        "message": "m",
    }
    assert check.is_valid(good)
    for broken in (
        {**good, "seq": 0},
        {**good, "type": "nope"},
        {**good, "call_id": "a b"},
        {k: v for k, v in good.items() if k != "error_kind"},
    ):
        assert not check.is_valid(broken), broken


def test_a_real_calls_events_match_the_schema(tiny_server):
    from e2v.client.live.codecs import encode
    from e2v.loadtest.gateway_process import GatewayProcess
    from e2v.loadtest.synth import speech_like

    audio = encode(speech_like(12, RATE, seed=3), "pcm_s16le")
    start = {
        "type": "start",
        "encoding": "pcm_s16le",
        "sample_rate": RATE,
        "call_id": "s1",
        "hop_s": 0.5,
        "alerts": ",".join(f"{label}=0.01" for label in ("angry", "happy", "neutral", "sad")),
    }

    async def call(url: str, first: dict, audio: bytes, then: str) -> list[dict]:
        events = []
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps(first))
            await ws.recv()  # started
            for i in range(0, len(audio), 2 * RATE // 5):  # 0.2 s every 20 ms: 10x
                await ws.send(audio[i : i + 2 * RATE // 5])
                await asyncio.sleep(0.02)
            await ws.send(then)
            with contextlib.suppress(websockets.ConnectionClosed):  # 4400 for the bad one
                async for message in ws:
                    events.append(json.loads(message))
        return events

    with GatewayProcess(tiny_server.config.grpc_url, "--live-max-speed", "20") as gateway:
        url = gateway.url.replace("http://", "ws://") + LIVE_PATH
        stop = json.dumps({"type": "stop"})
        good = asyncio.run(asyncio.wait_for(call(url, start, audio, stop), 120))
        bad = asyncio.run(
            asyncio.wait_for(
                call(url, start | {"call_id": "s2"}, audio[:RATE], '{"type": "start"}'), 60
            )
        )
    check = validator()
    for event in good + bad:
        errors = [e.message for e in check.iter_errors(event)]
        assert not errors, (event, errors)
    kinds = {e["type"] for e in good + bad}
    assert kinds == set(LIVE_EVENT_TYPES), kinds  # every type was seen and checked
