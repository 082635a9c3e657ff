# emotion2vec on NVIDIA Triton Inference Server.
#
# One image for every export target:
#   gpu / tensorrt  -> Triton's onnxruntime / tensorrt backends (already in the NGC image)
#   cpu             -> Triton's Python backend running ONNX Runtime on the CPU; that needs
#                      `onnxruntime` + `numpy` in the image's python, installed below.
#
# The model repository (written by `e2v export --repo DIR --name emotion2vec`) is either
#   mounted at /models at run time (docker-compose volume, Kubernetes PVC) -- the default, or
#   baked into the image:  e2v export ... --repo build/model_repository   (export's default)
#                          docker build -f docker/server.Dockerfile \
#                              --build-arg MODEL_REPOSITORY=build/model_repository .
# A repository mounted at /models hides a baked one.
#
# Build context: the repository root. docker/server.Dockerfile.dockerignore sends only the
# model repository directories (BuildKit, the default builder since Docker Engine 23).
#
# The server flags below are e2v.contract.SERVER_FLAGS plus the repository path and the
# contract ports; tests/test_deploy.py fails when they drift. They go through the launcher
# docker/e2v-tritonserver.sh, which puts the admin APIs (logging, trace, shared memory,
# model repository) behind the key in /run/secrets/e2v-admin-key and refuses to start
# without one.

# Triton 2.51.0 == NGC release 24.10 (Ubuntu 22.04, Python 3.10, ONNX Runtime 1.19.2).
# For production pin the digest too: nvcr.io/nvidia/tritonserver:24.10-py3@sha256:<digest>.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# Directory (relative to the build context) copied to /models. The default placeholder only
# holds a README: Triton treats sub-directories of the repository as models and ignores files.
ARG MODEL_REPOSITORY=docker/model-repository-placeholder

LABEL org.opencontainers.image.title="emotion2vec-triton server" \
      org.opencontainers.image.description="emotion2vec speech emotion recognition served by NVIDIA Triton Inference Server 2.51 (NGC 24.10)" \
      org.opencontainers.image.licenses="MIT"

# The "cpu" target's Python-backend model imports onnxruntime and numpy. Same ONNX Runtime
# release as Triton 24.10's onnxruntime backend, so the cpu and gpu targets accept the same
# opsets; numpy stays 1.x like the rest of the project (and the Python backend's stub).
RUN pip3 install --no-cache-dir onnxruntime==1.19.2 numpy==1.26.4

# Nothing in the container may write into the image (Kubernetes runs it with
# readOnlyRootFilesystem): no .pyc files next to the model's model.py.
ENV PYTHONDONTWRITEBYTECODE=1

COPY --chown=1000:1000 ${MODEL_REPOSITORY}/ /models/
COPY --chmod=0755 docker/e2v-tritonserver.sh /usr/local/bin/e2v-tritonserver

# The tensorrt target caches built engines in /tmp/trt-cache (trt_engine_cache_path in its
# config.pbtxt). Owned by the server user so a volume mounted there starts out writable.
RUN mkdir -p /tmp/trt-cache && chown 1000:1000 /tmp/trt-cache

# uid/gid 1000 is the NGC image's `triton-server` user. Numeric, so that Kubernetes'
# runAsNonRoot can verify it without an explicit runAsUser.
USER 1000:1000
WORKDIR /opt/tritonserver

# HTTP/REST, gRPC, Prometheus metrics (e2v.contract HTTP_PORT, GRPC_PORT, METRICS_PORT).
EXPOSE 8000 8001 8002

# Ready = server live and every model loaded and warmed up (--strict-readiness=true).
# The start period covers model load + warmup (TensorRT engines can take minutes).
# Exec form (no shell); Docker counts any non-zero curl exit as a failed check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--output", "/dev/null", \
         "http://127.0.0.1:8000/v2/models/emotion2vec/ready"]

# The NGC entrypoint (/opt/nvidia/nvidia_entrypoint.sh) is kept: it enables CUDA forward
# compatibility on older drivers and then execs this command.
CMD ["e2v-tritonserver", \
     "--model-control-mode=none", \
     "--strict-readiness=true", \
     "--disable-auto-complete-config", \
     "--exit-timeout-secs=30", \
     "--allow-metrics=true", \
     "--allow-gpu-metrics=true", \
     "--log-verbose=0", \
     "--grpc-infer-allocation-pool-size=0", \
     "--grpc-max-connection-age=60000", \
     "--grpc-max-connection-age-grace=30000", \
     "--backend-config=python,shm-default-byte-size=16777216", \
     "--model-repository=/models", \
     "--http-port=8000", \
     "--grpc-port=8001", \
     "--metrics-port=8002"]
