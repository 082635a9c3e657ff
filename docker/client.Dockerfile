# The lean client: `e2v classify`, `e2v merge` (and `e2v evaluate` with EXTRAS=evaluate)
# for batch jobs over object storage. No torch, FunASR or Triton server: decoding (PyAV),
# resampling (soxr), Silero VAD (vendored ONNX on onnxruntime) and tritonclient.
#
#   docker build -f docker/client.Dockerfile -t emotion2vec-client .
#   docker run --rm emotion2vec-client classify s3://bucket/calls/ --url triton:8001 ...
#
# Build context: the repository root; docker/client.Dockerfile.dockerignore sends only what
# `pip install .` needs.
FROM docker.io/library/python:3.11-slim-bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

WORKDIR /src
COPY . .
# Extras: s3 and parquet; add gcs, azure (other stores) or evaluate here as needed.
RUN pip install --no-cache-dir --constraint docker/client-constraints.txt ".[s3,parquet]" \
    && rm -rf /src \
    && groupadd --gid 1000 e2v \
    && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin e2v

# Runs with a read-only root filesystem: only /tmp (an emptyDir in Kubernetes) is written.
WORKDIR /tmp
USER 1000:1000
ENTRYPOINT ["e2v"]
CMD ["classify", "--help"]
