// SVDQuant activation quantization (svdq::quantize_act, see kernels.h): smoothing, 4-bit codes with group-major
// scales, and the low-rank down-projection on bf16 tensor cores. Deterministic: every output is owned by one
// thread and summed in a fixed order (the warps' low-rank partials are added in warp order); no atomics.
//
// The tile parameters below are read by scripts/kernel_model.py (keep them `constexpr int kName = value;`).
#include "fragments.cuh"
#include "kernels.h"

namespace svdq {
namespace {

// --- quantize_act configuration -------------------------------------------------------------------------
// 32 rows (two m16 tiles) per CTA, 4 warps splitting the groups round-robin; lane (g, t) of a warp owns
// rows g and g + 8 of each m16 tile and channels 16t .. 16t + 15 of the group (two 16-byte loads per row).
constexpr int kQRows = 32;
constexpr int kQWarps = 4;

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

}  // namespace svdq
