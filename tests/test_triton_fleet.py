"""A fleet of Triton replicas behind one --url: every client spreads its requests over them
and survives losing one.

Real processes throughout: two tritonservers of the same model on free loopback ports,
`e2v classify`, `e2v gateway` and `e2v live` as subprocesses. Who served what is read from
each Triton's own statistics, never from the client's counts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import audio_fixtures as fx
import pytest
from e2v.client.targets import TargetError, parse_target
from e2v.loadtest.gateway_process import GatewayProcess
from servers import free_ports, server_config, start_server
from test_gateway import multipart, post

from e2v.contract import EVENT_UTTERANCE_END, MODEL_NAME
from e2v.serve import ServerConfig, TritonServer

E2V = [sys.executable, "-m", "e2v"]
ROOT = Path(__file__).resolve().parent.parent
SHARE = 0.35  # each of two replicas serves at least this share of the inferences


def inferences(server: TritonServer) -> int:
    """Inference requests the server has answered (Triton's statistics of the model)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    try:
        stats = client.get_inference_statistics(MODEL_NAME, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def recordings(folder: Path, count: int, seconds: float = 1.5) -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [
        fx.write_audio(folder / f"r{i:03d}.wav", fx.speech_like(seconds, seed=i))
        for i in range(count)
    ]


def grpc_list(*servers: TritonServer) -> str:
    return "ipv4:" + ",".join(s.config.grpc_url for s in servers)


def http_list(*servers: TritonServer) -> str:
    return ",".join(s.config.http_url for s in servers)


def shares(servers, before: list[int]) -> list[float]:
    served = [inferences(s) - b for s, b in zip(servers, before)]
    print(f"inferences per replica (Triton's statistics): {served}")
    return [n / sum(served) for n in served]


def summary(stderr: str) -> dict[str, int]:
    """The job's "triton requests per replica: A n, B m" line."""
    line = next(x for x in stderr.splitlines() if x.startswith("triton requests per replica:"))
    pairs = (part.rsplit(" ", 1) for part in line.split(":", 1)[1].strip().split(", "))
    return {name: int(count) for name, count in pairs}


def classify(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [*E2V, "classify", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def metric_lines(url: str, prefix: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def ready_status(gateway: GatewayProcess) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(gateway.url + "/ready", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def replicas(tiny_cpu_repo):
    """Two tritonservers of the same model, one instance and one thread each."""
    servers = []
    try:
        for _ in range(2):
            servers.append(start_server(tiny_cpu_repo, instances=1, threads=1))
        yield servers
    finally:
        for server in servers:
            server.stop()


# ------------------------------------------------------------------------ targets


@pytest.mark.parametrize(
    "text, protocol, channel, urls",
    [
        ("localhost:8001", "grpc", "localhost:8001", ()),
        ("dns:///triton-headless:8001", "grpc", "dns:///triton-headless:8001", ()),
        ("ipv4:10.0.0.1:8001,10.0.0.2:8001", "grpc", None, ("10.0.0.1:8001", "10.0.0.2:8001")),
        ("10.0.0.1:8001, 10.0.0.2:8001", "grpc", "ipv4:10.0.0.1:8001,10.0.0.2:8001", None),
        ("[::1]:1,[::1]:2", "grpc", "ipv6:[::1]:1,[::1]:2", ("[::1]:1", "[::1]:2")),
        ("http://a:8000,b:8000/", "http", "", ("a:8000", "b:8000")),
    ],
)
def test_what_a_url_means(text, protocol, channel, urls):
    target = parse_target(text, protocol)
    assert target.channel == (text if channel is None else channel)
    if urls is not None:
        assert target.urls == urls


@pytest.mark.parametrize(
    "text, protocol, needle",
    [
        ("", "grpc", "empty"),
        ("triton-a:8001,triton-b:8001", "grpc", "dns:///NAME:PORT"),
        ("http://triton:8000", "grpc", "--protocol http"),
        ("10.0.0.1:8001,[::1]:8001", "grpc", "not both"),
        ("10.0.0.1:8001,,10.0.0.2:8001", "grpc", "empty entry"),
        ("10.0.0.1:99999", "grpc", "not HOST:PORT"),
        ("dns:///triton:8001", "http", "gRPC target"),
        ("a:8000,a:8000", "http", "twice"),
        ("https://a:8000", "http", "HTTPS"),
    ],
)
def test_targets_that_cannot_work_are_refused_in_one_line(text, protocol, needle, tmp_path):
    with pytest.raises(TargetError, match=re.escape(needle)):
        parse_target(text, protocol)
    result = classify(str(tmp_path), "--url", text, "--protocol", protocol, timeout=60)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_job_with_every_replica_down_exits_3_naming_each(tmp_path, protocol):
    """Nothing listens on either address: one line, exit 3, each replica and why."""
    dead = [f"127.0.0.1:{port}" for port in free_ports(2)]
    recordings(tmp_path / "in", 1)
    result = classify(
        str(tmp_path / "in"),
        "--url",
        ",".join(dead),
        "--protocol",
        protocol,
        "--retries",
        "1",
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert all(f"{address} (connection refused)" in result.stderr for address in dead)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ------------------------------------------------------------------------ balancing


@pytest.mark.parametrize(
    "protocol, url, workers",
    [("grpc", grpc_list, "1"), ("grpc", grpc_list, "2"), ("http", http_list, "1")],
)
def test_classify_spreads_a_job_over_a_list_of_replicas(replicas, tmp_path, protocol, url, workers):
    """40 files, `--url A,B`: each replica serves at least 35% of the inferences, and the
    job's summary names both with as many requests as they answered (and more: health
    and config calls count too)."""
    files = recordings(tmp_path / "in", 40)
    before = [inferences(s) for s in replicas]
    result = classify(
        *map(str, files), "--url", url(*replicas), "--protocol", protocol, "--workers", workers
    )
    assert result.returncode == 0, result.stderr
    assert all(share >= SHARE for share in shares(replicas, before))
    served = [inferences(s) - b for s, b in zip(replicas, before)]
    counted = summary(result.stderr)
    names = [getattr(s.config, f"{protocol}_url") for s in replicas]
    assert sorted(counted) == sorted(names)
    assert all(counted[name] >= n for name, n in zip(names, served)), (counted, served)


def test_the_gateway_spreads_uploads_over_the_replicas(replicas, tmp_path):
    """40 uploads through a gateway with `--triton ipv4:A,B`: each replica serves at least
    35%, and /metrics counts the requests per replica and says each is ready."""
    files = recordings(tmp_path / "in", 40)
    before = [inferences(s) for s in replicas]
    with GatewayProcess(grpc_list(*replicas)).start() as gateway:
        for index in range(0, len(files), 4):
            parts = [(b"file", p.name.encode(), p.read_bytes()) for p in files[index : index + 4]]
            status, _, answer = post(gateway, *multipart(parts))
            assert status == 200 and all(f["emotion"] for f in answer["results"]), answer
        assert ready_status(gateway)[0] == 200
        requests = metric_lines(gateway.url, "e2v_gateway_triton_requests_total")
        ready = metric_lines(gateway.url, "e2v_gateway_triton_replica_ready")
    assert all(share >= SHARE for share in shares(replicas, before))
    for server in replicas:
        label = f'{{replica="{server.config.grpc_url}"}}'
        assert requests[f"e2v_gateway_triton_requests_total{label}"] >= 40 * SHARE
        assert ready[f"e2v_gateway_triton_replica_ready{label}"] == 1


def test_the_python_api_spreads_over_a_list_of_replicas(replicas, tmp_path):
    """`classify_files(..., url="A,B")`: the same balancing as the command line."""
    from e2v import classify_files

    files = recordings(tmp_path / "in", 20)
    before = [inferences(s) for s in replicas]
    results = classify_files([str(p) for p in files], url=grpc_list(*replicas))
    assert len(results) == 20 and all(r.ok for r in results)
    assert all(share >= SHARE for share in shares(replicas, before))


# ------------------------------------------------------------------------- failover


@pytest.mark.parametrize("protocol, url", [("grpc", grpc_list), ("http", http_list)])
def test_a_replica_killed_mid_job_costs_no_file(tiny_cpu_repo, tmp_path, protocol, url):
    """SIGKILL to one of two replicas mid-job: its requests are retried on the other, the
    job exits 0 with every file and no error row."""
    files = recordings(tmp_path / "in", 120)
    servers = [start_server(tiny_cpu_repo, instances=1, threads=1) for _ in range(2)]
    out = tmp_path / "rows.jsonl"
    command = [*E2V, "classify", "--no-progress", *map(str, files), "--jsonl", str(out)]
    command += ["--url", url(*servers), "--protocol", protocol, "--concurrency", "4"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or _lines(out) < 15):
            time.sleep(0.05)
        killed_at = _lines(out)
        servers[0].kill()
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
        for server in servers:
            server.stop()
    assert job.returncode == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(map(str, files))
    assert not [r for r in rows if r.get("error")]
    assert killed_at < len(files) - 20, f"the job had {killed_at} rows at the kill"
    print(f"{protocol}: killed at {killed_at}/{len(files)} rows; {stderr.strip()}")


def test_a_replica_killed_mid_live_call_loses_no_final(tiny_cpu_repo):
    """`e2v live` into a gateway over two replicas; one is SIGKILLed mid-call: the same
    finals as a call with both up, every one with an emotion."""
    servers = [start_server(tiny_cpu_repo, instances=1, threads=1) for _ in range(2)]
    sample = str(ROOT / "samples" / "call-8k-stereo.wav")
    try:
        with GatewayProcess(grpc_list(*servers)).start() as gateway:
            ws = gateway.url.replace("http://", "ws://")
            live = [*E2V, "live", sample, "--url", ws, "--json", "--speed", "2"]
            steady = subprocess.run(live, capture_output=True, text=True, timeout=180)
            assert steady.returncode == 0, steady.stderr
            before = [inferences(s) for s in servers]
            call = subprocess.Popen(live, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(4.0)  # ~8 s of the 23 s call played
            served_before_kill = inferences(servers[0]) - before[0]
            servers[0].kill()
            stdout, stderr = call.communicate(timeout=180)
            retries = metric_lines(gateway.url, "e2v_live_final_retries_total")
    finally:
        for server in servers:
            server.stop()
    assert call.returncode == 0, stderr
    assert served_before_kill > 0, "the killed replica served nothing of the call"

    def finals(text: str) -> list[tuple]:
        events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        ends = [e for e in events if e["type"] == EVENT_UTTERANCE_END]
        assert all(e["emotion"] for e in ends)
        return [(e.get("party"), e["start_s"], e["end_s"]) for e in ends]

    assert finals(stdout) == finals(steady.stdout) and len(finals(stdout)) >= 2
    print(f"final retries across the kill: {retries}")


# --------------------------------------------------------------- readiness, scale-up


def test_readiness_names_the_replicas_down_and_a_late_replica_gets_requests(
    tiny_cpu_repo, tmp_path
):
    """A gateway over `ipv4:A,B` with neither up: /ready refuses and names both. A up: ready.
    B started later, on its listed address: once its model is ready it gets requests (the
    channel retries a failed address within 5 s), and the uploads after that are spread."""
    configs = [server_config(tiny_cpu_repo, instances=1, threads=1) for _ in range(2)]
    target = "ipv4:" + ",".join(c.grpc_url for c in configs)
    servers: list[TritonServer] = []
    files = recordings(tmp_path / "in", 20)
    try:
        with GatewayProcess(target).start(ready=False) as gateway:
            status, body = ready_status(gateway)
            assert status == 503, body
            for config in configs:
                assert f"{config.grpc_url} (connection refused)" in body["error"], body
            servers.append(TritonServer(configs[0]).start(timeout_s=240))
            _wait(lambda: ready_status(gateway)[0] == 200, 60, "ready with one replica")
            status, body = ready_status(gateway)
            late = TritonServer(configs[1]).start(timeout_s=240)
            servers.append(late)
            ready_at, warmed = time.monotonic(), inferences(late)  # warmup runs count
            used = lambda: _upload_one(gateway, files[0]) and inferences(late) > warmed  # noqa: E731
            _wait(used, 30, "B used")
            print(
                f"the late replica got its first request {time.monotonic() - ready_at:.1f} s "
                "after it was ready"
            )
            before = [inferences(s) for s in servers]
            for path in files:
                assert _upload_one(gateway, path)
            share = shares(servers, before)
    finally:
        for server in servers:
            server.stop()
    assert all(s >= SHARE for s in share)


class ReplicaNames:
    """A real DNS server (dnslib, UDP on loopback) answering `replicas.test` with the A
    records in `addresses`, which the test changes as it scales the fleet."""

    NAME = "replicas.test"

    def __init__(self, addresses: list[str]):
        from dnslib import QTYPE, RR, A
        from dnslib.server import BaseResolver, DNSLogger, DNSServer

        names = self

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                if request.q.qtype == QTYPE.A:
                    for ip in names.addresses:
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=1))
                return reply

        self.addresses = addresses
        quiet = DNSLogger(logf=lambda *_: None)
        self.server = DNSServer(Resolver(), port=0, address="127.0.0.1", logger=quiet)
        self.server.start_thread()
        self.port = self.server.server.server_address[1]

    def target(self, port: int) -> str:
        """A gRPC target that asks this server, not the system's resolver."""
        return f"dns://127.0.0.1:{self.port}/{self.NAME}:{port}"

    def stop(self) -> None:
        self.server.stop()


def _same_free_port(*hosts: str) -> int:
    """A port free on every loopback address in `hosts` (replicas behind one DNS name)."""
    import socket

    for _ in range(50):
        port = free_ports(1, hosts[0])[0]
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every address")


def test_a_new_replica_in_dns_gets_requests_after_a_re_resolution(tiny_cpu_repo, tmp_path):
    """`dns://SERVER/replicas.test:PORT` answers one replica, then two: the gateway's channel
    asks DNS again when Triton closes its connection (--grpc-max-connection-age, 2 s here
    instead of 60 s) and spreads the uploads over both."""
    port = _same_free_port("127.0.0.2", "127.0.0.3")
    # Connections closed after 2 s; a request then in flight has 10 s to finish (a shorter
    # grace cancels it, and its retry would count twice in Triton's statistics).
    age = ["--grpc-max-connection-age=2000", "--grpc-max-connection-age-grace=10000"]
    configs = []
    for host in ("127.0.0.2", "127.0.0.3"):
        http, metrics = free_ports(2, host)
        while port in (http, metrics):  # released by _same_free_port: may come back
            http, metrics = free_ports(2, host)
        configs.append(
            ServerConfig(
                repo=tiny_cpu_repo,
                host=host,
                http_port=http,
                grpc_port=port,
                metrics_port=metrics,
                instances=1,
                threads=1,
                extra_flags=age,
            )
        )
    files = recordings(tmp_path / "in", 20)
    names = ReplicaNames(["127.0.0.2"])
    servers = [TritonServer(configs[0]).start(timeout_s=240)]
    try:
        with GatewayProcess(names.target(port)).start() as gateway:
            first = inferences(servers[0])
            for path in files[:4]:
                assert _upload_one(gateway, path)
            assert inferences(servers[0]) - first >= 4  # the only replica DNS names
            late = TritonServer(configs[1]).start(timeout_s=240)
            servers.append(late)
            warmed = inferences(late)  # its warmup runs count
            names.addresses = ["127.0.0.2", "127.0.0.3"]
            listed_at = time.monotonic()
            used = lambda: _upload_one(gateway, files[0]) and inferences(late) > warmed  # noqa: E731
            _wait(used, 40, "B used")
            took = time.monotonic() - listed_at
            before = [inferences(s) for s in servers]
            for path in files:
                assert _upload_one(gateway, path)
            share = shares(servers, before)
            ready_status(gateway)  # refreshes the per-replica readiness
            ready = metric_lines(gateway.url, "e2v_gateway_triton_replica_ready")
    finally:
        names.stop()
        for server in servers:
            server.stop()
    print(f"the new replica got requests {took:.1f} s after DNS listed it")
    assert all(s >= SHARE for s in share)
    assert sorted(ready) == [
        f'e2v_gateway_triton_replica_ready{{replica="{c.grpc_url}"}}' for c in configs
    ]


def _upload_one(gateway: GatewayProcess, path: Path) -> bool:
    body, content_type = multipart([(b"file", path.name.encode(), path.read_bytes())])
    status, _, answer = post(gateway, body, content_type)
    assert status == 200, answer
    return True


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {seconds} s"
        time.sleep(0.2)


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)
