// Stream-K work decomposition of the wgmma kernel (w4a16_wgmma.cuh), shared with the host,
// which sizes and checks the split-K workspace with it (the binding; mma.stream_k_splits in
// Python is the same arithmetic).
//
// The work of one token block is T = tile_blocks x units: a tile block (the block's output
// rows) times its K stages (kStageInputs inputs each), tile block major. Block b of G
// persistent blocks (G <= T) takes units [b T / G, (b + 1) T / G): every block the same share
// +-1 stage, so no multiprocessor idles in a last partial wave (a 5120 x 27648 layer at 64
// tokens has 108 blocks of 256 rows for an H200's 132 multiprocessors). A tile block that a
// share's boundary crosses is summed as split-K is (TileStore): its splits are the
// consecutive blocks that cover it, in K order, so the sum is deterministic.
#pragma once

#include <cuda_runtime.h>

namespace gptq_mma {

// One block's run of work: tile block ``tile_block``, stages [u_lo, u_lo + n_stages) of K,
// split ``split`` of the ``splits`` covering that tile block (1 split: written directly).
struct Segment {
  int tile_block, u_lo, n_stages, split, splits;
};

struct StreamK {
  int units, total, blocks;  // units: K stages a tile block; total: T; blocks: G

  // 32-bit arithmetic (the host checks that total x blocks fits): ptxas inlines it and keeps
  // what follows from it warp-uniform, where a 64-bit division is a subroutine call whose
  // result it cannot prove uniform, which moved the main loop's counters and wgmma
  // descriptors off the uniform datapath (two R2UR a wgmma).
  __host__ __device__ int first(int b) const {
    return static_cast<int>(static_cast<unsigned>(b) * static_cast<unsigned>(total) /
                            static_cast<unsigned>(blocks));
  }
  // The block whose share holds unit u: the largest b with first(b) <= u.
  __host__ __device__ int owner(int u) const {
    return static_cast<int>((static_cast<unsigned>(u + 1) * static_cast<unsigned>(blocks) - 1u) /
                            static_cast<unsigned>(total));
  }
  // The run from unit u of block b's share, which ends at unit ``end``.
  __host__ __device__ Segment at(int u, int end, int b) const {
    const int tb = u / units, k0 = u - tb * units;
    const int lo = owner(tb * units), hi = owner(tb * units + units - 1);
    const int n = units - k0 < end - u ? units - k0 : end - u;
    return Segment{tb, k0, n, b - lo, hi - lo + 1};
  }
  // The most splits of any tile block: the workspace holds that many partial sums.
  __host__ int max_splits() const {
    int most = 1;
    for (int tb = 0; tb * units < total; ++tb) {
      const int n = owner(tb * units + units - 1) - owner(tb * units) + 1;
      most = n > most ? n : most;
    }
    return most;
  }
};

}  // namespace gptq_mma
