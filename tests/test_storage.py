"""Batch jobs over object storage: a real S3-protocol server (moto), a real HTTP server,
real shards, a killed shard resumed; every object lands exactly once."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import audio_fixtures as fx
import pytest
from e2v.client.batch.shards import Shard, shard_of
from servers import S3Server

E2V = [sys.executable, "-m", "e2v"]


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


def s3fs_client(server: S3Server):
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=server.url, key="testing", secret="testing", skip_instance_cache=True
    )


def run(*args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*E2V, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_shards_are_disjoint_and_complete_over_10000_names():
    names = [f"s3://calls/2026/11/{i:05d}-agent{i % 37}.wav" for i in range(10_000)]
    for count in (1, 3, 16):
        shards = [Shard(k, count) for k in range(count)]
        owners = [[k for k, shard in enumerate(shards) if name in shard] for name in names]
        assert all(len(owner) == 1 for owner in owners)  # exactly one shard each
        sizes = Counter(owner[0] for owner in owners)
        assert len(sizes) == count and min(sizes.values()) > 0.8 * len(names) / count
    reordered = list(reversed(names))
    assert [shard_of(n, 16) for n in reversed(reordered)] == [shard_of(n, 16) for n in names]


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    """s3://calls/in/: 24 recordings (two nested), a corrupt one and a text file."""
    fs = s3fs_client(s3)
    fs.mkdir("calls")
    local = tmp_path_factory.mktemp("bucket")
    names = []
    for i in range(24):
        key = f"in/{'day2/' if i >= 22 else ''}call{i:02d}.wav"
        path = fx.write_audio(local / f"{i}.wav", fx.speech_like(1.0 + (i % 3) * 0.5, seed=i))
        fs.put_file(str(path), f"calls/{key}")
        names.append(f"s3://calls/{key}")
    fs.pipe_file("calls/in/broken.wav", b"RIFF\x00\x00not really a wav" * 20)
    fs.pipe_file("calls/in/readme.txt", b"not audio")
    return names + ["s3://calls/in/broken.wav"]


def test_s3_in_s3_out_three_shards_with_one_killed_and_resumed(s3, bucket, tiny_server, tmp_path):
    env = s3.env()
    common = ["classify", "--no-progress", "s3://calls/in/", "--url", tiny_server.config.grpc_url]
    common += ["--jsonl", "s3://calls/out/", "--chunk-rows", "2", "--concurrency", "2"]
    for k in (0, 2):
        done = run(*common, "--shard", f"{k}/3", env=env)
        assert done.returncode in (0, 4), done.stderr  # 4 if the broken object is here
    killed = subprocess.Popen(
        [*E2V, *common, "--shard", "1/3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fs = s3fs_client(s3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not fs.glob("calls/out/part-00001-of-00003-*.jsonl"):
        time.sleep(0.05)
        fs.invalidate_cache()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    fs.invalidate_cache()
    first = fs.glob("calls/out/part-00001-of-00003-*.jsonl")
    assert first, "the killed shard committed no chunk before the kill"
    resumed = run(*common, "--shard", "1/3", "--resume", env=env)
    assert resumed.returncode in (0, 4), resumed.stderr
    assert "already done" in resumed.stderr

    counts = Counter()
    fs.invalidate_cache()
    for path in fs.glob("calls/out/part-*.jsonl"):
        for line in fs.cat_file(path).decode().splitlines():
            counts[json.loads(line)["file"]] += 1
    assert sorted(counts) == sorted(bucket)  # every object, none of the text file
    assert set(counts.values()) == {1}  # exactly once across all parts and chunks

    merged = tmp_path / "all.csv"
    summary = run("merge", "s3://calls/out/", "--out", str(merged), env=env)
    assert summary.returncode == 0, summary.stderr
    report = json.loads(summary.stdout)
    assert report["files"] == len(bucket) and report["failures"] == {"decode": 1}
    assert report["shards_present"] == "3 of 3" and report["audio_hours"] > 0
    assert merged.read_text().count("\n") == len(bucket) + 1


def test_parquet_and_csv_outputs_read_back_with_pyarrow(s3, bucket, tiny_server, tmp_path):
    import pyarrow.dataset as ds

    env = s3.env()
    args = ["classify", "--no-progress", *bucket[:5], "--url", tiny_server.config.grpc_url]
    args += ["--parquet", str(tmp_path / "results.parquet"), "--csv", "s3://calls/csv/r.csv"]
    result = run(*args, env=env)
    assert result.returncode == 0, result.stderr
    table = ds.dataset(sorted(map(str, tmp_path.glob("results-*.parquet")))).to_table()
    assert sorted(table.column("file").to_pylist()) == sorted(bucket[:5])
    assert table.schema.field("confidence").type == "double"
    again = run(*args, "--resume", env=env)
    assert again.returncode == 0 and "5 file(s) already done, 0 to go" in again.stderr


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_inputs_equal_local_files(tiny_server, tmp_path):
    """The same file over HTTP (a real local http.server) and from disk gives the same row."""
    path = fx.write_audio(tmp_path / "call.wav", fx.speech_like(2.5, seed=5))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_Quiet, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        remote = run(
            "classify",
            "--no-progress",
            f"{base}/call.wav",
            f"{base}/missing.wav",
            str(path),
            "--url",
            tiny_server.config.grpc_url,
            "--json",
        )
    finally:
        server.shutdown()
        server.server_close()
    rows = {r["file"]: r for r in map(json.loads, remote.stdout.splitlines())}
    assert remote.returncode == 4, remote.stderr
    assert rows[f"{base}/missing.wav"]["error_kind"] == "not_found"
    over_http, on_disk = rows[f"{base}/call.wav"], rows[str(path)]
    assert over_http["emotion"] == on_disk["emotion"]
    for label, score in on_disk["scores"].items():
        assert abs(over_http["scores"][label] - score) <= 1e-5


def test_bad_uris_buckets_and_credentials_are_rows_or_one_line(s3, bucket, tiny_server, tmp_path):
    env = s3.env()
    url = ["--url", tiny_server.config.grpc_url, "--json"]
    inputs = ["s3://no-such-bucket/calls/", "nosuchproto://x/y.wav", "s3://calls/in/none*.wav"]
    result = run("classify", "--no-progress", *inputs, bucket[0], *url, env=env)
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
    rows = {r["file"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows[bucket[0]]["emotion"]
    assert rows["s3://no-such-bucket/calls/"]["error_kind"] in ("not_found", "storage")
    assert "nosuchproto" in rows["nosuchproto://x/y.wav"]["error"]
    assert rows["s3://calls/in/none*.wav"]["error_kind"] == "not_found"

    no_bucket = run(
        "classify", "--no-progress", bucket[0], *url, "--jsonl", "s3://no-such-bucket/out/", env=env
    )
    assert no_bucket.returncode == 2 and "cannot write" in no_bucket.stderr
    assert len(no_bucket.stderr.strip().splitlines()) == 1


def test_wrong_credentials_give_a_row_not_a_traceback(tiny_server, tmp_path):
    """A server that checks credentials (moto with authentication on) refuses our keys."""
    server = S3Server(authenticate=True)
    try:
        result = run(
            "classify",
            "--no-progress",
            "s3://calls/in/x.wav",
            "s3://calls/in/",
            "--url",
            tiny_server.config.grpc_url,
            "--json",
            env=server.env(),
        )
    finally:
        server.stop()
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
    for row in map(json.loads, result.stdout.splitlines()):
        assert row["error_kind"] in ("storage", "unreadable", "not_found"), row
        assert len(row["error"]) < 500


def test_from_list_reads_a_bucket_inventory(s3, bucket, tiny_server, tmp_path):
    inventory = tmp_path / "inventory.txt"
    inventory.write_text("# inventory\n" + "\n".join(bucket[:4]) + "\n\n")
    result = run(
        "classify",
        "--no-progress",
        "--from-list",
        str(inventory),
        "--url",
        tiny_server.config.grpc_url,
        "--json",
        env=s3.env(),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(line)["file"] for line in result.stdout.splitlines()) == sorted(
        bucket[:4]
    )
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9.wav\n".encode("latin-1"))
    bad = run("classify", "--from-list", str(latin), "--url", tiny_server.config.grpc_url)
    assert bad.returncode == 2 and "not UTF-8" in bad.stderr
    assert Path(inventory).exists()
