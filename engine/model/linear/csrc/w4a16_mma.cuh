// w4a16 matrix products on the tensor cores (mma.sync m16n8k16), for steps of 1 to 64 tokens.
//
// The product is computed transposed, out^T = W^T x^T: the weights are the MMA's A operand
// (16 output features x 16 input rows a fragment) and the tokens its N side (8 a tile), so a
// step of few tokens wastes no weight traffic and little MMA work.
//
// Weight layout (engine/model/linear/mma.py, ``repack``): uint32 [N/16][K/64][32][4]. Word w of
// lane l in (output tile t, chunk c) holds the 8 four-bit values of lane l's A fragment for
// input rows 64c + 16w .. +15 (rows in group-sorted order) and output rows 16t .. 16t + 15:
// bits 4i and 16 + 4i are the two halves of fragment register i, so
//   reg_i = ((word >> 4i) & 0x000F000F) | 0x64006400
// is the pair (1024 + q_lo, 1024 + q_hi) in fp16, exactly (one shift and one lop3). A warp's
// 32 lanes x 4 words are 512 contiguous bytes: every load is a full 16-byte vector per lane.
//
// Group metadata: half2 [groups][N] = (scale, 1024 + zero + 1); the weight is
// (reg - zero') * scale in fp16, the subtraction exact, then one rounding by the scale, as the
// reference dequantisation rounds.
//
// Split-K: ``split_k`` blocks share one output tile along K. Each writes fp32 partials to the
// workspace and bumps the tile's counter; the last one adds the partials in split order
// (deterministic, unlike atomic adds), writes fp16 and resets the counter, so no zero-fill
// launch is needed and the kernel can be replayed in CUDA graphs.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace gptq_mma {

constexpr int kWarps = 4;  // warps a block; each owns one 16-row output tile

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  // Weights are read once a step: keep them out of L1.
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 as_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// The four A-fragment registers of one word: rows g (regs 0, 2) and g + 8 (regs 1, 3).
__device__ __forceinline__ void dequant(uint32_t word, half2 zero_lo, half2 scale_lo,
                                        half2 zero_hi, half2 scale_hi, uint32_t a[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t v = ((word >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
    const half2 z = (i & 1) ? zero_hi : zero_lo;
    const half2 s = (i & 1) ? scale_hi : scale_lo;
    a[i] = as_u32(__hmul2(__hsub2(as_h2(v), z), s));
  }
}

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                          uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The activations in B-fragment order: xf uint2 [ceil(M / 8)][K / 16][32], lane (g, t) of
// token tile i and input step s holding x[8i + g][p(16s + 2t), +1] and x[8i + g][p(16s + 2t
// + 8), +9], p the group sort (identity when perm is null), tokens past M zero. A warp then
// reads one B fragment as 256 contiguous bytes instead of eight scattered rows.
__global__ void w4a16_pack_x_kernel(const half* __restrict__ x, int M, int K, int ldx,
                                    const int64_t* __restrict__ perm, uint2* __restrict__ xf) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int steps = K / 16;
  const size_t total = (size_t)((M + 7) / 8) * steps * 32;
  if (idx >= total) return;
  const int lane = idx & 31;
  const size_t rest = idx >> 5;
  const int s = rest % steps, tile = rest / steps;
  const int m = tile * 8 + (lane >> 2);
  const int k = 16 * s + 2 * (lane & 3);
  half v[4] = {__float2half(0.f), __float2half(0.f), __float2half(0.f), __float2half(0.f)};
  if (m < M) {
    const half* row = x + (size_t)m * ldx;
    const int ks[4] = {k, k + 1, k + 8, k + 9};
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = row[perm ? (int)perm[ks[i]] : ks[i]];
  }
  uint2 out;
  out.x = as_u32(__halves2half2(v[0], v[1]));
  out.y = as_u32(__halves2half2(v[2], v[3]));
  xf[idx] = out;
}

// xf: the activations from w4a16_pack_x_kernel; out: [M, N] fp16, row stride ldo.
// Grid: (ceil(N / 16 / kWarps), split_k, ceil(M / (8 NT))). group_shift: log2 of the input
// rows a group (>= 4), or 31 for one group over all of K.
// DEPTH: weight chunks (512 bytes a warp each) in flight per warp.
template <int NT, int DEPTH>
__global__ void __launch_bounds__(kWarps * 32)
w4a16_mma_kernel(const uint2* __restrict__ xf, int M, int K,
                 const uint4* __restrict__ qw, const half2* __restrict__ meta, int group_shift,
                 const half* __restrict__ bias, half* __restrict__ out, int N, int ldo,
                 float* __restrict__ ws, int* __restrict__ counters, int split_k) {
  const int lane = threadIdx.x & 31;
  const int tile = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int tiles = N / 16;
  if (tile >= tiles) return;  // no block-wide barrier below: a warp may leave
  const int g = lane >> 2, t = lane & 3;
  const int chunks = K / 64;
  const int split = blockIdx.y;
  const int c_lo = split * chunks / split_k, c_hi = (split + 1) * chunks / split_k;
  const int m0 = blockIdx.z * 8 * NT;
  const int row = tile * 16 + g;  // this lane's output rows: row, row + 8
  const int token_tiles = min(NT, (M - m0 + 7) / 8);  // tiles of this block holding tokens
  const int steps = K / 16;
  const uint2* xb = xf + (size_t)(m0 / 8) * steps * 32 + lane;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  const uint4* wp = qw + (size_t)tile * chunks * 32 + lane;
  uint4 buf[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d)
    if (c_lo + d < c_hi) buf[d] = load_stream(wp + (size_t)(c_lo + d) * 32);

  int grp = -1;
  half2 zero_lo, scale_lo, zero_hi, scale_hi;
  for (int c0 = c_lo; c0 < c_hi; c0 += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int c = c0 + d;
      if (c < c_hi) {
        const uint4 w = buf[d];
        if (c + DEPTH < c_hi) buf[d] = load_stream(wp + (size_t)(c + DEPTH) * 32);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        // The chunk's B fragments, all loads in flight before the first product.
        uint2 bx[4][NT];
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int j = 0; j < NT; ++j)
            bx[s][j] = j < token_tiles ? xb[((size_t)j * steps + c * 4 + s) * 32]
                                       : make_uint2(0u, 0u);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const int step = c * 4 + s;
          const int gi = (step * 16) >> group_shift;
          if (gi != grp) {  // warp-uniform: every lane is at the same step
            grp = gi;
            const half2 m_lo = meta[(size_t)gi * N + row];
            const half2 m_hi = meta[(size_t)gi * N + row + 8];
            scale_lo = __low2half2(m_lo);
            zero_lo = __high2half2(m_lo);
            scale_hi = __low2half2(m_hi);
            zero_hi = __high2half2(m_hi);
          }
          uint32_t a[4];
          dequant(words[s], zero_lo, scale_lo, zero_hi, scale_hi, a);
#pragma unroll
          for (int j = 0; j < NT; ++j)
            if (j < token_tiles) mma_16816(acc[j], a, bx[s][j].x, bx[s][j].y);
        }
      }
    }
  }

  // acc[j]: (row, token 8j + 2t), (row, 8j + 2t + 1), (row + 8, 8j + 2t), (row + 8, 8j + 2t + 1)
  const float bias_lo = bias ? __half2float(bias[row]) : 0.f;
  const float bias_hi = bias ? __half2float(bias[row + 8]) : 0.f;
  if (split_k == 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = m0 + 8 * j + 2 * t + (i & 1);
        const int r = row + ((i & 2) ? 8 : 0);
        if (m < M) out[(size_t)m * ldo + r] = __float2half(acc[j][i] + ((i & 2) ? bias_hi : bias_lo));
      }
    return;
  }
  const size_t mn = (size_t)M * N;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + 8 * j + 2 * t + (i & 1);
      const int r = row + ((i & 2) ? 8 : 0);
      if (m < M) ws[split * mn + (size_t)m * N + r] = acc[j][i];
    }
  __threadfence();  // this lane's partials are visible before the counter moves
  __syncwarp();
  int* counter = counters + blockIdx.z * tiles + tile;
  int arrived = 0;
  if (lane == 0) arrived = atomicAdd(counter, 1);
  arrived = __shfl_sync(0xffffffffu, arrived, 0);
  if (arrived != split_k - 1) return;
  __threadfence();  // every other split's partials are visible to the loads below
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + 8 * j + 2 * t + (i & 1);
      const int r = row + ((i & 2) ? 8 : 0);
      if (m >= M) continue;
      float total = 0.f;
      for (int s = 0; s < split_k; ++s) total += __ldcg(ws + s * mn + (size_t)m * N + r);
      out[(size_t)m * ldo + r] = __float2half(total + ((i & 2) ? bias_hi : bias_lo));
    }
  if (lane == 0) *counter = 0;
}

// The dense weight, transposed: out [K, N] fp16 (rows in sorted order). One warp a (tile,
// chunk): its 64 x 16 values decoded into shared memory, then written a 32-byte row at a time.
__global__ void __launch_bounds__(kWarps * 32)
w4a16_dequant_kernel(const uint4* __restrict__ qw, const half2* __restrict__ meta,
                     int group_shift, int K, int N, half* __restrict__ out) {
  __shared__ half stage[kWarps][64][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunks = K / 64;
  const size_t tc = (size_t)blockIdx.x * kWarps + warp;  // tile * chunks + chunk
  if (tc >= (size_t)(N / 16) * chunks) return;
  const int tile = tc / chunks, c = tc % chunks;
  const int g = lane >> 2, t = lane & 3;
  const int row = tile * 16 + g;
  const uint4 w = qw[tc * 32 + lane];
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int k0 = c * 64 + s * 16;
    const half2 m_lo = meta[(size_t)(k0 >> group_shift) * N + row];
    const half2 m_hi = meta[(size_t)(k0 >> group_shift) * N + row + 8];
    uint32_t a[4];
    dequant(words[s], __high2half2(m_lo), __low2half2(m_lo), __high2half2(m_hi),
            __low2half2(m_hi), a);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const half2 v = as_h2(a[i]);
      const int r = g + ((i & 1) ? 8 : 0);
      const int k = s * 16 + 2 * t + ((i & 2) ? 8 : 0);
      stage[warp][k][r] = __low2half(v);
      stage[warp][k + 1][r] = __high2half(v);
    }
  }
  __syncwarp();
  // 64 rows of 16 halves = 2 KiB: each lane writes 16 bytes, 8 lanes a 32-byte row... twice.
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int k = p * 16 + (lane >> 1), half_row = lane & 1;
    const uint4 v = *reinterpret_cast<const uint4*>(&stage[warp][k][half_row * 8]);
    *reinterpret_cast<uint4*>(out + (size_t)(c * 64 + k) * N + tile * 16 + half_row * 8) = v;
  }
}

}  // namespace gptq_mma
