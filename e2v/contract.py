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

# Clips are padded up to the next bucket so the dynamic batcher can group them.
LENGTH_BUCKETS_S = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0)

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
HEALTH_READY_PATH = "/v2/health/ready"
# Readiness of the served model itself: unlike the server's, it fails on an empty repository.
MODEL_READY_PATH = f"/v2/models/{MODEL_NAME}/ready"
HEALTH_LIVE_PATH = "/v2/health/live"

# Flags every deployment passes to tritonserver (local `e2v serve`, compose, Kubernetes).
# Model control off: the served models are fixed at start-up; nothing can load/unload.
SERVER_FLAGS = (
    "--model-control-mode=none",
    "--strict-readiness=true",
    "--disable-auto-complete-config",  # serve the generated config exactly as written
    "--exit-timeout-secs=30",
    "--allow-metrics=true",
    "--allow-gpu-metrics=true",
    "--log-verbose=0",
)


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
GATEWAY_PREDICT_PATH = "/predict"
GATEWAY_MAX_UPLOAD_MB = 200.0
