"""`e2v bench heads`: what a custom head costs, to train and to serve.

1. Training: N labelled clips (loadtest/sounds.py) are embedded by the served model (once:
   cached), then a logistic and an MLP head are cross-validated (5 folds) and fitted.
   Printed: seconds per head, against the seconds the server took to embed the clips.
2. Serving: the logistic head is exported and hot-added, then the same clips are sent,
   one request at a time and interleaved, to the base model and to the ensemble.
   Printed: p50/p95 latency of each, the head's added milliseconds and the ratio.

Figures, not assertions: run it on the machine you size. By default it exports
synthetic:base (768-dim embeddings, as the real base models) and starts its own server;
`--url/--http-url/--repo` measure an `e2v serve --hot-add` that is already running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from e2v.client.arguments import add_url_argument
from e2v.loadtest import triton_stats

BENCH_NAME = "bench"


def register_bench(bench_subparsers) -> None:
    parser = bench_subparsers.add_parser(
        "heads",
        help="custom heads: train + CV time, latency added by the head",
        description=__doc__,
    )
    parser.add_argument("--model", default="synthetic:base", help="exported when no --url")
    parser.add_argument("--clips", type=int, default=500, help="labelled clips to train on")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per model")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, help="clips, cache, repository (kept for reruns)")
    add_url_argument(
        parser,
        omitted="export --model and serve it here; given: a running `e2v serve --hot-add`, gRPC",
    )
    parser.add_argument("--http-url", help="its HTTP HOST:PORT (readiness)")
    parser.add_argument("--repo", type=Path, help="its repository (the head is written there)")
    parser.add_argument("--json-file", metavar="FILE", help="also write the figures as JSON")
    parser.set_defaults(func=run_bench_heads)


def run_bench_heads(args: argparse.Namespace) -> int:
    if args.clips < 4 * args.folds or args.requests < 1:
        print(f"error: need --clips >= {4 * args.folds} and --requests >= 1", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.gettempdir()) / "e2v-bench-heads"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.url:
        if not (args.http_url and args.repo):
            print("error: --url needs --http-url and --repo", file=sys.stderr)
            return 2
        figures = benchmark(
            args.url, args.http_url, args.repo, workdir, args.clips, args.requests, args.folds
        )
    else:
        figures = _with_own_server(args, workdir)
    print(report(figures))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(figures, indent=2))
    return 0


def _with_own_server(args, workdir: Path) -> dict:
    from e2v.export.exporter import export_model

    from e2v.hot_add import RepositoryWatcher
    from e2v.serve import ServerConfig, TritonServer, overlay_model

    repo = workdir / ("repo-" + "".join(c if c.isalnum() else "-" for c in args.model))
    if not (repo / "emotion2vec" / "config.pbtxt").is_file():
        print(f"exporting {args.model} ...", file=sys.stderr)
        export_model(args.model, repo, target="cpu", check_parity=False)
    for stale in repo.glob(f"*{BENCH_NAME}"):  # the previous run's head: hot-added again
        shutil.rmtree(stale)
    config = ServerConfig.on_free_ports(repo, hot_add=True, instances=1)
    with TritonServer(config) as server:
        watcher = RepositoryWatcher(
            repo,
            config.http_url,
            server.admin_key,
            server.runtime_repo,
            lambda source, target: overlay_model(source, target, config),
            poll_s=0.2,
            say=lambda message: print(message, file=sys.stderr),
        )
        return benchmark(
            config.grpc_url,
            config.http_url,
            repo,
            workdir,
            args.clips,
            args.requests,
            args.folds,
            load=watcher.maybe_scan,
        )


def benchmark(
    url: str,
    http_url: str,
    repo: Path,
    workdir: Path,
    clips: int,
    requests: int,
    folds: int = 5,
    load: Callable[[], object] | None = None,
) -> dict:
    """Every figure of the benchmark, as a dict (see `report`)."""
    from e2v.loadtest.sounds import write_labelled_set

    manifest = workdir / f"clips-{clips}" / "manifest.csv"
    if not manifest.is_file():
        write_labelled_set(manifest.parent, per_class=clips // 4, seed=7, speakers=10)
    rows, info, base, embed_s = asyncio.run(_embed(url, manifest, workdir / "cache"))
    figures: dict = {
        "model": base.name,
        "synthetic": base.synthetic,
        "embed_dim": base.embed_dim,
        "clips": len(rows),
        "embed_s": embed_s,
    }
    training = {}
    for kind in ("logistic", "mlp"):
        training[kind] = _train(rows, kind, folds)
    figures["training"] = training
    _export(repo, rows, base, training["logistic"].pop("pipeline"))
    training["mlp"].pop("pipeline")
    ensemble = f"{base.name}_{BENCH_NAME}"
    _wait_ready(http_url, ensemble, load)
    models = (base.name, ensemble, f"head_{BENCH_NAME}")
    before = {model: triton_stats.snapshot(http_url, model) for model in models}
    figures["latency"] = _latency(url, base.name, ensemble, rows, requests)
    figures["server"] = {
        model: _per_request(triton_stats.snapshot(http_url, model) - before[model])
        for model in models
    }
    return figures


def _per_request(stats: triton_stats.ModelStats) -> dict:
    """Triton's own timings between two snapshots: mean microseconds per request."""
    out: dict = {"requests": stats.success}
    for key in triton_stats.STAGES:
        out[f"{key}_us"] = stats.ns[key] / max(stats.success, 1) / 1000
    return out


async def _embed(url: str, manifest: Path, cache_dir: Path):
    from e2v.client.classify import JobOptions
    from e2v.client.evaluation.dataset import read_labelled
    from e2v.client.heads.cache import EmbeddingCache
    from e2v.client.heads.cli import _base_model
    from e2v.client.heads.embed import embed_rows, plan_rows
    from e2v.client.segment import SegmentMode
    from e2v.client.triton import TritonEmotionClient

    async with TritonEmotionClient(url) as client:
        base = await _base_model(client)
        identity = {
            "name": base.name,
            "version": base.version,
            "checkpoint_sha256": base.checkpoint_sha256,
            "embed_dim": base.embed_dim,
        }
        cache = EmbeddingCache(cache_dir, identity)
        rows = plan_rows(read_labelled(manifest), {})
        options = JobOptions(url=url, segment=SegmentMode("none"), concurrency=8)
        start = time.perf_counter()
        await embed_rows(rows, client, options, cache)
        seconds = time.perf_counter() - start
        if cache.hits:  # a rerun: the figure is only meaningful the first time
            seconds = None
        return [r for r in rows if r.used], client.info, base, seconds


def _train(rows, kind: str, folds: int) -> dict:
    from e2v.client.heads import train

    start = time.perf_counter()
    data = train.samples(rows, "speaker")
    cv = train.cross_validate(data, kind, folds, "none", 0)
    pipeline = train.fit(kind, "none", 0, data.x, data.y)
    seconds = time.perf_counter() - start
    accuracy = float(np.mean(np.array(data.labels)[cv.probabilities.argmax(1)] == data.y))
    return {
        "seconds": seconds,
        "cv_seconds": cv.seconds,
        "cv_accuracy": accuracy,
        "pipeline": pipeline,
    }


def _export(repo: Path, rows, base, pipeline) -> None:
    from e2v.client.heads import train
    from e2v.export.heads import export_head, from_sklearn

    x = train.samples(rows, None).x.astype(np.float32)
    export_head(repo, BENCH_NAME, from_sklearn(pipeline, "logistic"), base, "cpu", "none", None, x)


def _wait_ready(http_url: str, model: str, load, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if load is not None:
            load()
        try:
            with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/ready", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{model} was not loaded within {timeout_s:.0f} s")


def _latency(url: str, base: str, ensemble: str, rows, requests: int) -> dict:
    """Sequential requests, interleaved base/ensemble on the same clips (drift cancels)."""
    import tritonclient.grpc as grpcclient
    from e2v.client.audio import load_audio
    from e2v.loadtest.workload import triton_inputs

    from e2v.contract import bucket_samples

    clips = [load_audio(row.item.path) for row in rows[: min(len(rows), 50)]]
    timings: dict[str, list[float]] = {base: [], ensemble: []}
    with grpcclient.InferenceServerClient(url) as client:
        for i in range(requests + 10):
            clip = clips[i % len(clips)]
            wav = np.zeros((1, bucket_samples(len(clip))), np.float32)
            wav[0, : len(clip)] = clip
            inputs = triton_inputs(grpcclient, wav, np.array([[len(clip)]], np.int64))
            for model in (base, ensemble) if i % 2 else (ensemble, base):
                start = time.perf_counter()
                client.infer(model, inputs)
                if i >= 10:  # the first ten of each: warm-up
                    timings[model].append((time.perf_counter() - start) * 1000)
    out = {}
    for model, values in timings.items():
        out[model] = {
            "p50_ms": float(np.percentile(values, 50)),
            "p95_ms": float(np.percentile(values, 95)),
            "requests": len(values),
        }
    return out


def report(figures: dict) -> str:
    lines = []
    if figures["synthetic"]:
        lines.append("SYNTHETIC MODEL (random weights): timings are real, accuracies meaningless")
    embed = figures["embed_s"]
    lines.append(
        f"{figures['clips']} clips, {figures['embed_dim']}-dim embeddings from "
        f"'{figures['model']}': embedded in "
        + (f"{embed:.1f} s" if embed is not None else "(cached: see the first run)")
    )
    lines.append(f"{'head':<10} {'train + CV s':>12} {'CV s':>8} {'CV acc':>7}  vs embedding")
    for kind, t in figures["training"].items():
        ratio = f"{embed / t['seconds']:.0f}x faster" if embed else "-"
        lines.append(
            f"{kind:<10} {t['seconds']:>12.2f} {t['cv_seconds']:>8.2f} "
            f"{t['cv_accuracy'] * 100:>6.1f}%  {ratio}"
        )
    latency = figures["latency"]
    (base, b), (ensemble, e) = latency.items()
    lines.append(f"{'model':<24} {'p50 ms':>8} {'p95 ms':>8}  (sequential, same clips)")
    for name, values in latency.items():
        lines.append(f"{name:<24} {values['p50_ms']:>8.2f} {values['p95_ms']:>8.2f}")
    lines.append(
        f"head adds {e['p50_ms'] - b['p50_ms']:+.2f} ms p50, {e['p95_ms'] - b['p95_ms']:+.2f} ms "
        f"p95 (ratio {e['p95_ms'] / b['p95_ms']:.3f} at p95)"
    )
    server = figures["server"]
    head = server[f"head_{BENCH_NAME}"]
    compute = sum(head[f"compute_{k}_us"] for k in ("input", "infer", "output"))
    lines.append(
        f"Triton's statistics, mean per request: head {head['success_us'] / 1000:.2f} ms "
        f"(queue {head['queue_us'] / 1000:.2f}, compute {compute / 1000:.2f}) over "
        f"{head['requests']} requests"
    )
    return "\n".join(lines)
