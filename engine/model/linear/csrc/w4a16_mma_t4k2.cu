// Blocks of 256 output rows, 4 tile(s) a warp, 2 warp(s) along K.
#include "w4a16_mma_gemm.cuh"

template cudaError_t gptq_mma::launch_gemm<4, 2>(const gptq_mma::GemmArgs&);
