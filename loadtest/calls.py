"""Stereo telephony call recordings for the live load test, and their offline utterances.

Two parties take turns (customer on the left channel, agent on the right), with speech from
`loadtest.synth`, encoded by FFmpeg (PyAV) as real 8 kHz mu-law WAV files: one stereo
recording per call (what a telephony platform streams; the driver sends its own mu-law
bytes) and one mono track per party. The offline utterances of a party are the batch
path's: `load_audio` of its track, Silero regions split and merged as
`e2v classify --segment vad` cuts a recording longer than one segment. A live final is
expected for each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2v.loadtest.synth import speech_like
from e2v.loadtest.workload import encode

from e2v.contract import MAX_SEGMENT_S, MIN_SAMPLES, SAMPLE_RATE

RATE = 8_000  # telephony: G.711 mu-law at 8 kHz, one byte per sample and channel
PARTIES = ("customer", "agent")
NOISE = 1e-3  # line noise on the silent party's channel (digital silence is unrealistic)


@dataclass(frozen=True)
class CallRecording:
    path: Path  # the stereo mu-law WAV
    payload: bytes  # its interleaved mu-law samples, as the file holds them
    tracks: tuple[np.ndarray, ...]  # each party's 16 kHz audio, decoded by the batch path

    @property
    def channels(self) -> int:
        return len(PARTIES)

    @property
    def duration_s(self) -> float:
        return len(self.payload) / len(PARTIES) / RATE

    def speech_share(self) -> float:
        """Share of the call in which each party is speaking (offline), averaged."""
        spoken = [sum(s.duration_s for s in offline_utterances(t)) for t in self.tracks]
        return float(np.mean(spoken)) / self.duration_s


def make_calls(directory: Path, count: int, seconds: float, seed: int = 0) -> list[CallRecording]:
    """`count` calls of `seconds` each, written to `directory` (deterministic per seed)."""
    directory.mkdir(parents=True, exist_ok=True)
    return [_make_call(directory, i, seconds, seed * 1000 + i) for i in range(count)]


def _make_call(directory: Path, index: int, seconds: float, seed: int) -> CallRecording:
    import soxr
    from e2v.client.audio import load_audio

    channels = _conversation(seconds, np.random.default_rng(seed))
    tracks, raw = [], []
    for party, signal in zip(PARTIES, channels, strict=True):
        narrow = soxr.resample(signal, SAMPLE_RATE, RATE, quality="VHQ").astype(np.float32)
        path = encode(directory / f"call-{index}-{party}.wav", narrow, RATE, "wav", "pcm_mulaw")
        raw.append(_mulaw_bytes(path))
        tracks.append(load_audio(path))
    stereo = directory / f"call-{index}.wav"
    decoded = np.stack([_decode_8k(directory / f"call-{index}-{p}.wav") for p in PARTIES])
    encode(stereo, decoded, RATE, "wav", "pcm_mulaw")
    payload = _mulaw_bytes(stereo)
    interleaved = np.stack([np.frombuffer(r, np.uint8) for r in raw], axis=1).tobytes()
    if payload != interleaved:  # the stereo file must carry exactly the parties' samples
        raise RuntimeError(f"{stereo}: stereo mu-law differs from its party tracks")
    return CallRecording(stereo, payload, tuple(tracks))


def turns(rng: np.random.Generator, seconds: float) -> Iterator[tuple[int, float, float]]:
    """The turns of a two-party call of `seconds`: (speaker, start s, length s). Turns of
    1.5-7 s, gaps of 0.2-1.5 s between them and now and then the next speaker starting
    early; the agent (1) answers first. A caller may draw from `rng` between turns: the
    sequence stays reproducible."""
    t, speaker = 0.3, 1
    while t < seconds - 1.0:
        length = min(rng.uniform(1.5, 7.0), seconds - t)
        yield speaker, t, length
        overlap = rng.uniform(0.2, 0.6) if rng.random() < 0.2 else 0.0
        t += length - overlap + (0.0 if overlap else rng.uniform(0.2, 1.5))
        speaker = 1 - speaker


def _conversation(seconds: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Two 16 kHz channels of `turns` of speech (a short pause inside some), line noise on
    both."""
    n = round(seconds * SAMPLE_RATE)
    channels = [NOISE * rng.standard_normal(n).astype(np.float32) for _ in PARTIES]
    for speaker, t, length in turns(rng, seconds):
        start = round(t * SAMPLE_RATE)
        speech = speech_like(length, SAMPLE_RATE, seed=int(rng.integers(1 << 30)))
        if length > 4 and rng.random() < 0.5:  # a breath: stays inside the utterance
            cut = round(rng.uniform(1.5, length - 1.5) * SAMPLE_RATE)
            speech[cut : cut + round(rng.uniform(0.3, 0.6) * SAMPLE_RATE)] = 0
        end = min(n, start + len(speech))
        channels[speaker][start:end] += speech[: end - start]
    return [np.clip(c, -1, 1) for c in channels]


def offline_utterances(track: np.ndarray) -> list:
    """The utterances `e2v classify --segment vad` cuts from `track` (16 kHz) when it is
    longer than one segment: Silero regions, split to the maximum, close ones merged."""
    from e2v.client.segment import merge_close, speech_regions, split_evenly

    if len(track) < MIN_SAMPLES:
        return []
    longest = round(MAX_SEGMENT_S * SAMPLE_RATE)
    pieces = [p for r in speech_regions(track) for p in split_evenly(r, longest)]
    return [s for s in merge_close(pieces, longest) if s.end - s.start >= MIN_SAMPLES]


def _mulaw_bytes(path: Path) -> bytes:
    """The mu-law samples of a WAV file, as its packets carry them (no decoding)."""
    import av

    with av.open(str(path)) as container:
        return b"".join(bytes(p) for p in container.demux(audio=0) if p.size)


def _decode_8k(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return (np.concatenate(frames).astype(np.float32) / 32768.0).astype(np.float32)
