"""Prepared audio for a load test: real encoded recordings, decoded and cut ONCE.

A few speech-like recordings are encoded with FFmpeg (through PyAV) as telephony
mu-law WAV, MP3 and FLAC, decoded back with `client.audio.load_audio` (the client's own
path), then cut to the profile's clip lengths. The load generator only slices
ready-made arrays, so what it measures is the server, not decoding.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e2v.contract import LENGTH_BUCKETS_S, MAX_SEGMENT_S, SAMPLE_RATE, bucket_samples
from loadtest.profiles import Profile, clip_lengths

# (file name, container, codec, sample rate): a phone line, a compressed upload, a studio take.
RECORDINGS = (
    ("call-1.wav", "wav", "pcm_mulaw", 8_000),
    ("call-2.mp3", "mp3", "libmp3lame", 16_000),
    ("call-3.flac", "flac", "flac", 16_000),
)
RECORDING_S = MAX_SEGMENT_S + 5.0


@dataclass(frozen=True)
class Workload:
    """Clips of one profile: concatenated audio plus each clip's length in samples."""

    profile: str
    audio: np.ndarray  # float32, all clips back to back
    lengths: np.ndarray  # int64 samples per clip

    def __len__(self) -> int:
        return len(self.lengths)

    def clip(self, index: int) -> np.ndarray:
        """The unpadded clip `index` (what a user would upload)."""
        start = int(self.lengths[:index].sum())
        return self.audio[start : start + int(self.lengths[index])]

    def padded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """WAV [1, bucket] zero-padded to its length bucket and WAV_LENS [1, 1]."""
        clip = self.clip(index)
        wav = np.zeros((1, bucket_samples(len(clip))), dtype=np.float32)
        wav[0, : len(clip)] = clip
        return wav, np.array([[len(clip)]], dtype=np.int64)

    def duration_s(self, index: int) -> float:
        return float(self.lengths[index]) / SAMPLE_RATE

    def save(self, path: Path) -> Path:
        np.savez(path, profile=self.profile, audio=self.audio, lengths=self.lengths)
        return path

    @classmethod
    def load(cls, path: Path) -> Workload:
        with np.load(path) as data:
            return cls(str(data["profile"]), data["audio"], data["lengths"])


def bucket_name(num_samples: int) -> str:
    """Locust request name of a clip: its padded length bucket, e.g. '3s'."""
    return f"{bucket_samples(num_samples) / SAMPLE_RATE:g}s"


def bucket_order() -> list[str]:
    return [f"{s:g}s" for s in LENGTH_BUCKETS_S]


def prepare_workload(profile: Profile, workdir: Path | None = None) -> Workload:
    """Encode recordings, decode them with the client's loader and cut the profile's clips."""
    with tempfile.TemporaryDirectory(prefix="e2v-loadtest-audio-", dir=workdir) as tmp:
        sources = [decode(encode_recording(Path(tmp), i)) for i in range(len(RECORDINGS))]
    rng = np.random.default_rng(profile.seed + 1)
    clips = []
    for i, length in enumerate(clip_lengths(profile)):
        source = sources[i % len(sources)]
        start = int(rng.integers(0, len(source) - length + 1))
        clips.append(source[start : start + length])
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    return Workload(profile.name, np.concatenate(clips).astype(np.float32), lengths)


def encode_clips(workload: Workload, directory: Path) -> list[Path]:
    """Each clip as a real file, in the codec of the recording it was cut from (mu-law WAV
    at 8 kHz, MP3, FLAC): what a caller would upload to the gateway. Sorted by index."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(len(workload)):
        name, container, codec, rate = RECORDINGS[index % len(RECORDINGS)]
        clip = workload.clip(index)
        if rate != SAMPLE_RATE:
            import soxr

            clip = soxr.resample(clip, SAMPLE_RATE, rate, quality="VHQ").astype(np.float32)
        path = directory / f"clip-{index:03d}{Path(name).suffix}"
        _write(path, container, codec, rate, clip)
        paths.append(path)
    return paths


def encode_recording(directory: Path, index: int) -> Path:
    """Write recording `index` of RECORDINGS as a real encoded file."""
    name, container, codec, rate = RECORDINGS[index]
    path = directory / name
    _write(path, container, codec, rate, speech_like(RECORDING_S, rate, seed=index))
    return path


def _write(path: Path, container: str, codec: str, rate: int, wav: np.ndarray) -> None:
    import av

    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wav[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for item in (frame, None):
            out.mux(stream.encode(item))


# Multipart uploads of the encoded clips (gateway users, the direct/gateway comparison).
UPLOAD_BOUNDARY = "e2v-loadtest-7d1b2c"


def multipart_upload(path: Path) -> tuple[str, bytes]:
    """(Content-Type, body) of a form upload of `path` in the field `file`."""
    head = (
        f'--{UPLOAD_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    body = head + path.read_bytes() + f"\r\n--{UPLOAD_BOUNDARY}--\r\n".encode()
    return f"multipart/form-data; boundary={UPLOAD_BOUNDARY}", body


def decode(path: Path) -> np.ndarray:
    """16 kHz mono float32 through the client's own loader."""
    from client.audio import load_audio

    return load_audio(path)


# Formants (F1, F2, F3 in Hz) of eight English vowels, and their bandwidths.
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
    dtype=np.float32,
)
_BANDWIDTHS = (80.0, 100.0, 150.0)


def speech_like(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Source-filter speech: a jittered glottal harmonic series with intonation, shaped by
    vowel formants per syllable (~4 per second), consonant noise at onsets and short
    unvoiced gaps. Silero VAD hears it as speech (a plain harmonic tone it does not), so
    uploads through the gateway reach the model as real calls would."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    lengths = rng.uniform(0.14, 0.32, size=int(seconds / 0.14) + 2)
    bounds = np.concatenate([[0], np.cumsum((lengths * sample_rate).astype(int))])
    voiced = rng.random(len(lengths)) >= 0.12
    index = np.minimum(np.searchsorted(bounds, np.arange(n), side="right") - 1, len(lengths) - 1)
    pos = (np.arange(n) - bounds[index]) / (bounds[index + 1] - bounds[index])
    formants = _VOWELS[rng.integers(0, len(_VOWELS), len(lengths))][index]
    jitter = 3 * np.cumsum(rng.standard_normal(n)) / np.sqrt(sample_rate)
    f0 = 120 * (1 + 0.15 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 2 * np.pi))) + jitter
    phase = np.mod(2 * np.pi * np.cumsum(f0) / sample_rate, 2 * np.pi).astype(np.float32)
    f0 = f0.astype(np.float32)
    voice = np.zeros(n, dtype=np.float32)
    for k in range(1, int(sample_rate / 2 / f0.min())):
        fk = k * f0
        gain = sum(
            0.7**j / (1 + ((fk - formants[:, j]) / bw) ** 2) for j, bw in enumerate(_BANDWIDTHS)
        )
        voice += (gain + 0.02) * (fk < sample_rate / 2 - 300) / k * np.sin(k * phase)
    voice *= (np.sin(np.pi * pos) * voiced[index]).astype(np.float32)
    onset = np.clip(1 - pos / 0.18, 0, None) * ((rng.random(len(lengths)) < 0.6) & voiced)[index]
    hiss = np.diff(rng.standard_normal(n), prepend=0.0)
    out = voice / (np.abs(voice).max() + 1e-9) + 0.15 * hiss * onset
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)
