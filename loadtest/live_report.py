"""The live load test's report folder: README.md and summary.json (house style of
`loadtest.report`: synthetic models named on the first line, machine and load average)."""

from __future__ import annotations

import json
from pathlib import Path

from e2v.loadtest.calls import PARTIES, RATE
from e2v.loadtest.machine import machine_description, software
from e2v.loadtest.metrics import P95_TARGET_MS
from e2v.loadtest.report import SYNTHETIC_NOTE

from e2v.contract import LIVE_HOP_S, LIVE_WINDOW_S

# Every protocol's gateway CPU per channel within this share of native's at the same level.
PROTOCOL_TOLERANCE = 0.2
PATHS = {"live": "/v1/live", "twilio": "/v1/twilio", "audiohook": "/v1/audiohook"}


def _first_protocol(levels: list[dict]) -> list[dict]:
    """The levels of the first protocol run (native when it ran): the headline figures."""
    first = levels[0].get("protocol", "live") if levels else "live"
    return [lv for lv in levels if lv.get("protocol", "live") == first]


def _cpu_ms(level: dict) -> float:
    """Gateway CPU ms per second of call audio streamed (per wall second and channel where
    the audio streamed is not known)."""
    return level.get("ms_per_channel_s") or 1000 * level["gateway_cores"] / level["channels"]


def best_level(levels: list[dict]) -> dict | None:
    """The level with the most channels per gateway core among those within the target."""
    good = [lv for lv in _first_protocol(levels) if lv["within_target"]]
    good = [lv for lv in good if lv.get("channels_per_core")]
    return max(good, key=lambda lv: lv["channels_per_core"], default=None)


def capacity(levels: list[dict]) -> dict | None:
    """The most channels kept up in real time (`live_run.sustained`)."""
    kept = [lv for lv in _first_protocol(levels) if lv["sustained"]]
    return max(kept, key=lambda lv: lv["channels"], default=None)


def protocol_comparison(levels: list[dict]) -> list[dict]:
    """Per level of channels, each protocol's gateway CPU per channel against native's."""
    native = {lv["channels"]: lv for lv in levels if lv.get("protocol", "live") == "live"}
    rows = []
    for lv in levels:
        base = native.get(lv["channels"])
        if base is None or not base.get("gateway_cores") or not lv.get("gateway_cores"):
            continue
        ms, base_ms = _cpu_ms(lv), _cpu_ms(base)
        ratio = ms / base_ms
        rows.append(
            {
                "channels": lv["channels"],
                "protocol": lv.get("protocol", "live"),
                "channels_streamed": lv.get("channels_streamed"),
                "ms_per_channel_s": round(ms, 3),
                "vs_native": round(ratio, 3),
                "within": ratio <= 1 + PROTOCOL_TOLERANCE,
            }
        )
    return rows


def write_live_report(
    directory: Path, command: str, model: str, settings: dict, calls, levels, args, loads
) -> Path:
    """README.md and summary.json; `loads` is the 1-minute load average at start and end."""
    directory.mkdir(parents=True, exist_ok=True)
    synthetic = bool(settings.get("synthetic")) or model.startswith("synthetic:")
    best = best_level(levels)
    summary = {
        "command": command,
        "model": settings.get("source") or model,
        "synthetic": synthetic,
        "machine": machine_description(),
        "load_average": list(loads),
        "software": _software(settings),
        "target_p95_ms": P95_TARGET_MS,
        "triton_settings": settings,
        "workload": workload_summary(calls, args),
        "levels": levels,
        "best": {
            "channels": best["channels"],
            "channels_per_core": best["channels_per_core"],
        }
        if best
        else None,
        "capacity_channels": top["channels"] if (top := capacity(levels)) else None,
        "protocols": protocol_comparison(levels),
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    path = directory / "README.md"
    path.write_text("\n".join(_markdown(summary)))
    return path


def workload_summary(calls, args) -> dict:
    return {
        "recordings": len(calls),
        "recording_s": round(calls[0].duration_s, 1) if calls else 0,
        "parties": list(PARTIES),
        "encoding": f"mu-law, {RATE} Hz, stereo (one party per channel)",
        "speech_share": round(sum(c.speech_share() for c in calls) / max(len(calls), 1), 3),
        "frame_ms": args.frame_ms,
        "window_s": LIVE_WINDOW_S,
        "hop_s": LIVE_HOP_S,
    }


def _software(settings: dict) -> str:
    names = ("websockets", "uvicorn", "fastapi", "onnxruntime", "tritonclient")
    version = settings.get("triton_version")
    return software(names, [version] if version else [])


def _ms(figures: dict, key: str) -> str:
    return "-" if not figures.get("count") else f"{figures[key]:.0f}"


def _markdown(s: dict) -> list[str]:
    paths = dict.fromkeys(PATHS[lv.get("protocol", "live")] for lv in s["levels"])
    through = ", ".join(f"`{p}`" for p in paths) or "`/v1/live`"
    title = f"# Live load test: `{s['model']}`, concurrent calls through {through}"
    if s["synthetic"]:
        title += " (SYNTHETIC model: random weights)"
    w = s["workload"]
    lines = [title, ""]
    if s["synthetic"]:
        lines += [SYNTHETIC_NOTE, ""]
    lines += [
        f"- command: `{s['command']}`",
        f"- machine: {s['machine']}, shared with other work while this ran (tests of other "
        "sessions): the 1-minute load average was "
        f"{s['load_average'][0]:.1f} at the start and {s['load_average'][1]:.1f} at the end "
        "of the run, and is in the table before and after each level (2 = both cores busy)",
        f"- software: {s['software']}",
        "",
        "## Workload",
        "",
        f"Each channel is one phone line playing {w['recordings']} stereo call recordings "
        f"({w['encoding']}, {w['recording_s']:g} s each, two parties taking turns, speech "
        f"from `loadtest/synth.py`; each party speaks {100 * w['speech_share']:.0f}% of the "
        f"time) back to back, one session per call, in {w['frame_ms']:g} ms "
        "frames sent when their last sample is due (Twilio: 20 ms media messages per track, "
        "sent in groups of a frame; its results read from the call's event subscription), "
        "through `e2v live`'s own client of each protocol. "
        f"Interim window {w['window_s']:g} s "
        f"every {w['hop_s']:g} s of speech. Channels start spread over the ramp; measured "
        "from its end to the end of the level, when calls in progress send `stop`.",
        "",
        "## Results",
        "",
        "| channels | calls ok / failed | interim p50 / p95 / p99 ms | final p50 / p95 / p99 ms "
        "| final since utterance end p50 / p95 ms | results (per speech s) | coalesced | stale "
        "| finals expected / arrived / lost | gateway cores | channels per core "
        "| avg Triton batch | load avg | within target | kept up |",
        "|" + " --- |" * 15,
    ]
    several = len({lv.get("protocol", "live") for lv in s["levels"]}) > 1
    for lv in s["levels"]:
        i, f, e = lv["interim_latency_ms"], lv["final_latency_ms"], lv["final_since_end_ms"]
        fin, ses = lv["finals"], lv["sessions"]
        batch = lv.get("triton", {}).get("avg_batch_size")
        lines.append(
            f"| {_level(lv, several)} | {ses['ok']} / {ses['failed']} "
            f"| {_ms(i, 'p50')} / {_ms(i, 'p95')} / {_ms(i, 'p99')} "
            f"| {_ms(f, 'p50')} / {_ms(f, 'p95')} / {_ms(f, 'p99')} "
            f"| {_ms(e, 'p50')} / {_ms(e, 'p95')} "
            f"| {lv['results']} ({_num(fin.get('interims_per_speech_s'), 2)}) "
            f"| {lv['coalesced']} ({100 * lv['coalesced_share']:.1f}%) | {lv.get('stale', '-')} "
            f"| {fin['expected']} / {fin['arrived']} / {fin['lost']} "
            f"| {_num(lv['gateway_cores'], 2)} | {_num(lv['channels_per_core'], 0)} "
            f"| {_num(batch, 2)} | {lv['load_average'][0]:.1f} -> {lv['load_average'][1]:.1f} "
            f"| {'yes' if lv['within_target'] else 'no'} | {'yes' if lv['sustained'] else 'no'} |"
        )
    best = s["best"]
    lines += [
        "",
        (
            f"**Most channels per gateway core within p95 <= {P95_TARGET_MS:g} ms: "
            f"{best['channels_per_core']:.0f}** (at {best['channels']} channels)."
            if best
            else f"No level met p95 <= {P95_TARGET_MS:g} ms with every final delivered."
        ),
        (
            f"**Capacity (kept up in real time): {s['capacity_channels']} channels.**"
            if s["capacity_channels"]
            else "No level kept up in real time."
        ),
        *_cost_line(s["levels"]),
        "",
        "A channel is one phone line carrying one call at a time: two party streams, each "
        "with its own VAD, windows and finals.",
        "",
        "- interim: from the send time of the frame that carried a result window's last "
        "sample (loopback: when it reached the gateway) to the result's arrival;",
        "- final: from the send time of the frame carrying the sample that made the final due "
        "(the utterance's end + the 1 s merge gap + 0.1 s padding, the earliest a final can be "
        "released, or the last sample before `stop`) to the final's arrival: the gateway's "
        "delay. Since utterance end: from its last sample, what a caller waits for a final, "
        "the merge gap included;",
        "- results: interim results in the measured window; per speech s: interim results "
        "per second of offline speech over the completed calls (1 per hop_s when none is "
        "lost; fewer when Triton answers a window after its utterance's final, which the "
        "gateway then drops as stale);",
        "- coalesced: interim windows replaced by a newer one of the same party before Triton "
        "took them (the `coalesced` field of results); each party has at most one interim "
        "in flight, so a slow model shows here rather than as windows queued in Triton; "
        "finals are never coalesced;",
        "- stale: interim results Triton answered after their utterance's final was cut, not "
        "sent (the `stale` field of summaries of calls that ended in the measured window);",
        "- finals: expected are the offline utterances (`e2v classify --segment vad`'s cutter "
        "on each party's track, up to where the session's audio stopped) of every call that "
        "ended with its summary; lost are those no final covers;",
        "- gateway cores: the gateway process's CPU seconds (/proc) per second over the "
        "measured window; channels per core = channels / gateway cores; the load generator "
        "ran on the same cores;",
        "- within target: interim and final p95 <= 150 ms, no final lost, no failed call;",
        "- kept up: every final delivered, final p95 <= 3 s after it was due, no failed call "
        "and at least half the interim windows answered (0.5 per speech second): real time "
        "sustained, whatever the latency target;",
        "- `summary.json` also holds the gateway's own `lag_s` stamps where events carry them "
        "(audio seconds received after the window's end when the event was published).",
        "",
    ]
    lines += _protocols(s["protocols"])
    lines += _profiles(s["levels"])
    lines += _batches(s["levels"])
    return lines


def _protocols(rows: list[dict]) -> list[str]:
    if not any(r["protocol"] != "live" for r in rows):
        return []
    lines = [
        "## Protocols",
        "",
        "| channels | protocol | channels streamed | gateway CPU ms per channel-second "
        f"| vs native | within {100 * PROTOCOL_TOLERANCE:.0f}% |",
        "|" + " --- |" * 6,
    ]
    for r in rows:
        lines.append(
            f"| {r['channels']} | {r['protocol']} | {_num(r['channels_streamed'], 1)} "
            f"| {r['ms_per_channel_s']:.2f} | {r['vs_native']:.2f} "
            f"| {'yes' if r['within'] else 'no'} |"
        )
    return lines + [
        "",
        "Each protocol at the same number of channels, one level after the other on the same "
        "gateway: its CPU seconds (/proc) over the measured window per second of call audio "
        "the lines streamed in it (channels streamed: that audio per wall second, the "
        "channels when every line kept real time).",
        "",
    ]


def _profiles(levels: list[dict]) -> list[str]:
    profiled = [lv for lv in levels if lv.get("cpu_profile")]
    if not profiled:
        return []
    head = [f"{lv.get('protocol', 'live')}, {lv['channels']} ch" for lv in profiled]
    lines = [
        "## Where the gateway's CPU goes",
        "",
        "| stage | " + " | ".join(head) + " |",
        "|" + " --- |" * (len(head) + 1),
    ]
    stages = list(profiled[0]["cpu_profile"]["stages"])
    for stage in [*stages, "total"]:
        cells = []
        for lv in profiled:
            figures = lv["cpu_profile"]["stages"]
            if stage == "total":
                cells.append(f"**{sum(v['ms_per_channel_s'] for v in figures.values()):.2f}**")
            else:
                v = figures[stage]
                cells.append(f"{v['ms_per_channel_s']:.2f} ({100 * v['share']:.0f}%)")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    files = ", ".join(f"`{lv['cpu_profile']['file']}`" for lv in profiled)
    return lines + [
        "",
        "Gateway CPU milliseconds per channel-second (share of the gateway's CPU), from py-spy "
        "samples over the measured window (`loadtest/cpu_profile.py`): each thread's CPU "
        "seconds (/proc) split by the stages of its own samples, each stack charged to its "
        "innermost frame that names a stage; gRPC's C threads count as Triton. The stacks: "
        f"{files} (py-spy raw format, gzipped: one stack and its count per line).",
        "",
    ]


def _cost_line(levels: list[dict]) -> list[str]:
    """The gateway's CPU cost at the busiest level, whatever its latency."""
    top = max(
        (lv for lv in levels if lv.get("channels_per_core")),
        key=lambda lv: lv["channels"],
        default=None,
    )
    if top is None:
        return []
    return [
        "",
        f"Gateway CPU at the busiest level ({top['channels']} channels, any latency): "
        f"{top['gateway_cores']:.2f} cores, {top['channels_per_core']:.0f} channels per core "
        f"({2 * top['channels_per_core']:.0f} party streams); the load generator took "
        f"{top['client_cores']:.2f} cores. Triton shared the same cores (its queue and "
        "compute times are below).",
    ]


def _batches(levels: list[dict]) -> list[str]:
    rows = [lv for lv in levels if lv.get("triton")]
    if not rows:
        return []
    lines = [
        "## Triton batch sizes",
        "",
        "| channels | protocol | requests | req/s | executions | avg batch "
        "| executions by batch size | queue ms | infer ms | calls' demand req/s per call "
        "| ceiling calls |",
        "|" + " --- |" * 11,
    ]
    for lv in rows:
        t = lv["triton"]
        sizes = ", ".join(f"{k}: {v}" for k, v in t["executions_by_batch_size"].items())
        lines.append(
            f"| {lv['channels']} | {lv.get('protocol', 'live')} | {t['success']} "
            f"| {_num(lv.get('triton_requests_per_s'), 1)} "
            f"| {t['execution_count']} | {t['avg_batch_size']:.2f} | {sizes} "
            f"| {t['avg_ms']['queue']:.1f} | {t['avg_ms']['compute_infer']:.1f} "
            f"| {_num(lv['finals'].get('requests_per_call_s'), 2)} "
            f"| {_num(lv.get('model_ceiling_calls'), 1)} |"
        )
    return lines + [
        "",
        "Whole level, ramp and stop included. Demand: the windows (one per hop_s of speech) "
        "and finals a call of these recordings asks for, per second of call. Ceiling: "
        "requests served per second / demand, the most calls the model tier answers in real "
        "time; it means that only where Triton was saturated (its queue time growing).",
        "",
    ]


def _level(level: dict, several: bool) -> str:
    """The channels, and the protocol where a run loaded several."""
    return (
        f"{level['channels']} {level.get('protocol', 'live')}"
        if several
        else str(level["channels"])
    )


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
