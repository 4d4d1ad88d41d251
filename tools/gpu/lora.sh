#!/usr/bin/env bash
# Device run: the LoRA GPU tests (grouped Triton kernels at 13B shapes, the CUDA engine with
# adapters against the CPU reference, decode graphs with LoRA), then `gptq-serve bench lora` on
# a synthetic 13B checkpoint: 32 streams over 4 adapters of rank 16 on all seven projections
# against 32 streams on the base, same run. Usage (repo root, device machine, .whl and .ext
# carried):
#   bash tools/gpu/lora.sh
set -o pipefail
source tools/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.log"
NOCONF=""; python3 -c "import tests.conftest" 2>/dev/null || NOCONF="--noconftest"
timeout 300 python3 -m pytest -q -ra -m cuda $NOCONF -p no:cacheprovider \
    tests/test_cuda_lora.py > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
timeout 480 python3 -m engine.bench.cli lora --synth --model /tmp/13b --streams 32 \
    --adapters 4 --lora-rank 16 --lora-prompt-len 128 --output-len 128 \
    --json-out "$OUT/lora.json" > "$OUT/lora.log" 2>&1
echo "lora bench rc=$?"
tail -n 5 "$OUT/pytest.log"; grep -E "Traceback|Error" "$OUT/lora.log" | head -5
sed -n '/^## /,$p' "$OUT/lora.log"
