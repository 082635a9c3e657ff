"""The machine a measurement ran on, as the reports name it, and processes' CPU time."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path


def machine_description() -> str:
    """'N CPU cores (model name), OS release'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}"


def software(packages: Iterable[str], triton_versions: Iterable[str] = ()) -> str:
    """'Triton server V, package version, ...' for the Triton versions given and the
    packages installed here (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = [f"Triton server {v}" for v in triton_versions]
    for name in packages:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def load_average() -> float:
    """The 1-minute load average, to 0.01 (reports print it before and after a run: this
    machine's cores may be shared)."""
    return round(os.getloadavg()[0], 2)


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` (its threads included), from /proc;
    None without a pid or once the process is gone."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
