// wgmma blocks of 128 output rows (1 tile a warp), and the probe of what was compiled.
#include "w4a16_wgmma_launch.cuh"

namespace gptq_mma {

template cudaError_t launch_wgmma<1>(const GemmArgs&);

namespace {
__global__ void wgmma_probe_kernel(int* flag) {
#ifdef GPTQ_WGMMA_ENABLED
  *flag = 1;
#else
  *flag = 0;
#endif
}
}  // namespace

cudaError_t wgmma_probe(int* flag, cudaStream_t stream) {
  wgmma_probe_kernel<<<1, 1, 0, stream>>>(flag);
  return cudaGetLastError();
}

}  // namespace gptq_mma
