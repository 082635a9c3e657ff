"""Fuzz: mutated WAV / MP3 / FLAC headers and bodies through the real classify job.

A seeded generator (reproducible, no extra dependency) flips, overwrites, truncates,
duplicates and rewrites header fields of real encoded files. Every case must end in a
row, the job must finish (exit 0 or 4), and the client's memory must stay bounded.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import audio_fixtures as fx
import numpy as np
from test_client_reliability import CLIENT_RSS_BOUND_MB, run_measuring_rss

# CI runs one fixed seed; E2V_FUZZ_SEED / E2V_FUZZ_CASES run other and longer campaigns.
CASES_PER_FORMAT = int(os.environ.get("E2V_FUZZ_CASES", "100"))
SEED = int(os.environ.get("E2V_FUZZ_SEED", "20261126"))


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation of an encoded file, biased towards its header."""
    out = bytearray(data)
    kind = rng.integers(7)
    if kind == 0:  # flip bits in the header
        for _ in range(rng.integers(1, 8)):
            position = int(rng.integers(0, min(64, len(out))))
            out[position] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # overwrite a 32-bit header field with an extreme value
        position = int(rng.integers(0, min(60, len(out) - 4)))
        value = int(rng.choice([0, 1, 7, 0x7FFFFFFF, 0xFFFFFFFF, int(rng.integers(2**32))]))
        out[position : position + 4] = struct.pack("<I", value)
    elif kind == 2:  # random bytes over part of the body
        start = int(rng.integers(0, len(out)))
        size = int(rng.integers(1, 2048))
        out[start : start + size] = rng.bytes(min(size, len(out) - start))
    elif kind == 3:  # truncated anywhere
        out = out[: int(rng.integers(0, len(out)))]
    elif kind == 4:  # a chunk repeated (confuses framing and sizes)
        start = int(rng.integers(0, len(out)))
        out[start:start] = out[start : start + int(rng.integers(1, 4096))] * 3
    elif kind == 5:  # bytes deleted from the middle
        start = int(rng.integers(0, len(out)))
        del out[start : start + int(rng.integers(1, 512))]
    else:  # two mutations
        return mutate(mutate(bytes(out), rng), rng)
    return bytes(out)


def test_mutated_files_all_end_in_a_row_with_bounded_memory(tiny_server, tmp_path):
    sources = {
        suffix: fx.write_audio(tmp_path / f"source{suffix}", fx.speech_like(1.5, seed=1), rate)
        for suffix, rate in ((".wav", 16_000), (".mp3", 44_100), (".flac", 22_050))
    }
    cases = tmp_path / "cases"
    cases.mkdir()
    rng = np.random.default_rng(SEED)
    for suffix, source in sources.items():
        data = source.read_bytes()
        for i in range(CASES_PER_FORMAT):
            (cases / f"case{i:03d}{suffix}").write_bytes(mutate(data, rng))
    command = [sys.executable, "-m", "e2v", "classify", "--no-progress", str(cases), "--json"]
    command += ["--url", tiny_server.config.grpc_url, "--max-duration-s", "120"]
    peak_mb, result = run_measuring_rss(command, timeout=600)
    assert result.returncode in (0, 4), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    files = sorted(str(p) for p in cases.iterdir())
    assert sorted(row["file"] for row in rows) == files  # every case once
    kinds = {row.get("error_kind") for row in rows}
    assert None in kinds and "decode" in kinds  # both outcomes were exercised
    assert "internal" not in kinds, [r for r in rows if r.get("error_kind") == "internal"]
    print(f"fuzz: {len(rows)} cases, kinds {sorted(map(str, kinds))}, peak RSS {peak_mb:.0f} MB")
    assert peak_mb < CLIENT_RSS_BOUND_MB
