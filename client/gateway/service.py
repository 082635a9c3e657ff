"""The gateway's work, apart from HTTP: one shared Triton client, admission, classification.

One `TritonEmotionClient` is opened at start-up and shared by every request (its gRPC
channel or HTTP pool reconnects by itself after a Triton restart, and spreads requests
over every Triton replica the --url target names). If Triton is not up
yet, the gateway still starts: it keeps connecting in the background, `/ready` says 503
and uploads get 503 until the model is there. Decoding and VAD run in a thread pool with
one thread per slot, through `client.classify.classify_source`, the same code as
`e2v classify`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from datetime import datetime, timezone

from e2v.client.classify import JobOptions, StageTimes, classify_source
from e2v.client.gateway import parameters
from e2v.client.gateway.config import GatewayConfig
from e2v.client.gateway.errors import BAD_PARAMETER, UNAVAILABLE, GatewayError
from e2v.client.gateway.limits import Admission
from e2v.client.gateway.metrics import GatewayMetrics
from e2v.client.gateway.uploads import Upload
from e2v.client.parties import parse_parties, party_thresholds
from e2v.client.results import FileResult, parse_alerts, resolve_alerts
from e2v.client.segment import parse_segment_mode
from e2v.client.triton import ModelInfo, ServerUnavailable, TritonEmotionClient

log = logging.getLogger("e2v.gateway")

# Per Triton call: transient failures (queue full, restart) are retried this often with
# backoff from REQUEST_BACKOFF_S (about 2 s in all), then the upload gets 503: a client
# waiting on an HTTP response must not hang for the 40 s a batch job would wait.
REQUEST_RETRIES = 3
REQUEST_BACKOFF_S = 0.25
INFER_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 2.0
RECONNECT_S = 1.0
# Triton requests in flight per slot: one file's next segment is sent while one is served.
REQUESTS_PER_SLOT = 2


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.admission = Admission(config.slots, config.queue_size, config.queue_wait_s)
        self.metrics = GatewayMetrics(lambda: self.admission.active, lambda: self.admission.waiting)
        self.metrics.bind_triton(self)
        self.client: TritonEmotionClient | None = None
        self.replicas: dict[str, str | None] = {}  # each replica's readiness, last check
        self.requests: asyncio.Semaphore | None = None
        self.decoders: concurrent.futures.ThreadPoolExecutor | None = None
        self._connector: asyncio.Task | None = None
        self.live = _live_hub(self)

    @property
    def info(self) -> ModelInfo | None:
        return self.client.info if self.client else None

    async def start(self) -> None:
        config = self.config
        self.client = TritonEmotionClient(
            config.triton,
            config.protocol,
            config.model,
            retries=REQUEST_RETRIES,
            backoff_s=REQUEST_BACKOFF_S,
            timeout_s=INFER_TIMEOUT_S,
        )
        self.requests = asyncio.Semaphore(REQUESTS_PER_SLOT * config.slots)
        self.decoders = concurrent.futures.ThreadPoolExecutor(
            config.slots, thread_name_prefix="e2v-gateway-decode"
        )
        self._connector = asyncio.create_task(self._connect())
        await self.live.start()

    async def stop(self) -> None:
        await self.live.stop()
        if self._connector:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
        if self.client:
            await self.client.close()
        if self.decoders:
            self.decoders.shutdown(wait=False, cancel_futures=True)

    async def _connect(self) -> None:
        """Connect until Triton's model is ready (labels, buckets, synthetic flag)."""
        said = False
        while True:
            try:
                info = await self.client.connect()
            except ServerUnavailable as exc:
                if not said:
                    log.warning("waiting for Triton: %s", exc)
                    said = True
                await asyncio.sleep(RECONNECT_S)
                continue
            self.metrics.triton_ready.set(1)
            note = " (SYNTHETIC: random weights)" if info.synthetic else ""
            log.info("connected to Triton at %s: model %s%s", self.config.triton, info.name, note)
            return

    async def ready(self) -> bool:
        """True while at least one Triton replica says the model is ready (one check of
        each, bounded in time); `replicas` keeps what each said."""
        if self.client is None:
            return False
        self.replicas = await self.client.replica_readiness(READY_TIMEOUT_S)
        ready = self.info is not None and any(why is None for why in self.replicas.values())
        self.metrics.triton_ready.set(int(ready))
        return ready

    def not_ready(self) -> str:
        """The /ready refusal: the target, and why each replica that is down is."""
        down = ", ".join(f"{name} ({why})" for name, why in self.replicas.items() if why)
        message = f"Triton's model is not ready at {self.config.triton}"
        return f"{message}: {down}" if down else message

    def require_model(self) -> ModelInfo:
        if self.info is None:
            raise GatewayError(
                503,
                UNAVAILABLE,
                f"Triton at {self.config.triton} ({self.config.protocol}) is not ready yet",
            )
        return self.info

    def options(
        self, segment: str, alert: str | None, channels: str = "mix", parties: str | None = None
    ) -> JobOptions:
        """Job options from the query values; 400 naming the problem (and the labels).
        `channels=split` (or `parties`) analyses each channel as its own party, with
        `alert` rules like `customer:angry=0.7` (client/parties.py)."""
        info = self.require_model()
        names, per_party, thresholds = None, None, {}
        try:
            mode = parse_segment_mode(segment)
            if channels == "split" or parties is not None:
                names = parse_parties(parties)
                per_party = party_thresholds(alert, names, info.labels)
            elif ":" in (alert or ""):
                raise ValueError(f"alert {alert}: PARTY:LABEL=P needs channels=split")
            else:
                thresholds = resolve_alerts(parse_alerts(alert), info.labels)
        except ValueError as exc:
            message = str(exc).replace("--alert", "alert")
            raise GatewayError(400, BAD_PARAMETER, message) from None
        problem = parameters.check_query(segment, alert, parties, info.labels)
        if problem:  # taken by the parsers, but not in the form the OpenAPI document states
            raise GatewayError(400, BAD_PARAMETER, problem)
        return JobOptions(
            url=self.config.triton,
            protocol=self.config.protocol,
            model=self.config.model,
            segment=mode,
            thresholds=thresholds,
            max_duration_s=self.config.max_duration_s,
            parties=names,
            party_thresholds=per_party,
        )

    async def classify(
        self, uploads: list[Upload], options: JobOptions, embeddings: bool
    ) -> list[dict]:
        """One JSON object per upload, in order; 503 when Triton goes away."""
        try:
            return list(await asyncio.gather(*(self._one(u, options, embeddings) for u in uploads)))
        except ServerUnavailable as exc:
            raise GatewayError(503, UNAVAILABLE, str(exc)) from None

    async def _one(self, upload: Upload, options: JobOptions, embeddings: bool) -> dict:
        times = StageTimes()
        if upload.size == 0:
            result = FileResult(
                file=upload.name,
                error="empty upload (0 bytes)",
                error_kind="empty",
                model=self.info.name,
                synthetic=self.info.synthetic,
            )
        else:
            upload.file.seek(0)
            result = await classify_source(
                upload.file,
                self.client,
                self.requests,
                options,
                self.decoders,
                name=upload.name,
                times=times,
            )
        self.metrics.observe_file(result.error_kind, result.duration_s, times)
        return file_json(result, embeddings)


def file_json(result: FileResult, embeddings: bool) -> dict:
    """`e2v classify --json`'s object, with the upload fields first: filename, emotion,
    confidence, timestamp (and each segment's embedding when asked for)."""
    row = result.to_json()
    data = {"filename": row.pop("file")}
    if result.ok:
        data |= {"emotion": row.pop("emotion"), "confidence": row.pop("confidence")}
    data["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    data |= row
    if embeddings and result.ok:
        pairs = [(data.get("segments", []), result.segments)]
        pairs += [
            (p["segments"], s.result.segments)
            for p, s in zip(data.get("parties", []), result.parties or [])
        ]
        for segments, sources in pairs:
            for segment, source in zip(segments, sources):
                segment["embedding"] = [round(float(v), 6) for v in source.embedding]
    return data


def _live_hub(gateway: Gateway):
    """The live tier (client/live/), given what it needs through `LiveServices`: the Triton
    client and model once started, metrics, slots, the key check, secrets, and the bus
    (in process, or NATS with --bus) with the webhook sender."""
    from e2v.client.gateway.auth import key_problem
    from e2v.client.live.bus_options import make_bus
    from e2v.client.live.hub import LiveHub
    from e2v.client.live.services import LiveServices

    config, webhook = gateway.config, None
    if config.webhook is not None:
        from e2v.client.webhooks import WebhookSender

        webhook = WebhookSender(config.webhook, config.webhook_secret)
    services = LiveServices(
        client=lambda: gateway.client,
        model=lambda: gateway.info,
        metrics=gateway.metrics,
        slots=config.slots,
        key_problem=functools.partial(key_problem, config.api_key),
        audiohook_secret=config.audiohook_secret,
        bus=make_bus(config.bus, webhook=webhook, metrics=gateway.metrics.bus),
    )
    hub = LiveHub(services, config.live)
    gateway.metrics.bind_live(hub)
    return hub
