#!/usr/bin/env bash
# Device run: GPU tests (default: the fused kernels and the whole model; pass test files to
# choose), then `gptq-serve bench engine` on a synthetic 13B checkpoint with a kernel profile of
# one eager decode step. Usage (repo root, device machine, .whl and .ext carried):
#   bash tools/gpu/engine.sh [test files...]
set -o pipefail
source tools/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.log"
NOCONF=""; python3 -c "import tests.conftest" 2>/dev/null || NOCONF="--noconftest"
timeout 150 python3 -m pytest -q -ra -m cuda $NOCONF -p no:cacheprovider --durations=5 \
    "${@:-tests/test_cuda_fused.py}" \
    tests/test_cuda_model.py > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
timeout 290 python3 -m engine.bench.cli engine --synth --model /tmp/13b \
    --json-out "$OUT/engine.json" --profile-out "$OUT/profile.txt" > "$OUT/engine.log" 2>&1
echo "engine bench rc=$?"
grep -E "passed|failed" "$OUT/pytest.log" | tail -3; grep -E "^(FAILED|ERROR)|^E  " "$OUT/pytest.log" | head -12
grep -E "Traceback|Error" "$OUT/engine.log" | head -5; grep -E "exllama [0-9]|captured|KV cache" "$OUT/engine.log" | head -8
head -22 "$OUT/profile.txt" 2>/dev/null | cut -c1-150
sed -n '/^## /,$p' "$OUT/engine.log"
