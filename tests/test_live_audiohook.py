"""`/v1/audiohook` over real sockets: a real gateway in front of the real tritonserver,
driven by the AudioHook reference implementation's own TypeScript client and by a Python
client that speaks the protocol badly on purpose. synthetic:tiny's labels mean nothing:
only the protocol and the event shapes are checked here.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
from e2v.loadtest.gateway_process import GatewayProcess

from e2v.contract import (
    AUDIOHOOK_ENTITY_TYPE,
    AUDIOHOOK_PATH,
    CLOSE_BAD_MESSAGE,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
)

pytest.importorskip("fastapi", reason="the gateway extra is not installed")
websockets = pytest.importorskip("websockets.sync.client")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import audiohook_reference  # noqa: E402

CALL = ROOT / "samples" / "call-8k-stereo.wav"
API_KEY = "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh"  # the protocol documentation's sample key
SECRET = "TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU="  # ...and client secret


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("audiohook-keys")
    (folder / "key").write_text(API_KEY + "\n")
    (folder / "secret").write_text(SECRET + "\n")
    return folder / "key", folder / "secret"


@pytest.fixture(scope="module")
def gateway(tiny_server, keys):
    """API key, no client secret: what the Python protocol client talks to."""
    with GatewayProcess(tiny_server.config.grpc_url, "--api-key-file", str(keys[0])) as process:
        yield process


@pytest.fixture(scope="module")
def signed_gateway(tiny_server, keys):
    """API key and client secret: upgrades must carry the HTTP message signature."""
    process = GatewayProcess(
        tiny_server.config.grpc_url,
        "--api-key-file",
        str(keys[0]),
        "--audiohook-secret-file",
        str(keys[1]),
    )
    with process:
        yield process


def ws_url(process: GatewayProcess) -> str:
    return process.url.replace("http://", "ws://") + AUDIOHOOK_PATH


# ----------------------------------------------------------------- the reference client


@pytest.fixture(scope="module")
def reference_client():
    missing = audiohook_reference.available()
    if missing is not None:
        if shutil.which("npm") is None and not _in_ci():
            pytest.skip(f"the reference client needs {missing}")
        pytest.fail(f"the reference client needs {missing}")
    audiohook_reference.install()
    return audiohook_reference


def _in_ci() -> bool:
    import os

    return bool(os.environ.get("CI"))


def event_messages(log: str) -> list[dict]:
    """The parameters of every `Event message` line the reference client logged."""
    found = []
    for match in re.finditer(r"Event message: (\{.*?\n\})", log, re.S):
        found.append(json.loads(match.group(1)))
    return found


def test_reference_client_streams_a_call_and_logs_our_events(signed_gateway, reference_client):
    code, log = reference_client.run(ws_url(signed_gateway), CALL, API_KEY, SECRET)
    assert code == 0, log[-3000:]
    assert "Session open!" in log, log[-3000:]
    assert '"channels":["external","internal"]' in log  # stereo chosen from the offers
    assert "Session closed" in log and "WARN" not in log, log[-3000:]
    events = [e["data"] for m in event_messages(log) for e in m["entities"]]
    assert {e["type"] for m in event_messages(log) for e in m["entities"]} == {
        AUDIOHOOK_ENTITY_TYPE
    }
    kinds = [e["type"] for e in events]
    assert kinds.count("utterance.end") >= 2 and kinds[-1] == "summary", kinds
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["party"] for e in events if e["type"] == "utterance.end"} == {"customer", "agent"}
    summary = events[-1]
    assert [p["party"] for p in summary["parties"]] == ["customer", "agent"]
    assert 22 < summary["duration_s"] < 24  # the 23 s sample, all of it


def test_reference_client_with_a_wrong_secret_is_unauthorized(signed_gateway, reference_client):
    wrong = base64.b64encode(b"not the secret").decode()
    code, log = reference_client.run(ws_url(signed_gateway), CALL, API_KEY, wrong, timeout_s=60)
    assert "Session open!" not in log, log[-3000:]
    assert "reason: unauthorized" in log, log[-3000:]
    assert "Event message" not in log


def test_replayed_signature_is_refused(signed_gateway, reference_client):
    """Headers the reference client really sent (it logs them), sent again: the nonce was
    used, so the second upgrade is unauthorized; a tampered header fails the signature."""
    code, log = reference_client.run(
        ws_url(signed_gateway), CALL, API_KEY, SECRET, extra=("--max-stream-duration", "1")
    )
    assert code == 0 and "Session open!" in log, log[-3000:]
    headers = json.loads(re.search(r"Request headers: (\{.*?\n\})", log, re.S).group(1))
    for tamper in (None, "audiohook-correlation-id"):
        sent = dict(headers)
        if tamper:
            sent[tamper] = str(uuid.uuid4())
        with AudioHookClient(signed_gateway, headers=sent) as client:
            disconnect = client.receive()
            assert disconnect["type"] == "disconnect", disconnect
            assert disconnect["parameters"]["reason"] == "unauthorized"
            info = disconnect["parameters"]["info"]
            # The nonce was seen (or, on a slow machine, the 10 s signature age passed).
            expected = ("replayed", "age") if tamper is None else ("did not match",)
            assert any(word in info for word in expected), info
            client.close_transaction()
            assert client.close_code() == CLOSE_POLICY


# ----------------------------------------------------------------- a Python client


class AudioHookClient:
    """Speaks AudioHook v2 (or not, on purpose) over a real WebSocket."""

    def __init__(
        self, process: GatewayProcess, headers: dict | None = None, key=API_KEY, **options
    ):
        self.id = str(uuid.uuid4())
        self.org = str(uuid.uuid4())
        self.seq = 0
        self.serverseq = 0
        if headers is None:
            headers = {
                "Audiohook-Organization-Id": self.org,
                "Audiohook-Session-Id": self.id,
                "Audiohook-Correlation-Id": str(uuid.uuid4()),
            }
            if key is not None:
                headers["X-API-KEY"] = key
        else:
            self.id = headers.get("Audiohook-Session-Id", self.id)
        self._connection = websockets.connect(
            ws_url(process),
            additional_headers=headers,
            open_timeout=10,
            max_size=None,
            **options,
        )
        self.ws = self._connection.__enter__()

    def __enter__(self) -> AudioHookClient:
        return self

    def __exit__(self, *exc) -> None:
        self._connection.__exit__(*exc)

    def message(self, kind: str, parameters: dict, **override) -> dict:
        self.seq += 1
        message = {
            "version": "2",
            "id": self.id,
            "type": kind,
            "seq": self.seq,
            "serverseq": self.serverseq,
            "position": "PT0S",
            "parameters": parameters,
        }
        return message | override

    def send(self, kind: str, parameters: dict | None = None, **override) -> None:
        self.ws.send(json.dumps(self.message(kind, parameters or {}, **override)))

    def receive(self, timeout: float = 15) -> dict:
        message = json.loads(self.ws.recv(timeout=timeout))
        assert message["version"] == "2" and message["id"] == self.id, message
        assert message["seq"] == self.serverseq + 1, message  # ours, one up every message
        assert message["clientseq"] <= self.seq, message
        self.serverseq = message["seq"]
        return message

    def open(self, media: list[dict] | None = None, wait: bool = True, **parameters):
        self.send(
            "open",
            {
                "organizationId": self.org,
                "conversationId": str(uuid.uuid4()),
                "participant": {"id": str(uuid.uuid4()), "ani": "", "aniName": "", "dnis": ""},
                "media": media if media is not None else OFFERS,
                **parameters,
            },
        )
        return self.receive() if wait else None

    def close_transaction(self) -> list[dict]:
        """close -> (events) -> closed; the messages before `closed`."""
        self.send("close", {"reason": "end"})
        before = []
        while (message := self.receive(timeout=30))["type"] != "closed":
            before.append(message)
        return before

    def close_code(self, timeout: float = 10) -> int | None:
        from websockets.exceptions import ConnectionClosed

        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.ws.recv(timeout=deadline - time.monotonic())
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        except TimeoutError:
            return None
        return None

    def failure(self) -> dict:
        """The `disconnect` of a protocol failure, after the close transaction."""
        disconnect = self.receive()
        while disconnect["type"] == "event":
            disconnect = self.receive()
        assert disconnect["type"] == "disconnect", disconnect
        self.close_transaction()
        return disconnect["parameters"]


OFFERS = [
    {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000},
    {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
]


def mulaw_stereo_frames(seconds: float, frame_s: float = 0.2) -> list[bytes]:
    """The sample call's interleaved mu-law bytes (WAV format 7), cut in frames."""
    data = CALL.read_bytes()
    start = data.index(b"data") + 8
    body = data[start : start + int(seconds * 8000) * 2]
    step = int(frame_s * 8000) * 2
    return [body[i : i + step] for i in range(0, len(body), step)]


def test_open_ping_pause_update_and_close(gateway):
    with AudioHookClient(gateway) as client:
        opened = client.open(customConfig={"window_s": 2, "unrelated": {"x": 1}})
        assert opened["type"] == "opened", opened
        assert opened["parameters"] == {"media": [OFFERS[0]], "startPaused": False}
        client.send("ping", {"rtt": "PT0.01S"})
        pong = client.receive()
        assert pong["type"] == "pong", pong["parameters"]
        client.send("update", {"language": "en-US"})
        assert client.receive()["type"] == "updated"
        frames = mulaw_stereo_frames(4)
        for frame in frames[:10]:
            client.ws.send(frame)
        client.send("paused")
        client.send("resumed", {"start": "PT2S", "discarded": "PT1S"})
        for frame in frames[10:]:
            client.ws.send(frame)
            time.sleep(0.05)
        events = client.close_transaction()
        data = [e["parameters"]["entities"][0]["data"] for e in events if e["type"] == "event"]
        assert data and data[-1]["type"] == "summary", data
        assert client.close_code() in (None, 1000)


def test_mono_offer_and_connection_probe(gateway):
    with AudioHookClient(gateway) as client:
        client.send(
            "open",
            {
                "organizationId": client.org,
                "conversationId": "00000000-0000-0000-0000-000000000000",
                "participant": {
                    "id": "00000000-0000-0000-0000-000000000000",
                    "ani": "",
                    "aniName": "",
                    "dnis": "",
                },
                "media": [{**OFFERS[1], "format": "L16", "channels": ["internal"]}, OFFERS[1]],
            },
        )
        opened = client.receive()
        assert opened["parameters"]["media"] == [OFFERS[1]]  # one channel, PCMU before L16
        assert client.close_transaction() == []  # a probe: no session, no events


@pytest.mark.parametrize(
    "case, info",
    [
        ("seq", "Invalid seq value (not monotonically increasing)"),
        ("serverseq", "Invalid serverseq value"),
        ("id", "Session identifier mismatch"),
        ("json", "Text message not valid JSON"),
        ("shape", "Message not a well-formed client message"),
        ("type", "'hello' is not a supported client message"),
        ("params", "Invalid/missing parameters"),
        ("audio_first", "Received audio in state PREPARING"),
        ("no_media", "no offered media is supported"),
        ("frame", "not a valid audio frame"),
        ("paused_audio", "Received audio in state PAUSED"),
    ],
)
def test_protocol_errors_disconnect_with_the_references_reason(gateway, case, info):
    with AudioHookClient(gateway) as client:
        if case == "audio_first":
            client.ws.send(b"\xff" * 320)
        elif case == "json":
            client.ws.send("{not json")
        elif case == "shape":
            client.ws.send(json.dumps({"type": "open"}))
        elif case == "no_media":
            client.open(media=[], wait=False)
        else:
            opened = client.open()
            assert opened["type"] == "opened"
            if case == "seq":
                client.send("ping", seq=client.seq + 2)
            elif case == "serverseq":
                client.send("ping", serverseq=99)
            elif case == "id":
                client.send("ping", id=str(uuid.uuid4()))
            elif case == "type":
                client.send("hello")
            elif case == "params":
                client.send("update", {"language": 42})
            elif case == "frame":
                client.ws.send(b"\xff" * 321)  # not a whole stereo frame
            elif case == "paused_audio":
                client.send("paused")
                client.ws.send(b"\xff" * 320)
        failure = client.failure()
        assert failure["reason"] == "error" and info in failure["info"], failure
        assert client.close_code() == CLOSE_BAD_MESSAGE


def test_missing_or_wrong_key_is_unauthorized(gateway):
    for key in (None, "wrong-key"):
        with AudioHookClient(gateway, key=key) as client:
            failure = client.failure()
            assert failure["reason"] == "unauthorized", failure
            assert client.close_code() == CLOSE_POLICY


def test_organization_mismatch_and_oversized_frames(gateway):
    with AudioHookClient(gateway) as client:
        client.org = str(uuid.uuid4())  # organizationId differs from the header's
        client.open(wait=False)
        failure = client.failure()
        assert failure["reason"] == "unauthorized" and "organizationId" in failure["info"]
    with AudioHookClient(gateway) as client:
        client.open()
        client.ws.send(b"\xff" * (300 * 1024))  # over the 256 KiB message limit
        failure = client.failure()
        assert "bytes" in failure["info"], failure
        assert client.close_code() == CLOSE_TOO_BIG
    with AudioHookClient(gateway) as client:
        client.send("ping", {"padding": "x" * 70_000})  # over the reference's 64 K text
        failure = client.failure()
        assert "Text message too large" in failure["info"], failure
        assert client.close_code() == CLOSE_TOO_BIG


def test_drain_sends_reconnect_then_scores_and_disconnects(tiny_server, keys):
    """SIGTERM: `reconnect` at once (Genesys moves the stream elsewhere); a client that
    stays past --live-drain-s gets its finals and summary, then `disconnect` and 1001."""
    import signal

    from e2v.contract import CLOSE_GOING_AWAY

    process = GatewayProcess(
        tiny_server.config.grpc_url, "--api-key-file", str(keys[0]), "--live-drain-s", "3"
    )
    with process, AudioHookClient(process) as client:
        assert client.open()["type"] == "opened"
        frames = mulaw_stereo_frames(12)
        for frame in frames[:25]:  # 5 s: speech of both parties, some of it still open
            client.ws.send(frame)
        time.sleep(1.0)
        process.process.send_signal(signal.SIGTERM)
        seen: list[dict] = []
        for frame in frames[25:]:
            client.ws.send(frame)
            time.sleep(0.2)
            try:
                while True:
                    seen.append(client.receive(timeout=0.01))
            except TimeoutError:
                pass
            if any(m["type"] == "disconnect" for m in seen):
                break
        while not any(m["type"] == "disconnect" for m in seen):
            seen.append(client.receive(timeout=15))
        kinds = [m["type"] for m in seen]
        assert "reconnect" in kinds and kinds.index("reconnect") < kinds.index("disconnect")
        data = [m["parameters"]["entities"][0]["data"] for m in seen if m["type"] == "event"]
        types = [d["type"] for d in data]
        assert "utterance.end" in types and types[-1] == "summary", types
        disconnect = seen[-1]["parameters"]
        assert disconnect["reason"] == "completed" and "reconnect" in disconnect["info"]
        client.close_transaction()
        assert client.close_code() == CLOSE_GOING_AWAY


def test_audio_faster_than_real_time_is_refused(gateway):
    from e2v.contract import CLOSE_TOO_FAST

    with AudioHookClient(gateway) as client:
        client.open()
        for frame in mulaw_stereo_frames(12):  # 12 s at once: past the 5 s burst at 2x
            client.ws.send(frame)
        failure = client.failure()
        assert "faster than" in failure["info"], failure
        assert client.close_code() == CLOSE_TOO_FAST


@pytest.fixture(scope="module")
def quick_gateway(tiny_server, keys):
    """Short handshake and idle bounds."""
    process = GatewayProcess(
        tiny_server.config.grpc_url,
        "--api-key-file",
        str(keys[0]),
        "--live-handshake-s",
        "1",
        "--live-idle-s",
        "1.5",
        "--live-sessions",
        "1",
    )
    with process:
        yield process


def test_a_full_gateway_refuses_with_a_retry_hint(quick_gateway):
    from e2v.contract import CLOSE_TRY_AGAIN

    with AudioHookClient(quick_gateway) as first, AudioHookClient(quick_gateway) as second:
        failure = second.failure()
        assert failure["reason"] == "error" and "retry in" in failure["info"], failure
        assert second.close_code() == CLOSE_TRY_AGAIN
        assert first.open()["type"] == "opened"  # the one slot stays usable
        first.ws.send(mulaw_stereo_frames(1)[0])
        assert first.close_transaction()[-1]["type"] == "event"


def test_no_open_in_time_and_idle_streams_time_out_but_pauses_do_not(quick_gateway):
    from e2v.contract import CLOSE_TIMEOUT

    with AudioHookClient(quick_gateway) as client:
        client.send("ping")  # a ping is not an open
        assert client.receive()["type"] == "pong"
        failure = client.failure()
        assert "no open message within 1 s" in failure["info"], failure
        assert client.close_code() == CLOSE_TIMEOUT
    with AudioHookClient(quick_gateway) as client:
        client.open()
        client.ws.send(mulaw_stereo_frames(1)[0])
        failure = client.failure()
        assert "no audio for 1.5 s" in failure["info"], failure
        assert client.close_code() == CLOSE_TIMEOUT
    with AudioHookClient(quick_gateway) as client:
        client.open()
        client.send("paused")
        time.sleep(2.5)  # paused: no audio expected, not idle
        client.send("resumed", {"start": "PT0S", "discarded": "PT2.5S"})
        client.ws.send(mulaw_stereo_frames(1)[0])
        events = client.close_transaction()
        assert events[-1]["parameters"]["entities"][0]["data"]["type"] == "summary"


def _raw_upgrade(process: GatewayProcess, session_id: str, org: str):
    """A WebSocket by hand (a TCP socket), so the test can write without ever reading."""
    import os
    import socket

    sock = socket.create_connection(("127.0.0.1", process.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {AUDIOHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{process.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"X-API-KEY: {API_KEY}\r\nAudiohook-Session-Id: {session_id}\r\n"
            f"Audiohook-Organization-Id: {org}\r\n\r\n"
        ).encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(1)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


def _frame(text: str) -> bytes:
    """One masked text frame (clients must mask)."""
    import os

    data, mask = text.encode(), os.urandom(4)
    size = len(data)
    head = bytes([0x81]) + (
        bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_a_client_that_stops_reading_loses_its_slot(quick_gateway):
    """Pings answered into a socket nobody reads: once a pong cannot be sent for 10 s the
    session ends (4409) and its slot is free (the gateway allows one session here)."""
    client = AudioHookClient.__new__(AudioHookClient)  # messages only, no connection
    client.id, client.org, client.seq, client.serverseq = str(uuid.uuid4()), "", 0, 0
    client.org = str(uuid.uuid4())  # (the open message's organizationId)
    sock = _raw_upgrade(quick_gateway, client.id, client.org)
    try:
        open_message = client.message(
            "open",
            {
                "organizationId": client.org,
                "conversationId": str(uuid.uuid4()),
                "participant": {"id": str(uuid.uuid4()), "ani": "", "aniName": "", "dnis": ""},
                "media": OFFERS,
            },
        )
        sock.sendall(_frame(json.dumps(open_message)))
        sock.settimeout(1.0)
        started = time.monotonic()
        try:
            while time.monotonic() - started < 60:  # until the buffers on the way are full
                sock.sendall(_frame(json.dumps(client.message("ping", {}))))
        except (TimeoutError, OSError):
            pass
        # The slot comes free: a new session opens (the first one never reads again).
        while True:
            with AudioHookClient(quick_gateway) as other:
                other.send("open", open_message["parameters"] | {"organizationId": other.org})
                answer = other.receive()
                if answer["type"] == "opened":
                    # Freed by the 10 s send bound (not the 1.5 s idle one: no receive
                    # loop runs while a pong waits to be sent).
                    assert time.monotonic() - started >= 10
                    break
                assert "busy" in answer["parameters"]["info"], answer
            assert time.monotonic() - started < 40, "the slot was not freed"
            time.sleep(1)
    finally:
        sock.close()


def test_l16_when_only_l16_is_offered(gateway):
    """L16 (little-endian, as the reference sends it) is decoded like PCMU: the same
    speech gives the same utterance starts."""
    from e2v.client.live import codecs

    stereo = [{**OFFERS[0], "format": "L16"}]
    pcm = (codecs.decode(b"".join(mulaw_stereo_frames(6)), "mulaw") * 32768).round()
    body = pcm.clip(-32768, 32767).astype("<i2").tobytes()
    starts = {}
    for media, payload in ((stereo, body), ([OFFERS[0]], b"".join(mulaw_stereo_frames(6)))):
        with AudioHookClient(gateway) as client:
            assert client.open(media=media)["parameters"]["media"] == media
            step = len(payload) // 30
            for i in range(0, len(payload), step - step % 4):
                client.ws.send(payload[i : i + step - step % 4])
                time.sleep(0.1)
            data = [
                m["parameters"]["entities"][0]["data"]
                for m in client.close_transaction()
                if m["type"] == "event"
            ]
            starts[media[0]["format"]] = [
                (d["party"], d["start_s"]) for d in data if d["type"] == "utterance.start"
            ]
    assert starts["L16"] and starts["L16"] == starts["PCMU"], starts


def test_a_conversation_live_already_is_refused(gateway):
    conversation = str(uuid.uuid4())
    with AudioHookClient(gateway) as first, AudioHookClient(gateway) as second:
        assert first.open(conversationId=conversation)["type"] == "opened"
        second.open(conversationId=conversation, wait=False)
        failure = second.failure()
        assert "already live" in failure["info"], failure
        assert second.close_code() == CLOSE_BAD_MESSAGE
        assert first.close_transaction()[-1]["type"] == "event"  # the first goes on
