// SVDQuant W4A4 kernels, v2: see kernels.h. Deterministic: every output is owned by one thread and summed
// in a fixed order (the activation kernel's per-warp low-rank partials are added in warp order); no atomics.
//
// The tile parameters below are read by scripts/kernel_model.py (keep them `constexpr int kName = value;`).
#include "kernels.h"

#include <cuda_fp16.h>

#include <atomic>

namespace svdq {
namespace {

constexpr int kGroup = 64;       // channels per scale
constexpr int kGroupBytes = 32;  // packed bytes per group row

// --- w4a4_gemm configuration ---------------------------------------------------------------------------
// CTA tile 192 x 128 (M x N), 12 warps as 3 x 4, warp tile 64 x 32 = 4 x 4 mma.m16n8k64 per 64-channel
// group (154 MACs per byte brought in); a 4-stage cp.async pipeline, one group per stage, one barrier per
// group. Designed occupancy: 1 CTA (12 warps) per SM: <= 168 registers (65536 / 384), no spills, 45 KB of
// shared memory (which leaves the SM a 64 KB L1 for the scales read through it). 256 x 128 with 8 warps
// needs 64 x 64 warp tiles, 128 fp32 accumulators per thread plus the per-group conversion temporaries:
// ptxas spills it at 255 registers.
constexpr int kBM = 192;
constexpr int kBN = 128;
constexpr int kWarpsM = 3;
constexpr int kWarpsN = 4;
constexpr int kStages = 4;
constexpr int kGroupTilesM = 8;  // swizzled CTA order: 8 tile rows sweep N together (weights stay in L2)
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // warp tile
constexpr int kMT = kWM / 16, kNT = kWN / 8;               // m16 and n8 tiles per warp
// codes, then (sa22, -magic sa22) and wscales, one slot per thread (rows tid < kBM and columns tid < kBN are
// read; the rest is padding that lets every thread store or copy without a branch)
constexpr int kStageBytes = (kBM + kBN) * kGroupBytes + kThreads * (8 + 4);
constexpr int kSmemBytes = kStages * kStageBytes;
static_assert(kNT % 2 == 0 && kBM <= kThreads && kBN <= kThreads, "tile shape");

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

// --- quantize_act configuration -------------------------------------------------------------------------
// 32 rows (two m16 tiles) per CTA, 4 warps splitting the groups round-robin; lane (g, t) of a warp owns
// rows g and g + 8 of each m16 tile and channels 16t .. 16t + 15 of the group (two 16-byte loads per row).
constexpr int kQRows = 32;
constexpr int kQWarps = 4;

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

// ---------------------------------------------------------------------------------------------------------
// quantize_act. Per group: x_hat = (x + shift) / smooth once (IEEE division, as the reference), group maxima
// over the 4 lanes of a quad by shuffles (NaN propagates like torch.amax), codes packed 16 per lane and stored
// as 8-byte words, and x_hat @ proj_down^T on bf16 tensor cores: within an m16n8k16 step lane t's k slots
// {2t, 2t+1, 2t+8, 2t+9} stand for its own channels 16t + 4s + {0..3} (A and B use the same permutation,
// and a dot product does not depend on the order of k). Ranks are processed kNT * 8 at a time; for R above
// that, later passes re-read x (no second quantization).
// ---------------------------------------------------------------------------------------------------------
template <typename T, int kNT>
__global__ void __launch_bounds__(32 * kQWarps) quantize_act_kernel(
    const T* __restrict__ x, const void* __restrict__ smooth, DType st, const __nv_bfloat16* __restrict__ down_hi,
    const __nv_bfloat16* __restrict__ down_lo, uint8_t* __restrict__ qx, float* __restrict__ ascales,
    float* __restrict__ lora_act, int M, int K, int R, float shift, bool is_unsigned) {
  __shared__ float partial[kQWarps][kQRows][kNT * 8 + 1];  // +1: no bank conflicts on the column reads

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int grp = lane / 4, t = lane % 4;
  const int m0 = blockIdx.x * kQRows;
  const int groups = K / kGroup;
  const float qmax = is_unsigned ? 15.f : 7.f;
  const int lo = is_unsigned ? 0 : -8, hi = is_unsigned ? 15 : 7;

  for (int r0 = 0; r0 < R || (r0 == 0); r0 += kNT * 8) {
    const bool quantize = r0 == 0;
    float acc[2][kNT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    for (int g = warp; g < groups; g += kQWarps) {
      const int k0 = g * kGroup + 16 * t;  // this lane's 16 channels
      float s[16];
      load8(smooth, st, k0, *reinterpret_cast<float(*)[8]>(&s[0]));
      load8(smooth, st, k0 + 8, *reinterpret_cast<float(*)[8]>(&s[8]));
      float h[2][2][16];  // [m tile][row grp / grp + 8][channel]
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int m = m0 + mt * 16 + grp + 8 * rr;
          float v[16];
          if (m < M) {
            const T* p = x + static_cast<int64_t>(m) * K + k0;
            load8(p, *reinterpret_cast<float(*)[8]>(&v[0]));
            load8(p + 8, *reinterpret_cast<float(*)[8]>(&v[8]));
          } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) v[i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < 16; ++i) h[mt][rr][i] = __fdiv_rn(v[i] + shift, s[i]);
        }

      if (quantize) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            float top = 0.f;
            bool nan = false;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
              const float v = h[mt][rr][i];
              top = fmaxf(top, is_unsigned ? v : fabsf(v));
              nan |= v != v;
            }
            top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
            top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2));
            nan = (__ballot_sync(0xffffffffu, nan) >> (4 * grp)) & 0xFu;  // any lane of this quad
            // torch.amax propagates NaN, so a group with a NaN has a NaN scale and (scale > 0 failing) codes 0
            const float scale = nan ? __int_as_float(0x7fffffff) : __fdiv_rn(top, qmax);
            uint32_t w[2] = {0u, 0u};
#pragma unroll
            for (int i = 0; i < 16; ++i) {
              int q = 0;
              if (scale > 0.f) q = min(max(__float2int_rn(__fdiv_rn(h[mt][rr][i], scale)), lo), hi);  // half-even
              w[i / 8] |= (static_cast<uint32_t>(q) & 0xFu) << (4 * (i % 8));  // low nibble = even channel
            }
            const int m = m0 + mt * 16 + grp + 8 * rr;
            if (m < M) {
              *reinterpret_cast<uint2*>(qx + static_cast<int64_t>(m) * (K / 2) + g * kGroupBytes + 8 * t) =
                  make_uint2(w[0], w[1]);
              if (t == 0) ascales[static_cast<int64_t>(g) * M + m] = scale;  // group-major [M, G]: strides (1, M)
            }
          }
      }

      if (R > 0) {
        // A fragments once per group: x_hat as bf16 hi + lo. Step s uses channels 16t + 4s + {0, 1 | 2, 3}:
        // a0 row grp slots 2t, 2t+1; a1 row grp + 8; a2 row grp slots 2t+8, 2t+9; a3 row grp + 8.
        uint32_t ah[2][4][4], al[2][4][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int step = 0; step < 4; ++step)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int c = 4 * step + 2 * (i / 2);
              split_bf16x2(h[mt][i % 2][c], h[mt][i % 2][c + 1], ah[mt][step][i], al[mt][step][i]);
            }
        // B fragments: lane (grp, t) reads proj_down[r0 + 8 nt + grp][k0 .. k0 + 15] (two 16-byte loads);
        // b0 holds that row's channels 16t + 4s + {0, 1}, b1 channels 16t + 4s + {2, 3}.
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const int r = r0 + nt * 8 + grp;
          uint4 bh[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)}, bl[2] = {bh[0], bh[0]};
          if (r < R) {
            const uint4* p = reinterpret_cast<const uint4*>(down_hi + static_cast<int64_t>(r) * K + k0);
            bh[0] = p[0], bh[1] = p[1];
            if (down_lo != nullptr) {
              const uint4* q = reinterpret_cast<const uint4*>(down_lo + static_cast<int64_t>(r) * K + k0);
              bl[0] = q[0], bl[1] = q[1];
            }
          }
#pragma unroll
          for (int step = 0; step < 4; ++step) {
            const uint32_t* wh = reinterpret_cast<const uint32_t*>(&bh[step / 2]);
            const uint32_t* wl = reinterpret_cast<const uint32_t*>(&bl[step / 2]);
            const int j = 2 * (step % 2);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              mma_bf16(acc[mt][nt], ah[mt][step], wh[j], wh[j + 1]);
              mma_bf16(acc[mt][nt], al[mt][step], wh[j], wh[j + 1]);
              if (down_lo != nullptr) mma_bf16(acc[mt][nt], ah[mt][step], wl[j], wl[j + 1]);
            }
          }
        }
      }
    }
    if (R == 0) break;

    // Deterministic cross-warp sum: each warp parks its partial tile, then warps 0..3 are added in order.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          partial[warp][mt * 16 + grp + 8 * (e / 2)][nt * 8 + 2 * t + (e % 2)] = acc[mt][nt][e];
    __syncthreads();
    for (int i = threadIdx.x; i < kQRows * kNT * 8; i += 32 * kQWarps) {
      const int row = i / (kNT * 8), col = i % (kNT * 8);
      const int m = m0 + row, r = r0 + col;
      float v = partial[0][row][col];
#pragma unroll
      for (int w = 1; w < kQWarps; ++w) v += partial[w][row][col];
      if (m < M && r < R) lora_act[static_cast<int64_t>(m) * R + r] = v;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// w4a4_gemm. Shared memory per stage: A codes [kBM][32 B], B codes [kBN][32 B] (each 32-byte row holds its
// two 16-byte halves swapped on rows with bit 2 set, so the 8 rows of one ldmatrix hit 32 distinct banks),
// then the stage's ascales [kBM] and wscales [kBN] as fp32. ldmatrix from the plain layout gives
// mma.m16n8k64's fragments: a 16-byte matrix row is 32 nibbles and lane t receives bytes 4(t%4)..+3 of row
// t/4 (tests/test_cuda_tile.py emulates this from the PTX ISA).
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ int swz(int row, int half) { return row * kGroupBytes + 16 * (half ^ ((row >> 2) & 1)); }

// Low-rank branch on bf16 tensor cores into the same fp32 accumulators: lora_act (fp32) as hi + lo bf16,
// proj_up as bf16 (plus its residual when the host split a wider dtype); k runs over R in steps of 16.
// One m16 tile at a time keeps the live fragments small next to the 128 accumulators.
// Then bias, and packed stores: each thread writes (c0, c1) and (c2, c3) as one bf16x2 / half2 / float2.
__device__ __forceinline__ void epilogue(float (&acc)[kMT][kNT][4], int m0, int n0, int wm, int wn, int grp, int t,
                                         const float* __restrict__ lora_act, const __nv_bfloat16* __restrict__ up_hi,
                                         const __nv_bfloat16* __restrict__ up_lo, const void* __restrict__ bias,
                                         DType bt, void* __restrict__ out, DType ot, int M, int N, int R) {
  for (int k0 = 0; k0 < R; k0 += 16) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      uint32_t ah[4], al[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // a_i: row grp + 8 (i % 2), cols 2t, 2t + 1 (+ 8 for i >= 2)
        const int m = m0 + wm + mt * 16 + grp + 8 * (i % 2), k = k0 + 2 * t + 8 * (i / 2);
        const float* p = lora_act + static_cast<int64_t>(m) * R + k;
        const bool ok = m < M;
        split_bf16x2(ok && k < R ? p[0] : 0.f, ok && k + 1 < R ? p[1] : 0.f, ah[i], al[i]);
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int n = n0 + wn + nt * 8 + grp;
        uint32_t bh[2], bl[2] = {0u, 0u};
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // b_i: rows (k) 2t, 2t + 1 (+ 8 for i = 1), column grp
          const int k = k0 + 2 * t + 8 * i;
          const int64_t o = static_cast<int64_t>(n) * R + k;
          const __nv_bfloat16 z = __float2bfloat16_rn(0.f);
          const bool ok0 = n < N && k < R, ok1 = n < N && k + 1 < R;
          bh[i] = bf16x2_bits(__halves2bfloat162(ok0 ? up_hi[o] : z, ok1 ? up_hi[o + 1] : z));
          if (up_lo != nullptr) bl[i] = bf16x2_bits(__halves2bfloat162(ok0 ? up_lo[o] : z, ok1 ? up_lo[o + 1] : z));
        }
        mma_bf16(acc[mt][nt], ah, bh[0], bh[1]);
        mma_bf16(acc[mt][nt], al, bh[0], bh[1]);
        if (up_lo != nullptr) mma_bf16(acc[mt][nt], ah, bl[0], bl[1]);
      }
    }
  }

  // Bias, then packed stores: each thread writes (c0, c1) and (c2, c3) as one bf16x2 / half2 / float2.
  const bool pairs = (N % 2) == 0;  // 4- or 8-byte aligned pairs
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int n = n0 + wn + nt * 8 + 2 * t;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr) {
      if (n < N) b0 = load_float(bias, bt, n);
      if (n + 1 < N) b1 = load_float(bias, bt, n + 1);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm + mt * 16 + grp + 8 * h;
        if (m >= M || n >= N) continue;
        const float y0 = acc[mt][nt][2 * h] + b0, y1 = acc[mt][nt][2 * h + 1] + b1;
        const int64_t o = static_cast<int64_t>(m) * N + n;
        if (pairs) {
          switch (ot) {
            case DType::F32: *reinterpret_cast<float2*>(static_cast<float*>(out) + o) = make_float2(y0, y1); break;
            case DType::F16: *reinterpret_cast<__half2*>(static_cast<__half*>(out) + o) = __floats2half2_rn(y0, y1); break;
            default:
              *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + o) = __floats2bfloat162_rn(y0, y1);
          }
        } else {
          for (int j = 0; j < 2 && n + j < N; ++j) {
            const float y = j ? y1 : y0;
            switch (ot) {
              case DType::F32: static_cast<float*>(out)[o + j] = y; break;
              case DType::F16: static_cast<__half*>(out)[o + j] = __float2half_rn(y); break;
              default: static_cast<__nv_bfloat16*>(out)[o + j] = __float2bfloat16_rn(y);
            }
          }
        }
      }
  }
}

// Grouped CTA order: kGroupTilesM tile rows advance along N together, so a wave of CTAs reads each weight
// tile from DRAM about once per kGroupTilesM tile rows instead of once per tile row.
struct TileCoords {
  int m0, n0, wm, wn;
};
__device__ __forceinline__ TileCoords tile_coords(int block, int warp, int M, int N) {
  const int tiles_m = (M + kBM - 1) / kBM, tiles_n = (N + kBN - 1) / kBN;
  const int per_group = kGroupTilesM * tiles_n;
  const int first_m = (block / per_group) * kGroupTilesM;
  const int rows_here = min(tiles_m - first_m, kGroupTilesM);
  const int tile_m = first_m + (block % per_group) % rows_here;
  const int tile_n = (block % per_group) / rows_here;
  return {tile_m * kBM, tile_n * kBN, (warp / kWarpsN) * kWM, (warp % kWarpsN) * kWN};
}

// %tid.x / %ctaid.x read again after the main loop: recomputing the epilogue's coordinates is cheaper than
// keeping them in registers (or spilling them) across the loop that needs all 255.
__device__ __forceinline__ int reread_tid() {
  int v;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  return v;
}
__device__ __forceinline__ int reread_ctaid() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  return v;
}

template <bool kUnsigned>
__global__ void __launch_bounds__(kThreads, 1) w4a4_gemm_kernel(
    const uint8_t* __restrict__ qx, const float* __restrict__ ascales, int as_m, int as_g,
    const uint8_t* __restrict__ qw, const float* __restrict__ wscales, int ws_n, int ws_g,
    const float* __restrict__ lora_act, const __nv_bfloat16* __restrict__ up_hi,
    const __nv_bfloat16* __restrict__ up_lo, const void* __restrict__ bias, DType bt, void* __restrict__ out,
    DType ot, int M, int N, int K, int R) {
  extern __shared__ __align__(16) uint8_t smem[];
  const uint32_t smem0 = smem_addr(smem);
  constexpr int kSaOff = (kBM + kBN) * kGroupBytes, kSwOff = kSaOff + kThreads * 8;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int grp = lane / 4, t = lane % 4;
  const TileCoords tc = tile_coords(blockIdx.x, warp, M, N);
  const int m0 = tc.m0, n0 = tc.n0, wm = tc.wm, wn = tc.wn;
  const int groups = K / kGroup;
  const int64_t row_bytes = K / 2;

  // This thread's cp.async sources as 32-bit offsets from the tensors' bases (the host checks M K / 2 and
  // N K / 2 < 2^31; 64-bit pointers per load would cost registers the accumulators need).
  constexpr int kALoads = (2 * kBM + kThreads - 1) / kThreads, kBLoads = (2 * kBN + kThreads - 1) / kThreads;
  static_assert(kThreads % 16 == 0, "load i + 1 is 8 * (kThreads / 16) rows below load i: same swizzle bit");
  // Load i of this thread: chunk tid + i kThreads = row tid / 2 + i kThreads / 2, half tid % 2.
  const int ld_dst = swz(tid / 2, tid % 2);  // + i * (kThreads / 2) * 32 for load i; B adds kBM * 32
  int a_src[kALoads], b_src[kBLoads];
  bool a_ok[kALoads], b_ok[kBLoads];
#pragma unroll
  for (int i = 0; i < kALoads; ++i) {
    const int m = m0 + tid / 2 + i * (kThreads / 2);
    a_ok[i] = m < M;
    a_src[i] = (a_ok[i] ? m : 0) * static_cast<int>(row_bytes) + 16 * (tid % 2);
  }
#pragma unroll
  for (int i = 0; i < kBLoads; ++i) {
    const int n = n0 + tid / 2 + i * (kThreads / 2);
    b_ok[i] = n < N;
    b_src[i] = (b_ok[i] ? n : 0) * static_cast<int>(row_bytes) + 16 * (tid % 2);
  }
  // Scales: one fp32 per thread (A rows) and per thread < kBN (B columns), any strides (32-bit offsets);
  // group-major [M, G] / [N, G] (strides (1, M) / (1, N)) make each group's loads one coalesced row.
  const bool sa_ok = tid < kBM && m0 + tid < M, sw_ok = tid < kBN && n0 + tid < N;
  const int sa_src = sa_ok ? (m0 + tid) * as_m : 0;
  const float* sw_row = wscales + (sw_ok ? (n0 + tid) * ws_n : 0);  // + g ws_g: one wide IMAD per group
  // Activation scales do not go through cp.async: thread tid < kBM loads its row's scale one group ahead
  // into a register (a whole iteration to land), then rounds it and stores (sa22, -magic sa22) into the
  // stage two groups ahead of the one being read (free since the previous barrier, read after two more).
  auto load_sa = [&](int g) { return sa_ok ? ascales[sa_src + g * as_g] : 0.f; };
  auto store_sa = [&](int g, float v) {
    const float s22 = round_to_22_bits(v);
    *reinterpret_cast<float2*>(smem + (g % kStages) * kStageBytes + kSaOff + 8 * tid) = make_float2(s22, -kMagic * s22);
  };

  auto load_stage = [&](int g) {
    const uint32_t base = smem0 + (g % kStages) * kStageBytes + ld_dst;
#pragma unroll
    for (int i = 0; i < kALoads; ++i)  // 16-byte chunk tid + i kThreads of 2 kBM
      if ((i + 1) * kThreads <= 2 * kBM || tid + i * kThreads < 2 * kBM)
        cp_async_16(base + i * (kThreads / 2) * kGroupBytes, qx + a_src[i] + g * kGroupBytes, a_ok[i]);
#pragma unroll
    for (int i = 0; i < kBLoads; ++i)
      if ((i + 1) * kThreads <= 2 * kBN || tid + i * kThreads < 2 * kBN)
        cp_async_16(base + (kBM + i * (kThreads / 2)) * kGroupBytes, qw + b_src[i] + g * kGroupBytes, b_ok[i]);
    const uint32_t sbase = smem0 + (g % kStages) * kStageBytes + 4 * tid;
    cp_async_4(sbase + kSwOff, sw_row + g * ws_g, sw_ok);  // zero-fill for columns past N and tid >= kBN
  };

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ldmatrix row addresses (within a stage): A rows wm + 16 mt + lane % 16, half lane / 16; B rows
  // wn + 16 j + 8 (lane / 16) + lane % 8, half (lane / 8) % 2, giving n tiles 2j and 2j + 1. wm, wn and 16 mt
  // are multiples of 16, so the swizzle bit (row bit 2) is the lane's and mt, j add constant offsets.
  const int a_ld = swz(wm + lane % 16, lane / 16);
  const int b_ld = kBM * kGroupBytes + swz(wn + (lane / 16) * 8 + lane % 8, (lane / 8) % 2);

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < groups) load_stage(s);
    cp_async_commit();
  }
  float sa_next = 0.f;  // this thread's activation scale of group g + kStages - 2, in flight
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s)
    if (s < groups) store_sa(s, load_sa(s));
  if (kStages - 2 < groups) sa_next = load_sa(kStages - 2);

  for (int g = 0; g < groups; ++g) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage g is visible to all; stage g - 1 is free to overwrite
    if (g + kStages - 1 < groups) load_stage(g + kStages - 1);
    cp_async_commit();
    // (unconditional: past the last group it fills a stage nobody reads; threads >= kBM store zeros)
    store_sa(g + kStages - 2, sa_next);
    if (g + kStages - 1 < groups) sa_next = load_sa(g + kStages - 1);

    const uint32_t base = smem0 + (g % kStages) * kStageBytes;
    const uint8_t* stage = smem + (g % kStages) * kStageBytes;
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], base + a_ld + mt * 16 * kGroupBytes);
    const float2* sa_s = reinterpret_cast<const float2*>(stage + kSaOff);  // (sa22, -magic sa22) per row
    const float* sw_s = reinterpret_cast<const float*>(stage + kSwOff);
    float2 sa[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) sa[mt][0] = sa_s[wm + mt * 16 + grp], sa[mt][1] = sa_s[wm + mt * 16 + grp + 8];

#pragma unroll
    for (int j = 0; j < kNT / 2; ++j) {  // two n8 tiles per ldmatrix.x4: (b0, b1) of 2j, then of 2j + 1
      uint32_t b[4];
      ldmatrix_x4(b, base + b_ld + j * 16 * kGroupBytes);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int nt = 2 * j + h;
        const float2 sw = *reinterpret_cast<const float2*>(sw_s + wn + nt * 8 + 2 * t);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          int d[4];
          mma_s4_magic<kUnsigned>(d, a[mt], b[2 * h], b[2 * h + 1]);
          // RN(c * sa22) in one FFMA (the magic offset cancels exactly), then * sw + acc in one more:
          // the reference's product order with sa rounded to 22 bits.
          acc[mt][nt][0] = fmaf(fmaf(__int_as_float(d[0]), sa[mt][0].x, sa[mt][0].y), sw.x, acc[mt][nt][0]);
          acc[mt][nt][1] = fmaf(fmaf(__int_as_float(d[1]), sa[mt][0].x, sa[mt][0].y), sw.y, acc[mt][nt][1]);
          acc[mt][nt][2] = fmaf(fmaf(__int_as_float(d[2]), sa[mt][1].x, sa[mt][1].y), sw.x, acc[mt][nt][2]);
          acc[mt][nt][3] = fmaf(fmaf(__int_as_float(d[3]), sa[mt][1].x, sa[mt][1].y), sw.y, acc[mt][nt][3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  {
    const int tid2 = reread_tid(), lane2 = tid2 % 32;
    const TileCoords tc2 = tile_coords(reread_ctaid(), tid2 / 32, M, N);
    epilogue(acc, tc2.m0, tc2.n0, tc2.wm, tc2.wn, lane2 / 4, lane2 % 4, lora_act, up_hi, up_lo, bias, bt, out, ot,
             M, N, R);
  }
}

template <typename T>
cudaError_t launch_quantize(const void* x, const void* smooth, DType st, const __nv_bfloat16* down_hi,
                            const __nv_bfloat16* down_lo, uint8_t* qx, float* ascales, float* lora_act, int M,
                            int K, int R, float shift, bool is_unsigned, cudaStream_t stream) {
  const dim3 grid((M + kQRows - 1) / kQRows), block(32 * kQWarps);
  const T* xt = static_cast<const T*>(x);
  if (R <= 32)
    quantize_act_kernel<T, 4><<<grid, block, 0, stream>>>(xt, smooth, st, down_hi, down_lo, qx, ascales, lora_act,
                                                           M, K, R, shift, is_unsigned);
  else
    quantize_act_kernel<T, 8><<<grid, block, 0, stream>>>(xt, smooth, st, down_hi, down_lo, qx, ascales, lora_act,
                                                           M, K, R, shift, is_unsigned);
  return cudaGetLastError();
}

}  // namespace

cudaError_t quantize_act(const void* x, DType xt, const void* smooth, DType st, const __nv_bfloat16* down_hi,
                         const __nv_bfloat16* down_lo, uint8_t* qx, float* ascales, float* lora_act, int M, int K,
                         int R, float shift, bool is_unsigned, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (K % kGroup != 0) return cudaErrorInvalidValue;
  switch (xt) {
    case DType::F32:
      return launch_quantize<float>(x, smooth, st, down_hi, down_lo, qx, ascales, lora_act, M, K, R, shift,
                                    is_unsigned, stream);
    case DType::F16:
      return launch_quantize<__half>(x, smooth, st, down_hi, down_lo, qx, ascales, lora_act, M, K, R, shift,
                                     is_unsigned, stream);
    default:
      return launch_quantize<__nv_bfloat16>(x, smooth, st, down_hi, down_lo, qx, ascales, lora_act, M, K, R, shift,
                                            is_unsigned, stream);
  }
}

cudaError_t w4a4_gemm(const uint8_t* qx, const float* ascales, int64_t as_m, int64_t as_g, const uint8_t* qweight,
                      const float* wscales, int64_t ws_n, int64_t ws_g, const float* lora_act,
                      const __nv_bfloat16* up_hi, const __nv_bfloat16* up_lo, const void* bias, DType bt, void* out,
                      DType ot, int M, int N, int K, int R, bool is_unsigned, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % kGroup != 0) return cudaErrorInvalidValue;
  // 32-bit offsets inside the kernel (ops.cpp reports these limits with a clear message)
  const int64_t lim = int64_t{1} << 31;
  if (int64_t{M} * K / 2 >= lim || int64_t{N} * K / 2 >= lim) return cudaErrorInvalidValue;
  if ((M + kBM) * (as_m < 0 ? -as_m : as_m) + (K / kGroup) * (as_g < 0 ? -as_g : as_g) >= lim) return cudaErrorInvalidValue;
  if ((N + kBN) * (ws_n < 0 ? -ws_n : ws_n) + (K / kGroup) * (ws_g < 0 ? -ws_g : ws_g) >= lim) return cudaErrorInvalidValue;
  const int tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  auto kernel = is_unsigned ? w4a4_gemm_kernel<true> : w4a4_gemm_kernel<false>;
  // More than 48 KB of dynamic shared memory needs an opt-in, once per kernel and device (not a stream
  // operation, but done once so that launches inside a CUDA-graph capture make no other API call).
  static std::atomic<uint64_t> opted_in[2];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (device % 64);
  if ((opted_in[is_unsigned].load() & bit) == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
    opted_in[is_unsigned].fetch_or(bit);
  }
  kernel<<<tiles, kThreads, kSmemBytes, stream>>>(qx, ascales, static_cast<int>(as_m), static_cast<int>(as_g), qweight, wscales, static_cast<int>(ws_n),
                                                  static_cast<int>(ws_g), lora_act, up_hi, up_lo, bias, bt, out, ot, M, N, K, R);
  return cudaGetLastError();
}

}  // namespace svdq
