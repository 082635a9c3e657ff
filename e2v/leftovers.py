"""What a Triton run can leave behind, and how `e2v serve` tells its own stale leftovers.

A run of `e2v serve` (or of `TritonServer` in a test) owns three kinds of things, each
named after the session and process that made it, so that a later run can tell a stale
leftover (its owner is gone) from one in use by a live server:

- its run directory  `<tmp>/e2v-serve-<sid>-<pid>-<random>/`  (backends, log, admin key);
- the Python backend's shared-memory regions  `/dev/shm/e2v_<sid>_<pid>_<token>_<uuid>`
  (`--backend-config=python,shm-region-prefix-name=...`);
- `triton_python_backend_stub` processes, whose second argument is that region name.

A stale region is only removed when no process has it open or mapped, so a live server's
regions are never touched, whoever started it. A run removes its own regions when it stops
(`TritonServer.kill`), mapped or not: by then its server is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
RUN_DIR_PREFIX = "e2v-serve-"
SHM_PREFIX = "e2v_"
STUB_NAME = "triton_python_backend_stub"
SERVER_NAME = "tritonserver"

_RUN_DIR = re.compile(rf"^{RUN_DIR_PREFIX}(\d+)-(\d+)-")
_SHM_REGION = re.compile(rf"^{SHM_PREFIX}(\d+)_(\d+)_")


def owner_tag(sep: str) -> str:
    """`<session id><sep><pid>` of this process: the owner part of every name above."""
    return f"{os.getsid(0)}{sep}{os.getpid()}"


def run_dir_prefix() -> str:
    return f"{RUN_DIR_PREFIX}{owner_tag('-')}-"


def shm_region_prefix(token: str) -> str:
    return f"{SHM_PREFIX}{owner_tag('_')}_{token}_"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Owner:
    sid: int
    pid: int


def run_dir_owner(path: Path) -> Owner | None:
    match = _RUN_DIR.match(path.name)
    return Owner(int(match[1]), int(match[2])) if match else None


def shm_region_owner(path: Path) -> Owner | None:
    match = _SHM_REGION.match(path.name)
    return Owner(int(match[1]), int(match[2])) if match else None


def run_dirs(tmp: Path | None = None) -> list[Path]:
    tmp = tmp or Path(tempfile.gettempdir())
    return sorted(p for p in tmp.glob(f"{RUN_DIR_PREFIX}*") if run_dir_owner(p))


def shm_regions(prefix: str = SHM_PREFIX) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def in_use(paths: list[Path]) -> set[Path]:
    """The `paths` that some process has open or mapped (as far as /proc lets us see)."""
    wanted = {str(p): p for p in paths}
    found: set[Path] = set()
    if not wanted:
        return found
    for pid in _pids():
        proc = Path("/proc") / str(pid)
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd).removesuffix(" (deleted)")
                if target in wanted:
                    found.add(wanted[target])
            with open(proc / "maps", errors="replace") as maps:
                for line in maps:
                    target = line.rstrip("\n").split(maxsplit=5)[-1]
                    if target in wanted:
                        found.add(wanted[target])
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def parent_pid(pid: int) -> int | None:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def stub_processes(prefix: str = SHM_PREFIX) -> list[int]:
    """Python-backend stubs whose shared-memory region starts with `prefix`."""
    stubs = []
    for pid in _pids():
        args = cmdline(pid)
        if len(args) > 2 and Path(args[0]).name == STUB_NAME and args[2].startswith(prefix):
            stubs.append(pid)
    return stubs


def orphan_stubs() -> list[int]:
    """Our stubs whose tritonserver is gone (stub argument 5 is the server's pid)."""
    orphans = []
    for pid in stub_processes():
        args = cmdline(pid)
        server = int(args[5]) if len(args) > 5 and args[5].isdigit() else None
        if parent_pid(pid) == 1 or server is None or not pid_alive(server):
            orphans.append(pid)
    return orphans


def remove_regions(paths: list[Path]) -> list[Path]:
    """Unlink the regions no process has open or mapped; returns those removed."""
    busy = in_use(paths)
    removed = []
    for path in paths:
        if path not in busy:
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def unlink_regions(paths: list[Path]) -> list[Path]:
    """Unlink `paths` whoever still maps them (only for regions of a run known to be over:
    a process that maps one keeps its mapping); returns those removed."""
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def clean_stale() -> list[str]:
    """Remove leftovers of `e2v serve` runs whose owner process is gone; what was removed."""
    removed = []
    for pid in orphan_stubs():
        try:
            os.kill(pid, signal.SIGKILL)
            removed.append(f"stub process {pid}")
        except ProcessLookupError:
            pass
    owned = [(p, shm_region_owner(p)) for p in shm_regions()]
    stale = [p for p, owner in owned if owner and not pid_alive(owner.pid)]
    removed += [str(p) for p in remove_regions(stale)]
    for path in run_dirs():
        if not pid_alive(run_dir_owner(path).pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed
