// The dense weight of the w4a16 layout (w4a16_mma.cuh), for the dequantise-then-cuBLAS path
// of large steps. Included by the binding only: a kernel defined in a header that several
// translation units include would be defined once in each.
#pragma once

#include "w4a16_mma.cuh"

namespace gptq_mma {

// The dense weight, transposed: out [K, N] fp16 (rows in sorted order). A block is kWarps
// warps over kWarps neighbouring tiles of one 64-input chunk: each warp decodes its 64 x 16
// values into shared memory, then the block writes the chunk's 64 rows of 16 kWarps outputs
// (32 kWarps bytes) whole. Grid: ceil(N / 16 / kWarps) * (K / 64) blocks. The kernel is bound
// by its writes (4x its reads); kWarps sets how long each row's contiguous run is.
template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
w4a16_dequant_kernel(const uint4* __restrict__ qw, const half2* __restrict__ meta,
                     int group_shift, int K, int N, half* __restrict__ out) {
  constexpr int kRow = kWarps * 16 + 8;  // padded: the 16-byte reads below stay aligned
  __shared__ __align__(16) half stage[64][kRow];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunks = K / 64, tiles = N / 16;
  const int c = blockIdx.x % chunks, tile_first = blockIdx.x / chunks * kWarps;
  const int tile = tile_first + warp;
  if (tile < tiles) {
    const int g = lane >> 2, t = lane & 3;
    const int row = tile * 16 + g;
    const uint4 w = qw[((size_t)tile * chunks + c) * 32 + lane];
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int k0 = c * 64 + s * 16;
      const half2 m_lo = meta[(size_t)(k0 >> group_shift) * N + row];
      const half2 m_hi = meta[(size_t)(k0 >> group_shift) * N + row + 8];
      uint32_t a[4];
      dequant(words[s], __high2half2(m_lo), __low2half2(m_lo), odd_zero(__high2half2(m_hi)),
              __low2half2(m_hi), a);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const half2 v = as_h2(a[i]);
        const int r = warp * 16 + g + ((i & 1) ? 8 : 0);
        const int k = s * 16 + 2 * t + ((i & 2) ? 8 : 0);
        stage[k][r] = __low2half(v);
        stage[k + 1][r] = __high2half(v);
      }
    }
  }
  __syncthreads();
  // 2 kWarps threads a row (2 a tile, 16 bytes each), 16 rows a pass.
  const int v = threadIdx.x % (2 * kWarps);
  if (tile_first + v / 2 >= tiles) return;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int k = p * 16 + threadIdx.x / (2 * kWarps);
    *reinterpret_cast<uint4*>(out + (size_t)(c * 64 + k) * N + tile_first * 16 + v * 8) =
        *reinterpret_cast<const uint4*>(&stage[k][v * 8]);
  }
}

}  // namespace gptq_mma
