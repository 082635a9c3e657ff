"""Live payload codecs against FFmpeg (PyAV): G.711 tables, PCM, interleaving."""

from __future__ import annotations

import struct

import audio_fixtures as fx
import av
import numpy as np
import pytest
from e2v.client.audio import load_audio
from e2v.client.live import codecs

G711_FORMAT_TAGS = {"mulaw": 7, "alaw": 6}


def wav_payload(path) -> bytes:
    """The bytes of the `data` chunk of a RIFF/WAVE file (what a telephony stream sends)."""
    with open(path, "rb") as file:
        data = file.read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    position = 12
    while position + 8 <= len(data):
        name, size = struct.unpack("<4sI", data[position : position + 8])
        if name == b"data":
            return data[position + 8 : position + 8 + size]
        position += 8 + size + (size & 1)
    raise AssertionError("no data chunk")


def g711_wav(path, payload: bytes, encoding: str, rate: int = 8000, channels: int = 1):
    """A WAV whose data is `payload` as it is, so FFmpeg decodes exactly these codes."""
    header = struct.pack(
        "<4sI4s4sIHHIIHH",
        b"RIFF",
        36 + len(payload),
        b"WAVE",
        b"fmt ",
        16,
        G711_FORMAT_TAGS[encoding],
        channels,
        rate,
        rate * channels,
        channels,
        8,
    )
    path.write_bytes(header + struct.pack("<4sI", b"data", len(payload)) + payload)
    return path


def ffmpeg_int16(path) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray().reshape(-1) for p in container.demux() for f in p.decode()]
    return np.concatenate(frames)


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_every_g711_code_decodes_as_ffmpeg_decodes_it(tmp_path, encoding):
    codes = bytes(range(256)) * 3
    path = g711_wav(tmp_path / f"{encoding}.wav", codes, encoding)
    expected = ffmpeg_int16(path)
    assert expected.dtype == np.int16 and len(expected) == len(codes)
    np.testing.assert_array_equal(codecs.decode(codes, encoding), expected / 32768.0)


@pytest.mark.parametrize("encoding", ["mulaw", "alaw", "pcm_s16le"])
def test_a_real_wav_decodes_to_the_batch_decoders_samples(tmp_path, encoding):
    """FFmpeg encodes speech into a WAV; the live decoder on its data chunk gives exactly
    what `e2v classify`'s decoder (client/audio.py) gets from the file, before resampling."""
    wav = fx.speech_like(3.0, sr=8000, seed=3)
    codec = {"mulaw": "pcm_mulaw", "alaw": "pcm_alaw", "pcm_s16le": "pcm_s16le"}[encoding]
    path = fx.write_audio(tmp_path / "speech.wav", wav, sample_rate=8000, codec=codec)
    live = codecs.decode(wav_payload(path), encoding)
    np.testing.assert_array_equal(live, load_audio(path, sample_rate=8000))
    assert np.abs(live - wav).max() < 0.03  # G.711 quantisation at most


@pytest.mark.parametrize("encoding", ["mulaw", "alaw", "pcm_s16le"])
def test_encode_is_nearest_code_and_inverts_decode(encoding):
    width = codecs.bytes_per_sample(encoding)
    codes = bytes(range(256)) * width
    decoded = codecs.decode(codes, encoding)
    again = codecs.decode(codecs.encode(decoded, encoding), encoding)
    np.testing.assert_array_equal(again, decoded)
    x = np.random.default_rng(0).uniform(-1.2, 1.2, 20_000)
    got = codecs.decode(codecs.encode(x, encoding), encoding)
    if encoding == "pcm_s16le":
        np.testing.assert_array_equal(got, np.clip(np.round(x * 32768), -32768, 32767) / 32768)
        return
    table = np.unique(decoded)
    linear = np.clip(np.round(x * 32768), -32768, 32767) / 32768
    nearest = np.abs(table[None, :] - linear[:, None]).min(axis=1)
    np.testing.assert_allclose(np.abs(got - linear), nearest, atol=1e-9)


def test_deinterleave_splits_sample_by_sample_and_refuses_partial_frames():
    samples = np.arange(10, dtype=np.float32)
    left, right = codecs.deinterleave(samples, 2)
    np.testing.assert_array_equal(left, [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(right, [1, 3, 5, 7, 9])
    assert left.flags.c_contiguous
    np.testing.assert_array_equal(codecs.interleave([left, right]), samples)
    with pytest.raises(ValueError, match="do not split"):
        codecs.deinterleave(samples[:9], 2)


def test_unknown_encodings_and_odd_pcm_are_refused():
    with pytest.raises(ValueError, match="unknown encoding"):
        codecs.decode(b"\0\0", "opus")
    with pytest.raises(ValueError, match="odd number"):
        codecs.decode(b"\0\0\0", "pcm_s16le")
    assert codecs.decode(b"", "mulaw").size == 0
