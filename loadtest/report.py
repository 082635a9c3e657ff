"""The report folder: markdown summary, JSON, plots, next to each run's Locust CSVs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from e2v.loadtest import plots
from e2v.loadtest.bench import RunResult
from e2v.loadtest.machine import machine_description, software
from e2v.loadtest.metrics import cost_per_1000_audio_hours
from e2v.loadtest.profiles import Profile
from e2v.loadtest.workload import Workload, bucket_name, bucket_order

from e2v.contract import SAMPLE_RATE

# A baseline server slower than this fraction of FunASR in-process is flagged in the report.
FAIR_BASELINE = 0.8
SYNTHETIC_NOTE = (
    "> **SYNTHETIC MODEL**: seeded random weights in the published architecture. Speed is\n"
    "> representative of the real model of that size; its emotion labels are meaningless."
)


@dataclass
class Report:
    command: str
    profile: Profile
    workload: Workload
    model: str  # the source or the served model's description
    synthetic: bool
    runs: list[RunResult]  # the sweep: one run per server configuration
    served: RunResult | None = None  # fixed-concurrency run compared with the others
    baseline: RunResult | None = None
    baseline_in_process: dict | None = None  # FunASR alone in this process, same threads
    memory: dict | None = None  # the served model's stubs around a maximum-size batch
    ort: list[dict] = field(default_factory=list)
    price_per_hour: float | None = None
    gateway: list[dict] = field(default_factory=list)  # direct classify vs gateway, per config
    preprocessing: dict | None = None  # load_audio + segment_audio alone, per CPU second

    @property
    def all_runs(self) -> list[RunResult]:
        extra = [r for r in (self.served, self.baseline) if r and r not in self.runs]
        return self.runs + extra


def write_report(report: Report, directory: Path) -> Path:
    """README.md, summary.json and PNGs in `directory`; returns the markdown path."""
    directory.mkdir(parents=True, exist_ok=True)
    figures = _figures(report, directory)
    lines = [
        *_header(report),
        *_workload(report),
        *_results(report),
        *_ramps(report),
        *_comparison(report),
        *_memory(report),
        *_gateway(report),
        *_server_breakdown(report),
        *_cpu(report),
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        "Each run's folder holds Locust's CSVs (`locust_stats.csv`, "
        "`locust_stats_history.csv`, failures), `requests.csv` (one row per request with "
        "its audio seconds) and `summary.json` (with Triton's statistics). "
        "See `loadtest/README.md` for what each number means.",
        "",
    ]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    (directory / "summary.json").write_text(json.dumps(_summary_json(report), indent=2))
    return path


def _figures(report: Report, directory: Path) -> list[str]:
    names = []
    ramps = [r for r in report.runs if r.steps]
    if ramps:
        names.append(plots.ramp_plot(ramps, directory / "throughput_latency_vs_users.png").name)
    if any(r.server and r.server.executions_by_batch for r in report.all_runs):
        names.append(plots.batch_histogram(report.all_runs, directory / "batch_sizes.png").name)
    rows = _comparison_rows(report)
    if len(rows) > 1:
        names.append(plots.comparison_plot(rows, directory / "comparison.png").name)
    return names


def _header(report: Report) -> list[str]:
    title = f"# Load test: `{report.profile.name}` profile, {report.model}"
    if report.synthetic:  # said on the first line: whoever reads one line must not miss it
        title += " (SYNTHETIC model: random weights)"
    lines = [title, ""]
    if report.synthetic:
        lines += [SYNTHETIC_NOTE, ""]
    fairness = comparison_ratios(report).get("baseline_server_vs_in_process_audio_s_per_s")
    if fairness is not None and fairness < FAIR_BASELINE:
        lines += [
            f"> **UNFAIR BASELINE**: the FunASR server reached only {fairness:.2f}x of FunASR's "
            f"own in-process speed with the same threads (< {FAIR_BASELINE:g}x): the "
            "served-vs-baseline ratios below overstate the gain.",
            "",
        ]
    return lines + [
        f"- command: `{report.command}`",
        f"- machine: {machine_description()}",
        f"- software: {software_versions(report.runs)}",
        "",
    ]


def _workload(report: Report) -> list[str]:
    seconds = report.workload.lengths / SAMPLE_RATE
    counts = {name: 0 for name in bucket_order()}
    for n in report.workload.lengths:
        counts[bucket_name(int(n))] += 1
    mix = ", ".join(f"{k}: {v}" for k, v in counts.items() if v)
    return [
        "## Workload",
        "",
        f"{report.profile.description}",
        "",
        f"- {len(report.workload)} distinct clips cut from encoded recordings "
        f"(mu-law WAV 8 kHz, MP3, FLAC) decoded by `e2v.client.audio.load_audio`; users send them "
        "round robin, padded to their length bucket (baseline: unpadded)",
        f"- clip length: mean {seconds.mean():.2f} s, median {np.median(seconds):.2f} s, "
        f"min {seconds.min():.2f} s, max {seconds.max():.2f} s",
        f"- clips per bucket: {mix}",
        *(
            [
                "- gateway users upload each clip as a file encoded like its recording "
                "(mu-law WAV 8 kHz, MP3, FLAC); the gateway decodes and segments it"
            ]
            if report.gateway
            else []
        ),
        "",
    ]


RESULT_HEADER = (
    "| run | settings | users | req/s | audio s/s | p50 ms | p95 ms | p99 ms | max ms "
    "| failed | avg batch | {cost}load avg |"
)


def _results(report: Report) -> list[str]:
    cost = "USD / 1000 audio h | " if report.price_per_hour else ""
    lines = ["## Results", "", RESULT_HEADER.format(cost=cost), "|" + " --- |" * (12 + bool(cost))]
    for run in report.all_runs:
        s = run.summary
        batch = f"{run.server.avg_batch_size:.2f}" if run.server else "-"
        price = ""
        if report.price_per_hour:
            price = f"{cost_per_1000_audio_hours(report.price_per_hour, s.audio_s_per_s):.2f} | "
        lines.append(
            f"| {run.target.label}{' (ramp, saturation)' if run.steps else ''} "
            f"| {settings_text(run)} | {s.users} | {s.requests_per_s:.2f} "
            f"| {s.audio_s_per_s:.2f} | {s.p50_ms:.0f} | {s.p95_ms:.0f} | {s.p99_ms:.0f} "
            f"| {s.max_ms:.0f} | {s.failures} | {batch} | {price}"
            f"{run.load_average[0]:.1f} -> {run.load_average[1]:.1f} |"
        )
    note = [
        "",
        "audio s/s: seconds of audio answered per wall-clock second (real-time factor); "
        "latency is end to end at the client; load avg: 1-minute load average before -> "
        "after the run (this machine's cores are shared).",
    ]
    if report.price_per_hour:
        note.append(
            f"Cost at USD {report.price_per_hour:g}/h = price / (audio s/s) x 1000, "
            "i.e. one machine running at that throughput around the clock."
        )
    return lines + note + [""]


def _ramps(report: Report) -> list[str]:
    lines = []
    for run in (r for r in report.runs if r.steps):
        lines += [
            f"## Ramp: {run.target.label} ({settings_text(run)})",
            "",
            f"Step ramp, {run.load.ramp.step_s:g} s per level (first quarter of each level "
            f"skipped). Saturation (first level within 5% of the best throughput): "
            f"**{run.summary.audio_s_per_s:.2f} audio s/s at {run.summary.users} "
            f"user{'s' if run.summary.users > 1 else ''}**.",
            "",
            "| users | req/s | audio s/s | p50 ms | p95 ms | p99 ms | failed |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {s.users} | {s.requests_per_s:.2f} | {s.audio_s_per_s:.2f} | {s.p50_ms:.0f} "
            f"| {s.p95_ms:.0f} | {s.p99_ms:.0f} | {s.failures} |"
            for s in run.steps
        ]
        lines.append("")
    return lines


def _comparison_rows(report: Report) -> list[tuple[str, float, float | None, float | None]]:
    rows = []
    for run in (report.served, report.baseline):
        if run:
            rows.append(
                (
                    run.target.label,
                    run.summary.audio_s_per_s,
                    run.summary.p50_ms,
                    run.summary.p95_ms,
                )
            )
    rows += [(ort_label(o), o["audio_s_per_s"], None, None) for o in report.ort]
    return rows


def comparison_ratios(report: Report) -> dict[str, float]:
    """served / baseline and served / ORT-alone ratios (what the targets are about)."""
    ratios: dict[str, float] = {}
    served = report.served.summary if report.served else None
    if served and report.baseline:
        base = report.baseline.summary
        ratios["served_vs_baseline_audio_s_per_s"] = served.audio_s_per_s / base.audio_s_per_s
        ratios["served_vs_baseline_p50"] = served.p50_ms / base.p50_ms
        ratios["served_vs_baseline_p95"] = served.p95_ms / base.p95_ms
    if report.baseline and report.baseline_in_process:
        ratios["baseline_server_vs_in_process_audio_s_per_s"] = (
            report.baseline.summary.audio_s_per_s / report.baseline_in_process["audio_s_per_s"]
        )
    if served and report.ort:
        best = max(o["audio_s_per_s"] for o in report.ort)
        ratios["served_vs_ort_alone_audio_s_per_s"] = served.audio_s_per_s / best
    return ratios


def _comparison(report: Report) -> list[str]:
    ratios = comparison_ratios(report)
    if not ratios:
        return []
    lines = [
        "## Served vs baseline vs ONNX Runtime alone",
        "",
        f"Equal concurrency: {report.served.summary.users} users, same clips, same driver.",
        "",
        "| comparison | ratio | meaning |",
        "| --- | --- | --- |",
    ]
    meaning = {
        "served_vs_baseline_audio_s_per_s": "throughput, Triton / FunASR server (> 1: Triton "
        "serves more audio)",
        "served_vs_baseline_p50": "median latency, Triton / FunASR (< 1: Triton answers faster)",
        "served_vs_baseline_p95": "p95 latency, Triton / FunASR",
        "served_vs_ort_alone_audio_s_per_s": "throughput, Triton / best ONNX Runtime alone in "
        "the same instances x threads layout (serving overhead; 1 = none)",
        "baseline_server_vs_in_process_audio_s_per_s": "throughput, FunASR server / FunASR in "
        f"this process with the same torch threads (a fair baseline is >= {FAIR_BASELINE:g})",
    }
    lines += [f"| {k} | {v:.2f}x | {meaning[k]} |" for k, v in ratios.items()]
    if report.ort:
        lines += [
            "",
            "| ONNX Runtime alone | sessions x threads | batch | clips | audio s/s |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| in-process | {o['sessions']} x {o['threads']} | {o['batch_size']} "
            f"| {o['clips']} | {o['audio_s_per_s']:.2f} |"
            for o in report.ort
        ]
    return lines + [""]


def _memory(report: Report) -> list[str]:
    m = report.memory
    if not m:
        return []
    verdict = "back at its steady level" if m["returned"] else "NOT back at its steady level"
    return [
        "## Memory around a maximum-size batch",
        "",
        f"Resident anonymous memory of the served model's Python-backend stubs, after the "
        f"fixed-concurrency run ({m['requests']}; peak sampled every 5 ms, a lower bound):",
        "",
        "| steady | peak | after | |",
        "| --- | --- | --- | --- |",
        f"| {m['steady_mib']} MiB | {m['peak_mib']} MiB | {m['after_mib']} MiB | {verdict} |",
        "",
    ]


def _gateway(report: Report) -> list[str]:
    if not report.gateway:
        return []
    lines = [
        "## Through the gateway vs `e2v classify` straight to Triton",
        "",
        "Same encoded files, same number of files in flight, same Triton, measured in one run: "
        "`e2v classify`'s pipeline (`classify_files`) against multipart uploads to "
        "`e2v gateway` (`loadtest/gateway_compare.py`). Each round is one chunk of the files, "
        "run by both arms in ABBA order (so load from elsewhere hits both alike).",
        "",
        "| run | arm | round | files in flight | files | audio s | wall s | audio s/s "
        "| audio s per CPU s (preprocessing process) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in report.gateway:
        lines += [
            f"| {result['label']} | {r['arm']} | {r['round']} | {r['in_flight']} | {r['files']} "
            f"| {r['audio_s']:.1f} | {r['wall_s']:.1f} | {r['audio_s_per_s']:.2f} "
            f"| {r['audio_s_per_cpu_s']:.1f} | {r['errors']} |"
            for r in result["runs"]
        ]
    lines += ["", "| run | direct audio s/s | gateway audio s/s | gateway / direct | target |"]
    lines += ["| --- | --- | --- | --- | --- |"]
    for result in report.gateway:
        t = result["totals"]
        lines.append(
            f"| {result['label']} | {t['direct']['audio_s_per_s']:.2f} "
            f"| {t['gateway']['audio_s_per_s']:.2f} | **{t['ratio']:.2f}x** | >= 0.9x |"
        )
    lines.append("")
    if report.preprocessing:
        p = report.preprocessing
        lines += [
            "Preprocessing alone, one thread (`load_audio` + `segment_audio` with VAD, the "
            f"same files): **{p['audio_s_per_cpu_s']:.0f} audio s per CPU second** "
            f"(decoding {p['decode_audio_s_per_cpu_s']:.0f}, "
            f"VAD {p['vad_audio_s_per_cpu_s']:.0f}). "
            "The gateway column above adds HTTP, multipart, JSON and the gRPC client: that is "
            "the number to size gateway cores by (cores = audio s/s to serve / audio s per "
            "CPU s).",
            "",
        ]
    return lines


def _cpu(report: Report) -> list[str]:
    """CPU seconds by process per run: what serving costs beyond ONNX Runtime's run."""
    runs = [r for r in report.all_runs if r.cpu and "stubs" in r.cpu]
    if not runs:
        return []
    lines = [
        "## CPU by process (seconds over the whole run, drain included)",
        "",
        "| run | wall s | driver (load generator) | tritonserver | model stubs "
        "| Triton compute_infer | stubs beyond compute_infer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        c, wall = run.cpu, run.overall.window_s
        extra = c["stubs"] - c.get("triton_compute_infer", 0.0)
        lines.append(
            f"| {run.target.label} | {wall:.0f} | {c['driver']:.1f} "
            f"({c['driver'] / wall:.0%} of a core) | {c['tritonserver']:.1f} | {c['stubs']:.1f} "
            f"| {c.get('triton_compute_infer', 0.0):.1f} | {extra:.1f} |"
        )
    lines += [
        "",
        "The driver shares this machine's cores with the server: its CPU is taken from the "
        "served arm (ONNX Runtime alone runs without it). compute_infer is wall time inside "
        "the model's execute, summed over executions: with parallel instances it can exceed "
        "one core's CPU seconds.",
        "",
    ]
    return lines


def _server_breakdown(report: Report) -> list[str]:
    served = [r for r in report.all_runs if r.server and r.server.success]
    if not served:
        return []
    lines = [
        "## Where a request's time goes (Triton statistics, per request)",
        "",
        "| run | client latency mean ms | queue ms | compute (input/infer/output) ms "
        "| rest (network, (de)serialisation, client) ms | Triton successes | client requests |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in served:
        s, ms = run.server, run.server.avg_ms
        compute = ms("compute_input") + ms("compute_infer") + ms("compute_output")
        rest = run.overall.mean_ms - ms("queue") - compute
        lines.append(
            f"| {run.target.label}{' (ramp)' if run.steps else ''} | {run.overall.mean_ms:.0f} "
            f"| {ms('queue'):.0f} "
            f"| {compute:.0f} ({ms('compute_input'):.1f}/{ms('compute_infer'):.0f}/"
            f"{ms('compute_output'):.1f}) | {rest:.0f} | {s.success} "
            f"| {run.locust['num_requests']} |"
        )
    return lines + [
        "",
        "All requests of the run (every ramp level, and the drain after the load window) "
        "on both sides. compute_infer is the execution time of the batch a request was in.",
        "",
    ]


def ort_label(result: dict) -> str:
    return f"ORT alone {result['sessions']}x{result['threads']}, batch {result['batch_size']}"


def settings_text(run: RunResult) -> str:
    s = run.target.settings
    if "instances" in s:
        threads = s.get("intra_op_threads") or "all"
        return (
            f"{s['instances']} inst x {threads} thr, max batch {s['max_batch_size']}, "
            f"delay {s['max_queue_delay_us'] / 1000:g} ms"
        )
    if "torch_threads" in s:
        running = s.get("torch_threads_running")
        checked = f" (server reports {running})" if running is not None else ""
        return f"FunASR, {s['torch_threads']} torch threads{checked}"
    return "-"


def software_versions(runs: list[RunResult]) -> str:
    names = ("nvidia-pytriton", "onnxruntime", "torch", "funasr", "locust", "tritonclient")
    servers = sorted({r.target.settings.get("triton_version", "") for r in runs} - {""})
    return software(names, servers)


def _summary_json(report: Report) -> dict:
    return {
        "command": report.command,
        "profile": report.profile.name,
        "model": report.model,
        "synthetic": report.synthetic,
        "machine": machine_description(),
        "software": software_versions(report.runs),
        "runs": [r.as_dict() for r in report.runs],
        "served": report.served.target.label if report.served else None,
        "baseline": report.baseline.as_dict() if report.baseline else None,
        "baseline_in_process": report.baseline_in_process,
        "memory": report.memory,
        "ort_alone": report.ort,
        "ratios": {k: round(v, 3) for k, v in comparison_ratios(report).items()},
        "price_per_hour": report.price_per_hour,
        "gateway": report.gateway,
        "preprocessing": report.preprocessing,
    }
