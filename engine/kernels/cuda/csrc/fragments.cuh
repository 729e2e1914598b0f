// Device code shared by the SVDQuant kernels (quantize_act.cu, w4a4_gemm.cu): the group constants, the inline
// PTX that moves and multiplies MMA fragments (cp.async, ldmatrix, mma.sync), and the number conversions around
// them (the int32 -> fp32 magic-number add, fp32 as bf16 hi + lo, loads of any input dtype as fp32).
// Everything here has internal linkage (an anonymous namespace): each kernel file inlines its own copy.
//
// The constants below are read by scripts/kernel_model.py (keep them `constexpr int kName = value;`).
#pragma once
#include "kernels.h"

#include <cuda_fp16.h>

namespace svdq {
namespace {

constexpr int kGroup = 64;       // channels per scale
constexpr int kGroupBytes = 32;  // packed bytes per group row

// int32 -> fp32 without cvt: the MMA adds its partial sum c to C = bits(1.5 * 2^23); for |c| < 2^22 the
// result's bits are the float b = 1.5 * 2^23 + c exactly (ulp 1 in that binade). A group's partial sums lie
// in [-7680, 7680] (64 * 15 * 8); tests/test_cuda_emulation.py checks the identity exhaustively on
// [-2^22, 2^22). One FFMA then removes the offset and applies the activation scale: with sa rounded to 22
// significant bits (round_to_22_bits), -1.5 * 2^23 * sa is exact (3 x a 22-bit significand fits in 24 bits),
// so fma(b, sa22, -1.5 * 2^23 * sa22) = RN(c * sa22) with one rounding; one more FFMA applies wscales into
// the accumulator. The loader threads round each row's scale once per group and park (sa22, -magic * sa22)
// in shared memory, so the loop spends two FFMA per accumulator and group (the Triton kernel's conversion).
constexpr int kMagicBits = 0x4B400000;
constexpr float kMagic = 12582912.0f;

// s rounded to nearest at 22 significant bits (relative change <= 2^-22; 0, NaN and infinities map to
// themselves): what makes kMagic * s exact.
__device__ __forceinline__ float round_to_22_bits(float s) { return __int_as_float((__float_as_int(s) + 2) & ~3); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d = a * b + magic (int32), i.e. the bits of 1.5 * 2^23 + (this group's partial sum).
template <bool kUnsigned>
__device__ __forceinline__ void mma_s4_magic(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kUnsigned) {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(kMagicBits));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(kMagicBits));
  }
}

// c += a * b on bf16 tensor cores, fp32 accumulate (m16n8k16; same C layout as m16n8k64).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

// An fp32 pair as bf16 hi + bf16 lo (v ~= hi + lo to about 2^-16 relative): two bf16 MMAs keep the low-rank
// branch close to the fp32 reference.
__device__ __forceinline__ void split_bf16x2(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  hi = bf16x2_bits(h);
  lo = bf16x2_bits(__floats2bfloat162_rn(x - __low2float(h), y - __high2float(h)));
}

__device__ __forceinline__ float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

// 8 consecutive elements from a 16-byte aligned address, as fp32.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[2 * i] = __low2float(h[i]), v[2 * i + 1] = __high2float(h[i]);
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[2 * i] = __low2float(h[i]), v[2 * i + 1] = __high2float(h[i]);
}
__device__ __forceinline__ void load8(const void* p, DType t, int64_t i, float (&v)[8]) {
  switch (t) {
    case DType::F32: load8(static_cast<const float*>(p) + i, v); break;
    case DType::F16: load8(static_cast<const __half*>(p) + i, v); break;
    default: load8(static_cast<const __nv_bfloat16*>(p) + i, v); break;
  }
}

}  // namespace
}  // namespace svdq
