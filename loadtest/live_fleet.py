"""`e2v loadtest --live --replicas N --bus`: live calls spread over N gateway replicas, each
followed by a subscriber on another replica, measured.

Channel i plays its calls into replica i mod N (`loadtest.live`: `e2v live`'s client, real
time, the same recordings and pacing as `--live`) while a subscriber follows each call on
replica i+1 mod N (`/v1/calls/{call_id}/events/ws`), connected before the call starts.
Without the bus (the comparison arm) each replica is alone: the subscriber follows on the
call's own replica.

Measured per arm, besides what `--live` measures (`live.measure`: event latency, finals):
- events published (what the callers got: every event goes to the socket and the bus),
  delivered to subscribers, and lost: an event of a completed call (its caller got the
  summary) that its subscriber never got;
- the latency the subscriber's replica adds: for each event, its arrival at the
  subscriber minus its arrival at the caller (one clock, loopback): with the bus, publish
  on one replica -> the stream -> receipt on another; without, the in-process fan-out;
- CPU: every replica's (summed) and the NATS server's, over the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field

import numpy as np
from e2v.loadtest.calls import CallRecording
from e2v.loadtest.live import CallLog, LiveLoad, call, measure
from e2v.loadtest.machine import process_cpu_s
from e2v.loadtest.metrics import percentiles

from e2v.contract import CALL_EVENTS_WS_PATH, CLOSE_NORMAL, EVENT_SUMMARY, LIVE_PATH

SUBSCRIBE_LEAD_S = 0.1  # a subscriber connects this long before its call starts
FOLLOW_AFTER_S = 60.0  # a subscriber still open this long after the level: cut


@dataclass
class Follower:
    """One call's subscriber as it saw the call."""

    call_id: str
    events: list[tuple[float, dict]] = field(default_factory=list)  # (arrival, event)
    close_code: int | None = None
    error: str | None = None


async def drive_fleet(
    urls: list[str],
    calls: list[CallRecording],
    load: LiveLoad,
    pids: list[int],
    bus_pid: int | None,
    shared: bool,
) -> dict:
    """One arm: the channels over the replicas at `urls` (ws://HOST:PORT/v1/live); the
    call logs, the followers and CPU over the measured window."""
    run_id = secrets.token_hex(3)  # call ids never repeat across arms (the stream keeps them)
    start = time.monotonic()
    deadline = start + load.duration_s
    cpu: dict = {}

    def sample() -> tuple[float, float | None, float, float | None]:
        gateways = [process_cpu_s(pid) for pid in pids]
        total = None if None in gateways else sum(gateways)
        return time.monotonic(), total, time.process_time(), process_cpu_s(bus_pid)

    async def sample_cpu() -> None:
        await asyncio.sleep(load.ramp_s)
        cpu["start"] = sample()
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        cpu["end"] = sample()

    sampler = asyncio.create_task(sample_cpu())
    followers: dict[str, Follower] = {}
    lines = [
        channel(urls, calls, load, index, start, deadline, followers, run_id, shared)
        for index in range(load.channels)
    ]
    logs = [log for logs in await asyncio.gather(*lines) for log in logs]
    await sampler
    return {
        "logs": logs,
        "followers": followers,
        "start": start,
        "deadline": deadline,
        "cpu": {k: v[:3] for k, v in cpu.items()},
        "bus_cpu": cpu,
    }


async def channel(
    urls, calls, load, index, start, deadline, followers, run_id, shared
) -> list[CallLog]:
    """Calls back to back on one line, each with its subscriber, until the deadline."""
    await asyncio.sleep(max(0.0, start + load.ramp_s * index / load.channels - time.monotonic()))
    home = urls[index % len(urls)]
    away = urls[(index + 1) % len(urls)] if shared else home
    logs: list[CallLog] = []
    while time.monotonic() < deadline - 1.0:
        recording = (index + len(logs)) % len(calls)
        log = CallLog(index, recording, f"fleet-{run_id}-{index}-{len(logs)}")
        logs.append(log)
        follower = followers[log.call_id] = Follower(log.call_id)
        following = asyncio.create_task(follow(away, follower, deadline + FOLLOW_AFTER_S))
        await asyncio.sleep(SUBSCRIBE_LEAD_S)
        await call(home, calls[recording], load, deadline, log)
        await following
        if log.close_code != CLOSE_NORMAL:
            await asyncio.sleep(1.0)  # a refused or failed call: the line retries later
    return logs


async def follow(url: str, follower: Follower, until: float) -> None:
    """The call's events over the subscription WebSocket until the call ends."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, WebSocketException

    path = CALL_EVENTS_WS_PATH.format(call_id=follower.call_id)
    try:
        async with connect(url.removesuffix(LIVE_PATH) + path, compression=None) as ws:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    message = await asyncio.wait_for(ws.recv(), until - time.monotonic())
                    follower.events.append((time.monotonic(), json.loads(message)))
            follower.close_code = ws.close_code
    except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
        follower.error = f"{type(exc).__name__}: {exc}"[:300]


def measure_fleet(run: dict, calls: list[CallRecording], load: LiveLoad) -> dict:
    """`live.measure`'s figures, and the bus's: events published, delivered and lost, the
    latency a subscriber's replica adds, CPU of the replicas and of the NATS server."""
    figures = measure(run, calls, load)
    published = delivered = lost = complete = 0
    added: list[float] = []
    followers: dict[str, Follower] = run["followers"]
    for log in run["logs"]:
        follower = followers[log.call_id]
        got = {event["seq"]: arrived for arrived, event in follower.events}
        published += len(log.events)
        delivered += len(follower.events)
        for arrived, event in log.events:
            if event["seq"] in got:
                added.append(got[event["seq"]] - arrived)
        if any(event.get("type") == EVENT_SUMMARY for _, event in log.events):
            complete += 1
            lost += sum(event["seq"] not in got for _, event in log.events)
    figures["bus"] = {
        "calls_complete": complete,
        "events_published": published,
        "events_delivered": delivered,
        "events_lost": lost,
        "subscribers_failed": sum(
            f.error is not None or f.close_code not in (CLOSE_NORMAL, None)
            for f in followers.values()
        ),
        "added_latency_ms": percentiles(np.asarray(added, dtype=np.float64) * 1000),
    }
    figures["bus_server_cores"] = _bus_cores(run["bus_cpu"])
    return figures


def _bus_cores(cpu: dict) -> float | None:
    if "end" not in cpu or cpu["start"][3] is None or cpu["end"][3] is None:
        return None
    wall = max(cpu["end"][0] - cpu["start"][0], 1e-9)
    return round((cpu["end"][3] - cpu["start"][3]) / wall, 3)
