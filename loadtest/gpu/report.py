"""The GPU benchmark's report: `report.md`, `report.json` and up to three PNGs, one folder.

Built from the phases' JSON lines; a phase that failed or ran out of time leaves gaps that
the report names instead of hiding.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from e2v.loadtest.gpu import live
from e2v.loadtest.metrics import P95_TARGET_MS, cost_per_1000_audio_hours

SYNTHETIC_NOTE = (
    "> **SYNTHETIC MODELS**: seeded random weights in the published architectures. Speed and\n"
    "> memory are those of the real models of these sizes; the emotion labels are meaningless."
)
FIGURES = ("alone-throughput.png", "alone-memory.png", "served.png")


def write(
    directory: Path,
    plan: dict,
    phases: list[dict],
    results: dict[str, list[dict]],
    price_per_hour: float,
    elapsed_s: float,
) -> list[Path]:
    """Write the report into `directory`; returns the files written."""
    data = collect(plan, phases, results, price_per_hour, elapsed_s)
    figures, figure_note = _figures(data, directory)
    data["figures"] = [p.name for p in figures]
    (directory / "report.json").write_text(json.dumps(data, indent=2))
    (directory / "report.md").write_text(markdown(data, figure_note))
    return [directory / "report.md", directory / "report.json", *figures]


def collect(
    plan: dict,
    phases: list[dict],
    results: dict[str, list[dict]],
    price_per_hour: float,
    elapsed_s: float,
) -> dict:
    kinds: dict[str, list[dict]] = defaultdict(list)
    for phase_rows in results.values():
        for row in phase_rows:
            kinds[row.get("kind", "")].append(row)
    environment = (kinds["environment"] or [{}])[0]
    levels = [r for r in kinds["level"] if r.get("status") == "ok"]
    for level in levels:
        rate = level["summary"]["audio_s_per_s"]
        level["cost_per_1000_audio_h"] = (
            round(cost_per_1000_audio_hours(price_per_hour, rate), 3) if rate > 0 else None
        )
    data = {
        "plan": plan,
        "phases": phases,
        "elapsed_s": round(elapsed_s, 1),
        "environment": environment,
        "price_per_hour": price_per_hour,
        "models": kinds["model"],
        "alone": {
            "sweep": kinds["sweep"],
            "accuracy": kinds["accuracy"],
            "workload": [r for r in kinds["workload"] if "model" in r],
            "probes": kinds["probe"],
            "notes": [r["text"] for r in kinds["note"]],
        },
        "served": {
            "workload": next((r for r in kinds["workload"] if "profile" in r), None),
            "levels": levels,
            "not_measured": [
                r for r in kinds["level"] + kinds["layout"] if r.get("status") != "ok"
            ],
        },
        "live": live.summary(results.get("live", [])),
    }
    data["summary"] = summary(data)
    return data


def summary(data: dict) -> dict:
    """Headline figures: best alone per model and precision, best served layout, ratios."""
    best: dict[str, dict] = {}
    for row in data["alone"]["sweep"]:
        if row.get("status") != "ok":
            continue
        key = f"{row['model']} {row['precision']}"
        if key not in best or row["audio_s_per_s"] > best[key]["audio_s_per_s"]:
            best[key] = {k: row[k] for k in ("audio_s_per_s", "bucket_s", "batch")}
    for key, row in best.items():
        model = key.split()[0]
        fp32 = best.get(f"{model} fp32")
        if fp32:
            row["vs_fp32"] = round(row["audio_s_per_s"] / fp32["audio_s_per_s"], 3)
    result: dict = {"alone_best": best}
    levels = data["served"]["levels"]
    if levels:
        top = max(levels, key=lambda r: r["summary"]["audio_s_per_s"])
        result["served_best"] = {
            "layout": top["layout"],
            "users": top["summary"]["users"],
            "audio_s_per_s": top["summary"]["audio_s_per_s"],
            "p95_ms": top["summary"]["p95_ms"],
            "avg_batch_size": top["server"]["avg_batch_size"],
            "cost_per_1000_audio_h": top["cost_per_1000_audio_h"],
        }
        alone = {r["precision"]: r["audio_s_per_s"] for r in data["alone"]["workload"]}
        if alone.get(top["precision"]):
            result["served_vs_alone_same_workload"] = round(
                top["summary"]["audio_s_per_s"] / alone[top["precision"]], 3
            )
    return result


# -- markdown -----------------------------------------------------------------------------


def markdown(data: dict, figure_note: str) -> str:
    env, plan = data["environment"], data["plan"]
    device = env.get("gpu") or (
        f"CPU only ({env.get('cpu_count')} cores): dry run"
        if plan["mode"] == "cpu"
        else "a machine where torch sees no GPU"
    )
    lines = [f"# emotion2vec `torch` target on {device}", "", SYNTHETIC_NOTE, ""]
    lines += [
        "- command: `bash scripts/gpu-bench.sh" + (" --cpu`" if plan["mode"] == "cpu" else "`"),
        f"- machine: {_machine(env)}",
        f"- software: Python {env.get('python')}, torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}), numpy {env.get('numpy')}, Triton from nvidia-pytriton 0.7.0",
        f"- total time: {data['elapsed_s']:.0f} s; how to read this: `loadtest/GPU.md`",
        "",
        "| phase | status | seconds | budget |",
        "| --- | --- | --- | --- |",
    ]
    for phase in data["phases"]:
        budget = plan["budgets"].get(phase["phase"], "")
        lines.append(f"| {phase['phase']} | {phase['status']} | {phase['seconds']} | {budget} |")
    lines += _headline(data)
    lines += _models(data)
    lines += _alone(data, plan)
    lines += _served(data)
    lines += live.markdown(data.get("live") or live.summary([]))
    lines += ["", "## Figures", "", figure_note or ""]
    lines += [f"![{name}]({name})" for name in data.get("figures", [])]
    return "\n".join(lines).rstrip() + "\n"


def _machine(env: dict) -> str:
    parts = []
    if env.get("gpu"):
        parts.append(
            f"{env['gpu']} ({env.get('gpu_memory_gib')} GiB, driver {env.get('driver') or '?'})"
        )
    parts.append(f"{env.get('cpu_count')} CPU cores")
    if "dev_shm_free_gib" in env:
        parts.append(f"/dev/shm {env['dev_shm_free_gib']} GiB free")
    parts.append(env.get("platform", ""))
    return ", ".join(p for p in parts if p)


def _headline(data: dict) -> list[str]:
    s = data["summary"]
    lines = ["", "## Headline", ""]
    for key, row in s.get("alone_best", {}).items():
        ratio = f" ({row['vs_fp32']:.2f}x fp32)" if "vs_fp32" in row else ""
        lines.append(
            f"- model alone, {key}: best {row['audio_s_per_s']:.1f} audio s/s at "
            f"{row['bucket_s']:g} s x {row['batch']}{ratio}"
        )
    best = s.get("served_best")
    if best:
        cost = best["cost_per_1000_audio_h"]
        lines.append(
            f"- served ({best['layout']}): best {best['audio_s_per_s']:.1f} audio s/s at "
            f"{best['users']} users, p95 {best['p95_ms']:.0f} ms, avg batch "
            f"{best['avg_batch_size']:.2f}; USD {cost:.3f} per 1,000 audio hours at "
            f"USD {data['price_per_hour']:.2f}/h"
        )
    if "served_vs_alone_same_workload" in s:
        lines.append(
            f"- served / alone on the same call-centre clips: "
            f"{s['served_vs_alone_same_workload']:.2f} (1 = no serving overhead)"
        )
    calls = data.get("live", {})
    if calls.get("best_channels"):
        lines.append(
            f"- live calls ({calls['plan']['layout']}): {calls['best_channels']} concurrent calls "
            f"(two parties each) at p95 {calls['best_p95_ms']:.0f} ms <= "
            f"{P95_TARGET_MS:g} ms"
        )
    return lines


def _models(data: dict) -> list[str]:
    lines = ["", "## Models (`e2v export --target torch`)", ""]
    lines += ["| model | parameters | export s | parity with FunASR (max abs diff) |"]
    lines += ["| --- | --- | --- | --- |"]
    for m in data["models"]:
        parity = ", ".join(f"{k} {v:.2g}" for k, v in m["parity"].items()) or "not checked"
        params = f"{m['parameters'] / 1e6:.1f} M"
        lines.append(f"| synthetic:{m['size']} | {params} | {m['seconds']} | {parity} |")
    return lines


def _alone(data: dict, plan: dict) -> list[str]:
    alone = data["alone"]
    lines = ["", "## Model alone (torch target runner, no Triton)", ""]
    lines.append(
        "Audio seconds per wall second, full-length rows of each bucket, host copies included "
        "(pinned memory). Peak memory: `torch.cuda.max_memory_allocated`."
    )
    batches = plan["batches"]
    header = "| model | precision | bucket | " + " | ".join(f"x{b}" for b in batches) + " |"
    rule = "| --- " * (3 + len(batches)) + "|"
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for row in alone["sweep"]:
        cells[(row["model"], row["precision"], row["bucket_s"])][row["batch"]] = row
    for title, field, fmt in (
        ("audio s/s", "audio_s_per_s", "{:.1f}"),
        ("peak GiB", "peak_memory_gib", "{:.2f}"),
    ):
        if not any(field in r for r in alone["sweep"]):
            continue
        lines += ["", f"**{title}**", "", header, rule]
        for (model, precision, bucket), by_batch in cells.items():
            values = [_cell(by_batch.get(b), field, fmt) for b in batches]
            lines.append(f"| {model} | {precision} | {bucket:g} s | " + " | ".join(values) + " |")
    if alone["accuracy"]:
        lines += ["", "**Precision: max abs diff on the parity clips**", ""]
        lines += [
            "| model | precision | vs fp32 same device | vs fp32 on CPU |",
            "| --- " * 4 + "|",
        ]
        for row in alone["accuracy"]:
            same = _diffs(row["vs_fp32_same_device"])
            lines.append(
                f"| {row['model']} | {row['precision']} | {same} | {_diffs(row['vs_fp32_cpu'])} |"
            )
    if alone["workload"]:
        lines += ["", "**The served call-centre clips, alone** (bucketed as the batcher would)", ""]
        lines += ["| model | precision | batch | clips | audio s/s |", "| --- " * 5 + "|"]
        for row in alone["workload"]:
            lines.append(
                f"| {row['model']} | {row['precision']} | <= {row['batch_size']} | "
                f"{row['clips']} | {row['audio_s_per_s']:.1f} |"
            )
    probes = [r for r in alone["probes"] if r.get("probe") == "cuda_graph"]
    if probes:
        lines += ["", "**CUDA graph probe** (device time per call, 3 s bucket)", ""]
        lines += ["| precision | batch | eager ms | graph ms | speedup |", "| --- " * 5 + "|"]
        for row in probes:
            if row["status"] == "ok":
                lines.append(
                    f"| {row['precision']} | {row['batch']} | {row['eager_ms']} | "
                    f"{row['graph_ms']} | {row['speedup']:.2f}x |"
                )
            else:
                lines.append(f"| {row['precision']} | {row['batch']} | {row['status']} | | |")
    lines += [f"\nnot measured: {note}" for note in alone["notes"]]
    for row in alone["probes"]:
        if row.get("probe") == "jit_optimized_execution":
            figures = (
                f"plain {row['plain_ms']} ms, optimising executor {row['optimized_ms']} ms "
                f"({row['speedup']:.2f}x)"
                if row["status"] == "ok"
                else row["status"]
            )
            lines += [
                "",
                f"**TorchScript optimising executor** ({row['precision']}, "
                f"{row['bucket_s']:g} s x {row['batch']}, after 8 warm-up calls): {figures}",
            ]
    return lines


def _cell(row: dict | None, field: str, fmt: str) -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return row.get("status", "-")
    return fmt.format(row[field]) if field in row else "-"


def _diffs(diffs: dict) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())


def _served(data: dict) -> list[str]:
    served = data["served"]
    lines = ["", "## Served (tritonserver, dynamic batching, closed loop over HTTP)", ""]
    workload = served["workload"]
    if workload:
        lines.append(
            f"Profile `{workload['profile']}`: {workload['clips']} clips, {workload['audio_s']} s "
            "of audio, padded to their length buckets; users send without think time. Batch "
            "sizes and queue/compute times come from Triton's statistics for each level."
        )
    lines += [
        "",
        "| layout | users | audio s/s | req/s | p50 ms | p95 ms | p99 ms | avg batch | "
        "executions by batch size | queue ms | compute ms | failed | USD / 1000 audio h |",
        "| --- " * 13 + "|",
    ]
    for level in served["levels"]:
        s, server = level["summary"], level["server"]
        histogram = " ".join(f"{k}:{v}" for k, v in server["executions_by_batch_size"].items())
        cost = level["cost_per_1000_audio_h"]
        lines.append(
            f"| {level['layout']} | {s['users']} | {s['audio_s_per_s']:.1f} | "
            f"{s['requests_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
            f"{s['p99_ms']:.0f} | {server['avg_batch_size']:.2f} | {histogram} | "
            f"{server['avg_ms']['queue']:.1f} | {server['avg_ms']['compute_infer']:.1f} | "
            f"{s['failures']} | {cost if cost is not None else '-'} |"
        )
    for row in served["not_measured"]:
        lines.append(f"\nnot measured: {row.get('layout') or row}: {row['status']}")
    errors = sorted({e for level in served["levels"] for e in level.get("errors", [])})
    if errors:
        lines += ["", "Errors seen: " + "; ".join(errors)]
    return lines


# -- figures ------------------------------------------------------------------------------


def _figures(data: dict, directory: Path) -> tuple[list[Path], str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [], f"No PNGs: matplotlib is not importable here ({exc})."
    written = []
    sweep = [r for r in data["alone"]["sweep"] if r.get("status") == "ok"]
    for name, field, label in (
        (FIGURES[0], "audio_s_per_s", "audio s/s"),
        (FIGURES[1], "peak_memory_gib", "peak GPU memory, GiB"),
    ):
        if any(field in r for r in sweep):
            written.append(_alone_figure(plt, sweep, field, label, directory / name))
    if data["served"]["levels"]:
        written.append(_served_figure(plt, data["served"]["levels"], directory / FIGURES[2]))
    return written, ""


def _alone_figure(plt, sweep: list[dict], field: str, label: str, path: Path) -> Path:
    models = sorted({r["model"] for r in sweep}, key=[r["model"] for r in sweep].index)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    styles = {"fp32": "-", "fp16": "--", "bf16": ":"}
    for ax, model in zip(axes[0], models):
        series: dict[tuple, list] = defaultdict(list)
        for r in sweep:
            if r["model"] == model and field in r:
                series[(r["bucket_s"], r["precision"])].append((r["batch"], r[field]))
        colors = {b: f"C{i}" for i, b in enumerate(sorted({k[0] for k in series}))}
        for (bucket, precision), points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(
                xs,
                ys,
                styles.get(precision, "-"),
                marker="o",
                color=colors[bucket],
                label=f"{bucket:g} s {precision}",
            )
        _integer_log2_axis(ax, sorted({r["batch"] for r in sweep}))
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_title(f"synthetic:{model}, model alone")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    return _save(fig, path)


def _served_figure(plt, levels: list[dict], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_layout: dict[str, list] = defaultdict(list)
    for level in levels:
        by_layout[level["layout"]].append(level["summary"])
    for layout, rows in by_layout.items():
        rows = sorted(rows, key=lambda s: s["users"])
        users = [s["users"] for s in rows]
        left.plot(users, [s["audio_s_per_s"] for s in rows], marker="o", label=layout)
        right.plot(users, [s["p95_ms"] for s in rows], marker="o", label=layout)
    all_users = sorted({level["summary"]["users"] for level in levels})
    for ax, label in ((left, "audio s/s"), (right, "p95 latency, ms")):
        _integer_log2_axis(ax, all_users)
        ax.set_xlabel("closed-loop users (requests in flight)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("served throughput (call-centre clips)")
    right.set_title("served p95 latency")
    return _save(fig, path)


def _integer_log2_axis(ax, ticks: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
