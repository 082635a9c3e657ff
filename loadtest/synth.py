"""Synthetic speech that Silero VAD accepts as speech, for tests and benchmarks.

No recordings are committed and model hubs are unreachable, so benchmarks of the
preprocessing tier (VAD included) need generated audio that a speech detector treats
like speech. A steady tone or a bare harmonic series is not enough for Silero.
"""

from __future__ import annotations

import numpy as np

from e2v.contract import SAMPLE_RATE

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


def speech_like(seconds: float, sr: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
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
