"""Cut a 16 kHz recording into segments the model accepts (at most MAX_SEGMENT_S each).

Modes (`--segment`):
  none       the whole clip is one segment; longer than the maximum is an error.
  fixed:S    consecutive S-second windows.
  vad        Silero VAD: a clip that fits in one segment is sent whole when it contains
             speech; longer recordings are cut into speech regions, merged across short
             pauses and split evenly when a single region is too long.
In every mode a clip shorter than one model frame raises AudioError("too_short"), and
"vad" returns [] when there is no speech, so the caller can say so instead of
inventing an emotion.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from client.audio import AudioError, audio_duration_s, check_min_length
from e2v.contract import MAX_SEGMENT_S, MIN_SAMPLES, SAMPLE_RATE

# Silero's recommended default; lower admits breathing and music, higher drops soft speech.
VAD_THRESHOLD = 0.5
# Shorter bursts are clicks or coughs, and too short to carry an emotion.
VAD_MIN_SPEECH_MS = 250
# Pauses shorter than this are within-sentence gaps: they stay inside one speech region.
VAD_MIN_SILENCE_MS = 300
# Padding around each region keeps the soft onsets and offsets the VAD trims.
VAD_SPEECH_PAD_MS = 100
# Regions closer than this are one utterance: merged (while the span fits) for context.
MERGE_GAP_S = 1.0


@dataclass(frozen=True)
class Segment:
    """Half-open sample range [start, end) of the 16 kHz signal."""

    start: int
    end: int

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


@dataclass(frozen=True)
class SegmentMode:
    """A parsed `--segment` value; `seconds` is the window length of "fixed"."""

    kind: Literal["vad", "none", "fixed"]
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("vad", "none", "fixed"):
            raise ValueError(f"unknown segment mode {self.kind!r}")
        low = MIN_SAMPLES / SAMPLE_RATE
        if self.kind == "fixed" and not low <= (self.seconds or 0) <= MAX_SEGMENT_S:
            # The comparison is also False for nan, so nan and inf are rejected too.
            raise ValueError(
                f"fixed window must be between {low:g} and {MAX_SEGMENT_S:g} s, got {self.seconds}"
            )

    def __str__(self) -> str:
        return f"fixed:{self.seconds:g}" if self.kind == "fixed" else self.kind


def parse_segment_mode(text: str) -> SegmentMode:
    """Parse "vad", "none" or "fixed:SECONDS" (0.025 <= SECONDS <= MAX_SEGMENT_S)."""
    value = text.strip().lower()
    if value in ("vad", "none"):
        return SegmentMode(value)
    name, _, seconds = value.partition(":")
    if name != "fixed":
        raise ValueError(f"unknown segment mode {text!r}: use 'vad', 'none' or 'fixed:SECONDS'")
    try:
        window = float(seconds)
    except ValueError:
        raise ValueError(f"{text!r}: SECONDS must be a number, e.g. 'fixed:3'") from None
    return SegmentMode("fixed", window)


def segment_audio(
    wav: np.ndarray, mode: SegmentMode, max_segment_s: float = MAX_SEGMENT_S
) -> list[Segment]:
    """Segments of `wav` (16 kHz mono) for `mode`, each MIN_SAMPLES..max_segment_s long."""
    if wav.ndim != 1:
        raise ValueError(f"expected 1-D mono audio, got shape {wav.shape}")
    low = MIN_SAMPLES / SAMPLE_RATE
    if not low <= max_segment_s <= MAX_SEGMENT_S:
        raise ValueError(f"max_segment_s must be between {low:g} and {MAX_SEGMENT_S:g} s")
    check_min_length(wav)
    max_samples = round(max_segment_s * SAMPLE_RATE)
    if mode.kind == "none":
        return _whole(wav, max_samples)
    if mode.kind == "fixed":
        return fixed_windows(len(wav), round(mode.seconds * SAMPLE_RATE), max_samples)
    return _vad_segments(wav, max_samples)


def _whole(wav: np.ndarray, max_samples: int) -> list[Segment]:
    if len(wav) > max_samples:
        raise AudioError(
            "too_long",
            f"too long: {audio_duration_s(wav):.1f} s exceeds the "
            f"{max_samples / SAMPLE_RATE:g} s maximum; use --segment vad or --segment fixed:S",
        )
    return [Segment(0, len(wav))]


def fixed_windows(num_samples: int, window: int, max_samples: int) -> list[Segment]:
    """Consecutive `window`-sample segments.

    A final remainder shorter than MIN_SAMPLES is appended to the previous window when
    that stays within `max_samples`, and dropped otherwise.
    """
    if window > max_samples:
        raise ValueError(
            f"fixed window {window / SAMPLE_RATE:g} s exceeds the "
            f"{max_samples / SAMPLE_RATE:g} s maximum"
        )
    segments = [Segment(s, min(s + window, num_samples)) for s in range(0, num_samples, window)]
    if len(segments) > 1 and segments[-1].end - segments[-1].start < MIN_SAMPLES:
        last = segments.pop()
        if last.end - segments[-1].start <= max_samples:
            segments[-1] = Segment(segments[-1].start, last.end)
    return segments


def _vad_segments(wav: np.ndarray, max_samples: int) -> list[Segment]:
    regions = speech_regions(wav)
    if not regions:
        return []
    if len(wav) <= max_samples:  # fits one call: keep the full context, pauses included
        return [Segment(0, len(wav))]
    pieces = [piece for region in regions for piece in split_evenly(region, max_samples)]
    return [s for s in merge_close(pieces, max_samples) if s.end - s.start >= MIN_SAMPLES]


def speech_regions(wav: np.ndarray) -> list[Segment]:
    """Speech regions found by Silero VAD (padded, pauses < VAD_MIN_SILENCE_MS bridged)."""
    model, timestamps = _silero()
    found = timestamps(
        np.ascontiguousarray(wav, dtype=np.float32),
        model,
        threshold=VAD_THRESHOLD,
        sampling_rate=SAMPLE_RATE,
        min_speech_duration_ms=VAD_MIN_SPEECH_MS,
        min_silence_duration_ms=VAD_MIN_SILENCE_MS,
        speech_pad_ms=VAD_SPEECH_PAD_MS,
    )
    return [Segment(int(t["start"]), int(t["end"])) for t in found]


def split_evenly(segment: Segment, max_samples: int) -> list[Segment]:
    """Split `segment` into the fewest equal pieces of at most `max_samples`."""
    length = segment.end - segment.start
    count = math.ceil(length / max_samples)
    bounds = [segment.start + (length * i) // count for i in range(count + 1)]
    return [Segment(bounds[i], bounds[i + 1]) for i in range(count)]


def merge_close(segments: list[Segment], max_samples: int) -> list[Segment]:
    """Merge neighbours less than MERGE_GAP_S apart while the merged span fits."""
    gap = round(MERGE_GAP_S * SAMPLE_RATE)
    merged: list[Segment] = []
    for seg in segments:
        prev = merged[-1] if merged else None
        if prev and seg.start - prev.end < gap and seg.end - prev.start <= max_samples:
            merged[-1] = Segment(prev.start, seg.end)
        else:
            merged.append(seg)
    return merged


@functools.lru_cache(maxsize=1)
def _silero() -> tuple[Any, Any]:
    """Silero VAD on onnxruntime, loaded once per process (the model ships in the wheel)."""
    import silero_vad  # imports torch: deferred so "none" and "fixed" stay light

    if hasattr(silero_vad, "get_speech_timestamps_sequence"):  # silero-vad >= 6.2.3
        # Block-wise inference: same timestamps, ~3x faster, and no per-call state,
        # so the cached model is safe to share between threads.
        return silero_vad.load_silero_vad(sequence=True), silero_vad.get_speech_timestamps_sequence
    return silero_vad.load_silero_vad(onnx=True), silero_vad.get_speech_timestamps
