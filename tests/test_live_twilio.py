"""`/v1/twilio` over real sockets: a real gateway in front of the real tritonserver, a Python
client sending Twilio-shaped Media Streams messages from a stereo mu-law recording, and a
Server-Sent Events subscriber receiving the call's events (nothing comes back on the Twilio
socket). synthetic:tiny's labels mean nothing: the protocol and event shapes are checked.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from e2v.loadtest.gateway_process import GatewayProcess

from e2v.contract import (
    CALL_EVENTS_PATH,
    CLOSE_BAD_MESSAGE,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TOO_FAST,
    TWILIO_PATH,
)

pytest.importorskip("fastapi", reason="the gateway extra is not installed")
websockets = pytest.importorskip("websockets.sync.client")

ROOT = Path(__file__).resolve().parent.parent
CALL = ROOT / "samples" / "call-8k-stereo.wav"
API_KEY = "twilio-test-key-7f3a"
CHUNK = 160  # 20 ms of mu-law at 8 kHz, as Twilio sends
SPEED = 1.8  # under the gateway's default 2x


@pytest.fixture(scope="module")
def gateway(tiny_server, tmp_path_factory):
    key = tmp_path_factory.mktemp("twilio-key") / "key"
    key.write_text(API_KEY)
    with GatewayProcess(tiny_server.config.grpc_url, "--api-key-file", str(key)) as process:
        yield process


def tracks() -> tuple[bytes, bytes]:
    """The sample call's two mu-law channels (WAV format 7, interleaved): inbound
    (customer, left) and outbound (agent, right)."""
    data = CALL.read_bytes()
    start = data.index(b"data") + 8
    size = int.from_bytes(data[start - 4 : start], "little")
    body = data[start : start + size]
    return body[0::2], body[1::2]


class TwilioClient:
    """Sends what Twilio sends; the socket's close code and reason are what we check."""

    def __init__(self, process: GatewayProcess, headers: dict | None = None):
        self.url = process.url.replace("http://", "ws://") + TWILIO_PATH
        self._connection = websockets.connect(
            self.url, additional_headers=headers or {}, open_timeout=10, max_size=None
        )
        self.ws = self._connection.__enter__()
        self.sequence = 0
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.call_sid = "CA" + uuid.uuid4().hex

    def __enter__(self) -> TwilioClient:
        return self

    def __exit__(self, *exc) -> None:
        self._connection.__exit__(*exc)

    def send(self, event: str, body: dict | None = None, **fields) -> None:
        message = {"event": event}
        if event == "connected":
            message |= {"protocol": "Call", "version": "1.0.0"}
        else:
            self.sequence += 1
            message |= {"sequenceNumber": str(self.sequence), "streamSid": self.stream_sid}
            if body is not None:
                message[event] = body
        self.ws.send(json.dumps(message | fields))

    def start(self, tracks=("inbound", "outbound"), **custom) -> None:
        self.send("connected")
        self.send(
            "start",
            {
                "streamSid": self.stream_sid,
                "accountSid": "AC" + uuid.uuid4().hex,
                "callSid": self.call_sid,
                "tracks": list(tracks),
                "customParameters": {"api_key": API_KEY, **custom},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )

    def media(self, track: str, chunk: int, timestamp_ms: int, payload: bytes) -> None:
        self.send(
            "media",
            {
                "track": track,
                "chunk": str(chunk),
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(payload).decode(),
            },
        )

    def play(self, inbound: bytes, outbound: bytes, skip_outbound_s: float = 0.0) -> None:
        """Both tracks in 20 ms chunks at SPEED times real time; the outbound track sends
        nothing for its first `skip_outbound_s` (Twilio's timestamps say where it resumes)."""
        started = time.monotonic()
        for n, at in enumerate(range(0, min(len(inbound), len(outbound)), CHUNK)):
            timestamp_ms = at // 8
            self.media("inbound", n + 1, timestamp_ms, inbound[at : at + CHUNK])
            if timestamp_ms >= skip_outbound_s * 1000:
                self.media("outbound", n + 1, timestamp_ms, outbound[at : at + CHUNK])
            ahead = timestamp_ms / 1000 / SPEED - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def close_code(self, timeout: float = 15) -> tuple[int | None, str]:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                message = self.ws.recv(timeout=timeout)
                raise AssertionError(f"Twilio got a message back: {message!r}")
        except ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


class Subscriber(threading.Thread):
    """GET /v1/calls/{call_id}/events (Server-Sent Events) until the summary."""

    def __init__(self, process: GatewayProcess, call_id: str):
        super().__init__(daemon=True)
        self.process, self.call_id = process, call_id
        self.events: list[dict] = []
        self.error: Exception | None = None

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.process.port, timeout=60)
        try:
            path = CALL_EVENTS_PATH.format(call_id=self.call_id)
            connection.request("GET", path, headers={"X-API-Key": API_KEY})
            response = connection.getresponse()
            assert response.status == 200, response.status
            for line in response:
                if line.startswith(b"data: "):
                    self.events.append(json.loads(line[6:]))
                    if self.events[-1]["type"] in ("summary", "error"):
                        return
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            connection.close()

    def result(self, timeout: float = 60) -> list[dict]:
        self.join(timeout)
        assert not self.is_alive(), "no summary in time"
        if self.error is not None:
            raise self.error
        return self.events


def stream_call(gateway, skip_outbound_s: float = 0.0) -> list[dict]:
    inbound, outbound = tracks()
    with TwilioClient(gateway) as client:
        subscriber = Subscriber(gateway, client.call_sid)
        subscriber.start()
        client.start(window_s="2", hop_s="1")
        client.play(inbound, outbound, skip_outbound_s)
        client.send("mark", {"name": "end-of-prompt"})
        client.send("dtmf", {"track": "inbound_track", "digit": "5"})
        client.send("stop", {"accountSid": "AC1", "callSid": client.call_sid})
        events = subscriber.result()
        assert client.close_code() == (1000, "done")
    return events


def finals(events: list[dict], party: str) -> list[tuple[float, float]]:
    return [
        (e["start_s"], e["end_s"])
        for e in events
        if e["type"] == "utterance.end" and e["party"] == party
    ]


def test_both_tracks_reach_a_subscriber_and_a_silent_leg_keeps_its_clock(gateway):
    events = stream_call(gateway)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "summary" and "result" in kinds, kinds
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["call_id"] for e in events} == {events[0]["call_id"]}
    caller, callee = finals(events, "caller"), finals(events, "callee")
    assert caller and callee, events
    summary = events[-1]
    assert [p["party"] for p in summary["parties"]] == ["caller", "callee"]
    assert 22 < summary["duration_s"] < 24
    # The outbound leg silent (no packets) for its first 6 s: its timestamps put the rest
    # where it was, so the callee's later utterances keep their times.
    gapped = finals(stream_call(gateway, skip_outbound_s=6.0), "callee")
    later = [u for u in callee if u[0] > 6.5]
    moved = [u for u in gapped if u[0] > 6.5]
    assert later and len(moved) == len(later), (later, moved)
    # Within two VAD frames (the VAD's state differs after silence instead of speech).
    assert all(abs(a - b) <= 0.064 for u, v in zip(later, moved) for a, b in zip(u, v))


def _bad_cases():
    inbound = b"\xff" * CHUNK
    return {
        "media_before_start": (
            lambda c: c.send(
                "media",
                {
                    "track": "inbound",
                    "chunk": "1",
                    "timestamp": "0",
                    "payload": base64.b64encode(inbound).decode(),
                },
            ),
            CLOSE_BAD_MESSAGE,
            "media before start",
        ),
        "unknown_track": (
            lambda c: (c.start(), c.media("sideways", 1, 0, inbound)),
            CLOSE_BAD_MESSAGE,
            "track",
        ),
        "bad_base64": (
            lambda c: (
                c.start(),
                c.send(
                    "media", {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "%%%"}
                ),
            ),
            CLOSE_BAD_MESSAGE,
            "base64",
        ),
        "sequence_gap": (
            lambda c: (
                c.start(),
                setattr(c, "sequence", c.sequence + 1),
                c.media("inbound", 1, 0, inbound),
            ),
            CLOSE_BAD_MESSAGE,
            "out of order",
        ),
        "other_stream": (
            lambda c: (
                c.start(),
                setattr(c, "stream_sid", "MZother"),
                c.media("inbound", 1, 0, inbound),
            ),
            CLOSE_BAD_MESSAGE,
            "streamSid",
        ),
        "wrong_format": (
            lambda c: (
                c.send("connected"),
                c.send(
                    "start",
                    {
                        "streamSid": c.stream_sid,
                        "callSid": c.call_sid,
                        "tracks": ["inbound"],
                        "customParameters": {"api_key": API_KEY},
                        "mediaFormat": {
                            "encoding": "audio/l16",
                            "sampleRate": 16000,
                            "channels": 1,
                        },
                    },
                ),
            ),
            CLOSE_BAD_MESSAGE,
            "mediaFormat",
        ),
        "second_start": (lambda c: (c.start(), c.start()), CLOSE_BAD_MESSAGE, "start"),
        "unknown_event": (lambda c: c.send("hello", {}), CLOSE_BAD_MESSAGE, "unknown event"),
        "binary": (lambda c: c.ws.send(inbound), CLOSE_BAD_MESSAGE, "JSON text"),
        "not_json": (lambda c: c.ws.send("{oops"), CLOSE_BAD_MESSAGE, "not JSON"),
        "bad_setting": (lambda c: c.start(hop_s="fast"), CLOSE_BAD_MESSAGE, "numbers"),
        "too_big": (
            lambda c: (c.start(), c.media("inbound", 1, 0, b"\xff" * (300 * 1024))),
            CLOSE_TOO_BIG,
            "limit",
        ),
        "ahead_of_time": (
            lambda c: (c.start(), c.media("inbound", 1, 3_600_000, inbound)),
            CLOSE_TOO_FAST,
            "ahead of real time",
        ),
        "wrong_key": (lambda c: c.start(api_key="nope"), CLOSE_POLICY, "wrong API key"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_input_closes_with_a_code_and_reason(gateway, case):
    action, code, reason = _bad_cases()[case]
    with TwilioClient(gateway) as client:
        action(client)
        got_code, got_reason = client.close_code()
    assert got_code == code and reason in got_reason, (got_code, got_reason)


def test_missing_key_is_refused_and_a_header_key_counts(gateway):
    with TwilioClient(gateway) as client:
        client.send("connected")
        client.send(
            "start",
            {
                "streamSid": client.stream_sid,
                "callSid": client.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )
        assert client.close_code()[0] == CLOSE_POLICY
    with TwilioClient(gateway, headers={"X-API-Key": API_KEY}) as client:
        client.send("connected")
        client.send(
            "start",
            {
                "streamSid": client.stream_sid,
                "callSid": client.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )
        client.media("inbound", 1, 0, b"\xff" * CHUNK)
        client.send("stop", {"callSid": client.call_sid})
        assert client.close_code() == (1000, "done")


@pytest.fixture(scope="module")
def quick_gateway(tiny_server, tmp_path_factory):
    key = tmp_path_factory.mktemp("twilio-quick-key") / "key"
    key.write_text(API_KEY)
    process = GatewayProcess(
        tiny_server.config.grpc_url,
        "--api-key-file",
        str(key),
        "--live-handshake-s",
        "1",
        "--live-idle-s",
        "1.5",
    )
    with process:
        yield process


def test_no_start_in_time_and_no_media_time_out(quick_gateway):
    from e2v.contract import CLOSE_TIMEOUT

    with TwilioClient(quick_gateway) as client:
        client.send("connected")
        code, reason = client.close_code()
        assert code == CLOSE_TIMEOUT and "no start message within 1 s" in reason
    with TwilioClient(quick_gateway) as client:
        client.start()
        client.media("inbound", 1, 0, b"\xff" * CHUNK)
        code, reason = client.close_code()
        assert code == CLOSE_TIMEOUT and "no media for 1.5 s" in reason


def test_the_summary_of_a_twilio_call_is_a_signed_webhook(tiny_server, tmp_path):
    """No subscriber at all: the call's summary reaches a real HTTP receiver, signed."""
    import http.server

    from e2v.client.webhooks import verify

    from e2v.contract import WEBHOOK_SIGNATURE_HEADER

    secret = "s" * 32
    (tmp_path / "key").write_text(API_KEY)
    (tmp_path / "secret").write_text(secret)
    received: list[tuple[dict, bool]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            signed = verify(secret.encode(), self.headers[WEBHOOK_SIGNATURE_HEADER], body)
            received.append((json.loads(body), signed))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    process = GatewayProcess(
        tiny_server.config.grpc_url,
        "--api-key-file",
        str(tmp_path / "key"),
        "--webhook",
        f"http://127.0.0.1:{server.server_address[1]}/hook",
        "--webhook-secret-file",
        str(tmp_path / "secret"),
    )
    try:
        with process, TwilioClient(process) as client:
            inbound, outbound = tracks()
            client.start()
            client.play(inbound[: 8000 * 6], outbound[: 8000 * 6])
            client.send("stop", {"callSid": client.call_sid})
            assert client.close_code() == (1000, "done")
            deadline = time.monotonic() + 20
            while not any(e["type"] == "summary" for e, _ in received):
                assert time.monotonic() < deadline, received
                time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    (summary, signed), *_ = [(e, s) for e, s in received if e["type"] == "summary"]
    assert signed and summary["call_id"] == client.call_sid
    assert [p["party"] for p in summary["parties"]] == ["caller", "callee"]


def test_drain_scores_the_call_for_its_subscriber(tiny_server, tmp_path):
    """SIGTERM mid-call: past --live-drain-s the session is scored (finals, summary) for
    the subscriber, then the Twilio socket is closed."""
    import signal

    (tmp_path / "key").write_text(API_KEY)
    process = GatewayProcess(
        tiny_server.config.grpc_url, "--api-key-file", str(tmp_path / "key"), "--live-drain-s", "2"
    )
    with process, TwilioClient(process) as client:
        subscriber = Subscriber(process, client.call_sid)
        subscriber.start()
        inbound, outbound = tracks()
        client.start()
        client.play(inbound[: 8000 * 5], outbound[: 8000 * 5])
        process.process.send_signal(signal.SIGTERM)
        events = subscriber.result(timeout=30)
        code, _ = client.close_code(timeout=30)
    kinds = [e["type"] for e in events]
    assert "utterance.end" in kinds and "summary" in kinds, kinds
    assert code in (1001, 1012), code  # going away (1012 if uvicorn's shutdown came first)
