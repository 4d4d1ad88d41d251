#!/usr/bin/env bash
# Device run for the linear kernels: the GPU tests of the Triton GPTQ kernels, the whole model
# and attention, then `gptq-serve bench engine` on a synthetic 13B (vocabulary 32000) with the
# linear backends (default, tensor-core kernel, exllamav2 alone, dense) one after another in one
# process, and exllamav2's generator.
# Usage (repo root, device machine, .whl and .ext carried): bash tools/gpu/linear.sh
set -o pipefail
source tools/gpu/setup.sh || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} GPTQ_KERNEL_CACHE=${GPTQ_KERNEL_CACHE:-/tmp/kcache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.log"
NOCONF=""; python3 -c "import tests.conftest" 2>/dev/null || NOCONF="--noconftest"
timeout ${TEST_TIMEOUT:-210} python3 -m pytest -q -ra -m cuda $NOCONF -p no:cacheprovider \
    --timeout=120 --tb=short --durations=8 ${TESTS:-tests/test_cuda_triton_gemm.py \
    tests/test_cuda_mma.py tests/test_cuda_model.py tests/test_cuda_attention.py} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
timeout ${BENCH_TIMEOUT:-340} python3 -m engine.bench.cli engine --synth --model /tmp/13b \
    --new-tokens ${NEW_TOKENS:-128} --backends ${BACKENDS:-triton,mma,exllama,dense} \
    --json-out "$OUT/engine.json" --profile-out "$OUT/profile.txt" > "$OUT/engine.log" 2>&1
echo "engine bench rc=$?"
grep -E "passed|failed" "$OUT/pytest.log" | tail -3; grep -E "^(FAILED|ERROR)|^E  " "$OUT/pytest.log" | head -12
grep -E "Traceback|Error" "$OUT/engine.log" | head -5
grep -E "linear [0-9]+x[0-9]+ [0-9]|model on the card" "$OUT/engine.log" | cut -c1-200 | head -12
grep -E "measured:" "$OUT/engine.log" | head -4 | cut -c1-900
head -16 "$OUT/profile.txt" 2>/dev/null | cut -c1-150
sed -n '/^## /,$p' "$OUT/engine.log"
