// Definition of launch_gemm (w4a16_mma_launch.h): the token-tile and group-size dispatch over
// the kernel's instantiations for one block geometry.
#pragma once

#include "w4a16_mma.cuh"
#include "w4a16_mma_launch.h"

namespace gptq_mma {

template <int NT, int TPW, int KW, bool SMALL_GROUPS>
cudaError_t launch_one(const GemmArgs& a) {
  using S = GemmShape<NT, TPW, KW, SMALL_GROUPS>;
  const auto kernel = w4a16_gemm_kernel<NT, TPW, KW, SMALL_GROUPS>;
  // Above 48 KiB of shared memory a kernel must opt in (once a process: the first device).
  static const cudaError_t configured = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
  if (configured != cudaSuccess) return configured;
  const dim3 grid((a.M + 8 * NT - 1) / (8 * NT), a.split_k,
                  (a.N / 16 + S::kTiles - 1) / S::kTiles);
  kernel<<<grid, kGemmThreads, S::kSmemBytes, a.stream>>>(
      a.x, a.M, a.K, a.ldx, a.qw, a.meta, a.group_shift, a.bias, a.out, a.N, a.ldo, a.ws,
      a.counters, a.split_k);
  return cudaGetLastError();
}

template <int TPW, int KW, bool SMALL_GROUPS>
cudaError_t launch_tokens(const GemmArgs& a) {
  if (a.M <= 8) return launch_one<1, TPW, KW, SMALL_GROUPS>(a);
  if (a.M <= 16) return launch_one<2, TPW, KW, SMALL_GROUPS>(a);
  if (a.M <= 32) return launch_one<4, TPW, KW, SMALL_GROUPS>(a);
  return launch_one<8, TPW, KW, SMALL_GROUPS>(a);
}

template <int TPW, int KW>
cudaError_t launch_gemm(const GemmArgs& a) {
  // Groups of 16 or 32 inputs change within a 64-input chunk.
  return a.group_shift < 6 ? launch_tokens<TPW, KW, true>(a) : launch_tokens<TPW, KW, false>(a);
}

}  // namespace gptq_mma
