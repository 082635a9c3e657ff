"""The serving contract: one source of truth for names, shapes, ports and server flags.

Exporter, model configs, client, load tests, Docker and Kubernetes manifests all read
these values, and a test fails when any of them drifts.
"""

from __future__ import annotations

MODEL_NAME = "emotion2vec"

# Triton tensor names (also the ONNX graph's input/output names).
INPUT_WAV = "WAV"  # float32 [B, T], 16 kHz mono, zero padded
INPUT_WAV_LENS = "WAV_LENS"  # int64 [B], valid samples per row
OUTPUT_SCORES = "SCORES"  # float32 [B, C], probabilities
OUTPUT_EMBEDDING = "EMBEDDING"  # float32 [B, D], utterance embedding

SAMPLE_RATE = 16_000
MIN_SAMPLES = 400  # receptive field of the conv feature encoder: one frame
FRAME_STRIDE = 320  # samples per output frame (50 frames/s)
MAX_SEGMENT_S = 30.0  # attention is quadratic: longer audio is segmented by the client
# Longest recording a client accepts (e2v classify --max-duration-s, the gateway's limit).
MAX_DURATION_S = 7200.0

# Labels of the emotion2vec label set that are never an answer. FunASR's reference sets the
# logits of `unuse*` placeholders to -inf before the softmax: they have no score at all
# (export/network.py masks them the same way, and clients leave them out). `<unk>` keeps
# its score (it is a class of the softmax) but is never an answer: not a file's or a
# segment's emotion, a --labels choice, an evaluation target or a custom head's label.
PLACEHOLDER_LABEL_PREFIX = "unuse"
UNKNOWN_LABEL = "<unk>"


def is_scored_label(label: str) -> bool:
    """Whether a label has a score: every label but the `unuse*` placeholders."""
    return not label.startswith(PLACEHOLDER_LABEL_PREFIX)


def is_answer_label(label: str) -> bool:
    """Whether a label may be an answer: a scored label other than `<unk>`."""
    return is_scored_label(label) and label != UNKNOWN_LABEL


# How a file's label comes from its segments' scores (`--aggregate`): the duration-weighted
# mean of the scores, or the majority of the segments' labels.
AGGREGATIONS = ("mean", "vote")

# Confidence intervals of `e2v evaluate` and `e2v train-head` (--bootstrap): resamples.
BOOTSTRAP_RESAMPLES = 1000
MAX_BOOTSTRAP_RESAMPLES = 100_000

# Clips are padded up to the next bucket so the dynamic batcher can group them.
LENGTH_BUCKETS_S = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0)

# Server-side bounds (model config parameters read by the Python-backend targets; the
# onnxruntime backend cannot check them). A request with more samples per row than the
# largest bucket, or more rows x samples than the budget, is refused with INVALID_ARG.
PARAM_MAX_SAMPLES = "max_samples"
PARAM_MAX_BATCH_SAMPLES = "max_batch_samples"
MAX_SAMPLES = int(LENGTH_BUCKETS_S[-1] * SAMPLE_RATE)  # 480,000: the largest bucket
# Samples per request and per ONNX Runtime call (cpu target): 2 maximum-length rows, 60 s of
# audio. Larger dynamic batches run as several calls, which bounds an instance's peak memory
# (emotion2vec_plus_base: +1.26 GiB for one such call, see docs/deploy.md "Memory").
MAX_BATCH_SAMPLES = 2 * MAX_SAMPLES

# Exit status of every `e2v` command: bit flags, so a pipeline can test each (README).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug, never a bad input (`e2v live`: the call failed)
EXIT_USAGE = 2  # bad arguments, or an output that cannot be written or resumed
EXIT_UNAVAILABLE = 3  # the server is unreachable (rerun with --resume)
EXIT_FILE_ERRORS = 4  # some files failed (each has its row)
EXIT_ALERT = 8  # an --alert fired

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
# Clients of Triton (`e2v classify`, evaluate, train-head, gateway, the Python API).
TRITON_URL = f"localhost:{GRPC_PORT}"  # --url: where a client finds Triton by default
TRITON_PROTOCOLS = ("grpc", "http")  # --protocol
TRITON_RETRIES = 12  # --retries: backoff doubles up to 5 s, ~40 s for a restarting server
TRITON_REQUESTS_IN_FLIGHT = 16  # --concurrency: what the dynamic batcher needs to form batches
HEALTH_READY_PATH = "/v2/health/ready"
# Readiness of the served model itself: unlike the server's, it fails on an empty repository.
MODEL_READY_PATH = f"/v2/models/{MODEL_NAME}/ready"
HEALTH_LIVE_PATH = "/v2/health/live"

# Python backend (cpu target): each instance's shared-memory region starts at this size,
# enough for one maximum dynamic batch (8 rows x MAX_SAMPLES float32 = 15.4 MB), so that
# normal traffic never grows it (a region never shrinks). See docs/deploy.md, "Memory".
PYTHON_SHM_DEFAULT_BYTES = 16 * 2**20

GRPC_MAX_CONNECTION_AGE_MS = 60_000
GRPC_MAX_CONNECTION_AGE_GRACE_MS = 30_000

# Flags every deployment passes to tritonserver (local `e2v serve`, compose, Kubernetes).
# Model control off: the served models are fixed at start-up; nothing can load/unload
# (`e2v serve --hot-add` replaces it with HOT_ADD_FLAGS).
MODEL_CONTROL_NONE = "--model-control-mode=none"
SERVER_FLAGS = (
    MODEL_CONTROL_NONE,
    "--strict-readiness=true",
    "--disable-auto-complete-config",  # serve the generated config exactly as written
    "--exit-timeout-secs=30",
    "--allow-metrics=true",
    "--allow-gpu-metrics=true",
    "--log-verbose=0",
    # No pooled gRPC request objects: a pooled one keeps its largest message (a refused
    # oversize request included) allocated for the life of the server.
    "--grpc-infer-allocation-pool-size=0",
    # Each client connection is closed after a minute (GOAWAY; requests in flight get 30 s
    # more): the clients' gRPC channels then ask DNS again, so a fleet's new replicas get
    # traffic within about 75 s (client/targets.py, docs/deploy.md "A fleet of Triton
    # replicas"). Reconnecting costs one TCP + HTTP/2 handshake a minute per client.
    f"--grpc-max-connection-age={GRPC_MAX_CONNECTION_AGE_MS}",
    f"--grpc-max-connection-age-grace={GRPC_MAX_CONNECTION_AGE_GRACE_MS}",
    f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_DEFAULT_BYTES}",
)

# Admin APIs (logging, trace, shared memory, model repository) answer only requests that
# carry this header with the deployment's key (a file: --admin-key-file, a Docker or
# Kubernetes secret). Inference, metadata, model config, statistics and health stay open.
RESTRICTED_APIS = ("logging", "trace", "shared-memory", "model-repository")
ADMIN_KEY_HEADER = "triton-admin-key"  # HTTP header
# gRPC clients send the key in this metadata key (Triton prefixes restricted protocol keys).
ADMIN_KEY_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# Containers start Triton through this launcher (docker/e2v-tritonserver.sh): it reads the
# key from ADMIN_KEY_FILE (compose and Kubernetes mount their secret there), adds
# restricted_api_flags(key) and removes stale shared-memory regions.
SERVER_LAUNCHER = "e2v-tritonserver"
ADMIN_KEY_FILE = "/run/secrets/e2v-admin-key"


# Hot-adding models (`e2v serve --hot-add`, instead of MODEL_CONTROL_NONE): everything in the
# repository is loaded at start, as with "none"; later loads go only through the
# model-repository API, which answers only requests carrying the admin key. Triton's own
# "poll" mode is not used: it can see half-written models, and it reloads or unloads a
# model whenever its files change.
HOT_ADD_FLAGS = ("--model-control-mode=explicit", "--load-model=*")

# Custom heads (`e2v train-head`): a classifier on the base model's EMBEDDING, served as
# `<repo>/head_NAME` and chained after the base model in the ensemble `<repo>/<base>_NAME`,
# which clients call exactly like the base model (WAV, WAV_LENS -> SCORES, EMBEDDING).
HEAD_PREFIX = "head_"
HEAD_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,47}"  # NAME: lower case, a directory-safe word
HEAD_MAX_BATCH_SIZE = 64  # rows per head execution; the ensemble's is the base model's
# The head also returns its input unchanged, and the ensemble's EMBEDDING comes from there:
# Triton prunes ensemble steps by unrequested outputs, and would drop the base model's step
# for a request of SCORES alone if EMBEDDING were the base model's output directly.
HEAD_EMBEDDING_OUTPUT = "EMBEDDING_OUT"


def head_model_name(name: str) -> str:
    """The head's own model name in the repository."""
    return f"{HEAD_PREFIX}{name}"


def ensemble_model_name(base: str, name: str) -> str:
    """The model clients call: the base model followed by head NAME."""
    return f"{base}_{name}"


def restricted_api_flags(key: str) -> list[str]:
    """tritonserver flags that put RESTRICTED_APIS behind ADMIN_KEY_HEADER=key (HTTP, gRPC)."""
    group = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={key}"
    return [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]


def bucket_samples(num_samples: int) -> int:
    """Padded length for a clip of `num_samples`: the smallest bucket that holds it."""
    for seconds in LENGTH_BUCKETS_S:
        size = int(seconds * SAMPLE_RATE)
        if num_samples <= size:
            return size
    raise ValueError(
        f"clip of {num_samples / SAMPLE_RATE:.2f} s exceeds the {MAX_SEGMENT_S:.0f} s maximum"
    )


def bucket_lengths_samples() -> list[int]:
    """All bucket lengths in samples (used for warmup and TensorRT profiles)."""
    return [int(s * SAMPLE_RATE) for s in LENGTH_BUCKETS_S]


# The HTTP gateway (`e2v gateway`): uploads in, JSON out; decoding and VAD in front of Triton.
GATEWAY_PORT = 8080
GATEWAY_LIVE_PATH = "/health"
GATEWAY_READY_PATH = "/ready"  # 200 only while Triton's model is ready
GATEWAY_METRICS_PATH = "/metrics"
# Answered whatever the connection caps hold (client/gateway/server.py): GET only.
GATEWAY_PROBE_PATHS = (GATEWAY_LIVE_PATH, GATEWAY_READY_PATH, GATEWAY_METRICS_PATH)
GATEWAY_PREDICT_PATH = "/predict"
GATEWAY_MAX_UPLOAD_MB = 200.0

# Live sessions (`e2v gateway`, WebSocket): protocol endpoints, subscriptions and events.
# docs/live.md documents every message; client/live/ implements them.
LIVE_PATH = "/v1/live"  # our own protocol: JSON `start`, binary audio frames, `stop`
AUDIOHOOK_PATH = "/v1/audiohook"  # Genesys AudioHook protocol v2
TWILIO_PATH = "/v1/twilio"  # Twilio Media Streams (no results go back on this socket)
AUDIOHOOK_ENTITY_TYPE = "e2v.emotion"  # AudioHook `event` entities that carry our events
# Party names of the telephony channels: AudioHook external/internal, Twilio inbound/outbound.
AUDIOHOOK_PARTIES = {"external": "customer", "internal": "agent"}
TWILIO_PARTIES = {"inbound": "caller", "outbound": "callee"}
CALL_EVENTS_PATH = "/v1/calls/{call_id}/events"  # GET: Server-Sent Events of one call
CALL_EVENTS_WS_PATH = "/v1/calls/{call_id}/events/ws"  # the same events over a WebSocket
# A call id: `call_id` of `start`, Twilio's callSid, a subscription's {call_id}.
CALL_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
# The control messages of /v1/live (their JSON `type`): the client's start and stop, and
# the gateway's answer to start.
LIVE_START = "start"
LIVE_STOP = "stop"
LIVE_STARTED = "started"
LIVE_ENCODINGS = ("pcm_s16le", "mulaw", "alaw")
LIVE_SAMPLE_RATES = (8_000, 16_000)
LIVE_MAX_CHANNELS = 2  # parties per stream (customer and agent)
LIVE_WINDOW_S = 3.0  # interim results: the emotion of the utterance's last WINDOW_S...
LIVE_HOP_S = 1.0  # ...every HOP_S of audio while speech goes on

# Event `type`s a live session emits (to its socket, subscribers and webhooks).
EVENT_UTTERANCE_START = "utterance.start"
EVENT_RESULT = "result"  # interim: the last window of an utterance still going on
EVENT_UTTERANCE_END = "utterance.end"  # final: the whole utterance (equals e2v classify)
EVENT_ALERT = "alert"
EVENT_SUMMARY = "summary"  # per party, the whole call, when the session ends
EVENT_ERROR = "error"
LIVE_EVENT_TYPES = (
    EVENT_UTTERANCE_START,
    EVENT_RESULT,
    EVENT_UTTERANCE_END,
    EVENT_ALERT,
    EVENT_SUMMARY,
    EVENT_ERROR,
)

# WebSocket close codes. Standard ones where RFC 6455 has one; 4xxx mirror HTTP statuses.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the gateway drains (SIGTERM): reconnect to another instance
CLOSE_POLICY = 1008  # API key missing or wrong
CLOSE_TOO_BIG = 1009  # a message over the size limit
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # session limit reached: retry later (the reason says when)
CLOSE_BAD_MESSAGE = 4400  # malformed, out of order, unknown encoding or setting
CLOSE_TIMEOUT = 4408  # no start in time, idle, or past the longest session
CLOSE_SLOW_READER = 4409  # the client stopped reading its events
CLOSE_TOO_FAST = 4429  # audio faster than real time beyond the allowed factor

# Signed webhooks (live alerts and summaries, `e2v classify --webhook`): HMAC-SHA256 over
# f"{timestamp}.{body}" with the secret from a file, sent as "t=TIMESTAMP,v1=HEX".
WEBHOOK_SIGNATURE_HEADER = "X-E2V-Signature"
WEBHOOK_ID_HEADER = "X-E2V-Webhook-Id"  # one id per delivery, the same on every retry (dedupe)
EVENT_FILE_ALERT = "file.alert"  # `e2v classify --webhook`: a finished file that crossed --alert

# The event bus (`e2v gateway --bus nats://...`, client/live/nats_bus.py): live events, the
# fleet-wide call registry and webhooks on NATS JetStream, shared by every gateway replica.
# Without --bus each gateway keeps them in process (client/live/bus.py). docs/deploy.md,
# "Live calls across replicas", sizes the retention; docs/events.schema.json is the event.
NATS_PORT = 4222  # NATS clients' port (deploy/k8s/bus: the Service `nats:4222`)
BUS_SUBJECT_PREFIX = "e2v.calls"  # e2v.calls.<call token>.events.<event type>
BUS_EVENTS_STREAM = "E2V_EVENTS"  # --bus-stream: every event of every live call
BUS_CALLS_BUCKET = "e2v_calls"  # --bus-calls-bucket: KV, call token -> the call's record
BUS_WEBHOOK_CONSUMER = "e2v_webhooks"  # --bus-webhook-consumer: durable, alerts and summaries
BUS_MAX_AGE_S = 3600.0  # --bus-max-age-s: events older than this leave the stream
BUS_MAX_BYTES = 1 << 30  # --bus-max-bytes: the stream's size; the oldest events leave first
BUS_EVENTS_PER_CALL = 2000  # --bus-events-per-call: kept per call and event type
BUS_CLAIM_TTL_S = 10.0  # --bus-claim-ttl-s: a call's claim expires this long after its owner
BUS_EVENT_ID_HEADER = "Nats-Msg-Id"  # the event id: JetStream drops a republished duplicate
CALLS_PATH = "/v1/calls"  # GET: the live calls (every replica's with --bus), ?alerting=true


def bus_token(call_id: str) -> str:
    """`call_id` as one NATS subject token and KV key: call ids may hold `.` and `:`, which
    subjects and keys reserve or refuse; they are escaped as `=2E` and `=3A` (`=` is not a
    call-id character, so the mapping is one to one)."""
    return call_id.replace(".", "=2E").replace(":", "=3A")


def call_events_subject(call_id: str, event_type: str = ">") -> str:
    """The subject of `call_id`'s events of `event_type` (`>`: all of them, in order)."""
    return f"{BUS_SUBJECT_PREFIX}.{bus_token(call_id)}.events.{event_type}"


def all_calls_subject(event_type: str = ">") -> str:
    """Every call's events of `event_type`, e.g. all_calls_subject(EVENT_ALERT)."""
    return f"{BUS_SUBJECT_PREFIX}.*.events.{event_type}"
