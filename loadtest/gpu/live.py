"""Live calls on the model tier: how many concurrent calls one GPU serves at p95 <= 150 ms.

The gateway's per-channel work (decode, resample, VAD) runs on CPU cores that scale apart
from the GPU (`e2v loadtest --live` measures channels per gateway core). What a GPU must
absorb is the gateway's requests: for every party that is speaking, one interim window
(the last `window_s`, padded to its bucket) every `hop_s`, and one final per utterance
(its whole length) once the merge gap has passed. This phase replays that request stream
open loop: each call follows the turn-taking of the live load test's recordings
(`loadtest.calls.turns`: turns of 1.5-7 s, gaps of 0.2-1.5 s, some overlap), calls start
at random phases, and every request is sent at its due time, whatever the answers before
it. Latency runs from the due time to the answer, so a client that falls behind shows as
latency too (its send lag is reported). Windows are not coalesced here: the figure needs
no help from the gateway's overload handling.

Bare GPU machines have no tritonclient: requests use `loadtest.closed_loop.Connection`
(the standard library), from several forked processes with a thread pool each.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np
from e2v.loadtest.calls import turns
from e2v.loadtest.gpu.phases import layout_label, layout_repo, served_workload, warm_up
from e2v.loadtest.gpu.plan import Phase, Plan
from e2v.loadtest.metrics import P95_TARGET_MS, percentiles

from e2v.contract import SAMPLE_RATE, bucket_samples

CALL_S = 60.0  # length of a call timeline; channels loop over them at random phases
CALL_POOL = 64  # distinct timelines
# A final is due this long after its utterance ends: the merge gap + padding (as
# `loadtest.live.FINAL_DUE_S`; client.segment is not importable on a bare GPU machine).
MERGE_DUE_S = 1.1
THREADS_PER_PROCESS = 128  # requests in flight per process (open loop needs many)


def call_timeline(rng: np.random.Generator, window_s: float, hop_s: float) -> np.ndarray:
    """Requests of one call, both parties: rows (due time s, samples, is_final)."""
    rows: list[tuple[float, int, int]] = []
    spoken: list[list[tuple[float, float]]] = [[], []]
    for speaker, t, length in turns(rng, CALL_S):
        spoken[speaker].append((t, t + length))
    window = round(window_s * SAMPLE_RATE)
    for party in spoken:
        for start, end in party:
            k = 1
            while start + k * hop_s <= end:
                rows.append((start + k * hop_s, min(window, round(k * hop_s * SAMPLE_RATE)), 0))
                k += 1
            rows.append((end + MERGE_DUE_S, round((end - start) * SAMPLE_RATE), 1))
    return np.array(sorted(rows), dtype=np.float64)


def padded_size(samples: int, final: bool, window_s: float) -> int:
    """The request's length: interims are padded to the window's bucket (as the gateway's
    scheduler sends them, one shape for all), finals to their own bucket."""
    return bucket_samples(int(samples) if final else round(window_s * SAMPLE_RATE))


def schedule(channels: int, seconds: float, window_s: float, hop_s: float, seed: int = 0):
    """The level's requests: rows (due s from the start, samples, is_final), time-sorted."""
    rng = np.random.default_rng(seed)
    pool = [call_timeline(rng, window_s, hop_s) for _ in range(CALL_POOL)]
    parts = []
    for channel in range(channels):
        rows = pool[channel % CALL_POOL].copy()
        rows[:, 0] = (rows[:, 0] - rng.uniform(0, CALL_S)) % CALL_S
        parts.append(rows[rows[:, 0] < seconds])
    rows = np.concatenate(parts) if parts else np.zeros((0, 3))
    return rows[np.argsort(rows[:, 0], kind="stable")]


def rate_per_channel(window_s: float, hop_s: float) -> float:
    """Requests per second one call brings (both parties), over the timeline pool."""
    rows = schedule(CALL_POOL, CALL_S, window_s, hop_s)
    return len(rows) / CALL_S / CALL_POOL


def run_level(
    http_url: str,
    channels: int,
    warm_s: float,
    measure_s: float,
    outputs: list[str],
    processes: int,
    window_s: float,
    hop_s: float,
    speech: np.ndarray,
) -> dict:
    """Open-loop replay of `channels` calls for warm + measure seconds; figures of the
    requests due inside the measured window."""
    rows = schedule(channels, warm_s + measure_s, window_s, hop_s, seed=channels)
    processes = max(1, processes)
    jobs = [(http_url, rows[i::processes], outputs, speech, window_s) for i in range(processes)]
    if processes == 1:
        parts = [_replay(*jobs[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.starmap(_replay, jobs)
    done = np.concatenate([p for p, _ in parts]).reshape(-1, 5)
    errors = sorted({e for _, es in parts for e in es})
    measured = done[done[:, 0] >= warm_s]
    ok = measured[:, 4] == 1
    latency = (measured[:, 2] - measured[:, 0]) * 1000
    lag = (measured[:, 1] - measured[:, 0]) * 1000
    finals = measured[:, 3] == 1
    return {
        "channels": channels,
        "offered_per_s": round(len(measured) / measure_s, 1),
        "requests": int(ok.sum()),
        "failures": int((~ok).sum()),
        "interim_ms": percentiles(latency[ok & ~finals]),
        "final_ms": percentiles(latency[ok & finals]),
        "all_ms": percentiles(latency[ok]),
        "send_lag_p95_ms": round(float(np.percentile(lag, 95)), 1) if len(lag) else None,
        "errors": errors,
    }


def within_target(level: dict) -> bool:
    return bool(
        level["failures"] == 0
        and level["all_ms"].get("count")
        and level["all_ms"]["p95"] <= P95_TARGET_MS
    )


def _replay(
    http_url: str, rows: np.ndarray, outputs: list[str], speech: np.ndarray, window_s: float
) -> tuple[np.ndarray, list[str]]:
    """Send `rows` at their due times from a thread pool: rows (due, sent, done, is_final,
    ok), times since the start."""
    import http.client

    from e2v.loadtest.closed_loop import Connection, InferError

    work: queue.Queue = queue.Queue()
    log: list[tuple[float, float, float, float, float]] = []
    errors: set[str] = set()
    lock = threading.Lock()
    start = time.perf_counter() + 0.2

    def worker() -> None:
        connection = Connection(http_url)
        try:
            while (item := work.get()) is not None:
                due, samples, final = item
                wav = np.zeros((1, padded_size(samples, bool(final), window_s)), np.float32)
                wav[0, : int(samples)] = speech[: int(samples)]
                sent = time.perf_counter() - start
                ok = 1.0
                try:
                    connection.infer(wav, np.array([[int(samples)]], np.int64), outputs)
                except (InferError, OSError, http.client.HTTPException) as exc:
                    ok = 0.0
                    with lock:
                        errors.add(str(exc).splitlines()[0][:200])
                    connection.close()
                    connection = Connection(http_url)
                with lock:
                    log.append((due, sent, time.perf_counter() - start, final, ok))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS_PER_PROCESS)]
    for thread in threads:
        thread.start()
    for due, samples, final in rows:
        delay = start + due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        work.put((due, samples, final))
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join()
    return np.array(log, dtype=np.float64).reshape(-1, 5), sorted(errors)


# -- the GPU benchmark's phase ----------------------------------------------------------


def phase(plan: Plan, phase: Phase) -> int:
    """Serve the live layout, then step up the channels until p95 passes the target."""
    from e2v.loadtest import closed_loop, triton_stats
    from e2v.loadtest.synth import speech_like

    from e2v.contract import LIVE_HOP_S, LIVE_WINDOW_S
    from e2v.serve import ServeError, ServerConfig, TritonServer

    instances, precision = plan.live_layout
    label = layout_label(instances, precision)
    repo = layout_repo(phase.work, plan.served_model, instances, precision)
    config = ServerConfig.on_free_ports(repo)
    server = TritonServer(config, log_path=phase.work / "tritonserver-live.log")
    pid_file = phase.work / "tritonserver.pid"
    speech = speech_like(30.0, SAMPLE_RATE, seed=7)
    per_channel = rate_per_channel(LIVE_WINDOW_S, LIVE_HOP_S)
    phase.emit(
        {
            "kind": "live_plan",
            "layout": label,
            "requests_per_channel_s": round(per_channel, 3),
            "window_s": LIVE_WINDOW_S,
            "hop_s": LIVE_HOP_S,
            "target_p95_ms": P95_TARGET_MS,
        }
    )
    try:
        server.start(timeout_s=max(10.0, min(120.0, phase.left_s() - 10)))
        pid_file.write_text(str(server.process.pid))
        model_config = triton_stats.model_config(config.http_url)
        settings = triton_stats.config_summary(model_config)
        outputs = closed_loop.output_names(model_config)
        warm_up(config.http_url, served_workload(plan.profile), outputs)
        phase.say(
            f"live, {label}: ready ({settings['instance_kind']}), {per_channel:.2f} req/s per call"
        )
        for channels in plan.live_channels:
            if phase.left_s() < plan.warm_s + plan.measure_s + 5:
                phase.emit({"kind": "live_note", "text": f"{channels} channels: skipped (budget)"})
                break
            before = triton_stats.snapshot(config.http_url)
            level = run_level(
                config.http_url,
                channels,
                plan.warm_s,
                plan.measure_s,
                outputs,
                max(1, min(6, (os.cpu_count() or 1) // 3)),
                LIVE_WINDOW_S,
                LIVE_HOP_S,
                speech,
            )
            after = triton_stats.snapshot(config.http_url)
            level |= {"kind": "live_level", "layout": label, "settings": settings}
            level["server"] = (after - before).as_dict()
            level["within_target"] = within_target(level)
            phase.emit(level)
            a = level["all_ms"]
            phase.say(
                f"live {channels:>5} calls: {level['offered_per_s']:7.1f} req/s  p50/95/99 "
                f"{a.get('p50')}/{a.get('p95')}/{a.get('p99')} ms  avg batch "
                f"{level['server']['avg_batch_size']:.2f}  send lag p95 "
                f"{level['send_lag_p95_ms']} ms  failed {level['failures']}"
            )
            if not level["within_target"]:
                break
        return 0
    except (ServeError, OSError, ValueError, closed_loop.InferError) as exc:
        phase.emit({"kind": "live_note", "text": f"{label}: failed: {exc}"})
        phase.say(f"live, {label}: failed: {exc}")
        return 1
    finally:
        server.stop(timeout_s=10)
        server.__exit__(None, None, None)
        pid_file.unlink(missing_ok=True)


def summary(rows: list[dict]) -> dict:
    """The live phase's headline: the most channels within the target."""
    levels = [r for r in rows if r.get("kind") == "live_level"]
    good = [lv for lv in levels if lv["within_target"]]
    best = max(good, key=lambda lv: lv["channels"], default=None)
    plan = next((r for r in rows if r.get("kind") == "live_plan"), {})
    return {
        "plan": plan,
        "levels": levels,
        "notes": [r["text"] for r in rows if r.get("kind") == "live_note"],
        "best_channels": best["channels"] if best else None,
        "best_p95_ms": best["all_ms"]["p95"] if best else None,
        "capped_by_levels": bool(best) and best is levels[-1],
    }


def markdown(live: dict) -> list[str]:
    """The report's live section."""
    plan = live["plan"]
    lines = ["", "## Live calls (open-loop replay of the gateway's requests)", ""]
    if not plan:
        return lines + ["Not measured (the phase did not run)."]
    lines += [
        f"Layout {plan['layout']}. Each call is two parties taking turns: one interim window "
        f"({plan['window_s']:g} s, padded to its bucket) per {plan['hop_s']:g} s of speech "
        f"and a final per utterance, {plan['requests_per_channel_s']} requests/s per call; "
        "requests are sent at their due time whatever came back (open loop), latency from "
        "the due time to the answer. No coalescing.",
        "",
        "| calls | req/s | interim p50 / p95 / p99 ms | final p50 / p95 / p99 ms | avg batch "
        "| send lag p95 ms | failed | within p95 <= 150 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lv in live["levels"]:
        i, f = lv["interim_ms"], lv["final_ms"]
        lines.append(
            f"| {lv['channels']} | {lv['offered_per_s']:.0f} "
            f"| {i.get('p50', '-')} / {i.get('p95', '-')} / {i.get('p99', '-')} "
            f"| {f.get('p50', '-')} / {f.get('p95', '-')} / {f.get('p99', '-')} "
            f"| {lv['server']['avg_batch_size']:.2f} | {lv['send_lag_p95_ms']} "
            f"| {lv['failures']} | {'yes' if lv['within_target'] else 'no'} |"
        )
    best = live["best_channels"]
    lines += [
        "",
        f"**Concurrent calls at p95 <= {P95_TARGET_MS:g} ms: {best}**"
        + (" (the highest level tried: more may fit)" if live["capped_by_levels"] else "")
        if best
        else f"No level met p95 <= {P95_TARGET_MS:g} ms.",
    ]
    lines += [f"\nnot measured: {note}" for note in live["notes"]]
    return lines
