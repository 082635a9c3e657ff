"""Load tests: profiles, metrics and cost with real numbers; a bounded smoke load test
against the real local tritonserver (synthetic:tiny) checked against Triton's counters."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from e2v.loadtest.metrics import (
    Requests,
    cost_per_1000_audio_hours,
    ramp_steps,
    saturation,
    summarize,
)
from e2v.loadtest.profiles import ProfileError, available_profiles, clip_lengths, load_profile
from e2v.loadtest.spec import Ramp

from e2v.contract import LENGTH_BUCKETS_S, MODEL_NAME, SAMPLE_RATE, bucket_samples

# ------------------------------------------------------------------- profiles and numbers


def test_shipped_profiles_load_and_respect_their_ranges():
    assert {"call-centre", "fixed-3s", "long"} <= set(available_profiles())
    for name in available_profiles():
        profile = load_profile(name)
        seconds = clip_lengths(profile) / SAMPLE_RATE
        assert len(seconds) == profile.clips
        assert seconds.min() >= min(r.min_s for r in profile.lengths) - 1e-4
        assert seconds.max() <= max(r.max_s for r in profile.lengths) + 1e-4
        assert np.array_equal(clip_lengths(profile), clip_lengths(profile))  # seeded


def test_profile_shapes():
    call = clip_lengths(load_profile("call-centre"), 2000) / SAMPLE_RATE
    assert call.min() >= 1.0 and call.max() <= 20.0
    assert np.median(call) < call.mean()  # skewed towards short utterances
    assert (call <= 4.0).mean() > 0.5
    assert load_profile("call-centre").mean_s == pytest.approx(5.05, abs=0.01)
    assert set(clip_lengths(load_profile("fixed-3s")) / SAMPLE_RATE) == {3.0}
    long = clip_lengths(load_profile("long")) / SAMPLE_RATE
    assert long.min() >= 20.0 and long.max() <= 30.0


def test_profile_errors_are_one_line(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*call-centre"):
        load_profile("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "lengths": [{"min_s": 5, "max_s": 40, "weight": 1}]}))
    with pytest.raises(ProfileError, match="5-40 s"):
        load_profile(bad)
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="invalid profile"):
        load_profile(bad)


def test_cost_per_1000_audio_hours():
    # 5 audio seconds per second: 1,000 audio hours take 200 machine hours at USD 0.10.
    assert cost_per_1000_audio_hours(0.10, 5.0) == pytest.approx(20.0)
    # Real time (1x) on a USD 2.50/h GPU machine: 1,000 machine hours.
    assert cost_per_1000_audio_hours(2.50, 1.0) == pytest.approx(2500.0)
    assert cost_per_1000_audio_hours(1.0, 250.0) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        cost_per_1000_audio_hours(1.0, 0.0)


def _write_requests(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("end_s", "latency_ms", "audio_s", "bucket", "ok", "users", "error"))
        writer.writerows(rows)
    return path


def test_summary_from_a_request_log(tmp_path):
    # 10 s window: 100 successes of 3 s audio with latencies 1..100 ms, one failure, and
    # one request completed after the window (drain) that must not count.
    rows = [(0.1 * (i + 1), i + 1, 3.0, "3s", 1, 4, "") for i in range(100)]
    rows += [(5.0, 9999, 3.0, "3s", 0, 4, "queue full"), (10.5, 50, 3.0, "3s", 1, 4, "")]
    summary = summarize(Requests.read(_write_requests(tmp_path / "r.csv", rows)), 4, 10.0)
    assert (summary.requests, summary.failures) == (100, 1)
    assert summary.requests_per_s == pytest.approx(10.0)
    assert summary.audio_s_per_s == pytest.approx(30.0)
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p95_ms == pytest.approx(95.05)
    assert summary.max_ms == 100


def test_ramp_levels_and_saturation(tmp_path):
    ramp = Ramp.parse("1,1,3", step_s=10.0)
    assert ramp.levels == [1, 2, 3] and ramp.duration_s == 30.0
    # 15, 30 and 31 completions of 1 s audio in each level's measured 7.5 s (the first
    # quarter of each 10 s level is skipped); latency doubles at the last level.
    rows = []
    for level, (count, latency) in enumerate(((15, 100), (30, 100), (31, 200))):
        rows += [
            (level * 10 + 2.5 + 7.5 * (i + 1) / count, latency, 1.0, "1s", 1, level + 1, "")
            for i in range(count)
        ]
    steps = ramp_steps(Requests.read(_write_requests(tmp_path / "r.csv", rows)), ramp)
    assert [round(s.audio_s_per_s, 2) for s in steps] == [2.0, 4.0, 4.13]
    assert [s.p50_ms for s in steps] == [100, 100, 200]
    assert saturation(steps).users == 2  # within 5% of the best: more users only add latency
    with pytest.raises(ValueError):
        Ramp.parse("3,1,2", 10.0)


def test_workload_is_decoded_cut_and_bucket_padded(tmp_path):
    from e2v.loadtest.workload import Workload, prepare_workload

    profile_path = tmp_path / "mixed.json"
    profile_path.write_text(
        json.dumps(
            {
                "name": "mixed",
                "clips": 6,
                "seed": 3,
                "lengths": [
                    {"min_s": 1.2, "max_s": 2.0, "weight": 1},
                    {"min_s": 4.5, "max_s": 6, "weight": 1},
                ],
            }
        )
    )
    workload = prepare_workload(load_profile(profile_path))
    assert len(workload) == 6
    for i in range(len(workload)):
        clip = workload.clip(i)
        wav, lens = workload.padded(i)
        assert wav.shape == (1, bucket_samples(len(clip))) and lens.tolist() == [[len(clip)]]
        assert np.array_equal(wav[0, : len(clip)], clip) and not wav[0, len(clip) :].any()
        assert np.sqrt(np.mean(clip**2)) > 0.01  # decoded speech-like audio, not silence
        assert wav.shape[1] / SAMPLE_RATE in LENGTH_BUCKETS_S
    saved = Workload.load(workload.save(tmp_path / "w.npz"))
    assert np.array_equal(saved.audio, workload.audio) and saved.profile == "mixed"


# ------------------------------------------------------------ smoke load tests, real server


@pytest.fixture()
def smoke_profile(tmp_path) -> Path:
    """2.5-3 s clips: one length bucket, so warm-up sends exactly one request."""
    path = tmp_path / "smoke.json"
    path.write_text(
        json.dumps(
            {
                "name": "smoke",
                "description": "smoke test",
                "clips": 4,
                "seed": 0,
                "lengths": [{"min_s": 2.5, "max_s": 3.0, "weight": 1}],
            }
        )
    )
    return path


def _triton_successes(http_url: str) -> int:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url)
    stats = client.get_inference_statistics(MODEL_NAME)
    client.close()
    return sum(int(v["inference_stats"]["success"]["count"]) for v in stats["model_stats"])


def _locust_total(run_dir: Path) -> tuple[int, int]:
    with open(run_dir / "locust_stats.csv", newline="") as file:
        total = next(r for r in csv.DictReader(file) if r["Name"] == "Aggregated")
    return int(total["Request Count"]), int(total["Failure Count"])


def test_grpc_load_test_matches_triton_statistics(tiny_cpu_repo, smoke_profile, tmp_path):
    from e2v.cli import main
    from e2v.serve import ServerConfig, TritonServer

    config = ServerConfig.on_free_ports(tiny_cpu_repo)
    report = tmp_path / "report"
    with TritonServer(config):
        before = _triton_successes(config.http_url)
        code = main(
            [
                "loadtest",
                "--url",
                config.grpc_url,
                "--protocol",
                "grpc",
                "--stats-url",
                config.http_url,
                "--profile",
                str(smoke_profile),
                "--users",
                "3",
                "--duration",
                "4",
                "--report",
                str(report),
                "--price-per-hour",
                "0.5",
            ]
        )
        delta = _triton_successes(config.http_url) - before
    assert code == 0
    assert "locust" not in sys.modules  # gevent patching stayed in the driver process
    run_dir = report / "triton-grpc"
    requests, failures = _locust_total(run_dir)
    assert requests > 5 and failures == 0
    assert delta == requests + 1  # + the one warm-up request sent before the run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["server"]["success"] == requests and summary["server"]["failures"] == 0
    assert summary["server"]["avg_batch_size"] >= 1.0
    assert summary["summary"]["audio_s_per_s"] > 0
    text = (report / "README.md").read_text()
    assert "SYNTHETIC MODEL" in text and "USD / 1000 audio h" in text
    assert (report / "batch_sizes.png").stat().st_size > 1000
    assert (run_dir / "locust_stats_history.csv").exists()


def test_http_local_server_with_baseline_and_ort_comparison(tiny_cpu_repo, smoke_profile, tmp_path):
    from e2v.cli import main

    report = tmp_path / "report"
    code = main(
        [
            "loadtest",
            "--repo",
            str(tiny_cpu_repo),
            "--model",
            "synthetic:tiny",
            "--protocol",
            "http",
            "--profile",
            str(smoke_profile),
            "--users",
            "2",
            "--duration",
            "3",
            "--compare",
            "--ort-budget",
            "1",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    served, baseline = summary["runs"][0], summary["baseline"]
    assert served["locust"]["num_failures"] == 0 and baseline["locust"]["num_failures"] == 0
    assert served["server"]["success"] == served["locust"]["num_requests"] > 0
    assert baseline["locust"]["num_requests"] > 0 and baseline["server"] is None
    assert [o["batch_size"] for o in summary["ort_alone"]] == [1, 2]
    assert set(summary["ratios"]) == {
        "served_vs_baseline_audio_s_per_s",
        "served_vs_baseline_p50",
        "served_vs_baseline_p95",
        "served_vs_ort_alone_audio_s_per_s",
        "baseline_server_vs_in_process_audio_s_per_s",
    }
    # FunASR ran with the threads it was given, in the server and in-process alike
    cores = os.cpu_count()
    assert baseline["settings"]["torch_threads_running"] == cores
    assert summary["baseline_in_process"]["torch_threads"] == cores
    memory = summary["memory"]  # the stub around a maximum batch (docs/deploy.md's sizing)
    assert memory["returned"] and memory["peak_mib"] > memory["steady_mib"] > 0, memory
    assert memory["after_mib"] <= memory["steady_mib"] + 16, memory
    cpu = served["cpu_s"]  # CPU by process: the load generator's share is visible
    assert cpu["driver"] > 0 and cpu["tritonserver"] > 0 and cpu["stubs"] > 0, cpu
    assert "CPU by process" in (report / "README.md").read_text()
    assert (report / "comparison.png").exists()
    assert "Served vs baseline" in (report / "README.md").read_text()


def test_gateway_load_test_and_direct_comparison(tiny_server, smoke_profile, tmp_path):
    """`--gateway`: Locust uploads files to a gateway in front of Triton (each upload is one
    Triton request: VAD keeps each speech clip whole), then direct classify vs gateway."""
    pytest.importorskip("fastapi", reason="the gateway extra is not installed")
    from e2v.cli import main

    report = tmp_path / "report"
    code = main(
        [
            "loadtest",
            "--url",
            tiny_server.config.grpc_url,
            "--stats-url",
            tiny_server.config.http_url,
            "--gateway",
            "--gateway-rounds",
            "1",
            "--profile",
            str(smoke_profile),
            "--users",
            "2",
            "--duration",
            "3",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    assert "locust" not in sys.modules
    summary = json.loads((report / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["protocol"] == "gateway" and run["locust"]["num_failures"] == 0
    assert run["server"]["success"] == run["locust"]["num_requests"] > 0
    (comparison,) = summary["gateway"]
    arms = {r["arm"]: r for r in comparison["runs"]}
    assert set(arms) == {"direct", "gateway"}
    for arm in arms.values():
        assert arm["errors"] == 0 and arm["files"] == 4 * comparison["passes"]
        assert arm["audio_s_per_s"] > 0 and arm["audio_s_per_cpu_s"] > 0
    assert arms["direct"]["audio_s"] == pytest.approx(arms["gateway"]["audio_s"], abs=0.01)
    assert comparison["totals"]["ratio"] > 0
    assert summary["preprocessing"]["audio_s_per_cpu_s"] > 1
    text = (report / "README.md").read_text()
    assert text.splitlines()[0].endswith("(SYNTHETIC model: random weights)")
    assert "Through the gateway vs `e2v classify`" in text


def test_funasr_baseline_runs_the_threads_it_is_given(tiny_model_dir):
    """AutoModel resets torch's threads from `ncpu` (default 4): the baseline passes it, and
    the server reports the count FunASR actually runs with (checked, not timed)."""
    from e2v.loadtest.baseline_server import BaselineServer
    from servers import free_ports

    code = (
        "import sys, torch; from e2v.export.parity import funasr_model; "
        "funasr_model(sys.argv[1], threads=1); print(torch.get_num_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"
    with BaselineServer(tiny_model_dir, free_ports(1)[0], threads=1) as server:
        assert server.torch_threads == 1


def test_fleet_load_test_spreads_the_profile_over_the_replicas(
    tiny_cpu_repo, smoke_profile, tmp_path
):
    """`--replicas-triton 2`: the one-replica run leaves replica 1 idle, the two-replica run
    gives each at least 35% of the requests, by each Triton's own statistics, which add up
    to what the driver sent (+ the one warm-up request of the one length bucket)."""
    from e2v.cli import main

    report = tmp_path / "report"
    args = ["loadtest", "--replicas-triton", "2", "--repo", str(tiny_cpu_repo)]
    args += ["--profile", str(smoke_profile), "--users", "4", "--duration", "4"]
    code = main([*args, "--fleet-rounds", "1", "--report", str(report)])
    assert code == 0
    one, both = json.loads((report / "summary.json").read_text())["runs"]
    assert one["failures"] == both["failures"] == 0 and one["requests"] > 5
    assert list(one["per_replica"].values())[1] == 0
    assert sum(one["per_replica"].values()) == one["requests"] + 1
    served = list(both["per_replica"].values())
    assert sum(served) == both["requests"] + 1
    assert all(n >= 0.35 * sum(served) for n in served), served
    text = (report / "README.md").read_text()
    assert "2 replicas / one replica" in text and "SYNTHETIC" not in text  # a given --repo


@pytest.mark.parametrize(
    "extra", [["--url", "127.0.0.1:8001"], ["--protocol", "http"], ["--replicas-triton", "1"]]
)
def test_fleet_arguments_that_cannot_work_exit_2(extra, capsys):
    from e2v.cli import main

    assert main(["loadtest", "--replicas-triton", "2", *extra]) == 2
    assert capsys.readouterr().err.startswith("error: ")
