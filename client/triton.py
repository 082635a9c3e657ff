"""Talking to Triton: model discovery, padded requests, retries with backoff.

Both protocols use tritonclient's asyncio clients so that many requests are in flight at
once; that concurrency is what lets Triton's dynamic batcher form batches.

One client talks to one Triton or to a fleet of replicas (client/targets.py: what --url
means). Over gRPC the channel balances each request with `round_robin`: a replica whose
connection fails leaves the rotation until it reconnects, so a retry goes to another one.
Over HTTP, client/http_replicas.py does the same. Ready means at least one replica's model
is ready; a refusal names the replicas that are not.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from e2v.client.channelz import ChannelRequests, top_channel_ids
from e2v.client.http_replicas import HttpReplicas, down_reason
from e2v.client.targets import Target, channel_address, parse_target

from e2v.contract import (
    INPUT_WAV,
    INPUT_WAV_LENS,
    LENGTH_BUCKETS_S,
    MODEL_NAME,
    OUTPUT_EMBEDDING,
    OUTPUT_SCORES,
    SAMPLE_RATE,
    TRITON_RETRIES,
    TRITON_URL,
)

# How each failure is handled, by its gRPC status or HTTP code (tritonclient reports both).
# Transient: overload, restart or rollout (a model unloaded by a graceful stop answers
# NOT_FOUND until the new server is up). Retried with backoff; never a file's final error.
TRANSIENT_STATUSES = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.NOT_FOUND",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
    "StatusCode.CANCELLED",
    "404",
    "408",
    "429",
    "502",
    "503",
    "504",
}
# The request itself is wrong (the server's input checks): final, reported in the file's row.
REJECTED_STATUSES = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE", "400", "413"}
# Without a status (connection-level errors), these words mean the same as transient.
TRANSIENT_MARKERS = (
    "unavailable",
    "exceeds maximum queue size",
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
)
# Anything else (INTERNAL, UNKNOWN, 500...) is the server's fault: retried this many times,
# then the file's row says error_kind "server", and --resume tries the file again.
SERVER_ERROR_RETRIES = 2
# Backoff doubles from backoff_s up to this, so the default retries span a server restart.
MAX_BACKOFF_S = 5.0
# One readiness check of the replicas (health probes, refusals) takes at most this long.
READY_TIMEOUT_S = 2.0

# The gRPC channel: per-request balancing over every resolved address, and a failed or new
# replica tried again within MAX_RECONNECT_MS (gRPC's default backoff grows to 2 minutes).
# Subchannels are the channel's own, so channelz counts only this client's requests. DNS is
# asked again on any connection loss (and the servers' --grpc-max-connection-age closes
# each connection every minute), at most every DNS_MIN_INTERVAL_MS. Keepalive pings find a
# replica that vanished without a reset (a node lost) while requests wait on it.
GRPC_SERVICE_CONFIG: dict[str, list[dict[str, dict]]] = {
    "loadBalancingConfig": [{"round_robin": {}}]
}
MAX_RECONNECT_MS = 5_000
DNS_MIN_INTERVAL_MS = 10_000
KEEPALIVE_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def grpc_channel_args(balanced: bool = True) -> list[tuple[str, object]]:
    """Channel options for tritonclient's gRPC client (they replace its defaults)."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    args: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_MS),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_INTERVAL_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 2),
    ]
    if balanced:
        args.append(("grpc.service_config", json.dumps(GRPC_SERVICE_CONFIG)))
    return args


class ServerUnavailable(Exception):
    """The server could not be reached (after retries): the job stops, nothing is lost."""


class InferenceError(Exception):
    """The server rejected this input; it is reported in the file's row."""


class ServerError(Exception):
    """The server failed on this request (after retries); reported in the file's row and
    retried by --resume."""


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
    """Async client for one emotion2vec model on one Triton server or a fleet of replicas."""

    def __init__(
        self,
        url: str = TRITON_URL,
        protocol: str = "grpc",
        model: str = MODEL_NAME,
        retries: int = TRITON_RETRIES,
        backoff_s: float = 0.5,
        timeout_s: float = 120.0,
    ):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        self.url, self.protocol, self.model = url, protocol, model
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.target: Target = parse_target(url, protocol)
        self._channel_requests = ChannelRequests(None)
        self._probes: dict[str, Any] = {}  # gRPC: replica -> a client asking it alone
        if protocol == "grpc":
            import tritonclient.grpc.aio as module

            before = top_channel_ids()
            self._client = module.InferenceServerClient(
                url=self.target.channel, channel_args=grpc_channel_args()
            )
            self._channel_requests = ChannelRequests.of_new_channel(before)
        else:
            import tritonclient.http.aio as module

            self._client = HttpReplicas(self.target.urls, model, module)
        self._module = module
        self.info: ModelInfo | None = None

    async def close(self) -> None:
        self.replica_requests()  # the last counts, before the channel drops them
        for probe in self._probes.values():
            await probe.close()
        self._probes.clear()
        await self._client.close()

    def replica_requests(self) -> Counter:
        """Requests this client sent to each replica (IP:PORT, or the URL as given)."""
        if self.protocol == "http":
            return Counter(self._client.requests)
        return self._channel_requests.read()

    async def __aenter__(self) -> TritonEmotionClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> ModelInfo:
        """Check the server and model are ready; read labels, buckets and the synthetic flag."""
        try:
            await self._with_retries(self._ready)
            config = await self._with_retries(self._model_config)
            self.info = await self._model_info(config)
        except ServerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a foreign server answers in many ways
            raise ServerUnavailable(
                f"{self.url} ({self.protocol}) does not answer like Triton serving "
                f"'{self.model}': {_message(exc)}. Is it Triton's {self.protocol} port?"
            ) from exc
        return self.info

    async def is_ready(self) -> bool:
        """One readiness check, without retries (health probes): true while at least one
        replica's model is ready."""
        return any(why is None for why in (await self.replica_readiness()).values())

    async def replica_readiness(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, str | None]:
        """Each replica's model readiness now: None when ready, else why not. All replicas
        are asked at once, within `timeout_s` in all (a DNS target is resolved first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            replicas = await asyncio.wait_for(self._replicas(), timeout_s / 2)
        except (OSError, asyncio.TimeoutError) as exc:
            return {self.target.text: f"not resolved: {_message(exc)}"}
        left = max(0.1, deadline - loop.time())
        if self.protocol == "http":
            checks = [self._client.readiness(url, left) for url in replicas]
        elif replicas == [self.target.text]:
            checks = [self._readiness(self._client, left)]
        else:
            checks = [self._readiness(self._probe(a), left) for a in replicas]
            for gone in set(self._probes) - set(replicas):
                await self._probes.pop(gone).close()
        return dict(zip(replicas, await asyncio.gather(*checks)))

    async def _replicas(self) -> list[str]:
        """The addresses a DNS target's channel balances over now (channelz), which also
        honours a DNS server named in the target; resolved here before the first request."""
        if self.protocol == "grpc" and self.target.channel.startswith("dns:"):
            seen = self._channel_requests.states()
            if seen:
                return sorted(seen)
        return await self.target.replicas()

    async def _readiness(self, client, timeout_s: float) -> str | None:
        try:
            ready = await asyncio.wait_for(client.is_model_ready(self.model), timeout_s)
        except asyncio.TimeoutError:
            return f"no answer within {timeout_s:.1f} s"
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, foreign server
            return down_reason(exc)
        return None if ready else f"model '{self.model}' not ready"

    def _probe(self, address: str):
        """A gRPC client of one replica alone (its own connection: not counted, not
        balanced), kept while the replica is in the target."""
        if address not in self._probes:
            self._probes[address] = self._module.InferenceServerClient(
                url=channel_address(address), channel_args=grpc_channel_args(balanced=False)
            )
        return self._probes[address]

    async def down_replicas(self) -> str:
        """ "A (why), B (why)" for the replicas not ready now; "" for one server."""
        if not self.target.fleet:
            return ""
        readiness = await self.replica_readiness()
        return ", ".join(f"{name} ({why})" for name, why in readiness.items() if why)

    async def _ready(self) -> None:
        if not await self._client.is_model_ready(self.model):
            raise _NotReady(f"model '{self.model}' is not ready on {self.url}")

    async def model_config(self) -> dict:
        """The model's configuration as JSON (from any ready replica, with retries)."""
        return await self._with_retries(self._model_config)

    async def model_metadata(self) -> dict:
        """The model's metadata as JSON: name, versions, inputs, outputs."""
        return await self._with_retries(self._model_metadata)

    async def _model_metadata(self) -> dict:
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        return await self._client.get_model_metadata(self.model, **kwargs)

    async def _model_config(self) -> dict:
        if self.protocol == "grpc":
            return (await self._client.get_model_config(self.model, as_json=True))["config"]
        return await self._client.get_model_config(self.model)

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

    async def predict(
        self, segment: np.ndarray, size: int | None = None, embedding: bool = True
    ) -> Prediction:
        """Scores and embedding for one segment, padded here to its length bucket (or to
        the bucket `size`, so that windows of different lengths share one shape).
        `embedding=False`: scores only, when the model has them (live calls send no
        embeddings; the embedding is then empty)."""
        info = self.info if self.info is not None else await self.connect()
        size = info.bucket(max(len(segment), size or 0))
        wav = np.zeros((1, size), dtype=np.float32)
        wav[0, : len(segment)] = segment
        scores_only = not embedding and bool(info.labels)
        names = [OUTPUT_SCORES, OUTPUT_EMBEDDING] if info.labels else [OUTPUT_EMBEDDING]
        names = [OUTPUT_SCORES] if scores_only else names
        result = await self._with_retries(
            lambda: self._infer(wav, np.array([[len(segment)]], dtype=np.int64), names)
        )
        scores = result.as_numpy(OUTPUT_SCORES)[0] if info.labels else None
        embedding_values = (
            np.zeros(0, np.float32) if scores_only else result.as_numpy(OUTPUT_EMBEDDING)[0]
        )
        for name, values in ((OUTPUT_SCORES, scores), (OUTPUT_EMBEDDING, embedding_values)):
            if values is not None and not np.isfinite(values).all():
                raise ServerError(f"the server returned non-finite {name}")
        return Prediction(scores=scores, embedding=embedding_values)

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
        """Retry transient failures (queue full, restart, rollout, connection) with jittered
        backoff, and server-side failures a few times; input rejections at once."""
        server_errors = 0
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - tritonclient raises several types
                kind = failure_kind(exc)
                if kind == "rejected":
                    raise InferenceError(_message(exc)) from exc
                if kind == "server":
                    server_errors += 1
                    if server_errors > SERVER_ERROR_RETRIES:
                        raise ServerError(_message(exc)) from exc
                elif attempt == self.retries:
                    raise ServerUnavailable(await self._unreachable(exc)) from exc
                delay = min(MAX_BACKOFF_S, self.backoff_s * (2**attempt))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    async def _unreachable(self, exc: BaseException) -> str:
        down = await self.down_replicas()
        return (
            f"Triton server unreachable at {self.url} ({self.protocol}): {_message(exc)}. "
            + (f"Replicas down: {down}. " if down else "")
            + "Is it running? Start one with `e2v serve`."
        )


class _NotReady(Exception):
    """The model is not ready yet (loading, or unloading in a rollout): transient."""


def failure_kind(exc: BaseException) -> str:
    """ "transient", "rejected" (the input's fault) or "server" for a failed call."""
    if isinstance(exc, (_NotReady, ConnectionError, TimeoutError, OSError)):
        return "transient"
    status_of = getattr(exc, "status", None)
    status = status_of() if callable(status_of) else None
    if status in TRANSIENT_STATUSES:
        return "transient"
    if status in REJECTED_STATUSES:
        return "rejected"
    text = _message(exc).lower()
    if any(marker in text for marker in TRANSIENT_MARKERS):
        return "transient"
    return "server"


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
