"""The live engine against the real tiny Triton server and the real `e2v classify`.

Finals must equal `e2v classify --segment vad` on the same audio (a recording longer than
one segment), for 8 kHz mu-law and 16 kHz PCM, mono and each party of a stereo call,
whatever the chunking; interims come on their grid and coalesce visibly under overload;
a Triton restart mid-call loses no final. Labels of the synthetic model are meaningless.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.client.audio import load_audio
from e2v.client.live import codecs
from e2v.client.live.party import BREAK_S, PartyStream
from e2v.client.live.scheduler import Scheduler
from e2v.client.live.session import LiveError, LiveSession, LiveSettings, StreamFormat
from e2v.client.segment import SegmentMode, segment_stream
from e2v.client.triton import TritonEmotionClient
from e2v.client.vad import FRAME
from test_live_codecs import g711_wav, wav_payload

from e2v.contract import (
    CLOSE_BAD_MESSAGE,
    EVENT_RESULT,
    EVENT_SUMMARY,
    EVENT_UTTERANCE_END,
    EVENT_UTTERANCE_START,
    SAMPLE_RATE,
)

E2V = [sys.executable, "-m", "e2v"]
VAD_FRAME_S = FRAME / SAMPLE_RATE
# Two parties of a call (> 30 s), with pauses shorter and longer than the 1 s merge gap.
CUSTOMER = [
    ("silence", 0.7), ("speech", 5.0), ("silence", 0.6), ("speech", 4.0), ("silence", 2.5),
    ("speech", 8.0), ("silence", 1.8), ("speech", 6.0), ("silence", 0.4), ("speech", 3.0),
    ("silence", 3.0), ("speech", 5.0), ("silence", 1.2),
]  # fmt: skip
AGENT = [
    ("silence", 4.0), ("speech", 3.0), ("silence", 6.0), ("speech", 7.0), ("silence", 1.5),
    ("speech", 2.5), ("silence", 8.0), ("speech", 6.0), ("silence", 3.2),
]  # fmt: skip


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    """Real files: mono 8 kHz mu-law, mono 16 kHz PCM, a stereo 8 kHz mu-law call and
    each of its channels extracted to a mono mu-law file (the same codes)."""
    root = tmp_path_factory.mktemp("live-calls")
    customer8, _ = fx.bursts(CUSTOMER, sr=8000, seed=10)
    agent8, _ = fx.bursts(AGENT, sr=8000, seed=40)
    agent8 = np.pad(agent8, (0, len(customer8) - len(agent8)))
    customer16, _ = fx.bursts(CUSTOMER, sr=16_000, seed=10)
    files = {
        "mulaw": fx.write_audio(root / "mono-mulaw.wav", customer8, 8000, "pcm_mulaw"),
        "alaw": fx.write_audio(root / "mono-alaw.wav", customer8, 8000, "pcm_alaw"),
        "pcm16": fx.write_audio(root / "mono-pcm16.wav", customer16, 16_000, "pcm_s16le"),
        "stereo": fx.write_audio(
            root / "stereo.wav", np.stack([customer8, agent8]), 8000, "pcm_mulaw"
        ),
    }
    stereo = wav_payload(files["stereo"])
    for i, name in enumerate(("customer", "agent")):
        files[name] = g711_wav(root / f"{name}.wav", stereo[i::2], "mulaw")
    return files


def classify_json(server, paths) -> dict[str, dict]:
    """The real CLI: `e2v classify --segment vad --json` -> {path: row}."""
    command = [*E2V, "classify", "--no-progress", "--segment", "vad", "--json"]
    command += ["--url", server.config.grpc_url, *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["file"]: row for row in rows}


async def run_session(
    url: str,
    payload: bytes,
    fmt: StreamFormat,
    settings: LiveSettings | None = None,
    max_in_flight: int = 16,
    seed: int = 0,
    client_retries: int = 12,
    between=None,
    speed: float | None = 8.0,
) -> tuple[list[dict], Scheduler]:
    """Feed `payload` in random-sized pieces (not frame aligned) at `speed` times real
    time (None: as fast as it goes); return the events."""
    events: list[dict] = []
    async with TritonEmotionClient(url, retries=client_retries, backoff_s=0.1) as client:
        scheduler = Scheduler(client, max_in_flight)
        session = LiveSession("call-1", fmt, settings or LiveSettings(), scheduler, client.info,
                              events.append)  # fmt: skip
        rng = np.random.default_rng(seed)
        position, started = 0, time.monotonic()
        bytes_per_s = fmt.frame_bytes * fmt.sample_rate
        while position < len(payload):
            size = int(rng.integers(1, 6000))
            await session.feed(payload[position : position + size])
            position += size
            if speed:
                ahead = position / bytes_per_s / speed - (time.monotonic() - started)
                await asyncio.sleep(max(0.0, ahead))
            if between is not None:
                await between(position / len(payload), session)
        summary = await session.finish()
        await scheduler.close()
    assert events[-1] == summary
    return events, scheduler


def finals(events: list[dict], party: str) -> list[dict]:
    return [e for e in events if e["type"] == EVENT_UTTERANCE_END and e["party"] == party]


def assert_same_segments(live: list[dict], offline: list[dict]) -> int:
    """Boundaries within one VAD frame; scores <= 1e-4 where boundaries are equal.
    Returns how many segments had equal boundaries."""
    assert len(live) == len(offline) >= 3
    equal = 0
    for got, want in zip(live, offline):
        assert abs(got["start_s"] - want["start_s"]) <= VAD_FRAME_S
        assert abs(got["end_s"] - want["end_s"]) <= VAD_FRAME_S
        if got["start_s"] == want["start_s"] and got["end_s"] == want["end_s"]:
            equal += 1
            assert got["scores"].keys() == want["scores"].keys()
            for label, score in want["scores"].items():
                assert abs(got["scores"][label] - score) <= 1e-4
            assert got["emotion"] == want["emotion"]
    return equal


def assert_well_formed(events: list[dict], parties: tuple[str, ...]) -> None:
    """seq 1..n; per party, utterances numbered from 1, each starting once, its results
    after its start and before its end, ending once, the ends in order (the next
    utterance may start before an end: the final is scored meanwhile); summary last."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["call_id"] == "call-1" for e in events)
    assert [e["type"] for e in events].count(EVENT_SUMMARY) == 1
    assert events[-1]["type"] == EVENT_SUMMARY
    for party in parties:
        mine = [e for e in events if e.get("party") == party]
        started, ended = [], []
        for event in mine:
            kind, number = event["type"], event.get("utterance")
            if kind == EVENT_UTTERANCE_START:
                assert number == len(started) + 1
                started.append(number)
            elif kind == EVENT_RESULT:
                assert event["interim"] and number in started and number not in ended
                assert event["end_s"] - event["start_s"] <= 3.0 + 1e-6
                assert event["lag_s"] >= 0 and event["coalesced"] >= 0
            elif kind == EVENT_UTTERANCE_END:
                assert number == len(ended) + 1 and number in started
                ended.append(number)
        assert started == ended


# ------------------------------------------------------------------- finals = offline


@pytest.mark.parametrize("kind", ["mulaw", "alaw", "pcm16"])
def test_finals_equal_classify_on_a_long_mono_recording(tiny_server, calls, kind):
    path = calls[kind]
    offline = classify_json(tiny_server, [path])[str(path)]
    assert offline["duration_s"] > 30 and len(offline["segments"]) >= 4
    encoding, rate = (kind, 8000) if kind != "pcm16" else ("pcm_s16le", 16_000)
    fmt = StreamFormat(encoding, rate, ("caller",))
    events, _ = asyncio.run(run_session(tiny_server.config.grpc_url, wav_payload(path), fmt))
    assert_well_formed(events, ("caller",))
    equal = assert_same_segments(finals(events, "caller"), offline["segments"])
    assert equal == len(offline["segments"])  # the same samples: the same cuts, every one
    (party,) = events[-1]["parties"]
    assert party["segments"] == len(offline["segments"]) and not party["no_speech"]
    assert party["emotion"] == offline["emotion"]
    for label, score in offline["scores"].items():
        assert abs(party["scores"][label] - score) <= 1e-4
    speech = sum(s["end_s"] - s["start_s"] for s in offline["segments"])
    assert party["speech_s"] == pytest.approx(speech, abs=1e-4)
    assert events[-1]["duration_s"] == pytest.approx(offline["duration_s"], abs=1e-3)
    results = [e for e in events if e["type"] == EVENT_RESULT]
    assert len(results) >= 10  # ~1 per second of speech


def test_each_party_of_a_stereo_call_equals_classify_on_its_channel(tiny_server, calls):
    offline = classify_json(tiny_server, [calls["customer"], calls["agent"]])
    fmt = StreamFormat("mulaw", 8000, ("customer", "agent"))
    # Two requests in flight for the whole call: overload, so interims coalesce.
    events, scheduler = asyncio.run(
        run_session(tiny_server.config.grpc_url, wav_payload(calls["stereo"]), fmt,
                    max_in_flight=1, seed=7)
    )  # fmt: skip
    assert_well_formed(events, fmt.parties)
    spans = {}
    for party in fmt.parties:
        want = offline[str(calls[party])]["segments"]
        assert assert_same_segments(finals(events, party), want) == len(want)
        spans[party] = [(s["start_s"], s["end_s"]) for s in want]
    summary = events[-1]
    for party, row in zip(summary["parties"], (offline[str(calls[p])] for p in fmt.parties)):
        assert party["emotion"] == row["emotion"] and party["segments"] == len(row["segments"])
        for label, score in row["scores"].items():
            assert abs(party["scores"][label] - score) <= 1e-4
    both = sum(
        max(0.0, min(a1, b1) - max(a0, b0))
        for a0, a1 in spans["customer"]
        for b0, b1 in spans["agent"]
    )
    assert both > 1 and summary["overlap_s"] == pytest.approx(both, abs=1e-4)
    results = [e for e in events if e["type"] == EVENT_RESULT]
    assert sum(e["coalesced"] for e in results) <= scheduler.stats.coalesced
    assert scheduler.stats.finals == sum(len(v["segments"]) for v in offline.values())


# ------------------------------------------------------------------ restart, overload


def test_a_triton_restart_mid_call_loses_no_final(tiny_cpu_repo, calls):
    """SIGKILL of tritonserver mid-call, the rest of the call sent while it is down, then
    a new server on the same ports: every final arrives, equal to the offline cut."""
    from servers import start_server

    from e2v.serve import TritonServer

    server = start_server(tiny_cpu_repo)
    state = {"down": False, "restarted": False}

    async def between(fraction: float, session: LiveSession) -> None:
        if fraction > 0.3 and not state["down"]:
            state["down"] = True
            await asyncio.to_thread(server.kill)
        elif fraction > 0.95 and not state["restarted"]:
            state["restarted"] = True
            await asyncio.sleep(2.0)  # finals cut while it is down are retrying now
            state["server"] = await asyncio.to_thread(TritonServer(server.config).start, 240)

    try:
        path = calls["pcm16"]
        fmt = StreamFormat("pcm_s16le", 16_000, ("caller",))
        events, scheduler = asyncio.run(
            run_session(server.config.grpc_url, wav_payload(path), fmt, client_retries=1,
                        between=between)
        )  # fmt: skip
    finally:
        server.kill()
        if "server" in state:
            state["server"].stop()
    expected = [s for s, _ in segment_stream([load_audio(path)], SegmentMode("vad"))]
    got = finals(events, "caller")
    assert [(e["start_s"], e["end_s"]) for e in got] == [
        (round(s.start_s, 6), round(s.end_s, 6)) for s in expected
    ]
    assert all(e["emotion"] and e["scores"] for e in got)
    assert scheduler.stats.final_retries > 0  # some were sent while it was down


def test_windows_of_concurrent_calls_are_batched_together_by_triton(tiny_server, calls):
    """Six stereo calls at once through one scheduler: Triton's dynamic batcher executes
    their windows in batches > 1, and every call still gets the same finals."""
    import tritonclient.http as httpclient

    stats = httpclient.InferenceServerClient(tiny_server.config.http_url)

    def batch_counts() -> dict[int, int]:
        model = stats.get_inference_statistics("emotion2vec")["model_stats"][0]
        return {b["batch_size"]: b["compute_infer"]["count"] for b in model["batch_stats"]}

    payload = wav_payload(calls["stereo"])
    fmt = StreamFormat("mulaw", 8000, ("customer", "agent"))

    async def run():
        async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
            scheduler = Scheduler(client, 32)
            logs = [[] for _ in range(6)]

            async def call(i: int) -> None:
                session = LiveSession("call-1", fmt, LiveSettings(hop_s=0.5), scheduler,
                                      client.info, logs[i].append)  # fmt: skip
                step = len(payload) // 200 // 2 * 2
                for position in range(0, len(payload), step):
                    await session.feed(payload[position : position + step])
                    await asyncio.sleep(0.02)
                await session.finish()

            await asyncio.gather(*(call(i) for i in range(6)))
            await scheduler.close()
            return logs

    before = batch_counts()
    logs = asyncio.run(run())
    grew = {size: n - before.get(size, 0) for size, n in batch_counts().items()}
    assert any(size > 1 and n > 0 for size, n in grew.items()), grew

    def ends(events: list[dict]) -> list[dict]:
        """Finals per party in utterance order (parties interleave as Triton answers)."""
        found = [e for e in events if e["type"] == EVENT_UTTERANCE_END]
        return sorted(found, key=lambda e: (e["party"], e["utterance"]))

    reference = ends(logs[0])
    assert len(reference) >= 6
    for events in logs:
        assert_well_formed(events, fmt.parties)
        got = ends(events)
        assert [(e["party"], e["start_s"], e["end_s"]) for e in got] == [
            (e["party"], e["start_s"], e["end_s"]) for e in reference
        ]
        for mine, want in zip(got, reference):
            for label, score in want["scores"].items():
                assert abs(mine["scores"][label] - score) <= 1e-4


def test_waiting_interims_are_replaced_by_newer_ones_and_finals_go_first(tiny_server):
    async def run():
        async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
            scheduler = Scheduler(client, max_in_flight=1)
            done: list[tuple[str, bool, int]] = []
            windows = [fx.speech_like(1.5, seed=i) for i in range(4)]

            def record(name):
                return lambda p, n: done.append((name, p is not None, n))

            scheduler.interim("a", windows[0], record("a0"), size=48_000)  # sent at once
            scheduler.interim("b", windows[1], record("b1"), size=48_000)  # waits
            scheduler.interim("b", windows[2], record("b2"), size=48_000)  # replaces b1
            final = asyncio.create_task(scheduler.final(windows[3]))
            await asyncio.sleep(0)
            assert scheduler.waiting == 2
            prediction = await final
            while len(done) < 2:
                await asyncio.sleep(0.01)
            order = [name for name, _, _ in done]
            await scheduler.close()
            return prediction, done, order, scheduler.stats

    prediction, done, order, stats = asyncio.run(run())
    assert prediction.scores is not None
    assert done == [("a0", True, 0), ("b2", True, 1)]  # b1 never sent, counted in b2
    assert stats.coalesced == 1 and stats.finals == 1 and stats.interims == 2


def test_a_party_has_one_interim_in_flight_so_overload_is_counted_not_queued(tiny_server):
    """Free slots do not let one party pile windows into Triton's queue: its next window
    waits for the one in flight and is coalesced if a newer one comes; other parties go."""

    async def run():
        async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
            scheduler = Scheduler(client, max_in_flight=4)
            done: list[tuple[str, bool, int]] = []
            windows = [fx.speech_like(1.5, seed=i) for i in range(4)]

            def record(name):
                return lambda p, n: done.append((name, p is not None, n))

            scheduler.interim("a", windows[0], record("a0"), size=48_000)  # sent at once
            scheduler.interim("a", windows[1], record("a1"), size=48_000)  # waits for a0
            scheduler.interim("b", windows[2], record("b0"), size=48_000)  # sent at once
            in_flight, waiting = scheduler.in_flight, scheduler.waiting
            scheduler.interim("a", windows[3], record("a2"), size=48_000)  # replaces a1
            while len(done) < 3:
                await asyncio.sleep(0.01)
            await scheduler.close()
            return in_flight, waiting, done, scheduler.stats

    in_flight, waiting, done, stats = asyncio.run(run())
    assert (in_flight, waiting) == (2, 1)
    assert sorted(done) == [("a0", True, 0), ("a2", True, 1), ("b0", True, 0)]
    assert done.index(("a0", True, 0)) < done.index(("a2", True, 1))
    assert stats.coalesced == 1 and stats.interims == 3


# ------------------------------------------------------------------ pause, bad input


def test_a_pause_ends_the_utterance_and_its_gap_is_not_speech(tiny_server):
    speech = fx.speech_like(3.0, sr=8000, seed=1)
    payload = codecs.encode(speech, "mulaw")
    fmt = StreamFormat("mulaw", 8000, ("caller",))
    events: list[dict] = []

    async def run():
        async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
            scheduler = Scheduler(client, 4)
            session = LiveSession("call-1", fmt, LiveSettings(), scheduler, client.info,
                                  events.append)  # fmt: skip
            await session.feed(payload)
            session.pause()
            assert session.paused
            session.resume()
            await session.feed(payload)
            await session.finish()

    asyncio.run(run())
    assert_well_formed(events, ("caller",))
    ends = finals(events, "caller")
    assert len(ends) == 2  # not merged across the pause
    assert ends[0]["end_s"] <= 3.0 + 0.1
    assert ends[1]["start_s"] >= 3.0 + BREAK_S - 0.1


def test_bad_formats_settings_and_order_are_refused_with_4400(tiny_server):
    for bad in (
        lambda: StreamFormat("opus", 8000, ("a",)),
        lambda: StreamFormat("mulaw", 44_100, ("a",)),
        lambda: StreamFormat("mulaw", 8000, ()),
        lambda: StreamFormat("mulaw", 8000, ("a", "a")),
        lambda: StreamFormat("mulaw", 8000, ("a", "b", "c")),
        lambda: StreamFormat("mulaw", 8000, ("customer:angry=0.1",)),  # breaks alert rules
        lambda: StreamFormat("mulaw", 8000, ["a"]),
        lambda: LiveSettings(window_s=0.2),
        lambda: LiveSettings(hop_s=float("nan")),
        lambda: LiveSettings(window_s="3"),
        lambda: LiveSettings(alert_windows=0),
        lambda: LiveSettings(alert_windows=True),
    ):
        with pytest.raises(LiveError) as caught:
            bad()
        assert caught.value.code == CLOSE_BAD_MESSAGE

    async def run():
        async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
            fmt = StreamFormat("pcm_s16le", 16_000, ("a", "b"))
            scheduler = Scheduler(client, 2)
            with pytest.raises(LiveError, match="alerts"):
                LiveSession("c", fmt, LiveSettings(alerts="nobody:angry=0.5"), scheduler,
                            client.info, print)  # fmt: skip
            events: list[dict] = []
            session = LiveSession("c", fmt, LiveSettings(), scheduler, client.info, events.append)
            await session.feed(b"\x01\x02\x03")  # under one frame: kept for the next
            with pytest.raises(LiveError):
                await session.feed("text")
            with pytest.raises(LiveError):
                await session.feed_channel(2, b"\0\0")
            summary = await session.finish()
            with pytest.raises(LiveError) as caught:
                await session.feed(b"\0\0\0\0")
            assert caught.value.code == CLOSE_BAD_MESSAGE
            await session.abort()
            return events, summary

    events, summary = asyncio.run(run())
    assert events == [summary]
    assert all(p["no_speech"] and p["segments"] == 0 for p in summary["parties"])


# ------------------------------------------------------------- cutter, party, memory


def test_the_resampler_gives_the_same_samples_in_any_chunking():
    """The batch path's Resampler, pushed 20 ms at a time or in random pieces, gives the
    samples of one whole-run resampling; it refuses audio after its flush."""
    from e2v.client.audio import Resampler

    wav = fx.speech_like(4.0, sr=8000, seed=6)
    whole = Resampler(8000)
    reference = np.concatenate([whole.push(wav), whole.flush()])
    assert abs(len(reference) - 2 * len(wav)) <= 1
    rng = np.random.default_rng(1)
    for sizes in (np.full(200, 160), rng.integers(1, 900, 200)):
        resampler, out, position = Resampler(8000), [], 0
        for size in sizes:
            out.append(resampler.push(wav[position : position + size]))
            position += size
        out += [resampler.push(wav[position:]), resampler.flush()]
        np.testing.assert_array_equal(np.concatenate(out), reference)  # bit for bit
    with pytest.raises(ValueError, match="after flush"):
        resampler.push(wav[:10])
    same = Resampler(16_000)
    assert same.push(wav) is wav and same.flush().size == 0


def party_finals(wav: np.ndarray, rate: int, seed: int, max_chunk: int = 3000):
    """PartyStream's finals and start actions for `wav` pushed in random-sized chunks."""
    from e2v.client.live.party import Final, Start

    party = PartyStream(rate, 3.0, 1.0)
    rng = np.random.default_rng(seed)
    actions, position, most = [], 0, 0
    while position < len(wav):
        size = int(rng.integers(1, max_chunk))
        actions += party.push(wav[position : position + size])
        position += size
        most = max(most, party.cutter.retained)
    actions += party.finish()
    ends = [(a.segment.start, a.segment.end) for a in actions if isinstance(a, Final)]
    starts = [a for a in actions if isinstance(a, Start)]
    return ends, starts, most


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_party_finals_are_the_batch_cut_of_the_same_audio_in_any_chunking(seed):
    wav, _ = fx.bursts(CUSTOMER, sr=16_000, seed=seed)
    batch = [(s.start, s.end) for s, _ in segment_stream([wav], SegmentMode("vad"))]
    ends, starts, _ = party_finals(wav, 16_000, seed)
    assert ends == batch and len(batch) >= 4
    assert [s.utterance for s in starts] == list(range(1, len(batch) + 1))
    # A start is announced at (or, padded, just before) the final's start.
    for start, (first, _) in zip(starts, ends):
        assert first <= start.start <= first + FRAME


def test_windows_run_on_a_grid_during_speech_and_count_the_ones_a_big_push_skips():
    from e2v.client.live.party import Window

    wav, spans = fx.bursts([("silence", 1.0), ("speech", 9.0), ("silence", 2.5)], seed=1)
    small, big = PartyStream(16_000, 3.0, 0.5), PartyStream(16_000, 3.0, 0.5)
    fine = [a for i in range(0, len(wav), 320) for a in small.push(wav[i : i + 320])]
    coarse = [a for i in range(0, len(wav), 40_000) for a in big.push(wav[i : i + 40_000])]
    fine = [a for a in fine if isinstance(a, Window)]
    coarse = [a for a in coarse if isinstance(a, Window)]
    assert all(w.skipped == 0 for w in fine) and len(fine) >= 14  # every 0.5 s of speech
    steps = {b.end - a.end for a, b in zip(fine, fine[1:])}
    assert steps == {8000}  # on the grid, 0.5 s apart
    assert all(w.end - w.start <= 48_000 and w.end <= spans[0][1] + 8000 for w in fine)
    # 2.5 s pushes: each window stands for the ones due in its push, on the same grid.
    assert {w.end for w in coarse} <= {w.end for w in fine}
    assert sum(1 + w.skipped for w in coarse) == pytest.approx(len(fine), abs=2)
    assert any(w.skipped >= 3 for w in coarse)


def test_live_cutting_sends_short_clips_as_vad_segments_not_whole():
    from e2v.client.segment import SegmentCutter

    wav, spans = fx.bursts([("silence", 1.0), ("speech", 3.0), ("silence", 2.0),
                            ("speech", 2.0), ("silence", 1.0)], seed=4)  # fmt: skip
    whole = [s for s, _ in segment_stream([wav], SegmentMode("vad"))]
    assert [(s.start, s.end) for s in whole] == [(0, len(wav))]  # classify: one clip
    cutter = SegmentCutter(SegmentMode("vad"), early=False)
    early_out = []
    for i in range(0, len(wav), 1600):
        early_out += [s for s, _ in cutter.push(wav[i : i + 1600])]
        if cutter.speaking:
            assert cutter.open_start is not None
    assert len(early_out) == 1  # the first utterance is out before the stream ends
    cut = early_out + [s for s, _ in cutter.finish()]
    assert len(cut) == 2 and cut[0].end <= spans[1][0] and cut[1].start >= spans[0][1]


def test_memory_per_party_is_bounded_by_a_segment_and_the_merge_gap():
    """Ten minutes of talk with pauses: the audio retained never exceeds one segment
    (30 s) plus the merge gap and padding, however long the call."""
    pattern = [("speech", 6.0), ("silence", 0.5), ("speech", 9.0), ("silence", 2.0)] * 34
    wav, _ = fx.bursts(pattern, sr=8000, seed=9)
    assert len(wav) / 8000 > 590
    _, _, most = party_finals(wav, 8000, seed=0, max_chunk=4000)
    assert most <= (30.0 + 1.0 + 0.5) * SAMPLE_RATE


def test_a_session_behind_waits_in_feed_and_abort_releases_it(tiny_server):
    """Back-pressure: with the audio threads busy, feed() stops returning once 5 s of
    audio are queued; abort() makes the waiting feed raise at once, and nothing leaks."""
    import concurrent.futures
    import threading

    fmt = StreamFormat("mulaw", 8000, ("caller",))
    half_second = codecs.encode(fx.speech_like(0.5, sr=8000, seed=2), "mulaw")

    async def run():
        pool = concurrent.futures.ThreadPoolExecutor(1)
        gate = threading.Event()
        pool.submit(gate.wait, 30)  # the only audio thread is busy
        try:
            async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
                scheduler = Scheduler(client, 2)
                session = LiveSession("call-1", fmt, LiveSettings(), scheduler, client.info,
                                      lambda e: None, executor=pool)  # fmt: skip
                fed = 0
                while fed < 40:
                    try:
                        await asyncio.wait_for(session.feed(half_second), 0.5)
                    except asyncio.TimeoutError:
                        break
                    fed += 1
                blocked = asyncio.create_task(session.feed(half_second))
                await asyncio.sleep(0.2)
                assert not blocked.done()
                await session.abort()
                with pytest.raises(LiveError):
                    await asyncio.wait_for(blocked, 2)
                await scheduler.close()
                return fed
        finally:
            gate.set()
            pool.shutdown(wait=True)

    fed = asyncio.run(run())
    assert 9 <= fed <= 12  # 5 s of audio queued (the first batch is taken by the pump)


# ------------------------------------------------------------------- per-channel CPU


def test_channels_per_core(calls):
    """Decode + deinterleave + resample + VAD + cutting of 20 ms frames, as a gateway
    thread does it: prints the channels one core keeps up with at real time."""
    payload = wav_payload(calls["stereo"])
    frame = 8000 * 2 // 50  # 20 ms of stereo mu-law
    parties = [PartyStream(8000, 3.0, 1.0) for _ in range(2)]
    started = time.thread_time()
    for i in range(0, len(payload), frame):
        samples = codecs.decode(payload[i : i + frame], "mulaw")
        for party, channel in zip(parties, codecs.deinterleave(samples, 2)):
            party.push(channel)
    for party in parties:
        party.finish()
    cpu_s = time.thread_time() - started
    audio_s = 2 * len(payload) / 2 / 8000
    per_core = audio_s / cpu_s
    print(f"\nlive engine: {per_core:.0f} channels per core (20 ms frames, 8 kHz mu-law)")
    assert per_core > 50
