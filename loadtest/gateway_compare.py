"""`e2v classify` straight to Triton against the same work through `e2v gateway`.

Both arms run the same closed loop over the same encoded files, with the same number of
files in flight: workers take the next file from one shared list until every file is
done, and the wall time of the whole list gives audio seconds per second.

- direct: `client.classify.classify_files`, what `e2v classify --concurrency 2N` runs
  (N files decoding in threads, up to 2N Triton requests in flight), in this process.
- gateway: N uploads at a time (multipart, as `curl -F file=@...` sends them) to a gateway
  started with `--concurrency N` (N requests decoding, up to 2N Triton requests).

The file list is cut into `rounds` consecutive chunks; both arms run each chunk, in
the order direct-gateway, gateway-direct, direct-gateway, ... (ABBA), so that drift on
a shared machine hits both arms alike. Each arm's preprocessing CPU is measured too: this
process's for the direct arm, the gateway process's (`process_cpu_seconds_total` from its
/metrics) for the other.
`preprocessing_per_core` times `load_audio` and `segment_audio` alone, on one thread.
"""

from __future__ import annotations

import asyncio
import resource
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from e2v.contract import GATEWAY_METRICS_PATH, GATEWAY_PREDICT_PATH, SAMPLE_RATE


@dataclass(frozen=True)
class ArmRun:
    arm: str  # "direct" | "gateway"
    round: int
    files: int
    in_flight: int
    audio_s: float
    wall_s: float
    cpu_s: float  # CPU seconds of the process that decoded and segmented
    errors: int

    @property
    def audio_s_per_s(self) -> float:
        return self.audio_s / self.wall_s

    @property
    def audio_s_per_cpu_s(self) -> float:
        return self.audio_s / self.cpu_s if self.cpu_s > 0 else float("nan")

    def as_dict(self) -> dict:
        data = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return data | {
            "audio_s_per_s": round(self.audio_s_per_s, 3),
            "audio_s_per_cpu_s": round(self.audio_s_per_cpu_s, 2),
        }


def compare(
    triton_url: str, gateway_url: str, files: list[Path], users: int, rounds: int
) -> list[ArmRun]:
    """Both arms over `files` in `rounds` chunks, ABBA; `gateway_url` is http://HOST:PORT."""
    in_flight = max(2, users)  # classify_files decodes max(2, concurrency // 2) files at once
    rounds = chunks(len(files), users, rounds)
    bounds = [round(i * len(files) / rounds) for i in range(rounds + 1)]
    runs = []
    for number in range(1, rounds + 1):
        chunk = files[bounds[number - 1] : bounds[number]]
        for arm in ("direct", "gateway") if number % 2 else ("gateway", "direct"):
            if arm == "direct":
                runs.append(asyncio.run(_direct(triton_url, chunk, in_flight, number)))
            else:
                runs.append(asyncio.run(_through_gateway(gateway_url, chunk, in_flight, number)))
    return runs


def chunks(files: int, users: int, rounds: int) -> int:
    """Rounds actually run: each chunk holds at least 4x the files in flight."""
    return max(1, min(rounds, files // (4 * max(2, users))))


def totals(runs: list[ArmRun]) -> dict:
    """Per arm over all rounds: audio s/s (all audio / all wall time), audio s per CPU s,
    and the ratio gateway / direct."""
    out = {}
    for arm in ("direct", "gateway"):
        mine = [r for r in runs if r.arm == arm]
        audio = sum(r.audio_s for r in mine)
        out[arm] = {
            "audio_s": round(audio, 2),
            "wall_s": round(sum(r.wall_s for r in mine), 2),
            "audio_s_per_s": round(audio / sum(r.wall_s for r in mine), 3),
            "audio_s_per_cpu_s": round(audio / sum(r.cpu_s for r in mine), 2),
            "errors": sum(r.errors for r in mine),
        }
    out["ratio"] = round(out["gateway"]["audio_s_per_s"] / out["direct"]["audio_s_per_s"], 3)
    return out


async def _direct(triton_url: str, files: list[Path], in_flight: int, number: int) -> ArmRun:
    from e2v.client.classify import JobOptions, classify_files
    from e2v.client.triton import TritonEmotionClient

    done = {"audio": 0.0, "errors": 0}

    def on_result(result) -> None:
        done["audio"] += result.duration_s or 0.0
        done["errors"] += not result.ok

    async with TritonEmotionClient(triton_url, "grpc") as client:
        options = JobOptions(url=triton_url, concurrency=2 * in_flight)
        cpu, start = _cpu_s(), time.perf_counter()
        await classify_files([str(p) for p in files], client, options, on_result)
        wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
    return ArmRun("direct", number, len(files), in_flight, done["audio"], wall, cpu, done["errors"])


async def _through_gateway(url: str, files: list[Path], in_flight: int, number: int) -> ArmRun:
    import aiohttp
    from e2v.loadtest.workload import multipart_upload

    uploads = iter([multipart_upload(p) for p in files])  # built before the clock starts
    done = {"audio": 0.0, "errors": 0}

    async def worker(session) -> None:
        for content_type, body in uploads:  # one shared iterator: each file goes once
            headers = {"Content-Type": content_type}
            async with session.post(url + GATEWAY_PREDICT_PATH, data=body, headers=headers) as r:
                data = await r.json()
            if r.status == 200:
                done["audio"] += data["duration_s"]
            else:
                done["errors"] += 1

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        cpu, start = gateway_cpu_s(url), time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))
        wall, cpu = time.perf_counter() - start, gateway_cpu_s(url) - cpu
    audio, errors = done["audio"], done["errors"]
    return ArmRun("gateway", number, len(files), in_flight, audio, wall, cpu, errors)


def gateway_cpu_s(url: str) -> float:
    """The gateway process's CPU seconds so far, from its Prometheus endpoint."""
    with urllib.request.urlopen(url + GATEWAY_METRICS_PATH, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("process_cpu_seconds_total "):
                return float(line.split()[1])
    raise RuntimeError(f"no process_cpu_seconds_total at {url}{GATEWAY_METRICS_PATH}")


def preprocessing_per_core(files: list[Path], budget_s: float = 10.0) -> dict:
    """Audio seconds per CPU second of decoding (`load_audio`) and VAD (`segment_audio`),
    one file at a time on one thread, over `files` (repeated until `budget_s` of CPU)."""
    from e2v.client.audio import load_audio
    from e2v.client.segment import SegmentMode, segment_audio

    audio = decode = vad = 0.0
    while decode + vad < budget_s:
        for path in files:
            start = time.process_time()
            wav = load_audio(path)
            middle = time.process_time()
            segment_audio(wav, SegmentMode("vad"))
            decode += middle - start
            vad += time.process_time() - middle
            audio += len(wav) / SAMPLE_RATE
    return {
        "audio_s": round(audio, 1),
        "decode_audio_s_per_cpu_s": round(audio / decode, 1),
        "vad_audio_s_per_cpu_s": round(audio / vad, 1),
        "audio_s_per_cpu_s": round(audio / (decode + vad), 1),
    }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
