"""`e2v classify --workers 3` against the real tritonserver, one worker SIGKILLed mid-job.

With one file per batch (--concurrency 3 over 3 workers) the dead worker had exactly one
file in hand: that file, and only it, gets an `internal` row. The two other workers keep
running (same processes) and every other file gets its normal result.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import audio_fixtures as fx
import psutil

E2V = [sys.executable, "-m", "e2v"]
# Enough that the job outlasts the check a second after the kill (30 were not, once, in CI).
FILES = 120


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def workers_of(pid: int) -> list[psutil.Process]:
    """The job's worker processes (multiprocessing's spawn children)."""
    children = psutil.Process(pid).children()
    return [c for c in children if any("spawn_main" in part for part in c.cmdline())]


def test_a_killed_worker_costs_only_the_file_it_held(tiny_server, tmp_path):
    files = [
        fx.write_audio(tmp_path / f"f{i:03d}.wav", fx.speech_like(4.0, seed=i))
        for i in range(FILES)
    ]
    out = tmp_path / "rows.csv"
    command = [*E2V, "classify", "--no-progress", *map(str, files), "--csv", str(out)]
    command += ["--url", tiny_server.config.grpc_url, "--workers", "3", "--concurrency", "3"]
    command += ["--segment", "fixed:1"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() or len(csv_rows(out)) < 6:
            assert time.monotonic() < deadline and job.poll() is None, "no rows from the job"
            time.sleep(0.05)
        workers = workers_of(job.pid)
        assert len(workers) == 3
        victim, others = workers[0], workers[1:]
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(1.0)
        assert job.poll() is None, "the job ended before the check: it needs more files"
        assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in others)
        replaced = {w.pid for w in workers_of(job.pid)}
        assert {w.pid for w in others} <= replaced and victim.pid not in replaced
        assert len(replaced) == 3  # a fresh worker took the dead one's place
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 4, stderr  # 4: some files failed
    rows = csv_rows(out)
    assert sorted(r["file"] for r in rows) == sorted(map(str, files))  # each file once
    died = [r for r in rows if r["error_kind"] == "internal"]
    assert len(died) == 1 and "worker process died" in died[0]["error"], died
    assert all(r["emotion"] and not r["error"] for r in rows if r not in died)
