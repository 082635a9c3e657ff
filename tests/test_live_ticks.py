"""Live audio in ticks (client/live/ticks.py): many sessions' audio in one step, the VAD of
all their party streams batched, each session's failure its own; interim windows due as
soon as their audio has arrived (the raw tail), finals the exact samples'."""

from __future__ import annotations

import asyncio
import contextlib

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.client.live import codecs
from e2v.client.live.party import Final, PartyStream, Window, push_parties
from e2v.client.live.scheduler import Scheduler
from e2v.client.live.session import LiveError, LiveSession, LiveSettings, StreamFormat
from e2v.client.live.ticks import ticks_for
from e2v.client.triton import TritonEmotionClient

from e2v.contract import CLOSE_INTERNAL, EVENT_UTTERANCE_END, SAMPLE_RATE

TALK = [("silence", 0.6), ("speech", 4.0), ("silence", 1.5), ("speech", 3.5), ("silence", 1.6)]


def test_parties_pushed_together_cut_what_each_cuts_alone():
    """push_parties (one batched VAD call for all) gives each party the actions it gets
    pushed on its own, bit for bit; a party whose cut raises gets its exception, alone."""
    waves = [fx.bursts(TALK, sr=8000, seed=s)[0] for s in (1, 2, 3)]
    alone = [PartyStream(8000, 3.0, 1.0) for _ in waves]
    together = [PartyStream(8000, 3.0, 1.0) for _ in waves]
    got_alone, got_together = [[] for _ in waves], [[] for _ in waves]
    for i in range(0, len(waves[0]), 800):  # 100 ms
        chunks = [w[i : i + 800] for w in waves]
        for k, (party, chunk) in enumerate(zip(alone, chunks)):
            got_alone[k] += party.push(chunk)
        for k, actions in enumerate(push_parties(together, chunks)):
            got_together[k] += actions
    for mine, theirs in zip(got_together, got_alone):
        assert [type(a) for a in mine] == [type(a) for a in theirs]
        for a, b in zip(mine, theirs):
            if isinstance(a, (Final, Window)):
                assert np.array_equal(a.samples, b.samples)
    assert sum(isinstance(a, Final) for a in got_together[0]) >= 1

    def boom(*args):
        raise ValueError("a bug in one party's cut")

    together[1]._after = boom  # its cut raises: only its own result says so
    out = push_parties(together, [w[:800] for w in waves])
    assert isinstance(out[1], Exception)
    assert not isinstance(out[0], Exception) and not isinstance(out[2], Exception)


def test_interim_windows_are_due_when_their_audio_arrives():
    """At 8 kHz the exact resampler holds back 17-111 ms; windows read the raw tail, so
    each is out in the push whose audio completes it, and its samples up to the exact
    resampler's end are the exact ones (the rest: the received audio, interpolated)."""
    wav, _ = fx.bursts([("silence", 0.5), ("speech", 9.0), ("silence", 2.0)], sr=8000, seed=3)
    party, exact = PartyStream(8000, 3.0, 1.0), PartyStream(8000, 3.0, 1.0)
    exact.tail = None  # the exact samples alone: windows wait for the resampler
    late, windows, exact_windows = [], [], []
    for i in range(0, len(wav), 800):
        heard = (i + len(wav[i : i + 800])) * 2  # 16 kHz samples received so far
        for action in party.push(wav[i : i + 800]):
            if isinstance(action, Window):
                windows.append(action)
                assert heard - 1600 < action.end <= heard  # due within this push's audio
        for action in exact.push(wav[i : i + 800]):
            if isinstance(action, Window):
                exact_windows.append(action)
                late.append(heard - action.end)
    assert len(windows) >= 4 and [w.end for w in windows] == [w.end for w in exact_windows]
    assert max(late) >= 1600  # without the tail, some wait for the next 100 ms message
    for early, slow in zip(windows, exact_windows):
        assert early.start == slow.start
        same = len(early.samples) - 2 * 111 * 16  # at most ~111 ms come from the tail
        np.testing.assert_array_equal(early.samples[:same], slow.samples[:same])
        np.testing.assert_allclose(early.samples, slow.samples, atol=0.05)
    assert party.tail.end - party.cutter.end <= 2 * 112 * 8  # the tail is bounded


def test_a_session_that_fails_in_a_tick_fails_alone(tiny_server):
    """Two sessions' audio in the same ticks; one's decode raises: it ends with an internal
    error, the other finishes with every final."""
    fmt = StreamFormat("mulaw", 8000, ("caller",))
    payload = codecs.encode(fx.bursts(TALK, sr=8000, seed=5)[0], "mulaw")

    async def run():
        events: list[dict] = []
        async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
            scheduler = Scheduler(client, 8)
            good = LiveSession("good", fmt, LiveSettings(), scheduler, client.info, events.append)
            bad = LiveSession("bad", fmt, LiveSettings(), scheduler, client.info, lambda e: None)

            def broken(items):
                raise ValueError("a bug in one session's decode")

            bad.prepare = broken
            for i in range(0, len(payload), 1600):
                await good.feed(payload[i : i + 1600])
                with contextlib.suppress(LiveError):
                    await bad.feed(payload[i : i + 1600])
                await asyncio.sleep(0.02)
            assert ticks_for(good._executor) is ticks_for(bad._executor)
            summary = await good.finish()
            with pytest.raises(LiveError) as failed:
                await bad.finish()
            await scheduler.close()
            return events, summary, failed.value

    events, summary, error = asyncio.run(run())
    assert error.code == CLOSE_INTERNAL and "ValueError" in str(error)
    finals = [e for e in events if e["type"] == EVENT_UTTERANCE_END]
    assert len(finals) == 2 and all(e["emotion"] for e in finals)
    assert summary["duration_s"] == pytest.approx(len(payload) / 8000, abs=0.1)
    assert summary["parties"][0]["segments"] == 2
    assert SAMPLE_RATE == 16_000
