// w4a16 matrix products on the tensor cores (mma.sync m16n8k16), for steps of 1 to 128 tokens.
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
// 32 lanes x 4 words are 512 contiguous bytes: a tile's chunks are one contiguous run.
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

constexpr int kWarps = 4;  // warps a block of the dequantisation kernel

__device__ __forceinline__ uint32_t as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 as_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// The four A-fragment registers of one word: rows g (regs 0, 2) and g + 8 (regs 1, 3).
__device__ __forceinline__ void dequant(uint32_t word, half2 zero_lo, half2 scale_lo,
                                        half2 zero_hi, half2 scale_hi, uint32_t a[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t v;  // (w & 0x000F000F) | 0x64006400 in one lop3 (the compiler emits two)
    asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xEA;\n" : "=r"(v) : "r"(word >> (4 * i)));
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

// ---- The product: a cp.async pipeline through shared memory -------------------------------
//
// A block is kGemmWarps warps over ``kTiles = kGemmWarps * TPW`` output tiles (128 or 256
// rows) and up to 8 NT tokens. It walks its share of K in stages of kStageChunks chunks (128
// inputs): each stage copies, with cp.async and no registers, the block's weight fragments,
// the stage's token rows (plain [token][input], read back as B fragments by ldmatrix) and
// the groups' metadata, kStages - 1 stages ahead of the one being multiplied. Every warp of
// the block shares one copy of the activations, and each A fragment, dequantised once,
// feeds NT products.
//
// At few tokens a step the kernel is bound by instructions issued per weight byte, not by
// memory, so the inner loop has no per-step guards: tiles past N and token rows past M are
// multiplied like the others (a D column depends only on its own B column, and those
// columns are never stored), K must be whole stages, and the copy addresses are computed
// once.

#ifndef GPTQ_MMA_STAGE_CHUNKS
#define GPTQ_MMA_STAGE_CHUNKS 2
#endif
#ifndef GPTQ_MMA_STAGES
#define GPTQ_MMA_STAGES 4
#endif
constexpr int kGemmWarps = 8;
constexpr int kGemmThreads = kGemmWarps * 32;
constexpr int kStageChunks = GPTQ_MMA_STAGE_CHUNKS;  // chunks of 64 inputs a stage
constexpr int kStageInputs = kStageChunks * 64;
constexpr int kStages = GPTQ_MMA_STAGES;
// Token rows of a stage in shared memory are padded by 8 halves (16 bytes), so the eight rows
// one ldmatrix phase reads fall in distinct banks.
constexpr int kXRow = kStageInputs + 8;

// SMALL_GROUPS: groups of 16 or 32 inputs (several a 64-input chunk); otherwise a group holds
// whole chunks (64 inputs up to all of K) and its metadata is read once a chunk.
template <int NT, int TPW, bool SMALL_GROUPS>
struct GemmShape {
  static constexpr int kTiles = kGemmWarps * TPW;
  static constexpr int kRows = kTiles * 16;
  static constexpr int kWeightBytes = kTiles * kStageChunks * 512;
  static constexpr int kXBytes = 8 * NT * kXRow * 2;
  static constexpr int kMetaGroups = SMALL_GROUPS ? kStageInputs / 16 : kStageChunks;
  static constexpr int kStageBytes = kWeightBytes + kXBytes + kMetaGroups * kRows * 4;
  static constexpr int kSmemBytes = kStages * kStageBytes;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Plain .cg copies (L2 only): with an L2::evict_first cache hint on the weights' copies this
// kernel faulted with an illegal instruction on an H100 (CUDA 13 ptxas).
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                        uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr));
}

// x: [M, K] fp16, rows 16-byte aligned, columns in sorted order (act-order layers gathered by
// the caller); out: [M, N] fp16, row stride ldo. Grid: (ceil(N / 16 / kTiles), split_k,
// ceil(M / (8 NT))); dynamic shared memory GemmShape::kSmemBytes. K: a multiple of
// kStageInputs. group_shift: log2 of the inputs a group (>= 4), or 31 for one group over all
// of K. split_k <= K / kStageInputs.
template <int NT, int TPW, bool SMALL_GROUPS>
__global__ void __launch_bounds__(kGemmThreads)
w4a16_gemm_kernel(const half* __restrict__ x, int M, int K, int ldx,
                  const uint4* __restrict__ qw, const half2* __restrict__ meta, int group_shift,
                  const half* __restrict__ bias, half* __restrict__ out, int N, int ldo,
                  float* __restrict__ ws, int* __restrict__ counters, int split_k) {
  using S = GemmShape<NT, TPW, SMALL_GROUPS>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = N / 16;
  const int tile0 = blockIdx.x * S::kTiles;
  const int chunks = K / 64;
  const int units = K / kStageInputs;
  const int split = blockIdx.y;
  const int u_lo = split * units / split_k, u_hi = (split + 1) * units / split_k;
  const int n_stages = u_hi - u_lo;
  const int m0 = blockIdx.z * 8 * NT;
  const uint32_t smem0 = smem_addr(smem);

  // This thread's copies of a stage, as (global address at stage 0, shared offset): weights
  // (per tile, a stage's chunks are kStageChunks * 512 contiguous bytes), token rows, then
  // metadata rows. Stage u adds u * (bytes a stage) to each global address.
  constexpr int kWCopies = S::kTiles * kStageChunks * 32 / kGemmThreads;  // 2 TPW
  constexpr int kXCopies = (8 * NT * kStageChunks * 8 + kGemmThreads - 1) / kGemmThreads;
  const uint4* w_src[kWCopies];
  bool w_on[kWCopies];
#pragma unroll
  for (int n = 0; n < kWCopies; ++n) {
    const int i = tid + n * kGemmThreads;
    const int kk = (i >> 5) % kStageChunks, tl = (i >> 5) / kStageChunks;
    w_on[n] = tile0 + tl < tiles;
    w_src[n] = qw + ((size_t)(tile0 + tl) * chunks + (size_t)u_lo * kStageChunks + kk) * 32 +
               (i & 31);
  }
  const half* x_src[kXCopies];
  bool x_on[kXCopies];
#pragma unroll
  for (int n = 0; n < kXCopies; ++n) {
    const int i = tid + n * kGemmThreads;
    const int v = i % (kStageChunks * 8), r = i / (kStageChunks * 8);
    x_on[n] = r < 8 * NT && m0 + r < M;
    x_src[n] = x + (size_t)(m0 + r) * ldx + (size_t)u_lo * kStageInputs + v * 8;
  }
  // Groups a stage: 1 when a group holds a stage or more, else kStageInputs / group.
  const int stage_groups = max(1, kStageInputs >> min(group_shift, 30));

  auto load_stage = [&](int s) {
    const uint32_t base = smem0 + (s % kStages) * S::kStageBytes;
#pragma unroll
    for (int n = 0; n < kWCopies; ++n)
      if (w_on[n])
        cp_async(base + (tid + n * kGemmThreads) * 16, w_src[n] + (size_t)s * kStageChunks * 32);
#pragma unroll
    for (int n = 0; n < kXCopies; ++n) {
      const int i = tid + n * kGemmThreads;
      if (x_on[n])
        cp_async(base + S::kWeightBytes + (i / (kStageChunks * 8)) * kXRow * 2 +
                     (i % (kStageChunks * 8)) * 16,
                 x_src[n] + (size_t)s * kStageInputs);
    }
    const int g_first = ((u_lo + s) * kStageInputs) >> group_shift;
    for (int i = tid; i < stage_groups * (S::kRows / 4); i += kGemmThreads) {
      const int gl = i / (S::kRows / 4), v = i % (S::kRows / 4);
      const int row = tile0 * 16 + v * 4;
      if (row < N)
        cp_async(base + S::kWeightBytes + S::kXBytes + (gl * S::kRows + v * 4) * 4,
                 meta + (size_t)(g_first + gl) * N + row);
    }
  };

  float acc[TPW][NT][4];
#pragma unroll
  for (int i = 0; i < TPW; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ldmatrix: lanes 8q .. 8q + 7 give the rows of matrix q, which is token tile j + q / 2
  // (x4 only), inputs +8 when q is odd: the B fragments (b0, b1) of tiles j and j + 1.
  const int ld_row = (NT > 1 ? (lane >> 4) * 8 : 0) + (lane & 7);
  const uint32_t ld_off = S::kWeightBytes + ld_row * kXRow * 2 + ((lane >> 3) & 1) * 16;
  // This lane's metadata (rows g and g + 8 of each of its tiles) within a stage's group row.
  const uint32_t meta_off = S::kWeightBytes + S::kXBytes + (warp * TPW * 16 + g) * 4;
  const uint32_t w_off = (warp * TPW * kStageChunks * 32 + lane) * 16;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_stages) load_stage(s);
    cp_async_commit();  // empty groups keep the wait counts uniform
  }
  for (int s = 0; s < n_stages; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage s has landed for every thread; stage s - 1 is free to refill
    if (s + kStages - 1 < n_stages) load_stage(s + kStages - 1);
    cp_async_commit();
    const uint8_t* base = smem + (s % kStages) * S::kStageBytes;
    const uint32_t sbase = smem0 + (s % kStages) * S::kStageBytes;
    const int k_first = (u_lo + s) * kStageInputs;
    const int g_first = k_first >> group_shift;
#pragma unroll
    for (int kk = 0; kk < kStageChunks; ++kk) {
      uint4 wv[TPW];
#pragma unroll
      for (int i = 0; i < TPW; ++i)
        wv[i] = *reinterpret_cast<const uint4*>(base + w_off + (i * kStageChunks + kk) * 512);
      half2 scale[TPW][2], zero[TPW][2];
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4) {
        if (s4 == 0 || SMALL_GROUPS) {
          const int gl = ((k_first + kk * 64 + s4 * 16) >> group_shift) - g_first;
#pragma unroll
          for (int i = 0; i < TPW; ++i) {
            const half2* mp =
                reinterpret_cast<const half2*>(base + meta_off + (gl * S::kRows + i * 16) * 4);
            const half2 lo = mp[0], hi = mp[8];
            scale[i][0] = __low2half2(lo);
            zero[i][0] = __high2half2(lo);
            scale[i][1] = __low2half2(hi);
            zero[i][1] = __high2half2(hi);
          }
        }
        uint32_t b[NT][2];
        const uint32_t col = (kk * 64 + s4 * 16) * 2;
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          const uint32_t addr = sbase + ld_off + j * 8 * kXRow * 2 + col;
          if constexpr (NT == 1) {
            ldsm_x2(b[0][0], b[0][1], addr);
          } else {
            ldsm_x4(b[j][0], b[j][1], b[j + 1][0], b[j + 1][1], addr);
          }
        }
#pragma unroll
        for (int i = 0; i < TPW; ++i) {
          const uint32_t word = s4 == 0 ? wv[i].x : s4 == 1 ? wv[i].y : s4 == 2 ? wv[i].z : wv[i].w;
          uint32_t a[4];
          dequant(word, zero[i][0], scale[i][0], zero[i][1], scale[i][1], a);
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_16816(acc[i][j], a, b[j][0], b[j][1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // acc[i][j]: (row, token 8j + 2t), (row, 8j + 2t + 1), (row + 8, 8j + 2t), (row + 8, +1)
  const size_t mn = (size_t)M * N;
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int tile = tile0 + warp * TPW + i;
    if (tile >= tiles) continue;
    const int row = tile * 16 + g;
    const float bias_lo = bias ? __half2float(bias[row]) : 0.f;
    const float bias_hi = bias ? __half2float(bias[row + 8]) : 0.f;
    if (split_k == 1) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = m0 + 8 * j + 2 * t + (e & 1);
          const int r = row + ((e & 2) ? 8 : 0);
          if (m < M) out[(size_t)m * ldo + r] = __float2half(acc[i][j][e] + ((e & 2) ? bias_hi : bias_lo));
        }
      continue;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + 8 * j + 2 * t + (e & 1);
        const int r = row + ((e & 2) ? 8 : 0);
        if (m < M) ws[split * mn + (size_t)m * N + r] = acc[i][j][e];
      }
    __threadfence();  // this lane's partials are visible before the counter moves
    __syncwarp();
    int* counter = counters + blockIdx.z * tiles + tile;
    int arrived = 0;
    if (lane == 0) arrived = atomicAdd(counter, 1);
    arrived = __shfl_sync(0xffffffffu, arrived, 0);
    if (arrived != split_k - 1) continue;
    __threadfence();  // every other split's partials are visible to the loads below
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + 8 * j + 2 * t + (e & 1);
        const int r = row + ((e & 2) ? 8 : 0);
        if (m >= M) continue;
        float total = 0.f;
        for (int sp = 0; sp < split_k; ++sp) total += __ldcg(ws + sp * mn + (size_t)m * N + r);
        out[(size_t)m * ldo + r] = __float2half(total + ((e & 2) ? bias_hi : bias_lo));
      }
    if (lane == 0) *counter = 0;
  }
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
