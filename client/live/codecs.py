"""Telephony audio payloads <-> float32 samples: 16-bit PCM, G.711 mu-law and A-law.

Live streams carry raw frames, not containers, so FFmpeg's demuxer has nothing to open;
the G.711 expansion is the 256-entry table FFmpeg itself builds (libavcodec/pcm_tablegen.h),
so a live mu-law stream decodes to the very samples `e2v classify` gets from the same
bytes in a WAV (tests compare with PyAV). Samples are scaled like the batch decoder's
integer PCM: int16 / 32768.
"""

from __future__ import annotations

import numpy as np

from e2v.contract import LIVE_ENCODINGS

_SCALE = 2.0**15


def _ulaw_to_linear(code: int) -> int:
    """FFmpeg's ulaw2linear."""
    code = ~code & 0xFF
    t = ((code & 0x0F) << 3) + 0x84
    t <<= (code & 0x70) >> 4
    return 0x84 - t if code & 0x80 else t - 0x84


def _alaw_to_linear(code: int) -> int:
    """FFmpeg's alaw2linear."""
    code ^= 0x55
    t = code & 0x0F
    segment = (code & 0x70) >> 4
    t = (t + t + 1 + 32) << (segment + 2) if segment else (t + t + 1) << 3
    return t if code & 0x80 else -t


_LINEAR = {
    "mulaw": np.array([_ulaw_to_linear(c) for c in range(256)], dtype=np.int16),
    "alaw": np.array([_alaw_to_linear(c) for c in range(256)], dtype=np.int16),
}
_FLOAT = {name: (table / _SCALE).astype(np.float32) for name, table in _LINEAR.items()}
# Encoding: the code whose expansion is nearest (searchsorted over the sorted expansions).
_ORDER = {name: np.argsort(table, kind="stable") for name, table in _LINEAR.items()}
_SORTED = {name: _LINEAR[name][order].astype(np.int32) for name, order in _ORDER.items()}


def bytes_per_sample(encoding: str) -> int:
    """Bytes of one sample of one channel."""
    _check(encoding)
    return 2 if encoding == "pcm_s16le" else 1


def decode(payload: bytes, encoding: str) -> np.ndarray:
    """Samples of `payload` as float32 in [-1, 1] (a trailing partial sample is an error:
    callers keep frames whole, see `LiveSession.feed`)."""
    _check(encoding)
    if encoding == "pcm_s16le":
        if len(payload) % 2:
            raise ValueError("pcm_s16le payload of an odd number of bytes")
        return (np.frombuffer(payload, dtype="<i2") / _SCALE).astype(np.float32)
    return _FLOAT[encoding][np.frombuffer(payload, dtype=np.uint8)]


def encode(samples: np.ndarray, encoding: str) -> bytes:
    """`samples` (float, full scale 1.0, clipped) as `encoding` bytes."""
    _check(encoding)
    linear = np.clip(np.round(np.asarray(samples, np.float64) * _SCALE), -32768, 32767)
    linear = linear.astype(np.int32)
    if encoding == "pcm_s16le":
        return linear.astype("<i2").tobytes()
    table = _SORTED[encoding]
    above = np.clip(np.searchsorted(table, linear), 1, len(table) - 1)
    nearer_below = (linear - table[above - 1]) <= (table[above] - linear)
    index = np.where(nearer_below, above - 1, above)
    return _ORDER[encoding][index].astype(np.uint8).tobytes()


def deinterleave(samples: np.ndarray, channels: int) -> list[np.ndarray]:
    """Split interleaved samples (sample by sample) into one contiguous array per channel."""
    if channels == 1:
        return [samples]
    if len(samples) % channels:
        raise ValueError(f"{len(samples)} samples do not split into {channels} channels")
    frames = samples.reshape(-1, channels)
    return [np.ascontiguousarray(frames[:, i]) for i in range(channels)]


def interleave(channels: list[np.ndarray]) -> np.ndarray:
    """The inverse of `deinterleave` (channels of equal length)."""
    return np.stack(channels, axis=1).reshape(-1)


def _check(encoding: str) -> None:
    if encoding not in LIVE_ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}: one of {', '.join(LIVE_ENCODINGS)}")
