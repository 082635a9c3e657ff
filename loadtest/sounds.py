"""Labelled sound classes for custom-head tests and benchmarks (no recordings committed).

Four classes that differ in kind, not in emotion: a low hum, white noise, clicks and
formant-synthesised speech. Even synthetic:tiny's random-weight embeddings tell them apart
(about 98 % five-fold accuracy with a logistic head), so a head trained on them must
score well above chance. Clips vary in length (1-3 s), level, pitch and rate.
"""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from e2v.loadtest.synth import speech_like

from e2v.contract import SAMPLE_RATE

SR = SAMPLE_RATE
CLASSES = ("hum", "noise", "clicks", "speech")


def sound(label: str, seed: int, seconds: float | None = None) -> np.ndarray:
    """One clip of class `label` (float32, 16 kHz mono), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    seconds = seconds or float(rng.uniform(1.0, 3.0))
    n = round(seconds * SR)
    t = np.arange(n) / SR
    if label == "hum":  # mains-like hum: a low fundamental and its octave
        f = rng.uniform(80, 220)
        wav = np.sin(2 * np.pi * f * t) + 0.5 * np.sin(4 * np.pi * f * t + rng.uniform(0, 6))
    elif label == "noise":
        wav = rng.standard_normal(n)
    elif label == "clicks":  # a decaying impulse 3 to 12 times a second
        wav = np.zeros(n)
        wav[rng.integers(0, 400) :: int(SR / rng.uniform(3, 12))] = 1.0
        wav = np.convolve(wav, np.exp(-np.arange(80) / 10), mode="same")
    elif label == "speech":
        wav = speech_like(seconds, SR, seed).astype(np.float64)
    else:
        raise ValueError(f"unknown sound class {label!r}; choose one of {', '.join(CLASSES)}")
    wav = wav / (np.abs(wav).max() + 1e-9) * rng.uniform(0.1, 0.5)
    return wav.astype(np.float32)


def labelled_clips(per_class: int, seed: int = 0) -> Iterator[tuple[str, int, np.ndarray]]:
    """(label, index, clip) for `per_class` clips of every class, interleaved."""
    for index in range(per_class):
        for k, label in enumerate(CLASSES):
            yield label, index, sound(label, seed * 1_000_003 + index * len(CLASSES) + k)


def write_labelled_set(folder: Path, per_class: int, seed: int = 0, speakers: int = 0) -> Path:
    """16-bit WAV files under `folder` and `folder/manifest.csv` (path,label[,speaker]).

    `speakers` > 0 adds a `speaker` column: clip i of each class belongs to speaker
    i % speakers, a grouping for `--group-by` (every speaker has every class).
    """
    folder.mkdir(parents=True, exist_ok=True)
    header = "path,label,speaker" if speakers else "path,label"
    lines = [header]
    for label, index, clip in labelled_clips(per_class, seed):
        name = f"{label}_{seed}_{index:04d}.wav"
        write_wav(folder / name, clip)
        lines.append(f"{name},{label},s{index % speakers}" if speakers else f"{name},{label}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def write_wav(path: Path, clip: np.ndarray) -> Path:
    """A 16 kHz mono 16-bit PCM WAV file."""
    pcm = (np.clip(clip, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SR)
        out.writeframes(pcm.tobytes())
    return path
