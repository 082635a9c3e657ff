"""Triton's own view of a run: statistics snapshots before and after, diffed.

Counters are cumulative since server start, so a run's numbers are `after - before`
(warm-up requests sent before the first snapshot are excluded). Read from Triton's HTTP
JSON endpoints with the standard library, so bare GPU machines (no tritonclient) read
them the same way.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field

from e2v.contract import MODEL_NAME

DURATIONS = ("queue", "compute_input", "compute_infer", "compute_output")
STAGES = ("success", *DURATIONS)  # `success`: the whole request inside Triton


@dataclass
class ModelStats:
    """Cumulative counters of one model (all versions summed)."""

    success: int = 0
    failures: int = 0
    inference_count: int = 0  # requests (batch rows) executed
    execution_count: int = 0  # model executions (batches)
    ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    executions_by_batch: dict[int, int] = field(default_factory=dict)

    def __sub__(self, before: ModelStats) -> ModelStats:
        batches = {
            size: count - before.executions_by_batch.get(size, 0)
            for size, count in self.executions_by_batch.items()
        }
        return ModelStats(
            success=self.success - before.success,
            failures=self.failures - before.failures,
            inference_count=self.inference_count - before.inference_count,
            execution_count=self.execution_count - before.execution_count,
            ns={k: self.ns[k] - before.ns[k] for k in STAGES},
            executions_by_batch={k: v for k, v in sorted(batches.items()) if v > 0},
        )

    @property
    def handled(self) -> int:
        """Requests finished, successfully or not."""
        return self.success + self.failures

    @property
    def avg_batch_size(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0

    def avg_ms(self, name: str) -> float:
        """Mean per-request time in one stage (queue, compute_infer, ...), milliseconds."""
        return self.ns[name] / self.success / 1e6 if self.success else 0.0

    def as_dict(self) -> dict:
        return {
            "success": self.success,
            "failures": self.failures,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "avg_batch_size": round(self.avg_batch_size, 3),
            "avg_ms": {k: round(self.avg_ms(k), 3) for k in DURATIONS},
            "executions_by_batch_size": {str(k): v for k, v in self.executions_by_batch.items()},
        }


def snapshot(http_url: str, model: str = MODEL_NAME) -> ModelStats:
    """Current counters of `model` (GET /v2/models/<model>/stats at HOST:PORT)."""
    return parse(_get_json(http_url, f"/v2/models/{model}/stats"))


def settled(http_url: str, handled: int, timeout_s: float = 10.0) -> ModelStats:
    """A snapshot once Triton has counted `handled` requests.

    Triton updates its statistics just after it sends a response, so a snapshot taken the
    moment the last answer arrives can miss that request.
    """
    deadline = time.monotonic() + timeout_s
    stats = snapshot(http_url)
    while stats.handled < handled and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = snapshot(http_url)
    return stats


def parse(statistics: dict) -> ModelStats:
    """ModelStats from Triton's statistics JSON (summed over versions)."""
    stats = ModelStats()
    for version in statistics.get("model_stats", []):
        inference = version["inference_stats"]
        stats.success += int(inference["success"]["count"])
        stats.failures += int(inference["fail"]["count"])
        stats.inference_count += int(version["inference_count"])
        stats.execution_count += int(version["execution_count"])
        for name in STAGES:
            stats.ns[name] += int(inference[name]["ns"])
        for batch in version.get("batch_stats", []):
            size = int(batch["batch_size"])
            count = int(batch["compute_infer"]["count"])
            stats.executions_by_batch[size] = stats.executions_by_batch.get(size, 0) + count
    return stats


def model_config(http_url: str, model: str = MODEL_NAME) -> dict:
    """The served model's configuration (batching, instances, parameters) as JSON,
    plus the server's version under `triton_version`."""
    config = _get_json(http_url, f"/v2/models/{model}/config")
    return {**config, "triton_version": _get_json(http_url, "/v2").get("version", "")}


def _get_json(http_url: str, path: str, timeout_s: float = 10.0) -> dict:
    with urllib.request.urlopen(f"http://{http_url}{path}", timeout=timeout_s) as response:
        return json.loads(response.read())


def config_summary(config: dict) -> dict:
    """The settings a load test report needs from a model configuration."""
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    batching = config.get("dynamic_batching", {})
    groups = config.get("instance_group", [])
    return {
        "max_batch_size": int(config.get("max_batch_size", 0)),
        "max_queue_delay_us": int(batching.get("max_queue_delay_microseconds", 0)),
        "preferred_batch_size": batching.get("preferred_batch_size", []),
        "instances": sum(int(g.get("count", 1)) for g in groups) or 1,
        "instance_kind": groups[0].get("kind", "") if groups else "",
        "intra_op_threads": params.get("intra_op_thread_count", ""),
        "backend": config.get("backend", ""),
        "synthetic": params.get("synthetic", "") == "true",
        "source": params.get("source", ""),
        "triton_version": config.get("triton_version", ""),
    }
