"""Serving end to end: real tritonserver, real encoded files, the e2v client and CLI."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import audio_fixtures as fx
import numpy as np
import pytest
import tritonclient.http as httpclient
from e2v.client.triton import TritonEmotionClient
from e2v.export.parity import funasr_reference
from servers import free_ports, server_config, start_server

from e2v.serve import ServeError, TritonServer

SCORES_TOL = 1e-4


def classify(*args: str, timeout: float = 300, cwd: Path | None = None):
    """`e2v classify --no-progress ARGS` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "e2v", "classify", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def json_rows(stdout: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {row["file"]: row for row in rows}


def test_end_to_end_scores_equal_funasr(tiny_server, tiny_model_dir, tmp_path):
    """16 kHz mono file -> client -> Triton == FunASR AutoModel.generate on the same file."""
    path = fx.write_audio(tmp_path / "clip.wav", fx.speech_like(4.7, seed=3))
    result = classify(
        str(path), "--url", tiny_server.config.grpc_url, "--json", "--segment", "none"
    )
    row = json_rows(result.stdout)[str(path)]
    reference = funasr_reference(tiny_model_dir, [str(path)])[0]
    ours = [row["scores"][label.rsplit("/", 1)[-1]] for label in reference["labels"]]
    assert np.abs(np.array(ours) - np.array(reference["scores"])).max() <= SCORES_TOL
    assert row["synthetic"] is True and "meaningless" in row["note"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_containers_rates_and_channels(protocol, tiny_server, tmp_path):
    """Real encoded files in several containers, sample rates and channel counts."""
    signal = fx.speech_like(3.0, sr=48_000, seed=1)
    files = [
        fx.write_audio(tmp_path / "a.flac", fx.speech_like(2.5, sr=16_000, seed=2)),
        fx.write_audio(
            tmp_path / "b.wav", fx.speech_like(2.0, sr=8_000, seed=4), 8_000, codec="pcm_mulaw"
        ),
        fx.write_audio(tmp_path / "c.mp3", np.stack([signal, 0.5 * signal]), 48_000),
        fx.write_audio(tmp_path / "d.m4a", fx.speech_like(3.0, sr=44_100, seed=5), 44_100),
        fx.write_audio(
            tmp_path / "e.webm", fx.speech_like(3.0, sr=48_000, seed=6), 48_000, video=True
        ),
        fx.write_audio(tmp_path / "f.opus", fx.speech_like(2.0, sr=48_000, seed=7), 48_000),
    ]
    url = tiny_server.config.grpc_url if protocol == "grpc" else tiny_server.config.http_url
    result = classify(str(tmp_path), "--url", url, "--protocol", protocol, "--json")
    rows = json_rows(result.stdout)
    assert result.returncode == 0, result.stderr
    assert set(rows) == {str(f) for f in files}
    for row in rows.values():
        assert row["emotion"] and abs(sum(row["scores"].values()) - 1) < 1e-3
        assert 1.9 < row["duration_s"] < 3.2


def test_dynamic_batching_groups_concurrent_requests(tiny_server):
    """Concurrent requests are executed in batches > 1, with unbatched results."""
    rng = np.random.default_rng(0)
    clips = [
        (0.1 * rng.standard_normal(n)).astype(np.float32)
        for n in rng.integers(20_000, 48_000, size=24)
    ]
    stats_client = httpclient.InferenceServerClient(tiny_server.config.http_url)

    def batch_counts() -> dict[int, int]:
        stats = stats_client.get_inference_statistics("emotion2vec")["model_stats"][0]
        return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}

    async def run(concurrent: bool):
        async with TritonEmotionClient(tiny_server.config.grpc_url) as client:
            if concurrent:
                return await asyncio.gather(*(client.predict(c) for c in clips))
            return [await client.predict(c) for c in clips]

    before = batch_counts()
    batched = asyncio.run(run(concurrent=True))
    after = batch_counts()
    grew = {size: after[size] - before.get(size, 0) for size in after}
    assert any(size > 1 and count > 0 for size, count in grew.items()), grew
    single = asyncio.run(run(concurrent=False))
    for one, many in zip(single, batched, strict=True):
        assert np.abs(one.scores - many.scores).max() <= 1e-5
        assert np.abs(one.embedding - many.embedding).max() <= 1e-4


def make_mixed_batch(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    folder.mkdir()
    good = [
        fx.write_audio(folder / f"good{i}.wav", fx.speech_like(1.5 + i * 0.3, seed=i))
        for i in range(6)
    ]
    bad = {
        fx.write_random_bytes(folder / "random.wav"): "decode",
        fx.write_empty_file(folder / "empty.mp3"): "empty",
        fx.write_text(folder / "notes.mp3"): "decode",
        fx.write_nan_wav(folder / "nan.wav"): "non_finite",
        fx.write_audio(folder / "short.wav", fx.tone(0.01)): "too_short",
    }
    return good, bad


def test_corrupt_files_are_reported_and_the_rest_complete(tiny_server, tmp_path):
    good, bad = make_mixed_batch(tmp_path / "batch")
    out = tmp_path / "out.csv"
    result = classify(
        str(tmp_path / "batch"),
        str(tmp_path / "missing.wav"),
        "--url",
        tiny_server.config.grpc_url,
        "--csv",
        str(out),
        "--json",
    )
    assert result.returncode == 4, result.stderr  # file errors, no alerts
    rows = json_rows(result.stdout)
    for path in good:
        assert rows[str(path)].get("emotion"), rows[str(path)]
    for path, kind in bad.items():
        assert rows[str(path)]["error_kind"] == kind, rows[str(path)]
    assert rows[str(tmp_path / "missing.wav")]["error_kind"] == "not_found"
    with open(out, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(good) + len(bad) + 1


def test_alert_thresholds_set_exit_code(tiny_server, tmp_path):
    path = fx.write_audio(tmp_path / "x.wav", fx.speech_like(3.0, seed=9))
    probe = json_rows(classify(str(path), "--url", tiny_server.config.grpc_url, "--json").stdout)
    top = probe[str(path)]["emotion"]
    hit = classify(
        str(path), "--url", tiny_server.config.grpc_url, "--json", "--alert", f"{top}=0.01"
    )
    assert hit.returncode == 8 and json_rows(hit.stdout)[str(path)]["alerts"][0]["label"] == top
    miss = classify(str(path), "--url", tiny_server.config.grpc_url, "--alert", f"{top}=1.0")
    assert miss.returncode == 0
    bad = classify(str(path), "--alert", "angry=high")
    assert bad.returncode == 2 and "bad --alert" in bad.stderr


def test_no_speech_is_said_not_invented(tiny_server, tmp_path):
    path = fx.write_audio(tmp_path / "quiet.wav", fx.noise(40.0, amplitude=0.001))
    row = json_rows(classify(str(path), "--url", tiny_server.config.grpc_url, "--json").stdout)
    assert row[str(path)]["no_speech"] is True and row[str(path)]["emotion"] is None


def test_embeddings_written_as_npy_and_parquet(tiny_server, tmp_path):
    import pyarrow.parquet as pq

    files = [fx.write_audio(tmp_path / f"{i}.wav", fx.speech_like(2.0, seed=i)) for i in range(3)]
    for target in ("emb.npy", "emb.parquet"):
        out = tmp_path / target
        result = classify(
            *map(str, files),
            "--url",
            tiny_server.config.grpc_url,
            "--embeddings",
            str(out),
            "--segment",
            "none",
        )
        assert result.returncode == 0, result.stderr
    matrix = np.load(tmp_path / "emb.npy")
    assert matrix.shape == (3, 64) and np.isfinite(matrix).all()
    table = pq.read_table(tmp_path / "emb.parquet")
    assert table.num_rows == 3 and len(table.column("embedding")[0]) == 64


def test_unreachable_server_names_the_url(tmp_path):
    path = fx.write_audio(tmp_path / "x.wav", fx.tone(1.0))
    port = free_ports(1)[0]
    result = classify(str(path), "--url", f"127.0.0.1:{port}", "--retries", "1", timeout=60)
    assert result.returncode == 3
    assert f"127.0.0.1:{port}" in result.stderr and "e2v serve" in result.stderr


def test_kill_and_restart_server_mid_job_resume_loses_and_duplicates_nothing(
    tiny_cpu_repo, tmp_path
):
    files = [
        fx.write_audio(tmp_path / f"call{i:02d}.wav", fx.speech_like(6.0, seed=i))
        for i in range(40)
    ]
    config = server_config(tiny_cpu_repo)
    out = tmp_path / "results.csv"
    args = [
        sys.executable,
        "-m",
        "e2v",
        "classify",
        "--no-progress",
        *map(str, files),
        "--url",
        config.grpc_url,
        "--csv",
        str(out),
        "--segment",
        "fixed:1",
        "--concurrency",
        "2",
        "--retries",
        "2",
    ]
    server = TritonServer(config).start(240)
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not out.exists() or len(out.read_text().splitlines()) < 4
    ):
        time.sleep(0.1)
    server.kill()
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 3, stderr
    assert "--resume" in stderr
    first = len(list(csv.DictReader(out.open())))
    assert 0 < first < len(files)

    server = TritonServer(config).start(240)
    try:
        again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert again.returncode == 0, again.stderr
    rows = [row["file"] for row in csv.DictReader(out.open())]
    assert sorted(rows) == sorted(map(str, files))  # each exactly once
    assert len(rows) == len(set(rows))


def test_serve_refuses_taken_port_and_missing_repository(tiny_server, tmp_path):
    taken = server_config(tiny_server.config.repo)
    taken.http_port = tiny_server.config.http_port
    with pytest.raises(ServeError, match=f"HTTP port {taken.http_port} .* already in use"):
        TritonServer(taken).start(30)
    with pytest.raises(ServeError, match="model repository not found"):
        TritonServer(server_config(tmp_path / "nope")).start(30)


def test_serve_reports_triton_reason_when_model_fails_to_load(tiny_cpu_repo, tmp_path):
    import shutil

    repo = tmp_path / "broken"
    shutil.copytree(tiny_cpu_repo, repo)
    (repo / "emotion2vec" / "1" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ServeError, match="(?s)exited.*emotion2vec"):
        start_server(repo)


def test_serve_cli_prints_endpoints_and_stops_on_sigterm(tiny_cpu_repo):
    import signal

    http, grpc, metrics = free_ports()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "e2v",
            "serve",
            "--repo",
            str(tiny_cpu_repo),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--instances",
            "2",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ready:"):
            break
    assert f"127.0.0.1:{grpc}" in lines[-1] and f":{metrics}/metrics" in lines[-1], lines
    config = httpclient.InferenceServerClient(f"127.0.0.1:{http}").get_model_config("emotion2vec")
    assert config["instance_group"][0]["count"] == 2
    assert config["parameters"]["intra_op_thread_count"]["string_value"] == "1"
    # The model-repository API needs the admin key; and even with it, model control is off.
    key_line = next(proc.stdout)
    assert key_line.startswith("admin key"), key_line
    key = Path(key_line.rsplit(": ", 1)[1].strip()).read_text().strip()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    with pytest.raises(Exception, match="restricted"):
        client.unload_model("emotion2vec")
    with pytest.raises(Exception, match="(?i)explicit|not allowed|polling|disabled"):
        client.unload_model("emotion2vec", headers={"triton-admin-key": key})
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "stopped" in rest


def test_queue_full_rejections_are_retried_until_served(cache_dir, tmp_path):
    """A server with a one-slot queue rejects bursts ("Exceeds maximum queue size"); the
    client backs off and retries until every request is answered."""
    from dataclasses import replace

    import tritonclient.grpc.aio as grpcaio
    from e2v.export.exporter import export_model
    from e2v.export.repository import default_options

    options = replace(
        default_options("cpu"),
        max_batch_size=1,
        preferred_batch_sizes=(1,),
        max_queue_delay_us=0,
        max_queue_size=1,
    )
    repo = tmp_path / "repo"
    export_model(
        "synthetic:tiny",
        repo,
        target="cpu",
        options=options,
        check_parity=False,
        cache_dir=cache_dir,
    )
    server = start_server(repo, instances=1, threads=1)
    clips = [np.full(32_000, 0.01 * (i + 1), dtype=np.float32) for i in range(16)]

    async def raw_burst() -> list:
        """The same burst without our client: no retries, so rejections surface."""
        client = grpcaio.InferenceServerClient(server.config.grpc_url)

        async def one(clip):
            wav = grpcaio.InferInput("WAV", [1, len(clip)], "FP32")
            wav.set_data_from_numpy(clip[None, :])
            lens = grpcaio.InferInput("WAV_LENS", [1, 1], "INT64")
            lens.set_data_from_numpy(np.array([[len(clip)]], dtype=np.int64))
            return await client.infer("emotion2vec", [wav, lens])

        try:
            return await asyncio.gather(*(one(c) for c in clips), return_exceptions=True)
        finally:
            await client.close()

    async def burst():
        async with TritonEmotionClient(server.config.grpc_url, retries=8, backoff_s=0.05) as c:
            return await asyncio.gather(*(c.predict(clip) for clip in clips))

    try:
        raw = asyncio.run(raw_burst())
        predictions = asyncio.run(burst())
    finally:
        server.stop()
    rejected = [r for r in raw if isinstance(r, Exception)]
    assert rejected and all("Exceeds maximum queue size" in str(r) for r in rejected)
    assert len(predictions) == len(clips)
    assert all(abs(p.scores.sum() - 1) < 1e-4 for p in predictions)
