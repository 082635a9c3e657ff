"""`e2v gateway` over real HTTP: a real gateway process in front of the real tritonserver.

Every status of the upload API, hostile requests (lying lengths, slow bodies, odd names,
malformed multipart), results equal to `e2v classify --json`, bounded memory and disk, the
metrics, and the page in a real headless chromium.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.loadtest.gateway_process import GatewayProcess
from servers import free_ports

pytest.importorskip("fastapi", reason="the gateway extra is not installed")

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
LIMIT_MB = 8
READ_TIMEOUT_S = 2
BOUNDARY = b"e2v-test-boundary-7MA4YWxkTrZu0gW"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway-spool")


@pytest.fixture(scope="module")
def gateway(tiny_server, spool):
    """The gateway under test: small limits so hostile cases stay quick."""
    process = GatewayProcess(
        tiny_server.config.grpc_url,
        "--max-upload-mb",
        str(LIMIT_MB),
        "--read-timeout-s",
        str(READ_TIMEOUT_S),
        "--max-duration-s",
        "60",
        "--concurrency",
        "4",
        "--spool-dir",
        str(spool),
    )
    with process.start(ready=True):
        yield process


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real recordings: the bundled samples and encoded speech with pauses (several
    VAD segments), in several containers, rates and channel counts."""
    folder = tmp_path_factory.mktemp("gateway-audio")
    # Longer than one segment (30 s), so VAD cuts it at the pauses.
    pattern = [("speech", 9.0), ("silence", 2.0), ("speech", 12.0), ("silence", 2.5)]
    pattern += [("speech", 11.0)]
    paused, _ = fx.bursts(pattern, seed=5)
    written = {
        "complaint.mp3": SAMPLES / "complaint.mp3",
        "thanks-8k-mulaw.wav": SAMPLES / "thanks-8k-mulaw.wav",
        "paused.flac": fx.write_audio(folder / "paused.flac", paused),
        "stereo-48k.ogg": fx.write_audio(
            folder / "stereo-48k.ogg", np.stack([fx.speech_like(3.2, 48_000, seed=6)] * 2), 48_000
        ),
        "call.m4a": fx.write_audio(folder / "call.m4a", fx.speech_like(5.5, seed=7)),
    }
    return written


# ------------------------------------------------------------------------------ helpers


def split(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname, parsed.port


def request(
    gateway: GatewayProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 120,
) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection(*split(gateway.url), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def post(gateway, body: bytes, content_type: str | None, query: str = "", headers=None):
    """POST /predict; returns (status, headers, JSON body)."""
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    status, response_headers, data = request(gateway, "POST", "/predict" + query, body, all_headers)
    return status, response_headers, json.loads(data)


def multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: bytes = BOUNDARY):
    """(body, content type) of form-data `parts`: (field name, filename or None, data)."""
    body = b""
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition
        body += b"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, "multipart/form-data; boundary=" + boundary.decode()


def upload(gateway, path: Path, query: str = "", headers=None):
    body, content_type = multipart([(b"file", path.name.encode(), path.read_bytes())])
    return post(gateway, body, content_type, query, headers)


def classify_json(url: str, paths: list[Path], *args: str) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "e2v", "classify", "--no-progress", "--json", "--url", url]
        + [*args, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {Path(row["file"]).name: row for row in rows}


def assert_same(ours, theirs, where: str = "") -> None:
    """Equal structure; numbers within 1e-6."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert abs(ours - theirs) <= 1e-6 + 1e-12, f"{where}: {ours} != {theirs}"  # 6 digits
    else:
        assert ours == theirs, where


def comparable(row: dict) -> dict:
    """A gateway result without the fields `e2v classify --json` does not have."""
    return {k: v for k, v in row.items() if k not in ("filename", "timestamp", "file")}


class RawConnection:
    """A socket speaking HTTP/1.1 by hand: lying headers, slow or partial bodies."""

    def __init__(self, gateway: GatewayProcess):
        self.sock = socket.create_connection(split(gateway.url), timeout=60)
        self.sent = 0

    def send(self, data: bytes) -> bool:
        """Send unless the server already answered or closed; False when it did."""
        if self.answered():
            return False
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        self.sent += len(data)
        return True

    def answered(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def response(self, timeout: float = 60) -> tuple[int | None, bytes]:
        """(status, body) of the response, or (None, b"") when the server just closed."""
        self.sock.settimeout(timeout)
        data, length = b"", 0
        try:
            while b"\r\n\r\n" not in data:
                piece = self.sock.recv(65536)
                if not piece:
                    break
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            if not head:
                return None, b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                piece = self.sock.recv(65536)
                if not piece:
                    break
                body += piece
        except ConnectionResetError:
            if not data:
                return None, b""
            head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body[:length] if length else body

    def close(self) -> None:
        self.sock.close()


def head(
    content_type: str, length: int | None = None, chunked: bool = False, extra: tuple = ()
) -> bytes:
    lines = ["POST /predict HTTP/1.1", "Host: test", f"Content-Type: {content_type}", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def spool_fds(pid: int, spool: Path) -> list[str]:
    """The gateway's open files in the spool directory (unnamed ones show as deleted)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(spool)):
            found.append(target)
    return found


def assert_no_uploads_left(gateway: GatewayProcess, spool: Path) -> None:
    deadline = time.monotonic() + 5  # the handler's cleanup runs as the response goes out
    while spool_fds(gateway.pid, spool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_fds(gateway.pid, spool) == []
    assert list(spool.iterdir()) == []


def peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


# ------------------------------------------------------------------------------ results


def test_concurrent_uploads_equal_classify_json(gateway, tiny_server, files):
    paths = list(files.values())
    expected = classify_json(tiny_server.config.grpc_url, paths)
    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda p: upload(gateway, p), paths))
    for path, (status, _, row) in zip(paths, answers):
        assert status == 200, row
        assert row["filename"] == path.name
        assert set(row) >= {"filename", "emotion", "confidence", "timestamp", "duration_s"}
        assert row["timestamp"].endswith("+00:00") and "T" in row["timestamp"]
        assert_same(comparable(row), comparable(expected[path.name]), path.name)
    assert len(expected["paused.flac"]["segments"]) >= 2  # VAD cut it: timelines are real
    assert all(row["synthetic"] for _, _, row in answers)

    # Several files in one request: one entry each, in order, same numbers.
    body, content_type = multipart([(b"file", p.name.encode(), p.read_bytes()) for p in paths])
    status, _, data = post(gateway, body, content_type, "?segment=fixed:2&alert=angry=0.2")
    assert status == 200
    fixed = classify_json(
        tiny_server.config.grpc_url, paths, "--segment", "fixed:2", "--alert", "angry=0.2"
    )
    assert [r["filename"] for r in data["results"]] == [p.name for p in paths]
    for row in data["results"]:
        assert_same(comparable(row), comparable(fixed[row["filename"]]), row["filename"])


def test_raw_body_chunked_body_and_embeddings(gateway, tiny_server, files, tmp_path):
    path = files["paused.flac"]
    status, _, raw = post(gateway, path.read_bytes(), "audio/flac", "?filename=paused.flac")
    assert status == 200 and raw["filename"] == "paused.flac"
    assert_same(
        comparable(raw), comparable(classify_json(tiny_server.config.grpc_url, [path])[path.name])
    )

    connection = RawConnection(gateway)  # chunked, no Content-Length
    data = path.read_bytes()
    connection.send(head("application/octet-stream", chunked=True))
    for start in range(0, len(data), 3000):
        connection.send(chunk(data[start : start + 3000]))
    connection.send(b"0\r\n\r\n")
    status, body = connection.response()
    connection.close()
    assert status == 200
    assert_same(comparable(json.loads(body)), comparable(raw))

    npy = tmp_path / "emb.npy"
    subprocess.run(
        [sys.executable, "-m", "e2v", "classify", "--no-progress", "--url"]
        + [tiny_server.config.grpc_url, "--embeddings", str(npy), str(path)],
        capture_output=True,
        timeout=300,
    )
    status, _, with_embeddings = post(
        gateway, path.read_bytes(), "audio/flac", "?embeddings=true&filename=a.flac"
    )
    vectors = np.array([s["embedding"] for s in with_embeddings["segments"]])
    assert status == 200 and np.abs(vectors - np.load(npy)).max() <= 1e-5


def test_no_speech_is_200_with_no_speech(gateway, tmp_path):
    path = fx.write_audio(tmp_path / "quiet.wav", fx.silence(2.0))
    status, _, row = upload(gateway, path)
    assert status == 200 and row["no_speech"] is True and row["segments"] == []


# ------------------------------------------------------------------------------ statuses


def test_mutated_recordings_never_give_a_500(gateway, files):
    """A seeded fuzz of real files (flipped bytes, cut tails, zeroed headers, spliced
    halves): every answer is a result or a 422 with the client's kind, never a 500."""
    rng = np.random.default_rng(11)
    originals = [files[n].read_bytes() for n in ("complaint.mp3", "paused.flac", "call.m4a")]
    statuses = []
    for case in range(24):
        data = bytearray(originals[case % len(originals)])
        kind = case % 4
        if kind == 0:
            for at in rng.integers(0, len(data), 40):
                data[at] = int(rng.integers(0, 256))
        elif kind == 1:
            data = data[: int(rng.integers(8, len(data)))]
        elif kind == 2:
            size = int(rng.integers(4, 64))
            data[:size] = bytes(size)
        else:
            other = originals[(case + 1) % len(originals)]
            data = data[: len(data) // 2] + other[len(other) // 2 :]
        status, _, body = post(gateway, bytes(data), "application/octet-stream")
        assert status in (200, 422), (case, body)
        assert status == 200 or body["error_kind"] in FILE_KINDS
        statuses.append(status)
    assert 200 in statuses and 422 in statuses  # the fuzz reached both outcomes


FILE_KINDS = {"decode", "no_audio", "empty", "non_finite", "out_of_range", "too_short", "too_long"}


def test_triton_over_http_gives_the_same_results(tiny_server, gateway, files):
    path = files["complaint.mp3"]
    with GatewayProcess(tiny_server.config.http_url, protocol="http").start(ready=True) as other:
        status, _, row = upload(other, path)
    assert status == 200
    assert_same(comparable(row), comparable(upload(gateway, path)[2]))


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda d: fx.write_random_bytes(d / "noise.wav"), "decode"),
        (lambda d: fx.write_text(d / "notes.mp3"), "decode"),
        (lambda d: fx.write_empty_file(d / "empty.wav"), "empty"),
        (lambda d: fx.write_header_only_wav(d / "header.wav"), "empty"),
        (lambda d: fx.write_audio(d / "click.wav", fx.tone(0.01)), "too_short"),
        (lambda d: fx.write_video_only(d / "video.mp4"), "no_audio"),
        (lambda d: fx.write_nan_wav(d / "nan.wav"), "non_finite"),
        (lambda d: fx.write_audio(d / "long.flac", fx.silence(61.0)), "too_long"),
        (
            lambda d: fx.write_truncated(fx.write_audio(d / "a.m4a", fx.tone(3.0)), d / "t.m4a"),
            "decode",
        ),
    ],
)
def test_bad_audio_is_422_with_the_client_kind(gateway, spool, tmp_path, make, kind):
    path = make(tmp_path)
    status, _, row = upload(gateway, path)
    assert (status, row["error_kind"]) == (422, kind), row
    assert row["filename"] == path.name and row["error"]
    raw_status, _, raw = post(gateway, path.read_bytes(), "application/octet-stream")
    assert (raw_status, raw["error_kind"]) == (422, kind)
    assert_no_uploads_left(gateway, spool)


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("?segment=fixed:0", "fixed window"),
        ("?segment=fixed:nan", "fixed window"),
        ("?segment=bogus", "unknown segment mode"),
        ("?alert=angy=0.5", "angry, disgusted, fearful"),
        ("?alert=angry=1.5", "0 <= P <= 1"),
        ("?alert=angry", "LABEL=P"),
        ("?embeddings=maybe", "embeddings"),
        ("?filename=" + "x" * 2000, "filename"),
    ],
)
def test_query_values_out_of_range_are_400(gateway, files, query, needle):
    status, _, body = upload(gateway, files["complaint.mp3"], query)
    assert (status, body["error_kind"]) == (400, "bad_parameter")
    assert needle in body["error"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/json", "application/x-www-form-urlencoded", None]
)
def test_non_audio_content_types_are_415(gateway, files, content_type):
    status, _, body = post(gateway, files["complaint.mp3"].read_bytes(), content_type)
    assert (status, body["error_kind"]) == (415, "unsupported_media")


def test_malformed_multipart_is_400(gateway, spool, files):
    audio = files["complaint.mp3"].read_bytes()
    body, _ = multipart([(b"file", b"a.mp3", audio)])
    cases = {
        "no boundary": (body, "multipart/form-data"),
        "other boundary": (body, "multipart/form-data; boundary=something-else"),
        "cut short": (body[: len(body) // 2], "multipart/form-data; boundary=" + BOUNDARY.decode()),
        "wrong field": multipart([(b"audio", b"a.mp3", audio)]),
        "no parts": (
            b"--" + BOUNDARY + b"--\r\n",
            "multipart/form-data; boundary=" + BOUNDARY.decode(),
        ),
        "too many parts": multipart([(b"file", f"{i}.mp3".encode(), b"x") for i in range(17)]),
        "huge part header": multipart([(b"file", b"a" * 5000 + b".mp3", audio)]),
    }
    bad_headers = body.replace(
        b"Content-Type: application/octet-stream",
        b"\r\n".join(b"X-Header-%d: v" % i for i in range(12)),
    )
    cases["many part headers"] = (bad_headers, cases["wrong field"][1])
    for what, (data, content_type) in cases.items():
        status, _, answer = post(gateway, data, content_type)
        assert (status, answer["error_kind"]) == (400, "bad_request"), what
        assert_no_uploads_left(gateway, spool)
    status, _, answer = post(gateway, *multipart([(b"file", b"a.mp3", audio)] * 16))
    assert status == 200 and len(answer["results"]) == 16  # the bound itself is accepted


def test_unknown_paths_and_methods_answer_json(gateway):
    for method, path, expected in (("GET", "/nope", 404), ("GET", "/predict", 405)):
        status, headers, body = request(gateway, method, path)
        assert status == expected and "error_kind" in json.loads(body)


def test_hostile_filenames_are_escaped_never_paths(gateway, spool, files, tmp_path):
    audio = files["thanks-8k-mulaw.wav"].read_bytes()
    names = {  # as sent in the part header -> as echoed
        b"../../../../tmp/e2v-traversal.wav": "../../../../tmp/e2v-traversal.wav",
        b"caf\xe9-\xff.wav": "caf\\xe9-\\xff.wav",
        b"esc\x1b[31m-tab\t.wav": "esc\\x1b[31m-tab\\x09.wav",
        b"": "upload",
    }
    for raw, shown in names.items():
        status, _, row = post(gateway, *multipart([(b"file", raw, audio)]))
        assert status == 200 and row["filename"] == shown
    assert not Path("/tmp/e2v-traversal.wav").exists()
    status, _, row = post(
        gateway, audio, "audio/wav", "?filename=" + urllib.parse.quote("a\x07b\r\n.wav")
    )
    assert status == 200 and row["filename"] == "a\\x07b\\x0d\\x0a.wav"
    assert_no_uploads_left(gateway, spool)


# --------------------------------------------------------------- sizes, lengths and timing


def test_413_while_streaming_without_growing_memory(gateway, spool):
    limit = LIMIT_MB * 2**20
    # A declared length over the limit is refused before any of the body is sent.
    connection = RawConnection(gateway)
    connection.send(head("application/octet-stream", length=50 * limit))
    status, body = connection.response()
    connection.close()
    assert status == 413 and json.loads(body)["error_kind"] == "too_large"

    # Without a length (chunked), the cap is enforced as the bytes arrive: the answer comes
    # long before the 64 MiB are sent, and peak memory grows far less than the upload.
    try:
        Path(f"/proc/{gateway.pid}/clear_refs").write_text("5")  # reset the peak RSS
    except OSError:
        pytest.skip("cannot reset the gateway's peak RSS (/proc/PID/clear_refs)")
    before = peak_rss_kb(gateway.pid)
    connection = RawConnection(gateway)
    connection.send(head("application/octet-stream", chunked=True))
    block = chunk(os.urandom(2**20))
    while connection.sent < 64 * 2**20 and connection.send(block):
        pass
    status, body = connection.response()
    connection.close()
    assert status == 413 and json.loads(body)["error_kind"] == "too_large"
    assert connection.sent < limit + 16 * 2**20
    growth_mb = (peak_rss_kb(gateway.pid) - before) / 1024
    assert growth_mb < LIMIT_MB, f"peak RSS grew {growth_mb:.1f} MiB for a {LIMIT_MB} MiB cap"
    assert_no_uploads_left(gateway, spool)


def test_large_uploads_spool_to_unnamed_files_that_end_with_the_request(gateway, spool):
    # 3 MiB of noise: past the in-memory part, so it continues on disk.
    data = os.urandom(3 * 2**20)
    connection = RawConnection(gateway)
    connection.send(head("application/octet-stream", length=len(data)))
    connection.send(data[: 2 * 2**20])
    deadline = time.monotonic() + 5
    while not spool_fds(gateway.pid, spool) and time.monotonic() < deadline:
        time.sleep(0.05)
    held = spool_fds(gateway.pid, spool)
    assert held and all(t.endswith("(deleted)") for t in held), held  # on disk, never named
    assert list(spool.iterdir()) == []
    connection.send(data[2 * 2**20 :])
    status, body = connection.response()
    connection.close()
    assert (status, json.loads(body)["error_kind"]) == (422, "decode")
    assert_no_uploads_left(gateway, spool)


def test_lying_content_lengths(gateway, spool, files):
    audio = files["complaint.mp3"].read_bytes()
    # Shorter than the body: the gateway reads what was declared; the rest is not a request.
    connection = RawConnection(gateway)
    connection.send(head("audio/mpeg", length=2000) + audio)
    status, body = connection.response()
    connection.close()
    assert status in (200, 422) and "filename" in json.loads(body)

    # Longer than the body, then silence: a read timeout, not a hang.
    connection = RawConnection(gateway)
    started = time.monotonic()
    connection.send(head("audio/mpeg", length=len(audio) + 5000) + audio)
    status, body = connection.response()
    connection.close()
    assert (status, json.loads(body)["error_kind"]) == (408, "read_timeout")
    assert time.monotonic() - started < READ_TIMEOUT_S + 5

    # Longer than the body, then the client hangs up: nothing is left behind.
    connection = RawConnection(gateway)
    connection.send(head("audio/mpeg", length=len(audio) + 5000) + audio)
    connection.sock.shutdown(socket.SHUT_WR)
    connection.response()
    connection.close()
    assert_no_uploads_left(gateway, spool)
    assert gateway.status("/health") == 200


def test_slowloris_bodies_time_out(gateway, spool):
    # Never silent for long, but far below the minimum average rate.
    connection = RawConnection(gateway)
    started = time.monotonic()
    connection.send(head("audio/wav", length=100_000))
    while connection.send(b"R") and time.monotonic() - started < 30:
        time.sleep(0.4)
    status, body = connection.response()
    connection.close()
    assert (status, json.loads(body)["error_kind"]) == (408, "read_timeout")
    assert time.monotonic() - started < READ_TIMEOUT_S + 5
    assert_no_uploads_left(gateway, spool)


def test_huge_request_headers_are_refused(gateway):
    connection = RawConnection(gateway)
    connection.send(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    status, _ = connection.response()
    connection.close()
    assert status in (None, 400, 431)
    assert gateway.status("/health") == 200


# ------------------------------------------------------------- keys, overload, Triton down


@pytest.fixture(scope="module")
def guarded(tiny_server, tmp_path_factory):
    """One slot, one queue place and an API key."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text("s3cret-key-0123456789\n")
    process = GatewayProcess(
        tiny_server.config.grpc_url,
        "--api-key-file",
        str(key_file),
        "--concurrency",
        "1",
        "--queue",
        "1",
    )
    with process.start(ready=True):
        yield process


KEY = {"Authorization": "Bearer s3cret-key-0123456789"}


def test_api_key(guarded, files):
    path = files["thanks-8k-mulaw.wav"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret"}):
        status, response_headers, body = upload(guarded, path, headers=headers)
        assert (status, body["error_kind"]) == (401, "unauthorized")
        assert "www-authenticate" in response_headers
    assert upload(guarded, path, headers=KEY)[0] == 200
    assert upload(guarded, path, headers={"X-API-Key": "s3cret-key-0123456789"})[0] == 200
    assert guarded.status("/health") == 200 and guarded.status("/ready") == 200


def test_overload_is_refused_with_retry_after(guarded, files, tmp_path):
    path = files["thanks-8k-mulaw.wav"]
    # 20 minutes of speech: its classification keeps the only slot busy for a long while.
    minute, _ = fx.bursts([("speech", 8.0), ("silence", 1.0)] * 7, sr=8000, seed=3)
    call = fx.write_audio(tmp_path / "call.wav", np.tile(minute, 19), 8000, codec="pcm_mulaw")
    data = call.read_bytes()
    holder = RawConnection(guarded)
    holder.send(head("audio/wav", len(data), extra=(f"Authorization: {KEY['Authorization']}",)))
    holder.send(data)
    deadline = time.monotonic() + 10
    while "e2v_gateway_in_flight_requests 1.0" not in metrics_text(guarded):
        assert time.monotonic() < deadline, "the long call never took the slot"
        time.sleep(0.05)
    # A slow body holds no slot: it does not stop the queue from working.
    slow = RawConnection(guarded)
    slow.send(head("audio/wav", 100_000, extra=(f"Authorization: {KEY['Authorization']}",)))
    slow.send(b"RIFF")
    queued: list = []
    waiter = threading.Thread(target=lambda: queued.append(upload(guarded, path, headers=KEY)))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.5)
    status, headers, body = upload(guarded, path, headers=KEY)  # the queue is full: at once
    assert (status, body["error_kind"]) == (429, "busy") and headers["retry-after"] == "1"
    assert time.monotonic() - started < 1.9
    waiter.join(30)
    status, headers, body = queued[0]  # waited for a slot, in vain
    assert (status, body["error_kind"]) == (429, "busy") and "retry-after" in headers
    holder.close()  # hanging up cancels the long call and hands its slot back
    slow.send(b"\0" * (100_000 - 4))
    assert slow.response()[0] == 422
    slow.close()
    assert upload(guarded, path, headers=KEY)[0] == 200


def metrics_text(gateway) -> str:
    return request(gateway, "GET", "/metrics")[2].decode()


def test_triton_unreachable_then_up_then_gone(tiny_cpu_repo, files):
    from e2v.serve import ServerConfig, TritonServer

    http_port, grpc_port, metrics_port = free_ports(3)
    config = ServerConfig(
        tiny_cpu_repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
    )
    with GatewayProcess(config.grpc_url).start(ready=False) as gateway:
        assert gateway.status("/health") == 200
        status, headers, body = request(gateway, "GET", "/ready")
        assert status == 503 and headers["retry-after"] == "5"
        status, headers, body = upload(gateway, files["complaint.mp3"])
        assert (status, body["error_kind"]) == (503, "unavailable") and "retry-after" in headers
        with TritonServer(config):
            deadline = time.monotonic() + 30
            while gateway.status("/ready") != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert gateway.status("/ready") == 200
            assert upload(gateway, files["complaint.mp3"])[0] == 200
        assert gateway.status("/ready") == 503
        status, headers, body = upload(gateway, files["complaint.mp3"])
        assert (status, body["error_kind"]) == (503, "unavailable") and "retry-after" in headers


# ------------------------------------------------------------------ metrics, docs, page


def test_metrics(gateway, files, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    upload(gateway, files["paused.flac"])
    upload(gateway, fx.write_random_bytes(tmp_path / "bad.wav"))
    status, headers, body = request(gateway, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    value = lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    assert value("e2v_gateway_requests_total", endpoint="/predict", status="200") >= 1
    assert value("e2v_gateway_requests_total", endpoint="/predict", status="422") >= 1
    assert value("e2v_gateway_errors_total", kind="decode") >= 1
    assert value("e2v_gateway_audio_seconds_total") > 9
    for stage in ("decode", "vad", "inference"):
        assert value("e2v_gateway_stage_duration_seconds_count", stage=stage) >= 1
        assert value("e2v_gateway_stage_duration_seconds_sum", stage=stage) > 0
    assert value("e2v_gateway_request_duration_seconds_count", endpoint="/predict") >= 2
    assert ("e2v_gateway_in_flight_requests", ()) in samples
    assert value("e2v_gateway_triton_ready") == 1
    assert value("process_cpu_seconds_total") > 0


def test_openapi_documents_the_upload(gateway):
    status, _, body = request(gateway, "GET", "/openapi.json")
    spec = json.loads(body)
    predict = spec["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "audio/*", "application/octet-stream"} <= set(
        predict["requestBody"]["content"]
    )
    assert {"200", "400", "401", "413", "415", "422", "429", "503"} <= set(predict["responses"])
    assert {p["name"] for p in predict["parameters"]} == {
        "segment",
        "alert",
        "embeddings",
        "filename",
        "channels",
        "parties",
    }
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    calls = spec["paths"]["/v1/calls"]["get"]
    (alerting,) = calls["parameters"]
    assert (alerting["name"], alerting["schema"]["type"]) == ("alerting", "boolean")
    assert {"200", "401", "503"} <= set(calls["responses"])
    row = spec["components"]["schemas"]["CallOut"]
    assert {"call_id", "protocol", "parties", "started", "replica", "latest", "alerts"} <= set(
        row["required"]
    )
    assert request(gateway, "GET", "/docs")[0] == 200


def _browser():
    """Debian's chromium + chromedriver, or a skip (outside CI only) saying what is missing."""
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver and webdriver):
        message = "selenium (dev extra), chromium and chromium-driver (apt) are needed"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run it (scripts/setup.sh installs them as root)")
        pytest.skip(message + " (not skipped when CI is set)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,1000",
    ):
        options.add_argument(flag)
    return webdriver, options, driver


def test_page_uploads_a_sample_and_draws_the_timeline(gateway, tmp_path):
    webdriver, options, driver_path = _browser()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    service = webdriver.ChromeService(executable_path=driver_path)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(gateway.url + "/")
        assert "emotion2vec" in browser.title
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        Select(browser.find_element(By.ID, "segment")).select_by_value("fixed:3")
        browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "complaint.mp3"))
        WebDriverWait(browser, 60).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".timeline .segment"))
        )
        segments = browser.find_elements(By.CSS_SELECTOR, ".timeline .segment")
        assert len(segments) == 3  # 8.6 s in 3 s windows
        ActionChains(browser).move_to_element(segments[1]).perform()  # scores on hover
        detail = browser.find_element(By.CSS_SELECTOR, ".segment-detail").text
        assert detail.startswith("3.00-6.00 s") and "angry" in detail and "%" in detail
        assert all("%" in s.get_attribute("title") for s in segments)
        assert browser.find_element(By.ID, "synthetic").is_displayed()
        assert browser.find_element(By.CSS_SELECTOR, ".filename").text == "complaint.mp3"
        assert (
            browser.find_element(By.CSS_SELECTOR, ".download")
            .get_attribute("href")
            .startswith("blob:")
        )
        assert browser.find_element(By.CSS_SELECTOR, ".emotion").text
        # <unk> is in the JSON's scores (compatibility) but never an answer: not on the page
        bars = browser.find_element(By.CSS_SELECTOR, ".scores").text
        assert "angry" in bars and "<unk>" not in bars, bars
        assert all("<unk>" not in s.get_attribute("title") for s in segments)
        # The page's copy of the rule (app.js `predictable`) is contract's.
        from e2v.contract import is_answer_label

        labels = ["angry", "生气/angry", "<unk>", "unuse_0", "unused", "unk", "<UNK>", "x<unk>"]
        page = browser.execute_script("return arguments[0].map(predictable)", labels)
        assert page == [is_answer_label(label) for label in labels]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        out = ROOT / "build"
        out.mkdir(exist_ok=True)
        browser.save_screenshot(str(out / "gateway-page.png"))
    finally:
        browser.quit()


# ------------------------------------------------------------------------ without extras


def test_e2v_works_without_the_gateway_extra(tmp_path):
    """With FastAPI and friends unimportable, every other command still works and
    `e2v gateway` says which extra to install."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'fastapi', 'starlette', 'uvicorn', "
        "'python_multipart', 'multipart', 'prometheus_client'}:\n"
        "            raise ImportError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "e2v", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert run("--help").returncode == 0
    assert run("classify", "--help").returncode == 0
    assert run("gateway", "--help").returncode == 0
    result = run("gateway", "--triton", "127.0.0.1:1")
    assert result.returncode == 2 and "[gateway]" in result.stderr


# ---------------------------------------------------------------------------- deployment


def test_kubernetes_gateway_renders_validates_and_alone_reaches_triton():
    from test_deploy import K8S_DIR, _validate, find, render, render_overlay

    from e2v import contract

    docs = render(K8S_DIR / "gateway")
    assert _validate(docs) == ["ServiceMonitor/emotion2vec-gateway"]
    assert {d["metadata"]["namespace"] for d in docs} == {"emotion2vec"}
    template = find(docs, "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    triton = render_overlay("gpu")
    host, port = args["url"].removeprefix("dns:///").split(":")
    headless = find(triton, "Service", host)  # every Triton pod: requests are balanced
    assert headless["spec"]["clusterIP"] == "None"
    assert int(port) == contract.GRPC_PORT
    assert int(args["port"]) == contract.GATEWAY_PORT == container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == contract.GATEWAY_READY_PATH
    assert container["livenessProbe"]["httpGet"]["path"] == contract.GATEWAY_LIVE_PATH
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    assert not security["allowPrivilegeEscalation"] and security["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == args["spool-dir"]]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == tmp["name"]]
    size_gi = float(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert size_gi * 1024 >= int(args["concurrency"]) * float(args["max-upload-mb"])
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment")["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    # Triton admits the gateway's pods (by label) on its inference ports, and no pod
    # without that label; the gateway itself may only reach Triton, DNS and the bus (the
    # shipped gateway runs with --bus: deploy/k8s/components/bus).
    labels = template["metadata"]["labels"]
    server_policy = find(triton, "NetworkPolicy")
    inference = [
        rule
        for rule in server_policy["spec"]["ingress"]
        if {p["port"] for p in rule["ports"]} & {contract.GRPC_PORT, contract.HTTP_PORT}
    ]
    selectors = [source["podSelector"]["matchLabels"] for r in inference for source in r["from"]]
    assert selectors and all(s.items() <= labels.items() for s in selectors)
    assert all("emotion2vec-client" in s for s in selectors)
    own = find(docs, "NetworkPolicy")["spec"]
    assert set(own["policyTypes"]) == {"Ingress", "Egress"}
    allowed = {p["port"] for rule in own["egress"] for p in rule["ports"]}
    assert allowed == {contract.GRPC_PORT, contract.HTTP_PORT, 53, contract.NATS_PORT}


def test_gateway_image_and_compose_service():
    import yaml
    from test_deploy import DOCKER_DIR, _instructions, _only

    from e2v import contract

    instructions = _instructions(DOCKER_DIR / "gateway.Dockerfile")
    assert json.loads(_only(instructions, "ENTRYPOINT")) == ["e2v", "gateway"]
    assert _only(instructions, "EXPOSE") == str(contract.GATEWAY_PORT)
    assert f":{contract.GATEWAY_PORT}{contract.GATEWAY_LIVE_PATH}'" in _only(
        instructions, "HEALTHCHECK"
    )
    compose = yaml.safe_load((DOCKER_DIR / "docker-compose.yml").read_text())["services"]
    service = compose["gateway"]
    command = service["command"]
    assert command[command.index("--url") + 1] == f"server:{contract.GRPC_PORT}"
    assert service["ports"] == [f"127.0.0.1:{contract.GATEWAY_PORT}:{contract.GATEWAY_PORT}"]
    assert service["read_only"] is True and any(t.startswith("/tmp") for t in service["tmpfs"])

    # The slim image installs the client's runtime and the extra by hand: nothing missing.
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda spec: spec.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0]  # noqa: E731
    required = {name(s).strip().lower() for s in pyproject["optional-dependencies"]["gateway"]}
    required |= {"numpy", "tritonclient", "av", "soxr", "onnxruntime"}
    listed = {
        name(line).strip().lower()
        for line in (DOCKER_DIR / "gateway-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert required <= listed, required - listed
    assert "silero-vad==" in (DOCKER_DIR / "gateway.Dockerfile").read_text()
