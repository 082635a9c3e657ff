"""Per-file results: aggregation of segment predictions, alerts, and serialisation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from e2v.client.segment import Segment
from e2v.client.triton import ModelInfo, Prediction

from e2v.contract import is_answer_label, is_scored_label


@dataclass
class SegmentResult:
    start_s: float
    end_s: float
    scores: dict[str, float]  # label -> probability (empty for embedding-only models)
    embedding: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def top(self) -> tuple[str | None, float | None]:
        return _best(self.scores)


@dataclass
class PartyResult:
    """One party of a `--channels split` file: its channel's own aggregate."""

    party: str
    channel: int  # 0-based channel of the file
    result: FileResult  # aggregate() of this channel's segments (alerts: this party's)

    def to_json(self) -> dict:
        data = self.result.to_json()
        fields = ("emotion", "confidence", "scores", "no_speech", "segments", "alerts", "votes")
        body = {k: data[k] for k in fields if k in data}
        speech = sum(s.duration_s for s in self.result.segments)  # client.parties.speech_s
        return {"party": self.party, "channel": self.channel} | body | {"speech_s": _round(speech)}


@dataclass
class FileResult:
    file: str
    duration_s: float | None = None
    emotion: str | None = None
    confidence: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    segments: list[SegmentResult] = field(default_factory=list)
    no_speech: bool = False
    alerts: list[dict] = field(default_factory=list)
    error: str | None = None
    error_kind: str | None = None
    model: str | None = None
    synthetic: bool = False
    votes: dict[str, int] | None = None  # set by `by_vote`: segments won per label
    # `--channels split`: one result per channel; emotion, confidence and scores above are
    # then the first party's, alerts every party's (each names its party), segments empty.
    parties: list[PartyResult] | None = None
    conversation: dict | None = None  # client.parties.conversation(): speech, overlap, silence

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def segment_count(self) -> int:
        """Segments (embeddings) of the file, every party's."""
        return len(self.segments) + sum(len(p.result.segments) for p in self.parties or ())

    def to_json(self) -> dict:
        """One JSON Lines object (the `--json` contract)."""
        data: dict = {"file": self.file}
        if self.error is not None:
            data |= {"error": self.error, "error_kind": self.error_kind}
        elif self.parties is not None:
            data |= {
                "duration_s": _round(self.duration_s),
                "channels": "split",
                "reported_party": self.parties[0].party,  # whose emotion and confidence
                "emotion": self.emotion,
                "confidence": _round(self.confidence),
                "scores": {k: _round(v) for k, v in self.scores.items()},
                "no_speech": self.no_speech,
                "parties": [party.to_json() for party in self.parties],
                "conversation": self.conversation,
                "alerts": self.alerts,
            }
        else:
            data |= {
                "duration_s": _round(self.duration_s),
                "emotion": self.emotion,
                "confidence": _round(self.confidence),
                "scores": {k: _round(v) for k, v in self.scores.items()},
                "no_speech": self.no_speech,
                "segments": [
                    {
                        "start_s": _round(s.start_s),
                        "end_s": _round(s.end_s),
                        "emotion": s.top()[0],
                        "confidence": _round(s.top()[1]),
                        "scores": {k: _round(v) for k, v in s.scores.items()},
                    }
                    for s in self.segments
                ],
                "alerts": self.alerts,
            }
            if self.votes is not None:
                data["votes"] = self.votes
        data["model"] = self.model
        if self.synthetic:
            data["synthetic"] = True
            data["note"] = "synthetic model: random weights, labels meaningless"
        return data


def short_label(label: str) -> str:
    """`生气/angry` -> `angry`: the English part of the published bilingual labels."""
    return label.rsplit("/", 1)[-1]


def model_labels(info: ModelInfo) -> list[str]:
    """The model's scored labels as answers name them (short form): the score columns."""
    return score_labels(info.labels)


def score_labels(labels: list[str]) -> list[str]:
    """The short forms of `labels` that have a score (`unuse*` placeholders left out)."""
    return [short_label(label) for label in labels if is_scored_label(label)]


def segment_result(segment: Segment, prediction: Prediction, info: ModelInfo) -> SegmentResult:
    scores = {}
    if prediction.scores is not None:
        scores = {
            short_label(label): float(p)
            for label, p in zip(info.labels, prediction.scores)
            if is_scored_label(label)
        }
    return SegmentResult(segment.start_s, segment.end_s, scores, prediction.embedding)


def aggregate(
    path: str,
    duration_s: float,
    segments: list[SegmentResult],
    info: ModelInfo,
    thresholds: dict[str, float],
) -> FileResult:
    """Overall result: duration-weighted mean of segment probabilities."""
    result = FileResult(
        file=path,
        duration_s=duration_s,
        segments=segments,
        model=info.name,
        synthetic=info.synthetic,
    )
    if not segments:
        result.no_speech = True
        return result
    if segments[0].scores:
        weights = np.array([s.duration_s for s in segments])
        labels = list(segments[0].scores)
        matrix = np.array([[s.scores[label] for label in labels] for s in segments])
        mean = (weights[:, None] * matrix).sum(0) / weights.sum()
        result.scores = {label: float(p) for label, p in zip(labels, mean)}
        result.emotion, result.confidence = _best(result.scores)
    result.alerts = alerts(segments, thresholds)
    return result


def by_vote(result: FileResult) -> FileResult:
    """The file's label by majority vote of its segments' top labels (the old web app's
    rule); ties go to the higher mean score. `confidence` stays the voted label's mean
    score, so thresholds mean the same thing for both aggregations."""
    if result.parties is not None:
        parties = [replace(p, result=by_vote(p.result)) for p in result.parties]
        return with_parties(replace(result, parties=parties))
    if not result.ok or not result.scores:
        return result
    votes: dict[str, int] = {}
    for segment in result.segments:
        label = segment.top()[0]
        if label is not None:
            votes[label] = votes.get(label, 0) + 1
    if not votes:
        return result
    most = max(votes.values())
    tied = [label for label in result.scores if votes.get(label) == most]
    emotion = max(tied, key=result.scores.__getitem__)
    ordered = {label: votes[label] for label in result.scores if label in votes}
    return replace(result, emotion=emotion, confidence=result.scores[emotion], votes=ordered)


def with_parties(result: FileResult) -> FileResult:
    """The file-level fields of a split result from its parties: the first party's
    emotion, confidence and scores; every party's alerts, each naming its party."""
    parties = result.parties
    if not parties:
        raise ValueError(f"{result.file}: a split result without parties")
    first = parties[0].result
    return replace(
        result,
        emotion=first.emotion,
        confidence=first.confidence,
        scores=first.scores,
        no_speech=all(p.result.no_speech for p in parties),
        alerts=[{"party": p.party} | a for p in parties for a in p.result.alerts],
        segments=[],
    )


def _best(scores: dict[str, float]) -> tuple[str | None, float | None]:
    candidates = [label for label in scores if is_answer_label(label)]
    if not candidates:
        return None, None
    label = max(candidates, key=scores.__getitem__)
    return label, scores[label]


def alerts(segments: list[SegmentResult], thresholds: dict[str, float]) -> list[dict]:
    """Segments whose score for a watched label reaches its threshold (peaks, not means:
    a short angry burst in a long call must not be averaged away)."""
    found = []
    for label, threshold in thresholds.items():
        hits = [s for s in segments if s.scores.get(label, 0.0) >= threshold]
        if hits:
            peak = max(hits, key=lambda s: s.scores[label])
            found.append(
                {
                    "label": label,
                    "threshold": threshold,
                    "max_score": _round(peak.scores[label]),
                    "start_s": _round(peak.start_s),
                    "end_s": _round(peak.end_s),
                    "segments": len(hits),
                }
            )
    return found


def resolve_alerts(thresholds: dict[str, float], labels: list[str]) -> dict[str, float]:
    """Map each --alert label onto the model's (case-insensitive, either form of a bilingual
    label); an unknown label is an error, never a silently disabled alert."""
    known = {short_label(label).lower(): short_label(label) for label in labels}
    known |= {label.lower(): short_label(label) for label in labels}
    resolved = {}
    for label, threshold in thresholds.items():
        if label.lower() not in known:
            choices = ", ".join(sorted(set(known.values())))
            raise ValueError(f"--alert label {label!r} is not one of the model's: {choices}")
        resolved[known[label.lower()]] = threshold
    return resolved


def resolve_labels(text: str | None, labels: list[str]) -> tuple[str, ...] | None:
    """`--labels angry,happy,neutral,sad` -> those of the model's labels (short form, model
    order), matched like --alert; None without --labels. An unknown label, or fewer than
    two, is an error that lists the model's labels."""
    if not text:
        return None
    forms = answer_forms(labels)
    choices = ", ".join(dict.fromkeys(forms.values())) or "none: embeddings only"
    wanted = {item.strip().lower() for item in text.split(",") if item.strip()}
    unknown = sorted(w for w in wanted if w not in forms)
    if unknown:
        raise ValueError(f"--labels {', '.join(unknown)}: not the model's (its labels: {choices})")
    keep = {forms[w] for w in wanted}
    if len(keep) < 2:
        raise ValueError(f"--labels needs at least two of the model's labels ({choices})")
    return tuple(label for label in dict.fromkeys(forms.values()) if label in keep)


def answer_forms(labels: list[str]) -> dict[str, str]:
    """Every spelling of the model's answer labels, lower case (`生气/angry`, `angry`, `生气`)
    -> its short form: how --labels, --map and data sets name them."""
    forms: dict[str, str] = {}
    for label in labels:
        if is_answer_label(label):
            for form in (label, short_label(label), label.split("/", 1)[0]):
                forms.setdefault(form.strip().lower(), short_label(label))
    return forms


def restrict_scores(scores: dict[str, float], keep: tuple[str, ...]) -> dict[str, float]:
    """Probabilities over `keep` only, renormalised to sum to 1. For a softmax this is
    exact: p_i / sum_{j in keep} p_j is the softmax of the kept classes' logits (EmoBox's
    4-class protocol). All-zero scores (underflow) become uniform."""
    kept = {label: scores.get(label, 0.0) for label in keep}
    total = sum(kept.values())
    if not total > 0:
        return {label: 1.0 / len(keep) for label in keep}
    return {label: p / total for label, p in kept.items()}


def parse_alerts(text: str | None) -> dict[str, float]:
    """`angry=0.7,sad=0.8` -> {"angry": 0.7, "sad": 0.8}."""
    if not text:
        return {}
    thresholds = {}
    for item in text.split(","):
        label, sep, value = item.partition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = -1.0
        if not sep or not label.strip() or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"bad --alert item {item!r}: expected LABEL=P with 0 <= P <= 1")
        thresholds[short_label(label.strip())] = threshold
    return thresholds


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)
