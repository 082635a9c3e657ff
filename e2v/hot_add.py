"""`e2v serve --hot-add`: models added to the repository go live without a restart.

Triton runs in explicit model-control mode with `--load-model=*` (at start it loads the
repository exactly as "none" does). While it runs, `RepositoryWatcher.scan()` looks for
model directories that were not there at start and loads each through the model-
repository API with the server's admin key. It only ever adds:

- a model already loaded is never reloaded and never unloaded (not even when its files
  change: restart, or publish under a new name);
- a new directory loads once its contents have not changed between two scans (so a
  model copied in by hand is not loaded half-written; `e2v train-head` publishes by
  atomic rename);
- models that an ensemble runs load before the ensemble, and an ensemble whose models
  are not all loaded waits;
- an ensemble that would make Triton reload a model already serving (one whose files
  changed since start) is refused: loading it would interrupt that model;
- a model that failed to load is retried only when its files change.

Loading an ensemble makes Triton poll its composing models; unchanged ones are left
alone (ModelRepositoryManager compares their timestamps), so the base model keeps
serving throughout. tests/test_heads.py checks this under load.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from e2v.contract import ADMIN_KEY_HEADER

MAX_FILES_PER_MODEL = 10_000  # a signature walk reads no further (a wrong directory)
LOAD_TIMEOUT_S = 600.0  # loading includes warmup


def signature(model_dir: Path) -> tuple:
    """What changes when any file of the model changes: (path, size, mtime) of each, except
    the `__pycache__` that loading a Python-backend model writes."""
    entries = []
    for root, dirs, files in os.walk(model_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")  # the Python backend writes it
        for name in sorted(files):
            path = Path(root) / name
            try:
                info = path.stat()
            except OSError:
                continue
            entries.append((str(path.relative_to(model_dir)), info.st_size, info.st_mtime_ns))
            if len(entries) >= MAX_FILES_PER_MODEL:
                return tuple(entries)
    return tuple(entries)


def model_dirs(repo: Path) -> dict[str, Path]:
    """Model directories of `repo` (with a config.pbtxt; hidden staging folders skipped)."""
    try:
        entries = list(repo.iterdir())
    except OSError:
        return {}
    return {
        p.name: p for p in entries if not p.name.startswith(".") and (p / "config.pbtxt").is_file()
    }


def composing_models(config_path: Path) -> list[str]:
    """The models an ensemble runs ([] for any other model, or a config that does not parse)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError):
        return []
    return [step.model_name for step in config.ensemble_scheduling.step]


class RepositoryWatcher:
    """Loads models added to a running server's repository (see the module docstring)."""

    def __init__(
        self,
        repo: Path,
        http_url: str,
        admin_key: str,
        runtime_repo: Path | None = None,
        overlay: Callable[[Path, Path], None] | None = None,
        poll_s: float = 1.0,
        say: Callable[[str], None] = print,
    ):
        self.repo, self.http_url, self.admin_key = repo, http_url, admin_key
        self.runtime_repo = runtime_repo or repo
        self.overlay = overlay  # writes a model's entry into runtime_repo (e2v serve's copy)
        self.poll_s, self.say = poll_s, say
        self.loaded = {name: signature(path) for name, path in model_dirs(repo).items()}
        self._seen: dict[str, tuple] = {}  # new model -> signature at the previous scan
        self._failed: dict[str, tuple] = {}  # model -> signature when its load failed
        self._waiting: set[str] = set()  # ensembles told to wait (said once)
        self._next = 0.0

    def maybe_scan(self) -> list[str]:
        """`scan()` at most once per `poll_s`."""
        if time.monotonic() < self._next:
            return []
        self._next = time.monotonic() + self.poll_s
        try:
            return self.scan()
        except Exception as exc:  # noqa: BLE001 - the server must keep serving regardless
            self.say(f"hot-add: scan failed ({type(exc).__name__}: {exc}); will retry")
            return []

    def scan(self) -> list[str]:
        """Load every new, settled model; returns the names loaded."""
        ready = []
        for name, path in sorted(model_dirs(self.repo).items()):
            if name in self.loaded:
                continue
            sig = signature(path)
            if self._failed.get(name) == sig:
                continue
            if self._seen.get(name) != sig:
                self._seen[name] = sig  # changed since the last scan: wait for it to settle
                continue
            ready.append((name, path, sig, composing_models(path / "config.pbtxt")))
        loaded = []
        # Plain models first; an ensemble once every model it runs is loaded.
        for name, path, sig, steps in sorted(ready, key=lambda item: bool(item[3])):
            missing = [step for step in steps if step not in self.loaded]
            if missing:
                if name not in self._waiting:
                    self.say(f"hot-add: {name} waits for {', '.join(missing)}")
                    self._waiting.add(name)
                continue
            changed = [s for s in steps if signature(self.repo / s) != self.loaded[s]]
            if changed:
                self._fail(
                    name,
                    sig,
                    f"{', '.join(changed)} changed on disk since it was loaded, and loading "
                    f"{name} would reload it: restart the server to serve the new files",
                )
                continue
            if self._load(name, path, sig):
                loaded.append(name)
        return loaded

    def _load(self, name: str, path: Path, sig: tuple) -> bool:
        if self.overlay is not None and self.runtime_repo != self.repo:
            target = self.runtime_repo / name
            if target.exists():  # left by a failed load: its links may point at old files
                shutil.rmtree(target)
            self.overlay(path, target)
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{name}/load",
            data=b"{}",
            method="POST",
            headers={ADMIN_KEY_HEADER: self.admin_key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT_S):
                pass
        except urllib.error.HTTPError as exc:
            self._fail(name, sig, _error_text(exc))
            return False
        except (urllib.error.URLError, OSError) as exc:
            self.say(f"hot-add: cannot reach the server to load {name}: {exc}; will retry")
            self._seen.pop(name, None)
            return False
        self.loaded[name] = sig
        self._waiting.discard(name)
        self.say(f"hot-add: loaded {name}")
        return True

    def _fail(self, name: str, sig: tuple, reason: str) -> None:
        self._failed[name] = sig
        self.say(f"hot-add: {name} not loaded: {reason}")


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read(65536).decode("utf-8", "replace")
        message = json.loads(body).get("error", body)
    except (OSError, ValueError, AttributeError):
        message = str(exc)
    return " ".join(str(message).split())[:500]
