"""The classification job: files -> decode -> segment -> Triton -> per-file results.

Decoding runs in worker threads while requests are in flight, and results are handed to
the writer as each file finishes, so a long batch job loses nothing when it stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.audio import AudioError, audio_duration_s, check_min_length, load_audio
from client.results import FileResult, aggregate, segment_result
from client.segment import SegmentMode, segment_audio
from client.triton import InferenceError, ServerUnavailable, TritonEmotionClient
from e2v.contract import MIN_SAMPLES, SAMPLE_RATE


@dataclass(frozen=True)
class JobOptions:
    url: str = "localhost:8001"
    protocol: str = "grpc"
    model: str = "emotion2vec"
    segment: SegmentMode | None = None  # None: VAD
    concurrency: int = 16  # requests in flight
    thresholds: dict[str, float] | None = None
    retries: int = 6


async def classify_files(
    paths: Iterable[str],
    client: TritonEmotionClient,
    options: JobOptions,
    on_result: Callable[[FileResult], None],
    on_audio: Callable[[float], None] | None = None,
) -> None:
    """Classify every path with a connected `client`, calling `on_result` once per path
    as it completes.

    Raises ServerUnavailable (after retries) when the server goes away: files not yet
    reported are left for a `--resume` run.
    """
    requests = asyncio.Semaphore(options.concurrency)
    files_in_flight = asyncio.Semaphore(max(2, options.concurrency // 2))

    async def one(path: str) -> None:
        async with files_in_flight:
            result = await _classify_one(path, client, requests, options)
        if on_audio and result.duration_s:
            on_audio(result.duration_s)
        on_result(result)

    tasks = [asyncio.create_task(one(p)) for p in paths]
    try:
        await _gather_stop_on_unavailable(tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _gather_stop_on_unavailable(tasks: list[asyncio.Task]) -> None:
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()


async def _classify_one(
    path: str, client: TritonEmotionClient, requests: asyncio.Semaphore, options: JobOptions
) -> FileResult:
    info = client.info
    try:
        # Decoding and VAD are CPU work: a worker thread keeps requests flowing meanwhile.
        wav, segments = await asyncio.to_thread(
            _decode_and_segment, path, options.segment or SegmentMode("vad"), info.max_samples
        )
    except AudioError as exc:
        return FileResult(
            file=path,
            error=str(exc),
            error_kind=getattr(exc, "kind", "audio"),
            model=info.name,
            synthetic=info.synthetic,
        )
    except ValueError as exc:  # e.g. --segment none on a clip longer than the maximum
        return FileResult(
            file=path,
            error=str(exc),
            error_kind="segment",
            model=info.name,
            synthetic=info.synthetic,
        )
    segments = [s for s in segments if s.end - s.start >= MIN_SAMPLES]

    async def predict(segment):
        async with requests:
            return await client.predict(np.ascontiguousarray(wav[segment.start : segment.end]))

    try:
        predictions = await asyncio.gather(*(predict(s) for s in segments))
    except InferenceError as exc:
        return FileResult(
            file=path,
            error=f"server rejected the request: {exc}",
            error_kind="inference",
            model=info.name,
            synthetic=info.synthetic,
        )
    results = [segment_result(s, p, info) for s, p in zip(segments, predictions)]
    return aggregate(path, audio_duration_s(wav), results, info, options.thresholds or {})


def _decode_and_segment(path: str, mode: SegmentMode, max_samples: int):
    wav = load_audio(path)
    check_min_length(wav)
    return wav, segment_audio(wav, mode, max_samples / SAMPLE_RATE)


AUDIO_SUFFIXES = {
    ".wav",
    ".flac",
    ".mp3",
    ".ogg",
    ".opus",
    ".m4a",
    ".aac",
    ".webm",
    ".mp4",
    ".mkv",
    ".mka",
    ".wma",
    ".amr",
    ".aiff",
    ".aif",
    ".au",
    ".caf",
    ".3gp",
    ".mov",
    ".oga",
    ".spx",
    ".gsm",
}


def expand_paths(inputs: Iterable[str]) -> tuple[list[str], list[FileResult]]:
    """Files, directories (recursive, audio/video suffixes) and globs -> (files, errors)."""
    import glob

    files: list[str] = []
    errors: list[FileResult] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
            )
            if not found:
                errors.append(
                    FileResult(
                        file=item,
                        error=f"no audio files in directory {item}",
                        error_kind="empty_directory",
                    )
                )
            files += found
        elif path.exists() or path.is_symlink():
            files.append(item)
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                errors.append(
                    FileResult(file=item, error=f"no files match {item}", error_kind="not_found")
                )
            files += matches
        else:
            errors.append(
                FileResult(file=item, error=f"file not found: {item}", error_kind="not_found")
            )
    return list(dict.fromkeys(files)), errors


__all__ = ["JobOptions", "ServerUnavailable", "classify_files", "expand_paths"]
