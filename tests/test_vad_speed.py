"""The batched Silero graph: the same bits as Silero's own model, in any chunking and batch."""

from __future__ import annotations

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.client.segment import VAD_PARAMS, SegmentMode, segment_stream
from e2v.client.vad import (
    RegionPadder,
    SequenceVad,
    SpeechTracker,
    StreamingVad,
    batched_model_paths,
    feed_streams,
    silero_model_path,
)
from e2v.export.vad_graph import build

from e2v.contract import SAMPLE_RATE


@pytest.fixture(scope="module")
def call() -> np.ndarray:
    """~100 s over several VAD blocks: pauses of every length, speech to the very end."""
    pattern = [("silence", 0.7), ("speech", 6.0), ("silence", 0.15), ("speech", 4.0)]
    pattern += [("silence", 3.0), ("speech", 50.0), ("silence", 10.0), ("speech", 9.0)]
    pattern += [("silence", 1.2), ("speech", 12.0), ("silence", 0.3), ("speech", 5.0)]
    return fx.bursts(pattern, seed=21)[0]


def random_split(wav: np.ndarray, rng: np.random.Generator, cuts: int) -> list[np.ndarray]:
    return np.split(wav, np.sort(rng.integers(0, len(wav), cuts)))


def probabilities(vad, chunks) -> np.ndarray:
    return np.concatenate([vad.feed(c) for c in chunks] + [vad.finish()])


def test_vendored_batched_graph_is_a_fresh_build():
    """The vendored encoder/recurrent files are what export/vad_graph.py builds now."""
    for model, path in zip(build(silero_model_path()), batched_model_paths(), strict=True):
        assert model.SerializeToString() == path.read_bytes(), f"regenerate {path.name}"


def test_probabilities_equal_silero_model_bit_for_bit(call):
    from silero_vad.sequence_vad import SileroVADSequence

    silero = SileroVADSequence(str(silero_model_path())).audio_forward(call)
    assert np.array_equal(probabilities(StreamingVad(), [call]), silero)
    assert np.array_equal(probabilities(SequenceVad(), [call]), silero)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_chunking_changes_no_bit_nor_region(call, seed):
    from silero_vad.sequence_vad import SileroVADSequence, get_speech_timestamps_sequence

    model = SileroVADSequence(str(silero_model_path()))
    expected = get_speech_timestamps_sequence(call, model, **VAD_PARAMS.silero_kwargs())
    rng = np.random.default_rng(seed)
    vad, tracker, padder = StreamingVad(), SpeechTracker(VAD_PARAMS), RegionPadder(VAD_PARAMS.pad)
    found, probs = [], []
    for chunk in random_split(call, rng, int(rng.integers(5, 2000))):
        probs.append(vad.feed(chunk))
        for region in tracker.push(probs[-1]):
            found += padder.add(*region)
    probs.append(vad.finish())
    for region in tracker.push(probs[-1]) + tracker.finish(len(call)):
        found += padder.add(*region)
    found += padder.finish(len(call))
    assert np.array_equal(np.concatenate(probs), model.audio_forward(call))
    assert found == [(t["start"], t["end"]) for t in expected] and len(found) >= 5


def test_streams_batched_together_keep_their_own_bits(call):
    """feed_streams: streams of different lengths and chunkings in shared ONNX calls."""
    rng = np.random.default_rng(5)
    waves = [call[i * 7_001 :] for i in range(5)] + [call[: SAMPLE_RATE // 3]]
    expected = [probabilities(SequenceVad(), [w]) for w in waves]
    vads = [StreamingVad() for _ in waves]
    pieces = [random_split(w, rng, 300 + 100 * i) for i, w in enumerate(waves)]
    out: list[list[np.ndarray]] = [[] for _ in waves]
    for step in range(max(len(p) for p in pieces)):
        chunks = [p[step] if step < len(p) else np.zeros(0, np.float32) for p in pieces]
        for got, probs in zip(out, feed_streams(vads, chunks), strict=True):
            got.append(probs)
    for got, vad in zip(out, vads, strict=True):
        got.append(vad.finish())
    for want, got in zip(expected, out, strict=True):
        assert np.array_equal(np.concatenate(got), want)


def test_feed_streams_handles_empty_and_long_feeds(call):
    """No frames at all, and more than one block per stream (run stream by stream)."""
    vads = [StreamingVad(), StreamingVad()]
    assert [len(p) for p in feed_streams(vads, [call[:100], call[:0]])] == [0, 0]
    got = feed_streams(vads, [call[100:], call])
    assert np.array_equal(got[0], probabilities(SequenceVad(), [call])[: len(got[0])])
    assert np.array_equal(got[1], probabilities(SequenceVad(), [call])[: len(got[1])])


@pytest.mark.parametrize("seed", [0, 1])
def test_segments_equal_the_previous_path(call, seed, monkeypatch):
    """segment_stream through the new VAD gives the segments and samples of the old one."""
    import e2v.client.segment as segment

    rng = np.random.default_rng(seed)
    chunks = random_split(call, rng, 500)
    new = list(segment_stream(chunks, SegmentMode("vad")))
    monkeypatch.setattr(segment, "StreamingVad", SequenceVad)
    old = list(segment_stream(chunks, SegmentMode("vad")))
    assert [s for s, _ in new] == [s for s, _ in old] and len(new) >= 3
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(new, old, strict=True))


def test_bench_client_times_the_previous_path_in_the_same_run(tmp_path):
    """`e2v bench client` prints the previous VAD path's rates and the ratio, on 8 kHz
    telephony too, and both paths cut the same audio (speed itself is not asserted)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "e2v", "bench", "client", "--utterances", "3", "--calls", "1",
         "--workers", "1", "--json-file", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "previous path" in run.stdout and "mu-law 8 kHz" in run.stdout
    sets = json.loads(out.read_text())["sets"]
    assert [s["name"].split(" (")[0] for s in sets] == ["utterances", "calls", "telephony calls"]
    for row in sets:
        rates = row["per_core"]
        assert rates["same_segments"] == 1.0
        assert rates["vad_vs_previous"] == pytest.approx(rates["vad"] / rates["vad_previous"])
        assert rates["total_previous"] > 0 and rates["total"] > 0
