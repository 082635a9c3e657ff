"""One live call: payloads in, events out (transport-independent; protocols wrap it).

    session = LiveSession(call_id, StreamFormat("mulaw", 8000, ("customer", "agent")),
                          LiveSettings(), scheduler, client.info, publish)
    await session.feed(payload)       # interleaved frames, any length
    summary = await session.finish()  # open utterances end, every final is sent

Audio work (decode, resample, VAD, cutting) runs in ticks on a shared thread pool
(ticks.py): each tick takes what every session received since the last one, and runs the
VAD of all their party streams in one batched call; a session's chunks stay in order, and
a busy gateway makes fewer, larger steps. `feed` awaits
when a session has more than `QUEUE_AUDIO_S` of audio (or `QUEUE_ITEMS` messages)
waiting: back-pressure on that stream only.

Events go to `publish(event)` on the event loop, in order, with `call_id` and `seq`:
`utterance.start`, `result` (interim: `lag_s`, `coalesced`), `utterance.end` (final: the
segment `e2v classify --segment vad` cuts, scored like it), `alert`, and `summary`.
Finals of a party are published in utterance order; an interim that comes back after its
utterance's final is dropped (counted in `stale`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from e2v.client.alerts import MAX_ALERT_WINDOWS
from e2v.client.live import codecs
from e2v.client.live.errors import LiveError, bad
from e2v.client.live.party import BREAK_S, Final, PartyStream, Start, Window
from e2v.client.live.scheduler import Scheduler
from e2v.client.live.ticks import audio_executor, ticks_for
from e2v.client.parties import MAX_PARTY_CHARS, overlap_s, parse_parties, speech_s
from e2v.client.results import FileResult, SegmentResult, aggregate, segment_result
from e2v.client.segment import Segment
from e2v.client.triton import InferenceError, ModelInfo, Prediction, ServerError

from e2v.contract import (
    CLOSE_INTERNAL,
    CLOSE_TOO_BIG,
    EVENT_RESULT,
    EVENT_SUMMARY,
    EVENT_UTTERANCE_END,
    EVENT_UTTERANCE_START,
    LIVE_ENCODINGS,
    LIVE_HOP_S,
    LIVE_MAX_CHANNELS,
    LIVE_SAMPLE_RATES,
    LIVE_WINDOW_S,
    MAX_SEGMENT_S,
    SAMPLE_RATE,
)

# Audio a session may have waiting for processing before `feed` waits (plus one message).
QUEUE_AUDIO_S = 5.0
QUEUE_ITEMS = 256  # and messages (a stream of tiny ones costs more than its bytes)
# The most one feed may carry (transports bound their messages well below this).
MAX_FEED_BYTES = 4 << 20
WINDOW_RANGE_S = (1.0, 10.0)
HOP_RANGE_S = (0.5, 10.0)


@dataclass(frozen=True)
class StreamFormat:
    """The audio of a stream: encoding, rate, and one party name per interleaved channel."""

    encoding: str
    sample_rate: int
    parties: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.encoding not in LIVE_ENCODINGS:
            raise bad(
                "encoding",
                f"unknown encoding {self.encoding!r}: one of " + ", ".join(LIVE_ENCODINGS),
            )
        if self.sample_rate not in LIVE_SAMPLE_RATES:
            raise bad(
                "sample_rate",
                f"sample_rate {self.sample_rate!r}: one of "
                + ", ".join(map(str, LIVE_SAMPLE_RATES)),
            )
        parties = self.parties
        if not isinstance(parties, tuple) or not 1 <= len(parties) <= LIVE_MAX_CHANNELS:
            raise bad("parties", f"1 to {LIVE_MAX_CHANNELS} parties, one per channel")
        # The names of `e2v classify --parties` (alert rules and URLs quote them plainly).
        names = ",".join(p if isinstance(p, str) else "," for p in parties)
        try:
            valid = parse_parties(names) == parties
        except ValueError:
            valid = False
        if not valid:
            shown = repr(list(parties))[:200]
            raise bad(
                "parties",
                f"parties {shown}: different names of 1-{MAX_PARTY_CHARS} letters, digits, "
                "'_', '.' or '-'",
            )

    @property
    def channels(self) -> int:
        return len(self.parties)

    @property
    def frame_bytes(self) -> int:
        """Bytes of one interleaved sample frame (all channels)."""
        return codecs.bytes_per_sample(self.encoding) * self.channels


@dataclass(frozen=True)
class LiveSettings:
    """Interim windows and alerts of one session (ranges in docs/live.md)."""

    window_s: float = LIVE_WINDOW_S
    hop_s: float = LIVE_HOP_S
    alerts: str | None = None  # "customer:angry=0.7,sad=0.8" (client/alerts.py)
    alert_windows: int = 2

    def __post_init__(self) -> None:
        for name, (low, high) in (("window_s", WINDOW_RANGE_S), ("hop_s", HOP_RANGE_S)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, f"{name} must be a number")
            if not low <= value <= high:  # also False for nan
                raise bad(name, f"{name} {value!r}: between {low:g} and {high:g} s")
        if self.alerts is not None and not isinstance(self.alerts, str):
            raise bad("alerts", "alerts must be a string like 'customer:angry=0.7'")
        windows = self.alert_windows
        if isinstance(windows, bool) or not isinstance(windows, int):
            raise bad("alert_windows", "alert_windows must be an integer")
        if not 1 <= windows <= MAX_ALERT_WINDOWS:
            limit = f"between 1 and {MAX_ALERT_WINDOWS}"
            raise bad("alert_windows", f"alert_windows {windows}: {limit}")


_PAUSE, _FINISH = "pause", "finish"
_NO_EMBEDDING = np.zeros(0, np.float32)
_AUDIO = ("audio", "channel")


class LiveSession:
    """One call's parties, their utterances and events. See the module docstring."""

    def __init__(
        self,
        call_id: str,
        fmt: StreamFormat,
        settings: LiveSettings,
        scheduler: Scheduler,
        info: ModelInfo,
        publish: Callable[[dict], None],
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.call_id, self.fmt, self.settings = call_id, fmt, settings
        self.scheduler, self.info, self._publish = scheduler, info, publish
        self._executor = executor or audio_executor()
        self._alerts = _alert_tracker(settings, fmt.parties, info.labels)
        max_segment_s = min(MAX_SEGMENT_S, info.max_samples / SAMPLE_RATE)
        self.parties = [
            PartyStream(fmt.sample_rate, settings.window_s, settings.hop_s, max_segment_s)
            for _ in fmt.parties
        ]
        self._window_size = info.bucket(round(settings.window_s * SAMPLE_RATE))
        self._key = object()  # this session's part of the scheduler's interim keys
        self._seq = 0
        self._frame_bytes = fmt.frame_bytes
        self._remainder = [b""] * (fmt.channels + 1)  # partial frames: [interleaved, per channel]
        self._received = [0] * fmt.channels  # samples received per channel (source rate)
        self._stream_s = [0.0] * fmt.channels  # party time received, pause breaks included
        self._finals_seen = [0] * fmt.channels  # newest utterance whose final was cut
        self._last_final: list[asyncio.Task | None] = [None] * fmt.channels
        self._finals: list[list[SegmentResult]] = [[] for _ in fmt.parties]
        self._final_tasks: set[asyncio.Task] = set()
        self._items: list[tuple] = []  # for the next tick, bounded by the bytes below
        self._ticking = 0  # items taken by the tick in progress
        self._queued_bytes = 0  # audio bytes queued or in a tick
        self._queue_limit = round(QUEUE_AUDIO_S * fmt.sample_rate) * fmt.frame_bytes
        self._room = asyncio.Event()
        self._room.set()
        self._ticks = ticks_for(self._executor)
        self._audio_done: asyncio.Future | None = None  # the finish item's tick
        self._error: LiveError | None = None
        self.state = "open"  # open -> finishing -> done | aborted
        self.paused = False
        self.stale = 0  # interim results dropped: their utterance had ended
        self.coalesced = 0  # interim windows this session lost to newer ones

    # ----------------------------------------------------------------- inputs

    @property
    def audio_s(self) -> float:
        """Seconds of audio received (the most of any party), for rate limits."""
        return max(self._received) / self.fmt.sample_rate

    async def feed(self, payload: bytes) -> None:
        """Interleaved frames of `fmt`; a partial frame waits for the next payload."""
        self._check_open()
        data = self._whole(0, payload, self._frame_bytes)
        frames = len(data) // self._frame_bytes
        for i in range(self.fmt.channels):
            self._account(i, frames)
        if data:
            await self._enqueue(("audio", data))

    async def feed_channel(self, index: int, payload: bytes) -> None:
        """Frames of one channel only (Twilio sends each track on its own)."""
        self._check_open()
        if not 0 <= index < self.fmt.channels:
            raise bad("channel", f"no channel {index} in a {self.fmt.channels}-channel stream")
        width = self._frame_bytes // self.fmt.channels
        data = self._whole(index + 1, payload, width)
        self._account(index, len(data) // width)
        if data:
            await self._enqueue(("channel", index, data))

    def pause(self) -> None:
        """No audio until `resume` (AudioHook pause): the open utterances end, and the gap
        is not speech (BREAK_S of silence in each party's audio time)."""
        if self.state != "open" or self.paused:
            return
        self.paused = True
        for i in range(self.fmt.channels):
            self._stream_s[i] += BREAK_S
        self._put((_PAUSE,))

    def resume(self) -> None:
        self.paused = False

    async def finish(self, publish_summary: bool = True) -> dict:
        """Flush every party, wait for every final, publish and return the summary (only
        return it, without `seq`, when the call goes on elsewhere: client/live/moves.py)."""
        self._check_open()
        self.state = "finishing"
        self._audio_done = asyncio.get_running_loop().create_future()
        self._put((_FINISH,))
        await asyncio.shield(self._audio_done)
        self._raise_error()
        outcomes = await asyncio.gather(*list(self._final_tasks), return_exceptions=True)
        if self.state == "aborted":
            raise LiveError(CLOSE_INTERNAL, "aborted", "the session was aborted")
        if any(isinstance(o, BaseException) for o in outcomes):
            raise LiveError(CLOSE_INTERNAL, "internal", "an utterance's final failed")
        summary = self._summary()
        if publish_summary:
            summary = self._emit(summary)
        self.state = "done"
        return summary

    async def abort(self) -> None:
        """Stop at once (client gone, session closed): nothing more is published."""
        if self.state in ("done", "aborted"):
            return
        self.state = "aborted"
        self._ticks.forget(self)
        self._items = []
        tasks = list(self._final_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for i in range(self.fmt.channels):
            self.scheduler.forget((self._key, i))
        self._wake_feeders()

    # ------------------------------------------------------------- processing

    def _check_open(self) -> None:
        self._raise_error()
        if self.state != "open":
            raise bad("order", f"the session is {self.state}: no more audio or stop")

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if self.state == "aborted":
            raise LiveError(CLOSE_INTERNAL, "aborted", "the session was aborted")

    def _whole(self, slot: int, payload: bytes, width: int) -> bytes:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise bad("payload", "audio must be binary")
        if len(payload) > MAX_FEED_BYTES:
            raise LiveError(CLOSE_TOO_BIG, "too_big", f"audio message over {MAX_FEED_BYTES} bytes")
        data = self._remainder[slot] + bytes(payload)
        cut = len(data) - len(data) % width
        self._remainder[slot] = data[cut:]
        return data[:cut]

    def _account(self, index: int, samples: int) -> None:
        self._received[index] += samples
        self._stream_s[index] += samples / self.fmt.sample_rate

    def _full(self) -> bool:
        return self._error is None and (
            self._queued_bytes >= self._queue_limit
            or len(self._items) + self._ticking >= QUEUE_ITEMS
        )

    async def _enqueue(self, item: tuple) -> None:
        """Queue audio, waiting while QUEUE_AUDIO_S of it or QUEUE_ITEMS are queued."""
        while self.state == "open" and self._full():
            self._room.clear()
            await self._room.wait()
        self._check_open()  # it may have failed or ended while this waited
        self._queued_bytes += len(item[-1])
        self._put(item)

    def _put(self, item: tuple) -> None:
        """Queue an item for the next tick at once (pause and finish never wait)."""
        if not self._items:
            self._ticks.wake(self)
        self._items.append(item)

    def take_items(self) -> list[tuple]:
        """The ticks take what is queued (ticks.py): nothing once failed or aborted."""
        items, self._items = self._items, []
        if self._error is not None or self.state == "aborted":
            return []
        self._ticking = len(items)
        return items

    def ticked(self, items: list[tuple], result: list | BaseException) -> None:
        """The tick that took `items` is done: act on its actions, or fail the session."""
        self._ticking = 0
        self._queued_bytes -= sum(len(i[-1]) for i in items if i[0] in _AUDIO)
        self._room.set()
        if self.state == "aborted":
            return
        if isinstance(result, BaseException):
            self._fail(result)
        else:
            for index, action in result:
                self._act(index, action)
        if items[-1][0] == _FINISH or self._error is not None:
            self._audio_finished()

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, LiveError):
            self._error = exc
        else:
            self._error = LiveError(
                CLOSE_INTERNAL, "internal", f"audio processing failed: {type(exc).__name__}"
            )
        self._items = []
        self._wake_feeders()

    def _audio_finished(self) -> None:
        if self._audio_done is not None and not self._audio_done.done():
            self._audio_done.set_result(None)

    def _wake_feeders(self) -> None:
        """No more audio will be taken: feeds waiting for room raise instead of hanging."""
        self._queued_bytes = 0
        self._room.set()
        self._audio_finished()

    def prepare(self, items: list[tuple]) -> tuple[list[tuple[int, np.ndarray]], list[tuple]]:
        """Audio thread: each party's audio of `items` up to the first pause or finish,
        decoded (one chunk per party: its VAD runs batched with other streams'), and the
        items left (ticks.py)."""
        cut = next((i for i, item in enumerate(items) if item[0] not in _AUDIO), len(items))
        parts: list[list[np.ndarray]] = [[] for _ in self.parties]
        interleaved: list[bytes] = []

        def flush() -> None:
            if interleaved:
                samples = codecs.decode(b"".join(interleaved), self.fmt.encoding)
                for i, channel in enumerate(codecs.deinterleave(samples, self.fmt.channels)):
                    parts[i].append(channel)
                interleaved.clear()

        channel_bytes: dict[int, list[bytes]] = {}
        for item in items[:cut]:
            if item[0] == "audio":
                if channel_bytes:  # keep each party's order: what came first goes first
                    _decode_channels(channel_bytes, parts, self.fmt.encoding)
                interleaved.append(item[1])
            else:
                flush()
                channel_bytes.setdefault(item[1], []).append(item[2])
        flush()
        _decode_channels(channel_bytes, parts, self.fmt.encoding)
        pushes = [(i, p[0] if len(p) == 1 else np.concatenate(p)) for i, p in enumerate(parts) if p]
        return pushes, items[cut:]

    def process(self, items: list[tuple]) -> list[tuple[int, object]]:
        """Audio thread: decode, deinterleave and push every item, in order, one at a time
        (a tick's items from a pause or a finish on; ticks.py)."""
        out: list[tuple[int, object]] = []
        for item in items:
            pushes, rest = self.prepare([item]) if item[0] in _AUDIO else ([], [item])
            for index, samples in pushes:
                out.extend((index, a) for a in self.parties[index].push(samples))
            if rest and rest[0][0] == _PAUSE:
                for i, party in enumerate(self.parties):
                    out.extend((i, a) for a in party.pause())
            elif rest and rest[0][0] == _FINISH:
                for i, party in enumerate(self.parties):
                    out.extend((i, a) for a in party.finish())
        return out

    # ----------------------------------------------------------------- events

    def _act(self, index: int, action: object) -> None:
        party = self.fmt.parties[index]
        if isinstance(action, Start):
            start_s = action.start / SAMPLE_RATE
            heard_s = self.parties[index].samples / SAMPLE_RATE
            self._emit(
                {
                    "type": EVENT_UTTERANCE_START,
                    "party": party,
                    "start_s": _r(start_s),
                    "end_s": _r(max(start_s, heard_s)),
                    "utterance": action.utterance,
                }
            )
        elif isinstance(action, Window):
            self.scheduler.interim(
                (self._key, index),
                action.samples,
                functools.partial(self._on_interim, index, action),
                self._window_size,
                action.skipped,
            )
        elif isinstance(action, Final):
            self._finals_seen[index] = action.utterance
            task = asyncio.create_task(self._final(index, action, self._last_final[index]))
            self._last_final[index] = task
            self._final_tasks.add(task)
            task.add_done_callback(self._final_tasks.discard)

    def _on_interim(
        self, index: int, window: Window, prediction: Prediction | None, coalesced: int
    ) -> None:
        self.coalesced += coalesced
        if self.state in ("aborted", "done") or prediction is None:
            return
        if window.utterance <= self._finals_seen[index]:
            self.stale += 1
            self.scheduler.stats.stale += 1
            return
        party = self.fmt.parties[index]
        fields = _fields(segment_result(Segment(window.start, window.end), prediction, self.info))
        lag_s = max(0.0, self._stream_s[index] - window.end / SAMPLE_RATE)
        self._emit(
            {
                "type": EVENT_RESULT,
                "party": party,
                **fields,
                "utterance": window.utterance,
                "interim": True,
                "lag_s": _r(lag_s, 3),
                "coalesced": coalesced,
            }
        )
        if self._alerts is not None:
            for alert in self._alerts.update(
                party, fields["scores"], fields["start_s"], fields["end_s"]
            ):
                self._emit(alert)

    async def _final(self, index: int, final: Final, previous: asyncio.Task | None) -> None:
        error = None
        try:
            prediction = await self.scheduler.final(final.samples)
        except InferenceError as exc:
            prediction, error = None, f"the server refused this utterance: {exc}"
        except ServerError as exc:
            prediction, error = None, f"the server kept failing on this utterance: {exc}"
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)  # publish in order
        party = self.fmt.parties[index]
        event = {"type": EVENT_UTTERANCE_END, "party": party}
        if prediction is None:
            event |= {
                "start_s": _r(final.segment.start_s),
                "end_s": _r(final.segment.end_s),
                "emotion": None,
                "confidence": None,
                "scores": {},
                "error": error,
            }
        else:
            result = segment_result(final.segment, prediction, self.info)
            # The summary needs times and scores only: a 4 h call keeps ~1 KB per final.
            self._finals[index].append(replace(result, embedding=_NO_EMBEDDING))
            event |= _fields(result)
        # Audio received past the utterance's end (the merge gap included): the hub's
        # final-latency metric and the live load test read it.
        lag_s = max(0.0, self._stream_s[index] - final.segment.end / SAMPLE_RATE)
        self._emit(event | {"utterance": final.utterance, "lag_s": _r(lag_s, 3)})

    def _emit(self, event: dict) -> dict:
        """Publish `event` with `call_id` and the next `seq`; returns what was published."""
        if self.state == "aborted":
            return event
        self._seq += 1
        head = {"type": event.pop("type"), "call_id": self.call_id, "seq": self._seq}
        event = head | event
        self._publish(event)
        return event

    def _summary(self) -> dict:
        """Per party what `e2v classify` gives for the whole call, speech and overlap."""
        parties = []
        for i, party in enumerate(self.fmt.parties):
            duration_s = self.parties[i].samples / SAMPLE_RATE
            result = aggregate(party, duration_s, self._finals[i], self.info, {}).to_json()
            parties.append(
                {
                    "party": party,
                    "emotion": result["emotion"],
                    "confidence": result["confidence"],
                    "scores": result["scores"],
                    "segments": len(self._finals[i]),
                    "speech_s": _r(speech_s(self._finals[i])),
                    "no_speech": result["no_speech"],
                }
            )
        duration_s = max(p.samples for p in self.parties) / SAMPLE_RATE
        return {
            "type": EVENT_SUMMARY,
            "party": None,
            "start_s": 0.0,
            "end_s": _r(duration_s),
            "parties": parties,
            "overlap_s": _r(overlap_s(self._finals)),
            "duration_s": _r(duration_s),
            "coalesced": self.coalesced,
            "stale": self.stale,
            "model": self.info.name,
            "synthetic": self.info.synthetic,
        }


def _decode_channels(
    channel_bytes: dict[int, list[bytes]], parts: list[list[np.ndarray]], encoding: str
) -> None:
    """Each channel's queued bytes (one party's own frames), decoded onto its part."""
    for index, chunks in channel_bytes.items():
        parts[index].append(codecs.decode(b"".join(chunks), encoding))
    channel_bytes.clear()


def _fields(result: SegmentResult) -> dict:
    """start_s, end_s, emotion, confidence, scores: rounded as `e2v classify --json`."""
    (segment,) = FileResult(file="", segments=[result]).to_json()["segments"]
    return segment


def _r(value: float, digits: int = 6) -> float:
    return round(float(value), digits) if math.isfinite(value) else 0.0


def _alert_tracker(settings: LiveSettings, parties: tuple[str, ...], labels: list[str]):
    if not settings.alerts:
        return None
    from e2v.client.alerts import AlertTracker, parse_live_alerts

    try:
        rules = parse_live_alerts(settings.alerts, parties, labels)
        return AlertTracker(rules, settings.alert_windows)
    except ValueError as exc:
        raise bad("alerts", str(exc)) from None


__all__ = ["LiveError", "LiveSession", "LiveSettings", "StreamFormat", "audio_executor"]
