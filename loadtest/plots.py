"""PNG figures of a load-test report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from e2v.loadtest.bench import RunResult  # noqa: E402


def ramp_plot(results: list[RunResult], path: Path) -> Path:
    """Throughput and p50/p95/p99 latency against concurrency: a colour per run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, color in zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        users = [s.users for s in run.steps]
        left.plot(
            users, [s.audio_s_per_s for s in run.steps], "o-", color=color, label=run_label(run)
        )
        left.plot([run.summary.users], [run.summary.audio_s_per_s], "*", ms=14, color=color)
        for quantile, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
            right.plot(
                users,
                [getattr(s, f"{quantile}_ms") / 1000 for s in run.steps],
                style,
                color=color,
                label=f"{run_label(run)} {quantile}",
            )
    left.set(
        xlabel="concurrent users",
        ylabel="audio seconds / second",
        title="Throughput (real-time factor); star: saturation",
    )
    right.set(xlabel="concurrent users", ylabel="latency (s)", title="Latency p50 / p95 / p99")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylim(bottom=0)
    return _save(fig, path)


def run_label(run: RunResult) -> str:
    return f"{run.target.label} " + ("ramp" if run.steps else f"{run.load.users} users")


def batch_histogram(results: list[RunResult], path: Path) -> Path:
    """Executions per batch size (Triton statistics), grouped bars per run."""
    served = [r for r in results if r.server and r.server.executions_by_batch]
    sizes = sorted({size for r in served for size in r.server.executions_by_batch})
    fig, axis = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(1, len(served))
    for k, run in enumerate(served):
        counts = [run.server.executions_by_batch.get(size, 0) for size in sizes]
        positions = [i + (k - (len(served) - 1) / 2) * width for i in range(len(sizes))]
        axis.bar(
            positions,
            counts,
            width,
            label=f"{run_label(run)} (avg {run.server.avg_batch_size:.2f})",
        )
    axis.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    axis.set(
        xlabel="batch size (requests per model execution)",
        ylabel="executions",
        title="Dynamic batching: executions by batch size",
    )
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7)
    return _save(fig, path)


def comparison_plot(rows: list[tuple[str, float, float | None, float | None]], path: Path) -> Path:
    """Bars of audio-s/s per system, and p50/p95 latency where measured.

    `rows`: (label, audio_s_per_s, p50_ms or None, p95_ms or None).
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [r[0] for r in rows]
    left.barh(labels, [r[1] for r in rows], color="tab:blue")
    left.set(xlabel="audio seconds / second", title="Throughput at equal concurrency")
    timed = [r for r in rows if r[2] is not None]
    positions = range(len(timed))
    right.barh([p - 0.2 for p in positions], [r[2] / 1000 for r in timed], 0.4, label="p50")
    right.barh([p + 0.2 for p in positions], [r[3] / 1000 for r in timed], 0.4, label="p95")
    right.set_yticks(list(positions), [r[0] for r in timed])
    right.set(xlabel="latency (s)", title="Latency")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
