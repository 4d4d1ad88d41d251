#!/usr/bin/env bash
# Device run: the Triton GPTQ kernel's checks and tile sweep (tools/gpu/w4a16_sweep.py), with
# exllamav2's extension built in the background meanwhile (bringing it back in $OUT when it
# was not carried) so its kernel joins the comparison at the end.
# Usage (repo root, device machine, .whl carried; .ext too when it holds a build):
#   bash tools/gpu/sweep.sh
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/ext:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p /tmp/ext
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
if ls .ext/exllamav2_ext.so.gz.part-* >/dev/null 2>&1; then
    cat .ext/exllamav2_ext.so.gz.part-* | gunzip > /tmp/ext/exllamav2_ext.so
else
    ( t0=$(date +%s)
      MAX_JOBS=10 TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=/tmp/torch_ext \
          PYTHONPATH=/tmp/site python3 -c "import exllamav2.ext" > "$OUT/ext_build.log" 2>&1
      so=$(find /tmp/torch_ext -name 'exllamav2_ext*.so' | head -1)
      if [ -n "$so" ]; then
          gzip -c "$so" | split -b 15M - "$OUT/exllamav2_ext.so.gz.part-"
          cp "$so" /tmp/ext/.tmp.so && mv /tmp/ext/.tmp.so /tmp/ext/exllamav2_ext.so
          echo "exllamav2_ext built in $(( $(date +%s) - t0 )) s" >> "$OUT/ext_build.log"
      fi ) &
fi
timeout 540 python3 tools/gpu/w4a16_sweep.py 2>&1 | tee "$OUT/sweep.log" | grep -v "^\[" 
echo "sweep rc=$?"
tail -2 "$OUT/ext_build.log" 2>/dev/null
