#!/usr/bin/env bash
# The whole job on one machine, no Docker, no GPU: set up, export a model, serve it with the
# real Triton server, classify the bundled recordings, stop the server.
#
#   MODEL=synthetic:base (default) | /path/to/emotion2vec_plus_large | iic/emotion2vec_plus_large
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-synthetic:base}
REPO=build/model_repository
HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002}

bash scripts/setup.sh
E2V=.venv/bin/e2v

echo "== export $MODEL -> $REPO (cpu target: ONNX Runtime in Triton's Python backend)"
"$E2V" export --model "$MODEL" --repo "$REPO" --target cpu

echo "== serve"
"$E2V" serve --repo "$REPO" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
    --metrics-port "$METRICS_PORT" > build/serve.log 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -q '^ready:' build/serve.log && break
    kill -0 "$server" 2>/dev/null || { cat build/serve.log; exit 1; }
    sleep 1
done
cat build/serve.log

echo "== classify samples/ (table, then CSV and JSON Lines)"
set +e
"$E2V" classify samples/ --url "localhost:$GRPC_PORT" --csv build/results.csv \
    --jsonl build/results.jsonl --alert angry=0.5
status=$?
set -e
echo "exit status $status (bit 8 = an --alert fired, bit 4 = a file failed)"
echo "results: build/results.csv, build/results.jsonl"
[ $((status & ~12)) -eq 0 ]
