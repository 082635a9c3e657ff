"""On-disk cache of served embeddings, so that training a head again never re-encodes.

An entry is one labelled row's segments: their embeddings [n, D] float32, their bounds in
seconds and the audio's duration. Its key is the SHA-256 of the file's bytes, the model's
identity (name, versions, checkpoint_sha256, embedding size), the segmentation and the
labelled span; renaming or moving a file keeps its entry, changing a byte does not.

Entries are `.npz` files (no pickles) written atomically. One that cannot be read, or
whose stored key differs from its name's, is a miss: it is deleted and recomputed. The
cache is bounded: past `max_bytes`, the least recently used entries are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1  # bump when the segmentation or the entry layout changes
DEFAULT_MAX_BYTES = 2 * 2**30
_HASH_BLOCK = 1 << 20


def default_cache_dir() -> Path:
    """`$E2V_CACHE/embeddings`, else `~/.cache/emotion2vec-triton/embeddings`."""
    root = os.environ.get("E2V_CACHE") or Path.home() / ".cache" / "emotion2vec-triton"
    return Path(root) / "embeddings"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Embedded:
    """One row's served segments: what training needs, and what the cache stores."""

    embeddings: np.ndarray  # [n, D] float32; n = 0 when no speech was found
    bounds: np.ndarray  # [n, 2] start and end in seconds, relative to the file
    duration_s: float  # of the audio the row covers


class EmbeddingCache:
    def __init__(self, directory: Path, model_identity: dict, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = directory
        self.identity = model_identity
        self.max_bytes = max_bytes
        self.hits = self.misses = self.repaired = 0

    def key(
        self,
        sha256: str,
        segment: str,
        span: tuple[float, float] | None,
        channel: int | None = None,
    ) -> str:
        document = {
            "format": CACHE_FORMAT,
            "model": self.identity,
            "file_sha256": sha256,
            "segment": segment,
            "span": list(span) if span else None,
        }
        if channel is not None:  # --channels split: one channel's speech (mixes keep their keys)
            document["channel"] = channel
        text = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str, dim: int) -> Embedded | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key = str(data["key"])
                embedded = Embedded(
                    data["embeddings"].astype(np.float32, copy=False),
                    data["bounds"].astype(np.float64, copy=False),
                    float(data["duration_s"]),
                )
            _check(embedded, stored_key, key, dim)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            self.repaired += 1
            self.misses += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept longest by prune()
        self.hits += 1
        return embedded

    def put(self, key: str, embedded: Embedded) -> None:
        """Store atomically; a failure to write (disk full, read-only) only costs a miss later."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                np.savez(
                    file,
                    key=np.array(key),
                    embeddings=embedded.embeddings.astype(np.float32),
                    bounds=embedded.bounds.astype(np.float64),
                    duration_s=np.array(embedded.duration_s),
                )
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)

    def prune(self) -> int:
        """Remove least recently used entries until the cache fits `max_bytes`; returns
        how many were removed."""
        if not self.directory.is_dir():
            return 0
        entries = []
        for path in self.directory.glob("*/*.tmp"):  # left by a killed run
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - 3600:
                    path.unlink()
        for path in self.directory.glob("*/*.npz"):
            with contextlib.suppress(OSError):
                info = path.stat()
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                removed += 1
        return removed


def _check(embedded: Embedded, stored_key: str, key: str, dim: int) -> None:
    e, b = embedded.embeddings, embedded.bounds
    if stored_key != key:
        raise ValueError("entry holds another key")
    if e.ndim != 2 or e.shape[1] != dim or b.shape != (e.shape[0], 2):
        raise ValueError("entry has the wrong shape")
    if not (np.isfinite(e).all() and np.isfinite(b).all() and np.isfinite(embedded.duration_s)):
        raise ValueError("entry holds non-finite values")
