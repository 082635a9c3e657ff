"""`e2v loadtest --live`: real call recordings, a real gateway in front of a real tiny Triton,
a real WebSocket client; the report's structure and every final owed arriving."""

from __future__ import annotations

import json

import numpy as np
import pytest
from e2v.loadtest.calls import PARTIES, RATE, make_calls, offline_utterances
from e2v.loadtest.live import CallLog, ws_url
from e2v.loadtest.live_run import parse_channels
from e2v.loadtest.metrics import percentiles


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    return make_calls(tmp_path_factory.mktemp("calls"), 2, 20.0)


def test_call_recordings_are_stereo_mulaw_with_two_parties_taking_turns(calls):
    import av

    call = calls[0]
    with av.open(str(call.path)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.rate, stream.channels) == ("pcm_mulaw", RATE, 2)
    assert call.duration_s == pytest.approx(20.0, abs=0.01)
    assert len(call.tracks) == len(PARTIES)
    utterances = [offline_utterances(track) for track in call.tracks]
    assert all(len(u) >= 2 for u in utterances), utterances
    # Turns: the parties mostly speak at different times.
    speaking = [np.zeros(len(call.tracks[0]), bool) for _ in PARTIES]
    for mask, party in zip(speaking, utterances, strict=True):
        for segment in party:
            mask[segment.start : segment.end] = True
    assert (speaking[0] & speaking[1]).mean() < 0.5 * min(m.mean() for m in speaking)
    assert calls[1].payload != call.payload  # distinct calls


def test_frame_times_and_percentiles():
    log = CallLog(0, 0, "c", sent=[1.0, 1.1, 1.2], frame_samples=800)  # 100 ms frames
    assert log.sent_at(0.05) == 1.0 and log.sent_at(0.1) == 1.0  # sample 799: frame 0
    assert log.sent_at(0.1001) == 1.1 and log.sent_at(9.0) == 1.2  # past the end: the last
    figures = percentiles([10.0] * 99 + [1000.0])  # milliseconds
    assert figures["count"] == 100 and figures["p50"] == 10.0 and figures["max"] == 1000.0
    assert percentiles([]) == {"count": 0}
    assert ws_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/v1/live"
    assert ws_url("wss://gw.example.com/v1/live") == "wss://gw.example.com/v1/live"
    assert parse_channels("10,20") == [10, 20]
    for bad in ("0", "x", "", "20000"):
        with pytest.raises(ValueError):
            parse_channels(bad)


@pytest.mark.parametrize(
    "args",
    [
        ["--channels", "0"],
        ["--duration", "3"],
        ["--frame-ms", "5"],
        ["--gateway"],
        ["--configs", "2y1"],
        ["--protocols", "live,sip"],
    ],
)
def test_bad_arguments_exit_2(args, tmp_path, capsys):
    from e2v.cli import main

    assert main(["loadtest", "--live", "--report", str(tmp_path / "r"), *args]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_live_load_test_against_a_real_gateway(tiny_server, tmp_path):
    from e2v.cli import main

    report = tmp_path / "report"
    code = main(
        [
            "loadtest",
            "--live",
            "--url",
            tiny_server.config.grpc_url,
            "--stats-url",
            tiny_server.config.http_url,
            "--model",
            "synthetic:tiny",
            "--channels",
            "3",
            "--duration",
            "14",
            "--calls",
            "2",
            "--call-s",
            "20",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    (level,) = summary["levels"]
    assert level["channels"] == 3
    assert level["sessions"]["failed"] == 0 and level["sessions"]["ok"] >= 3, level["sessions"]
    finals = level["finals"]
    assert finals["expected"] >= 3 and finals["lost"] == 0, finals  # every final arrived
    assert finals["arrived"] >= finals["expected"] and finals["interims_per_speech_s"] > 0
    for key in ("interim_latency_ms", "final_latency_ms", "final_since_end_ms"):
        figures = level[key]
        assert figures["count"] > 0 and 0 < figures["p50"] <= figures["p95"] <= figures["p99"]
    # The merge gap: a final cannot come before its utterance has been silent for 1 s.
    assert level["final_since_end_ms"]["p50"] > 900
    assert level["gateway_cores"] > 0 and level["channels_per_core"] > 0
    assert level["triton"]["success"] > 0 and level["triton"]["avg_batch_size"] >= 1
    assert level["load_average"][0] >= 0 and isinstance(level["within_target"], bool)
    assert isinstance(level["sustained"], bool) and "capacity_channels" in summary
    assert summary["synthetic"] is True and summary["workload"]["recordings"] == 2
    text = (report / "README.md").read_text()
    assert text.splitlines()[0].endswith("(SYNTHETIC model: random weights)")
    assert "| channels | calls ok / failed |" in text and "load average" in text
    assert summary["machine"].split("(")[1].split(")")[0] in text  # the CPU model is named


def test_calls_the_gateway_refuses_are_counted_with_its_close_code(tiny_server, tmp_path):
    """A gateway that takes one live session: the second line's calls are refused, and the
    report counts them by the gateway's close code and reason (not as client errors),
    while the call it took completes with every final."""
    from e2v.loadtest.gateway_process import GatewayProcess

    from e2v.cli import main

    flags = ("--live-sessions", "1", "--max-connections-per-client", "0")
    with GatewayProcess(tiny_server.config.grpc_url, *flags).start() as gateway:
        report = tmp_path / "report"
        arguments = ["loadtest", "--live", "--live-url", gateway.url, "--gateway-pid"]
        arguments += [str(gateway.pid), "--channels", "2", "--duration", "8", "--calls", "1"]
        assert main([*arguments, "--call-s", "6", "--report", str(report)]) == 0
    (level,) = json.loads((report / "summary.json").read_text())["levels"]
    sessions = level["sessions"]
    refused = {k: n for k, n in sessions["closes"].items() if k != "1000"}
    assert sessions["ok"] >= 1 and sessions["failed"] >= 1, sessions
    assert refused and all(k.startswith("1013 ") for k in refused), sessions
    assert level["finals"]["expected"] >= 1 and level["finals"]["lost"] == 0, level["finals"]
    assert level["gateway_cores"] > 0


def test_every_protocol_is_loaded_and_profiled_in_one_run(tiny_server, tmp_path):
    """--protocols: each level once per protocol through the player's own clients (Twilio's
    results from the call's subscription); --cpu-profile: py-spy's stacks of the gateway,
    its CPU per channel-second by stage adding up to what /proc measured."""
    from e2v.loadtest.cpu_profile import STAGES, read_stacks

    from e2v.cli import main

    report = tmp_path / "report"
    arguments = ["loadtest", "--live", "--url", tiny_server.config.grpc_url, "--stats-url"]
    arguments += [tiny_server.config.http_url, "--model", "synthetic:tiny", "--channels", "2"]
    arguments += ["--duration", "12", "--calls", "1", "--call-s", "9", "--cpu-profile"]
    code = main([*arguments, "--protocols", "live,twilio,audiohook", "--report", str(report)])
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    assert [lv["protocol"] for lv in summary["levels"]] == ["live", "twilio", "audiohook"]
    for level in summary["levels"]:
        assert level["sessions"]["failed"] == 0 and level["sessions"]["ok"] >= 2, level
        assert level["finals"]["expected"] >= 2 and level["finals"]["lost"] == 0, level["finals"]
        profile = level["cpu_profile"]
        assert read_stacks(report / profile["file"]).count("thread (") > 10
        stages = profile["stages"]
        assert list(stages) == list(STAGES) and stages["VAD"]["ms_per_channel_s"] > 0
        measured = 1000 * level["gateway_cores"] / level["channels"]
        total = sum(v["ms_per_channel_s"] for v in stages.values())
        assert total == pytest.approx(measured, rel=0.25)  # threads vs process, same window
    assert {r["protocol"] for r in summary["protocols"]} == {"live", "twilio", "audiohook"}
    text = (report / "README.md").read_text()
    assert "`/v1/live`, `/v1/twilio`, `/v1/audiohook`" in text.splitlines()[0]
    assert "## Protocols" in text and "## Where the gateway's CPU goes" in text


def test_stacks_are_charged_to_the_stage_of_their_innermost_named_frame():
    from e2v.loadtest.cpu_profile import (
        AUDIO,
        EVENTS,
        RECEIVE,
        REST,
        TRITON,
        VAD,
        WAIT,
        stage_cpu,
        thread_samples,
    )

    loop = "thread (7): MainThread;run_forever (asyncio/base_events.py:607)"
    audio = "thread (8): e2v-live_0;run_tick (client/live/ticks.py:120)"
    raw = "\n".join(
        [
            f"{loop};EpollSelector.select (selectors.py:468) 10",
            f"{loop};TwilioWire.message (client/live/twilio.py:200);loads (json/__init__.py:346) 5",
            f"{loop};Outbox.put (client/live/outbox.py:60);dumps (json/__init__.py:238) 3",
            f"{loop};TritonEmotionClient.predict (client/triton.py:211) 2",
            f"{loop};WebSocket.send (starlette/websockets.py:80);"
            "WebSocketsSansIOProtocol.send (uvicorn/protocols/websockets/x.py:439) 4",
            f"{loop};WebSocketsSansIOProtocol.data_received "
            "(uvicorn/protocols/websockets/x.py:188) 6",
            f"{audio};push_parties (client/live/party.py:200);"
            "feed_streams (client/vad.py:207);Session.run (onnxruntime/capi/x.py:402) 30",
            f"{audio};LiveSession.prepare (client/live/session.py:380);"
            "decode (client/live/codecs.py:60) 10",
        ]
    )
    samples = thread_samples(raw)
    assert samples[7] == {WAIT: 10, RECEIVE: 11, EVENTS: 7, TRITON: 2}
    assert samples[8] == {VAD: 30, AUDIO: 10}
    before = {7: ("MainThread", 1.0), 8: ("e2v-live_0", 2.0), 9: ("grpc_global_tim", 0.0)}
    after = {7: ("MainThread", 4.0), 8: ("e2v-live_0", 6.0), 9: ("grpc_global_tim", 0.5)}
    cpu = stage_cpu(raw, before, after)
    assert cpu[VAD] == pytest.approx(3.0) and cpu[AUDIO] == pytest.approx(1.0)
    assert cpu[REST] == 0  # the loop's poll is waiting, not work: no share of its CPU
    assert cpu[RECEIVE] == pytest.approx(3.0 * 11 / 20)
    assert cpu[TRITON] == pytest.approx(3.0 * 2 / 20 + 0.5)  # gRPC's own thread by name
    assert sum(cpu.values()) == pytest.approx(7.5)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--replicas", "2"], "add --bus"),
        (["--bus"], "--replicas must be in 2-16"),
        (["--replicas", "2", "--bus", "--channels", "2,4"], "one --channels level"),
        (["--replicas", "2", "--bus", "--rounds", "0"], "--rounds"),
    ],
)
def test_fleet_arguments_that_cannot_work_exit_2(args, why, tmp_path, capsys):
    from e2v.cli import main

    assert main(["loadtest", "--live", "--report", str(tmp_path / "r"), *args]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fleet_load_test_spreads_calls_over_replicas_on_a_real_nats(tiny_server, tmp_path):
    """`--replicas 2 --bus`: a local NATS server, two gateway replicas per arm; every event
    a caller got reached its subscriber on the other replica (and, in process, on its own),
    the added latency and each arm's CPU are reported."""
    from e2v.cli import main

    report = tmp_path / "report"
    arguments = ["loadtest", "--live", "--replicas", "2", "--bus", "--rounds", "1"]
    arguments += ["--url", tiny_server.config.grpc_url, "--stats-url", tiny_server.config.http_url]
    arguments += ["--model", "synthetic:tiny", "--channels", "2", "--duration", "12"]
    assert main([*arguments, "--calls", "2", "--call-s", "8", "--report", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert [run["arm"] for run in summary["runs"]] == ["bus", "in process"]
    for run in summary["runs"]:
        bus = run["bus"]
        assert run["sessions"]["failed"] == 0 and bus["calls_complete"] >= 2, run["sessions"]
        assert bus["events_published"] > 0 and bus["events_lost"] == 0, bus
        assert bus["events_delivered"] == bus["events_published"]
        assert bus["subscribers_failed"] == 0
        added = bus["added_latency_ms"]
        assert added["count"] == bus["events_delivered"] and added["p50"] <= added["p95"]
        assert run["gateway_cores"] > 0
    assert summary["runs"][0]["bus_server_cores"] > 0  # NATS worked for the bus arm only
    assert summary["runs"][1]["bus_server_cores"] is None
    medians = summary["medians"]
    assert medians["bus"]["events_lost"] == 0 and medians["bus"]["millicores_per_channel"] > 0
    text = (report / "README.md").read_text()
    assert "--replicas 2 --bus --rounds 1" in text and "| events lost (all runs) | 0 | 0 |" in text
