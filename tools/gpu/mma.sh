#!/usr/bin/env bash
# Device run for the w4a16 tensor-core kernel: build it (the built module comes back gzipped in
# $OUT, for carrying as .kext/), its GPU tests, with ENGINE=1 the engine benchmark on a
# synthetic 13B with BACKENDS (default triton,mma), then the layer sweep
# (tools/gpu/mma_sweep.py) beside exllamav2, cuBLAS fp16 and dequantise+cuBLAS. CASES runs
# Nsight Compute on single launches first (tools/gpu/mma_ncu.sh); BENCH_ARGS go to the bench.
# EXT_BG=1 EXT_JOBS=8: exllamav2's extension builds beside ours and the tests (setup.sh).
# Usage (repo root, device machine, .whl and .ext carried): bash tools/gpu/mma.sh
set -o pipefail
source tools/gpu/setup.sh || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} GPTQ_KERNEL_CACHE=${GPTQ_KERNEL_CACHE:-/tmp/kcache}
[ -d .kext ] && export PYTHONPATH="$PWD/.kext:$PYTHONPATH"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader  # $OUT brings back 8 files at most
t0=$(date +%s)
python3 -c "from engine.model.linear import mma; print(mma.load_ext().__file__)" > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
echo "kernel module: $(tail -1 "$OUT/build.log") in $(( $(date +%s) - t0 )) s"
so=$(tail -1 "$OUT/build.log"); [ -f "$so" ] && gzip -c "$so" > "$OUT/gptq_serve_w4a16_mma.so.gz"
NOCONF=""; python3 -c "import tests.conftest" 2>/dev/null || NOCONF="--noconftest"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -x -m cuda $NOCONF -p no:cacheprovider --timeout=140 \
    --tb=short ${TESTS:-tests/test_cuda_mma.py} > "$OUT/pytest.log" 2>&1
rc=$?
grep -E "passed|failed" "$OUT/pytest.log" | tail -2; grep -E "^(FAILED|ERROR)|^E  " "$OUT/pytest.log" | head -12
[ $rc -ne 0 ] && [ -z "$FORCE" ] && exit 1
[ -n "$CASES" ] && bash tools/gpu/mma_ncu.sh
[ -n "$EXT_PID" ] && wait "$EXT_PID"  # exllamav2's extension, built in the background (EXT_BG)
if [ "${ENGINE:-0}" = 1 ]; then
    timeout ${BENCH_TIMEOUT:-300} python3 -m engine.bench.cli engine --synth --model /tmp/13b \
        --new-tokens ${NEW_TOKENS:-128} --backends ${BACKENDS:-triton,mma} \
        ${JSON:+--json-out "$OUT/engine.json"} --profile-out "$OUT/profile.txt" $BENCH_ARGS > "$OUT/engine.log" 2>&1
    echo "engine bench rc=$?"
    grep -E "Traceback|Error" "$OUT/engine.log" | head -5
    grep -E "linear [0-9]+x[0-9]+ " "$OUT/engine.log" | cut -c1-220 | head -10
    sed -n '/^## /,$p' "$OUT/engine.log"
fi
if [ -n "${TOKENS:-1,4,8,16,32,64,128}" ] && [ "${SWEEP:-1}" = 1 ]; then
    TOKENS=${TOKENS:-1,4,8,16,32,64,128} timeout ${SWEEP_TIMEOUT:-220} python3 tools/gpu/mma_sweep.py > "$OUT/sweep.log" 2>&1
    echo "sweep rc=$?"; grep -E "FAIL|Error|correct" "$OUT/sweep.log" | head -10
    sed -n '/^## /,$p' "$OUT/sweep.log"
fi
