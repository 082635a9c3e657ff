"""Load any audio or video file as 16 kHz mono float32, the model's input.

FFmpeg (through PyAV) demuxes and decodes every common container; channels are
averaged to mono and soxr resamples at very high quality, because emotion2vec is
sensitive to resampling artefacts. Unusable input raises `AudioError` with a one-line,
human-readable reason and a machine-readable `kind`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import av
import numpy as np
import soxr

from e2v.contract import MIN_SAMPLES, SAMPLE_RATE

ErrorKind = Literal[
    "not_found",  # no such file
    "unreadable",  # exists but cannot be opened (permissions, a directory)
    "decode",  # not audio, unsupported, corrupt or truncated
    "no_audio",  # a valid container without an audio stream (e.g. video only)
    "empty",  # zero-byte file or zero decoded samples
    "non_finite",  # NaN or Inf samples
    "too_short",  # shorter than one model frame
    "too_long",  # longer than one model call allows (see client.segment)
]

# Full scale of each integer sample type FFmpeg decodes to; float types are already +-1.
_INT_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31, np.dtype(np.int64): 2.0**63}


class AudioError(ValueError):
    """Audio that cannot be used; `str(err)` is the reason, `err.kind` its category."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind: ErrorKind = kind


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of `path` to mono float32 at `sample_rate`.

    Raises AudioError for a missing, unreadable, undecodable or empty (0 bytes or
    0 samples) file and for NaN/Inf samples. Short clips are returned as they are:
    see `check_min_length`.
    """
    path = Path(path)
    _check_file(path)
    chunks = [
        _resample(np.concatenate([wav for _, wav in run]), rate, sample_rate)
        for rate, run in itertools.groupby(_decode(path), key=lambda chunk: chunk[0])
    ]
    wav = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if wav.size == 0:
        raise AudioError("empty", "empty audio (0 samples)")
    if not np.isfinite(wav).all():
        raise AudioError("non_finite", "audio contains NaN or Inf samples")
    return wav


def check_min_length(wav: np.ndarray) -> None:
    """Raise AudioError("too_short") when `wav` is shorter than one model frame."""
    if len(wav) < MIN_SAMPLES:
        raise AudioError(
            "too_short",
            f"too short: {audio_duration_s(wav):.4g} s "
            f"(< {MIN_SAMPLES / SAMPLE_RATE:g} s, one model frame)",
        )


def audio_duration_s(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Duration of `wav` in seconds."""
    return len(wav) / sample_rate


def _check_file(path: Path) -> None:
    """Fail early, with a clear reason, on paths FFmpeg would report cryptically."""
    try:
        with path.open("rb") as file:
            first = file.read(1)
    except FileNotFoundError:
        raise AudioError("not_found", f"file not found: {path}") from None
    except IsADirectoryError:
        raise AudioError("unreadable", f"is a directory, not a file: {path}") from None
    except PermissionError:
        raise AudioError("unreadable", f"permission denied: {path}") from None
    except OSError as err:
        raise AudioError("unreadable", f"cannot read {path}: {err.strerror}") from None
    if not first:
        raise AudioError("empty", f"empty file (0 bytes): {path}")


def _decode(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (sample_rate, mono float32) per decoded frame of the first audio stream."""
    try:
        # "file:" stops FFmpeg from reading names such as "pipe:0" as protocols.
        container = av.open(f"file:{path}", metadata_errors="ignore")
    except av.FFmpegError as err:
        raise AudioError(
            "decode",
            f"cannot decode: {path}: not an audio file or unsupported format ({err.strerror})",
        ) from err
    with container:
        if not container.streams.audio:
            raise AudioError("no_audio", f"no audio stream in {path}")
        stream, seconds = container.streams.audio[0], 0.0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    seconds += frame.samples / frame.sample_rate
                    yield frame.sample_rate, _to_mono(frame)
        except av.FFmpegError as err:
            raise AudioError(
                "decode",
                f"cannot decode: {path}: corrupt or truncated after {seconds:.2f} s "
                f"({err.strerror})",
            ) from err


def _to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Average the channels of a decoded frame into float32 samples in [-1, 1]."""
    samples = frame.to_ndarray()
    if not frame.format.is_planar:
        samples = samples.reshape(-1, frame.layout.nb_channels).T
    if samples.dtype == np.uint8:
        samples = (samples.astype(np.float32) - 128.0) / 128.0
    elif samples.dtype in _INT_SCALE:
        samples = samples / _INT_SCALE[samples.dtype]
    return samples.mean(axis=0, dtype=np.float64).astype(np.float32)


def _resample(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample with soxr's very-high-quality filter (no-op at the target rate)."""
    if rate == target or wav.size == 0:
        return wav
    return soxr.resample(wav, rate, target, quality="VHQ").astype(np.float32, copy=False)
