// SVDQuant W4A4 kernels for sm_80 / sm_86 / sm_89: 4-bit integer tensor-core MMA, low-rank branch on
// bf16 tensor cores. Pure CUDA (no torch headers) so that CI compiles them with nvcc alone; ops.cpp binds
// them. The op contract (shapes, layouts, rounding) is the docstring of engine/kernels/__init__.py.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace svdq {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// x [M, K] (dtype xt, rows contiguous, 16-byte aligned), smooth [K] (dtype st, 16-byte aligned),
// proj_down as bf16 [R, K]: down_hi, plus down_lo (the bf16 residual of a wider dtype) or null
//   -> qx uint8 [M, K/2] (plain layout), ascales fp32 [M, K/64] group-major, element (m, g) at g * M + m
//      (strides (1, M): the layout every backend returns, which torch.compile asserts), lora_act fp32 [M, R].
//      K must be a multiple of 64.
cudaError_t quantize_act(const void* x, DType xt, const void* smooth, DType st, const __nv_bfloat16* down_hi,
                         const __nv_bfloat16* down_lo, uint8_t* qx, float* ascales, float* lora_act, int M, int K,
                         int R, float shift, bool is_unsigned, cudaStream_t stream);

// qx uint8 [M, K/2], ascales fp32 logical [M, G] at element strides (as_m, as_g), qweight uint8 [N, K/2]
// (signed codes, plain layout), wscales fp32 logical [N, G] at strides (ws_n, ws_g), lora_act fp32 [M, R]
// contiguous, proj_up as bf16 [N, R]: up_hi plus up_lo or null, bias [N] (dtype bt) or null,
// partial [M, N] (contiguous, dtype ot) or null, residual [M, N] and gate [B, N] (contiguous, dtype ot; both or
// null; rows_per_gate = M / B)
//   -> out [M, N] (dtype ot, rows ldo elements apart: ldo even and >= N, so that every output pair is one aligned
//      store; the host pads odd N): y (+ partial), or residual + gate[m / rows_per_gate] * y with y, the product
//      and the sum each rounded to ot (the contract's epilogue). qx and qweight 16-byte aligned, K a multiple of 64.
cudaError_t w4a4_gemm(const uint8_t* qx, const float* ascales, int64_t as_m, int64_t as_g, const uint8_t* qweight,
                      const float* wscales, int64_t ws_n, int64_t ws_g, const float* lora_act,
                      const __nv_bfloat16* up_hi, const __nv_bfloat16* up_lo, const void* bias, DType bt, void* out,
                      DType ot, int64_t ldo, const void* partial, const void* residual, const void* gate,
                      int rows_per_gate, int M, int N, int K, int R, bool is_unsigned, cudaStream_t stream);

}  // namespace svdq
