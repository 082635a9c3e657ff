"""`e2v loadtest --live`: N concurrent calls at real time through a live protocol, measured.

Each channel is one telephony line: it plays stereo 8 kHz mu-law call recordings
(`loadtest.calls`, two parties each) into the gateway back to back, one session per call
of the level's protocol (`/v1/live`, `/v1/twilio` or `/v1/audiohook`), in frames of
`--frame-ms` sent when their last sample is due (a phone system cannot send audio before
it has been spoken; Twilio's frames are 20 ms media messages per track, sent in groups of
`--frame-ms`). Channels start spread over the ramp; at the end of the level every call
in progress ends as its protocol ends a call (`stop`, `close`).

Measured per level (the window after the ramp):
- interim latency: from the moment the last sample of an event's window reached the
  gateway (the send time of the frame that carried it, loopback) to the event's arrival;
- final latency, twice: from the utterance's last sample (what a caller waits, the merge
  gap of `MERGE_GAP_S` included: a final is due only once the utterance cannot grow) and
  from the sample that made it due (end + merge gap + padding, or the last sample before
  `stop`): the gateway's own delay;
- the gateway's `lag_s` stamps (audio seconds received after the window's end when the
  event was published), where events carry them;
- coalesced windows (the `coalesced` field of results) and lost finals: the offline
  utterances of the audio each session received (`loadtest.calls.offline_utterances`)
  without a final that covers them;
- the gateway process's CPU time (/proc/PID/stat), so channels per core, and with
  `--cpu-profile` where it goes (`loadtest.cpu_profile`);
- Triton's executions by batch size (`loadtest.triton_stats`).

Each call is `e2v live`'s own client of its protocol (`client.live.player`: its
connection, messages, bounded waits and event reading; Twilio's results come from the
call's event subscription), given the recording paced as above. One asyncio event loop
holds hundreds of paced sockets in one process (not Locust), with little CPU taken from
the gateway it measures.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from e2v.client.live import codecs
from e2v.client.live.player import (
    AudioHookClient,
    NativeClient,
    PlayError,
    PlayOptions,
    TwilioClient,
)
from e2v.client.segment import MERGE_GAP_S, VAD_SPEECH_PAD_MS
from e2v.loadtest.calls import PARTIES, RATE, CallRecording, offline_utterances
from e2v.loadtest.cpu_profile import (
    compress,
    per_channel_ms,
    stage_cpu,
    start_recording,
    thread_cpu,
)
from e2v.loadtest.machine import process_cpu_s
from e2v.loadtest.metrics import percentiles

from e2v.contract import (
    AUDIOHOOK_PARTIES,
    CLOSE_NORMAL,
    EVENT_RESULT,
    EVENT_SUMMARY,
    EVENT_UTTERANCE_END,
    LIVE_HOP_S,
    LIVE_PATH,
    LIVE_WINDOW_S,
    SAMPLE_RATE,
    TWILIO_PARTIES,
)

MATCH_SHARE = 0.5  # a final covers an offline utterance when it overlaps half of it
# A final is due once the VAD has read the merge gap past the utterance's padded end, plus
# the padding (client/segment.py's _Merger.settle): the earliest sample that can release it.
FINAL_DUE_S = MERGE_GAP_S + VAD_SPEECH_PAD_MS / 1000


@dataclass(frozen=True)
class LiveLoad:
    channels: int
    duration_s: float
    frame_s: float = 0.1
    ramp_s: float = 5.0  # channels start spread over this; measured from its end
    window_s: float = LIVE_WINDOW_S
    hop_s: float = LIVE_HOP_S
    protocol: str = "live"  # live (/v1/live), twilio or audiohook: the player's clients

    @property
    def measure_s(self) -> float:
        return self.duration_s - self.ramp_s


@dataclass
class CallLog:
    """One session as the client saw it."""

    channel: int
    recording: int
    call_id: str
    sent: list[float] = field(default_factory=list)  # send time of each frame
    frame_samples: int = 0
    events: list[tuple[float, dict]] = field(default_factory=list)  # (arrival, event)
    close_code: int | None = None
    close_reason: str = ""
    error: str | None = None  # a failure of the client side (connect, protocol)

    @property
    def samples_sent(self) -> int:
        """Samples per party the gateway received."""
        return len(self.sent) * self.frame_samples

    def sent_at(self, end_s: float) -> float:
        """When the frame carrying the sample just before audio time `end_s` was sent."""
        index = math.ceil(end_s * RATE / self.frame_samples) - 1
        return self.sent[min(max(index, 0), len(self.sent) - 1)]


# ----------------------------------------------------------------------------- driver


async def drive(
    url: str,
    calls: list[CallRecording],
    load: LiveLoad,
    pid: int | None,
    profile: Path | None = None,
) -> dict:
    """Run one level; returns the call logs and the gateway CPU over the measured window
    (with `profile`, py-spy's stacks of the gateway go there: `loadtest.cpu_profile`)."""
    start = time.monotonic()
    deadline = start + load.duration_s
    cpu: dict = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(load.ramp_s)
        recorder = None
        if profile is not None and pid is not None:
            cpu["threads_start"] = thread_cpu(pid)
            recorder = await start_recording(pid, deadline - time.monotonic(), profile)
        cpu["start"] = (time.monotonic(), process_cpu_s(pid), time.process_time())
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        cpu["end"] = (time.monotonic(), process_cpu_s(pid), time.process_time())
        if recorder is not None:
            cpu["threads_end"] = thread_cpu(pid)
            _, errors = await recorder.communicate()
            if recorder.returncode:
                cpu["profile_error"] = errors.decode(errors="replace").strip()[-300:]

    sampler = asyncio.create_task(sample_cpu())
    channels = [
        channel(url, calls, load, index, start + load.ramp_s * index / load.channels, deadline)
        for index in range(load.channels)
    ]
    logs = [log for logs in await asyncio.gather(*channels) for log in logs]
    await sampler
    return {"logs": logs, "start": start, "deadline": deadline, "cpu": cpu, "profile": profile}


async def channel(
    url: str, calls: list[CallRecording], load: LiveLoad, index: int, begin: float, deadline: float
) -> list[CallLog]:
    """Calls back to back on one line until the deadline."""
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    logs: list[CallLog] = []
    while time.monotonic() < deadline - 1.0:
        recording = (index + len(logs)) % len(calls)
        log = CallLog(index, recording, f"lt-{index}-{len(logs)}")
        logs.append(log)
        await call(url, calls[recording], load, deadline, log)
        if log.close_code != CLOSE_NORMAL:
            await asyncio.sleep(1.0)  # a refused or failed call: the line retries later
    return logs


async def call(
    url: str, recording: CallRecording, load: LiveLoad, deadline: float, log: CallLog
) -> None:
    """One session of `load.protocol`: opened, paced frames until the recording or level
    ends, the protocol's end. Whatever fails stays in `log`: the line goes on."""
    from websockets.exceptions import WebSocketException

    try:
        await LOAD_CALLS[load.protocol](url, recording, load, deadline, log).run()
        log.close_code = CLOSE_NORMAL  # the player returns only after a normal close
    except PlayError as exc:
        if exc.close_code is None:  # the client's side: connect, timeouts, protocol
            log.error = str(exc)[:300]
        log.close_code, log.close_reason = exc.close_code, exc.close_reason
    except (OSError, WebSocketException) as exc:  # what the player lets through
        log.error = f"{type(exc).__name__}: {exc}"[:300]


class LoadAudio:
    """A call recording as the player's clients read it (`player.Recording`'s face): the
    parties' mu-law samples in frames, each yielded when its last sample is due (a phone
    system cannot send audio before it has been spoken), until the recording or the level
    ends; each frame's send time goes to the call's log."""

    rate = RATE

    def __init__(self, recording: CallRecording, deadline: float, log: CallLog):
        samples = codecs.decode(recording.payload, "mulaw")
        self.tracks = np.stack(codecs.deinterleave(samples, len(PARTIES)))
        self.channels = len(PARTIES)
        self.deadline, self.log = deadline, log
        self.sent_s = 0.0

    async def frames(self, frame_s: float) -> AsyncIterator[np.ndarray]:
        size = self.log.frame_samples = round(frame_s * RATE)
        t0 = time.monotonic()
        for k, offset in enumerate(range(0, self.tracks.shape[1] - size + 1, size)):
            due = t0 + (k + 1) * frame_s
            if due >= self.deadline:
                return
            await asyncio.sleep(due - time.monotonic())
            self.sent_s += size / RATE
            self.log.sent.append(time.monotonic())
            yield self.tracks[:, offset : offset + size]

    def close(self) -> None:
        """Nothing to release (the player's Recording closes its decoder here)."""


class LoadClient:
    """What every protocol's load call adds to `e2v live`'s own client: its options, the
    paced recording, no per-message deflate (telephony platforms stream without it), every
    event logged with its arrival time, no note of the model (the report names it)."""

    compression = None

    def __init__(
        self, url: str, recording: CallRecording, load: LiveLoad, deadline: float, log: CallLog
    ):
        options = PlayOptions(
            source=str(recording.path),
            url=url.removesuffix(LIVE_PATH),
            protocol=load.protocol,
            call_id=self.load_call_id(log.call_id),
            parties=PARTIES if load.protocol == "live" else None,
            encoding="mulaw",
            sample_rate=RATE,
        )
        self.frame_s, self.load, self.log = load.frame_s, load, log
        super().__init__(options, LoadAudio(recording, deadline, log), self.arrived)

    @staticmethod
    def load_call_id(call_id: str) -> str:
        return call_id

    def arrived(self, event: dict) -> None:
        self.log.events.append((time.monotonic(), event))

    def event(self, event: dict) -> None:
        """The player's, without its note of a synthetic model (the report has it)."""
        self.emit(event)
        if event.get("type") == EVENT_SUMMARY:
            self.summary = event

    def note_model(self, started: dict) -> None:
        """Silent: a load of many calls names its model in the report."""


class NativeLoadCall(LoadClient, NativeClient):
    """`/v1/live`, with the load's interim window and hop in `start`."""

    def start_message(self) -> dict:
        windows = {"window_s": self.load.window_s, "hop_s": self.load.hop_s}
        return super().start_message() | windows


class TwilioLoadCall(LoadClient, TwilioClient):
    """`/v1/twilio`: 20 ms media messages per track, sent in groups of `--frame-ms`, the
    results read from the call's event subscription (Twilio carries none back)."""


class AudioHookLoadCall(LoadClient, AudioHookClient):
    """`/v1/audiohook`: PCMU frames of `--frame-ms`; the conversation id is a UUID."""

    @staticmethod
    def load_call_id(call_id: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, call_id))


LOAD_CALLS = {"live": NativeLoadCall, "twilio": TwilioLoadCall, "audiohook": AudioHookLoadCall}
# The parties of each protocol's events, in the recording's channel order.
PROTOCOL_PARTIES = {
    "live": PARTIES,
    "twilio": tuple(TWILIO_PARTIES.values()),
    "audiohook": tuple(AUDIOHOOK_PARTIES.values()),
}


# ----------------------------------------------------------------------------- measures


def measure(run: dict, calls: list[CallRecording], load: LiveLoad) -> dict:
    """The level's figures from its call logs (see the module docstring)."""
    logs: list[CallLog] = run["logs"]
    low, high = run["start"] + load.ramp_s, run["deadline"]
    interim, since_end, since_due = [], [], []
    lags: dict[str, list[float]] = {EVENT_RESULT: [], EVENT_UTTERANCE_END: []}
    results = coalesced = stale = 0
    for log in (log for log in logs if log.sent):  # events about audio need audio
        last_s = log.samples_sent / RATE
        for arrived, event in log.events:
            kind = event.get("type")
            if kind == EVENT_SUMMARY and low <= arrived:
                stale += int(event.get("stale") or 0)
            if not low <= arrived <= high or kind not in lags:
                continue
            end_s = float(event["end_s"])
            if event.get("lag_s") is not None:
                lags[kind].append(float(event["lag_s"]))
            if kind == EVENT_RESULT:
                results += 1
                coalesced += int(event.get("coalesced") or 0)
                interim.append(arrived - log.sent_at(end_s))
            else:
                since_end.append(arrived - log.sent_at(end_s))
                since_due.append(arrived - log.sent_at(min(end_s + FINAL_DUE_S, last_s)))
    cpu = _cpu(run["cpu"], load.channels, _streamed(logs, run["cpu"]))
    profile = _profile(run["cpu"], run.get("profile"), load.channels)
    return {
        "channels": load.channels,
        "protocol": load.protocol,
        "sessions": _sessions(logs),
        "interim_latency_ms": _percentiles_ms(interim),
        "final_latency_ms": _percentiles_ms(since_due),
        "final_since_end_ms": _percentiles_ms(since_end),
        "gateway_lag_ms": {
            "interim": _percentiles_ms(lags[EVENT_RESULT]),
            "final": _percentiles_ms(lags[EVENT_UTTERANCE_END]),
        },
        "results": results,
        "coalesced": coalesced,
        "coalesced_share": round(coalesced / (results + coalesced), 4) if results else 0.0,
        "stale": stale,
        "finals": finals_check(logs, calls, PROTOCOL_PARTIES[load.protocol]),
        **cpu,
        **profile,
    }


def _percentiles_ms(seconds: list[float]) -> dict:
    return percentiles(np.asarray(seconds, dtype=np.float64) * 1000)


def _sessions(logs: list[CallLog]) -> dict:
    closes: dict[str, int] = {}
    for log in logs:
        key = log.error or f"{log.close_code} {log.close_reason}".strip()
        if log.close_code == CLOSE_NORMAL and not log.error:
            key = "1000"
        closes[key] = closes.get(key, 0) + 1
    ok = closes.get("1000", 0)
    return {"calls": len(logs), "ok": ok, "failed": len(logs) - ok, "closes": closes}


def finals_check(
    logs: list[CallLog], calls: list[CallRecording], parties: tuple[str, ...] = PARTIES
) -> dict:
    """Finals against the offline utterances of the audio each completed session sent, and
    interim results per second of that speech (1 / hop_s when none is lost to overload)."""
    cache: dict[tuple[int, int, int], list] = {}
    expected = arrived = lost = results = 0
    speech_s = audio_s = 0.0
    for log in logs:
        if log.close_code != CLOSE_NORMAL or log.error or not log.sent:
            continue  # a failed session's finals are not owed (its error is counted)
        if not any(e.get("type") == EVENT_SUMMARY for _, e in log.events):
            continue
        n = log.samples_sent * SAMPLE_RATE // RATE
        audio_s += log.samples_sent / RATE
        for p, party in enumerate(parties):
            key = (log.recording, p, n)
            if key not in cache:
                cache[key] = offline_utterances(calls[log.recording].tracks[p][:n])
            mine = [e for _, e in log.events if e.get("party") == party]
            got = [
                (float(e["start_s"]), float(e["end_s"]))
                for e in mine
                if e.get("type") == EVENT_UTTERANCE_END
            ]
            expected += len(cache[key])
            arrived += len(got)
            lost += sum(not _covered(seg, got) for seg in cache[key])
            results += sum(e.get("type") == EVENT_RESULT for e in mine)
            speech_s += sum(seg.duration_s for seg in cache[key])
    return {
        "expected": expected,
        "arrived": arrived,
        "lost": lost,
        "interims_per_speech_s": round(results / speech_s, 3) if speech_s else None,
        # What a call asks of Triton: a window per hop of speech and a final per utterance.
        "requests_per_call_s": round((speech_s / LIVE_HOP_S + expected) / audio_s, 3)
        if audio_s
        else None,
    }


def _covered(segment, finals: list[tuple[float, float]]) -> bool:
    need = MATCH_SHARE * segment.duration_s
    return any(min(e, segment.end_s) - max(s, segment.start_s) >= need for s, e in finals)


def _streamed(logs: list[CallLog], cpu: dict) -> float | None:
    """Seconds of call audio (per channel, both parties together) sent over the CPU window:
    `channels` x its length when every line kept up, less when the gateway pushed back."""
    if "end" not in cpu:
        return None
    low, high = cpu["start"][0], cpu["end"][0]
    frames = sum(log.frame_samples * sum(low < t <= high for t in log.sent) for log in logs)
    return frames / RATE


def _cpu(cpu: dict, channels: int, streamed_s: float | None = None) -> dict:
    if "end" not in cpu:
        return {"gateway_cores": None, "channels_per_core": None, "client_cores": None}
    (t0, g0, c0), (t1, g1, c1) = cpu["start"], cpu["end"]
    wall = max(t1 - t0, 1e-9)
    cores = None if g0 is None or g1 is None else (g1 - g0) / wall
    per_audio = None
    if cores and streamed_s:  # CPU per second of call audio the gateway was sent
        per_audio = round(1000 * (g1 - g0) / streamed_s, 3)
    return {
        "gateway_cores": round(cores, 3) if cores is not None else None,
        "channels_per_core": round(channels / cores, 1) if cores else None,
        "channels_streamed": round(streamed_s / wall, 1) if streamed_s else None,
        "ms_per_channel_s": per_audio,
        "client_cores": round((c1 - c0) / wall, 3),
    }


def _profile(cpu: dict, path: Path | None, channels: int) -> dict:
    """The gateway's CPU per channel-second by stage, where the level was profiled."""
    if path is None or "threads_end" not in cpu:
        return {}
    if "profile_error" in cpu or not path.exists():
        return {"cpu_profile_error": cpu.get("profile_error", "py-spy wrote nothing")}
    wall = max(cpu["end"][0] - cpu["start"][0], 1e-9)
    before, after = cpu["threads_start"], cpu["threads_end"]
    seconds = stage_cpu(path.read_text(), before, after)
    path = compress(path)
    threads = {
        str(tid): [name, round(used - before.get(tid, (name, 0.0))[1], 3)]
        for tid, (name, used) in after.items()
    }
    return {
        "cpu_profile": {
            "file": path.name,
            "seconds": round(wall, 2),
            "threads": threads,  # CPU seconds of each thread over the window
            "stages": per_channel_ms(seconds, wall, channels),
        }
    }


def ws_url(base: str) -> str:
    """`ws://HOST:PORT/v1/live` from a gateway's http:// or ws:// address."""
    base = base.rstrip("/")
    for old, new in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(old):
            base = new + base.removeprefix(old)
    if not base.startswith(("ws://", "wss://")):
        base = "ws://" + base
    return base if base.endswith(LIVE_PATH) else base + LIVE_PATH
