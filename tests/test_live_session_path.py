"""The one session path of live sockets (client/live/connection.py), over real sockets in
front of the real tritonserver: a call of each protocol makes a handful of tasks whatever
its number of messages (the session's own work), and the live tier imports nothing of the
gateway (it is handed `LiveServices`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid

import pytest

websockets = pytest.importorskip("websockets")
pytest.importorskip("uvicorn")

from e2v.client.live.codecs import encode, interleave  # noqa: E402
from e2v.loadtest.synth import speech_like  # noqa: E402
from test_live_gateway import FAST, InProcessGateway, drain  # noqa: E402

from e2v.contract import AUDIOHOOK_PATH, LIVE_PATH, TWILIO_PATH  # noqa: E402

RATE = 8000
FRAME = 160  # 20 ms of 8 kHz mu-law per channel: Twilio's packet, the chattiest case
SECONDS = 8


class CountingGateway(InProcessGateway):
    """The in-process gateway on an event loop that counts the tasks it creates."""

    def __init__(self, *args, **limits):
        super().__init__(*args, **limits)
        self.tasks = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_task_factory(self._task)
        try:
            loop.run_until_complete(self.server.serve())
        finally:
            loop.close()

    def _task(self, loop, coro, **kwargs):
        self.tasks += 1
        return asyncio.Task(coro, loop=loop, **kwargs)


def tracks() -> tuple[bytes, bytes]:
    """Two parties of speech-like mu-law, SECONDS long."""
    parts = [speech_like(SECONDS, RATE, seed=11 + i) for i in range(2)]
    return encode(parts[0], "mulaw"), encode(parts[1], "mulaw")


def stereo() -> bytes:
    """The two parties interleaved sample by sample (one byte each)."""
    parts = [speech_like(SECONDS, RATE, seed=11 + i) for i in range(2)]
    return encode(interleave(parts), "mulaw")


async def native_call(gw: InProcessGateway) -> tuple[int, str]:
    """Stereo frames of 20 ms; the summary and close 1000."""
    audio = stereo()
    start = {"type": "start", "encoding": "mulaw", "sample_rate": RATE, "channels": 2}
    async with websockets.connect(gw.ws(LIVE_PATH), open_timeout=10) as ws:
        await ws.send(json.dumps(start))
        for i in range(0, len(audio), 2 * FRAME):
            await ws.send(audio[i : i + 2 * FRAME])
        await ws.send(json.dumps({"type": "stop"}))
        events = await asyncio.wait_for(drain(ws), 120)
    return len(audio) // (2 * FRAME), events[-1]["type"]


async def twilio_call(gw: InProcessGateway) -> tuple[int, str]:
    """A media message per track every 20 ms of audio; close 1000 (nothing comes back)."""
    inbound, outbound = tracks()
    stream_sid, sequence = "MZ" + uuid.uuid4().hex, 0

    def message(event: str, body: dict) -> str:
        nonlocal sequence
        sequence += 1
        return json.dumps(
            {"event": event, "sequenceNumber": str(sequence), "streamSid": stream_sid, event: body}
        )

    start = {
        "streamSid": stream_sid,
        "callSid": "CA" + uuid.uuid4().hex,
        "tracks": ["inbound", "outbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
    }
    sent = 0
    async with websockets.connect(gw.ws(TWILIO_PATH), open_timeout=10) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(message("start", start))
        for n, at in enumerate(range(0, len(inbound), FRAME)):
            for track, audio in (("inbound", inbound), ("outbound", outbound)):
                payload = base64.b64encode(audio[at : at + FRAME]).decode()
                media = {"track": track, "chunk": str(n + 1), "timestamp": str(at // 8)}
                await ws.send(message("media", media | {"payload": payload}))
                sent += 1
        await ws.send(message("stop", {}))
        await asyncio.wait_for(drain(ws), 120)
    return sent, f"{ws.close_code} {ws.close_reason}"


async def audiohook_call(gw: InProcessGateway) -> tuple[int, str]:
    """`open`, stereo PCMU frames of 20 ms, `close`: the events, `closed`."""
    audio = stereo()
    session, org, seq = str(uuid.uuid4()), str(uuid.uuid4()), 0

    def message(kind: str, parameters: dict, serverseq: int) -> str:
        nonlocal seq
        seq += 1
        return json.dumps(
            {
                "version": "2",
                "id": session,
                "type": kind,
                "seq": seq,
                "serverseq": serverseq,
                "position": "PT0S",
                "parameters": parameters,
            }
        )

    media = {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": RATE}
    headers = {"Audiohook-Session-Id": session, "Audiohook-Organization-Id": org}
    opening = {
        "organizationId": org,
        "conversationId": str(uuid.uuid4()),
        "participant": {"id": str(uuid.uuid4()), "ani": "", "aniName": "", "dnis": ""},
        "media": [media],
    }
    async with websockets.connect(
        gw.ws(AUDIOHOOK_PATH), additional_headers=headers, open_timeout=10
    ) as ws:
        await ws.send(message("open", opening, 0))
        opened = json.loads(await ws.recv())
        assert opened["type"] == "opened", opened
        for i in range(0, len(audio), 2 * FRAME):
            await ws.send(audio[i : i + 2 * FRAME])
        await ws.send(message("close", {"reason": "end"}, opened["seq"]))
        kinds = []
        while not kinds or kinds[-1] != "closed":
            answer = json.loads(await asyncio.wait_for(ws.recv(), 120))
            kinds.append(answer["type"])
            if answer["type"] == "event":
                kinds.append(answer["parameters"]["entities"][0]["data"]["type"])
    return len(audio) // (2 * FRAME), kinds[-2]


@pytest.mark.parametrize(
    "protocol, call, ending",
    [
        ("live", native_call, "summary"),
        ("twilio", twilio_call, "1000 done"),
        ("audiohook", audiohook_call, "summary"),
    ],
)
def test_no_protocol_makes_a_task_per_message(tiny_server, protocol, call, ending):
    """Hundreds of 20 ms messages; the tasks made while the call lasts are the session's
    own (socket reader and writer, audio worker, finals, interim windows, finish), far
    fewer than its messages."""
    with CountingGateway(tiny_server.config.grpc_url, **FAST) as gw:
        before = gw.tasks
        messages, ended = asyncio.run(call(gw))
        made = gw.tasks - before
    assert ended == ending
    assert messages >= 400
    assert made < messages / 4, f"{protocol}: {made} tasks for {messages} messages"


# `e2v live`, the client that plays calls into a gateway, is another application that
# shares the package; the server side is what the gateway builds.
CLIENT_SIDE = {"e2v.client.live.player"}


def test_the_live_tier_imports_nothing_of_the_gateway():
    """The gateway builds the live tier and hands it `LiveServices`; nothing of the server
    side of client/live/ imports client/gateway/ (lazy imports count)."""
    from test_structure import graph

    edges = graph()
    reaching = {
        module: sorted(t for t in targets if t.startswith("e2v.client.gateway"))
        for module, targets in edges.items()
        if module.startswith("e2v.client.live") and module not in CLIENT_SIDE
    }
    assert {m: t for m, t in reaching.items() if t} == {}
