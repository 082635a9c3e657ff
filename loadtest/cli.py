"""`e2v loadtest`: bounded load tests of Triton, the gateway and live calls, with a report folder.

Scenarios: the default one (`loadtest.plan`: Locust against Triton or, with `--gateway`,
the gateway; `--compare` adds the FunASR baseline and ONNX Runtime alone), `--live`
(`loadtest.live_run`: concurrent calls through `/v1/live`), `--live --replicas N --bus`
(`loadtest.live_fleet_run`: gateway replicas sharing calls through NATS) and
`--replicas-triton N` (`loadtest.triton_fleet_run`: one client over N Triton replicas
against one). A scenario is a module with a `run_*(args) -> int` that writes its report and
prints its path (loadtest/README.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from e2v.client.arguments import add_protocol_argument, add_url_argument

DEFAULT_MODEL = "synthetic:base"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "loadtest",
        help="load-test Triton (and the FunASR baseline) with Locust; writes a report",
        description=__doc__.splitlines()[0],
    )
    target = parser.add_argument_group("target")
    add_url_argument(target, omitted="export --model and start a local tritonserver")
    add_protocol_argument(target)
    target.add_argument(
        "--stats-url",
        help="Triton HTTP HOST:PORT for statistics (default: "
        "--url for http, the port below --url for grpc, as 8000/8001)",
    )
    target.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model source to serve and compare with (default {DEFAULT_MODEL})",
    )
    target.add_argument("--repo", type=Path, help="serve this exported repository instead")
    target.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="export target; gpu repositories need NVIDIA's tritonserver "
        "container: serve them there and pass --url",
    )
    target.add_argument(
        "--configs",
        help="local server settings to sweep, INSTANCESxTHREADS "
        "comma separated, e.g. 1x2,2x1 (default: the repository's config)",
    )
    target.add_argument(
        "--gateway",
        action="store_true",
        help="load `e2v gateway` (started here in front of the Triton server) with file "
        "uploads, and compare it with `e2v classify` straight to Triton at --users files "
        "in flight on the same files",
    )
    target.add_argument(
        "--gateway-rounds",
        type=int,
        default=2,
        help="chunks of the comparison's file list, each run by both arms in ABBA order "
        "(default 2)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--profile",
        default="call-centre",
        help="workload profile name or JSON file (call-centre, fixed-3s, long)",
    )
    load.add_argument("--users", type=int, default=4, help="concurrent users (default 4)")
    load.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    load.add_argument("--ramp", help="step ramp START,STEP,MAX users instead of fixed users")
    load.add_argument(
        "--step-duration", type=float, default=20.0, help="seconds per ramp level (default 20)"
    )
    compare = parser.add_argument_group("comparison")
    compare.add_argument(
        "--compare",
        action="store_true",
        help="also run the FunASR baseline server and ONNX Runtime alone at --users",
    )
    compare.add_argument("--device", default="cpu", help="baseline and ORT-alone device: cpu/cuda")
    compare.add_argument(
        "--ort-budget",
        type=float,
        default=30.0,
        help="seconds per ONNX-Runtime-alone measurement (default 30)",
    )
    live = parser.add_argument_group("live calls (loadtest/live.py)")
    live.add_argument(
        "--live",
        action="store_true",
        help="N concurrent stereo calls at real time through the gateway's /v1/live "
        "(started here in front of Triton): event latency, coalesced windows, lost "
        "finals, gateway CPU per channel, Triton batch sizes; --duration per level",
    )
    live.add_argument(
        "--channels", default="8", help="concurrent calls; a comma list sweeps (e.g. 10,20,40)"
    )
    live.add_argument(
        "--frame-ms", type=float, default=100.0, help="audio per WebSocket frame (default 100)"
    )
    live.add_argument("--calls", type=int, default=4, help="distinct call recordings (default 4)")
    live.add_argument(
        "--call-s", type=float, default=60.0, help="length of each recording (default 60)"
    )
    live.add_argument(
        "--protocols",
        default="live",
        help="live protocols to load, each level once per protocol, one after the other: a "
        "comma list of live (/v1/live), twilio, audiohook (default live)",
    )
    live.add_argument(
        "--cpu-profile",
        action="store_true",
        help="sample the gateway with py-spy over each level's measured window: its CPU per "
        "channel-second by stage in the report, the stacks beside it",
    )
    live.add_argument(
        "--live-url", help="load this running gateway (ws://HOST:PORT) instead of a local one"
    )
    live.add_argument(
        "--gateway-pid", type=int, help="with --live-url on this machine: its CPU is measured"
    )
    live.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="with --bus: N gateway replicas, calls spread over them, each call followed by "
        "a subscriber on another replica (loadtest/live_fleet.py)",
    )
    live.add_argument(
        "--bus",
        action="store_true",
        help="with --replicas: the replicas share calls through a local NATS server; the "
        "same load without the bus (each replica alone) is run alongside, ABBA",
    )
    live.add_argument(
        "--rounds", type=int, default=2, help="with --bus: bus/in-process pairs run (default 2)"
    )
    fleet = parser.add_argument_group("a Triton fleet (loadtest/triton_fleet_run.py)")
    fleet.add_argument(
        "--replicas-triton",
        type=int,
        metavar="N",
        help="N local tritonservers, one core each, and the profile through one client "
        "balancing over them (gRPC round_robin), against replica 0 alone in the same run; "
        "requests per replica from each Triton's statistics",
    )
    fleet.add_argument(
        "--fleet-rounds",
        type=int,
        default=2,
        help="one-replica / N-replica pairs, run back to back (default 2)",
    )
    output = parser.add_argument_group("report")
    output.add_argument("--report", type=Path, help="report folder (default runs/loadtest/...)")
    output.add_argument(
        "--price-per-hour",
        type=float,
        help="machine price in USD/hour, for the cost per 1,000 audio hours",
    )
    output.add_argument("--html", action="store_true", help="also save Locust's HTML reports")
    parser.set_defaults(func=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    """The scenario the arguments select."""
    if args.live and (args.bus or args.replicas != 1):
        from e2v.loadtest.live_fleet_run import run_fleet

        return run_fleet(args)
    if args.live:
        from e2v.loadtest.live_run import run_live

        return run_live(args)
    if args.replicas_triton is not None:
        from e2v.loadtest.triton_fleet_run import run_fleet

        return run_fleet(args)
    from e2v.loadtest.plan import run_plan

    return run_plan(args)
