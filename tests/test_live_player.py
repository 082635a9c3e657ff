"""`e2v live` and the page's live mode against a real gateway in front of the real tritonserver.

`e2v live` runs as a subprocess, as a user runs it, for each protocol (our /v1/live,
AudioHook v2, Twilio Media Streams with its event subscription). A two-party call whose
channels are each longer than one segment (30 s) is played into the gateway; each party's
finals in `--json` output must equal `e2v classify --segment vad` on that channel alone
(boundaries within one VAD frame, scores within 1e-4). Hostile cases: no gateway, a peer
that never answers the handshake, a wrong key, audio too fast, bad arguments. The page's
live mode runs in headless chromium with a fake microphone playing a speech WAV.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.loadtest.gateway_process import GatewayProcess

from e2v.contract import AUDIOHOOK_PARTIES, AUDIOHOOK_PATH, LIVE_PATH, TWILIO_PARTIES, TWILIO_PATH

pytest.importorskip("fastapi", reason="the gateway extra is not installed")
pytest.importorskip("websockets", reason="the live extra is not installed")

ROOT = Path(__file__).resolve().parent.parent
KEY = "live-player-test-key-7f3a"
MAX_SPEED = 40  # the test gateway's --live-max-speed: calls play at SPEED, quickly
SPEED = 10
VAD_FRAME_S = 512 / 16_000  # boundaries may differ by one Silero frame
SCORE_TOLERANCE = 1e-4
# Per channel, seconds of ("speech" | "silence"); both > 30 s, so VAD cuts at the pauses.
CUSTOMER = [("speech", 5), ("silence", 2), ("speech", 7), ("silence", 2.5), ("speech", 4)]
CUSTOMER += [("silence", 6), ("speech", 5), ("silence", 1.5)]
AGENT = [("silence", 3), ("speech", 3), ("silence", 8), ("speech", 6), ("silence", 2)]
AGENT += [("speech", 5), ("silence", 6)]
PARTIES = {
    "live": ("customer", "agent"),
    "audiohook": (AUDIOHOOK_PARTIES["external"], AUDIOHOOK_PARTIES["internal"]),
    "twilio": (TWILIO_PARTIES["inbound"], TWILIO_PARTIES["outbound"]),
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("live-key") / "key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture(scope="module")
def gateway(tiny_server, key_file):
    process = GatewayProcess(
        tiny_server.config.grpc_url,
        "--api-key-file",
        str(key_file),
        "--live-max-speed",
        str(MAX_SPEED),
    )
    with process.start(ready=True):
        yield process


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> dict[str, Path]:
    """The call as stereo files (mu-law 8 kHz, s16le 16 kHz) and each channel alone."""
    folder = tmp_path_factory.mktemp("live-calls")
    files = {}
    for rate, codec, name in ((8000, "pcm_mulaw", "8k"), (16_000, "pcm_s16le", "16k")):
        customer, _ = fx.bursts(CUSTOMER, sr=rate, seed=11)
        agent, _ = fx.bursts(AGENT, sr=rate, seed=31)
        assert len(customer) == len(agent) > 30 * rate
        channels = {"call": np.stack([customer, agent]), "customer": customer, "agent": agent}
        for stem, wav in channels.items():
            path = folder / f"{stem}-{name}.wav"
            files[path.stem] = fx.write_audio(path, wav, rate, codec=codec)
    return files


@pytest.fixture(scope="module")
def offline(tiny_server, calls) -> dict[str, list[dict]]:
    """`e2v classify --segment vad --json` segments of each channel file."""
    paths = [path for name, path in calls.items() if not name.startswith("call-")]
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


# ------------------------------------------------------------------------------ helpers


def ws_url(gateway: GatewayProcess) -> str:
    return gateway.url.replace("http://", "ws://")


def live(*args: str, timeout: float = 120, env=None) -> tuple[int, list[dict], str]:
    """`e2v live ARGS --json`: (exit status, events, stderr)."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "e2v", "live", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    print(f"e2v live {' '.join(args)}: {time.monotonic() - started:.1f} s, rc {result.returncode}")
    return result.returncode, events, result.stderr


def assert_finals_equal_offline(finals: list[dict], segments: list[dict], party: str) -> None:
    assert len(segments) >= 3, segments  # cut at the pauses: not one whole-file segment
    assert len(finals) == len(segments), (party, finals, segments)
    for final, segment in zip(finals, segments):
        for edge in ("start_s", "end_s"):
            assert abs(final[edge] - segment[edge]) <= VAD_FRAME_S + 1e-6, (party, edge, final)
        moved = abs(final["start_s"] - segment["start_s"]) + abs(final["end_s"] - segment["end_s"])
        if moved < 1e-6:
            assert final["emotion"] == segment["emotion"], party
            for label, score in segment["scores"].items():
                assert abs(final["scores"][label] - score) <= SCORE_TOLERANCE, (party, label)


def test_the_decoder_keeps_the_channels_of_a_stereo_file_apart(tmp_path):
    """stream_audio(mix=False): each channel is what that channel alone decodes to, and
    their mean is the mono decode (the one decode loop; resampled per channel)."""
    from e2v.client.audio import load_audio, stream_audio

    left, right = fx.speech_like(3.1, 44_100, seed=1), fx.speech_like(3.1, 44_100, seed=2)
    stereo = fx.write_audio(tmp_path / "s.wav", np.stack([left, right]), 44_100)
    chunks = list(stream_audio(str(stereo), 8000, mix=False))
    assert all(c.ndim == 2 and len(c) == 2 and c.dtype == np.float32 for c in chunks)
    channels = np.concatenate(chunks, axis=1)
    alone = [fx.write_audio(tmp_path / f"{i}.wav", w, 44_100) for i, w in enumerate((left, right))]
    for channel, path in zip(channels, alone):
        assert np.array_equal(channel, load_audio(str(path), 8000))
    assert np.abs(channels.mean(axis=0) - load_audio(str(stereo), 8000)).max() < 1e-6


# ------------------------------------------------------------------- calls, per protocol


@pytest.mark.parametrize(
    ("protocol", "file", "extra"),
    [
        ("live", "16k", []),  # pcm_s16le 16 kHz: the same int16 samples as the file's
        ("live", "8k", ["--encoding", "mulaw", "--sample-rate", "8000"]),
        ("audiohook", "8k", []),
        ("twilio", "8k", []),
    ],
)
def test_a_stereo_call_gives_each_party_the_finals_of_classify(
    gateway, key_file, calls, offline, protocol, file, extra
):
    call_id = str(uuid.uuid4())  # AudioHook's conversationId is a UUID
    code, events, stderr = live(
        str(calls[f"call-{file}"]),
        "--url",
        ws_url(gateway),
        "--protocol",
        protocol,
        "--speed",
        str(SPEED),
        "--api-key-file",
        str(key_file),
        "--call-id",
        call_id,
        *extra,
    )
    assert code == 0, stderr
    assert "SYNTHETIC" in stderr  # every protocol says so (AudioHook/Twilio: from the summary)
    assert events and events[-1]["type"] == "summary", events[-3:]
    assert all(e["call_id"] == call_id for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert any(e["type"] == "result" and e["interim"] for e in events)
    summary = events[-1]
    customer, agent = PARTIES[protocol]
    assert [p["party"] for p in summary["parties"]] == [customer, agent]
    for party, channel in ((customer, "customer"), (agent, "agent")):
        finals = [e for e in events if e["type"] == "utterance.end" and e["party"] == party]
        assert_finals_equal_offline(finals, offline[f"{channel}-{file}"], party)


def test_the_table_names_each_event(gateway, key_file):
    """Without --json: one readable line per event, the summary last, the synthetic note."""
    result = subprocess.run(
        [sys.executable, "-m", "e2v", "live", str(ROOT / "samples" / "call-8k-stereo.wav")]
        + ["--url", ws_url(gateway), "--speed", "8", "--api-key-file", str(key_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(" customer " in line and " utterance.end " in line for line in lines), lines
    assert any(" agent " in line and " utterance.end " in line for line in lines), lines
    assert " summary " in lines[-1] and "customer:" in lines[-1] and "agent:" in lines[-1]
    assert lines[-1].endswith("[synthetic model]")
    assert "SYNTHETIC" in result.stderr


def test_one_party_name_mixes_a_stereo_call_into_one_party(gateway, key_file):
    code, events, stderr = live(
        str(ROOT / "samples" / "call-8k-stereo.wav"),
        "--url",
        ws_url(gateway),
        "--speed",
        "20",
        "--parties",
        "line",
        "--api-key-file",
        str(key_file),
    )
    assert code == 0, stderr
    assert [p["party"] for p in events[-1]["parties"]] == ["line"]
    assert {e["party"] for e in events[:-1]} == {"line"}
    assert any(e["type"] == "utterance.end" for e in events)


def test_a_call_in_object_storage_plays_from_its_uri(gateway, key_file):
    """s3:// through the batch path's inputs (fsspec), on a real S3-protocol server."""
    pytest.importorskip("s3fs", reason="the s3 extra is not installed")
    import s3fs
    from servers import S3Server

    server = S3Server()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=server.url, key="testing", secret="testing")
        fs.mkdir("calls")
        fs.put(str(ROOT / "samples" / "call-8k-stereo.wav"), "calls/2026/call.wav")
        common = ["--url", ws_url(gateway), "--speed", "20", "--api-key-file", str(key_file)]
        code, events, stderr = live("s3://calls/2026/call.wav", *common, env=server.env())
        assert code == 0, stderr
        assert [p["party"] for p in events[-1]["parties"]] == ["customer", "agent"]
        code, events, stderr = live("s3://calls/2026/absent.wav", *common, env=server.env())
        assert code == 1 and events == [] and "no such object" in stderr, stderr
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("protocol", "path"),
    [("live", LIVE_PATH), ("audiohook", AUDIOHOOK_PATH), ("twilio", TWILIO_PATH)],
)
def test_the_url_may_be_the_protocol_s_own_endpoint(gateway, key_file, protocol, path):
    """The endpoint's URL, the first thing a user pastes, works like the gateway's base
    (Twilio's subscription is on the same base: /v1/calls/{callSid}/events/ws)."""
    code, events, stderr = live(
        str(ROOT / "samples" / "thanks-8k-mulaw.wav"),
        "--url",
        ws_url(gateway) + path,
        "--protocol",
        protocol,
        "--speed",
        "20",
        "--api-key-file",
        str(key_file),
    )
    assert code == 0, stderr
    assert events and events[-1]["type"] == "summary", events[-3:]


@pytest.mark.parametrize(
    ("protocol", "path", "right"),
    [("live", AUDIOHOOK_PATH, LIVE_PATH), ("twilio", LIVE_PATH, TWILIO_PATH)],
)
def test_another_protocol_s_endpoint_is_a_usage_error_naming_the_right_one(protocol, path, right):
    """Exit 2 before connecting (nothing listens on port 9: a try would fail with 1)."""
    sample = str(ROOT / "samples" / "thanks-8k-mulaw.wav")
    code, events, stderr = live(sample, "--url", f"ws://127.0.0.1:9{path}", "--protocol", protocol)
    assert code == 2 and events == [], stderr
    line = stderr.strip()
    assert line.startswith("error:") and line.count("\n") == 0, stderr
    assert f"ws://127.0.0.1:9{right}" in line and f"--protocol {protocol} connects to" in line
    other = "audiohook" if path == AUDIOHOOK_PATH else "live"
    assert f"pass --protocol {other}" in line


# -------------------------------------------------------------------------- hostile cases


def test_no_gateway_listening_fails_in_one_line():
    (port,) = _free_port()
    started = time.monotonic()
    sample = str(ROOT / "samples" / "complaint.mp3")
    code, events, stderr = live(sample, "--url", f"ws://127.0.0.1:{port}")
    assert code == 1 and events == []
    assert stderr.strip().count("\n") == 0 and "cannot connect" in stderr, stderr
    assert time.monotonic() - started < 30


def test_a_peer_that_never_answers_the_handshake_times_out(monkeypatch):
    """A TCP listener that never speaks (the kernel completes the TCP handshake, nobody
    answers the upgrade): bounded by CONNECT_TIMEOUT_S (shortened here)."""
    import asyncio

    from e2v.client.live import player

    monkeypatch.setattr(player, "CONNECT_TIMEOUT_S", 1.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"ws://127.0.0.1:{server.getsockname()[1]}"
        options = player.PlayOptions(str(ROOT / "samples" / "complaint.mp3"), url)
        started = time.monotonic()
        with pytest.raises(player.PlayError, match="no WebSocket handshake within 1 s"):
            asyncio.run(player.play(options, lambda event: None))
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("protocol", ["live", "audiohook", "twilio"])
def test_a_wrong_key_prints_the_gateway_s_reason(gateway, tmp_path, protocol):
    wrong = tmp_path / "wrong-key"
    wrong.write_text("not-the-key")
    code, events, stderr = live(
        str(ROOT / "samples" / "thanks-8k-mulaw.wav"),
        "--url",
        ws_url(gateway),
        "--protocol",
        protocol,
        "--api-key-file",
        str(wrong),
    )
    assert code == 1, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and ("1008" in line or "HTTP 401" in line), stderr
    assert not [e for e in events if e["type"] == "utterance.end"]


def test_audio_faster_than_the_gateway_allows_is_closed_with_its_reason(gateway, key_file, calls):
    code, events, stderr = live(
        str(calls["call-16k"]),
        "--url",
        ws_url(gateway),
        "--speed",
        "100",
        "--api-key-file",
        str(key_file),
    )
    assert code == 1
    assert f"above this gateway's {MAX_SPEED}x" in stderr and "4429" in stderr, stderr
    assert any(e["type"] == "error" and e["code"] == 4429 for e in events), events[-3:]


def test_a_peer_that_goes_silent_after_stop_is_given_up_on(monkeypatch):
    """A WebSocket peer that answers `started`, takes the audio and then never sends a
    summary: the player gives up END_TIMEOUT_S after `stop` (shortened here)."""
    import asyncio

    from e2v.client.live import player
    from websockets.asyncio.server import serve

    monkeypatch.setattr(player, "END_TIMEOUT_S", 1.5)
    received: list[str] = []

    async def silent(ws) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "started", "call_id": "c", "model": "m"}))
        async for message in ws:
            if isinstance(message, str):
                received.append(json.loads(message)["type"])
        await asyncio.sleep(30)  # never answers, never closes

    async def scenario() -> float:
        async with serve(silent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            options = player.PlayOptions(
                str(ROOT / "samples" / "thanks-8k-mulaw.wav"), f"ws://127.0.0.1:{port}", speed=50
            )
            started = time.monotonic()
            with pytest.raises(player.PlayError, match="no answer from the gateway for 1.5 s"):
                await player.play(options, lambda event: None)
            return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    assert received == ["stop"] and elapsed < 10


def test_a_gateway_that_dies_mid_call_fails_the_call_at_once(tiny_server, calls):
    """SIGKILL: no close frame, no summary; one line says the connection dropped."""
    doomed = GatewayProcess(tiny_server.config.grpc_url).start(ready=True)
    try:
        player = subprocess.Popen(
            [sys.executable, "-m", "e2v", "live", str(calls["call-8k"])]
            + ["--url", ws_url(doomed), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = player.stdout.readline()  # an event: the call is under way
        assert json.loads(first)["type"] == "utterance.start"
        doomed.process.kill()
        killed = time.monotonic()
        _, stderr = player.communicate(timeout=60)
    finally:
        doomed.stop()
    assert player.returncode == 1 and time.monotonic() - killed < 15
    assert "connection to the gateway dropped" in stderr and stderr.count("\n") <= 3, stderr


def test_bad_arguments_and_bad_files(tmp_path):
    sample = str(ROOT / "samples" / "complaint.mp3")
    assert live(sample, "--speed", "0")[0] == 2
    assert live(sample, "--protocol", "twilio", "--parties", "a,b")[0] == 2
    assert live(sample, "--api-key-file", str(tmp_path / "missing"))[0] == 2
    assert live(sample, "--parties", "a,b,c")[0] == 2
    assert live(sample, "--url", "http//nope")[0] == 2
    text = fx.write_text(tmp_path / "notes.wav")
    code, _, stderr = live(str(text), "--url", "ws://127.0.0.1:9")
    assert code == 1 and "cannot decode" in stderr, stderr
    code, _, stderr = live(str(tmp_path / "absent.wav"))
    assert code == 1 and "not found" in stderr, stderr


def _free_port() -> tuple[int]:
    from servers import free_ports

    return tuple(free_ports(1))


# ------------------------------------------------------------------ the page's live mode


def test_page_live_mode_fills_the_timeline_from_the_microphone(gateway, tmp_path):
    """Chromium's fake microphone plays a speech WAV (looped); Live streams it to /v1/live
    (key via ?key=) and finals appear on the timeline; a screenshot goes to build/."""
    from test_gateway import _browser

    webdriver, options, driver_path = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pattern = [("speech", 2.5), ("silence", 1.6), ("speech", 3.0), ("silence", 2.0)]
    speech, _ = fx.bursts(pattern, sr=48_000, seed=3)
    wav = fx.write_audio(tmp_path / "microphone.wav", speech, 48_000)
    for flag in (
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        browser.get(gateway.url + "/")
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        key = browser.find_element(By.ID, "key")
        key.send_keys("wrong-key")  # first refused: the close code and reason are shown
        browser.find_element(By.ID, "live").click()
        WebDriverWait(browser, 20).until(lambda b: "1008" in b.find_element(By.ID, "status").text)
        assert "wrong API key" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "live").text == "Live"  # ready to try again
        key.clear()
        key.send_keys(KEY)
        browser.find_element(By.ID, "alert").send_keys("angry=0.01")
        browser.find_element(By.ID, "live").click()
        seen = {"interim": 0, "final": 0}

        def finals_and_an_interim_window(_) -> bool:
            interim = _count(browser, ".timeline .segment.interim")
            seen["interim"] = max(seen["interim"], interim)
            seen["final"] = _count(browser, ".timeline .segment:not(.interim)")
            return seen["final"] >= 2 and interim > 0  # the screenshot shows both

        WebDriverWait(browser, 60, poll_frequency=0.1).until(finals_and_an_interim_window)
        assert browser.find_element(By.ID, "synthetic").is_displayed()
        assert "Live: microphone" in browser.find_element(By.CSS_SELECTOR, ".live .filename").text
        assert browser.find_elements(By.CSS_SELECTOR, ".timeline .alert-mark")
        out = ROOT / "build"
        out.mkdir(exist_ok=True)
        browser.save_screenshot(str(out / "gateway-live.png"))
        browser.find_element(By.ID, "live").click()  # Stop live: the last finals, the summary
        WebDriverWait(browser, 30).until(
            lambda b: b.find_element(By.ID, "status").text.startswith("Live: done")
        )
        assert browser.find_element(By.CSS_SELECTOR, ".live .download").is_displayed()
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()


def _count(browser, selector: str) -> int:
    from selenium.webdriver.common.by import By

    return len(browser.find_elements(By.CSS_SELECTOR, selector))
