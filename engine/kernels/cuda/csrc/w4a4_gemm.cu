// SVDQuant W4A4 GEMM (svdq::w4a4_gemm, see kernels.h): int4 tensor-core MMA over the packed codes, the low-rank
// up-projection, bias and (optionally) the block's gate multiply and residual add fused into the epilogue. Deterministic: every output is owned by one thread and summed
// in a fixed order; no atomics.
//
// The tile parameters below are read by scripts/kernel_model.py (keep them `constexpr int kName = value;`).
#include <atomic>
#include <type_traits>

#include "fragments.cuh"
#include "kernels.h"

namespace svdq {
namespace {

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

// ---------------------------------------------------------------------------------------------------------
// w4a4_gemm. Shared memory per stage: A codes [kBM][32 B], B codes [kBN][32 B] (each 32-byte row holds its
// two 16-byte halves swapped on rows with bit 2 set, so the 8 rows of one ldmatrix hit 32 distinct banks),
// then the stage's ascales [kBM] and wscales [kBN] as fp32. ldmatrix from the plain layout gives
// mma.m16n8k64's fragments: a 16-byte matrix row is 32 nibbles and lane t receives bytes 4(t%4)..+3 of row
// t/4 (tests/test_cuda_tile.py emulates this from the PTX ISA).
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ int swz(int row, int half) { return row * kGroupBytes + 16 * (half ^ ((row >> 2) & 1)); }

// fp32 v rounded to T and back (round to nearest even), as torch stores a 16-bit op's result.
__device__ __forceinline__ float round_to(float v, float) { return v; }
__device__ __forceinline__ float round_to(float v, __half) { return __half2float(__float2half_rn(v)); }
__device__ __forceinline__ float round_to(float v, __nv_bfloat16) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The partial/gate/residual epilogue on this thread's accumulators (bias included), before the store's rounding
// to T: y += partial, then residual + rnd(gate[m / rows_per_gate] * rnd(y)) (w4a4_gemm's contract: diffusers'
// roundings; for fp32 outputs one FFMA may take the product and the sum, as the contract allows). Either part
// may be absent (null). Row wm0 + 16 mt + 8 h, column wn0 + 8 nt. (Pair loads and pair conversions compiled
// to more SASS than these scalar ones: 8080 against 6608 instructions outside the loop on sm_86.)
template <typename T>
__device__ __forceinline__ void partial_gate_residual(float (&acc)[kMT][kNT][4], int wm0, int wn0,
                                                      const void* partial, const void* residual, const void* gate,
                                                      int rows_per_gate, int M, int N) {
  const T* part = static_cast<const T*>(partial);
  const T* res = static_cast<const T*>(residual);
  const T* gt = static_cast<const T*>(gate);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = wm0 + mt * 16 + 8 * h;
      if (m >= M) continue;
      const int64_t row = static_cast<int64_t>(m) * N, grow = static_cast<int64_t>(m / rows_per_gate) * N;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n = wn0 + nt * 8 + j;
          if (n >= N) continue;
          float& y = acc[mt][nt][2 * h + j];
          if (part != nullptr) y += to_float(part[row + n]);
          if (res != nullptr) y = to_float(res[row + n]) + round_to(to_float(gt[grow + n]) * round_to(y, T{}), T{});
        }
    }
}

// Low-rank branch on bf16 tensor cores into the same fp32 accumulators: lora_act (fp32) as hi + lo bf16,
// proj_up as bf16 (plus its residual when the host split a wider dtype); k runs over R in steps of 16.
// One m16 tile at a time keeps the live fragments small next to the 128 accumulators.
// Then bias, and packed stores: each thread writes (c0, c1) and (c2, c3) as one bf16x2 / half2 / float2.
// TExtras (float, __half or __nv_bfloat16: the output's type) compiles the partial/gate/residual epilogue in for
// that type alone; void leaves it out. One kernel instance each: the plain GEMM carries none of its code, and an
// epilogue instance only its own dtype's.
template <typename TExtras>
__device__ __forceinline__ void epilogue(float (&acc)[kMT][kNT][4], int m0, int n0, int wm, int wn, int grp, int t,
                                         const float* __restrict__ lora_act, const __nv_bfloat16* __restrict__ up_hi,
                                         const __nv_bfloat16* __restrict__ up_lo, const void* __restrict__ bias,
                                         DType bt, void* __restrict__ out, DType ot, const void* __restrict__ partial,
                                         const void* __restrict__ residual, const void* __restrict__ gate,
                                         int rows_per_gate, int M, int N, int R) {
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

  // Bias into the accumulators; then the gate/residual epilogue (one loop per output dtype, chosen once); then
  // packed stores: each thread writes (c0, c1) and (c2, c3) as one bf16x2 / half2 / float2.
  if (bias != nullptr) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int n = n0 + wn + nt * 8 + 2 * t;
      const float b0 = n < N ? load_float(bias, bt, n) : 0.f, b1 = n + 1 < N ? load_float(bias, bt, n + 1) : 0.f;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] += e % 2 ? b1 : b0;
    }
  }
  if constexpr (!std::is_void_v<TExtras>)
    partial_gate_residual<TExtras>(acc, m0 + wm + grp, n0 + wn + 2 * t, partial, residual, gate, rows_per_gate, M, N);
  const bool pairs = (N % 2) == 0;  // 4- or 8-byte aligned pairs
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int n = n0 + wn + nt * 8 + 2 * t;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm + mt * 16 + grp + 8 * h;
        if (m >= M || n >= N) continue;
        const float y0 = acc[mt][nt][2 * h], y1 = acc[mt][nt][2 * h + 1];
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

template <bool kUnsigned, typename TExtras>
__global__ void __launch_bounds__(kThreads, 1) w4a4_gemm_kernel(
    const uint8_t* __restrict__ qx, const float* __restrict__ ascales, int as_m, int as_g,
    const uint8_t* __restrict__ qw, const float* __restrict__ wscales, int ws_n, int ws_g,
    const float* __restrict__ lora_act, const __nv_bfloat16* __restrict__ up_hi,
    const __nv_bfloat16* __restrict__ up_lo, const void* __restrict__ bias, DType bt, void* __restrict__ out,
    DType ot, const void* __restrict__ partial, const void* __restrict__ residual, const void* __restrict__ gate,
    int rows_per_gate, int M, int N, int K, int R) {
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
    epilogue<TExtras>(acc, tc2.m0, tc2.n0, tc2.wm, tc2.wn, lane2 / 4, lane2 % 4, lora_act, up_hi, up_lo, bias, bt, out, ot,
             partial, residual, gate, rows_per_gate, M, N, R);
  }
}

// The kernel instance of a call: without the epilogue, or with it for the output's dtype.
template <bool kUnsigned>
auto gemm_instance(bool extras, DType ot) {
  if (!extras) return w4a4_gemm_kernel<kUnsigned, void>;
  switch (ot) {
    case DType::F32: return w4a4_gemm_kernel<kUnsigned, float>;
    case DType::F16: return w4a4_gemm_kernel<kUnsigned, __half>;
    default: return w4a4_gemm_kernel<kUnsigned, __nv_bfloat16>;
  }
}

}  // namespace

cudaError_t w4a4_gemm(const uint8_t* qx, const float* ascales, int64_t as_m, int64_t as_g, const uint8_t* qweight,
                      const float* wscales, int64_t ws_n, int64_t ws_g, const float* lora_act,
                      const __nv_bfloat16* up_hi, const __nv_bfloat16* up_lo, const void* bias, DType bt, void* out,
                      DType ot, const void* partial, const void* residual, const void* gate, int rows_per_gate, int M,
                      int N, int K, int R, bool is_unsigned, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % kGroup != 0) return cudaErrorInvalidValue;
  if (residual != nullptr && (gate == nullptr || rows_per_gate <= 0 || M % rows_per_gate != 0)) return cudaErrorInvalidValue;
  // 32-bit offsets inside the kernel (ops.cpp reports these limits with a clear message)
  const int64_t lim = int64_t{1} << 31;
  if (int64_t{M} * K / 2 >= lim || int64_t{N} * K / 2 >= lim) return cudaErrorInvalidValue;
  if ((M + kBM) * (as_m < 0 ? -as_m : as_m) + (K / kGroup) * (as_g < 0 ? -as_g : as_g) >= lim) return cudaErrorInvalidValue;
  if ((N + kBN) * (ws_n < 0 ? -ws_n : ws_n) + (K / kGroup) * (ws_g < 0 ? -ws_g : ws_g) >= lim) return cudaErrorInvalidValue;
  const int tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  const bool extras = partial != nullptr || residual != nullptr;
  auto kernel = is_unsigned ? gemm_instance<true>(extras, ot) : gemm_instance<false>(extras, ot);
  const int instance = 4 * is_unsigned + (extras ? 1 + static_cast<int>(ot) : 0);
  // More than 48 KB of dynamic shared memory needs an opt-in, once per kernel and device (not a stream
  // operation, but done once so that launches inside a CUDA-graph capture make no other API call).
  static std::atomic<uint64_t> opted_in[8];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (device % 64);
  if ((opted_in[instance].load() & bit) == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
    opted_in[instance].fetch_or(bit);
  }
  kernel<<<tiles, kThreads, kSmemBytes, stream>>>(qx, ascales, static_cast<int>(as_m), static_cast<int>(as_g), qweight, wscales, static_cast<int>(ws_n),
                                                  static_cast<int>(ws_g), lora_act, up_hi, up_lo, bias, bt, out, ot, partial, residual, gate,
                                                  rows_per_gate, M, N, K, R);
  return cudaGetLastError();
}

}  // namespace svdq
