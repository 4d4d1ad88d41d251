// Definition of launch_wgmma (w4a16_mma_launch.h): the token-block and group-size dispatch over
// the wgmma kernel's instantiations for one block width.
#pragma once

#include "w4a16_mma_launch.h"
#include "w4a16_wgmma.cuh"

namespace gptq_mma {

template <int TPW, int NB, bool SMALL_GROUPS>
cudaError_t launch_wgmma_one(const GemmArgs& a) {
  using S = WgShape<TPW, NB, SMALL_GROUPS>;
  const auto kernel = w4a16_wgmma_kernel<TPW, NB, SMALL_GROUPS>;
  static const cudaError_t configured = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
  if (configured != cudaSuccess) return configured;
  const int m_blocks = (a.M + S::kTokens - 1) / S::kTokens;
  const dim3 grid = a.stream_k ? dim3(m_blocks, a.stream_k, 1)
                               : dim3(m_blocks, a.split_k, (a.N / 16 + S::kTiles - 1) / S::kTiles);
  kernel<<<grid, kGemmThreads, S::kSmemBytes, a.stream>>>(
      a.x, a.M, a.K, a.ldx, a.qw, a.meta, a.group_shift, a.bias, a.out, a.N, a.ldo, a.ws,
      a.counters, a.split_k, a.stream_k);
  return cudaGetLastError();
}

template <int TPW, bool SMALL_GROUPS>
cudaError_t launch_wgmma_tokens(const GemmArgs& a) {
  // 64 tokens a block up to 64, then 128 (each block reads its weight slice once).
  return a.M <= 64 ? launch_wgmma_one<TPW, 1, SMALL_GROUPS>(a)
                   : launch_wgmma_one<TPW, 2, SMALL_GROUPS>(a);
}

template <int TPW>
cudaError_t launch_wgmma(const GemmArgs& a) {
  return a.group_shift < 6 ? launch_wgmma_tokens<TPW, true>(a)
                           : launch_wgmma_tokens<TPW, false>(a);
}

}  // namespace gptq_mma
