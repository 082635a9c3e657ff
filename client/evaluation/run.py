"""Classify a labelled set with `e2v classify`'s pipeline and score every aggregation method.

Each segmentation (`vad`, `fixed:3`, ...) is one pass of `classify_files`; every
aggregation (`mean`, `vote`) is derived from that pass's segment scores, so the methods
compared in one report saw identical model outputs. Metrics are computed on the rows
every method could score (same files, same label, paired bootstrap).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from e2v.client.classify import JobOptions, classify_files
from e2v.client.evaluation.dataset import LabelledItem, LabelledSet
from e2v.client.evaluation.labels import LabelMatcher
from e2v.client.evaluation.metrics import evaluate_method
from e2v.client.parties import manifest_channel, party_result
from e2v.client.results import FileResult, by_vote
from e2v.client.segment import SegmentMode, parse_segment_mode
from e2v.client.triton import ModelInfo, TritonEmotionClient

from e2v.contract import AGGREGATIONS

# Confidences are compared at the precision predictions.csv stores, so metrics
# recomputed from that file are identical.
CONFIDENCE_DIGITS = 6


@dataclass(frozen=True)
class Method:
    """One way to get a file's label: a segmentation and an aggregation of its segments."""

    segment: SegmentMode
    aggregate: str

    @property
    def name(self) -> str:
        return f"{self.segment}/{self.aggregate}"

    @property
    def slug(self) -> str:
        """Column-name form: `fixed:1.5/vote` -> `fixed1p5_vote`."""
        return re.sub(r"[^a-z0-9]", "", str(self.segment).replace(".", "p")) + "_" + self.aggregate


def parse_methods(segments: str, aggregate: str) -> list[Method]:
    """`--segment vad,fixed:3 --aggregate both` -> vad/mean, vad/vote, fixed:3/mean, ..."""
    if aggregate not in (*AGGREGATIONS, "both"):
        raise ValueError(f"--aggregate must be mean, vote or both, not {aggregate!r}")
    modes = list(dict.fromkeys(parse_segment_mode(s) for s in segments.split(",") if s.strip()))
    if not modes:
        raise ValueError("--segment needs at least one mode")
    aggregations = AGGREGATIONS if aggregate == "both" else (aggregate,)
    return [Method(mode, how) for mode in modes for how in aggregations]


@dataclass
class Row:
    """One manifest row and what became of it."""

    item: LabelledItem
    truth: str | None  # the model's label for item.label; None when the model lacks it
    results: dict[str, FileResult] = field(default_factory=dict)  # method name -> result
    error: str | None = None  # failed: counted and listed, sets exit status 4
    error_kind: str | None = None
    excluded: str | None = None  # usable but left out of the metrics, with the reason

    @property
    def scored(self) -> bool:
        return self.error is None and self.excluded is None


@dataclass
class Evaluation:
    dataset: LabelledSet
    info: ModelInfo
    labels: list[str]  # the model's answerable labels, short form, in model order
    methods: list[Method]
    rows: list[Row]
    metrics: dict[str, dict]  # method name -> evaluate_method(...)
    groups: dict[str, dict] | None  # --group-by value -> metrics of the first method
    settings: dict

    @property
    def primary(self) -> Method:
        return self.methods[0]

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if row.error is not None]


async def evaluate(
    dataset: LabelledSet,
    client: TritonEmotionClient,
    matcher: LabelMatcher,
    methods: list[Method],
    options: JobOptions,
    group_by: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> Evaluation:
    """Classify the usable files of `dataset` once per segmentation and score every method.

    `client` must be connected. Raises ServerUnavailable when the server goes away.
    """
    paths = list(dict.fromkeys(item.path for item in dataset.items if item.usable))  # per party
    by_method: dict[str, dict[str, FileResult]] = {}
    for mode in dict.fromkeys(method.segment for method in methods):
        log(f"classifying {len(paths)} file(s) with --segment {mode}")
        job = dataclasses.replace(options, segment=mode, thresholds=None)
        found = await _classify_all(paths, client, job)
        for method in methods:
            if method.segment == mode:
                vote = method.aggregate == "vote"
                by_method[method.name] = {p: by_vote(r) if vote else r for p, r in found.items()}
    rows = _rows(dataset, matcher, methods, by_method, options.parties)
    scored = [row for row in rows if row.scored]
    if resamples and scored:
        log(f"bootstrap: {resamples} resamples of {len(scored)} scored row(s) per method")
    metrics = {m.name: score_method(scored, m, matcher.labels, resamples, seed) for m in methods}
    groups = None
    if group_by is not None:
        values = sorted({row.item.fields.get(group_by, "") for row in scored})
        groups = {
            value: score_method(
                [r for r in scored if r.item.fields.get(group_by, "") == value],
                methods[0],
                matcher.labels,
                resamples,
                seed,
                full=False,
            )
            for value in values
        }
    settings = {"group_by": group_by, "bootstrap": resamples, "seed": seed}
    return Evaluation(
        dataset, client.info, matcher.labels, methods, rows, metrics, groups, settings
    )


async def _classify_all(
    paths: list[str], client: TritonEmotionClient, job: JobOptions
) -> dict[str, FileResult]:
    found: dict[str, FileResult] = {}
    await classify_files(paths, client, job, lambda result: found.__setitem__(result.file, result))
    return found


def _rows(
    dataset: LabelledSet,
    matcher: LabelMatcher,
    methods: list[Method],
    by_method: dict[str, dict[str, FileResult]],
    parties: tuple[str, ...] | None = None,
) -> list[Row]:
    """With `parties` (split), a row's result is that of its `party` / `channel`."""
    first = {item.row: item for item in dataset.items if item.duplicate_of is None}
    rows = []
    for item in dataset.items:
        source = first[item.duplicate_of] if item.duplicate_of else item
        row = Row(item, matcher(item.label) if item.label else None)
        channel, bad_party = None, None
        if parties is not None:
            try:
                channel = manifest_channel(item.fields, parties)
            except ValueError as exc:
                bad_party = f"row {item.row}: {exc}"
        if source.usable and bad_party is None:
            row.results = {
                m.name: party_result(by_method[m.name][source.path], channel) for m in methods
            }
        failed = [r for r in row.results.values() if not r.ok]
        if bad_party is not None:
            row.error, row.error_kind = bad_party, "bad_party"
        elif item.error is not None:
            row.error, row.error_kind = item.error, item.error_kind
        elif item.duplicate_of is not None:
            other = "" if source.label == item.label else f" (which says {source.label!r})"
            row.excluded = f"duplicate of row {item.duplicate_of}{other}"
        elif failed:
            row.error, row.error_kind = failed[0].error, failed[0].error_kind
        elif row.truth is None:
            row.excluded = f"label not in the model: {item.label!r}"
        elif any(r.emotion is None for r in row.results.values()):
            row.excluded = "no speech found"
        rows.append(row)
    return rows


def score_method(
    rows: list[Row], method: Method, labels: list[str], resamples: int, seed: int, full=True
) -> dict | None:
    """The metrics of `method` over `rows` (None for no rows): also used by train-head."""
    if not rows:
        return None
    results = [row.results[method.name] for row in rows]
    return evaluate_method(
        [row.truth for row in rows],
        [r.emotion for r in results],
        [round(r.confidence, CONFIDENCE_DIGITS) for r in results],
        labels,
        resamples,
        seed,
        full=full,
    )
