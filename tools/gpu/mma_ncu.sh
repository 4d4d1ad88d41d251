#!/usr/bin/env bash
# Device run: Nsight Compute (full set) on one launch of the w4a16 tensor-core kernel per
# case, "IN x OUT x TOKENS x BLOCK_N k K_WARPS [/ SPLIT]" ("BLOCK_N w": the wgmma kernel);
# writes $OUT/ncu_<case>.txt and prints
# the figures that say what bounds it (throughputs, issue, stall reasons per instruction).
# Usage (after tools/gpu/setup.sh and the kernel build):
#   CASES="5120x27648x128x256k1 5120x15360x1x128k1/4" bash tools/gpu/mma_ncu.sh
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
for case in ${CASES:-5120x27648x128x256k1}; do
    IFS='x' read -r k n m geo <<< "${case%%/*}"
    if [[ $geo == *w ]]; then bn=${geo%w}; kw=w; else bn=${geo%%k*}; kw=${geo##*k}; fi
    split=""; [[ $case == */* ]] && split=${case##*/}
    log="$OUT/ncu_${case//\//s}.txt"
    timeout ${NCU_TIMEOUT:-120} "$NCU" --set full --print-details all --nvtx --nvtx-include "profile/" \
        -k "regex:w4a16_(gemm|wgmma)_kernel" --launch-count 1 \
        python3 tools/gpu/mma_one.py "$k" "$n" "$m" "$bn" "$kw" $split > "$log" 2>&1
    echo "== $case (rc=$?)"; grep -m1 "^case" "$log"
    grep -E "Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Issued Ipc Active|Achieved Occupancy|Registers Per Thread|Warp Cycles Per Issued|Stall [A-Z][a-z]+|Block Limit (Registers|Shared Mem)|Waves Per SM|Shared Memory.*Bank|Executed Ipc" "$log" \
        | sed "s/  */ /g" | head -40
    sed -n "/Section: Warp State Statistics/,/Section: /p" "$log" | grep -v "^ *-*$" | head -30
done
