# Sourced at the start of every device run: installs the carried exllamav2 wheel and makes its
# CUDA extension importable, building it once (about 2 min on 16 cores) when .ext holds none.
# The built extension is gzipped into $OUT in 15 MB parts; copy them into .ext/ for later runs.
# EXT_BG=1: that build runs in the background (EXT_PID; EXT_JOBS parallel jobs).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="/tmp/ext:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p /tmp/ext
if ls .ext/exllamav2_ext.so.gz.part-* >/dev/null 2>&1; then
    cat .ext/exllamav2_ext.so.gz.part-* | gunzip > /tmp/ext/exllamav2_ext.so
    echo "exllamav2_ext: prebuilt ($(du -h /tmp/ext/exllamav2_ext.so | cut -f1))"
else
    build_exllama_ext() {
        local t0=$(date +%s)
        MAX_JOBS=${EXT_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=/tmp/torch_ext \
            python3 -c "import exllamav2.ext" > "$OUT/ext_build.log" 2>&1 || { tail -30 "$OUT/ext_build.log"; return 1; }
        local so=$(find /tmp/torch_ext -name 'exllamav2_ext*.so' | head -1)
        cp "$so" /tmp/ext/exllamav2_ext.so
        gzip -c "$so" | split -b 15M - "$OUT/exllamav2_ext.so.gz.part-"
        echo "exllamav2_ext: built in $(( $(date +%s) - t0 )) s"
    }
    if [ -n "$EXT_BG" ]; then
        # In the background (EXT_JOBS of the cores), while the caller builds and tests other
        # things; `wait $EXT_PID` before anything imports it.
        build_exllama_ext & EXT_PID=$!
    else
        build_exllama_ext || return 1
    fi
fi
