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

template <int NT, int DEPTH>
void launch(const torch::Tensor& xf, int M, int K, const torch::Tensor& qw,
            const torch::Tensor& meta, int shift, const c10::optional<torch::Tensor>& bias,
            torch::Tensor& out, torch::Tensor& ws, torch::Tensor& counters, int64_t split_k) {
  const int N = out.size(1);
  const int tiles = N / 16;
  dim3 grid((tiles + gptq_mma::kWarps - 1) / gptq_mma::kWarps, split_k, (M + 8 * NT - 1) / (8 * NT));
  gptq_mma::w4a16_mma_kernel<NT, DEPTH><<<grid, gptq_mma::kWarps * 32, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint2*>(xf.data_ptr<int32_t>()), M, K,
      reinterpret_cast<const uint4*>(qw.data_ptr<int32_t>()),
      reinterpret_cast<const half2*>(meta.data_ptr<at::Half>()), shift,
      bias ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), N, out.stride(0),
      ws.data_ptr<float>(), counters.data_ptr<int32_t>(), split_k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = x[:, perm] @ W (+ bias): x [M, K] fp16 (columns in checkpoint order; perm int64 [K],
// the input row of each sorted position, or None), qw int32 [N/16, K/64, 32, 4], meta fp16
// [groups, N, 2]. token_tile: tokens a block (8, 16 or 32). ws: fp32 with >= split_k * M * N
// elements and counters: int32 zeros, >= ceil(M / token_tile) * N / 16, when split_k > 1.
torch::Tensor matmul(torch::Tensor x, c10::optional<torch::Tensor> perm, torch::Tensor qw,
                     torch::Tensor meta, int64_t group, c10::optional<torch::Tensor> bias,
                     torch::Tensor ws, torch::Tensor counters, int64_t split_k,
                     int64_t token_tile) {
  check(x, torch::kHalf, "x");
  check(qw, torch::kInt32, "qweight");
  check(meta, torch::kHalf, "meta");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [M, K] with unit column stride");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0) * 16;
  TORCH_CHECK(K % 64 == 0 && qw.size(1) == K / 64, "qweight does not match x's ", K, " inputs");
  const int shift = group_shift(group, K);
  if (perm) {
    check(*perm, torch::kLong, "perm");
    TORCH_CHECK(perm->numel() == K, "perm must have K entries");
  }
  TORCH_CHECK(meta.size(0) == K / group && meta.size(1) == N, "meta does not match the layer");
  TORCH_CHECK(split_k >= 1 && split_k <= K / 64, "split_k out of range");
  if (bias) check(*bias, torch::kHalf, "bias");
  if (split_k > 1) {
    check(ws, torch::kFloat, "workspace");
    check(counters, torch::kInt32, "counters");
    TORCH_CHECK(ws.numel() >= split_k * M * N, "workspace too small");
    TORCH_CHECK(counters.numel() >= (M + token_tile - 1) / token_tile * (N / 16),
                "too few counters");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const int64_t xf_words = (M + 7) / 8 * (K / 16) * 32;
  auto xf = torch::empty({xf_words * 2}, x.options().dtype(torch::kInt32));
  gptq_mma::w4a16_pack_x_kernel<<<(xf_words + 255) / 256, 256, 0,
                                  at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const half*>(x.data_ptr<at::Half>()), M, K, x.stride(0),
      perm ? perm->data_ptr<int64_t>() : nullptr, reinterpret_cast<uint2*>(xf.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  switch (token_tile) {
    // Fewer token tiles leave registers for more weight chunks in flight.
    case 8: launch<1, 8>(xf, M, K, qw, meta, shift, bias, out, ws, counters, split_k); break;
    case 16: launch<2, 8>(xf, M, K, qw, meta, shift, bias, out, ws, counters, split_k); break;
    case 32: launch<4, 4>(xf, M, K, qw, meta, shift, bias, out, ws, counters, split_k); break;
    default: TORCH_CHECK(false, "token_tile must be 8, 16 or 32");
  }
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
