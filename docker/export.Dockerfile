# `e2v export`: turns an emotion2vec checkpoint into a Triton model repository.
#
#   docker build -f docker/export.Dockerfile -t emotion2vec-triton/export:0.1.0 .
#   docker run --rm -v "$PWD/model_repository:/models" emotion2vec-triton/export:0.1.0 \
#       --model iic/emotion2vec_plus_large --repo /models --name emotion2vec --target gpu
#
# Export runs on the CPU (ONNX export needs no GPU), so the image carries the CPU-only torch
# wheel instead of the multi-GB CUDA one. Checkpoints named by hub id are downloaded at run
# time into /cache (mount a volume there to keep them between runs).
#
# Build context: the repository root. docker/export.Dockerfile.dockerignore is an allowlist
# of what the package needs (pyproject.toml, README.md, the Python packages and the
# exporter's templates).

# Debian bookworm (glibc 2.36): nvidia-pytriton's wheel, a project dependency, needs glibc >= 2.35.
FROM python:3.11.11-slim-bookworm

# torch comes from the PyTorch CPU index; the version matches what the project is tested with.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Separate layer: torch is the largest and least frequently changing dependency.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY . .
# The exporter's config templates and Python-backend model ship as package data. The
# `export` extra brings FunASR and onnx (the default install is the lean client); `hub`
# brings modelscope / huggingface-hub for hub ids such as iic/emotion2vec_plus_large. The constraint keeps pip from swapping the CPU torch for the
# CUDA build from PyPI.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[export,hub]" \
    && rm /tmp/torch-constraint.txt

# Non-root user; uid/gid 1000 like the server image's triton-server user, so the model
# repository it writes (a shared volume) is owned by the user that serves it.
RUN groupadd --gid 1000 e2v \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin e2v \
    && mkdir -p /models /cache \
    && chown e2v:e2v /models /cache

# Every cache goes to /cache (hub downloads) or /tmp, never into the image: the container can
# run with a read-only root filesystem.
ENV HF_HOME=/cache/huggingface \
    MODELSCOPE_CACHE=/cache/modelscope \
    XDG_CACHE_HOME=/cache \
    TORCH_HOME=/cache/torch \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPLCONFIGDIR=/tmp/matplotlib

USER 1000:1000
WORKDIR /home/e2v
VOLUME ["/models", "/cache"]

ENTRYPOINT ["e2v", "export"]
CMD ["--help"]
