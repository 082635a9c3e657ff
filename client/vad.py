"""Silero VAD over a stream: the same speech regions as a whole-file run, in bounded memory.

Silero's sequence model is an LSTM over 32 ms frames. `StreamingVad` carries its state
(and each frame's 64-sample context) from one block of 512 frames to the next, exactly as
`silero_vad.get_speech_timestamps_sequence` does over a whole array, so the frame
probabilities are the same bits. `SpeechTracker` is Silero's
`get_speech_timestamps_from_probs` state machine, fed frame by frame, and `RegionPadder`
its final padding pass, which needs only the next region. Tests compare all three with
Silero's own functions.

Only numpy and onnxruntime are needed: the model file is vendored (client/silero, MIT), so
the client runs without the silero-vad wheel, which depends on torch.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e2v.contract import SAMPLE_RATE

FRAME = 512  # samples per VAD frame at 16 kHz
CONTEXT = 64  # samples of the previous frame each frame sees
BLOCK_FRAMES = 512  # most frames per ONNX call, as in silero_vad (16.4 s)
HIDDEN = 128  # LSTM state per stream


@dataclass(frozen=True)
class VadParams:
    """Silero's `get_speech_timestamps` parameters, in samples at 16 kHz."""

    threshold: float
    min_speech_ms: int
    min_silence_ms: int
    speech_pad_ms: int
    max_speech_s: float
    min_silence_at_max_speech_ms: int = 98
    use_max_poss_sil_at_max_speech: bool = True

    @property
    def neg_threshold(self) -> float:
        return max(self.threshold - 0.15, 0.01)

    @property
    def pad(self) -> float:
        return SAMPLE_RATE * self.speech_pad_ms / 1000

    def silero_kwargs(self) -> dict:
        """The same parameters as keyword arguments of Silero's functions."""
        return {
            "threshold": self.threshold,
            "sampling_rate": SAMPLE_RATE,
            "min_speech_duration_ms": self.min_speech_ms,
            "min_silence_duration_ms": self.min_silence_ms,
            "speech_pad_ms": self.speech_pad_ms,
            "max_speech_duration_s": self.max_speech_s,
            "min_silence_at_max_speech": self.min_silence_at_max_speech_ms,
            "use_max_poss_sil_at_max_speech": self.use_max_poss_sil_at_max_speech,
        }


def silero_model_path() -> Path:
    """Silero's sequence ONNX model, vendored in client/silero (the wheel needs torch)."""
    return Path(__file__).parent / "silero" / "silero_vad_16k_sequence.onnx"


def batched_model_paths() -> tuple[Path, Path]:
    """The batched graph built from it (export/vad_graph.py): encoder, recurrent part."""
    folder = Path(__file__).parent / "silero"
    return folder / "silero_vad_16k_encoder.onnx", folder / "silero_vad_16k_recurrent.onnx"


def wheel_model_path() -> Path | None:
    """The same model inside an installed silero-vad wheel (located, not imported)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    return path / "silero_vad_16k_sequence.onnx"


@functools.lru_cache(maxsize=1)
def silero_session():
    """One ONNX Runtime session per process; `run` is thread-safe, so threads share it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )


@functools.lru_cache(maxsize=1)
def batched_sessions():
    """The batched graph's two sessions (built by export/vad_graph.py), one per process.

    The encoder runs without weight prepacking, the recurrent part with it: each then
    sums in the order Silero's own session does, so the probabilities are the same bits.
    """
    import onnxruntime as ort

    sessions = []
    for path, prepack in zip(batched_model_paths(), (False, True), strict=True):
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        sessions.append(
            ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        )
    return tuple(sessions)


class _FrameFeed:
    """A stream's audio cut into Silero's model inputs: [frames, 64 context + 512]."""

    def __init__(self) -> None:
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def take(self, chunk: np.ndarray) -> np.ndarray:
        """Model inputs of every complete frame now available (maybe none)."""
        if len(chunk):
            self._pending.append(chunk)
            self._pending_len += len(chunk)
        usable = self._pending_len // FRAME * FRAME
        if not usable:
            return np.zeros((0, CONTEXT + FRAME), dtype=np.float32)
        audio = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending = [audio[usable:]] if len(audio) > usable else []
        self._pending_len = len(audio) - usable
        return self._inputs(audio[:usable])

    def take_rest(self) -> np.ndarray:
        """Model inputs of the rest, the last frame zero-padded (as Silero does)."""
        audio = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        self._pending, self._pending_len = [], 0
        padded = np.zeros(-(-len(audio) // FRAME) * FRAME, dtype=np.float32)
        padded[: len(audio)] = audio
        return self._inputs(padded)

    def _inputs(self, audio: np.ndarray) -> np.ndarray:
        frames = audio.reshape(-1, FRAME)
        inputs = np.empty((len(frames), CONTEXT + FRAME), dtype=np.float32)
        if len(frames):
            inputs[0, :CONTEXT] = self._context
            inputs[1:, :CONTEXT] = frames[:-1, -CONTEXT:]
            inputs[:, CONTEXT:] = frames
            self._context = frames[-1, -CONTEXT:].copy()
        return inputs


class StreamingVad:
    """Per-frame speech probabilities of audio fed in chunks of any size.

    Runs the batched graph (export/vad_graph.py): Silero's weights and Silero's
    probabilities, bit for bit (tested), at about three times the speed, because its
    convolutions run as one GEMM over all frames instead of one per frame. Several
    streams can share ONNX calls: see `feed_streams`.
    """

    def __init__(self) -> None:
        self._encoder, self._recurrent = batched_sessions()
        self._hidden = np.zeros((1, 1, HIDDEN), dtype=np.float32)
        self._cell = np.zeros((1, 1, HIDDEN), dtype=np.float32)
        self._frames = _FrameFeed()

    def feed(self, chunk: np.ndarray) -> np.ndarray:
        """Probabilities of every complete frame now available.

        Silero's probabilities do not depend on how frames are grouped into ONNX calls
        (tested bit for bit), so frames run as soon as they are complete.
        """
        return self._run(self._frames.take(chunk))

    def finish(self) -> np.ndarray:
        """Probabilities of the rest, the last frame zero-padded (as Silero does)."""
        return self._run(self._frames.take_rest())

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        out = [
            feed_streams_inputs([self], [inputs[i : i + BLOCK_FRAMES]])[0]
            for i in range(0, len(inputs), BLOCK_FRAMES)
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def feed_streams(vads: list[StreamingVad], chunks: list[np.ndarray]) -> list[np.ndarray]:
    """`vad.feed(chunk)` for each pair, in two ONNX calls for all streams together.

    Each stream keeps its own LSTM state; the encoder runs on all streams' frames at
    once and the LSTM with one batch row per stream (its own length), which is how a
    gateway serves many live channels per core. The probabilities are each stream's own.
    """
    inputs = [vad._frames.take(chunk) for vad, chunk in zip(vads, chunks, strict=True)]
    if max((len(x) for x in inputs), default=0) <= BLOCK_FRAMES:
        return feed_streams_inputs(vads, inputs)
    return [vad._run(x) for vad, x in zip(vads, inputs, strict=True)]  # long: stream by stream


def feed_streams_inputs(vads: list[StreamingVad], inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Probabilities of model inputs [frames_i, 576] of each stream (state carried)."""
    lengths = [len(x) for x in inputs]
    busy = [i for i, n in enumerate(lengths) if n]
    out = [np.zeros(0, dtype=np.float32) for _ in inputs]
    if not busy:
        return out
    encoder, recurrent = vads[busy[0]]._encoder, vads[busy[0]]._recurrent
    frames = inputs[busy[0]] if len(busy) == 1 else np.concatenate([inputs[i] for i in busy])
    (features,) = encoder.run(None, {"input": frames[None]})  # [frames, 1, 128]
    longest = max(lengths)
    if len(busy) == 1:
        batch = features
    else:  # [longest, streams, 128], each stream's frames from the top
        batch = np.zeros((longest, len(busy), HIDDEN), dtype=np.float32)
        offset = 0
        for row, i in enumerate(busy):
            batch[: lengths[i], row] = features[offset : offset + lengths[i], 0]
            offset += lengths[i]
    hidden = np.concatenate([vads[i]._hidden for i in busy], axis=1)
    cell = np.concatenate([vads[i]._cell for i in busy], axis=1)
    probs, hn, cn = recurrent.run(
        None,
        {
            "features": batch,
            "sequence_lens": np.array([lengths[i] for i in busy], dtype=np.int32),
            "h": hidden,
            "c": cell,
        },
    )
    for row, i in enumerate(busy):
        vads[i]._hidden, vads[i]._cell = hn[:, row : row + 1], cn[:, row : row + 1]
        out[i] = probs[row, : lengths[i]]
    return out


class SequenceVad:
    """The previous path: Silero's own sequence model, one stream per ONNX call.

    Kept as the reference that `e2v bench client` and the tests compare against.
    """

    def __init__(self) -> None:
        self._session = silero_session()
        self._hidden = np.zeros((1, 1, 128), dtype=np.float32)
        self._cell = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def feed(self, chunk: np.ndarray) -> np.ndarray:
        """Probabilities of every complete frame now available.

        Silero's probabilities do not depend on how frames are grouped into ONNX calls
        (tested bit for bit), so frames run as soon as they are complete.
        """
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        if self._pending_len < FRAME:
            return np.zeros(0, dtype=np.float32)
        audio = np.concatenate(self._pending)
        usable = len(audio) // FRAME * FRAME
        self._pending = [audio[usable:]]
        self._pending_len = len(audio) - usable
        block = FRAME * BLOCK_FRAMES
        return np.concatenate(
            [self._run(audio[i : min(i + block, usable)]) for i in range(0, usable, block)]
        )

    def finish(self) -> np.ndarray:
        """Probabilities of the rest, the last frame zero-padded (as Silero does)."""
        audio = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        self._pending, self._pending_len = [], 0
        if audio.size == 0:
            return np.zeros(0, dtype=np.float32)
        frames = -(-len(audio) // FRAME)
        padded = np.zeros(frames * FRAME, dtype=np.float32)
        padded[: len(audio)] = audio
        return self._run(padded)

    def _run(self, audio: np.ndarray) -> np.ndarray:
        frames = audio.reshape(-1, FRAME)
        contexts = np.empty((len(frames), CONTEXT), dtype=np.float32)
        contexts[0] = self._context
        contexts[1:] = frames[:-1, -CONTEXT:]
        self._context = frames[-1, -CONTEXT:].copy()
        probs, self._hidden, self._cell = self._session.run(
            ["speech_probs", "hn", "cn"],
            {
                "input": np.concatenate((contexts, frames), axis=1),
                "h": self._hidden,
                "c": self._cell,
            },
        )
        return np.asarray(probs, dtype=np.float32).reshape(-1)


class SpeechTracker:
    """Silero's `get_speech_timestamps_from_probs` loop, one frame at a time.

    `push` returns the raw (unpadded) regions that closed; `finish` the one still open.
    The statements mirror Silero's so that a line-by-line comparison is possible.
    """

    def __init__(self, params: VadParams) -> None:
        self.p = params
        sr = SAMPLE_RATE
        self.min_speech = sr * params.min_speech_ms / 1000
        self.max_speech = sr * params.max_speech_s - FRAME - 2 * params.pad
        self.min_silence = sr * params.min_silence_ms / 1000
        self.min_silence_at_max = sr * params.min_silence_at_max_speech_ms / 1000
        self.triggered = False
        self.current: dict[str, int] = {}
        self.temp_end = self.prev_end = self.next_start = 0
        self.possible_ends: list[tuple[int, int]] = []
        self.frame = 0
        self.confirmed = False  # a region that will be kept has been seen

    @property
    def open_start(self) -> int | None:
        """Start of the region being tracked, if any (a lower bound for the next region)."""
        return self.current.get("start")

    def push(self, probs: np.ndarray) -> list[tuple[int, int]]:
        closed: list[tuple[int, int]] = []
        for prob in probs.tolist():
            self._step(prob, self.frame * FRAME, closed)
            self.frame += 1
        return closed

    def finish(self, total_samples: int) -> list[tuple[int, int]]:
        if self.current and (total_samples - self.current["start"]) > self.min_speech:
            self.confirmed = True
            return [(self.current["start"], total_samples)]
        return []

    def _step(self, prob: float, cur: int, out: list[tuple[int, int]]) -> None:  # noqa: C901
        p = self.p
        if self.triggered and prob >= p.threshold and cur - self.current["start"] > self.min_speech:
            # Speech now, long enough already: whenever this region closes, it is kept.
            self.confirmed = True
        if prob >= p.threshold and self.temp_end:
            sil_dur = cur - self.temp_end
            if sil_dur > self.min_silence_at_max:
                self.possible_ends.append((self.temp_end, sil_dur))
            self.temp_end = 0
            if self.next_start < self.prev_end:
                self.next_start = cur
        if prob >= p.threshold and not self.triggered:
            self.triggered = True
            self.current["start"] = cur
            return
        if self.triggered and (cur - self.current["start"] > self.max_speech):
            if p.use_max_poss_sil_at_max_speech and self.possible_ends:
                self.prev_end, dur = max(self.possible_ends, key=lambda x: x[1])
                self._close(self.prev_end, out, check_length=False)
                self.next_start = self.prev_end + dur
                if self.next_start < self.prev_end + cur:
                    self.current["start"] = self.next_start
                else:
                    self.triggered = False
                self.prev_end = self.next_start = self.temp_end = 0
                self.possible_ends = []
            elif self.prev_end:
                self._close(self.prev_end, out, check_length=False)
                if self.next_start < self.prev_end:
                    self.triggered = False
                else:
                    self.current["start"] = self.next_start
                self.prev_end = self.next_start = self.temp_end = 0
                self.possible_ends = []
            else:
                self._close(cur, out, check_length=False)
                self.prev_end = self.next_start = self.temp_end = 0
                self.triggered = False
                self.possible_ends = []
                return
        if prob < p.neg_threshold and self.triggered:
            if not self.temp_end:
                self.temp_end = cur
            sil_dur_now = cur - self.temp_end
            if not p.use_max_poss_sil_at_max_speech and sil_dur_now > self.min_silence_at_max:
                self.prev_end = self.temp_end
            if sil_dur_now < self.min_silence:
                return
            self._close(self.temp_end, out, check_length=True)
            self.prev_end = self.next_start = self.temp_end = 0
            self.triggered = False
            self.possible_ends = []

    def _close(self, end: int, out: list[tuple[int, int]], check_length: bool) -> None:
        start = self.current["start"]
        if not check_length or end - start > self.min_speech:
            out.append((start, end))
            self.confirmed = True
        self.current = {}


class RegionPadder:
    """Silero's padding pass over regions that arrive one by one.

    A region's end depends on the next region's start (a short pause is split between
    them), so each region is held until the next arrives or no later region can be close.
    """

    def __init__(self, pad: float) -> None:
        self.pad = pad
        self.pending: list[int] | None = None  # [start (padded), end (raw)]

    def add(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        if self.pending is None:
            start = int(max(0, start - self.pad))
        else:
            silence = start - self.pending[1]
            if silence < 2 * self.pad:
                self.pending[1] += int(silence // 2)
                start = int(max(0, start - silence // 2))
            else:
                self.pending[1] = int(self.pending[1] + self.pad)
                start = int(max(0, start - self.pad))
            yield self.pending[0], self.pending[1]
        self.pending = [start, end]

    def settle(self, earliest_next_start: int) -> Iterator[tuple[int, int]]:
        """Release the held region once no later region can start within 2 x pad of it."""
        if self.pending is not None and earliest_next_start - self.pending[1] >= 2 * self.pad:
            start, end = self.pending
            self.pending = None
            yield start, int(end + self.pad)

    def finish(self, total_samples: int) -> Iterator[tuple[int, int]]:
        if self.pending is not None:
            start, end = self.pending
            self.pending = None
            yield start, int(min(total_samples, end + self.pad))
