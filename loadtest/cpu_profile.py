"""Where a live gateway's CPU goes: py-spy samples of the process over a level's measured
window, each stack charged to one stage of the hot path (`e2v loadtest --live --cpu-profile`).

    before = thread_cpu(pid)
    recorder = await start_recording(pid, seconds, path)   # py-spy record, raw stacks
    ...
    await recorder.wait()
    after = thread_cpu(pid)
    cpu = stage_cpu(path.read_text(), before, after)       # {stage: CPU seconds}

A stack is charged to the stage of its innermost frame that names one (`RULES`, matched
from the leaf up), so `json.dumps` under the outbox is event work and under the Twilio
parser receive work; stacks no rule names (the event loop's own turns, thread hand-offs,
the framework around the endpoint) are "the rest". py-spy counts a thread whenever it is
runnable (also while it waits for a core or the GIL), so samples alone overstate busy
threads on a loaded machine: each thread's CPU seconds (/proc) are split by its own
samples instead, leaving out those where it waits (`WAITS`: the event loop's poll, an
idle worker), and threads py-spy cannot see (gRPC's C threads) are charged by name.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RECEIVE = "WebSocket receive and frame parse"
AUDIO = "decode and resample"
VAD = "VAD"
WINDOWS = "window assembly"
TRITON = "Triton request building and gRPC"
EVENTS = "event JSON and send"
REST = "the rest"
WAIT = "waiting"  # not a stage: samples of a thread that waits (see WAITS)
STAGES = (RECEIVE, AUDIO, VAD, WINDOWS, TRITON, EVENTS, REST)
SAMPLE_HZ = 100
# gRPC's core threads (their names as /proc shows them, cut to 15 characters).
GRPC_THREADS = ("grpc", "default-executo", "resolver-execut", "timer_manager")


@dataclass(frozen=True)
class Rule:
    """Frames of files whose path contains `path` (and, when given, of functions whose
    qualified name `pattern` matches, e.g. `^LiveSession\\.feed` or `\\.send$`) belong
    to `stage`."""

    stage: str
    path: str
    pattern: str = ""

    def matches(self, file: str, function: str) -> bool:
        return self.path in file and (not self.pattern or re.search(self.pattern, function))


_WS_SEND = r"\.(send(_text|_binary|_frame|_bytes|_json)?|data_to_send|serialize)$"
RULES = (
    # the audio path, below the socket
    Rule(VAD, "client/vad.py"),
    Rule(VAD, "onnxruntime/"),
    Rule(AUDIO, "client/live/codecs.py"),
    Rule(AUDIO, "client/audio.py"),
    Rule(AUDIO, "soxr/"),
    Rule(AUDIO, "client/live/session.py", r"^(LiveSession\.(prepare|process)|_decode)"),
    Rule(AUDIO, "client/live/party.py", r"^(PartyStream\.resample|_RawTail\.push)"),
    Rule(WINDOWS, "client/segment.py"),
    Rule(WINDOWS, "client/live/party.py"),
    # Triton
    Rule(TRITON, "client/triton.py"),
    Rule(TRITON, "client/live/scheduler.py"),
    Rule(TRITON, "tritonclient/"),
    Rule(TRITON, "grpc/"),
    Rule(TRITON, "google/protobuf/"),
    # events out: made, numbered, serialised, fanned out, framed, sent
    Rule(EVENTS, "client/live/outbox.py"),
    Rule(EVENTS, "client/live/hub.py"),
    Rule(EVENTS, "client/results.py"),
    Rule(EVENTS, "client/alerts.py"),
    Rule(EVENTS, "client/webhooks.py"),
    Rule(
        EVENTS,
        "client/live/session.py",
        r"^(LiveSession\._(emit|act|on_interim|final|summary)|_fields|_r$)",
    ),
    Rule(EVENTS, "client/live/sockets.py", r"^Socket\.(_write|send|_send)"),
    Rule(EVENTS, "client/live/audiohook.py", r"^AudioHookWire\.(frame|_message)"),
    Rule(EVENTS, "client/live/native.py", r"^LiveWire\.frame"),
    Rule(EVENTS, "client/live/routes.py"),
    Rule(EVENTS, "uvicorn/protocols/websockets/", r"\.send$"),
    Rule(EVENTS, "websockets/", _WS_SEND),
    Rule(EVENTS, "starlette/websockets.py", _WS_SEND),
    # messages in: the socket, the protocol's parse, pacing, the session's intake
    Rule(RECEIVE, "uvicorn/protocols/websockets/"),
    Rule(RECEIVE, "websockets/"),
    Rule(RECEIVE, "starlette/websockets.py"),
    Rule(RECEIVE, "client/live/sockets.py"),
    Rule(RECEIVE, "client/live/connection.py"),
    Rule(RECEIVE, "client/live/native.py"),
    Rule(RECEIVE, "client/live/twilio.py"),
    Rule(RECEIVE, "client/live/audiohook.py"),
    Rule(RECEIVE, "client/live/limits.py"),
    Rule(
        RECEIVE,
        "client/live/session.py",
        r"^LiveSession\.(feed|_whole|_enqueue|_put|_account|_check|_raise)",
    ),
    Rule(RECEIVE, "asyncio/selector_events.py", r"^_SelectorSocketTransport\._read_ready"),
    Rule(RECEIVE, "asyncio/selector_events.py", r"^_SelectorTransport\.(pause|resume)_reading"),
)


# Leaf frames of a thread that waits (for events, work, a lock): py-spy still counts it when
# it is runnable, e.g. woken but waiting for a core, so these samples are not CPU work and
# take no share of the thread's CPU time.
WAITS = (
    Rule(WAIT, "selectors.py", r"\.select$"),
    Rule(WAIT, "concurrent/futures/thread.py", r"^_worker$"),
    Rule(WAIT, "threading.py", r"\.(wait|acquire)$"),
)


def stage_of(stack: list[tuple[str, str]]) -> str:
    """The stage of a stack of (file, function) frames, root first (WAIT: waiting)."""
    if stack and any(rule.matches(*stack[-1]) for rule in WAITS):
        return WAIT
    for file, function in reversed(stack):
        for rule in RULES:
            if rule.matches(file, function):
                return rule.stage
    return REST


def parse_frame(frame: str) -> tuple[str, str]:
    """'function (path/file.py:123)' -> (path/file.py, function)."""
    function, _, where = frame.partition(" (")
    return where.rsplit(":", 1)[0].rstrip(")"), function


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{thread id: (name, user + system CPU seconds)} of process `pid`, from /proc."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name, _, rest = (task / "stat").read_text().partition(" (")[2].rpartition(") ")
        except OSError:
            continue  # the thread ended meanwhile
        fields = rest.split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def thread_samples(raw: str) -> dict[int, Counter]:
    """py-spy's raw output with --threads ('thread (TID): NAME;frame;... count' per
    line) -> {thread id: samples per stage}."""
    threads: dict[int, Counter] = {}
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        head, _, frames = stack.partition(";")
        if not count.isdigit() or not head.startswith("thread ("):
            continue
        tid = int(head[len("thread (") :].partition(")")[0])
        stage = stage_of([parse_frame(f) for f in frames.split(";") if f])
        threads.setdefault(tid, Counter())[stage] += int(count)
    return threads


def stage_cpu(raw: str, before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per stage over the window: each thread's CPU time (/proc, `after` -
    `before`), split by its own samples' stages. A thread py-spy does not see (gRPC's
    C threads) is charged by its name: Triton for gRPC's, the rest otherwise."""
    samples = thread_samples(raw)
    cpu = Counter({stage: 0.0 for stage in STAGES})
    for tid, (name, seconds) in after.items():
        used = seconds - before.get(tid, (name, 0.0))[1]
        mine = Counter(samples.get(tid, {}))
        mine.pop(WAIT, None)
        if mine:
            total = sum(mine.values())
            for stage, n in mine.items():
                cpu[stage] += used * n / total
        else:
            cpu[TRITON if name.startswith(GRPC_THREADS) else REST] += used
    return dict(cpu)


def per_channel_ms(cpu: dict[str, float], seconds: float, channels: int) -> dict:
    """Each stage's CPU: its share and milliseconds per channel-second."""
    total = sum(cpu.values())
    return {
        stage: {
            "share": round(cpu.get(stage, 0.0) / total, 4) if total else 0.0,
            "ms_per_channel_s": round(1000 * cpu.get(stage, 0.0) / seconds / channels, 3),
        }
        for stage in STAGES
    }


def compress(path: Path) -> Path:
    """`path` gzipped beside it (py-spy's raw stacks shrink ~10x), the original removed."""
    import gzip

    packed = path.with_name(path.name + ".gz")
    packed.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    path.unlink()
    return packed


def read_stacks(path: Path) -> str:
    """A profile's raw stacks, gzipped or not."""
    import gzip

    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode()


def py_spy() -> str | None:
    """The py-spy executable (the loadtest extra installs it), or None."""
    return shutil.which("py-spy") or _beside_python("py-spy")


def _beside_python(name: str) -> str | None:
    import sys

    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


async def start_recording(pid: int, seconds: float, output: Path) -> asyncio.subprocess.Process:
    """py-spy sampling `pid` for `seconds` into `output` (raw stacks), without pausing it
    (--nonblocking: the measured process runs as it would unprofiled)."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("--cpu-profile needs py-spy: pip install './[loadtest]'")
    return await asyncio.create_subprocess_exec(
        executable,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(SAMPLE_HZ),
        "--nonblocking",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
