"""One party of a live call: resample -> streaming VAD cutter -> utterances.

The batch path's own pieces do the work: `Resampler` (soxr VHQ, as `e2v classify`
decodes) and `SegmentCutter` in "vad" mode with the whole-clip rule off, so the finals
are the segments `e2v classify --segment vad` cuts from the same audio. `push` is plain,
synchronous code (the session runs it in an executor) and returns what happened:
- `Start`: speech that starts a new utterance (a region the VAD will keep, not merged
  into the previous utterance);
- `Window`: every `hop_s` of audio while speech goes on, the last `window_s` of the
  utterance (on a fixed grid from the utterance's start, whatever the chunking);
- `Final`: a segment the cutter emits, once the merge can no longer grow.

Memory is the cutter's: audio from the open utterance's start on (at most one segment,
30 s, plus the merge gap and padding; a region longer than VAD_MAX_SPEECH_S is cut).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from e2v.client.audio import AudioError, Resampler
from e2v.client.segment import Segment, SegmentCutter, SegmentMode, vad_probs

from e2v.contract import MAX_SEGMENT_S, SAMPLE_RATE

# Silence pushed at a pause (AudioHook pause, a gap in the stream): long enough that the
# VAD closes the open region and the merge gap passes, so no utterance spans the pause.
BREAK_S = 2.0


@dataclass(frozen=True)
class Start:
    utterance: int
    start: int  # 16 kHz samples from the start of the party's stream


@dataclass(frozen=True)
class Window:
    utterance: int
    start: int
    end: int
    samples: np.ndarray
    skipped: int = 0  # older windows due in the same push, left out for this one


@dataclass(frozen=True)
class Final:
    utterance: int
    segment: Segment
    samples: np.ndarray


Action = Start | Window | Final


class PartyStream:
    """One channel's samples (float32 at `source_rate`) in, utterance actions out."""

    def __init__(
        self,
        source_rate: int,
        window_s: float,
        hop_s: float,
        max_segment_s: float = MAX_SEGMENT_S,
    ) -> None:
        self.resampler = Resampler(source_rate, SAMPLE_RATE)
        self.tail = _RawTail(source_rate) if source_rate != SAMPLE_RATE else None
        self.cutter = SegmentCutter(SegmentMode("vad"), max_segment_s, early=False)
        self.window = round(window_s * SAMPLE_RATE)
        self.hop = round(hop_s * SAMPLE_RATE)
        self.utterance = 0  # utterances started so far
        self.open: int | None = None  # start of the open utterance
        self.next_window = 0  # end sample of the next interim window

    @property
    def samples(self) -> int:
        """16 kHz samples of the party's stream so far (its audio time)."""
        return self.cutter.end

    @property
    def heard(self) -> int:
        """16 kHz samples received, those the exact resampler still holds back included."""
        return self.cutter.end if self.tail is None else max(self.cutter.end, self.tail.end)

    def resample(self, chunk: np.ndarray) -> np.ndarray:
        """The exact 16 kHz samples `chunk` releases (the raw tail keeps it too)."""
        if self.tail is not None:
            self.tail.push(chunk)
        return self.resampler.push(chunk)

    def push(self, chunk: np.ndarray) -> list[Action]:
        (actions,) = push_parties([self], [chunk])
        if isinstance(actions, Exception):
            raise actions
        return actions

    def cut(self, samples: np.ndarray, probs: np.ndarray | None = None) -> list[Action]:
        """The actions of 16 kHz `samples` (resampled already; `probs`: the VAD's
        probabilities of them, computed with other streams')."""
        return self._after(samples, self.cutter.push(samples, probs))

    def pause(self) -> list[Action]:
        """No audio for a while: BREAK_S of silence, so the open utterance ends here."""
        return self.push(np.zeros(round(BREAK_S * self.resampler.source), np.float32))

    def finish(self) -> list[Action]:
        """The rest: open utterances end. A stream under one model frame has none."""
        actions = self._cut(self.resampler.flush())
        if self.cutter.end == 0:
            return actions
        try:
            finals = self.cutter.finish()
        except AudioError:  # "too_short": under one model frame, so no speech
            finals = []
        return actions + self._finals(finals)

    def _cut(self, samples: np.ndarray) -> list[Action]:
        return self._after(samples, self.cutter.push(samples))

    def _after(self, samples: np.ndarray, cut: list[tuple[Segment, np.ndarray]]) -> list[Action]:
        """The actions of 16 kHz `samples` just pushed, which cut the segments `cut` (with
        none, the raw tail may still have made a window due)."""
        actions: list[Action] = []
        if len(samples):
            if self.tail is not None:
                self.tail.release(self.cutter.end)
            actions = self._finals(cut)
            if self.open is None and (start := self.cutter.open_start) is not None:
                actions.append(self._start(start))
        if self.open is not None:
            if self.cutter.speaking:
                actions += self._windows()
            else:
                self._pass_silence()
        return actions

    def _start(self, start: int) -> Start:
        self.utterance += 1
        self.open = start
        self.next_window = start + self.hop
        return Start(self.utterance, start)

    def _finals(self, found: list[tuple[Segment, np.ndarray]]) -> list[Action]:
        actions: list[Action] = []
        for segment, samples in found:
            if self.open is None:
                actions.append(self._start(segment.start))
            actions.append(Final(self.utterance, segment, samples))
            self.open = None
        return actions

    def _pass_silence(self) -> None:
        """No window is due while the utterance pauses: the grid moves past the pause."""
        end = self.heard
        if end >= self.next_window:
            self.next_window += ((end - self.next_window) // self.hop + 1) * self.hop

    def _windows(self) -> list[Action]:
        """Windows due in the audio just pushed: the newest of them, carrying how many
        older ones it stands for (a push of more than `hop_s`: the session was behind)."""
        end = self.heard
        if end < self.next_window:
            return []
        skipped = (end - self.next_window) // self.hop
        due = self.next_window + skipped * self.hop
        self.next_window = due + self.hop
        retained_from = self.cutter.end - self.cutter.retained
        start = max(self.open, due - self.window, retained_from)
        return [Window(self.utterance, start, due, self._read(start, due), skipped)]

    def _read(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end): the exact ones, then the raw tail's past them."""
        exact = self.cutter.end
        if end <= exact:
            return self.cutter.window(start, end)
        head = self.cutter.window(start, exact) if start < exact else np.zeros(0, np.float32)
        return np.concatenate((head, self.tail.read(max(start, exact), end)))


class _RawTail:
    """The newest source samples of a party, for the 16 kHz samples the exact resampler
    (soxr VHQ) still holds back: soxr releases its output in blocks, 17-111 ms behind the
    audio received (at 8 kHz). Read by linear interpolation on soxr's time base (16 kHz
    sample k is the source's instant k / ratio), and only when an interim window reaches
    past the exact samples: at most ~0.1 s of a 3 s window, read about once a second. The
    VAD and finals use the exact samples alone, so finals stay those of `e2v classify`."""

    KEEP = 4  # source samples kept before the exact resampler's end (interpolation's left)

    def __init__(self, source_rate: int) -> None:
        self.ratio = SAMPLE_RATE / source_rate
        self.start = 0  # source index of the first sample kept
        self.chunks: list[np.ndarray] = []
        self.received = 0  # source samples so far

    @property
    def end(self) -> int:
        """16 kHz samples the received audio covers."""
        return int(self.received * self.ratio)

    def push(self, chunk: np.ndarray) -> None:
        if len(chunk):
            self.chunks.append(chunk)
            self.received += len(chunk)

    def release(self, exact_end: int) -> None:
        """Forget whole chunks the exact resampler has released (all before `exact_end`)."""
        keep_from = int(exact_end / self.ratio) - self.KEEP
        while self.chunks and self.start + len(self.chunks[0]) <= keep_from:
            self.start += len(self.chunks.pop(0))

    def read(self, start: int, end: int) -> np.ndarray:
        """16 kHz samples [start, end) (start past the exact resampler's end)."""
        source = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        times = np.arange(start, end) / self.ratio - self.start
        return np.interp(times, np.arange(len(source)), source).astype(np.float32)


def push_parties(
    parties: list[PartyStream], chunks: list[np.ndarray]
) -> list[list[Action] | Exception]:
    """`party.push(chunk)` for each pair (distinct parties): resampled each, the VAD of all
    of them in one batched call (`segment.vad_probs`), then each party's cuts. A party
    whose resampling or cutting raises gets the exception instead of its actions (its
    session fails alone); the batched VAD raising raises."""
    resampled = [_attempt(party.resample, chunk) for party, chunk in zip(parties, chunks)]
    alive = [i for i, samples in enumerate(resampled) if not isinstance(samples, Exception)]
    probs = vad_probs([parties[i].cutter for i in alive], [resampled[i] for i in alive])
    out: list = list(resampled)
    for i, found in zip(alive, probs, strict=True):
        out[i] = _attempt(parties[i].cut, resampled[i], found)
    return out


def _attempt(step, *args):
    try:
        return step(*args)
    except Exception as exc:  # noqa: BLE001 - handed to the party's session
        return exc
