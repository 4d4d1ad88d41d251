// The launchers of the w4a16 products, one explicit instantiation a block geometry (the
// w4a16_mma_t*k*.cu and w4a16_wgmma_t*.cu files, compiled in parallel); the torch binding (w4a16_mma.cu) calls it
// with plain pointers, so the geometry files need no torch headers.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace gptq_mma {

struct GemmArgs {
  const half* x;  // [M, K], row stride ldx, rows 16-byte aligned, columns in sorted order
  int M, K, ldx;
  const uint4* qw;  // [N/16][K/64][32][4] words
  const half2* meta;  // [groups][N]
  int group_shift;  // log2 of the inputs a group, 31: one group
  const half* bias;  // [N] or null
  half* out;  // [M, N], row stride ldo
  int N, ldo;
  float* ws;  // split_k > 1: >= split_k * M * N floats, M rounded up to the tokens a block
  int* counters;  // split_k > 1: zeros, >= blocks along M * N / 16
  int split_k;
  // wgmma only: 0, or the persistent blocks a token block of a stream-K launch (split_k 1;
  // ws and counters as for that many splits: see stream_k_splits in the binding).
  int stream_k;
  cudaStream_t stream;
};

// TPW: output tiles (16 rows) a warp; KW: warps sharing a tile along K (1 or 2). The block
// covers 16 * TPW * 8 / KW rows.
template <int TPW, int KW>
cudaError_t launch_gemm(const GemmArgs& a);

// The wgmma kernel (w4a16_wgmma.cuh, the w4a16_wgmma_t*.cu files), blocks of 128 TPW rows;
// only where wgmma_probe wrote 1.
template <int TPW>
cudaError_t launch_wgmma(const GemmArgs& a);

// Writes to the device int at ``flag`` 1 where the wgmma kernel was compiled for this device
// (sm_90a), 0 where it is empty (every other target).
cudaError_t wgmma_probe(int* flag, cudaStream_t stream);

}  // namespace gptq_mma
