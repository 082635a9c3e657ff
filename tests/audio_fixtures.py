"""Generate real encoded audio files for tests (no committed binaries).

Signals are float32 in [-1, 1]: 1-D for mono, (channels, samples) for multichannel.
`write_audio` encodes them with PyAV's bundled FFmpeg, so every file is a genuine
container a user could upload; the `write_*` corrupt helpers produce broken ones.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from e2v.loadtest.synth import speech_like

__all__ = ["speech_like"]  # the synthesizer lives in the package: benchmarks use it too

SR = 16_000


@dataclass(frozen=True)
class Encoding:
    """How to write one kind of file: container format, audio codec, codec options."""

    container: str
    codec: str
    options: tuple[tuple[str, str], ...] = ()


# Default encoding per file suffix; pass `codec=` to `write_audio` to override it.
ENCODINGS = {
    ".wav": Encoding("wav", "pcm_s16le"),
    ".flac": Encoding("flac", "flac"),
    # FFmpeg's native Vorbis encoder is "experimental" (the wheel has no libvorbis).
    ".ogg": Encoding("ogg", "vorbis", (("strict", "experimental"),)),
    ".opus": Encoding("ogg", "libopus"),
    ".mp3": Encoding("mp3", "libmp3lame"),
    ".m4a": Encoding("ipod", "aac"),
    ".webm": Encoding("webm", "libopus"),
    ".mp4": Encoding("mp4", "aac"),
    ".mkv": Encoding("matroska", "flac"),
}

# ---------------------------------------------------------------------------- signals


def tone(seconds: float, freq: float = 440.0, sr: int = SR, amplitude: float = 0.5) -> np.ndarray:
    """A sine wave."""
    t = np.arange(round(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, sr: int = SR, amplitude: float = 0.01, seed: int = 0) -> np.ndarray:
    """Gaussian white noise with standard deviation `amplitude`."""
    rng = np.random.default_rng(seed)
    return (amplitude * rng.standard_normal(round(seconds * sr))).astype(np.float32)


def silence(seconds: float, sr: int = SR) -> np.ndarray:
    """Digital silence."""
    return np.zeros(round(seconds * sr), dtype=np.float32)


def bursts(
    pattern: list[tuple[str, float]], sr: int = SR, seed: int = 0
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate ("speech", s) / ("silence", s) parts; return signal and speech spans."""
    parts, spans, start = [], [], 0
    for i, (kind, seconds) in enumerate(pattern):
        part = speech_like(seconds, sr, seed + i) if kind == "speech" else silence(seconds, sr)
        if kind == "speech":
            spans.append((start, start + len(part)))
        parts.append(part)
        start += len(part)
    return np.concatenate(parts), spans


def espeak(text: str, path: Path) -> Path:
    """Synthesize real speech with espeak-ng (apt package `espeak-ng`) into a wav file."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise FileNotFoundError("espeak-ng not installed (apt-get install espeak-ng)")
    subprocess.run([binary, "-v", "en", "-s", "150", "-w", str(path), text], check=True)
    return path


# ---------------------------------------------------------------------------- writers


def write_audio(
    path: str | Path,
    wav: np.ndarray,
    sample_rate: int = SR,
    codec: str | None = None,
    video: bool = False,
) -> Path:
    """Encode `wav` into `path`; container and default codec follow the suffix.

    `codec` overrides the suffix's codec (e.g. "pcm_mulaw", "pcm_alaw", "pcm_f32le" for
    .wav); `video=True` adds a short video track *before* the audio track (mp4/mkv/webm).
    """
    path = Path(path)
    encoding = ENCODINGS[path.suffix]
    codec = codec or encoding.codec
    planes = np.atleast_2d(np.asarray(wav, dtype=np.float32))
    if codec == "vorbis" and len(planes) == 1:  # FFmpeg's native encoder is stereo-only
        planes = np.concatenate([planes, planes])
    layout = {1: "mono", 2: "stereo"}[planes.shape[0]]
    with av.open(str(path), "w", format=encoding.container) as out:
        if video:
            picture = _add_video(out, "libvpx" if encoding.container == "webm" else "mpeg4")
        stream = out.add_stream(codec, rate=sample_rate, layout=layout)
        stream.codec_context.options = dict(encoding.options)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = 0
        for item in (frame, None):
            out.mux(stream.encode(item))
        if video:
            _write_video(out, picture, seconds=planes.shape[1] / sample_rate)
    return path


def write_video_only(path: str | Path, seconds: float = 1.0) -> Path:
    """A video file without any audio stream."""
    path = Path(path)
    with av.open(str(path), "w", format=ENCODINGS[path.suffix].container) as out:
        _write_video(out, _add_video(out, "mpeg4"), seconds)
    return path


def _add_video(out: av.container.OutputContainer, codec: str) -> av.VideoStream:
    stream = out.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    return stream


def _write_video(out: av.container.OutputContainer, stream: av.VideoStream, seconds: float):
    for i in range(max(1, round(seconds * 10))):
        image = np.full((48, 64, 3), (i * 25) % 256, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


# ---------------------------------------------------------------------------- broken files


def write_truncated(source: Path, path: Path, keep: float = 0.5) -> Path:
    """A copy of `source` cut off after the first `keep` fraction of its bytes."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_random_bytes(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """Random bytes (no valid header) under an audio suffix."""
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def write_empty_file(path: Path) -> Path:
    """A zero-byte file."""
    path.write_bytes(b"")
    return path


def write_header_only_wav(path: Path, sr: int = SR) -> Path:
    """A valid wav header with zero samples of data."""
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(sr)
        file.writeframes(b"")
    return path


def write_corrupt_middle(source: Path, path: Path, size: int = 2000, seed: int = 0) -> Path:
    """A copy of `source` with `size` random bytes written over its middle third."""
    data = bytearray(source.read_bytes())
    start = len(data) // 3
    data[start : start + size] = np.random.default_rng(seed).bytes(size)
    path.write_bytes(bytes(data))
    return path


def write_text(path: Path) -> Path:
    """A plain text file under an audio suffix."""
    path.write_text("this is not audio\n" * 50)
    return path


def write_nan_wav(path: Path, seconds: float = 1.0, sr: int = SR) -> Path:
    """A float32 wav whose samples include NaN and Inf."""
    wav = tone(seconds, sr=sr)
    wav[100] = np.nan
    wav[200] = np.inf
    return write_audio(path, wav, sr, codec="pcm_f32le")
