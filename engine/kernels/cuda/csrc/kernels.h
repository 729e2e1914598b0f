// SVDQuant W4A4 kernels for sm_80 / sm_86 / sm_89: 4-bit integer tensor-core MMA.
// Pure CUDA (no torch headers) so that CI compiles them with nvcc alone; ops.cpp binds them.
// The op contract (shapes, layouts, rounding) is the docstring of engine/kernels/__init__.py.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace svdq {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// x [M, K] (dtype xt), smooth [K], proj_down [R, K]  ->  qx uint8 [M, K/2], ascales fp32 [M, K/64],
// lora_act fp32 [M, R]. K must be a multiple of 64.
cudaError_t quantize_act(const void* x, DType xt, const void* smooth, DType st, const void* proj_down, DType dt,
                         uint8_t* qx, float* ascales, float* lora_act, int M, int K, int R, float shift,
                         bool is_unsigned, cudaStream_t stream);

// qx uint8 [M, K/2], ascales fp32 [M, K/64], qweight uint8 [N, K/2] (signed codes), wscales [N, K/64],
// lora_act fp32 [M, R], proj_up [N, R], bias [N] or null  ->  out [M, N] (dtype ot).
cudaError_t w4a4_gemm(const uint8_t* qx, const float* ascales, const uint8_t* qweight, const void* wscales,
                      DType wst, const float* lora_act, const void* proj_up, DType ut, const void* bias, DType bt,
                      void* out, DType ot, int M, int N, int K, int R, bool is_unsigned, cudaStream_t stream);

}  // namespace svdq
