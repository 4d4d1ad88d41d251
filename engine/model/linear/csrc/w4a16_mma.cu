// Torch bindings of the w4a16 tensor-core kernels (w4a16_mma.cuh), built just in time by
// engine/model/linear/mma.py (torch.utils.cpp_extension) and cached on disk.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "w4a16_mma.cuh"

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

template <int NT, int TPW, bool SMALL_GROUPS>
void launch(const torch::Tensor& x, int shift, const torch::Tensor& qw, const torch::Tensor& meta,
            const c10::optional<torch::Tensor>& bias, torch::Tensor& out, torch::Tensor& ws,
            torch::Tensor& counters, int64_t split_k) {
  using S = gptq_mma::GemmShape<NT, TPW, SMALL_GROUPS>;
  const auto kernel = gptq_mma::w4a16_gemm_kernel<NT, TPW, SMALL_GROUPS>;
  static const bool configured = [&] {  // above 48 KiB a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        S::kSmemBytes));
    return true;
  }();
  (void)configured;
  const int M = x.size(0), K = x.size(1), N = out.size(1);
  dim3 grid((N / 16 + S::kTiles - 1) / S::kTiles, split_k, (M + 8 * NT - 1) / (8 * NT));
  kernel<<<grid, gptq_mma::kGemmThreads, S::kSmemBytes, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const half*>(x.data_ptr<at::Half>()), M, K, x.stride(0),
      reinterpret_cast<const uint4*>(qw.data_ptr<int32_t>()),
      reinterpret_cast<const half2*>(meta.data_ptr<at::Half>()), shift,
      bias ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), N, out.stride(0),
      ws.data_ptr<float>(), counters.data_ptr<int32_t>(), split_k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int TPW, bool SMALL_GROUPS>
void launch_tokens(const torch::Tensor& x, int shift, const torch::Tensor& qw,
                   const torch::Tensor& meta, const c10::optional<torch::Tensor>& bias,
                   torch::Tensor& out, torch::Tensor& ws, torch::Tensor& counters,
                   int64_t split_k) {
  const int64_t M = x.size(0);
  if (M <= 8) launch<1, TPW, SMALL_GROUPS>(x, shift, qw, meta, bias, out, ws, counters, split_k);
  else if (M <= 16) launch<2, TPW, SMALL_GROUPS>(x, shift, qw, meta, bias, out, ws, counters, split_k);
  else if (M <= 32) launch<4, TPW, SMALL_GROUPS>(x, shift, qw, meta, bias, out, ws, counters, split_k);
  else launch<8, TPW, SMALL_GROUPS>(x, shift, qw, meta, bias, out, ws, counters, split_k);
}

template <int TPW>
void launch_groups(const torch::Tensor& x, int shift, const torch::Tensor& qw,
                   const torch::Tensor& meta, const c10::optional<torch::Tensor>& bias,
                   torch::Tensor& out, torch::Tensor& ws, torch::Tensor& counters,
                   int64_t split_k) {
  if (shift < 6) launch_tokens<TPW, true>(x, shift, qw, meta, bias, out, ws, counters, split_k);
  else launch_tokens<TPW, false>(x, shift, qw, meta, bias, out, ws, counters, split_k);
}

// Tokens a block for a step of M (the kernel's NT * 8): 8, 16, 32, then 64.
int64_t tokens_a_block(int64_t M) { return M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64; }

// out = x[:, perm] @ W (+ bias): x [M, K] fp16 (columns in checkpoint order; perm int64 [K],
// the input row of each sorted position, or None), qw int32 [N/16, K/64, 32, 4], meta fp16
// [groups, N, 2]. block_n: output rows a block (128 or 256). ws: fp32 with >= split_k * M * N
// elements and counters: int32 zeros, >= ceil(M / tokens_a_block(M)) * N / 16, when
// split_k > 1.
torch::Tensor matmul(torch::Tensor x, c10::optional<torch::Tensor> perm, torch::Tensor qw,
                     torch::Tensor meta, int64_t group, c10::optional<torch::Tensor> bias,
                     torch::Tensor ws, torch::Tensor counters, int64_t split_k,
                     int64_t block_n) {
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
  TORCH_CHECK(split_k >= 1 && split_k <= K / gptq_mma::kStageInputs, "split_k out of range");
  TORCH_CHECK(block_n == 128 || block_n == 256, "block_n must be 128 or 256");
  if (bias) check(*bias, torch::kHalf, "bias");
  if (split_k > 1) {
    check(ws, torch::kFloat, "workspace");
    check(counters, torch::kInt32, "counters");
    TORCH_CHECK(ws.numel() >= split_k * M * N, "workspace too small");
    const int64_t blocks = (M + tokens_a_block(M) - 1) / tokens_a_block(M);
    TORCH_CHECK(counters.numel() >= blocks * (N / 16), "too few counters");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  if (perm) {
    check(*perm, torch::kLong, "perm");
    TORCH_CHECK(perm->numel() == K, "perm must have K entries");
    x = x.index_select(1, *perm);  // act-order: the columns in the weights' sorted order
  } else if (x.stride(0) % 8 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) {
    x = x.clone(at::MemoryFormat::Contiguous);  // cp.async copies 16-byte runs of a row
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  if (block_n == 128) launch_groups<1>(x, shift, qw, meta, bias, out, ws, counters, split_k);
  else launch_groups<2>(x, shift, qw, meta, bias, out, ws, counters, split_k);
  return out;
}

// The dense weight [K, N] fp16, rows in sorted order, written into out.
void dequantize(torch::Tensor qw, torch::Tensor meta, int64_t group, torch::Tensor out) {
  check(qw, torch::kInt32, "qweight");
  check(meta, torch::kHalf, "meta");
  check(out, torch::kHalf, "out");
  const int64_t K = out.size(0), N = out.size(1);
  TORCH_CHECK(out.is_contiguous() && qw.numel() * 8 == K * N, "out does not match qweight");
  const c10::cuda::CUDAGuard guard(qw.device());
  const int64_t warps = K / 64 * (N / 16);
  gptq_mma::w4a16_dequant_kernel<<<(warps + gptq_mma::kWarps - 1) / gptq_mma::kWarps,
                                   gptq_mma::kWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(qw.data_ptr<int32_t>()),
      reinterpret_cast<const half2*>(meta.data_ptr<at::Half>()), group_shift(group, K), K, N,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "w4a16 tensor-core product");
  m.def("dequantize", &dequantize, "dense weight of the w4a16 layout");
}
