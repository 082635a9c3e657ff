"""Signed webhooks against a real HTTP receiver on a free loopback port, `e2v classify
--webhook` end to end with the tiny Triton server, and the live AlertTracker's hysteresis.

Labels of the synthetic model are meaningless: the tests pick whatever label it ranks top.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import audio_fixtures as fx
import pytest
from e2v.client.alerts import AlertTracker, parse_live_alerts
from e2v.client.webhooks import (
    WebhookSender,
    file_alert,
    read_secret,
    sign,
    validate_url,
    verify,
    webhook_options,
)
from e2v.export.config_template import PUBLISHED_LABELS

from e2v.contract import (
    EVENT_ALERT,
    EVENT_FILE_ALERT,
    WEBHOOK_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
)

SECRET = b"test-secret-0123456789abcdef"
# emotion2vec's published labels (the synthetic models carry the same names, meaninglessly).
LABELS = list(PUBLISHED_LABELS)


# ------------------------------------------------------------------------------ receiver
@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP server on a free loopback port. Each request takes the next step of
    `script` (then `default`): an HTTP status, or ("hang", seconds): no answer that long."""

    def __init__(self, script=(), default=200, headers=None):
        self.script, self.default, self.extra = list(script), default, headers or {}
        self.requests: list[Received] = []
        self.closing = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = min(int(self.headers.get("Content-Length", 0)), 2 << 20)
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests.append(Received(time.monotonic(), dict(self.headers), body))
                    step = receiver.script.pop(0) if receiver.script else receiver.default
                if isinstance(step, tuple):
                    receiver.closing.wait(step[1])
                    step = 200
                try:
                    self.send_response(step)
                    for key, value in receiver.extra.get(step, {}).items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender timed out and went away

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def bodies(self) -> list[dict]:
        return [json.loads(r.body) for r in self.requests]

    def verified(self, secret: bytes = SECRET) -> bool:
        return all(
            verify(secret, r.headers.get(WEBHOOK_SIGNATURE_HEADER), r.body) for r in self.requests
        )


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def deliver(url: str, payloads: list, drain_s: float = 10.0, **options) -> WebhookSender:
    """Start a sender, post `payloads`, stop with `drain_s`; the stopped sender."""

    async def main() -> WebhookSender:
        sender = WebhookSender(url, SECRET, **options)
        await sender.start()
        for payload in payloads:
            sender.post(payload)
        await sender.stop(drain_s)
        assert sender.queued == 0
        return sender

    return asyncio.run(main())


# ------------------------------------------------------------------------- sign / verify
def test_signature_is_hmac_over_timestamp_and_body_and_verify_refuses_the_rest():
    now = int(time.time())
    body = b'{"type":"alert","score":0.9}'
    header = sign(SECRET, now, body)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")  # body changed
    assert not verify(b"another-secret-0123456789", header, body)
    assert not verify(SECRET, header, body, now=now + 301)  # a replay, too old
    assert not verify(SECRET, sign(SECRET, now + 400, body), body)  # from the future
    rotated = f"{header},v1={'0' * 64}"
    assert verify(SECRET, rotated, body)  # any v1 matching is enough (secret rotation)
    for bad in (
        None,
        "",
        "v1=abc",
        f"t={now}",
        f"t=x,v1={header[-64:]}",
        "t=1,t=2,v1=a",
        f"t=١٢٣,v1={header[-64:]}",
        header + "," + "x" * 2000,
        "v1=\u00e9,t=1",
    ):
        assert not verify(SECRET, bad, body), bad


def test_url_and_secret_file_checks(tmp_path):
    for url in ("http://127.0.0.1:9/x", "https://hooks.example.com/a?b=c", "http://[::1]:80/"):
        assert validate_url(url) == url
    refused = {
        "ftp://example.com/x": "http:// or https://",
        "file:///etc/passwd": "http:// or https://",
        "http:///x": "with a host",
        "http://h:99999/": "not a valid URL",
        "http://h/a b": "control characters",
        "http://u" + "x" * 3000: "longer than",
    }
    for url, reason in refused.items():
        with pytest.raises(ValueError, match=reason):
            validate_url(url)
    with pytest.raises(ValueError, match="credentials") as caught:
        validate_url("https://alice:hunter2@example.com/hook")
    assert "hunter2" not in str(caught.value)  # the password is never echoed

    good = tmp_path / "secret"
    good.write_text(" s3cret-0123456789abcdef\n")
    assert read_secret(good) == b"s3cret-0123456789abcdef"
    cases = {
        "missing": (None, "cannot read"),
        "short": (b"short", "at least 16"),
        "empty": (b"\n", "at least 16"),
        "binary": (b"\x00" * 20, "printable ASCII"),
        "huge": (b"a" * 5000, "longer than 4096"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ValueError, match=reason):
            read_secret(path)
    assert webhook_options(None, None) is None
    with pytest.raises(ValueError, match="needs --webhook-secret-file"):
        webhook_options("http://127.0.0.1:9/", None)
    with pytest.raises(ValueError, match="needs --webhook URL"):
        webhook_options(None, good)


# ------------------------------------------------------------------------------ delivery
def test_signed_json_posts_reach_a_real_receiver():
    payloads = [{"type": "alert", "call_id": "c1", "seq": i, "label": "怒"} for i in range(3)]
    with Receiver() as receiver:
        sender = deliver(receiver.url, payloads)
    assert (sender.delivered, sender.failed, sender.dropped) == (3, 0, 0)
    assert sorted(receiver.bodies(), key=lambda b: b["seq"]) == payloads
    assert receiver.verified()
    assert not receiver.verified(b"wrong-secret-0123456789")
    ids = {r.headers[WEBHOOK_ID_HEADER] for r in receiver.requests}
    assert len(ids) == 3
    assert all(r.headers["Content-Type"] == "application/json" for r in receiver.requests)


def test_failing_receiver_is_retried_500_then_timeout_then_delivered():
    with Receiver(script=[500, 503, ("hang", 5.0), 200]) as receiver:
        sender = deliver(receiver.url, [{"type": "summary"}], timeout_s=0.5, backoff_s=0.1)
    assert (sender.delivered, sender.failed, sender.dropped) == (1, 0, 0)
    attempts = receiver.requests
    assert len(attempts) == 4 and receiver.verified()  # each retry re-signed, all valid
    assert len({r.headers[WEBHOOK_ID_HEADER] for r in attempts}) == 1  # one delivery id
    gaps = [b.at - a.at for a, b in zip(attempts, attempts[1:])]
    # Backoff 0.1, 0.2, then the 0.5 s timeout plus 0.4.
    assert 0.08 <= gaps[0] < 0.6 and 0.18 <= gaps[1] < 0.7 and 0.85 <= gaps[2] < 1.6, gaps


def test_backoff_doubles_up_to_its_cap_and_then_the_delivery_fails():
    with Receiver(default=500) as receiver:
        sender = deliver(receiver.url, [{"n": 1}], retries=6, backoff_s=0.05, backoff_cap_s=0.2)
    assert (sender.delivered, sender.failed, sender.dropped) == (0, 1, 0)
    assert len(receiver.requests) == 7
    assert [sender.backoff(i) for i in range(6)] == [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
    gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:])]
    assert all(g >= 0.04 for g in gaps) and max(gaps) < 0.2 + 0.3, gaps
    assert min(gaps[2:]) >= 0.18  # the cap, reached and kept


def test_closed_port_retry_after_and_permanent_statuses():
    sender = deliver(closed_port_url(), [{"n": 1}], retries=3, backoff_s=0.01)
    assert (sender.delivered, sender.failed) == (0, 1)

    # 429 with Retry-After: waited (up to the cap), then delivered.
    with Receiver(script=[429], headers={429: {"Retry-After": "1"}}) as receiver:
        sender = deliver(receiver.url, [{"n": 1}], backoff_s=0.01, backoff_cap_s=0.5)
    assert sender.delivered == 1 and len(receiver.requests) == 2
    assert 0.45 <= receiver.requests[1].at - receiver.requests[0].at < 1.0  # capped at 0.5

    # 400 and redirects are the receiver's final word: no retry, never followed.
    with Receiver(script=[400, 302], headers={302: {"Location": "http://127.0.0.1:9/"}}) as rx:
        sender = deliver(rx.url, [{"n": 1}, {"n": 2}], workers=1, backoff_s=0.01)
    assert (sender.delivered, sender.failed) == (0, 2) and len(rx.requests) == 2


def test_full_queue_drops_and_counts_and_post_never_blocks():
    async def main(receiver: Receiver) -> WebhookSender:
        sender = WebhookSender(receiver.url, SECRET, queue=3, workers=1, timeout_s=10)
        await sender.start()
        started = time.perf_counter()
        accepted = [sender.post({"n": i}) for i in range(10)]
        assert time.perf_counter() - started < 0.05  # no network on the caller's path
        assert accepted == [True] * 3 + [False] * 7
        assert sender.dropped == 7
        await asyncio.sleep(0.2)  # the first delivery is now held by the receiver
        assert sender.post({"n": 10}) and not sender.post({"n": 11})
        receiver.closing.set()  # let the receiver answer
        await sender.stop(10)
        assert not sender.post({"n": 12})  # stopped: dropped, counted
        return sender

    with Receiver(script=[("hang", 30.0)]) as receiver:
        sender = asyncio.run(main(receiver))
    assert (sender.delivered, sender.failed, sender.dropped) == (4, 0, 9)
    assert sorted(b["n"] for b in receiver.bodies()) == [0, 1, 2, 10]


def test_queue_is_bounded_in_bytes_too():
    async def main(url: str) -> tuple[list[bool], WebhookSender]:
        sender = WebhookSender(url, SECRET, queue_bytes=1000)
        await sender.start()
        accepted = [sender.post({"pad": "x" * 400}) for _ in range(3)]
        assert sender.queued_bytes == 2 * len(json.dumps({"pad": "x" * 400}).replace(" ", ""))
        await sender.stop(10)
        return accepted, sender

    with Receiver() as receiver:
        accepted, sender = asyncio.run(main(receiver.url))
    assert accepted == [True, True, False] and sender.queued_bytes == 0
    assert (sender.delivered, sender.dropped) == (2, 1)


def test_stop_is_bounded_by_its_drain_with_a_dead_receiver():
    payloads = [{"n": i} for i in range(6)]
    with Receiver(default=("hang", 30.0)) as receiver:
        started = time.monotonic()
        sender = deliver(receiver.url, payloads, drain_s=0.5, workers=2, timeout_s=10)
        took = time.monotonic() - started
    assert took < 2.0, took
    # Two in flight when the drain ran out (failed), the other four still queued (dropped).
    assert (sender.delivered, sender.failed, sender.dropped) == (0, 2, 4)


def test_payloads_that_are_not_json_or_too_large_are_dropped():
    with Receiver() as receiver:
        sender = deliver(
            receiver.url, [{"x": math.nan}, {"x": object()}, {"x": "a" * (1 << 20)}, {"ok": 1}]
        )
    assert (sender.delivered, sender.dropped) == (1, 3) and receiver.bodies() == [{"ok": 1}]


def test_file_alert_payload_leaves_out_segments():
    row = {"file": "a.wav", "emotion": "sad", "segments": [{}] * 500, "alerts": [{"label": "x"}]}
    assert file_alert(row) == {
        "type": EVENT_FILE_ALERT,
        "file": "a.wav",
        "emotion": "sad",
        "alerts": [{"label": "x"}],
    }


# ---------------------------------------------------------------- e2v classify --webhook
def classify(*args: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "e2v", "classify", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def secret_file(tmp_path) -> Path:
    path = tmp_path / "webhook-secret"
    path.write_bytes(SECRET + b"\n")
    return path


def test_classify_posts_one_signed_webhook_per_file_that_fires(tiny_server, tmp_path, secret_file):
    url = tiny_server.config.grpc_url
    fires = fx.write_audio(tmp_path / "fires.wav", fx.speech_like(3.0, seed=9))
    quiet = fx.write_audio(tmp_path / "quiet.wav", fx.speech_like(3.0, seed=4))
    probe = classify(str(fires), "--url", url, "--json")
    top = json.loads(probe.stdout.splitlines()[0])["emotion"]
    with Receiver() as receiver:
        result = classify(
            str(fires), str(quiet), "--url", url, "--json", "--alert", f"{top}=0.0",
            "--webhook", receiver.url, "--webhook-secret-file", str(secret_file),
        )  # fmt: skip
        rows = {r["file"]: r for r in map(json.loads, result.stdout.splitlines())}
        assert result.returncode == 8, result.stderr
        assert "webhooks: 2 delivered, 0 failed, 0 dropped" in result.stderr
        assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr
        assert receiver.verified()
        bodies = {b["file"]: b for b in receiver.bodies()}
    assert set(bodies) == {str(fires), str(quiet)}  # threshold 0: both fire
    for name, body in bodies.items():
        assert body["type"] == EVENT_FILE_ALERT and "segments" not in body
        assert body["alerts"] == rows[name]["alerts"] and body["alerts"][0]["label"] == top
        assert body["synthetic"] is True  # the synthetic model says so, labels meaningless

    # Only files that cross the threshold are posted.
    with Receiver() as receiver:
        result = classify(
            str(fires), "--url", url, "--alert", f"{top}=1.0",
            "--webhook", receiver.url, "--webhook-secret-file", str(secret_file),
        )  # fmt: skip
    assert result.returncode == 0 and receiver.requests == [], result.stderr


def test_classify_is_not_held_by_a_dead_receiver(tiny_server, tmp_path, secret_file):
    clip = fx.write_audio(tmp_path / "clip.wav", fx.speech_like(2.0, seed=1))
    started = time.monotonic()
    result = classify(
        str(clip), "--url", tiny_server.config.grpc_url, "--alert", "angry=0.0",
        "--webhook", closed_port_url(), "--webhook-secret-file", str(secret_file),
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 8, result.stderr  # the alert's status, not the webhook's
    assert "webhooks: 0 delivered, 1 failed, 0 dropped" in result.stderr
    assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr
    assert took < 30, took  # the job plus the bounded 10 s drain


def test_classify_webhook_flags_are_checked_before_any_work(tmp_path, secret_file):
    clip = str(tmp_path / "never-read.wav")
    short = tmp_path / "short"
    short.write_text("abc")
    cases = [
        (["--webhook", "http://127.0.0.1:9/"], "needs --webhook-secret-file"),
        (["--webhook-secret-file", str(secret_file)], "needs --webhook URL"),
        (["--webhook", "http://127.0.0.1:9/", "--webhook-secret-file", str(secret_file)],
         "give --alert too"),
        (["--alert", "angry=0.5", "--webhook", "https://bob:pw1234@h/",
          "--webhook-secret-file", str(secret_file)], "credentials"),
        (["--alert", "angry=0.5", "--webhook", "ftp://h/", "--webhook-secret-file",
          str(secret_file)], "http:// or https://"),
        (["--alert", "angry=0.5", "--webhook", "http://h/", "--webhook-secret-file",
          str(short)], "at least 16"),
    ]  # fmt: skip
    for args, reason in cases:
        result = classify(clip, "--url", "127.0.0.1:9", *args, timeout=60)
        assert result.returncode == 2 and reason in result.stderr, (args, result.stderr)
        assert "pw1234" not in result.stderr


# --------------------------------------------------------------- live alert hysteresis
def run(tracker: AlertTracker, party: str, scores: list[float], label: str = "angry"):
    """Feed one window per score (1 s hops); the window indices that fired."""
    fired = []
    for i, score in enumerate(scores):
        events = tracker.update(party, {label: score, "happy": 1 - score}, i, i + 3.0)
        fired += [(i, e) for e in events]
    return fired


def test_alert_fires_after_n_consecutive_windows_not_before():
    rules = parse_live_alerts("customer:angry=0.7", ("customer", "agent"), LABELS)
    tracker = AlertTracker(rules, windows=3)
    # A dip under the threshold restarts the count.
    fired = run(tracker, "customer", [0.8, 0.9, 0.5, 0.75, 0.95, 0.7])
    assert [i for i, _ in fired] == [5]
    event = fired[0][1]
    assert event == {
        "type": EVENT_ALERT,
        "party": "customer",
        "start_s": 3.0,  # the first window of the streak...
        "end_s": 8.0,  # ...to the end of the last
        "label": "angry",
        "score": 0.95,  # the peak of the streak
        "threshold": 0.7,
        "windows": 3,
        "rearm_below": 0.6,
    }


def test_alert_is_not_repeated_until_the_score_falls_below_the_margin():
    tracker = AlertTracker(parse_live_alerts("angry=0.7", ("caller",), LABELS), windows=2)
    scores = [0.8, 0.8]  # fires at 1
    scores += [0.9] * 5 + [0.65, 0.8, 0.8]  # still high, dips above 0.6: stays quiet
    scores += [0.59]  # below 0.7 - 0.1: re-armed
    scores += [0.71, 0.72]  # two windows again: fires at 12
    assert [i for i, _ in run(tracker, "caller", scores)] == [1, 12]
    # A low threshold re-arms below half of itself; NaN never counts as a hit.
    low = AlertTracker(parse_live_alerts("angry=0.1", ("caller",), LABELS), windows=1)
    assert [i for i, _ in run(low, "caller", [0.2, 0.06, 0.2, 0.04, math.nan, 0.1])] == [0, 5]


def test_alerts_are_per_party():
    parties = ("customer", "agent")
    tracker = AlertTracker(parse_live_alerts("customer:angry=0.7", parties, LABELS), windows=2)
    assert run(tracker, "agent", [0.99] * 5) == []  # no rule for the agent

    # A bare rule watches every party, each with its own streak and arming.
    tracker = AlertTracker(parse_live_alerts("angry=0.7", parties, LABELS), windows=2)
    fired = []
    for i, (party, score) in enumerate(
        [("customer", 0.8), ("agent", 0.8), ("customer", 0.1), ("agent", 0.8), ("customer", 0.8)]
    ):
        fired += [(i, e["party"]) for e in tracker.update(party, {"angry": score}, i, i + 1)]
    assert fired == [(3, "agent")]  # the customer's dip reset only the customer's streak


def test_live_alert_rules_parse_like_classify_and_refuse_unknowns():
    parties = ("customer", "agent")
    rules = parse_live_alerts("Angry=0.7, customer:生气/angry=0.9, sad=0.5", parties, LABELS)
    by_key = {(r.party, r.label): r.threshold for r in rules}
    # The named rule overrides the bare one for its party only.
    assert by_key == {
        ("customer", "angry"): 0.9,
        ("agent", "angry"): 0.7,
        ("customer", "sad"): 0.5,
        ("agent", "sad"): 0.5,
    }
    assert parse_live_alerts(None, parties, LABELS) == parse_live_alerts(" ", parties, LABELS)
    refused = {
        "custmer:angry=0.7": "party 'custmer' is not one of this stream's: customer, agent",
        "angy=0.5": "label 'angy' is not one of the model's",
        "angry=1.5": "expected LABEL=P with 0 <= P <= 1",
        "angry": "expected LABEL=P",
        "customer:": "expected LABEL=P",
        "angry=0.5,": "expected LABEL=P",
        ",".join(["angry=0.5"] * 65): "more than 64 items",
        "a" * 5000: "longer than 4096",
    }
    for text, reason in refused.items():
        with pytest.raises(ValueError, match=reason.replace("(", r"\(")) as caught:
            parse_live_alerts(text, parties, LABELS)
        assert "--alert" not in str(caught.value)
    for windows in (0, 101):
        with pytest.raises(ValueError, match="alert_windows must be in 1-100"):
            AlertTracker([], windows)


def test_gateway_webhook_flags_are_checked_at_start(tmp_path, secret_file):
    from e2v.client.gateway.config import GatewayConfig

    config = GatewayConfig(webhook="http://127.0.0.1:9/hook", webhook_secret=SECRET)
    assert config.webhook == "http://127.0.0.1:9/hook"
    for kwargs in ({"webhook": "http://127.0.0.1:9/"}, {"webhook_secret": SECRET}):
        with pytest.raises(ValueError, match="go together"):
            GatewayConfig(**kwargs)
    with pytest.raises(ValueError, match="credentials"):
        GatewayConfig(webhook="http://u:p@127.0.0.1/", webhook_secret=SECRET)
    cases = [
        (["--webhook", "ftp://h/", "--webhook-secret-file", str(secret_file)], "http://"),
        (["--webhook", "http://127.0.0.1:9/"], "needs --webhook-secret-file"),
        (["--webhook", "http://h/", "--webhook-secret-file", str(tmp_path / "no")], "cannot read"),
    ]
    for args, reason in cases:
        result = subprocess.run(
            [sys.executable, "-m", "e2v", "gateway", "--port", "9", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and reason in result.stderr, (args, result.stderr)


# ------------------------------------------------------------ e2v gateway: live alerts
async def _live_call(url: str, pcm: bytes, alerts: str) -> list[dict]:
    """One /v1/live session (16 kHz pcm_s16le mono) faster than real time; its events."""
    from websockets.asyncio.client import connect

    start = {"type": "start", "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1,
             "alerts": alerts, "alert_windows": 2}  # fmt: skip
    events = []
    async with connect(url, open_timeout=10, close_timeout=10) as ws:
        await ws.send(json.dumps(start))
        events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))

        async def read() -> None:
            async for message in ws:
                events.append(json.loads(message))

        reader = asyncio.create_task(read())
        frame = 3200  # 100 ms
        for offset in range(0, len(pcm), frame):
            await ws.send(pcm[offset : offset + frame])
            await asyncio.sleep(0.07)  # about 1.4x real time (the gateway allows 2x)
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reader, 60)
    return events


def _metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        return response.read().decode()


def test_gateway_posts_live_alerts_and_the_summary(tiny_server, secret_file):
    pytest.importorskip("websockets")
    from e2v.loadtest.gateway_process import GatewayProcess

    from e2v.contract import EVENT_SUMMARY, LIVE_PATH

    speech = fx.speech_like(8.0, seed=5)
    pcm = (speech * 32767).clip(-32768, 32767).astype("<i2").tobytes()
    with Receiver() as receiver:
        args = ("--webhook", receiver.url, "--webhook-secret-file", str(secret_file))
        with GatewayProcess(tiny_server.config.grpc_url, *args) as gateway:
            url = gateway.url.replace("http://", "ws://") + LIVE_PATH
            # Threshold 0: fires after two windows and can never re-arm (score < 0).
            events = asyncio.run(_live_call(url, pcm, "angry=0.0"))
            deadline = time.monotonic() + 10
            while "e2v_webhook_delivered_total 2.0" not in (metrics := _metrics(gateway.url)):
                assert time.monotonic() < deadline, metrics
                time.sleep(0.1)
            assert "e2v_webhook_failed_total 0.0" in metrics
            assert "e2v_webhook_dropped_total 0.0" in metrics
        assert receiver.verified()
        bodies = receiver.bodies()
    assert events[0]["type"] == "started", events[0]
    sent = [e for e in events if e["type"] in (EVENT_ALERT, EVENT_SUMMARY)]
    assert [e["type"] for e in sent] == [EVENT_ALERT, EVENT_SUMMARY], [e["type"] for e in events]
    assert sorted(bodies, key=lambda b: b["seq"]) == sent  # the socket's events, as they were
    assert sent[0]["label"] == "angry" and sent[0]["threshold"] == 0.0


def test_a_hanging_receiver_never_holds_a_live_call_or_the_shutdown(tiny_server, secret_file):
    pytest.importorskip("websockets")
    from e2v.loadtest.gateway_process import GatewayProcess

    from e2v.contract import EVENT_SUMMARY, LIVE_PATH

    pcm = (fx.speech_like(6.0, seed=5) * 32767).astype("<i2").tobytes()
    with Receiver(default=("hang", 60.0)) as receiver:
        args = ("--webhook", receiver.url, "--webhook-secret-file", str(secret_file))
        gateway = GatewayProcess(tiny_server.config.grpc_url, *args).start()
        try:
            url = gateway.url.replace("http://", "ws://") + LIVE_PATH
            started = time.monotonic()
            events = asyncio.run(_live_call(url, pcm, "angry=0.0"))
            took = time.monotonic() - started
            assert events[-1]["type"] == EVENT_SUMMARY and took < 15, (took, events[-1])
            assert "e2v_webhook_delivered_total 0.0" in _metrics(gateway.url)
        finally:
            stopping = time.monotonic()
            gateway.stop()
            stop_s = time.monotonic() - stopping
        assert receiver.requests  # the alert was posted, never answered
    # SIGTERM: the webhook drain is bounded (5 s); the gateway exits by itself, not killed
    # (uvicorn re-raises the SIGTERM it handled, so the status may be -15).
    assert gateway.process.returncode in (0, -15) and stop_s < 15, (gateway.process, stop_s)
