// SVDQuant W4A4 kernels: see kernels.h. Deterministic: every output is reduced by one thread or
// one warp in a fixed order; there are no atomics.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace svdq {
namespace {

constexpr int kGroup = 64;      // channels per scale
constexpr int kGroupBytes = 32; // packed bytes per group row

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Element i of a tensor whose dtype is only known at run time (uniform across the warp).
__device__ __forceinline__ float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

__device__ __forceinline__ void store_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
  }
}

// ------------------------------------------------------------------------------------------
// quantize_act: one warp per row; lane l owns groups l, l+32, ... The low-rank product is
// summed by each lane over its groups, then across lanes by a fixed butterfly; lane 0 writes.
// ------------------------------------------------------------------------------------------
constexpr int kWarpsPerBlock = 4;
constexpr int kRChunk = 16;

template <typename T>
__global__ void quantize_act_kernel(const T* __restrict__ x, const void* __restrict__ smooth, DType st,
                                    const void* __restrict__ down, DType dt, uint8_t* __restrict__ qx,
                                    float* __restrict__ ascales, float* __restrict__ lora_act, int M, int K, int R,
                                    float shift, bool is_unsigned) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= M) return;
  const int groups = K / kGroup;
  const T* xr = x + static_cast<int64_t>(row) * K;
  const float qmax = is_unsigned ? 15.f : 7.f;
  const int lo = is_unsigned ? 0 : -8, hi = is_unsigned ? 15 : 7;

  for (int g = lane; g < groups; g += 32) {
    float h[kGroup];
    float top = 0.f;
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const int k = g * kGroup + i;
      h[i] = __fdiv_rn(to_float(xr[k]) + shift, load_float(smooth, st, k));  // IEEE, as the reference
      top = fmaxf(top, is_unsigned ? h[i] : fabsf(h[i]));
    }
    const float scale = __fdiv_rn(top, qmax);
    ascales[static_cast<int64_t>(row) * groups + g] = scale;
    uint32_t words[kGroup / 8];
#pragma unroll
    for (int w = 0; w < kGroup / 8; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        int q = 0;
        if (scale > 0.f) q = min(max(__float2int_rn(__fdiv_rn(h[w * 8 + j], scale)), lo), hi);  // half-even
        word |= (static_cast<uint32_t>(q) & 0xFu) << (4 * j);  // low nibble = even channel
      }
      words[w] = word;
    }
    uint4* dst = reinterpret_cast<uint4*>(qx + static_cast<int64_t>(row) * (K / 2) + g * kGroupBytes);
    dst[0] = make_uint4(words[0], words[1], words[2], words[3]);
    dst[1] = make_uint4(words[4], words[5], words[6], words[7]);
  }

  for (int r0 = 0; r0 < R; r0 += kRChunk) {
    float acc[kRChunk];
#pragma unroll
    for (int c = 0; c < kRChunk; ++c) acc[c] = 0.f;
    for (int g = lane; g < groups; g += 32) {
      for (int i = 0; i < kGroup; ++i) {
        const int k = g * kGroup + i;
        const float v = __fdiv_rn(to_float(xr[k]) + shift, load_float(smooth, st, k));
#pragma unroll
        for (int c = 0; c < kRChunk; ++c)
          if (r0 + c < R) acc[c] = fmaf(v, load_float(down, dt, static_cast<int64_t>(r0 + c) * K + k), acc[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < kRChunk; ++c) {
      float v = acc[c];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && r0 + c < R) lora_act[static_cast<int64_t>(row) * R + r0 + c] = v;
    }
  }
}

// ------------------------------------------------------------------------------------------
// w4a4_gemm: CTA tile 64 x 64, 4 warps (2 x 2) of 32 x 32, one group of 64 channels per step,
// double-buffered with cp.async. The plain packed layout (row-major, low nibble = even channel)
// gives mma.m16n8k64's A and B fragments directly through ldmatrix: an 8x8 b16 matrix row is
// 16 bytes = 32 nibbles, and thread t receives bytes 4(t%4)..4(t%4)+3 of row t/4, i.e. channels
// 8(t%4)..8(t%4)+7, which is where the 4-bit fragments want them.
// ------------------------------------------------------------------------------------------
constexpr int kBM = 64, kBN = 64, kThreads = 128;
constexpr int kRowStride = 48;  // bytes per smem row: 32 used + 16 padding, no ldmatrix bank conflicts

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: zero-fill (rows past M or N)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <bool kUnsigned>
__device__ __forceinline__ void mma_s4(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kUnsigned) {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
  }
}

template <bool kUnsigned>
__global__ void __launch_bounds__(kThreads) w4a4_gemm_kernel(
    const uint8_t* __restrict__ qx, const float* __restrict__ ascales, const uint8_t* __restrict__ qw,
    const void* __restrict__ wscales, DType wst, const float* __restrict__ lora_act, const void* __restrict__ up,
    DType ut, const void* __restrict__ bias, DType bt, void* __restrict__ out, DType ot, int M, int N, int K, int R) {
  __shared__ __align__(16) uint8_t As[2][kBM * kRowStride];
  __shared__ __align__(16) uint8_t Bs[2][kBN * kRowStride];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // the warp's 32 x 32 sub-tile
  const int groups = K / kGroup;
  const int64_t row_bytes = K / 2;

  // Each thread copies one 16-byte half-row of A and of B per group.
  const int ld_row = tid / 2, ld_half = (tid % 2) * 16;
  auto load_stage = [&](int stage, int g) {
    const int am = m0 + ld_row, bn = n0 + ld_row;
    cp_async_16(&As[stage][ld_row * kRowStride + ld_half],
                qx + static_cast<int64_t>(am < M ? am : 0) * row_bytes + g * kGroupBytes + ld_half, am < M);
    cp_async_16(&Bs[stage][ld_row * kRowStride + ld_half],
                qw + static_cast<int64_t>(bn < N ? bn : 0) * row_bytes + g * kGroupBytes + ld_half, bn < N);
    asm volatile("cp.async.commit_group;\n" ::);
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Rows and columns this thread's accumulators belong to (mma.m16n8 C fragment layout).
  const int r_in = lane / 4, c_in = (lane % 4) * 2;

  load_stage(0, 0);
  for (int g = 0; g < groups; ++g) {
    const int stage = g % 2;
    if (g + 1 < groups) {
      load_stage(stage ^ 1, g + 1);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();

    uint32_t a[2][4], b[4][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)  // rows lane%16, bytes (lane/16)*16 -> a0..a3
      ldmatrix_x4(a[mt], &As[stage][(wm + mt * 16 + lane % 16) * kRowStride + (lane / 16) * 16]);
#pragma unroll
    for (int nt = 0; nt < 4; nt += 2) {  // two n8 tiles: (b0, b1) of nt, then of nt + 1
      uint32_t r[4];
      ldmatrix_x4(r, &Bs[stage][(wn + nt * 8 + (lane / 16) * 8 + lane % 8) * kRowStride + ((lane / 8) % 2) * 16]);
      b[nt][0] = r[0];
      b[nt][1] = r[1];
      b[nt + 1][0] = r[2];
      b[nt + 1][1] = r[3];
    }

    float sa[2][2], sw[4][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm + mt * 16 + r_in + h * 8;
        sa[mt][h] = m < M ? ascales[static_cast<int64_t>(m) * groups + g] : 0.f;
      }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + wn + nt * 8 + c_in + h;
        sw[nt][h] = n < N ? load_float(wscales, wst, static_cast<int64_t>(n) * groups + g) : 0.f;
      }

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        int c[4];
        mma_s4<kUnsigned>(c, a[mt], b[nt][0], b[nt][1]);  // exact integer sum of this group
        acc[mt][nt][0] += static_cast<float>(c[0]) * sa[mt][0] * sw[nt][0];
        acc[mt][nt][1] += static_cast<float>(c[1]) * sa[mt][0] * sw[nt][1];
        acc[mt][nt][2] += static_cast<float>(c[2]) * sa[mt][1] * sw[nt][0];
        acc[mt][nt][3] += static_cast<float>(c[3]) * sa[mt][1] * sw[nt][1];
      }
    __syncthreads();  // the stage is overwritten by the load two steps on
  }

  // Epilogue: low-rank up-projection and bias in fp32, then the output dtype.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm + mt * 16 + r_in + (e / 2) * 8;
        const int n = n0 + wn + nt * 8 + c_in + (e % 2);
        if (m >= M || n >= N) continue;
        float y = acc[mt][nt][e];
        for (int r = 0; r < R; ++r)
          y = fmaf(lora_act[static_cast<int64_t>(m) * R + r], load_float(up, ut, static_cast<int64_t>(n) * R + r), y);
        if (bias != nullptr) y += load_float(bias, bt, n);
        store_float(out, ot, static_cast<int64_t>(m) * N + n, y);
      }
}

}  // namespace

cudaError_t quantize_act(const void* x, DType xt, const void* smooth, DType st, const void* proj_down, DType dt,
                         uint8_t* qx, float* ascales, float* lora_act, int M, int K, int R, float shift,
                         bool is_unsigned, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (K % kGroup != 0) return cudaErrorInvalidValue;
  const dim3 grid((M + kWarpsPerBlock - 1) / kWarpsPerBlock), block(32 * kWarpsPerBlock);
  switch (xt) {
    case DType::F32:
      quantize_act_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(x), smooth, st, proj_down, dt,
                                                             qx, ascales, lora_act, M, K, R, shift, is_unsigned);
      break;
    case DType::F16:
      quantize_act_kernel<__half><<<grid, block, 0, stream>>>(static_cast<const __half*>(x), smooth, st, proj_down,
                                                              dt, qx, ascales, lora_act, M, K, R, shift, is_unsigned);
      break;
    default:
      quantize_act_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), smooth, st,
                                                                     proj_down, dt, qx, ascales, lora_act, M, K, R,
                                                                     shift, is_unsigned);
  }
  return cudaGetLastError();
}

cudaError_t w4a4_gemm(const uint8_t* qx, const float* ascales, const uint8_t* qweight, const void* wscales,
                      DType wst, const float* lora_act, const void* proj_up, DType ut, const void* bias, DType bt,
                      void* out, DType ot, int M, int N, int K, int R, bool is_unsigned, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % kGroup != 0) return cudaErrorInvalidValue;
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM), block(kThreads);
  if (is_unsigned)
    w4a4_gemm_kernel<true><<<grid, block, 0, stream>>>(qx, ascales, qweight, wscales, wst, lora_act, proj_up, ut,
                                                       bias, bt, out, ot, M, N, K, R);
  else
    w4a4_gemm_kernel<false><<<grid, block, 0, stream>>>(qx, ascales, qweight, wscales, wst, lora_act, proj_up, ut,
                                                        bias, bt, out, ot, M, N, K, R);
  return cudaGetLastError();
}

}  // namespace svdq
