"""Decode any audio or video file as 16 kHz mono float32, the model's input, as a stream.

FFmpeg (through PyAV) demuxes and decodes every common container; channels are averaged
to mono and soxr resamples at very high quality, because emotion2vec is sensitive to
resampling artefacts. Decoding streams in chunks of a few seconds, so memory does not grow
with the file, and a duration limit stops files that decode to more than it allows.

Unusable input raises `AudioError` with a one-line, human-readable reason and a
machine-readable `kind`. Headers are not trusted: a sample rate or channel count outside
what real recordings use is refused before anything is decoded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import av
import numpy as np
import soxr
from e2v.client.names import display_name

from e2v.contract import MIN_SAMPLES, SAMPLE_RATE

ErrorKind = Literal[
    "not_found",  # no such file
    "unreadable",  # exists but cannot be opened (permissions, a directory, a FIFO or device)
    "decode",  # not audio, unsupported, corrupt, truncated, or an implausible header
    "no_audio",  # a valid container without an audio stream (e.g. video only)
    "empty",  # zero-byte file or zero decoded samples
    "non_finite",  # NaN or Inf samples
    "out_of_range",  # finite samples far beyond full scale (a broken float file)
    "too_short",  # shorter than one model frame
    "too_long",  # longer than the duration limit, or than one model call (--segment none)
    "storage",  # object storage or network failed (credentials, bucket, connection)
]

# Header sanity: real recordings lie between telephony's 8 kHz (some codecs: 2 kHz) and
# 768 kHz studio rates, with at most 64 channels. A WAV claiming 1 Hz would otherwise turn a
# few kilobytes into gigabytes of resampled audio.
MIN_SOURCE_RATE = 2_000
MAX_SOURCE_RATE = 768_000
MAX_CHANNELS = 64
# Float files hold +-1.0 at full scale. Integer PCM stored as float reaches ~3.3e4; beyond
# 1e5 the file is broken, and values near 3e38 overflow the model's normalisation.
MAX_ABS_SAMPLE = 1e5
# Samples of the source rate gathered before one resampling step (about 2 s at 48 kHz).
_CHUNK_SOURCE_SAMPLES = 1 << 17

# Full scale of each integer sample type FFmpeg decodes to; float types are already +-1.
_INT_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31, np.dtype(np.int64): 2.0**63}

AudioSource = str | Path | BinaryIO

# Names that directory walks pick up: audio containers and video containers with audio.
AUDIO_SUFFIXES = {
    ".wav",
    ".flac",
    ".mp3",
    ".ogg",
    ".opus",
    ".m4a",
    ".aac",
    ".webm",
    ".mp4",
    ".mkv",
    ".mka",
    ".wma",
    ".amr",
    ".aiff",
    ".aif",
    ".au",
    ".caf",
    ".3gp",
    ".mov",
    ".oga",
    ".spx",
    ".gsm",
}


class AudioError(ValueError):
    """Audio that cannot be used; `str(err)` is the reason, `err.kind` its category."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind: ErrorKind = kind


def stream_audio(
    source: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    name: str | None = None,
    mix: bool = True,
) -> Iterator[np.ndarray]:
    """Yield `source` as consecutive mono float32 chunks at `sample_rate`.

    `source` is a path or a binary file object (e.g. `io.BytesIO` of an upload, an
    object in storage; `name` names it in messages). Raises AudioError, possibly after
    some chunks, for unusable input and when the decoded audio exceeds `max_duration_s`.
    `mix=False` keeps the channels apart: chunks are (channels, n), each channel
    resampled on its own (a stereo call is two parties, `e2v live`).
    """
    limit = None if max_duration_s is None else int(max_duration_s * sample_rate)
    produced = 0
    resampler = Resampler if mix else _ChannelResampler
    for chunk in _resampled(_decoded_chunks(source, name, mix), sample_rate, resampler):
        if chunk.size == 0:
            continue
        _check_samples(chunk)
        produced += chunk.shape[-1]
        if limit is not None and produced > limit:
            raise AudioError(
                "too_long",
                f"too long: more than {max_duration_s:g} s of audio (the --max-duration-s limit)",
            )
        yield chunk
    if produced == 0:
        raise AudioError("empty", "empty audio (0 samples)")


def load_audio(
    source: AudioSource, sample_rate: int = SAMPLE_RATE, max_duration_s: float | None = None
) -> np.ndarray:
    """Decode the first audio stream of `source` to one mono float32 array at `sample_rate`.

    Short clips are returned as they are: see `check_min_length`.
    """
    return np.concatenate(list(stream_audio(source, sample_rate, max_duration_s)))


def check_min_length(wav: np.ndarray) -> None:
    """Raise AudioError("too_short") when `wav` is shorter than one model frame."""
    if len(wav) < MIN_SAMPLES:
        raise AudioError(
            "too_short",
            f"too short: {audio_duration_s(wav):.4g} s "
            f"(< {MIN_SAMPLES / SAMPLE_RATE:g} s, one model frame)",
        )


def audio_duration_s(wav: np.ndarray | int, sample_rate: int = SAMPLE_RATE) -> float:
    """Duration of `wav` (or of that many samples) in seconds."""
    return (wav if isinstance(wav, int) else len(wav)) / sample_rate


def open_regular_file(path: str | Path) -> BinaryIO:
    """Open `path` for reading only if it is a non-empty regular file.

    FIFOs, devices and sockets are refused without blocking (a FIFO would hang open()
    forever); the file is checked through the descriptor that is then read, so it cannot
    be swapped in between.
    """
    name = display_name(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        broken = os.path.islink(path)
        reason = "broken symbolic link" if broken else "file not found"
        raise AudioError("not_found", f"{reason}: {name}") from None
    except PermissionError:
        raise AudioError("unreadable", f"permission denied: {name}") from None
    except (OSError, ValueError) as err:  # ELOOP, ENAMETOOLONG, ENXIO, embedded NUL...
        reason = getattr(err, "strerror", None) or str(err)
        raise AudioError("unreadable", f"cannot open {name}: {reason}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise AudioError("unreadable", f"is {what}: {name}")
    if info.st_size == 0:
        os.close(fd)
        raise AudioError("empty", f"empty file (0 bytes): {name}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _decoded_chunks(
    source: AudioSource, name: str | None, mix: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (sample_rate, mono float32) chunks of about _CHUNK_SOURCE_SAMPLES each
    ((channels, n) ones unless `mix`)."""
    pending: list[np.ndarray] = []
    pending_rate, pending_len = 0, 0
    for rate, mono in _decoded_frames(source, name, mix):
        if pending and mono.shape[:-1] != pending[0].shape[:-1]:
            raise AudioError(
                "decode",
                f"cannot decode: {name or 'upload'}: the channel count changes mid-stream "
                f"({len(pending[0])} to {len(mono)})",
            )
        if pending and (rate != pending_rate or pending_len >= _CHUNK_SOURCE_SAMPLES):
            yield pending_rate, np.concatenate(pending, axis=-1)
            pending, pending_len = [], 0
        pending.append(mono)
        pending_rate, pending_len = rate, pending_len + mono.shape[-1]
    if pending:
        yield pending_rate, np.concatenate(pending, axis=-1)


def _decoded_frames(
    source: AudioSource, name: str | None, mix: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (sample_rate, mono float32) per decoded frame of the first audio stream
    ((channels, n) float32 unless `mix`)."""
    is_path = isinstance(source, (str, Path))
    file = open_regular_file(source) if isinstance(source, (str, Path)) else source
    name = display_name(str(source)) if is_path else (name or "upload")
    try:
        try:
            container = av.open(file, mode="r", metadata_errors="ignore")  # a w+b spool is read too
        except (av.FFmpegError, MemoryError) as err:
            raise AudioError(
                "decode",
                f"cannot decode: {name}: not an audio file or unsupported format ({_reason(err)})",
            ) from err
        with container:
            if not container.streams.audio:
                raise AudioError("no_audio", f"no audio stream in {name}")
            stream, seconds = container.streams.audio[0], 0.0
            if stream.codec_context is None:
                raise AudioError("decode", f"cannot decode: {name}: unsupported audio codec")
            if stream.codec_context.sample_rate:  # some containers only know it per frame
                _check_header(stream.codec_context.sample_rate, stream.channels or 1, name)
            try:
                for packet in container.demux(stream):
                    for frame in packet.decode():
                        _check_header(frame.sample_rate, frame.layout.nb_channels, name)
                        seconds += frame.samples / frame.sample_rate
                        planes = _to_mono(frame) if mix else _planes(frame).astype(np.float32)
                        yield frame.sample_rate, planes
            except (av.FFmpegError, MemoryError) as err:
                raise AudioError(
                    "decode",
                    f"cannot decode: {name}: corrupt or truncated after {seconds:.2f} s "
                    f"({_reason(err)})",
                ) from err
    finally:
        if is_path:
            file.close()


def _check_header(rate: int, channels: int, name: str) -> None:
    if not MIN_SOURCE_RATE <= (rate or 0) <= MAX_SOURCE_RATE:
        raise AudioError(
            "decode",
            f"cannot decode: {name}: implausible sample rate {rate} Hz "
            f"(accepted: {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz)",
        )
    if not 1 <= (channels or 0) <= MAX_CHANNELS:
        raise AudioError(
            "decode",
            f"cannot decode: {name}: implausible channel count {channels} "
            f"(accepted: 1-{MAX_CHANNELS})",
        )


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or type(err).__name__


def _to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Average the channels of a decoded frame into float32 samples in [-1, 1]."""
    planes = _planes(frame)
    if len(planes) == 1:  # the mean of one value is that value: skip the reduction per frame
        return planes[0].astype(np.float32)
    return planes.mean(axis=0, dtype=np.float64).astype(np.float32)


def _planes(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame's samples in [-1, 1], one row per channel (float64 from integers)."""
    samples = frame.to_ndarray()
    if not frame.format.is_planar:
        samples = samples.reshape(-1, frame.layout.nb_channels).T
    if samples.dtype == np.uint8:
        samples = (samples.astype(np.float32) - 128.0) / 128.0
    elif samples.dtype in _INT_SCALE:
        samples = samples / _INT_SCALE[samples.dtype]
    return samples


class Resampler:
    """Push-based soxr very-high-quality resampling of one stream to `target` Hz.

    soxr keeps the filter state between pushes, so any chunking gives the samples of one
    whole-run resampling; `flush` returns the filter's tail. The batch decoder and live
    calls share it (emotion2vec is sensitive to resampling artefacts: one resampler, one
    set of samples). A stream already at `target` passes through untouched. `quality`
    other than VHQ is for live interim windows' newest samples only (client/live/party.py).
    """

    def __init__(self, source: int, target: int = SAMPLE_RATE, quality: str = "VHQ") -> None:
        self.source, self.target = source, target
        self._stream = None
        self._flushed = False
        if source != target:
            self._stream = soxr.ResampleStream(source, target, 1, dtype="float32", quality=quality)

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Resampled samples now available for `chunk` (mono float32 at `source` Hz)."""
        if self._flushed:
            raise ValueError("push after flush: the resampler is finished")
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(np.ascontiguousarray(chunk, dtype=np.float32))

    def flush(self) -> np.ndarray:
        """The rest of the stream; the resampler is then finished."""
        self._flushed = True
        if self._stream is None:
            return np.zeros(0, np.float32)
        stream, self._stream = self._stream, None
        return stream.resample_chunk(np.zeros(0, np.float32), last=True)


class _ChannelResampler:
    """A `Resampler` per channel of (channels, n) chunks: channels kept apart."""

    def __init__(self, source: int, target: int = SAMPLE_RATE) -> None:
        self.source, self.target = source, target
        self._channels: list[Resampler] = []

    def push(self, chunk: np.ndarray) -> np.ndarray:
        if not self._channels:
            self._channels = [Resampler(self.source, self.target) for _ in chunk]
        return np.stack([channel.push(row) for channel, row in zip(self._channels, chunk)])

    def flush(self) -> np.ndarray:
        return np.stack([channel.flush() for channel in self._channels] or [np.zeros(0)])


def _resampled(
    chunks: Iterator[tuple[int, np.ndarray]], target: int, make=Resampler
) -> Iterator[np.ndarray]:
    """Resample a stream of chunks: one `Resampler` (or `make`) per run of equal rates."""
    resampler: Resampler | None = None
    for chunk_rate, chunk in chunks:
        if resampler is None or chunk_rate != resampler.source:
            if resampler is not None:
                yield resampler.flush()
            resampler = make(chunk_rate, target)
        yield resampler.push(chunk)
    if resampler is not None:
        yield resampler.flush()


def _check_samples(chunk: np.ndarray) -> None:
    peak = float(np.max(np.abs(chunk)))
    if not np.isfinite(peak):
        raise AudioError("non_finite", "audio contains NaN or Inf samples")
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(
            "out_of_range",
            f"samples reach {peak:.3g}, beyond +-{MAX_ABS_SAMPLE:g} (full scale is 1.0): "
            f"a broken float file",
        )


__all__ = [
    "AudioError",
    "Resampler",
    "audio_duration_s",
    "check_min_length",
    "load_audio",
    "open_regular_file",
    "stream_audio",
]
