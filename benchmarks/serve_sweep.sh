#!/usr/bin/env bash
# Start `fullgraph serve`, run `fullgraph bench serve` at several concurrencies, stop it.
# Usage: benchmarks/serve_sweep.sh OUT_DIR [serve flags...]
# Env: PORT (default 8011), CONCURRENCIES (default "1 8 32"), NUM_PROMPTS (default 128),
#      INPUT_LEN / OUTPUT_LEN (default 256 / 128).
set -euo pipefail
out=$1; shift
port=${PORT:-8011}
python3 -m fullgraph.entrypoints.cli --log-level WARNING serve --host 127.0.0.1 --port "$port" "$@" \
    >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do   # startup includes graph capture
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" \
        2>/dev/null && break
    kill -0 $server 2>/dev/null || { tail -20 "$out/server.log"; exit 1; }
    sleep 1
done
for c in ${CONCURRENCIES:-1 8 32}; do
    mkdir -p "$out/c$c"
    python3 -m fullgraph.entrypoints.cli --log-level WARNING bench serve \
        --base-url "http://127.0.0.1:$port" --concurrency "$c" --num-prompts "${NUM_PROMPTS:-128}" \
        --input-len "${INPUT_LEN:-256}" --output-len "${OUTPUT_LEN:-128}" --out "$out/c$c" | tail -4
done
