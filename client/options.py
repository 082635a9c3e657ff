"""What a classification is asked for, checked once for `e2v classify` and the Python API.

    request = classify_request(segment="fixed:3", alert="angry=0.7", labels=None, ...)
    options, columns = request.resolve(client.info)  # names matched to the served model
    result = request.finish(result)                  # --aggregate vote

Both callers hand their own spelling of the options (argparse's Namespace, keyword
arguments) to `classify_request`, so a check or a default added here holds for both, and
the Python API returns exactly what `e2v classify --json` writes. Errors are ValueErrors
of one line that name the option as the command line spells it (`--alert`, `--labels`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from e2v.client.classify import JobOptions
from e2v.client.parties import CHANNEL_MODES, party_names, party_thresholds
from e2v.client.results import (
    FileResult,
    by_vote,
    parse_alerts,
    resolve_alerts,
    resolve_labels,
    score_labels,
    short_label,
)
from e2v.client.segment import parse_segment_mode
from e2v.client.triton import ModelInfo

from e2v.contract import (
    AGGREGATIONS,
    MAX_DURATION_S,
    MODEL_NAME,
    TRITON_REQUESTS_IN_FLIGHT,
    TRITON_RETRIES,
    TRITON_URL,
)


@dataclass(frozen=True)
class ClassifyRequest:
    """Checked options; the label names in them are matched to a model by `resolve`."""

    job: JobOptions  # connection, segmentation, parties, tuning; thresholds as given
    alert: str | None = None  # --alert [PARTY:]LABEL=P,...
    labels: str | None = None  # --labels LABEL,...
    aggregate: str = "mean"

    def resolve(self, info: ModelInfo) -> tuple[JobOptions, list[str]]:
        """The job's options with --alert and --labels in the model's own label names,
        and the score columns a result has. ValueError for a label the model lacks."""
        keep = resolve_labels(self.labels, info.labels)
        labels = [x for x in info.labels if keep is None or short_label(x) in keep]
        thresholds = resolve_alerts(self.job.thresholds or {}, labels)
        options = replace(self.job, thresholds=thresholds, labels=keep)
        if options.parties is not None:
            per_party = party_thresholds(self.alert, options.parties, labels)
            options = replace(options, party_thresholds=per_party)
        return options, score_labels(labels)

    def finish(self, result: FileResult) -> FileResult:
        """A file's result as reported: its label by --aggregate."""
        return by_vote(result) if self.aggregate == "vote" else result


def classify_request(
    *,
    url: str = TRITON_URL,
    protocol: str = "grpc",
    model: str = MODEL_NAME,
    segment: str = "vad",
    channels: str | None = None,
    parties: str | None = None,
    alert: str | None = None,
    labels: str | None = None,
    aggregate: str = "mean",
    concurrency: int = TRITON_REQUESTS_IN_FLIGHT,
    retries: int = TRITON_RETRIES,
    max_duration_s: float = MAX_DURATION_S,
    processes: int = 1,
) -> ClassifyRequest:
    """The options of one classification job, checked (ValueError: one line)."""
    if channels is not None and channels not in CHANNEL_MODES:
        raise ValueError(f"--channels {channels!r}: mix or split")
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"--aggregate {aggregate!r}: mean or vote")
    names = party_names(channels, parties)
    if names is None and ":" in (alert or ""):
        raise ValueError(f"--alert {alert}: PARTY:LABEL=P needs --channels split")
    job = JobOptions(
        url=url,
        protocol=protocol,
        model=model,
        segment=parse_segment_mode(segment),
        concurrency=concurrency,
        thresholds=parse_alerts(alert) if names is None else None,
        parties=names,
        retries=retries,
        max_duration_s=max_duration_s,
        processes=processes,
    )
    return ClassifyRequest(job, alert=alert, labels=labels, aggregate=aggregate)


__all__ = ["ClassifyRequest", "classify_request"]
