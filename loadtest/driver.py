"""`python -m e2v.loadtest.driver SPEC.json`: one bounded, headless Locust run.

Locust runs in-process here (Environment + LocalRunner + gevent), in a process of its
own: importing Locust monkey-patches everything for gevent, which must not leak into
the `e2v` process that starts servers and runs ONNX Runtime. Writes into `out_dir`:
Locust's CSVs (`locust_stats.csv`, `locust_stats_history.csv`, failures, exceptions),
`requests.csv` (one row per request, with its audio duration), `locust.json`, and
`locust.html` when asked.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import gevent
from e2v.loadtest.shapes import FixedUsers, StepRamp
from e2v.loadtest.spec import DriveSpec
from e2v.loadtest.users import PreparedClips, user_class
from e2v.loadtest.workload import Workload
from locust import events  # Locust monkey-patches this process for gevent on import
from locust.env import Environment
from locust.html import get_html_report
from locust.log import setup_logging
from locust.runners import STATE_STOPPED, Runner
from locust.stats import (
    CSV_STATS_INTERVAL_SEC,
    PERCENTILES_TO_REPORT,
    StatsCSVFileWriter,
    stats_history,
)

REQUEST_COLUMNS = ("end_s", "latency_ms", "audio_s", "bucket", "ok", "users", "error")


class RequestLog:
    """Every request event as a row: completion time, latency, audio seconds, users."""

    def __init__(self, environment: Environment):
        self.environment = environment
        self.start = time.time()
        self.rows: list[tuple] = []

    def on_request(self, name, response_time, exception=None, context=None, **_) -> None:
        runner = self.environment.runner
        self.rows.append(
            (
                round(time.time() - self.start, 4),
                round(float(response_time), 3),
                float((context or {}).get("audio_s", 0.0)),
                name,
                int(exception is None),
                runner.user_count if runner else 0,
                "" if exception is None else str(exception).splitlines()[0][:200],
            )
        )

    def write(self, path: Path) -> None:
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(REQUEST_COLUMNS)
            writer.writerows(self.rows)


def run(spec: DriveSpec) -> dict:
    """Run the spec's load shape to completion; returns Locust's totals."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = StepRamp(spec.ramp) if spec.ramp else FixedUsers(spec.users, spec.duration_s)
    env = Environment(
        user_classes=[user_class(spec.user, spec.url)],
        shape_class=shape,
        host=spec.url,
        stop_timeout=spec.stop_timeout_s,
        events=events,
    )
    files = Path(spec.files) if spec.files else None
    env.e2v_clips = PreparedClips(Workload.load(Path(spec.workload)), files)
    log = RequestLog(env)
    env.events.request.add_listener(log.on_request)
    runner = env.create_local_runner()
    writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, str(out / "locust"))
    background = [gevent.spawn(stats_history, runner), gevent.spawn(writer.stats_writer)]
    log.start = time.time()
    runner.start_shape()
    _wait_stopped(runner, spec.load_s + spec.stop_timeout_s + 30)
    runner.quit()
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)  # one last CSV pass with the final numbers
    gevent.killall(background)
    writer.close_files()
    log.write(out / "requests.csv")
    if spec.html:
        (out / "locust.html").write_text(get_html_report(env, show_download_link=False))
    totals = _totals(runner, time.time() - log.start)
    (out / "locust.json").write_text(json.dumps(totals, indent=2))
    return totals


def _wait_stopped(runner: Runner, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    gevent.sleep(1.0)
    while runner.state != STATE_STOPPED and time.monotonic() < deadline:
        gevent.sleep(0.25)


def _totals(runner: Runner, wall_s: float) -> dict:
    total = runner.stats.total
    return {
        "num_requests": total.num_requests,
        "num_failures": total.num_failures,
        "wall_s": round(wall_s, 3),
        "locust_p50_ms": total.get_response_time_percentile(0.5),
        "locust_p95_ms": total.get_response_time_percentile(0.95),
        "locust_p99_ms": total.get_response_time_percentile(0.99),
        "errors": {str(e.error): e.occurrences for e in runner.stats.errors.values()},
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m e2v.loadtest.driver SPEC.json", file=sys.stderr)
        return 2
    setup_logging("WARNING")
    run(DriveSpec.load(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
