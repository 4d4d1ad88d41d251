// Blocks of 128 output rows, 1 tile(s) a warp, 1 warp(s) along K.
#include "w4a16_mma_gemm.cuh"

template cudaError_t gptq_mma::launch_gemm<1, 1>(const gptq_mma::GemmArgs&);
