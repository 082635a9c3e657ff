"""`e2v loadtest --live`: the servers, the sweep over channel counts and the report.

Without `--live-url`, a tritonserver (or the `--url` one) and an `e2v gateway` in front of
it are started here on free loopback ports, so the gateway's process id is known and its
CPU time can be read. Each `--channels` level runs for `--duration` seconds on the same
servers, one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from e2v.loadtest import triton_stats
from e2v.loadtest.command import command_line, log
from e2v.loadtest.cpu_profile import py_spy
from e2v.loadtest.live import LOAD_CALLS, LiveLoad, drive, measure, ws_url
from e2v.loadtest.machine import load_average
from e2v.loadtest.metrics import P95_TARGET_MS
from e2v.loadtest.targets import parse_configs, triton_server

from e2v.contract import LIVE_HOP_S
from e2v.serve import ServeError

PROTOCOLS = tuple(LOAD_CALLS)
SESSION_HEADROOM = 8  # --live-sessions above the channels: the limit is not what is measured
SUSTAIN_FINAL_S = 3.0  # "kept up": finals within this of being due (p95)...
SUSTAIN_INTERIM_SHARE = 0.5  # ...and at least this share of the interim windows answered


def check_live_options(args: argparse.Namespace) -> None:
    """The checks every `--live` scenario shares (ValueError says what is wrong)."""
    if args.duration <= 5 or not 20 <= args.frame_ms <= 1000:
        raise ValueError("--duration must be > 5 s and --frame-ms in 20-1000")
    if not 1 <= args.calls <= 64 or not 5 <= args.call_s <= 3600:
        raise ValueError("--calls must be in 1-64 and --call-s in 5-3600")
    if args.gateway or args.compare or args.ramp:
        raise ValueError("--live: drop --gateway, --compare and --ramp")
    parse_configs(args.configs)


@contextmanager
def live_stack(args: argparse.Namespace, workdir: Path, channels: int) -> Iterator[dict]:
    """The gateway to load: {url, pid, stats_url, settings}."""
    if args.live_url:
        yield {"url": ws_url(args.live_url), "pid": args.gateway_pid, "stats_url": args.stats_url}
        return
    from e2v.loadtest.gateway_process import GatewayProcess

    config = (parse_configs(args.configs) or [(None, None)])[0]  # the first setting only
    with triton_server(args, workdir, "grpc", *config) as target:
        # One client address holds every channel: no per-address cap, room for them all.
        extra = (
            "--live-sessions",
            str(channels + SESSION_HEADROOM),
            "--max-connections",
            str(max(1024, 2 * channels)),
            "--max-connections-per-client",
            "0",
        )
        with GatewayProcess(target.url, *extra).start(ready=True) as gateway:
            yield {
                "url": ws_url(gateway.url),
                "pid": gateway.pid,
                "stats_url": target.stats_url,
                "settings": target.settings,
            }


def run_level(stack: dict, calls: list, load: LiveLoad, profile: Path | None = None) -> dict:
    """One level: the load, Triton's counters around it, the load average before and after
    (with `profile`, py-spy's stacks of the gateway over the measured window go there)."""
    stats_url = stack.get("stats_url")
    load_before = load_average()
    before = triton_stats.snapshot(stats_url) if stats_url else None
    started = time.monotonic()
    run = asyncio.run(drive(stack["url"], calls, load, stack.get("pid"), profile))
    wall_s = time.monotonic() - started
    figures = measure(run, calls, load)
    if stats_url:
        time.sleep(0.5)  # Triton counts a request just after answering it
        figures["triton"] = (triton_stats.snapshot(stats_url) - before).as_dict()
        served = figures["triton"]["success"] / wall_s
        demand = figures["finals"]["requests_per_call_s"]
        # When Triton is the limit (queue growing), what it served over what a call needs
        # is the model tier's ceiling in calls.
        figures["triton_requests_per_s"] = round(served, 2)
        figures["model_ceiling_calls"] = round(served / demand, 2) if demand else None
    figures["load_average"] = [load_before, load_average()]
    figures["duration_s"], figures["ramp_s"] = load.duration_s, load.ramp_s
    figures["within_target"] = within_target(figures)
    figures["sustained"] = sustained(figures)
    return figures


def within_target(level: dict) -> bool:
    """p95 of interim and final latency <= the target, every final there, no failed call."""
    interim, final = level["interim_latency_ms"], level["final_latency_ms"]
    return bool(
        interim.get("count")
        and interim["p95"] <= P95_TARGET_MS
        and final.get("count")
        and final["p95"] <= P95_TARGET_MS
        and level["finals"]["lost"] == 0
        and level["sessions"]["failed"] == 0
    )


def sustained(level: dict) -> bool:
    """Real time kept up, whatever the latency target: every final delivered within
    SUSTAIN_FINAL_S of being due, no failed call, most interim windows answered."""
    final, rate = level["final_latency_ms"], level["finals"]["interims_per_speech_s"]
    return bool(
        level["finals"]["lost"] == 0
        and level["sessions"]["failed"] == 0
        and final.get("count")
        and final["p95"] <= 1000 * SUSTAIN_FINAL_S
        and rate is not None
        and rate >= SUSTAIN_INTERIM_SHARE / LIVE_HOP_S
    )


def parse_protocols(text: str) -> list[str]:
    protocols = [p.strip() for p in str(text).split(",") if p.strip()]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if not protocols or unknown or len(set(protocols)) != len(protocols):
        raise ValueError(f"--protocols: a comma list of {', '.join(PROTOCOLS)}, each once")
    return protocols


def parse_channels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--channels wants N or N1,N2,..., got '{text}'") from None
    if not levels or min(levels) < 1 or max(levels) > 10_000:
        raise ValueError("--channels must be between 1 and 10000")
    return levels


def run_live(args: argparse.Namespace) -> int:
    """The --live sweep; prints the report's path."""
    from e2v.loadtest.calls import make_calls
    from e2v.loadtest.live_report import write_live_report

    try:
        levels = parse_channels(args.channels)
        protocols = parse_protocols(args.protocols)
        if args.cpu_profile and not (py_spy() and (args.gateway_pid or not args.live_url)):
            raise ValueError("--cpu-profile needs py-spy (loadtest extra) and the gateway pid")
        check_live_options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ramp_s = min(5.0, args.duration / 4)
    report_dir = args.report or Path("runs/loadtest") / f"live-{time.strftime('%Y%m%d-%H%M%S')}"
    levels_out: list[dict] = []
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="e2v-loadtest-live-") as tmp:
        workdir = Path(tmp)
        log(f"writing {args.calls} stereo mu-law call recordings of {args.call_s:g} s")
        calls = make_calls(workdir / "calls", args.calls, args.call_s)
        try:
            with live_stack(args, workdir, max(levels)) as stack:
                for channels, protocol in itertools.product(levels, protocols):
                    load = LiveLoad(
                        channels, args.duration, args.frame_ms / 1000, ramp_s, protocol=protocol
                    )
                    log(f"{channels} channels of {protocol} for {args.duration:g} s")
                    profile = None
                    if args.cpu_profile:
                        report_dir.mkdir(parents=True, exist_ok=True)
                        profile = report_dir / f"cpu-profile-{protocol}-{channels}ch.txt"
                    levels_out.append(run_level(stack, calls, load, profile))
                    log_level(levels_out[-1])
                settings = stack.get("settings", {})
        except (ServeError, RuntimeError, OSError) as exc:  # servers, export: one message
            print(f"error: {exc}", file=sys.stderr)
            return 1
        loads = (load_start, load_average())
        path = write_live_report(
            report_dir, command_line(args), args.model, settings, calls, levels_out, args, loads
        )
    print(f"report: {path}")
    return 0


def log_level(level: dict) -> None:
    i, f, s = level["interim_latency_ms"], level["final_latency_ms"], level["sessions"]
    log(
        f"  calls {s['ok']} ok / {s['failed']} failed; interim p50/p95 "
        f"{i.get('p50', '-')}/{i.get('p95', '-')} ms ({i['count']}); final p95 "
        f"{f.get('p95', '-')} ms; coalesced {level['coalesced']}; finals "
        f"{level['finals']['arrived']}/{level['finals']['expected']} "
        f"(lost {level['finals']['lost']}); gateway {level['gateway_cores']} cores"
    )
    stages = level.get("cpu_profile", {}).get("stages", {})
    if stages:
        log(
            "  ms per channel-second: "
            + ", ".join(f"{name} {v['ms_per_channel_s']}" for name, v in stages.items())
        )
