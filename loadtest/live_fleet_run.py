"""`e2v loadtest --live --replicas N --bus`: N gateway replicas on a local NATS server, the
same load with and without the bus, and the report.

A tritonserver (or the `--url` one), a NATS server with JetStream (`nats_process`) and,
per arm, N `e2v gateway` replicas in front of Triton are started here on free loopback
ports. The arms alternate `--rounds` times in ABBA order (bus, in process, in process, bus,
...), each on fresh replicas for `--duration` seconds of the first `--channels` level, so
that load from elsewhere on a shared machine hits both alike; the report gives each run
and the medians per arm (`loadtest.live_fleet` says what is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from e2v.loadtest.command import command_line, log
from e2v.loadtest.live import LiveLoad, ws_url
from e2v.loadtest.live_fleet import drive_fleet, measure_fleet
from e2v.loadtest.live_run import check_live_options
from e2v.loadtest.machine import load_average, machine_description, software
from e2v.loadtest.report import SYNTHETIC_NOTE
from e2v.loadtest.targets import parse_configs, triton_server

from e2v.serve import ServeError

SESSION_HEADROOM = 8  # --live-sessions above each replica's share of the channels
BUS, LOCAL = "bus", "in process"


def run_fleet(args: argparse.Namespace) -> int:
    """The bus comparison; prints the report's path."""
    from e2v.loadtest.calls import make_calls

    try:
        channels = _check(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ramp_s = min(5.0, args.duration / 4)
    load = LiveLoad(channels, args.duration, args.frame_ms / 1000, ramp_s)
    report_dir = args.report or Path("runs/loadtest") / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}"
    runs: list[dict] = []
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="e2v-loadtest-fleet-") as tmp:
        workdir = Path(tmp)
        log(f"writing {args.calls} stereo mu-law call recordings of {args.call_s:g} s")
        calls = make_calls(workdir / "calls", args.calls, args.call_s)
        try:
            with _servers(args, workdir) as (triton, nats):
                for arm in arms(args.rounds):
                    runs.append(run_arm(args, triton, nats, arm, calls, load))
                    log_run(runs[-1])
                settings = triton.settings
        except (ServeError, RuntimeError, OSError) as exc:  # servers, export: one message
            print(f"error: {exc}", file=sys.stderr)
            return 1
    loads.append(load_average())
    path = write_fleet_report(report_dir, args, settings, calls, load, runs, loads)
    print(f"report: {path}")
    return 0


def run_arm(args, triton, nats, arm: str, calls, load: LiveLoad) -> dict:
    """One run of `arm` on fresh replicas: its figures."""
    log(f"{arm}: {args.replicas} replicas, {load.channels} channels, {load.duration_s:g} s")
    shared = arm == BUS
    with replicas(triton.url, args.replicas, load.channels, arm, nats) as fleet:
        load_before = load_average()
        urls, pids = [ws_url(g.url) for g in fleet], [g.pid for g in fleet]
        bus_pid = nats.process.pid if shared else None
        run = asyncio.run(drive_fleet(urls, calls, load, pids, bus_pid, shared))
    figures = measure_fleet(run, calls, load)
    return figures | {"arm": arm, "load_average": [load_before, load_average()]}


def _check(args: argparse.Namespace) -> int:
    """The channel count; ValueError for arguments that cannot work."""
    if not args.bus:
        raise ValueError("--replicas N compares the bus with the in-process hub: add --bus")
    if not 2 <= args.replicas <= 16:
        raise ValueError("--replicas must be in 2-16")
    if args.live_url:
        raise ValueError("--replicas: the replicas are started here; drop --live-url")
    if not 1 <= args.rounds <= 8:
        raise ValueError("--rounds must be in 1-8")
    levels = [int(v) for v in str(args.channels).split(",") if v.strip()]
    if len(levels) != 1 or not 1 <= levels[0] <= 10_000:
        raise ValueError("--replicas: one --channels level (1-10000)")
    check_live_options(args)
    return levels[0]


def arms(rounds: int) -> list[str]:
    """ABBA: bus, in process | in process, bus | ..."""
    order = []
    for r in range(rounds):
        order += [BUS, LOCAL] if r % 2 == 0 else [LOCAL, BUS]
    return order


@contextmanager
def _servers(args: argparse.Namespace, workdir: Path):
    from e2v.loadtest.nats_process import NatsServer

    config = (parse_configs(args.configs) or [(None, None)])[0]
    with (
        triton_server(args, workdir, "grpc", *config) as triton,
        NatsServer(workdir / "nats") as nats,
    ):
        yield triton, nats


@contextmanager
def replicas(triton: str, count: int, channels: int, arm: str, nats) -> Iterator[list]:
    """`count` gateways in front of `triton`, on the bus (arm BUS) or each alone."""
    from e2v.loadtest.gateway_process import GatewayProcess

    share = -(-channels // count)
    flags = [
        "--live-sessions",
        str(share + SESSION_HEADROOM),
        "--max-connections",
        str(max(1024, 4 * share)),
        "--max-connections-per-client",
        "0",
    ]
    if arm == BUS:
        flags += ["--bus", nats.url]
    with ExitStack() as stack:
        yield [stack.enter_context(GatewayProcess(triton, *flags)) for _ in range(count)]


def log_run(run: dict) -> None:
    bus, s = run["bus"], run["sessions"]
    added = bus["added_latency_ms"]
    log(
        f"  {run['arm']}: calls {s['ok']} ok / {s['failed']} failed; events "
        f"{bus['events_published']} published, {bus['events_delivered']} delivered, "
        f"{bus['events_lost']} lost; added p50/p95 {added.get('p50', '-')}/"
        f"{added.get('p95', '-')} ms; gateways {run['gateway_cores']} cores"
    )


# ----------------------------------------------------------------------------- report


def write_fleet_report(directory, args, settings, calls, load, runs, loads) -> Path:
    """README.md and summary.json."""
    from e2v.loadtest.live_report import workload_summary

    directory.mkdir(parents=True, exist_ok=True)
    synthetic = bool(settings.get("synthetic")) or args.model.startswith("synthetic:")
    summary = {
        "command": command_line(args),
        "model": settings.get("source") or args.model,
        "synthetic": synthetic,
        "machine": machine_description(),
        "software": software(("websockets", "uvicorn", "fastapi", "nats-py", "tritonclient")),
        "load_average": loads,
        "replicas": args.replicas,
        "channels": load.channels,
        "duration_s": load.duration_s,
        "ramp_s": load.ramp_s,
        "workload": workload_summary(calls, args),
        "runs": runs,
        "medians": {arm: medians([r for r in runs if r["arm"] == arm]) for arm in (BUS, LOCAL)},
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    path = directory / "README.md"
    path.write_text("\n".join(_markdown(summary)) + "\n")
    return path


def medians(runs: list[dict]) -> dict:
    """Per arm: the median of each run's figure (the lost events summed)."""

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    cores = [r["gateway_cores"] for r in runs]
    return {
        "runs": len(runs),
        "events_lost": sum(r["bus"]["events_lost"] for r in runs),
        "added_p50_ms": median([r["bus"]["added_latency_ms"].get("p50") for r in runs]),
        "added_p95_ms": median([r["bus"]["added_latency_ms"].get("p95") for r in runs]),
        "gateway_cores": median(cores),
        "millicores_per_channel": median(
            [1000 * c / r["channels"] if c is not None else None for c, r in zip(cores, runs)]
        ),
        "bus_server_cores": median([r.get("bus_server_cores") for r in runs]),
        "interim_p95_ms": median([r["interim_latency_ms"].get("p95") for r in runs]),
        "final_p95_ms": median([r["final_latency_ms"].get("p95") for r in runs]),
    }


def _markdown(summary: dict) -> list[str]:
    bus, local = summary["medians"][BUS], summary["medians"][LOCAL]
    lines = []
    if summary["synthetic"]:
        lines += [SYNTHETIC_NOTE, ""]
    lines += [
        f"# Live calls across {summary['replicas']} gateway replicas: the bus",
        "",
        f"`{summary['command']}`",
        "",
        f"Machine: {summary['machine']}. Load average (1 min) at start and end: "
        f"{summary['load_average'][0]} / {summary['load_average'][1]}.",
        f"Software: {summary['software']}.",
        "",
        f"{summary['channels']} stereo calls at real time, spread over "
        f"{summary['replicas']} replicas (channel i on replica i mod N), each followed by a "
        "subscriber: with the bus on the next replica, without it on the call's own. "
        f"{summary['duration_s']:g} s per run, measured after a {summary['ramp_s']:g} s "
        "ramp; the arms alternate on fresh replicas (ABBA).",
        "",
        "| | with the bus | in process |",
        "| --- | --- | --- |",
        f"| runs | {bus['runs']} | {local['runs']} |",
        f"| events lost (all runs) | {bus['events_lost']} | {local['events_lost']} |",
        f"| added latency p50 / p95 (ms, median of runs) | {bus['added_p50_ms']} / "
        f"{bus['added_p95_ms']} | {local['added_p50_ms']} / {local['added_p95_ms']} |",
        f"| gateway CPU, all replicas (cores) | {bus['gateway_cores']} | "
        f"{local['gateway_cores']} |",
        f"| gateway CPU per channel (millicores) | {bus['millicores_per_channel']} | "
        f"{local['millicores_per_channel']} |",
        f"| NATS server CPU (cores) | {bus['bus_server_cores']} | - |",
        f"| interim / final latency p95 (ms) | {bus['interim_p95_ms']} / "
        f"{bus['final_p95_ms']} | {local['interim_p95_ms']} / {local['final_p95_ms']} |",
        "",
        "Added latency: an event's arrival at its subscriber minus its arrival at its caller "
        "(one clock, loopback). With the bus that is publish on one replica -> JetStream -> "
        "receipt on another; in process, the hub's own fan-out to a second socket. Gateway "
        "CPU is every replica's, summed; most of it is the calls' audio (VAD, windows), the "
        "same in both arms when both keep up (compare the interims and their latency).",
        "",
        "## Runs",
        "",
        "| arm | calls ok / failed | published | delivered | lost | added p50 / p95 ms "
        "| interims (coalesced) | interim / final p95 ms | gateway cores | NATS cores "
        "| load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in summary["runs"]:
        b, s, added = run["bus"], run["sessions"], run["bus"]["added_latency_ms"]
        lines.append(
            f"| {run['arm']} | {s['ok']} / {s['failed']} | {b['events_published']} | "
            f"{b['events_delivered']} | {b['events_lost']} | {added.get('p50', '-')} / "
            f"{added.get('p95', '-')} | {run['results']} ({run['coalesced']}) | "
            f"{run['interim_latency_ms'].get('p95', '-')} / "
            f"{run['final_latency_ms'].get('p95', '-')} | {run['gateway_cores']} | "
            f"{run.get('bus_server_cores') or '-'} | {run['load_average'][0]} -> "
            f"{run['load_average'][1]} |"
        )
    return lines
