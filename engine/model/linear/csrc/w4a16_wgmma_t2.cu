// wgmma blocks of 256 output rows (2 tiles a warp).
#include "w4a16_wgmma_launch.cuh"

template cudaError_t gptq_mma::launch_wgmma<2>(const gptq_mma::GemmArgs&);
