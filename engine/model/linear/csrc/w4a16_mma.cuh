// w4a16 matrix products on the tensor cores (mma.sync m16n8k16), for steps of 1 to 512 tokens.
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

__device__ __forceinline__ uint32_t as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 as_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// The odd registers' zero in the form dequant() takes: 960 - zero', negated for its FMA.
__device__ __forceinline__ half2 odd_zero(half2 zero) {
  return __hsub2(__float2half2_rn(960.f), zero);
}

// The four A-fragment registers of one word: rows g (regs 0, 2) and g + 8 (regs 1, 3). One
// shift a word: the even registers mask bits 0-3 (and 16-19) of the word or of word >> 8,
// giving 1024 + q; the odd ones mask bits 4-7 in place, giving 1024 + 16 q, which one FMA by
// 1/16 with nzero_hi = odd_zero(zero') brings to q - zero' + 1024, the subtraction exact
// either way (integers below 2048 in fp16), so both round once, by the scale.
__device__ __forceinline__ void dequant(uint32_t word, half2 zero_lo, half2 scale_lo,
                                        half2 nzero_hi, half2 scale_hi, uint32_t a[4]) {
  const half2 sixteenth = __float2half2_rn(0.0625f);
  const uint32_t high = word >> 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = i < 2 ? word : high;
    uint32_t v;  // (w & mask) | 0x64006400 in one lop3
    if (i & 1) {
      asm("lop3.b32 %0, %1, 0x00F000F0, 0x64006400, 0xEA;\n" : "=r"(v) : "r"(w));
      a[i] = as_u32(__hmul2(__hfma2(as_h2(v), sixteenth, nzero_hi), scale_hi));
    } else {
      asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xEA;\n" : "=r"(v) : "r"(w));
      a[i] = as_u32(__hmul2(__hsub2(as_h2(v), zero_lo), scale_lo));
    }
  }
}

// A lane's group metadata for its rows g (at ``at``) and g + 8 (8 entries on) of one tile, in
// the form dequant() takes: the scales, zero' for the even registers, odd_zero(zero') for the
// odd ones.
__device__ __forceinline__ void group_meta(const uint8_t* at, half2 scale[2], half2 zero[2]) {
  const half2* mp = reinterpret_cast<const half2*>(at);
  const half2 lo = mp[0], hi = mp[8];
  scale[0] = __low2half2(lo);
  zero[0] = __high2half2(lo);
  scale[1] = __low2half2(hi);
  zero[1] = odd_zero(__high2half2(hi));
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
// A block is kGemmWarps warps over ``kTiles = kGemmWarps / KW * TPW`` output tiles (128 or
// 256 rows) and up to 8 NT tokens. KW is the warps that share a tile along K: with KW = 2
// each warp multiplies one of a stage's two chunks and the pairs add their sums through
// shared memory at the end. A warp's tile (16 TPW rows x 8 NT tokens) sets how many MMAs each
// B fragment read from shared memory feeds; KW = 2 lets a warp own 4 tiles (64 rows) while a
// block still covers 256 rows. (At 64-128 tokens Nsight Compute puts the limit on mma.sync's
// throughput, not on those reads: the geometries differ by 1-2 us; the plan picks.)
//
// A block walks its share of K in stages of kStageChunks chunks (128 inputs): each stage
// copies, with cp.async and no registers, the block's weight fragments, the stage's token
// rows (plain [token][input], read back as B fragments by ldmatrix) and the groups'
// metadata, kStages - 1 stages ahead of the one being multiplied. Every warp of
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
template <int NT, int TPW, int KW, bool SMALL_GROUPS>
struct GemmShape {
  static_assert(kStageChunks % KW == 0, "a stage's chunks are shared out whole");
  static constexpr int kTileWarps = kGemmWarps / KW;  // warps along N
  static constexpr int kTiles = kTileWarps * TPW;
  static constexpr int kRows = kTiles * 16;
  static constexpr int kWeightBytes = kTiles * kStageChunks * 512;
  static constexpr int kXBytes = 8 * NT * kXRow * 2;
  static constexpr int kMetaGroups = SMALL_GROUPS ? kStageInputs / 16 : kStageChunks;
  static constexpr int kStageBytes = kWeightBytes + kXBytes + kMetaGroups * kRows * 4;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  // The K-sharing warps' sums, passed through the (drained) pipeline's shared memory.
  static constexpr int kAccRegs = TPW * NT * 4;
  static_assert((KW - 1) * kTileWarps * kAccRegs * 32 * 4 <= kSmemBytes, "no room to reduce");
  // Blocks a multiprocessor the registers must allow (ptxas caps registers to fit them):
  // one when a warp's accumulators take 64 registers or more (their shared memory allows one
  // or two blocks, and capped at 128 registers ptxas spills), four for
  // one-tile warps of 8-16 tokens (64 registers, as many blocks as their shared memory
  // allows), else two.
  static constexpr int kMinBlocks = NT * TPW >= 16 ? 1 : (TPW == 1 && NT <= 2) ? 4 : 2;
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

// A block's copies of the weights and group metadata of one stage, shared by both kernels
// (w4a16_wgmma.cuh too): the weights of kTiles output tiles (a stage's chunks of a tile are
// kStageChunks * 512 contiguous bytes) at the stage buffer's start, the metadata of the
// stage's group rows at kMetaAt. The global addresses are computed once (as a loop at every
// stage this address arithmetic was a third of a one-token step's instructions); stage s adds
// s * (bytes a stage) to each.
template <int kTiles, int kRows, int kMetaGroups, int kMetaAt>
struct WeightCopies {
  static constexpr int kW = kTiles * kStageChunks * 32 / kGemmThreads;
  static constexpr int kPieces = kMetaGroups * (kRows / 4);  // 16-byte pieces of metadata
  static constexpr int kM = (kPieces + kGemmThreads - 1) / kGemmThreads;
  const uint4* w_src[kW];
  bool w_on[kW];
  int m_off[kM];
  bool m_on[kM];

  __device__ __forceinline__ WeightCopies(int tid, const uint4* qw, int tile0, int tiles, int K,
                                          int u_lo, int group_shift, int N) {
    const int chunks = K / 64;
#pragma unroll
    for (int n = 0; n < kW; ++n) {
      const int i = tid + n * kGemmThreads;
      const int kk = (i >> 5) % kStageChunks, tl = (i >> 5) / kStageChunks;
      w_on[n] = tile0 + tl < tiles;
      w_src[n] = qw + ((size_t)(tile0 + tl) * chunks + (size_t)u_lo * kStageChunks + kk) * 32 +
                 (i & 31);
    }
    // Groups a stage: 1 when a group holds a stage or more, else kStageInputs / group.
    const int stage_groups = max(1, kStageInputs >> min(group_shift, 30));
#pragma unroll
    for (int n = 0; n < kM; ++n) {
      const int i = tid + n * kGemmThreads;
      const int gl = i / (kRows / 4), v = i % (kRows / 4);
      const int row = tile0 * 16 + v * 4;
      m_on[n] = i < kPieces && gl < stage_groups && row < N;
      m_off[n] = gl * N + row;
    }
  }

  // Stage s (of this block's share of K, from stage u_lo) into the stage buffer at shared
  // address ``base``. (The kernel's arguments are passed again rather than kept here, where
  // they would take registers the whole loop long.)
  __device__ __forceinline__ void issue(int tid, uint32_t base, int s, const half2* meta,
                                        int u_lo, int group_shift, int N) const {
#pragma unroll
    for (int n = 0; n < kW; ++n)
      if (w_on[n])
        cp_async(base + (tid + n * kGemmThreads) * 16, w_src[n] + (size_t)s * kStageChunks * 32);
    const half2* m_base = meta + (size_t)(((u_lo + s) * kStageInputs) >> group_shift) * N;
#pragma unroll
    for (int n = 0; n < kM; ++n) {
      const int i = tid + n * kGemmThreads;
      if (m_on[n])
        cp_async(base + kMetaAt + ((i / (kRows / 4)) * kRows + (i % (kRows / 4)) * 4) * 4,
                 m_base + m_off[n]);
    }
  }
};

// The end of a block: one warp's 16-row output tile over NT token tiles of 8. Unsplit, the sums
// (+ bias) go out as fp16. Split along K, each split writes fp32 partials to the workspace
// and bumps the tile's counter; the last to arrive adds the partials in split order
// (deterministic whichever block finishes; the sums reuse acc, whose own split is read back
// with the rest), kBatch splits' loads issued before their adds: a few L2 round trips, not
// one an element (dependent loads made split-K twice as slow at 64 tokens). kBatch keeps the
// loads to 16-32 registers. acc[j]: (row, token 8j + 2t), (row, 8j + 2t + 1), (row + 8,
// 8j + 2t), (row + 8, +1): the layout of mma.sync's and wgmma's accumulators alike.
// A partial is stored as the lanes hold it (``partial``): the warp that sums a tile sits where
// the warps that wrote it sat, so partials go out and come back as 16-byte runs, 512 bytes a
// warp, with no bounds checks; scattered into [M, N] they took 4 NT scalar stores and loads a
// lane, each behind its own token check, which made a split tile's end a third of a stream-K
// block's instructions at 64 tokens.
struct TileStore {
  int M, N, ldo;
  const half* bias;
  half* out;
  float* ws;
  int* counters;  // this block row's (blockIdx.x) counters, one a tile
  int split, split_k;

  // acc[j][e]'s token (from the block's first, m0) and output row (from the tile's, row).
  static __device__ __forceinline__ int token(int m0, int t, int j, int e) {
    return m0 + 8 * j + 2 * t + (e & 1);
  }
  static __device__ __forceinline__ int out_row(int row, int e) { return row + ((e & 2) ? 8 : 0); }

  template <int NT>
  __device__ __forceinline__ void write(const float (&acc)[NT][4], int row, int m0, int t) const {
    const float bias_lo = bias ? __half2float(bias[row]) : 0.f;
    const float bias_hi = bias ? __half2float(bias[row + 8]) : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = token(m0, t, j, e);
        if (m < M)
          out[(size_t)m * ldo + out_row(row, e)] =
              __float2half(acc[j][e] + ((e & 2) ? bias_hi : bias_lo));
      }
  }

  // Split s's partial of ``tile`` for this block of tokens (blockIdx.x of gridDim.x): NT
  // float4 a lane, element j of every lane together. The workspace holds splits x gridDim.x
  // x N / 16 of them: splits x M x N floats with M rounded up to the tokens a block.
  template <int NT>
  __device__ __forceinline__ float4* partial(int s, int tile, int lane) const {
    return reinterpret_cast<float4*>(ws) +
           (((size_t)s * gridDim.x + blockIdx.x) * (N / 16) + tile) * (NT * 32) + lane;
  }

  template <int NT>
  __device__ __forceinline__ void store(float (&acc)[NT][4], int tile, int m0, int lane) const {
    if (tile >= N / 16) return;
    const int g = lane >> 2, t = lane & 3;
    const int row = tile * 16 + g;
    if (split_k == 1) {
      write<NT>(acc, row, m0, t);
      return;
    }
    float4* const mine = partial<NT>(split, tile, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j)
      mine[j * 32] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    __threadfence();  // this lane's partials are visible before the counter moves
    __syncwarp();
    int arrived = 0;
    if (lane == 0) arrived = atomicAdd(counters + tile, 1);
    arrived = __shfl_sync(0xffffffffu, arrived, 0);
    if (arrived != split_k - 1) return;
    __threadfence();  // every other split's partials are visible to the loads below
    constexpr int kBatch = NT >= 4 ? 1 : 4 / NT;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    for (int sp0 = 0; sp0 < split_k; sp0 += kBatch) {
      float4 part[kBatch][NT];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const float4* const theirs = partial<NT>(sp0 + b < split_k ? sp0 + b : 0, tile, lane);
#pragma unroll
        for (int j = 0; j < NT; ++j)
          part[b][j] = sp0 + b < split_k ? __ldcg(theirs + j * 32) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (sp0 + b < split_k)
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            acc[j][0] += part[b][j].x;
            acc[j][1] += part[b][j].y;
            acc[j][2] += part[b][j].z;
            acc[j][3] += part[b][j].w;
          }
    }
    write<NT>(acc, row, m0, t);
    if (lane == 0) counters[tile] = 0;
  }
};

// x: [M, K] fp16, rows 16-byte aligned, columns in sorted order (act-order layers gathered by
// the caller); out: [M, N] fp16, row stride ldo. Grid: (ceil(M / (8 NT)), split_k,
// ceil(N / 16 / kTiles)): the blocks of one weight slice over all the token blocks are
// neighbours in launch order, so above 64 tokens the slice is read from DRAM about once and
// from L2 by the others. Dynamic shared memory GemmShape::kSmemBytes. K: a multiple of
// kStageInputs. group_shift: log2 of the inputs a group (>= 4), or 31 for one group over all
// of K. split_k <= K / kStageInputs.
template <int NT, int TPW, int KW, bool SMALL_GROUPS>
__global__ void
__launch_bounds__(kGemmThreads, (GemmShape<NT, TPW, KW, SMALL_GROUPS>::kMinBlocks))
w4a16_gemm_kernel(const half* __restrict__ x, int M, int K, int ldx,
                  const uint4* __restrict__ qw, const half2* __restrict__ meta, int group_shift,
                  const half* __restrict__ bias, half* __restrict__ out, int N, int ldo,
                  float* __restrict__ ws, int* __restrict__ counters, int split_k) {
  using S = GemmShape<NT, TPW, KW, SMALL_GROUPS>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31;
  // warp: which tiles (rows 16 TPW warp ..) of the block; kw: which chunks of each stage.
  const int warp = (tid >> 5) % S::kTileWarps, kw = (tid >> 5) / S::kTileWarps;
  const int g = lane >> 2;
  const int tiles = N / 16;
  const int tile0 = blockIdx.z * S::kTiles;
  const int units = K / kStageInputs;
  const int split = blockIdx.y;
  const int u_lo = split * units / split_k, u_hi = (split + 1) * units / split_k;
  const int n_stages = u_hi - u_lo;
  const int m0 = blockIdx.x * 8 * NT;
  const uint32_t smem0 = smem_addr(smem);

  // This thread's copies of a stage: weights and metadata (WeightCopies), then token rows.
  const WeightCopies<S::kTiles, S::kRows, S::kMetaGroups, S::kWeightBytes + S::kXBytes> wcopy(
      tid, qw, tile0, tiles, K, u_lo, group_shift, N);
  constexpr int kXCopies = (8 * NT * kStageChunks * 8 + kGemmThreads - 1) / kGemmThreads;
  const half* x_src[kXCopies];
  bool x_on[kXCopies];
#pragma unroll
  for (int n = 0; n < kXCopies; ++n) {
    const int i = tid + n * kGemmThreads;
    const int v = i % (kStageChunks * 8), r = i / (kStageChunks * 8);
    x_on[n] = r < 8 * NT && m0 + r < M;
    x_src[n] = x + (size_t)(m0 + r) * ldx + (size_t)u_lo * kStageInputs + v * 8;
  }

  auto load_stage = [&](int s) {
    const uint32_t base = smem0 + (s % kStages) * S::kStageBytes;
    wcopy.issue(tid, base, s, meta, u_lo, group_shift, N);
#pragma unroll
    for (int n = 0; n < kXCopies; ++n) {
      const int i = tid + n * kGemmThreads;
      if (x_on[n])
        cp_async(base + S::kWeightBytes + (i / (kStageChunks * 8)) * kXRow * 2 +
                     (i % (kStageChunks * 8)) * 16,
                 x_src[n] + (size_t)s * kStageInputs);
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
    for (int kc = 0; kc < kStageChunks / KW; ++kc) {
      const int kk = kw * (kStageChunks / KW) + kc;
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
          for (int i = 0; i < TPW; ++i)
            group_meta(base + meta_off + (gl * S::kRows + i * 16) * 4, scale[i], zero[i]);
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
  if constexpr (KW > 1) {
    static_assert(KW == 2, "one exchange of sums");
    __syncthreads();  // every warp is done with the pipeline's shared memory
    float* red = reinterpret_cast<float*>(smem) + warp * S::kAccRegs * 32 + lane;
    if (kw == 1) {
#pragma unroll
      for (int i = 0; i < TPW; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) red[((i * NT + j) * 4 + e) * 32] = acc[i][j][e];
    }
    __syncthreads();
    if (kw == 1) return;
#pragma unroll
    for (int i = 0; i < TPW; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] += red[((i * NT + j) * 4 + e) * 32];
  }

  const TileStore store{M, N, ldo, bias, out, ws, counters + blockIdx.x * tiles, split,
                        split_k};
#pragma unroll
  for (int i = 0; i < TPW; ++i) store.store<NT>(acc[i], tile0 + warp * TPW + i, m0, lane);
}

}  // namespace gptq_mma
