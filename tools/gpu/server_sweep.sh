#!/usr/bin/env bash
# Device run: streams through `gptq-serve serve` at 1, 8, 32, 64 and 128 at once, beside the
# engine alone on the same card in the same run (`gptq-serve bench server`, docs/benchmarks.md
# "Server"): synthetic 13B 4-bit g128, 512-token prompts, 256 new tokens, greedy.
# Usage (repo root, device machine): bash tools/gpu/server_sweep.sh
# .whl must carry the exllamav2 wheel and the cp312 manylinux x86_64 wheels of pyzmq and
# msgspec (docs/deployment.md names them; the GPU image has no PyPI); .ext is optional.
set -o pipefail
source tools/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.log"
python3 -c "import zmq, msgspec; print('pyzmq', zmq.__version__, 'msgspec', msgspec.__version__)" \
    | tee -a "$OUT/env.log" || exit 1
# The engine alone (a child process), then the server, then SIGTERM: about five minutes on an
# H200 once /tmp/13b exists. CONCURRENCY=1,8,32 (then 64,128) splits it across two calls.
timeout 570 python3 -m engine.bench.cli server --synth --model /tmp/13b \
    --concurrency "${CONCURRENCY:-1,8,32,64,128}" --prompt-len 512 --new-tokens 256 \
    --server-log "$OUT/server.log" --json-out "$OUT/sweep.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -E "Traceback|Error" "$OUT/bench.log" "$OUT/server.log" | head -8
grep -E "warm-up|ready in" "$OUT/server.log" | head -4
sed -n '/^## /,$p' "$OUT/bench.log"
