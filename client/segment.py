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

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from e2v.client.audio import AudioError
from e2v.client.vad import (
    FRAME,
    RegionPadder,
    SpeechTracker,
    StreamingVad,
    VadParams,
    feed_streams,
    silero_model_path,
)

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
# Continuous "speech" longer than this (a tone, music, a stuck line) is cut at its longest
# pause, by Silero's own rule: it bounds the audio held per file in memory.
VAD_MAX_SPEECH_S = 120.0

VAD_PARAMS = VadParams(
    threshold=VAD_THRESHOLD,
    min_speech_ms=VAD_MIN_SPEECH_MS,
    min_silence_ms=VAD_MIN_SILENCE_MS,
    speech_pad_ms=VAD_SPEECH_PAD_MS,
    max_speech_s=VAD_MAX_SPEECH_S,
)


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
        return SegmentMode("vad" if value == "vad" else "none")
    name, _, seconds = value.partition(":")
    if name != "fixed":
        raise ValueError(f"unknown segment mode {text!r}: use 'vad', 'none' or 'fixed:SECONDS'")
    try:
        window = float(seconds)
    except ValueError:
        raise ValueError(f"{text!r}: SECONDS must be a number, e.g. 'fixed:3'") from None
    return SegmentMode("fixed", window)


def segment_stream(
    chunks: Iterable[np.ndarray],
    mode: SegmentMode,
    max_segment_s: float = MAX_SEGMENT_S,
    on_samples: Callable[[int], None] | None = None,
) -> Iterator[tuple[Segment, np.ndarray]]:
    """Cut a stream of 16 kHz mono chunks into (segment, samples) as soon as each is final.

    Memory is bounded by the longest segment and speech region, not by the stream: audio
    no later segment can need is released as the stream goes. `on_samples` is called with
    each chunk's length. Raises AudioError("too_short") for a stream shorter than one
    model frame and AudioError("too_long") in mode "none" past the maximum.
    """
    cutter = SegmentCutter(mode, max_segment_s)
    for chunk in chunks:
        if len(chunk) and on_samples:
            on_samples(len(chunk))
        yield from cutter.push(chunk)
    yield from cutter.finish()


class SegmentCutter:
    """The push-based form of `segment_stream`: `push` chunks, then `finish` once.

    `early=False` (live calls) turns off the whole-clip rule of "vad": a stream that fits
    one segment is cut like a longer one, so segments come out while the stream goes on.
    For "vad", `open_start` and `speaking` say what the VAD hears now, and `window` reads
    the retained audio (everything from `open_start` on is retained).
    """

    def __init__(
        self, mode: SegmentMode, max_segment_s: float = MAX_SEGMENT_S, early: bool = True
    ) -> None:
        low = MIN_SAMPLES / SAMPLE_RATE
        if not low <= max_segment_s <= MAX_SEGMENT_S:
            raise ValueError(f"max_segment_s must be between {low:g} and {MAX_SEGMENT_S:g} s")
        max_samples = round(max_segment_s * SAMPLE_RATE)
        self._cuts: _VadCutter | _WholeCutter | _FixedCutter
        if mode.kind == "vad":
            self._cuts = _VadCutter(mode, max_samples, early)
        elif mode.kind == "none":
            self._cuts = _WholeCutter(mode, max_samples)
        else:
            self._cuts = _FixedCutter(mode, max_samples)
        self._buffer = _Buffer()

    @property
    def end(self) -> int:
        """Samples pushed so far."""
        return self._buffer.end

    def push(
        self, chunk: np.ndarray, probs: np.ndarray | None = None
    ) -> list[tuple[Segment, np.ndarray]]:
        """The segments that became final with `chunk` (16 kHz mono float32). `probs`:
        the VAD's probabilities of `chunk`, computed beforehand (`push_cutters`)."""
        if chunk.ndim != 1:
            raise ValueError(f"expected 1-D mono audio, got shape {chunk.shape}")
        if not len(chunk):
            return []
        buffer = self._buffer
        buffer.append(chunk)
        cut = self._cuts.feed(chunk, buffer.end, probs)
        out = [(s, buffer.take(s.start, s.end)) for s in cut]
        buffer.release(self._cuts.needed_from())
        return out

    @property
    def batchable(self) -> bool:
        """ "vad" without early (live calls): its VAD can run batched with others'."""
        return isinstance(self._cuts, _VadCutter) and self._cuts.early is None

    def finish(self) -> list[tuple[Segment, np.ndarray]]:
        """The remaining segments. Raises AudioError("too_short") below one model frame."""
        buffer = self._buffer
        if buffer.end < MIN_SAMPLES:
            raise AudioError(
                "too_short",
                f"too short: {buffer.end / SAMPLE_RATE:.4g} s "
                f"(< {MIN_SAMPLES / SAMPLE_RATE:g} s, one model frame)",
            )
        return [(s, buffer.take(s.start, s.end)) for s in self._cuts.finish(buffer.end)]

    @property
    def open_start(self) -> int | None:
        """ "vad" without early: where the segment being assembled starts (the next one
        emitted starts there, give or take the padding), or None while nothing is."""
        return self._cuts.open_start() if isinstance(self._cuts, _VadCutter) else None

    @property
    def speaking(self) -> bool:
        """ "vad": a speech region that will be kept is open now."""
        return isinstance(self._cuts, _VadCutter) and self._cuts.speaking()

    @property
    def retained(self) -> int:
        """Samples held in memory now (bounded by the longest segment or speech region)."""
        return self._buffer.end - self._buffer.start

    def window(self, start: int, end: int) -> np.ndarray:
        """Retained samples [start, end) (start no earlier than `open_start`)."""
        return self._buffer.take(start, end)


def segment_audio(
    wav: np.ndarray, mode: SegmentMode, max_segment_s: float = MAX_SEGMENT_S
) -> list[Segment]:
    """Segments of `wav` (16 kHz mono) for `mode`, each MIN_SAMPLES..max_segment_s long."""
    if wav.ndim != 1:
        raise ValueError(f"expected 1-D mono audio, got shape {wav.shape}")
    return [segment for segment, _ in segment_stream([wav], mode, max_segment_s)]


def vad_probs(cutters: list[SegmentCutter], chunks: list[np.ndarray]) -> list[np.ndarray | None]:
    """The VAD's probabilities of each chunk for its cutter (to pass to `push`), those of
    every batchable cutter (live streams) in one batched call (`vad.feed_streams`: each
    stream's own probabilities, the same bits as alone); None for the others."""
    batch = [i for i, c in enumerate(cutters) if c.batchable and len(chunks[i])]
    probs: list[np.ndarray | None] = [None] * len(cutters)
    if batch:
        vads = [_vad_of(cutters[i]) for i in batch]
        for i, found in zip(batch, feed_streams(vads, [chunks[i] for i in batch]), strict=True):
            probs[i] = found
    return probs


def _vad_of(cutter: SegmentCutter):
    cuts = cutter._cuts
    assert isinstance(cuts, _VadCutter)  # batchable
    return cuts.vad


class _Buffer:
    """The stream's samples from `start` to `end`, kept as the chunks that arrived."""

    def __init__(self) -> None:
        self.chunks: deque[np.ndarray] = deque()
        self.start = self.end = 0

    def append(self, chunk: np.ndarray) -> None:
        self.chunks.append(chunk)
        self.end += len(chunk)

    def take(self, start: int, end: int) -> np.ndarray:
        if start < self.start or end > self.end:
            raise AssertionError(f"[{start}, {end}) outside [{self.start}, {self.end})")
        out = np.empty(end - start, dtype=np.float32)
        position, filled = self.start, 0
        for chunk in self.chunks:
            lo, hi = max(start, position), min(end, position + len(chunk))
            if lo < hi:
                out[filled : filled + hi - lo] = chunk[lo - position : hi - position]
                filled += hi - lo
            position += len(chunk)
            if position >= end:
                break
        return out

    def release(self, before: int) -> None:
        """Drop whole chunks that end at or before sample `before`."""
        while self.chunks and self.start + len(self.chunks[0]) <= before:
            self.start += len(self.chunks.popleft())


class _WholeCutter:
    """ "none": the whole clip, up to the maximum."""

    def __init__(self, mode: SegmentMode, max_samples: int) -> None:
        self.max_samples = max_samples

    def feed(self, chunk: np.ndarray, end: int, probs=None) -> list[Segment]:
        if end > self.max_samples:
            raise AudioError(
                "too_long",
                f"too long: more than {self.max_samples / SAMPLE_RATE:g} s, the maximum for "
                f"--segment none; use --segment vad or --segment fixed:S",
            )
        return []

    def needed_from(self) -> int:
        return 0

    def finish(self, total: int) -> list[Segment]:
        return [Segment(0, total)]


class _FixedCutter:
    """ "fixed:S": consecutive windows; see `fixed_windows` for the last one."""

    def __init__(self, mode: SegmentMode, max_samples: int) -> None:
        assert mode.seconds is not None, "a fixed mode has its window (SegmentMode checks)"
        self.window = round(mode.seconds * SAMPLE_RATE)
        self.max_samples = max_samples
        if self.window > max_samples:
            raise ValueError(
                f"fixed window {mode.seconds:g} s exceeds the "
                f"{max_samples / SAMPLE_RATE:g} s maximum"
            )
        self.next_start = 0
        self.held: Segment | None = None  # the last full window: a tiny tail may join it

    def feed(self, chunk: np.ndarray, end: int, probs=None) -> list[Segment]:
        out = []
        while self.next_start + self.window <= end:
            if self.held:
                out.append(self.held)
            self.held = Segment(self.next_start, self.next_start + self.window)
            self.next_start += self.window
        return out

    def needed_from(self) -> int:
        return self.held.start if self.held else self.next_start

    def finish(self, total: int) -> list[Segment]:
        held = [self.held] if self.held else []
        tail = fixed_windows(total - self.next_start, self.window, self.max_samples)
        tail = [Segment(s.start + self.next_start, s.end + self.next_start) for s in tail]
        segments = held + [s for s in tail if s.end > s.start]
        if len(segments) > 1 and segments[-1].end - segments[-1].start < MIN_SAMPLES:
            last = segments.pop()
            if last.end - segments[-1].start <= self.max_samples:
                segments[-1] = Segment(segments[-1].start, last.end)
        return segments


_EARLY_STEP = 32 * FRAME  # ~1 s: how far the VAD reads past the point where speech is sure


class _VadCutter:
    """ "vad": Silero speech regions, padded, split to the maximum, close ones merged.

    A recording that fits one segment is sent whole when it has speech, so nothing is
    emitted until the stream is longer than one segment. Until then, the VAD stops as
    soon as it is sure of some speech (most short clips: after a fraction of a second);
    if the stream grows longer than one segment, it catches up on what it skipped.
    """

    def __init__(self, mode: SegmentMode, max_samples: int, early: bool = True) -> None:
        self.max_samples = max_samples
        self.whole = early  # a stream that fits one segment is sent whole
        self.vad = StreamingVad()
        self.tracker = SpeechTracker(VAD_PARAMS)
        self.padder = RegionPadder(VAD_PARAMS.pad)
        self.merger = _Merger(max_samples)
        self.vad_end = 0  # samples the VAD has turned into probabilities
        self.early: list[Segment] | None = [] if early else None  # held while it fits one
        self.skipped: list[np.ndarray] = []  # audio the VAD has not seen (early, speech sure)
        self.kept_start: int | None = None  # the open region's start, once it will be kept

    def feed(self, chunk: np.ndarray, end: int, probs: np.ndarray | None = None) -> list[Segment]:
        if probs is not None:  # computed with other streams' (live: no early, nothing skipped)
            return self._release_early(self._regions_of(probs) + self._settle(), end)
        if self.early is not None and end <= self.max_samples:
            # Fits one segment so far: run the VAD a second at a time, until speech is sure.
            for start in range(0, len(chunk), _EARLY_STEP):
                if self.tracker.confirmed:
                    self.skipped.append(chunk[start:])
                    break
                self._release_early(self._vad(chunk[start : start + _EARLY_STEP]), end)
            return []
        out: list[Segment] = []
        for piece in [*self.skipped, chunk]:
            out += self._vad(piece)
        self.skipped = []
        out += self._settle()
        return self._release_early(out, end)

    def _vad(self, chunk: np.ndarray) -> list[Segment]:
        return self._regions_of(self.vad.feed(chunk))

    def _regions_of(self, probs: np.ndarray) -> list[Segment]:
        first = self.tracker.frame
        regions = self.tracker.push(probs)
        self._note_kept(probs, first)
        self.vad_end += len(probs) * FRAME
        return self._regions(regions)

    def _note_kept(self, probs: np.ndarray, first: int) -> None:
        """Remember the open region once it will be kept: the tracker's own rule, a frame
        at or above the threshold more than min-speech past the region's start."""
        start = self.tracker.open_start
        if start is None or start == self.kept_start or not len(probs):
            return
        lo = max(first, start // FRAME)
        frames = np.arange(lo, first + len(probs))
        loud = probs[lo - first :] >= VAD_PARAMS.threshold
        if np.any(loud & (frames * FRAME - start > self.tracker.min_speech)):
            self.kept_start = start

    def speaking(self) -> bool:
        start = self.tracker.open_start
        return start is not None and start == self.kept_start

    def open_start(self) -> int | None:
        starts = []
        if self.merger.held:
            starts.append(self.merger.held.start)
        if self.padder.pending:
            starts.append(self.padder.pending[0])
        open_start = self.tracker.open_start
        if self.speaking() and open_start is not None:  # speaking: a region is open
            starts.append(max(0, int(open_start - VAD_PARAMS.pad)))
        return min(starts) if starts else None

    def needed_from(self) -> int:
        if self.early is not None:
            return 0
        floor = self._earliest_next() - VAD_PARAMS.pad
        if self.padder.pending:
            floor = min(floor, self.padder.pending[0])
        return max(0, int(min(self.merger.needed_from(), floor)))

    def finish(self, total: int) -> list[Segment]:
        if self.whole and total <= self.max_samples and self.tracker.confirmed:
            return [Segment(0, total)]
        out: list[Segment] = []
        for piece in self.skipped:
            out += self._vad(piece)
        probs = self.vad.finish()
        out += self._regions(self.tracker.push(probs))
        out += self._regions(self.tracker.finish(total))
        for start, end in self.padder.finish(total):
            out += self._pieces(start, end)
        out += self.merger.finish()
        if self.whole and total <= self.max_samples:
            return [Segment(0, total)] if self.tracker.confirmed else []
        return [s for s in self._release_early(out, total) if s.end - s.start >= MIN_SAMPLES]

    def _regions(self, regions: list[tuple[int, int]]) -> list[Segment]:
        out: list[Segment] = []
        for start, end in regions:
            for padded in self.padder.add(start, end):
                out += self._pieces(*padded)
        return out

    def _settle(self) -> list[Segment]:
        out: list[Segment] = []
        for padded in self.padder.settle(self._earliest_next()):
            out += self._pieces(*padded)
        pending = self.padder.pending
        out += self.merger.settle(
            pending[0] if pending else int(self._earliest_next() - VAD_PARAMS.pad)
        )
        return out

    def _pieces(self, start: int, end: int) -> list[Segment]:
        out: list[Segment] = []
        for piece in split_evenly(Segment(start, end), self.max_samples):
            out += self.merger.add(piece)
        return out

    def _earliest_next(self) -> int:
        """No region found later can start (before padding) earlier than this."""
        start = self.tracker.open_start
        return start if start is not None else self.vad_end

    def _release_early(self, out: list[Segment], end: int) -> list[Segment]:
        if self.early is None:
            return [s for s in out if s.end - s.start >= MIN_SAMPLES]
        self.early += out
        if end <= self.max_samples:
            return []
        early, self.early = self.early, None
        return [s for s in early if s.end - s.start >= MIN_SAMPLES]


class _Merger:
    """`merge_close` over pieces that arrive one by one (holds the last one)."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.gap = round(MERGE_GAP_S * SAMPLE_RATE)
        self.held: Segment | None = None

    def add(self, seg: Segment) -> list[Segment]:
        prev = self.held
        if prev and seg.start - prev.end < self.gap and seg.end - prev.start <= self.max_samples:
            self.held = Segment(prev.start, seg.end)
            return []
        self.held = seg
        return [prev] if prev else []

    def settle(self, earliest_next_start: int) -> list[Segment]:
        if self.held and earliest_next_start - self.held.end >= self.gap:
            held, self.held = self.held, None
            return [held]
        return []

    def needed_from(self) -> int:
        return self.held.start if self.held else 1 << 62

    def finish(self) -> list[Segment]:
        held, self.held = self.held, None
        return [held] if held else []


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


def speech_regions(wav: np.ndarray) -> list[Segment]:
    """Speech regions of a whole array, by Silero's own function (padded, gaps bridged)."""
    from silero_vad.sequence_vad import SileroVADSequence, get_speech_timestamps_sequence

    model = SileroVADSequence(str(silero_model_path()))
    found = get_speech_timestamps_sequence(
        np.ascontiguousarray(wav, dtype=np.float32), model, **VAD_PARAMS.silero_kwargs()
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
    merger = _Merger(max_samples)
    merged = [m for seg in segments for m in merger.add(seg)]
    return merged + merger.finish()
