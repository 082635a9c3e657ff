"""Talking to Triton: model discovery, padded requests, retries with backoff.

Both protocols use tritonclient's asyncio clients so that many requests are in flight at
once; that concurrency is what lets Triton's dynamic batcher form batches.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import numpy as np

from e2v.contract import (
    INPUT_WAV,
    INPUT_WAV_LENS,
    LENGTH_BUCKETS_S,
    MODEL_NAME,
    OUTPUT_EMBEDDING,
    OUTPUT_SCORES,
    SAMPLE_RATE,
)

# Triton says these when it is overloaded or restarting: worth a retry after a pause.
TRANSIENT_MARKERS = (
    "unavailable",
    "queue",
    "exceeds maximum",
    "connection",
    "connect",
    "timeout",
    "timed out",
    "deadline",
    "reset",
    "refused",
    "not ready",
    "socket",
    "broken pipe",
    "server disconnected",
    "503",
    "502",
)


class ServerUnavailable(Exception):
    """The server could not be reached (after retries): the job stops, nothing is lost."""


class InferenceError(Exception):
    """The server rejected this input; it is reported in the file's row."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    labels: list[str]  # index -> label; empty when the model has no SCORES output
    embed_dim: int
    synthetic: bool
    buckets: tuple[int, ...]  # padded lengths in samples

    @property
    def max_samples(self) -> int:
        return self.buckets[-1]

    def bucket(self, num_samples: int) -> int:
        for size in self.buckets:
            if num_samples <= size:
                return size
        raise ValueError(f"segment of {num_samples} samples exceeds {self.max_samples}")


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray | None  # [C] probabilities
    embedding: np.ndarray  # [D]


class TritonEmotionClient:
    """Async client for one emotion2vec model on one Triton server."""

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: str = "grpc",
        model: str = MODEL_NAME,
        retries: int = 6,
        backoff_s: float = 0.5,
        timeout_s: float = 120.0,
    ):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
        self.url, self.protocol, self.model = url, protocol, model
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        if protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        self._module = module
        self._client = module.InferenceServerClient(url=url)
        self.info: ModelInfo | None = None

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> TritonEmotionClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> ModelInfo:
        """Check the server and model are ready; read labels, buckets and the synthetic flag."""
        try:
            ready = await self._with_retries(lambda: self._client.is_model_ready(self.model))
        except ServerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ServerUnavailable(self._unreachable(exc)) from exc
        if not ready:
            raise ServerUnavailable(f"model '{self.model}' is not ready on {self.url}")
        if self.protocol == "grpc":
            config = (await self._client.get_model_config(self.model, as_json=True))["config"]
        else:
            config = await self._client.get_model_config(self.model)
        self.info = await self._model_info(config)
        return self.info

    async def _model_info(self, config: dict) -> ModelInfo:
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        outputs = {o["name"]: o for o in config.get("output", [])}
        buckets = params.get("length_buckets_s") or ",".join(map(str, LENGTH_BUCKETS_S))
        sizes = tuple(int(float(s) * SAMPLE_RATE) for s in buckets.split(","))
        labels: list[str] = []
        if OUTPUT_SCORES in outputs:
            labels = await self._labels(int(outputs[OUTPUT_SCORES]["dims"][0]), sizes[0])
        return ModelInfo(
            name=self.model,
            labels=labels,
            embed_dim=int(outputs[OUTPUT_EMBEDDING]["dims"][0]),
            synthetic=params.get("synthetic", "false") == "true",
            buckets=sizes,
        )

    async def _labels(self, num_classes: int, samples: int) -> list[str]:
        """Label names through Triton's classification extension ("score:index:label")."""
        wav = np.zeros((1, samples), dtype=np.float32)
        wav[0, :: max(1, samples // 97)] = 0.01
        result = await self._with_retries(
            lambda: self._infer(
                wav, np.array([[samples]], np.int64), [OUTPUT_SCORES], class_count=num_classes
            )
        )
        labels = [""] * num_classes
        for entry in result.as_numpy(OUTPUT_SCORES).reshape(-1):
            _, index, label = entry.decode("utf-8").split(":", 2)
            labels[int(index)] = label
        return labels

    async def predict(self, segment: np.ndarray) -> Prediction:
        """Scores and embedding for one segment (padded here to its length bucket)."""
        if self.info is None:
            await self.connect()
        size = self.info.bucket(len(segment))
        wav = np.zeros((1, size), dtype=np.float32)
        wav[0, : len(segment)] = segment
        names = [OUTPUT_SCORES, OUTPUT_EMBEDDING] if self.info.labels else [OUTPUT_EMBEDDING]
        result = await self._with_retries(
            lambda: self._infer(wav, np.array([[len(segment)]], dtype=np.int64), names)
        )
        scores = result.as_numpy(OUTPUT_SCORES)[0] if self.info.labels else None
        return Prediction(scores=scores, embedding=result.as_numpy(OUTPUT_EMBEDDING)[0])

    async def _infer(
        self, wav: np.ndarray, lens: np.ndarray, names: list[str], class_count: int = 0
    ):
        m = self._module
        inputs = [
            m.InferInput(INPUT_WAV, list(wav.shape), "FP32"),
            m.InferInput(INPUT_WAV_LENS, list(lens.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(wav)
        inputs[1].set_data_from_numpy(lens)
        outputs = [m.InferRequestedOutput(name, class_count=class_count) for name in names]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        return await self._client.infer(self.model, inputs, outputs=outputs, **kwargs)

    async def _with_retries(self, call):
        """Retry transient failures (queue full, restart, connection) with jittered backoff."""
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - tritonclient raises several types
                if not _is_transient(exc):
                    raise InferenceError(_message(exc)) from exc
                if attempt == self.retries:
                    raise ServerUnavailable(self._unreachable(exc)) from exc
                delay = self.backoff_s * (2**attempt)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _unreachable(self, exc: BaseException) -> str:
        return (
            f"Triton server unreachable at {self.url} ({self.protocol}): {_message(exc)}. "
            f"Is it running? Start one with `e2v serve`."
        )


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, OSError, asyncio.TimeoutError)):
        return True
    text = _message(exc).lower()
    return any(marker in text for marker in TRANSIENT_MARKERS)


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
