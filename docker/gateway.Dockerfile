# `e2v gateway`: the HTTP upload API and web page, decoding and VAD in front of Triton.
#
#   docker build -f docker/gateway.Dockerfile -t emotion2vec-triton/gateway:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -p 127.0.0.1:8080:8080 \
#       emotion2vec-triton/gateway:0.1.0 --url triton-host:8001
#
# CPU only and small: the client pipeline and the `gateway` extra, not the exporter's torch
# or tritonserver (docker/gateway-requirements.txt). It runs as a non-root user with a
# read-only root filesystem; uploads past 1 MiB go to unnamed files in /tmp (mount a
# size-limited tmpfs or emptyDir there).
#
# Build context: the repository root; docker/gateway.Dockerfile.dockerignore is an allowlist.

# Debian bookworm, like the export image.
FROM python:3.11.11-slim-bookworm

ARG SILERO_VAD_VERSION=6.2.3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY docker/gateway-requirements.txt /tmp/gateway-requirements.txt
# silero-vad without its dependencies: the client reads its ONNX file with onnxruntime and
# never imports the package (which would pull in torch).
RUN pip install --no-cache-dir -r /tmp/gateway-requirements.txt \
    && pip install --no-cache-dir --no-deps "silero-vad==${SILERO_VAD_VERSION}" \
    && rm /tmp/gateway-requirements.txt

COPY . .
# --no-deps: the project's own dependency list is the exporter's and load tests' too.
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src \
    && groupadd --gid 1000 e2v \
    && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin e2v

# Nothing is written into the image at run time (read-only root filesystem).
ENV TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache

USER 1000:1000
WORKDIR /tmp
EXPOSE 8080

# Liveness (the process answers); readiness (/ready) is for the orchestrator to route by.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]

ENTRYPOINT ["e2v", "gateway"]
# Listen on every interface inside the container; publish the port on loopback or behind a
# proxy. `server:8001` is Triton's gRPC port in docker/docker-compose.yml.
CMD ["--host", "0.0.0.0", "--port", "8080", "--url", "server:8001"]
