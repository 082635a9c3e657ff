"""Prepared audio for a load test: real encoded recordings, decoded and cut ONCE.

A few speech-like recordings are encoded with FFmpeg (through PyAV) as telephony
mu-law WAV, MP3 and FLAC, decoded back with `e2v.client.audio.load_audio` (the client's own
path), then cut to the profile's clip lengths. The load generator only slices
ready-made arrays, so what it measures is the server, not decoding.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2v.loadtest.profiles import Profile, clip_lengths
from e2v.loadtest.synth import speech_like

from e2v.contract import (
    INPUT_WAV,
    INPUT_WAV_LENS,
    LENGTH_BUCKETS_S,
    MAX_SEGMENT_S,
    SAMPLE_RATE,
    bucket_samples,
)

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

    def one_per_bucket(self) -> list[int]:
        """A clip index for each length bucket the clips fill (the last clip of each): the
        requests that warm a server up, outside the measurement (first runs are slow)."""
        by_bucket = {bucket_samples(int(n)): i for i, n in enumerate(self.lengths)}
        return list(by_bucket.values())

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
    return cut_clips(profile, sources)


def cut_clips(profile: Profile, sources: list[np.ndarray]) -> Workload:
    """The profile's clip lengths cut at seeded offsets from the sources, in turn."""
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
        encode(path, clip, rate, container, codec)
        paths.append(path)
    return paths


def encode_recording(directory: Path, index: int) -> Path:
    """Write recording `index` of RECORDINGS as a real encoded file."""
    name, container, codec, rate = RECORDINGS[index]
    return encode(
        directory / name, speech_like(RECORDING_S, rate, seed=index), rate, container, codec
    )


def encode(path: Path, wav: np.ndarray, rate: int, container: str, codec: str) -> Path:
    """Float32 `wav`, mono (samples) or stereo (2, samples), as a real `container` file with
    `codec` (PyAV's FFmpeg)."""
    import av

    planes = np.ascontiguousarray(np.atleast_2d(wav), dtype=np.float32)
    layout = "mono" if len(planes) == 1 else "stereo"
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for item in (frame, None):
            out.mux(stream.encode(item))
    return path


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


def triton_inputs(module, wav: np.ndarray, lens: np.ndarray) -> list:
    """WAV [N, T] float32 and WAV_LENS [N, 1] int64 as inputs of tritonclient's `module`
    (tritonclient.grpc, .grpc.aio or .http: binary tensors over HTTP)."""
    inputs = [
        module.InferInput(INPUT_WAV, list(wav.shape), "FP32"),
        module.InferInput(INPUT_WAV_LENS, list(lens.shape), "INT64"),
    ]
    for tensor, data in zip(inputs, (wav, lens), strict=True):
        tensor.set_data_from_numpy(data)
    return inputs


def decode(path: Path) -> np.ndarray:
    """16 kHz mono float32 through the client's own loader."""
    from e2v.client.audio import load_audio

    return load_audio(path)
