#!/usr/bin/env bash
# Device run: the prefix-caching GPU test, then `gptq-serve bench prefix` on a synthetic 13B
# checkpoint (32 streams sharing a 1024-token system prompt, and unique prompts; caching on and
# off, three runs of each). Usage (repo root, device machine, .whl and .ext carried):
#   bash tools/gpu/prefix.sh
set -o pipefail
source tools/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.log"
NOCONF=""; python3 -c "import tests.conftest" 2>/dev/null || NOCONF="--noconftest"
timeout 120 python3 -m pytest -q -ra -m cuda $NOCONF -p no:cacheprovider \
    tests/test_cuda_prefix_cache.py > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
timeout 420 python3 -m engine.bench.cli prefix --synth --model /tmp/13b \
    --json-out "$OUT/prefix.json" > "$OUT/prefix.log" 2>&1
echo "prefix bench rc=$?"
tail -n 5 "$OUT/pytest.log"; grep -E "Traceback|Error" "$OUT/prefix.log" | head -5
sed -n '/^## /,$p' "$OUT/prefix.log"
