"""Stock Locust entry point for the same users `e2v loadtest` drives.

    locust -f loadtest/locustfile.py --headless -u 4 -t 60s --host 127.0.0.1:8001 \\
        --e2v-profile call-centre GrpcClient          # or HttpClient / BaselineClient
    locust -f loadtest/locustfile.py --headless -u 4 -t 60s --host 127.0.0.1:8080 \
        GatewayClient                                 # file uploads to `e2v gateway`
    E2V_RAMP=1,1,8 E2V_STEP_S=20 locust -f loadtest/locustfile.py ...   # step ramp

The web UI works too (drop --headless). At the end it prints the audio seconds answered
per wall-clock second; `e2v loadtest` adds Triton statistics, plots and comparisons.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from e2v.loadtest import shapes
from e2v.loadtest.profiles import load_profile
from e2v.loadtest.spec import Ramp
from e2v.loadtest.users import (
    BaselineHttpUser,
    GatewayUser,
    PreparedClips,
    TritonGrpcUser,
    TritonHttpUser,
)
from e2v.loadtest.workload import encode_clips, prepare_workload
from locust import events

_audio = {"seconds": 0.0, "start": None}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument(
        "--e2v-profile", default="call-centre", help="workload profile name or JSON file"
    )


@events.init.add_listener
def _prepare(environment, **_) -> None:
    """Audio is prepared once per process, before any user starts (the gateway's uploads
    are the clips encoded as files, in a temporary folder removed at exit)."""
    name = environment.parsed_options.e2v_profile if environment.parsed_options else "call-centre"
    workload = prepare_workload(load_profile(name))
    files = Path(_files.name) / "clips"
    encode_clips(workload, files)
    environment.e2v_clips = PreparedClips(workload, files)


_files = tempfile.TemporaryDirectory(prefix="e2v-locust-")


@events.test_start.add_listener
def _start(**_) -> None:
    _audio.update(seconds=0.0, start=time.monotonic())


@events.request.add_listener
def _count_audio(exception=None, context=None, **_) -> None:
    if exception is None:
        _audio["seconds"] += float((context or {}).get("audio_s", 0.0))


@events.test_stop.add_listener
def _report(**_) -> None:
    if _audio["start"] is not None:
        elapsed = time.monotonic() - _audio["start"]
        print(f"audio seconds per second (real-time factor): {_audio['seconds'] / elapsed:.2f}")


class GrpcClient(TritonGrpcUser):
    abstract = False


class HttpClient(TritonHttpUser):
    abstract = False


class BaselineClient(BaselineHttpUser):
    abstract = False


class GatewayClient(GatewayUser):
    abstract = False


if os.environ.get("E2V_RAMP"):

    class StepRampShape(shapes.StepRamp):
        """Step ramp from E2V_RAMP=START,STEP,MAX users, E2V_STEP_S seconds per level."""

        def __init__(self):
            step_s = float(os.environ.get("E2V_STEP_S", "20"))
            super().__init__(Ramp.parse(os.environ["E2V_RAMP"], step_s))
