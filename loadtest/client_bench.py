"""`e2v bench client`: how fast the preprocessing tier is, per stage and per core.

Real encoded files of the call-centre mix (telephony mu-law WAV at 8 kHz, MP3 and FLAC):
utterances cut to the call-centre profile's lengths, and 5-minute calls with turns and
pauses (mixed formats, and 8 kHz mu-law telephony). Each stage is timed in CPU seconds,
so the figures are audio-s/s per core: decode (+ resampling to 16 kHz), VAD alone, and
decode + VAD + segmentation as `e2v classify` runs them. The VAD and the whole
preprocessing are also timed on the previous code path (Silero's own sequence model, one
ONNX call per block: `client.vad.SequenceVad`), interleaved with the current one in the
same run, and the ratio printed. Then the whole preprocessing with 1..N workers, as
threads and as processes, in wall-clock audio-s/s, each against one worker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2v.loadtest.profiles import clip_lengths, load_profile
from e2v.loadtest.synth import speech_like
from e2v.loadtest.workload import RECORDINGS, encode

from e2v.contract import SAMPLE_RATE

LONG_CALL_S = 300.0
ROUNDS = 2  # current and previous path alternate; the best of each is kept
TELEPHONY = ("wav", "pcm_mulaw", 8_000)


@dataclass(frozen=True)
class AudioSet:
    name: str
    files: list[Path]
    seconds: float


def build_sets(directory: Path, utterances: int = 48, long_calls: int = 3) -> list[AudioSet]:
    """Encoded utterances (call-centre profile) and long calls, in the three formats."""
    profile = load_profile("call-centre")
    lengths = clip_lengths(profile, utterances)
    short, long_ = [], []
    for i, samples in enumerate(lengths):
        name, container, codec, rate = RECORDINGS[i % len(RECORDINGS)]
        seconds = samples / SAMPLE_RATE
        wav = speech_like(seconds, rate, seed=100 + i)
        short.append(encode(directory / f"u{i:03d}-{name}", wav, rate, container, codec))
    for i in range(long_calls):
        name, container, codec, rate = RECORDINGS[i % len(RECORDINGS)]
        long_.append(
            encode(directory / f"call{i}-{name}", _call(rate, seed=i), rate, container, codec)
        )
    container, codec, rate = TELEPHONY
    telephony = [
        encode(directory / f"tel{i}-call.wav", _call(rate, seed=50 + i), rate, container, codec)
        for i in range(long_calls)
    ]
    minutes = f"{LONG_CALL_S / 60:g} min"
    return [
        AudioSet("utterances (call-centre profile)", short, float(lengths.sum()) / SAMPLE_RATE),
        AudioSet(f"calls ({minutes}, WAV 8 kHz / MP3 / FLAC)", long_, long_calls * LONG_CALL_S),
        AudioSet(f"telephony calls ({minutes}, mu-law 8 kHz)", telephony, long_calls * LONG_CALL_S),
    ]


def _call(rate: int, seed: int) -> np.ndarray:
    """Turns of speech (2-15 s) between pauses (0.3-4 s) with line noise, LONG_CALL_S long."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < LONG_CALL_S * rate:
        turn = speech_like(float(rng.uniform(2, 15)), rate, seed=int(rng.integers(1 << 30)))
        pause = 0.003 * rng.standard_normal(int(rng.uniform(0.3, 4.0) * rate))
        parts += [turn, pause.astype(np.float32)]
        total += len(turn) + len(pause)
    return np.concatenate(parts)[: int(LONG_CALL_S * rate)]


def decode_only(path: Path) -> int:
    from e2v.client.audio import stream_audio

    return sum(len(chunk) for chunk in stream_audio(path))


def preprocess(path: Path) -> int:
    """What `e2v classify` does before inference: decode, resample, VAD, segment."""
    from e2v.client.audio import stream_audio
    from e2v.client.segment import SegmentMode, segment_stream

    return sum(len(s) for _, s in segment_stream(stream_audio(path), SegmentMode("vad")))


def vad_only(wavs: list[np.ndarray], vad_class=None) -> None:
    from e2v.client.vad import StreamingVad

    for wav in wavs:
        vad = (vad_class or StreamingVad)()
        vad.feed(wav)
        vad.finish()


@contextlib.contextmanager
def previous_path():
    """`e2v classify`'s cutter on the previous VAD (Silero's own model, `SequenceVad`)."""
    import e2v.client.segment as segment
    from e2v.client.vad import SequenceVad

    current = segment.StreamingVad
    segment.StreamingVad = SequenceVad
    try:
        yield
    finally:
        segment.StreamingVad = current


def cpu_rate(seconds: float, work, *args) -> float:
    """Audio seconds per CPU second of `work(*args)` (this thread only)."""
    start = time.thread_time()
    work(*args)
    return seconds / max(time.thread_time() - start, 1e-9)


def stage_rates(audio: AudioSet) -> dict[str, float]:
    """Per-core rates; `*_previous` on the previous VAD path, alternating with the current."""
    from e2v.client.audio import load_audio
    from e2v.client.vad import SequenceVad

    wavs = [load_audio(p) for p in audio.files]

    segmented: dict[str, list[int]] = {}

    def total() -> None:
        segmented["current"] = [preprocess(path) for path in audio.files]

    def total_previous() -> None:
        with previous_path():
            segmented["previous"] = [preprocess(path) for path in audio.files]

    arms = {
        "decode+resample": lambda: [decode_only(p) for p in audio.files],
        "vad": lambda: vad_only(wavs),
        "vad_previous": lambda: vad_only(wavs, SequenceVad),
        "total": total,
        "total_previous": total_previous,
    }
    rates: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, work in arms.items():
            rates[name] = max(rates.get(name, 0.0), cpu_rate(audio.seconds, work))
    rates["vad_vs_previous"] = rates["vad"] / rates["vad_previous"]
    rates["total_vs_previous"] = rates["total"] / rates["total_previous"]
    rates["same_segments"] = float(segmented["current"] == segmented["previous"])
    return rates


def worker_scaling(audio: AudioSet, counts: list[int]) -> list[dict]:
    """Wall-clock audio-s/s of the whole preprocessing with threads and processes."""
    rows = []
    files = audio.files * 2  # enough files for every worker to stay busy
    for kind, pool in (
        ("threads", concurrent.futures.ThreadPoolExecutor),
        ("processes", concurrent.futures.ProcessPoolExecutor),
    ):
        base = None
        for count in counts:
            with pool(count) as executor:
                list(executor.map(preprocess, files[:count]))  # warm up: VAD session, imports
                start = time.perf_counter()
                list(executor.map(preprocess, files))
                rate = 2 * audio.seconds / (time.perf_counter() - start)
            base = base or rate
            rows.append(
                {"kind": kind, "workers": count, "audio_s_per_s": rate, "vs_1": rate / base}
            )
    return rows


def run_bench_client(args) -> int:
    counts = [int(c) for c in str(args.workers).split(",")]
    with tempfile.TemporaryDirectory(prefix="e2v-bench-client-") as tmp:
        sets = build_sets(Path(tmp), args.utterances, args.calls)
        report = {"cores": os.cpu_count(), "sets": []}
        for audio in sets:
            print(f"== {audio.name}: {len(audio.files)} files, {audio.seconds:.0f} s of audio")
            rates = stage_rates(audio)
            print(f"  {'decode+resample':<16} {rates['decode+resample']:8.0f}x real time per core")
            for stage in ("vad", "total"):
                print(
                    f"  {stage:<16} {rates[stage]:8.0f}x real time per core "
                    f"(previous path {rates[stage + '_previous']:.0f}x: "
                    f"{rates[stage + '_vs_previous']:.2f}x faster)"
                )
            same = "yes" if rates["same_segments"] else "NO"
            print(f"  segmented audio equal on both paths: {same}")
            scaling = worker_scaling(audio, counts)
            for row in scaling:
                print(
                    f"  {row['kind']:<9} x{row['workers']}: {row['audio_s_per_s']:8.0f} audio-s/s "
                    f"({row['vs_1']:.2f}x one worker)"
                )
            report["sets"].append(
                {
                    "name": audio.name,
                    "seconds": audio.seconds,
                    "per_core": rates,
                    "scaling": scaling,
                }
            )
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2))
    return 0


def register_bench(bench_subparsers) -> None:
    parser = bench_subparsers.add_parser(
        "client", help="preprocessing speed per stage and per core", description=__doc__
    )
    parser.add_argument("--utterances", type=int, default=48)
    parser.add_argument("--calls", type=int, default=3, help="5-minute calls")
    parser.add_argument(
        "--workers",
        default=",".join(str(n) for n in range(1, (os.cpu_count() or 1) + 1)),
        help="worker counts to compare, e.g. 1,2,4",
    )
    parser.add_argument("--json-file", metavar="FILE", help="also write the figures as JSON")
    parser.set_defaults(func=run_bench_client)
