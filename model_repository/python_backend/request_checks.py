"""Per-request input checks shared by every Python-backend target (pure numpy).

Copied beside `model.py` into the version directory, so it must not import the `e2v`
package (the server image has only numpy and the runtime). One bad request in a dynamic
batch gets its own error; the others run. Limits come from the model config
(`max_samples`, `max_batch_samples`), written by the exporter from `e2v.contract`.

- `check_shapes`: shapes and the length/budget limits, before any sample is read.
- `check_request`: the above plus WAV_LENS range and finite samples in the valid part.
- `zero_padding` / `pad_concat`: padding beyond WAV_LENS is zeroed before use.
- `plan_runs`: groups accepted requests into runs of at most `max_batch_samples`.
- `check_outputs`: non-finite outputs are refused, not returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Mirrors e2v.contract (tests check they agree): used when a config lacks the parameters.
DEFAULT_MAX_SAMPLES = 480_000  # the largest length bucket, 30 s at 16 kHz
DEFAULT_MIN_SAMPLES = 400  # one frame of the conv feature encoder


def check_shapes(
    wav_shape: Sequence[int],
    lens_shape: Sequence[int],
    max_samples: int,
    max_batch_samples: int,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> str | None:
    """Why a request of these shapes is refused, or None. Reads no data."""
    if len(wav_shape) != 2:
        return f"WAV must be [batch, samples], got shape {list(wav_shape)}"
    rows, samples = int(wav_shape[0]), int(wav_shape[1])
    if rows < 1:
        return "WAV has no rows"
    if [int(d) for d in lens_shape] != [rows]:
        return f"WAV_LENS must hold one length per WAV row ({rows}), got {list(lens_shape)}"
    if samples > max_samples:
        return (
            f"WAV has {samples} samples per row, above the {max_samples}-sample maximum "
            f"({max_samples / 16000:g} s at 16 kHz): segment longer audio client-side"
        )
    if samples < min_samples:
        return f"WAV has {samples} samples per row, below the {min_samples}-sample minimum"
    if rows * samples > max_batch_samples:
        return (
            f"request of {rows} x {samples} samples exceeds the server's budget of "
            f"{max_batch_samples} samples per request: send fewer rows"
        )
    return None


def check_request(
    wav: np.ndarray,
    lens: np.ndarray,
    max_samples: int,
    max_batch_samples: int,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> str | None:
    """Why this request is refused, or None: shapes, WAV_LENS in range, finite samples."""
    problem = check_shapes(wav.shape, lens.shape, max_samples, max_batch_samples, min_samples)
    if problem:
        return problem
    samples = wav.shape[1]
    for row, length in enumerate(lens.tolist()):
        if not min_samples <= length <= samples:
            return (
                f"WAV_LENS[{row}]={length} is outside [{min_samples}, {samples}] "
                f"(valid samples must fit the row and hold at least one frame)"
            )
        if not np.isfinite(wav[row, :length]).all():
            return f"WAV row {row} holds NaN or infinite samples"
    return None


def zero_padding(wav: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """A float32 copy of `wav` with every sample at or beyond its row's length set to 0."""
    return pad_concat([wav], [lens], wav.shape[1])


def pad_concat(wavs: Sequence[np.ndarray], lens: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Rows of all requests in one [sum(B), width] float32 batch; padding is zero."""
    batch = np.zeros((sum(w.shape[0] for w in wavs), width), dtype=np.float32)
    row = 0
    for wav, lengths in zip(wavs, lens):
        for source, length in zip(wav, lengths.tolist()):
            batch[row, :length] = source[:length]
            row += 1
    return batch


def plan_runs(shapes: Sequence[tuple[int, int]], max_batch_samples: int) -> list[list[int]]:
    """Indices of requests grouped into runs whose padded size rows x width stays in budget.

    Each request alone must already fit (`check_shapes`); order is kept.
    """
    runs: list[list[int]] = []
    rows = width = 0
    for index, (batch, samples) in enumerate(shapes):
        new_width = max(width, samples)
        if runs and (rows + batch) * new_width <= max_batch_samples:
            runs[-1].append(index)
            rows, width = rows + batch, new_width
        else:
            runs.append([index])
            rows, width = batch, samples
    return runs


def check_outputs(outputs: Sequence[np.ndarray]) -> str | None:
    """Why these output rows are refused (non-finite values), or None."""
    for output in outputs:
        if not np.isfinite(output).all():
            return "the model produced NaN or infinite outputs for this input; refused"
    return None
