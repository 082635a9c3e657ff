"""Segmentation modes: parsing, none, fixed windows and Silero VAD on real signals."""

from __future__ import annotations

import shutil

import audio_fixtures as fx
import numpy as np
import pytest

from client.audio import AudioError, load_audio
from client.segment import (
    Segment,
    SegmentMode,
    fixed_windows,
    merge_close,
    parse_segment_mode,
    segment_audio,
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
    with pytest.raises(AudioError, match=r"31\.0 s exceeds the 30 s maximum.*--segment") as err:
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
