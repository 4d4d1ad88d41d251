#!/usr/bin/env bash
# Device run: what the HTTP layer costs. Aggregate decode of the engine alone at 32 sequences,
# then the same load (32 streams, 512-token prompts, 256 new tokens) through a running
# `gptq-serve serve`, measured with vLLM's serving-benchmark definitions; then SIGTERM and the
# server's exit code. Usage (repo root, device machine, .whl and .ext carried):
#   bash tools/gpu/http_overhead.sh
set -o pipefail
source tools/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.log"
timeout 220 python3 -m engine.bench.cli engine --synth --model /tmp/13b --batches 32 --no-exl2 \
    --json-out "$OUT/engine.json" > "$OUT/engine.log" 2>&1
echo "engine bench rc=$?"
python3 -m app.cli serve --model /tmp/13b --host 127.0.0.1 --port 8000 --max-num-seqs 64 \
    > "$OUT/server.log" 2>&1 &
server=$!
for _ in $(seq 1 150); do
    curl -sf http://127.0.0.1:8000/ready >/dev/null && break
    kill -0 $server 2>/dev/null || break
    sleep 1
done
curl -s http://127.0.0.1:8000/ready; echo
timeout 150 python3 -m engine.bench.cli server --base-url http://127.0.0.1:8000 \
    --concurrency 32 --num-requests 64 --prompt-len 512 --new-tokens 256 \
    --json-out "$OUT/server.json" > "$OUT/client.log" 2>&1
echo "server bench rc=$?"
curl -s http://127.0.0.1:8000/metrics | grep -E "^gptq_(model_info|num_preemptions_total|generation_tokens_total|kv_cache_blocks_total)" > "$OUT/metrics.txt"
kill -TERM $server; wait $server; echo "server exit code $?"
grep -E "Traceback|Error" "$OUT/engine.log" "$OUT/server.log" "$OUT/client.log" | head -8
cat "$OUT/metrics.txt"
sed -n '/^## /,$p' "$OUT/engine.log"
sed -n '/^## /,$p' "$OUT/client.log"
