#!/usr/bin/env bash
# Set up the project's virtual environment in .venv (idempotent).
#
# torch is pinned to the CPU build 2.13.0: a plain `pip install torch` pulls a CUDA build of
# several GB. Outside our CI machines, point pip at PyTorch's CPU index first:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --constraint scripts/constraints.txt -e ".[dev,hub]"

# Optional: espeak-ng synthesizes real speech for one VAD test (skipped without it).
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) \
        || echo "note: espeak-ng not installed; its test will be skipped" >&2
fi
# The gateway page test drives Debian's chromium through chromedriver (CI must not skip it).
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "note: chromium not installed; the gateway page test will fail in CI" >&2
fi
echo "environment ready: .venv ($(.venv/bin/python --version))"
