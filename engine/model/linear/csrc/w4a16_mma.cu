// Torch bindings of the w4a16 tensor-core kernels (w4a16_mma.cuh), built just in time by
// engine/model/linear/mma.py (torch.utils.cpp_extension) and cached on disk.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "w4a16_dequant.cuh"
#include "w4a16_mma_launch.h"
#include "w4a16_stream_k.h"

namespace {

void check(const torch::Tensor& t, torch::ScalarType type, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be on the GPU");
  TORCH_CHECK(t.scalar_type() == type, name, " has the wrong dtype");
}

int group_shift(int64_t group, int64_t K) {
  if (group == K) return 31;
  int shift = 0;
  while ((int64_t(1) << shift) < group) ++shift;
  TORCH_CHECK((int64_t(1) << shift) == group && shift >= 4,
              "group must be a power of two >= 16, or all of K");
  return shift;
}

// Tokens a block for a step of M (the kernel's NT * 8): 8, 16, 32, then 64.
int64_t tokens_a_block(int64_t M) { return M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64; }
// The wgmma kernel's (launch_wgmma_tokens): 64, then 128.
int64_t wgmma_tokens_a_block(int64_t M) { return M <= 64 ? 64 : 128; }

// The checked arguments of one product: out = x[:, perm] @ W (+ bias), x [M, K] fp16 (columns
// in checkpoint order; perm int64 [K], the input row of each sorted position, or None), qw
// int32 [N/16, K/64, 32, 4], meta fp16 [groups, N, 2]. With splits > 1 (the partial sums a
// launch may write: its split_k, or a stream-K launch's StreamK::max_splits), over blocks of
// ``block_tokens`` tokens (the kernel's): ws fp32 with >= splits * M' * N elements, M' = M
// rounded up to block_tokens (TileStore keeps whole blocks' partials), and counters int32
// zeros, >= M' / block_tokens * N / 16. Returns the launch arguments (split_k = splits, no
// stream-K) and out (x, gathered or realigned, kept alive in ``x``).
gptq_mma::GemmArgs prepare(torch::Tensor& x, const c10::optional<torch::Tensor>& perm,
                           const torch::Tensor& qw, const torch::Tensor& meta, int64_t group,
                           const c10::optional<torch::Tensor>& bias, const torch::Tensor& ws,
                           const torch::Tensor& counters, int64_t splits, int64_t block_tokens,
                           torch::Tensor& out) {
  check(x, torch::kHalf, "x");
  check(qw, torch::kInt32, "qweight");
  check(meta, torch::kHalf, "meta");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [M, K] with unit column stride");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0) * 16;
  TORCH_CHECK(K % 64 == 0 && qw.size(1) == K / 64, "qweight does not match x's ", K, " inputs");
  const int shift = group_shift(group, K);
  TORCH_CHECK(meta.size(0) == K / group && meta.size(1) == N, "meta does not match the layer");
  TORCH_CHECK(K % gptq_mma::kStageInputs == 0, "in_features must be a multiple of ",
              gptq_mma::kStageInputs);
  TORCH_CHECK(splits >= 1 && splits <= K / gptq_mma::kStageInputs, "split_k out of range");
  if (bias) check(*bias, torch::kHalf, "bias");
  if (splits > 1) {
    check(ws, torch::kFloat, "workspace");
    check(counters, torch::kInt32, "counters");
    const int64_t blocks = (M + block_tokens - 1) / block_tokens;
    TORCH_CHECK(ws.numel() >= splits * blocks * block_tokens * N, "workspace too small");
    TORCH_CHECK(counters.numel() >= blocks * (N / 16), "too few counters");
  }
  if (perm) {
    check(*perm, torch::kLong, "perm");
    TORCH_CHECK(perm->numel() == K, "perm must have K entries");
    x = x.index_select(1, *perm);  // act-order: the columns in the weights' sorted order
  } else if (x.stride(0) % 8 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) {
    x = x.clone(at::MemoryFormat::Contiguous);  // cp.async copies 16-byte runs of a row
  }
  out = torch::empty({M, N}, x.options());
  return gptq_mma::GemmArgs{
      reinterpret_cast<const half*>(x.data_ptr<at::Half>()), static_cast<int>(M),
      static_cast<int>(K), static_cast<int>(x.stride(0)),
      reinterpret_cast<const uint4*>(qw.data_ptr<int32_t>()),
      reinterpret_cast<const half2*>(meta.data_ptr<at::Half>()), shift,
      bias ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), static_cast<int>(N),
      static_cast<int>(out.stride(0)),
      splits > 1 ? const_cast<float*>(ws.data_ptr<float>()) : nullptr,
      splits > 1 ? const_cast<int32_t*>(counters.data_ptr<int32_t>()) : nullptr,
      static_cast<int>(splits), 0, at::cuda::getCurrentCUDAStream()};
}

// The mma.sync product (arguments as ``prepare``). block_n: output rows a block (128 or 256);
// k_warps: warps sharing a tile along K (1 or 2; a warp owns block_n * k_warps / 8 rows).
torch::Tensor matmul(torch::Tensor x, c10::optional<torch::Tensor> perm, torch::Tensor qw,
                     torch::Tensor meta, int64_t group, c10::optional<torch::Tensor> bias,
                     torch::Tensor ws, torch::Tensor counters, int64_t split_k,
                     int64_t block_n, int64_t k_warps) {
  TORCH_CHECK(block_n == 128 || block_n == 256, "block_n must be 128 or 256");
  TORCH_CHECK(k_warps == 1 || k_warps == 2, "k_warps must be 1 or 2");
  const c10::cuda::CUDAGuard guard(x.device());
  torch::Tensor out;
  const auto args =
      prepare(x, perm, qw, meta, group, bias, ws, counters, split_k, tokens_a_block(x.size(0)), out);
  if (args.M == 0) return out;
  // Warp tiles of 1, 2 or 4 sixteen-row tiles: (block_n, k_warps) picks the instantiation.
  const int tiles_a_warp = static_cast<int>(block_n / 16 * k_warps / gptq_mma::kGemmWarps);
  cudaError_t err;
  if (k_warps == 1) err = tiles_a_warp == 1 ? gptq_mma::launch_gemm<1, 1>(args)
                                            : gptq_mma::launch_gemm<2, 1>(args);
  else err = tiles_a_warp == 2 ? gptq_mma::launch_gemm<2, 2>(args)
                               : gptq_mma::launch_gemm<4, 2>(args);
  C10_CUDA_CHECK(err);
  return out;
}

// Whether the wgmma kernel is compiled for the current device (sm_90a code in the module):
// probed once a process, by a kernel built the same way.
bool wgmma_available() {
  static const bool compiled = [] {
    auto flag = torch::zeros({1}, torch::dtype(torch::kInt32).device(torch::kCUDA));
    C10_CUDA_CHECK(gptq_mma::wgmma_probe(flag.data_ptr<int32_t>(),
                                         at::cuda::getCurrentCUDAStream()));
    return flag.item<int32_t>() == 1;
  }();
  return compiled;
}

// The stream-K decomposition of a wgmma launch with ``blocks`` persistent blocks a token
// block over blocks of ``block_n`` output rows (w4a16_stream_k.h).
gptq_mma::StreamK stream_k_of(int64_t K, int64_t N, int64_t block_n, int64_t blocks) {
  const int64_t units = K / gptq_mma::kStageInputs;
  const int64_t total = (N + block_n - 1) / block_n * units;
  TORCH_CHECK(blocks >= 1 && blocks <= total, "stream_k must be 1 to ", total,
              " blocks for this layer");
  TORCH_CHECK(total * blocks <= 0xffffffffLL, "stream_k: too many units for 32-bit shares");
  return gptq_mma::StreamK{static_cast<int>(units), static_cast<int>(total),
                           static_cast<int>(blocks)};
}

// The most partial sums of one output tile a stream-K launch writes (its workspace holds
// that many times M x N floats).
int64_t stream_k_splits(int64_t K, int64_t N, int64_t block_n, int64_t blocks) {
  return stream_k_of(K, N, block_n, blocks).max_splits();
}

// The wgmma product (arguments as ``prepare``; Hopper only: wgmma_available()); block_n: 128
// or 256 output rows a block. stream_k: 0, or that many persistent blocks a token block
// taking equal shares of the work (split_k must then be 1).
torch::Tensor matmul_wgmma(torch::Tensor x, c10::optional<torch::Tensor> perm,
                           torch::Tensor qw, torch::Tensor meta, int64_t group,
                           c10::optional<torch::Tensor> bias, torch::Tensor ws,
                           torch::Tensor counters, int64_t split_k, int64_t block_n,
                           int64_t stream_k) {
  TORCH_CHECK(block_n == 128 || block_n == 256, "block_n must be 128 or 256");
  TORCH_CHECK(stream_k == 0 || split_k == 1, "stream_k replaces split_k: pass split_k=1");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(wgmma_available(), "the wgmma kernel is not compiled for this device "
              "(it needs sm_90a: TORCH_CUDA_ARCH_LIST=9.0a)");
  const int64_t splits =
      stream_k ? stream_k_splits(x.size(1), qw.size(0) * 16, block_n, stream_k) : split_k;
  torch::Tensor out;
  auto args = prepare(x, perm, qw, meta, group, bias, ws, counters, splits,
                      wgmma_tokens_a_block(x.size(0)), out);
  if (args.M == 0) return out;
  if (stream_k) {
    args.split_k = 1;
    args.stream_k = static_cast<int>(stream_k);
  }
  C10_CUDA_CHECK(block_n == 128 ? gptq_mma::launch_wgmma<1>(args)
                                : gptq_mma::launch_wgmma<2>(args));
  return out;
}

template <int kWarps>
void launch_dequant(const torch::Tensor& qw, const torch::Tensor& meta, int shift, int64_t K,
                    int64_t N, torch::Tensor& out) {
  const int64_t blocks = K / 64 * ((N / 16 + kWarps - 1) / kWarps);
  gptq_mma::w4a16_dequant_kernel<kWarps><<<blocks, kWarps * 32, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(qw.data_ptr<int32_t>()),
      reinterpret_cast<const half2*>(meta.data_ptr<at::Half>()), shift, K, N,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The dense weight [K, N] fp16, rows in sorted order, written into out; warps: 4, 8 or 16 a
// block (the output tiles each block writes side by side).
void dequantize(torch::Tensor qw, torch::Tensor meta, int64_t group, torch::Tensor out,
                int64_t warps) {
  check(qw, torch::kInt32, "qweight");
  check(meta, torch::kHalf, "meta");
  check(out, torch::kHalf, "out");
  const int64_t K = out.size(0), N = out.size(1);
  TORCH_CHECK(out.is_contiguous() && qw.numel() * 8 == K * N, "out does not match qweight");
  TORCH_CHECK(warps == 4 || warps == 8 || warps == 16, "warps must be 4, 8 or 16");
  const c10::cuda::CUDAGuard guard(qw.device());
  const int shift = group_shift(group, K);
  if (warps == 4) launch_dequant<4>(qw, meta, shift, K, N, out);
  else if (warps == 8) launch_dequant<8>(qw, meta, shift, K, N, out);
  else launch_dequant<16>(qw, meta, shift, K, N, out);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "w4a16 tensor-core product (mma.sync)");
  m.def("matmul_wgmma", &matmul_wgmma, "w4a16 tensor-core product (wgmma, sm_90a)");
  m.def("stream_k_splits", &stream_k_splits,
        "the most partial sums of one tile a stream-K wgmma launch writes");
  m.def("wgmma_available", &wgmma_available, "whether the wgmma kernel runs on this device");
  m.def("dequantize", &dequantize, "dense weight of the w4a16 layout");
}
