#!/usr/bin/env bash
# Device run: the kernel-level GPU tests, then `gptq-serve bench kernels` (copy bandwidth,
# exllama crossover per 13B layer shape, paged attention, SDPA prefill).
# Usage (repo root, on the device machine, .whl and .ext carried): bash tools/gpu/kernels.sh
set -o pipefail
source tools/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.log"
NOCONF=""; python3 -c "import tests.conftest" 2>/dev/null || NOCONF="--noconftest"
timeout 240 python3 -m pytest -q -ra -m cuda $NOCONF -p no:cacheprovider \
    tests/test_cuda_exllama.py tests/test_cuda_attention.py tests/test_cuda_fused.py \
    > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
timeout 150 python3 -m engine.bench.cli kernels --json-out "$OUT/kernels.json" \
    > "$OUT/kernels.log" 2>&1; echo "kernel bench rc=$?"
tail -n 5 "$OUT/pytest.log"; sed -n '/^## /,$p' "$OUT/kernels.log"
