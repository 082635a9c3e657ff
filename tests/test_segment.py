"""Segmentation modes: parsing, none, fixed windows and Silero VAD on real signals."""

from __future__ import annotations

import shutil

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.client.audio import AudioError, load_audio
from e2v.client.segment import (
    Segment,
    SegmentMode,
    fixed_windows,
    merge_close,
    parse_segment_mode,
    segment_audio,
    segment_stream,
    speech_regions,
    split_evenly,
)

from e2v.contract import MAX_SEGMENT_S, MIN_SAMPLES, SAMPLE_RATE

SR = SAMPLE_RATE
MAX = int(MAX_SEGMENT_S * SR)
VAD, NONE = SegmentMode("vad"), SegmentMode("none")


def zeros(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SR), dtype=np.float32)


def covered(segments: list[Segment], start: int, end: int) -> float:
    """Fraction of [start, end) inside the segments."""
    inside = sum(max(0, min(end, s.end) - max(start, s.start)) for s in segments)
    return inside / (end - start)


def assert_well_formed(segments: list[Segment], num_samples: int, max_samples: int = MAX):
    for seg in segments:
        assert seg.start >= 0 and seg.end <= num_samples
        assert MIN_SAMPLES <= seg.end - seg.start <= max_samples
    for a, b in zip(segments, segments[1:], strict=False):
        assert a.end <= b.start


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("vad", SegmentMode("vad")),
        ("none", SegmentMode("none")),
        (" NONE ", SegmentMode("none")),
        ("fixed:3", SegmentMode("fixed", 3.0)),
        ("fixed:2.5", SegmentMode("fixed", 2.5)),
        ("fixed:30", SegmentMode("fixed", 30.0)),
    ],
)
def test_parse_segment_mode(text, expected):
    mode = parse_segment_mode(text)
    assert mode == expected
    assert parse_segment_mode(str(mode)) == mode


@pytest.mark.parametrize(
    "text, message",
    [
        ("fixed:0", "between"),
        ("fixed:-1", "between"),
        ("fixed:31", "between"),
        ("fixed:0.01", "between"),
        ("fixed:nan", "between"),
        ("fixed:inf", "between"),
        ("fixed:abc", "must be a number"),
        ("fixed:", "must be a number"),
        ("fixed", "must be a number"),
        ("auto", "unknown segment mode"),
        ("", "unknown segment mode"),
    ],
)
def test_parse_segment_mode_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_segment_mode(text)


def test_segment_mode_validates_direct_construction():
    with pytest.raises(ValueError, match="between"):
        SegmentMode("fixed")
    with pytest.raises(ValueError, match="unknown"):
        SegmentMode("auto")


def test_segment_times():
    seg = Segment(8_000, 40_000)
    assert (seg.start_s, seg.end_s, seg.duration_s) == (0.5, 2.5, 2.0)


# ------------------------------------------------------------------------- none / fixed


def test_none_is_the_whole_clip_up_to_the_maximum():
    assert segment_audio(zeros(MAX_SEGMENT_S), NONE) == [Segment(0, MAX)]
    with pytest.raises(
        AudioError, match=r"more than 30 s, the maximum for --segment none.*--segment vad"
    ) as err:
        segment_audio(zeros(31), NONE)
    assert err.value.kind == "too_long"


@pytest.mark.parametrize("mode", ["none", "fixed:3", "vad"])
def test_every_mode_rejects_clips_shorter_than_one_frame(mode):
    with pytest.raises(AudioError) as err:
        segment_audio(np.zeros(MIN_SAMPLES - 1, dtype=np.float32), parse_segment_mode(mode))
    assert err.value.kind == "too_short"


def test_fixed_windows_keep_a_long_enough_remainder():
    segments = segment_audio(zeros(10), parse_segment_mode("fixed:3"))
    bounds = [0, 3 * SR, 6 * SR, 9 * SR, 10 * SR]
    assert segments == [Segment(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def test_fixed_windows_merge_a_tiny_remainder_into_the_previous_window():
    assert fixed_windows(9 * SR + 100, 3 * SR, MAX)[-1] == Segment(6 * SR, 9 * SR + 100)


def test_fixed_windows_drop_a_tiny_remainder_that_would_exceed_the_maximum():
    assert fixed_windows(2 * MAX + 100, MAX, MAX) == [Segment(0, MAX), Segment(MAX, 2 * MAX)]


def test_fixed_window_shorter_clip_is_one_segment():
    assert segment_audio(zeros(2), parse_segment_mode("fixed:5")) == [Segment(0, 2 * SR)]


def test_fixed_window_beyond_the_maximum_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        segment_audio(zeros(20), parse_segment_mode("fixed:20"), max_segment_s=10)


def test_split_evenly():
    assert split_evenly(Segment(100, 100 + 2 * MAX + 2), MAX) == [
        Segment(100, 100 + 20 * SR),
        Segment(100 + 20 * SR, 100 + 40 * SR + 1),
        Segment(100 + 40 * SR + 1, 100 + 2 * MAX + 2),
    ]
    assert split_evenly(Segment(0, MAX), MAX) == [Segment(0, MAX)]


def test_merge_close_joins_short_gaps_while_the_span_fits():
    segments = [
        Segment(0, 10 * SR),
        Segment(10 * SR + 8_000, 20 * SR),  # 0.5 s gap: merged
        Segment(23 * SR, 25 * SR),  # 3 s gap: a new utterance
        Segment(25 * SR + 100, 35 * SR),
        Segment(35 * SR + 100, 60 * SR),
    ]
    assert merge_close(segments, MAX) == [
        Segment(0, 20 * SR),
        Segment(23 * SR, 35 * SR),
        Segment(35 * SR + 100, 60 * SR),  # merging would exceed the maximum
    ]


# ---------------------------------------------------------------------------------- vad


@pytest.fixture(scope="module")
def conversation() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """70 s: six bursts of speech-like signal (5..20 s) separated by 2 s of silence."""
    pattern: list[tuple[str, float]] = []
    for seconds in (8, 12, 5, 20, 9, 6):
        pattern += [("speech", seconds), ("silence", 2.0)]
    return fx.bursts(pattern[:-1])


def test_synthetic_speech_is_detected_as_speech():
    wav = fx.speech_like(5.0)
    assert covered(speech_regions(wav), 0, len(wav)) > 0.8


def test_vad_sends_a_short_clip_with_speech_whole():
    wav, _ = fx.bursts([("silence", 2.0), ("speech", 4.0), ("silence", 3.0)])
    assert segment_audio(wav, VAD) == [Segment(0, len(wav))]


@pytest.mark.parametrize(
    "wav",
    [zeros(5), zeros(45), fx.noise(40.0, amplitude=0.003), fx.tone(10.0, amplitude=0.3)],
    ids=["silence", "long-silence", "low-noise", "pure-tone"],
)
def test_vad_without_speech_returns_no_segments(wav):
    assert segment_audio(wav, VAD) == []


def test_vad_segments_a_long_conversation(conversation):
    wav, spans = conversation
    segments = segment_audio(wav, VAD)
    assert_well_formed(segments, len(wav))
    for start, end in spans:
        assert covered(segments, start, end) > 0.95
    gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)]
    for a_end, b_start in gaps:  # 2 s pauses separate utterances; their middle is left out
        middle = (a_end + b_start) // 2
        assert covered(segments, middle - SR // 4, middle + SR // 4) == 0
    assert len(segments) == len(spans)


def test_vad_respects_a_smaller_maximum(conversation):
    wav, spans = conversation
    segments = segment_audio(wav, VAD, max_segment_s=7.5)
    assert_well_formed(segments, len(wav), max_samples=int(7.5 * SR))
    assert all(covered(segments, start, end) > 0.95 for start, end in spans)


def test_vad_splits_continuous_speech_longer_than_the_maximum():
    wav = fx.speech_like(45.0, seed=7)
    segments = segment_audio(wav, VAD)
    assert_well_formed(segments, len(wav))
    assert len(segments) >= 2
    assert covered(segments, 0, len(wav)) > 0.9


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"
)
def test_vad_on_real_synthesized_speech(tmp_path):
    text = "I can't believe you did that. This is the best day of my whole life, thank you!"
    speech = load_audio(fx.espeak(text, tmp_path / "speech.wav"))
    voiced = np.flatnonzero(np.abs(speech) > 0.01)
    speech = speech[voiced[0] : voiced[-1] + 1]  # espeak-ng pads with silence
    assert segment_audio(speech, VAD) == [Segment(0, len(speech))]

    pause = zeros(3.0)
    wav = np.concatenate([pause, speech, pause, speech, pause, speech, pause, speech, pause])
    segments = segment_audio(wav, VAD)
    assert_well_formed(segments, len(wav))
    for i in range(4):
        start = len(pause) * (i + 1) + len(speech) * i
        assert covered(segments, start, start + len(speech)) > 0.95


# ---------------------------------------------------------------------- streaming


def random_chunks(wav: np.ndarray, seed: int, largest: int = 70_000):
    """`wav` in chunks of random sizes, as a decoder delivers them."""
    rng = np.random.default_rng(seed)
    position = 0
    while position < len(wav):
        size = int(rng.integers(1, largest))
        yield wav[position : position + size]
        position += size


@pytest.fixture(scope="module")
def long_call() -> np.ndarray:
    """~5 min over several VAD blocks: pauses of every length, 150 s of unbroken speech
    (beyond VAD_MAX_SPEECH_S, so Silero's max-speech cut runs), a pause shorter than
    2 x the padding, and speech up to the very end."""
    pattern = [("silence", 0.7), ("speech", 6.0), ("silence", 0.15), ("speech", 4.0)]
    pattern += [("silence", 0.25), ("speech", 0.2), ("silence", 3.0), ("speech", 150.0)]
    pattern += [("silence", 40.0), ("speech", 9.0), ("silence", 1.2), ("speech", 30.0)]
    pattern += [("silence", 0.5), ("speech", 12.0)]
    return fx.bursts(pattern, seed=11)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_vad_equals_silero_on_the_whole_array(long_call, seed):
    """Frame probabilities, the region state machine and the padding pass, fed in random
    chunks, give exactly Silero's own regions for the whole array."""
    from e2v.client.segment import VAD_PARAMS
    from e2v.client.vad import RegionPadder, SpeechTracker, StreamingVad, silero_model_path
    from silero_vad.sequence_vad import SileroVADSequence, get_speech_timestamps_sequence

    model = SileroVADSequence(str(silero_model_path()))
    expected = get_speech_timestamps_sequence(long_call, model, **VAD_PARAMS.silero_kwargs())
    vad, tracker, padder = StreamingVad(), SpeechTracker(VAD_PARAMS), RegionPadder(VAD_PARAMS.pad)
    found, probs = [], []
    for chunk in random_chunks(long_call, seed):
        block = vad.feed(chunk)
        probs.append(block)
        for region in tracker.push(block):
            found += padder.add(*region)
    probs.append(vad.finish())
    for region in tracker.push(probs[-1]) + tracker.finish(len(long_call)):
        found += padder.add(*region)
    found += padder.finish(len(long_call))
    whole = model.audio_forward(long_call)
    assert np.array_equal(np.concatenate(probs), whole)
    assert found == [(t["start"], t["end"]) for t in expected]


def speech_probabilities(seed: int, frames: int = 40_000) -> np.ndarray:
    """Frame probabilities with talk spurts, dips and pauses of every length, and runs of
    unbroken speech far beyond the maximum (so every max-speech branch of Silero runs)."""
    rng = np.random.default_rng(seed)
    probs, level = [], 0.0
    while len(probs) < frames:
        length = int(rng.choice([3, 8, 20, 60, 400, 5000]))
        level = rng.choice([0.05, 0.3, 0.45, 0.9])
        probs += list(np.clip(level + 0.1 * rng.standard_normal(length), 0, 1))
    return np.array(probs[:frames], dtype=np.float32)


@pytest.mark.parametrize("legacy_cut", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speech_tracker_equals_silero_state_machine(seed, legacy_cut):
    from dataclasses import replace

    from e2v.client.segment import VAD_PARAMS
    from e2v.client.vad import FRAME, RegionPadder, SpeechTracker
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    params = replace(VAD_PARAMS, max_speech_s=20.0, use_max_poss_sil_at_max_speech=not legacy_cut)
    probs = speech_probabilities(seed)
    total = len(probs) * FRAME - 123
    kwargs = params.silero_kwargs()
    expected = get_speech_timestamps_from_probs(probs, audio_length_samples=total, **kwargs)
    tracker, padder, found = SpeechTracker(params), RegionPadder(params.pad), []
    for block in np.array_split(probs, 37):
        for region in tracker.push(block):
            found += padder.add(*region)
        start = tracker.open_start
        found += padder.settle(start if start is not None else tracker.frame * FRAME)
    for region in tracker.finish(total):
        found += padder.add(*region)
    found += padder.finish(total)
    assert found == [(t["start"], t["end"]) for t in expected]
    assert len(found) > 20


@pytest.mark.parametrize("mode", ["vad", "fixed:3", "fixed:7.3", "none"])
def test_segments_do_not_depend_on_chunking(long_call, mode):
    wav = long_call if mode != "none" else long_call[: 20 * SR]
    whole = segment_audio(wav, parse_segment_mode(mode))
    for seed in (0, 1):
        chunked = list(segment_stream(random_chunks(wav, seed), parse_segment_mode(mode)))
        assert [s for s, _ in chunked] == whole
        for segment, samples in chunked:
            assert np.array_equal(samples, wav[segment.start : segment.end])
    assert_well_formed(whole, len(wav))


def test_streaming_memory_is_bounded_by_the_segment_not_the_recording():
    """A 40-minute stream (154 MB as float32) is segmented holding a few MB at a time."""
    import tracemalloc

    piece, _ = fx.bursts([("speech", 25.0), ("silence", 5.0)])

    def forty_minutes():  # the same 30 s, 80 times: the stream itself allocates nothing
        for i in range(80):
            yield from random_chunks(piece, seed=i, largest=40_000)

    tracemalloc.start()
    try:
        count = 0
        for _segment, samples in segment_stream(forty_minutes(), VAD):
            count += 1
            del samples
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 80
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MB"


@pytest.mark.parametrize(
    "pattern",
    [
        [("speech", 4.0)],
        [("silence", 9.7), ("speech", 0.3)],  # speech only at the very end
        [("silence", 6.0), ("speech", 1.0), ("silence", 2.0)],
        [("silence", 8.0)],
        [("speech", 2.0), ("silence", 27.0), ("speech", 5.0)],  # sure early, then too long
        [("silence", 29.0), ("speech", 3.0)],
    ],
    ids=["speech", "speech-at-end", "speech-mid", "silence", "catch-up", "late-long"],
)
def test_early_stop_of_the_vad_changes_no_segment(pattern):
    """The VAD stops early on clips that fit one segment; the segments stay those of a
    full run: the whole clip iff Silero finds speech, Silero's regions when longer."""
    wav, _ = fx.bursts(pattern, seed=4)
    regions = speech_regions(wav)
    for seed in (0, 1):
        found = [s for s, _ in segment_stream(random_chunks(wav, seed, 20_000), VAD)]
        if len(wav) <= MAX:
            assert found == ([Segment(0, len(wav))] if regions else [])
        else:
            assert found == segment_audio(wav, VAD) and found


def test_vendored_silero_model_is_the_wheels():
    import hashlib

    from e2v.client.vad import silero_model_path, wheel_model_path

    wheel = wheel_model_path()
    assert wheel is not None and wheel.is_file(), "silero-vad is a dev dependency"
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (silero_model_path(), wheel)]
    assert digest[0] == digest[1]
