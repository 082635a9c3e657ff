"""`e2v classify --channels split`: each channel of a call is its own party.

Real dual-channel calls (two espeak-ng voices saying different things, the agent
answering over the customer's last words) as 8 kHz mu-law WAV and 44.1 kHz FLAC, against
the real tiny Triton server through the real CLI: each party's result equals `e2v
classify` on that channel extracted to a mono file; a mono file is one party, a
3-channel file with two names an error row; the conversation figures equal a direct
computation from the segments' times; per-party alerts fire on their party only; CSV
rows per (file, party) come out exactly once after a SIGKILL and --resume, and `e2v
merge` combines a sharded split job. The synthetic model's labels are meaningless.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.client.audio import load_audio, stream_audio
from test_live_codecs import g711_wav, wav_payload

E2V = [sys.executable, "-m", "e2v"]
TOL = 1e-5
# A call longer than one segment (30 s), so the VAD's regions, not the whole clip, are
# what each party sends: turns alternate, with the pause before each turn (negative: the
# agent starts over the customer's last words).
TURNS = [
    ("customer", 0.5, "I have been waiting for my refund for three weeks now."),
    ("agent", -0.6, "I am sorry to hear that, let me look at your account."),
    ("customer", 0.4, "Nobody answers my emails and I want to speak to a manager."),
    ("agent", 2.5, "I can see the refund here, it was sent this morning."),
    ("customer", 0.7, "This morning? I was told the same thing last Monday."),
    ("agent", 0.5, "I understand. I will send you the transfer reference by email today."),
    ("customer", 1.2, "Fine, but if it is not there tomorrow I will cancel my contract."),
    ("agent", 0.6, "Of course. Is there anything else I can help you with?"),
    ("customer", 0.8, "No, that is all. Goodbye."),
]
VOICES = {"customer": ("en-us+m3", 140), "agent": ("en+f2", 175)}


def _say(text: str, voice: str, speed: int, path: Path, rate: int) -> np.ndarray:
    binary = shutil.which("espeak-ng")
    if binary is None:
        pytest.skip("espeak-ng not installed")
    subprocess.run([binary, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    return load_audio(path, sample_rate=rate)


def _call(root: Path, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(customer, agent) at `rate`, each channel silent while the other party talks."""
    tracks = {"customer": np.zeros(0, np.float32), "agent": np.zeros(0, np.float32)}
    end = 0
    for i, (party, pause_s, text) in enumerate(TURNS):
        voice, speed = VOICES[party]
        speech = _say(text, voice, speed, root / f"turn{i}-{rate}.wav", rate)
        start = max(0, end + round(pause_s * rate))
        track = tracks[party]
        track = np.pad(track, (0, max(0, start + len(speech) - len(track))))
        track[start : start + len(speech)] += speech
        tracks[party], end = track, start + len(speech)
    n = end + rate  # a second of silence at the end
    customer, agent = (np.pad(t, (0, n - len(t))) for t in tracks.values())
    return customer, agent


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parties")
    files: dict[str, Path] = {}
    c8, a8 = _call(root, 8000)
    files["mulaw"] = fx.write_audio(root / "call-mulaw.wav", np.stack([c8, a8]), 8000, "pcm_mulaw")
    payload = wav_payload(files["mulaw"])
    for i, party in enumerate(("customer", "agent")):  # the same mu-law codes, one channel
        files[f"mulaw-{party}"] = g711_wav(root / f"mulaw-{party}.wav", payload[i::2], "mulaw")
    c44, a44 = _call(root, 44_100)
    files["flac"] = fx.write_audio(root / "call-flac.flac", np.stack([c44, a44]), 44_100)
    decoded = np.concatenate(list(stream_audio(files["flac"], 44_100, mix=False)), axis=1)
    for i, party in enumerate(("customer", "agent")):  # lossless: the same 16-bit samples
        files[f"flac-{party}"] = fx.write_audio(root / f"flac-{party}.flac", decoded[i], 44_100)
    c16, a16 = _call(root, 16_000)
    files["mono"] = fx.write_audio(root / "mono.wav", c16, 16_000)
    files["three"] = _wav3(root / "three.wav", np.stack([c16, a16, c16[::-1].copy()]))
    return files


def _wav3(path: Path, planes: np.ndarray, rate: int = 16_000) -> Path:
    """A 3-channel 16-bit WAV (PyAV's writer in audio_fixtures does mono and stereo)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(len(planes))
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(planes.T, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def classify(server, paths, *extra, code: int | None = 0) -> tuple[dict[str, dict], str]:
    """The real CLI with --json: ({file name: row}, stderr)."""
    command = [*E2V, "classify", "--no-progress", "--json", "--url", server.config.grpc_url]
    done = subprocess.run(
        [*command, *extra, *map(str, paths)], capture_output=True, text=True, timeout=300
    )
    if code is not None:
        assert done.returncode == code, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {Path(row["file"]).name: row for row in rows}, done.stderr


def _same(party: dict, mono: dict) -> None:
    """A party of a split file equals `e2v classify` of its channel alone, to 1e-5."""
    assert party["emotion"] == mono["emotion"]
    assert party["confidence"] == pytest.approx(mono["confidence"], abs=TOL)
    assert party["scores"] == pytest.approx(mono["scores"], abs=TOL)
    assert party["no_speech"] == mono["no_speech"]
    assert len(party["segments"]) == len(mono["segments"]) > 0
    for mine, theirs in zip(party["segments"], mono["segments"]):
        assert mine["start_s"] == pytest.approx(theirs["start_s"], abs=TOL)
        assert mine["end_s"] == pytest.approx(theirs["end_s"], abs=TOL)
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=TOL)
    speech = sum(s["end_s"] - s["start_s"] for s in mono["segments"])
    assert party["speech_s"] == pytest.approx(speech, abs=TOL)


def test_each_party_equals_classify_on_its_channel(tiny_server, calls):
    stereo = [calls["mulaw"], calls["flac"]]
    split, _ = classify(tiny_server, stereo, "--parties", "customer,agent")
    mono, _ = classify(tiny_server, [calls[f"{k}-{p}"] for k in ("mulaw", "flac")
                                     for p in ("customer", "agent")])  # fmt: skip
    for kind in ("mulaw", "flac"):
        row = split[calls[kind].name]
        assert row["channels"] == "split" and row["synthetic"]
        assert [(p["party"], p["channel"]) for p in row["parties"]] == [
            ("customer", 0),
            ("agent", 1),
        ]
        for party in row["parties"]:
            _same(party, mono[f"{kind}-{party['party']}.{calls[kind].suffix[1:]}"])
        customer, agent = row["parties"]
        assert customer["segments"] != agent["segments"]  # different speech on each channel
        # the file level reports the party named first
        assert row["reported_party"] == "customer"
        assert (row["emotion"], row["confidence"]) == (customer["emotion"], customer["confidence"])
        _conversation_matches(row)


def _conversation_matches(row: dict) -> None:
    """The figures, recomputed from the segments' times by interval arithmetic."""
    spans = {
        p["party"]: [(s["start_s"], s["end_s"]) for s in p["segments"]] for p in row["parties"]
    }
    figures = row["conversation"]
    for party, segs in spans.items():
        assert figures["speech_s"][party] == pytest.approx(sum(e - s for s, e in segs), abs=TOL)
    a, b = spans.values()
    overlap = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
    assert overlap > 0.3  # the agent talks over the customer's last words
    assert figures["overlap_s"] == pytest.approx(overlap, abs=TOL)
    merged: list[list[float]] = []
    for start, end in sorted(a + b):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    edges = [0.0] + [t for span in merged for t in span] + [row["duration_s"]]
    gaps = [edges[i + 1] - edges[i] for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]]
    assert figures["silence_s"] == pytest.approx(sum(gaps), abs=TOL)
    assert figures["longest_silence_s"] == pytest.approx(max(gaps), abs=TOL)
    assert figures["longest_silence_s"] > 1.5  # the pause before the customer's second turn


def test_mono_is_one_party_and_extra_channels_are_an_error_row(tiny_server, calls):
    files = [calls["mono"], calls["three"]]
    rows, _ = classify(tiny_server, files, "--parties", "customer,agent", code=4)
    mono, _ = classify(tiny_server, [calls["mono"]])
    (party,) = rows["mono.wav"]["parties"]
    assert (party["party"], party["channel"]) == ("customer", 0)
    _same(party, mono["mono.wav"])
    assert rows["mono.wav"]["conversation"]["overlap_s"] == 0.0
    three = rows["three.wav"]
    assert three["error_kind"] == "channels" and "parties" not in three
    assert "3 channels but 2 party name(s) (customer,agent)" in three["error"]
    # named, the third channel is a party like the others; --channels split alone names
    # the call-centre pair
    named, _ = classify(tiny_server, [calls["three"]], "--parties", "a,b,c")
    assert [p["party"] for p in named["three.wav"]["parties"]] == ["a", "b", "c"]
    default, _ = classify(tiny_server, [calls["mulaw"]], "--channels", "split")
    assert [p["party"] for p in default["call-mulaw.wav"]["parties"]] == ["customer", "agent"]


def test_alerts_fire_on_their_party_only(tiny_server, calls):
    first, _ = classify(tiny_server, [calls["mulaw"]], "--channels", "split")
    label = next(iter(first["call-mulaw.wav"]["parties"][0]["scores"]))
    path = [calls["mulaw"]]
    rows, _ = classify(tiny_server, path, "--parties", "customer,agent",
                       "--alert", f"customer:{label}=0", code=8)  # fmt: skip
    customer, agent = rows["call-mulaw.wav"]["parties"]
    assert [a["label"] for a in customer["alerts"]] == [label] and agent["alerts"] == []
    assert [a["party"] for a in rows["call-mulaw.wav"]["alerts"]] == ["customer"]
    assert customer["alerts"][0]["segments"] == len(customer["segments"])
    bare, _ = classify(tiny_server, path, "--channels", "split", "--alert", f"{label}=0", code=8)
    assert [a["party"] for a in bare["call-mulaw.wav"]["alerts"]] == ["customer", "agent"]
    # a named party's rule overrides the bare one for that party
    both, _ = classify(tiny_server, path, "--channels", "split",
                       "--alert", f"{label}=0,agent:{label}=1", code=8)  # fmt: skip
    assert [a["party"] for a in both["call-mulaw.wav"]["alerts"]] == ["customer"]
    for bad, words in (
        (f"boss:{label}=0.5", "party 'boss' is not one of this stream's: customer, agent"),
        ("customer:nolabel=0.5", "is not one of the model's"),
        (f"customer:{label}=2", "expected LABEL=P"),
    ):
        _, err = classify(tiny_server, path, "--channels", "split", "--alert", bad, code=2)
        assert words in err, err
    _, err = classify(tiny_server, path, "--alert", f"customer:{label}=0.5", code=2)
    assert "needs --channels split" in err
    _, err = classify(tiny_server, path, "--channels", "mix", "--parties", "a,b", code=2)
    assert "--parties names the channels of --channels split" in err
    for bad in ("a,a", "a,,b", "a b", "x" * 65):
        _, err = classify(tiny_server, path, "--parties", bad, code=2)
        assert "--parties" in err, err


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_rows_per_party_exactly_once_after_sigkill_and_resume(tiny_server, calls, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        for kind in ("mulaw", "flac"):
            shutil.copy(calls[kind], inputs / f"{i}-{calls[kind].name}")
    shutil.copy(calls["mono"], inputs / "mono.wav")
    out, vectors = tmp_path / "out.csv", tmp_path / "emb.npy"
    command = [*E2V, "classify", "--no-progress", "--url", tiny_server.config.grpc_url,
               "--parties", "customer,agent", "--csv", str(out), "--embeddings", str(vectors),
               "--concurrency", "2", "--workers", "2", str(inputs)]  # fmt: skip
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and len(_csv_rows(out)) >= 4:  # two files done, others in hand
                break
            time.sleep(0.05)
        assert job.poll() is None, "the job finished before it could be killed"
        os.killpg(job.pid, signal.SIGKILL)  # the job and its worker processes, mid-file
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        job.stderr.close()
    before = _csv_rows(out)
    assert 4 <= len(before) < 25  # killed with files in hand
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _csv_rows(out)
    pairs = [(Path(r["file"]).name, r["party"]) for r in rows]
    expected = {(f"{i}-{calls[k].name}", p) for i in range(6) for k in ("mulaw", "flac")
                for p in ("customer", "agent")} | {("mono.wav", "customer")}  # fmt: skip
    assert sorted(pairs) == sorted(expected)  # every (file, party) once
    assert all(r["parties"] == ("1" if r["file"].endswith("mono.wav") else "2") for r in rows)
    assert rows[: len(before)] == before  # kept as they were, the rest appended
    # the embeddings: one vector per segment of each (file, party), the party indexed
    index = _csv_rows(tmp_path / "emb.index.csv")
    assert list(index[0]) == ["row", "file", "party", "start_s", "end_s"]
    assert len(np.load(vectors)) == len(index) == sum(int(r["segments"]) for r in rows)
    per_party = {(Path(r["file"]).name, r["party"]) for r in index}
    assert per_party == expected
    assert [int(r["row"]) for r in index] == list(range(len(index)))


def test_crash_between_two_party_rows_redoes_the_file_once(tiny_server, calls, tmp_path):
    """The last file's agent row is missing (the crash cut its write between two lines):
    --resume drops the customer row and redoes the file, so both are there once."""
    out = tmp_path / "out.csv"
    files = [calls["mulaw"], calls["flac"]]
    base = [*E2V, "classify", "--no-progress", "--url", tiny_server.config.grpc_url,
            "--channels", "split", "--csv", str(out), "--concurrency", "1"]  # fmt: skip
    subprocess.run([*base, *map(str, files)], check=True, capture_output=True, timeout=300)
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    out.write_bytes(b"".join(lines[:4]))  # header, file 1 x 2, file 2's customer only
    done = subprocess.run([*base, "--resume", *map(str, files)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "dropped 1 row(s) of an unfinished file" in done.stderr
    assert "1 file(s) already done, 1 to go" in done.stderr
    assert out.read_bytes().splitlines(keepends=True)[:3] == lines[:3]
    rows = _csv_rows(out)
    assert sorted((Path(r["file"]).name, r["party"]) for r in rows) == sorted(
        (f.name, p) for f in files for p in ("customer", "agent")
    )


def test_jsonl_parquet_and_merge(tiny_server, calls, tmp_path):
    """A sharded split job: `e2v merge` keeps each (file, party) row, counts files once."""
    import pyarrow.parquet as pq

    files = [calls["mulaw"], calls["three"], calls["mono"]]
    folders = {fmt: tmp_path / fmt for fmt in ("csv", "jsonl", "parquet")}
    for folder in folders.values():
        folder.mkdir()
    for shard in range(2):
        outputs = [a for fmt, folder in folders.items() for a in (f"--{fmt}", f"{folder}/")]
        done = subprocess.run(
            [*E2V, "classify", "--no-progress", "--url", tiny_server.config.grpc_url,
             "--channels", "split", "--shard", f"{shard}/2", *outputs, *map(str, files)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode in (0, 4), done.stderr
    expected = sorted([("call-mulaw.wav", "customer"), ("call-mulaw.wav", "agent"),
                       ("mono.wav", "customer"), ("three.wav", "")])  # fmt: skip
    for fmt, folder in folders.items():
        merged = tmp_path / f"all.{fmt}"
        done = subprocess.run([*E2V, "merge", f"{folder}/", "--out", str(merged)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert (summary["files"], summary["ok"], summary["failures"]) == (3, 2, {"channels": 1})
        if fmt == "jsonl":
            rows = [json.loads(line) for line in merged.read_text().splitlines()]
            assert sorted(Path(r["file"]).name for r in rows) == sorted(f.name for f in files)
            continue
        rows = _csv_rows(merged) if fmt == "csv" else pq.read_table(merged).to_pylist()
        pairs = sorted((Path(r["file"]).name, r["party"] or "") for r in rows)
        assert pairs == expected
        assert {"party", "channel", "speech_s", "overlap_s", "parties"} <= set(rows[0])


def test_webhook_body_names_the_party_without_segments(tiny_server, calls, tmp_path):
    from test_webhooks import SECRET, Receiver

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    first, _ = classify(tiny_server, [calls["mulaw"]], "--channels", "split")
    label = next(iter(first["call-mulaw.wav"]["parties"][0]["scores"]))
    with Receiver() as receiver:
        rows, err = classify(tiny_server, [calls["mulaw"]], "--channels", "split",
                             "--alert", f"agent:{label}=0", "--webhook", receiver.url,
                             "--webhook-secret-file", str(secret), code=8)  # fmt: skip
        assert "webhooks: 1 delivered" in err and receiver.verified()
        (body,) = receiver.bodies()
    assert [a["party"] for a in body["alerts"]] == ["agent"]
    assert [p["party"] for p in body["parties"]] == ["customer", "agent"]
    assert all("segments" not in p for p in body["parties"]) and "segments" not in body
    assert body["alerts"] == rows["call-mulaw.wav"]["alerts"]


def test_conversation_figures_and_party_names():
    """Edge cases of client/parties.py without a server: nobody speaks, three parties,
    touching segments; party names as --parties parses them."""
    from e2v.client.parties import conversation, parse_parties
    from e2v.client.results import SegmentResult

    def segs(*spans):
        return [SegmentResult(a, b, {}, np.zeros(1)) for a, b in spans]

    quiet = conversation({"customer": [], "agent": []}, 12.5)
    assert quiet == {"speech_s": {"customer": 0.0, "agent": 0.0}, "overlap_s": 0.0,
                     "silence_s": 12.5, "longest_silence_s": 12.5}  # fmt: skip
    three = conversation({"a": segs((0, 4)), "b": segs((1, 2), (3, 5)), "c": segs((1.5, 3.5))}, 8)
    # two or more speak throughout [1, 4] (a with b or c); only b on [4, 5]; nobody after
    assert three["overlap_s"] == pytest.approx(3.0)
    assert three["silence_s"] == pytest.approx(3.0) and three["longest_silence_s"] == 3.0
    touching = conversation({"a": segs((0, 2)), "b": segs((2, 3))}, 3)
    assert (touching["overlap_s"], touching["silence_s"]) == (0.0, 0.0)
    assert parse_parties(None) == ("customer", "agent")
    assert parse_parties(" caller , callee ") == ("caller", "callee")
    for bad in ("", "a,", "a,a", "a:b", "a=b", "x" * 65, ",".join(map(str, range(65)))):
        with pytest.raises(ValueError, match="--parties"):
            parse_parties(bad)
