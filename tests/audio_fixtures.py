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


# Formants (F1, F2, F3 in Hz) of eight English vowels.
_VOWELS = np.array(
    [
        (730, 1090, 2440),
        (270, 2290, 3010),
        (300, 870, 2240),
        (530, 1840, 2480),
        (570, 840, 2410),
        (660, 1720, 2410),
        (490, 1350, 1690),
        (440, 1020, 2240),
    ],
    dtype=np.float64,
)
_FORMANT_BANDWIDTHS = (80.0, 100.0, 150.0)


def speech_like(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Synthetic voiced speech that Silero VAD classifies as speech.

    Source-filter synthesis: a jittered glottal harmonic series (F0 ~120 Hz with
    intonation) shaped by vowel formants that glide between syllables of random length
    (~4 syllables/s), a syllable envelope, consonant noise bursts at onsets and short
    unvoiced gaps. A steady harmonic tone is *not* enough for Silero.
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = np.arange(n) / sr
    bounds, voiced = _syllables(n, sr, rng)
    index = np.searchsorted(bounds, np.arange(n), side="right") - 1
    pos = (np.arange(n) - bounds[index]) / (bounds[index + 1] - bounds[index])  # 0..1

    targets = _VOWELS[rng.integers(0, len(_VOWELS), len(voiced))]
    following = targets[np.minimum(index + 1, len(targets) - 1)]
    glide = np.clip((pos - 0.6) / 0.4, 0, 1)[:, None]
    formants = targets[index] + (following - targets[index]) * glide

    jitter = 3 * np.cumsum(rng.standard_normal(n)) / np.sqrt(sr)
    intonation = 1 + 0.15 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 2 * np.pi))
    f0 = 120 * intonation * (1 + 0.08 * np.sin(2 * np.pi * 3 * t)) + jitter
    # float32 from here on (twice as fast); the phase is wrapped first to stay precise.
    phase = np.mod(2 * np.pi * np.cumsum(f0) / sr, 2 * np.pi).astype(np.float32)
    f0, formants = f0.astype(np.float32), formants.astype(np.float32)

    voice = np.zeros(n, dtype=np.float32)
    for k in range(1, int(sr / 2 / f0.min())):
        fk = k * f0
        gain = sum(
            0.7**j / (1 + ((fk - formants[:, j]) / bw) ** 2)
            for j, bw in enumerate(_FORMANT_BANDWIDTHS)
        )
        voice += (gain + 0.02) * (fk < sr / 2 - 300) / k * np.sin(k * phase)
    voice *= (np.sin(np.pi * pos) * voiced[index]).astype(np.float32)  # syllable envelope

    has_consonant = (rng.random(len(voiced)) < 0.6) & voiced
    onset = np.clip(1 - pos / 0.18, 0, None) * has_consonant[index]
    hiss = np.diff(rng.standard_normal(n), prepend=0.0)
    out = voice / (np.abs(voice).max() + 1e-9) + 0.15 * hiss * onset
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def _syllables(n: int, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Syllable start samples (plus one past the end) and whether each is voiced."""
    bounds, voiced = [0], []
    while bounds[-1] < n:
        is_voiced = rng.random() >= 0.12
        seconds = rng.uniform(0.14, 0.32) if is_voiced else rng.uniform(0.08, 0.25)
        voiced.append(is_voiced)
        bounds.append(bounds[-1] + int(seconds * sr))
    return np.array(bounds), np.array(voiced)


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
