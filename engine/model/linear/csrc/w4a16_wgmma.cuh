// w4a16 matrix products on Hopper's warpgroup MMA (wgmma.mma_async, sm_90a), for steps of 16
// to 512 tokens: the weight layout, metadata, pipeline and epilogue of w4a16_mma.cuh, with the
// MMA issued a warpgroup (4 warps) at a time.
//
// Why: at 64-128 tokens the mma.sync kernel is bound by that instruction's throughput (Nsight
// Compute: tensor pipe active half the cycles, warps waiting on it); one wgmma m64n64k16 does
// the work of 32 mma.sync m16n8k16 and runs asynchronously, so the warps dequantise the next
// fragments while the tensor cores multiply. On an H200 it is the faster form for gate/up at
// 64-128 tokens and q/k/v at 256 (docs/benchmarks.md); the plan times both at load. At 64
// tokens Nsight Compute finds it latency-bound with one 8-warp block a multiprocessor
// (tensor pipe active 28%): a TMA producer warp and a persistent grid are its next steps.
//
// The weights are wgmma's A operand straight from registers: a warp's A fragment of a
// 64 x 16 wgmma is the same 16 x 16 fragment as mma.sync's (rows 16q .. 16q + 15 for warp q
// of the warpgroup), so each word dequantises exactly as in the other kernel. The tokens are
// B, read by the tensor cores from shared memory through a descriptor, in the no-swizzle
// "core matrix" layout: 8 token rows x 16 bytes of inputs a core matrix (128 contiguous bytes),
// token rows fastest, so an 8-row group is 128 bytes on (the descriptor's stride offset) and
// the next 8 inputs kTokens * 16 bytes on (its leading offset). The accumulators come out in
// mma.sync's layout, n8 block by n8 block, so the epilogue (TileStore) is the other kernel's.
//
// A block is 2 warpgroups over 8 TPW output tiles (128 or 256 rows) and 64 NB tokens: warp q
// of warpgroup w owns tiles (w TPW + i) * 4 + q, i < TPW, one 64-row wgmma each, per 64 tokens.
// Compiled for sm_90a only (the guard below); elsewhere the kernel is empty and the probe
// (wgmma_probe, the binding's wgmma_available) says so, so the caller never launches it.
#pragma once

#include "w4a16_mma.cuh"
#include "w4a16_stream_k.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPTQ_WGMMA_ENABLED 1
#endif

namespace gptq_mma {

// This block's share of K: split blockIdx.y of split_k takes stages [u_lo, u_lo + n_stages)
// of kStageInputs inputs. (w4a16_gemm_kernel computes the same inline: in this form ptxas
// spilled one of its registers at 64 tokens.)
struct KShare {
  int split, u_lo, n_stages;
  __device__ __forceinline__ KShare(int K, int split_k) : split(blockIdx.y) {
    const int units = K / kStageInputs;
    u_lo = split * units / split_k;
    n_stages = (split + 1) * units / split_k - u_lo;
  }
};

template <int TPW, int NB, bool SMALL_GROUPS>
struct WgShape {
  static constexpr int kTiles = 8 * TPW;  // 2 warpgroups x 4 warps x TPW
  static constexpr int kRows = kTiles * 16;
  static constexpr int kTokens = 64 * NB;
  static constexpr int kWeightBytes = kTiles * kStageChunks * 512;
  static constexpr int kXBytes = kTokens * kStageInputs * 2;  // core matrices, unpadded
  static constexpr int kMetaGroups = SMALL_GROUPS ? kStageInputs / 16 : kStageChunks;
  static constexpr int kStageBytes = kWeightBytes + kXBytes + kMetaGroups * kRows * 4;
  // One block a multiprocessor when a warp's accumulators take 64 registers or more.
  static constexpr int kMinBlocks = TPW * NB >= 2 ? 1 : 2;
  // As many stages as the blocks' shared memory allows (227 KiB a multiprocessor, 1 KiB of
  // it reserved a block), up to 6: copies run kStages - 2 ahead, so deeper pipelines keep
  // more weight bytes in flight at 16-64 tokens, where a stage's MMAs are short.
  static constexpr int kStages = (227 * 1024 / kMinBlocks - 1024) / kStageBytes < 6
                                     ? (227 * 1024 / kMinBlocks - 1024) / kStageBytes
                                     : 6;
  static_assert(kStages >= 3, "the pipeline does not fit in shared memory");
  static constexpr int kSmemBytes = kStages * kStageBytes;
  // Leading (next 8 inputs) and stride (next 8 token rows) byte offsets of the B descriptor.
  static constexpr uint32_t kLeading = kTokens * 16, kStride = 128;
};

// Steps of 16 inputs whose MMAs may be outstanding while the next is dequantised.
constexpr int kInFlight = 3;

// The shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride byte offsets, each >> 4; base offset 0, no swizzle (bits 62-63 = 0).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr, uint32_t leading,
                                                    uint32_t stride) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)((leading & 0x3FFFF) >> 4) << 16 |
         (uint64_t)((stride & 0x3FFFF) >> 4) << 32;
}

#ifdef GPTQ_WGMMA_ENABLED
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Threads' writes to shared memory (cp.async included) made visible to the tensor cores'
// reads through the async proxy.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator across the asynchronous
// MMAs' issue and wait (they are asm statements it cannot see into).
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// d (64 x 64 fp32: this thread's 32 values, 8 n8 blocks in mma.sync's layout) +=
// A (64 x 16 fp16, registers) x B (16 x 64 fp16, shared memory, K-major, ``desc``).
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[8][4], const uint32_t (&a)[4],
                                                 uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

// d (64 x 128 fp32: this thread's 64 values, 16 n8 blocks in mma.sync's layout) +=
// A (64 x 16 fp16, registers) x B (16 x 128 fp16, shared memory, K-major, ``desc``).
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[16][4], const uint32_t (&a)[4],
                                                 uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

// One 64-row tile's MMA over the block's 64 NB tokens.
template <int NB>
__device__ __forceinline__ void wgmma_tile(float (&d)[8 * NB][4], const uint32_t (&a)[4],
                                           uint64_t desc) {
  if constexpr (NB == 1) wgmma_m64n64k16(d, a, desc);
  else wgmma_m64n128k16(d, a, desc);
}
#endif

// Arguments as w4a16_gemm_kernel's, and stream_k: 0, or G persistent blocks a token block
// (w4a16_stream_k.h; split_k is then 1). Grid: (ceil(M / 64 NB), split_k, ceil(N / 16 / 8 TPW)), or
// (ceil(M / 64 NB), G, 1) with stream_k; 256 threads, dynamic shared memory
// WgShape::kSmemBytes.
template <int TPW, int NB, bool SMALL_GROUPS>
__global__ void __launch_bounds__(kGemmThreads, (WgShape<TPW, NB, SMALL_GROUPS>::kMinBlocks))
w4a16_wgmma_kernel(const half* __restrict__ x, int M, int K, int ldx,
                   const uint4* __restrict__ qw, const half2* __restrict__ meta,
                   int group_shift, const half* __restrict__ bias, half* __restrict__ out,
                   int N, int ldo, float* __restrict__ ws, int* __restrict__ counters,
                   int split_k, int stream_k) {
#ifdef GPTQ_WGMMA_ENABLED
  using S = WgShape<TPW, NB, SMALL_GROUPS>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, q = (tid >> 5) & 3;
  const int g = lane >> 2;
  const int tiles = N / 16;
  const int m0 = blockIdx.x * S::kTokens;
  const uint32_t smem0 = smem_addr(smem);
  const StreamK sk{K / kStageInputs, (tiles + S::kTiles - 1) / S::kTiles * (K / kStageInputs),
                   stream_k};
  int u = 0, u_end = 0;  // stream-K: the rest of this block's share
  Segment seg;
  if (stream_k) {
    u = sk.first(blockIdx.y);
    u_end = sk.first(blockIdx.y + 1);
    seg = sk.at(u, u_end, blockIdx.y);
  } else {
    const KShare share(K, split_k);
    seg = Segment{static_cast<int>(blockIdx.z), share.u_lo, share.n_stages, share.split, split_k};
  }

  // This warp's tiles within the block, its weights' and metadata's offsets in a stage.
  int w_off[TPW];
  uint32_t meta_off[TPW];
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int tl = (wg * TPW + i) * 4 + q;
    w_off[i] = (tl * kStageChunks * 32 + lane) * 16;
    meta_off[i] = S::kWeightBytes + S::kXBytes + (tl * 16 + g) * 4;
  }
  const uint64_t desc0 = smem_descriptor(smem0 + S::kWeightBytes, S::kLeading, S::kStride);

  for (;;) {
    const int tile0 = seg.tile_block * S::kTiles;
    const int u_lo = seg.u_lo, n_stages = seg.n_stages;
    const WeightCopies<S::kTiles, S::kRows, S::kMetaGroups, S::kWeightBytes + S::kXBytes>
        wcopy(tid, qw, tile0, tiles, K, u_lo, group_shift, N);
    // Token rows: 16-byte piece v of row r goes to (v * kTokens + r) * 16. Neighbouring
    // threads take the two pieces of a 32-byte sector, then the next row.
    constexpr int kXCopies = S::kTokens * kStageChunks * 8 / kGemmThreads;
    const half* x_src[kXCopies];
    uint32_t x_dst[kXCopies];
    bool x_on[kXCopies];
#pragma unroll
    for (int n = 0; n < kXCopies; ++n) {
      const int i = tid + n * kGemmThreads;
      const int r = (i >> 1) % S::kTokens;
      const int v = ((i >> 1) / S::kTokens) * 2 + (i & 1);
      x_on[n] = m0 + r < M;
      x_src[n] = x + (size_t)(m0 + r) * ldx + (size_t)u_lo * kStageInputs + v * 8;
      x_dst[n] = S::kWeightBytes + (v * S::kTokens + r) * 16;
    }
    auto load_stage = [&](int s) {
      const uint32_t base = smem0 + (s % S::kStages) * S::kStageBytes;
      wcopy.issue(tid, base, s, meta, u_lo, group_shift, N);
#pragma unroll
      for (int n = 0; n < kXCopies; ++n)
        if (x_on[n]) cp_async(base + x_dst[n], x_src[n] + (size_t)s * kStageInputs);
    };

    float acc[TPW][8 * NB][4];
#pragma unroll
    for (int i = 0; i < TPW; ++i)
#pragma unroll
      for (int j = 0; j < 8 * NB; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[i][j][e] = 0.f;
          fence_operand(acc[i][j][e]);
        }

    // Copies run kAhead = S::kStages - 2 stages ahead (not all but one, as in the other
    // kernel): the buffer refilled at stage s is stage s - 2's, whose MMAs every warpgroup has
    // retired (at most kInFlight steps of stage s - 1 are outstanding when the block syncs),
    // so the MMAs never drain at a stage's end.
    constexpr int kAhead = S::kStages - 2;
    static_assert(kAhead >= 1 && kStageChunks * 4 >= kInFlight,
                  "the MMAs must not outrun a stage");
    // kInFlight + 1 sets of A registers: step k + 1 dequantises into the set of step
    // k - kInFlight, retired, while steps k - kInFlight + 1 .. k run (sets follow the step
    // across stages: a stage's steps are a multiple of the sets).
    static_assert(kStageChunks * 4 % (kInFlight + 1) == 0, "A sets must line up across stages");
    uint32_t a[kInFlight + 1][TPW][4];
#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
      if (s < n_stages) load_stage(s);
      cp_async_commit();
    }
    for (int s = 0; s < n_stages; ++s) {
      cp_async_wait<kAhead - 1>();
      fence_async_shared();  // this thread's copies of stage s, visible to the tensor cores
      __syncthreads();  // ... every thread's; stage s - 2 is retired and free to refill
      if (s + kAhead < n_stages) load_stage(s + kAhead);
      cp_async_commit();
      const uint8_t* base = smem + (s % S::kStages) * S::kStageBytes;
      const uint64_t desc_stage = desc0 + (((s % S::kStages) * S::kStageBytes) >> 4);
      const int k_first = (u_lo + s) * kStageInputs;
      const int g_first = k_first >> group_shift;
#pragma unroll
      for (int kk = 0; kk < kStageChunks; ++kk) {
        uint4 wv[TPW];
#pragma unroll
        for (int i = 0; i < TPW; ++i)
          wv[i] = *reinterpret_cast<const uint4*>(base + w_off[i] + kk * 512);
        half2 scale[TPW][2], zero[TPW][2];
#pragma unroll
        for (int s4 = 0; s4 < 4; ++s4) {
          const int step = kk * 4 + s4, set = step % (kInFlight + 1);
          if (s4 == 0 || SMALL_GROUPS) {
            const int gl = ((k_first + kk * 64 + s4 * 16) >> group_shift) - g_first;
#pragma unroll
            for (int i = 0; i < TPW; ++i)
              group_meta(base + meta_off[i] + gl * S::kRows * 4, scale[i], zero[i]);
          }
#pragma unroll
          for (int i = 0; i < TPW; ++i) {
            const uint32_t word =
                s4 == 0 ? wv[i].x : s4 == 1 ? wv[i].y : s4 == 2 ? wv[i].z : wv[i].w;
            dequant(word, zero[i][0], scale[i][0], zero[i][1], scale[i][1], a[set][i]);
          }
          wgmma_fence();  // the A registers were just written
          // Inputs 16 step .. +15 are core matrices 2 step and 2 step + 1 along K.
          const uint64_t desc_step = desc_stage + ((2 * step * S::kLeading) >> 4);
#pragma unroll
          for (int i = 0; i < TPW; ++i) wgmma_tile<NB>(acc[i], a[set][i], desc_step);
          wgmma_commit();
          wgmma_wait<kInFlight>();  // step - kInFlight is retired: its A set may be rewritten
        }
      }
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < TPW; ++i)
#pragma unroll
      for (int j = 0; j < 8 * NB; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) fence_operand(acc[i][j][e]);

    const TileStore store{M, N, ldo, bias, out, ws, counters + blockIdx.x * tiles, seg.split,
                          seg.splits};
#pragma unroll
    for (int i = 0; i < TPW; ++i)
      store.store<8 * NB>(acc[i], tile0 + (wg * TPW + i) * 4 + q, m0, lane);

    u += n_stages;
    if (u >= u_end) break;  // always, without stream-K (u_end = 0)
    seg = sk.at(u, u_end, blockIdx.y);
    __syncthreads();  // every warp is done with the stage buffers the next run refills
  }
#endif
}

}  // namespace gptq_mma
