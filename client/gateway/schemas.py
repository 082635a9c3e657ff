"""Response schemas, for the OpenAPI document (`/openapi.json`, `/docs`) only.

Responses are built from `FileResult.to_json()`, the `e2v classify --json` contract; these
models describe that contract to code generators (Java, Go, .NET clients).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class SegmentOut(BaseModel):
    start_s: float
    end_s: float
    emotion: str | None = Field(description="top label of this segment")
    confidence: float | None
    scores: dict[str, float] = Field(description="label -> probability")
    embedding: list[float] | None = Field(None, description="only with ?embeddings=true")


class AlertOut(BaseModel):
    label: str
    threshold: float
    max_score: float = Field(description="the highest score of any segment for this label")
    start_s: float = Field(description="the segment with that score")
    end_s: float
    segments: int = Field(description="segments at or above the threshold")
    party: str | None = Field(None, description="`channels=split`: whose speech crossed it")


class PartyOut(BaseModel):
    """`channels=split`: one channel of the file, analysed on its own."""

    party: str
    channel: int = Field(description="0-based channel of the file")
    emotion: str | None
    confidence: float | None
    scores: dict[str, float]
    no_speech: bool
    speech_s: float = Field(description="seconds of this party's segments")
    segments: list[SegmentOut]
    alerts: list[AlertOut]


class ConversationOut(BaseModel):
    speech_s: dict[str, float] = Field(description="party -> seconds of speech")
    overlap_s: float = Field(description="seconds during which two or more parties speak")
    silence_s: float = Field(description="seconds during which no party speaks")
    longest_silence_s: float


class FileOut(BaseModel):
    """One file's result, or its error (then `error` and `error_kind` are set instead)."""

    filename: str = Field(description="the uploaded name, escaped to one printable line")
    emotion: str | None = Field(None, description="duration-weighted top label")
    confidence: float | None = None
    timestamp: str = Field(description="when the result was produced, ISO 8601 UTC")
    duration_s: float | None = None
    scores: dict[str, float] | None = None
    no_speech: bool | None = Field(None, description="true when VAD found no speech")
    segments: list[SegmentOut] | None = None
    alerts: list[AlertOut] | None = None
    channels: str | None = Field(None, description="`split` when each channel is a party")
    reported_party: str | None = Field(None, description="split: whose emotion this is")
    parties: list[PartyOut] | None = None
    conversation: ConversationOut | None = None
    model: str | None = None
    synthetic: bool | None = Field(None, description="random weights: labels are meaningless")
    note: str | None = None
    error: str | None = None
    error_kind: str | None = None


class BatchOut(BaseModel):
    """Several files in one request: one entry each, in upload order (status 200)."""

    results: list[FileOut]


class ErrorOut(BaseModel):
    error: str = Field(description="one line, for people")
    error_kind: str = Field(description="for programs: the client's kinds or the gateway's")
    filename: str | None = None


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str
    model: str
    synthetic: bool
    labels: list[str]


class LatestOut(BaseModel):
    """A party's latest final (utterance.end) of a live call."""

    emotion: str | None
    confidence: float | None
    end_s: float | None = Field(description="when that utterance ended, in call time")


class CallAlertOut(BaseModel):
    party: str | None
    label: str
    score: float
    threshold: float
    end_s: float | None


class CallOut(BaseModel):
    """One live call, as its replica last wrote it (within ~1 s of a final or an alert)."""

    call_id: str
    protocol: str = Field(description="live, audiohook or twilio")
    parties: list[str]
    started: float = Field(description="when the call started, Unix seconds")
    replica: str = Field(description="the gateway replica that holds the call")
    state: str = Field(description="live; draining or moving while it moves to a replica")
    seq: int = Field(description="the seq of the call's last event")
    latest: dict[str, LatestOut] = Field(description="party -> its latest final")
    alerts: list[CallAlertOut] = Field(description="alerts fired, the newest last (20 at most)")


class CallsOut(BaseModel):
    calls: list[CallOut] = Field(description="alerting calls first, then the newest first")
    fleet: bool = Field(
        description="true: every replica's calls (--bus); false: this gateway's only"
    )
