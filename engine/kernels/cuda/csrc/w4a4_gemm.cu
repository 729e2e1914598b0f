// SVDQuant W4A4 GEMM (svdq::w4a4_gemm, see kernels.h): int4 tensor-core MMA over the packed codes, the low-rank
// up-projection, bias and (optionally) the block's gate multiply and residual add fused into the epilogue. Deterministic: every output is owned by one thread and summed
// in a fixed order; no atomics. One kernel instance per activation code, output dtype, epilogue and CTA tile, so that the
// code outside the main loop (once per tile, issue-bound) holds only the path a launch takes
// (tests/test_cuda_static.py caps it per instance).
//
// The tile parameters below are read by scripts/kernel_model.py (keep them `constexpr int kName = value;`).
#include <atomic>

#include "fragments.cuh"
#include "kernels.h"

namespace svdq {
namespace {

// --- w4a4_gemm configuration ---------------------------------------------------------------------------
// Two CTA tiles, one kernel body (w4a4_gemm_kernel<..., kTileM>, the tile's constants in Tile<kTileM>); both
// use the same 64 x 32 warp tile = 4 x 4 mma.m16n8k64 per 64-channel group, so the main loop's per-warp code
// is the same, and the same 4-stage cp.async pipeline (one group per stage, one barrier per group).
// Large: 192 x 128 (M x N), 12 warps as 3 x 4 (154 MACs per byte brought in). Designed occupancy: 1 CTA
// (12 warps) per SM: <= 168 registers (65536 / 384), no spills, 58 KB of shared memory (kSmemBytes; the rest
// of the SM's 128 KB is L1 for the scales read through it). 256 x 128 with 8 warps needs 64 x 64 warp tiles,
// 128 fp32 accumulators per thread plus the per-group conversion temporaries: ptxas spills it at 255 registers.
// Small: 128 x 128, 8 warps as 2 x 4, 1 CTA per SM (2 would need <= 128 registers), for M <= kSmallMaxM: the
// text stream's GEMMs (M = 256) fill two 128-row tile rows where they left two thirds of the second 192-row one
// empty. The host takes it for M <= 384: scripts/kernel_model.py models it 18-33% faster than the large tile
// on FLUX's text-stream shapes at every M up to 384; above, its modelled advantage alternates in sign with the
// wave count (-26% .. +19%), within what the model leaves out (the small tile's 20% more L2 bytes per MAC, 8
// warps to hide latency instead of 12), so the large tile stays.
// The constants in this namespace are read by scripts/kernel_model.py and tests (keep them
// `constexpr int kName = value;`); the kernel reads them through Tile<kTileM> only.
namespace cfg {
constexpr int kBM = 192;
constexpr int kBN = 128;
constexpr int kWarpsM = 3;
constexpr int kWarpsN = 4;
constexpr int kStages = 4;
constexpr int kGroupTilesM = 8;  // swizzled CTA order: 8 tile rows sweep N together (weights stay in L2)
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
// codes, then (sa22, -magic sa22) and wscales, one slot per thread (rows tid < kBM and columns tid < kBN are
// read; the rest is padding that lets every thread store or copy without a branch)
constexpr int kStageBytes = (kBM + kBN) * kGroupBytes + kThreads * (8 + 4);
constexpr int kSmemBytes = kStages * kStageBytes;
constexpr int kSmallBM = 128;
constexpr int kSmallWarpsM = 2;
constexpr int kSmallMaxM = 384;  // the host's threshold: M <= kSmallMaxM takes the small tile
constexpr int kSmallThreads = 32 * kSmallWarpsM * kWarpsN;
constexpr int kSmallStageBytes = (kSmallBM + kBN) * kGroupBytes + kSmallThreads * (8 + 4);
constexpr int kSmallSmemBytes = kStages * kSmallStageBytes;
}  // namespace cfg
// the epilogue's low-rank passes of kLrChunk ranks (see stage_low_rank)
constexpr int kLrChunk = 32;
constexpr int kLrRowBytes = 2 * kLrChunk;

// One CTA tile's constants (kTileM = cfg::kBM or cfg::kSmallBM rows).
template <int kTileM>
struct Tile {
  static_assert(kTileM == cfg::kBM || kTileM == cfg::kSmallBM, "one of the two tiles");
  static constexpr int kBM = kTileM, kBN = cfg::kBN, kWarpsN = cfg::kWarpsN, kStages = cfg::kStages;
  static constexpr int kWarpsM = kTileM == cfg::kBM ? cfg::kWarpsM : cfg::kSmallWarpsM;
  static constexpr int kGroupTilesM = cfg::kGroupTilesM;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // warp tile
  static constexpr int kMT = kWM / 16, kNT = kWN / 8;               // m16 and n8 tiles per warp
  static constexpr int kStageBytes = (kBM + kBN) * kGroupBytes + kThreads * (8 + 4);
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kNT % 2 == 0 && kBM <= kThreads && kBN <= kThreads, "tile shape");
  // The epilogue reuses the pipeline's shared memory (free once the main loop is done): the low-rank operands
  // of one pass of kLrChunk ranks, staged by the whole CTA with 16-byte loads, as bf16 [row][kLrChunk]:
  // lora_act's hi and lo halves (kBM rows), proj_up's hi and lo (kBN rows); then the tile's bias as fp32 [kBN].
  static constexpr int kLrAhi = 0, kLrAlo = kBM * kLrRowBytes, kLrBhi = 2 * kBM * kLrRowBytes;
  static constexpr int kLrBlo = kLrBhi + kBN * kLrRowBytes, kBiasOff = kLrBlo + kBN * kLrRowBytes;
  static_assert(kBiasOff + 4 * kBN <= kSmemBytes, "the epilogue's operands fit in the pipeline's shared memory");
  static_assert(kLrChunk == 32 && kBM * kLrChunk % (4 * kThreads) == 0,
                "lora_act staging: 4 float4 per thread");
};
static_assert(Tile<cfg::kBM>::kThreads == cfg::kThreads && Tile<cfg::kBM>::kSmemBytes == cfg::kSmemBytes, "large");
static_assert(Tile<cfg::kSmallBM>::kThreads == cfg::kSmallThreads &&
                  Tile<cfg::kSmallBM>::kSmemBytes == cfg::kSmallSmemBytes &&
                  Tile<cfg::kSmallBM>::kWM == Tile<cfg::kBM>::kWM && Tile<cfg::kSmallBM>::kWN == Tile<cfg::kBM>::kWN,
              "small: the large tile's warp tile");

// ---------------------------------------------------------------------------------------------------------
// w4a4_gemm. Shared memory per stage: A codes [kBM][32 B], B codes [kBN][32 B] (each 32-byte row holds its
// two 16-byte halves swapped on rows with bit 2 set, so the 8 rows of one ldmatrix hit 32 distinct banks),
// then the stage's ascales [kBM] and wscales [kBN] as fp32. ldmatrix from the plain layout gives
// mma.m16n8k64's fragments: a 16-byte matrix row is 32 nibbles and lane t receives bytes 4(t%4)..+3 of row
// t/4 (tests/test_cuda_tile.py emulates this from the PTX ISA).
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ int swz(int row, int half) { return row * kGroupBytes + 16 * (half ^ ((row >> 2) & 1)); }

// (y0, y1) rounded to T (nearest even) as one 8- or 4-byte store to an aligned pair.
__device__ __forceinline__ void store2(float* p, float y0, float y1) { *reinterpret_cast<float2*>(p) = make_float2(y0, y1); }
__device__ __forceinline__ void store2(__half* p, float y0, float y1) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(y0, y1); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float y0, float y1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(y0, y1);
}

// (y0, y1) rounded to T (nearest even) and back, as torch stores a 16-bit op's result (one pack, two unpacks).
__device__ __forceinline__ float2 round2(float2 v, float) { return v; }
__device__ __forceinline__ float2 round2(float2 v, __half) { return __half22float2(__floats2half2_rn(v.x, v.y)); }
__device__ __forceinline__ float2 round2(float2 v, __nv_bfloat16) {
  return __bfloat1622float2(__floats2bfloat162_rn(v.x, v.y));
}
// An aligned pair of T as fp32.
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

// The partial/gate/residual epilogue on this thread's accumulators (bias included), before the store's rounding
// to T: y += partial, then residual + rnd(gate[m / rows_per_gate] * rnd(y)) (w4a4_gemm's contract: diffusers'
// roundings; for fp32 outputs one FFMA may take the product and the sum, as the contract allows). Either part
// may be absent (null): one uniform branch around each part's loop, not one per element. partial, residual and
// gate rows are ld elements apart (ld even: the host pads odd N), so each (c0, c1) / (c2, c3) is one aligned pair
// load. Row wm0 + 16 mt + 8 h, column wn0 + 8 nt.
template <class C, typename T>
__device__ __forceinline__ void partial_gate_residual(float (&acc)[C::kMT][C::kNT][4], int wm0, int wn0,
                                                      const void* partial, const void* residual, const void* gate,
                                                      int rows_per_gate, int M, int N, int ld) {
  const T* part = static_cast<const T*>(partial);
  const T* res = static_cast<const T*>(residual);
  const T* gt = static_cast<const T*>(gate);
  if (part != nullptr) {
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = wm0 + mt * 16 + 8 * h;
        if (m >= M) continue;
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt) {
          const int n = wn0 + nt * 8;
          if (n >= N) continue;
          const float2 v = load2(part + static_cast<int64_t>(m) * ld + n);
          acc[mt][nt][2 * h] += v.x;
          acc[mt][nt][2 * h + 1] += v.y;
        }
      }
  }
  if (res != nullptr) {
    // gate row of row m = m / rows_per_gate, from one division: this thread's rows rise by 8 at a time
    int q = wm0 / rows_per_gate, rem = wm0 - q * rows_per_gate;
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = wm0 + mt * 16 + 8 * h;
        if (m < M) {
          const T* rrow = res + static_cast<int64_t>(m) * ld;
          const T* grow = gt + static_cast<int64_t>(q) * ld;
#pragma unroll
          for (int nt = 0; nt < C::kNT; ++nt) {
            const int n = wn0 + nt * 8;
            if (n >= N) continue;
            const float2 r = load2(rrow + n), g = load2(grow + n);
            const float2 y = round2(make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]), T{});
            const float2 p = round2(make_float2(g.x * y.x, g.y * y.y), T{});
            acc[mt][nt][2 * h] = r.x + p.x;
            acc[mt][nt][2 * h + 1] = r.y + p.y;
          }
        }
        for (rem += 8; rem >= rows_per_gate; rem -= rows_per_gate) ++q;
      }
  }
}

// The epilogue's low-rank operands (Tile::kLrAhi ..): a 64-byte row holds four 16-byte chunks, chunk c stored at
// c ^ ((row >> 1) & 3), so the 8 rows of one ldmatrix hit 32 distinct banks.
__device__ __forceinline__ int lr_swz(int row, int chunk) { return row * kLrRowBytes + 16 * (chunk ^ ((row >> 1) & 3)); }

// Stage ranks k0 .. k0 + kLrChunk - 1 (zeros past R, M, N). `vec`: R % 8 == 0 and 16-byte aligned bases (every
// rank the model uses is a multiple of 16): whole 16-byte vectors, 4 per thread for lora_act, at most 2 per part
// for proj_up. Otherwise one element at a time in a loop kept rolled (the rare path: little code).
template <class C>
__device__ __forceinline__ void stage_low_rank(uint8_t* smem, int tid, int m0, int n0, int k0, const float* lora_act,
                                               const __nv_bfloat16* up_hi, const __nv_bfloat16* up_lo, int M,
                                               int N, int R, bool vec) {
  if (vec) {
    // lora_act: kBM rows x 8 pieces of 4 fp32, split into bf16 hi + lo (split_bf16x2: what the MMAs need)
#pragma unroll
    for (int i = 0; i < C::kBM * kLrChunk / 4 / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads, row = idx / 8, c4 = idx % 8, m = m0 + row, k = k0 + 4 * c4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (m < M && k < R) v = *reinterpret_cast<const float4*>(lora_act + static_cast<int64_t>(m) * R + k);
      uint2 hi, lo;
      split_bf16x2(v.x, v.y, hi.x, lo.x);
      split_bf16x2(v.z, v.w, hi.y, lo.y);
      const int o = lr_swz(row, c4 / 2) + 8 * (c4 % 2);
      *reinterpret_cast<uint2*>(smem + C::kLrAhi + o) = hi;
      *reinterpret_cast<uint2*>(smem + C::kLrAlo + o) = lo;
    }
    // proj_up hi (and lo): kBN rows x 4 pieces of 8 bf16
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const __nv_bfloat16* up = part ? up_lo : up_hi;
      if (up == nullptr) break;
#pragma unroll
      for (int i = 0; i < (C::kBN * 4 + C::kThreads - 1) / C::kThreads; ++i) {
        const int idx = tid + i * C::kThreads, row = idx / 4, c = idx % 4, n = n0 + row, k = k0 + 8 * c;
        if ((i + 1) * C::kThreads > C::kBN * 4 && idx >= C::kBN * 4) break;
        uint4 u = make_uint4(0u, 0u, 0u, 0u);
        if (n < N && k < R) u = *reinterpret_cast<const uint4*>(up + static_cast<int64_t>(n) * R + k);
        *reinterpret_cast<uint4*>(smem + (part ? C::kLrBlo : C::kLrBhi) + lr_swz(row, c)) = u;
      }
    }
    return;
  }
#pragma unroll 1
  for (int idx = tid; idx < C::kBM * kLrChunk; idx += C::kThreads) {
    const int row = idx / kLrChunk, c = idx % kLrChunk, m = m0 + row, k = k0 + c;
    const float v = m < M && k < R ? lora_act[static_cast<int64_t>(m) * R + k] : 0.f;
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);  // split_bf16x2, one element
    const int o = lr_swz(row, c / 8) + 2 * (c % 8);
    *reinterpret_cast<__nv_bfloat16*>(smem + C::kLrAhi + o) = hi;
    *reinterpret_cast<__nv_bfloat16*>(smem + C::kLrAlo + o) = __float2bfloat16_rn(v - __bfloat162float(hi));
  }
#pragma unroll 1
  for (int idx = tid; idx < (up_lo != nullptr ? 2 : 1) * C::kBN * kLrChunk; idx += C::kThreads) {
    const int part = idx / (C::kBN * kLrChunk), row = (idx / kLrChunk) % C::kBN, c = idx % kLrChunk, n = n0 + row;
    const uint16_t* up = reinterpret_cast<const uint16_t*>(part ? up_lo : up_hi);
    const uint16_t u = n < N && k0 + c < R ? up[static_cast<int64_t>(n) * R + k0 + c] : 0;
    *reinterpret_cast<uint16_t*>(smem + (part ? C::kLrBlo : C::kLrBhi) + lr_swz(row, c / 8) + 2 * (c % 8)) = u;
  }
}

// Low-rank branch on bf16 tensor cores into the same fp32 accumulators, from the staged operands: lora_act as
// hi + lo bf16, proj_up as bf16 (plus its residual when the host split a wider dtype); k runs over R in steps of
// 16, each step's MMAs in the order hi x hi, lo x hi, hi x lo. One m16 tile at a time keeps the live fragments
// small next to the 128 accumulators. ldmatrix.x4 gives the m16n8k16 fragments: A rows wm + 16 mt + lane % 16,
// chunk 2 ks + lane / 16; B rows wn + 16 j + 8 (lane / 16) + lane % 8, chunk 2 ks + (lane / 8) % 2 (n tiles 2j
// and 2j + 1).
template <class C>
__device__ __forceinline__ void low_rank_mma(float (&acc)[C::kMT][C::kNT][4], uint32_t smem0, int wm, int wn, int lane,
                                             int k0, int R, bool has_lo) {
#pragma unroll
  for (int ks = 0; ks < kLrChunk / 16; ++ks) {
    if (k0 + 16 * ks >= R) break;
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt) {
      uint32_t ah[4], al[4];
      const int a = lr_swz(wm + mt * 16 + lane % 16, 2 * ks + lane / 16);
      ldmatrix_x4(ah, smem0 + C::kLrAhi + a);
      ldmatrix_x4(al, smem0 + C::kLrAlo + a);
#pragma unroll
      for (int j = 0; j < C::kNT / 2; ++j) {
        const int b = lr_swz(wn + 16 * j + 8 * (lane / 16) + lane % 8, 2 * ks + (lane / 8) % 2);
        uint32_t bh[4], bl[4];  // bl: read only when has_lo (no zeroing: 16 instructions per k16 step)
        ldmatrix_x4(bh, smem0 + C::kLrBhi + b);
        if (has_lo) ldmatrix_x4(bl, smem0 + C::kLrBlo + b);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float(&c)[4] = acc[mt][2 * j + h];
          mma_bf16(c, ah, bh[2 * h], bh[2 * h + 1]);
          mma_bf16(c, al, bh[2 * h], bh[2 * h + 1]);
          if (has_lo) mma_bf16(c, ah, bl[2 * h], bl[2 * h + 1]);
        }
      }
    }
  }
}

// The tile's epilogue: the low-rank branch, bias, the partial/gate/residual epilogue when kExtras (for TOut alone),
// and packed stores: each thread writes (c0, c1) and (c2, c3) as one bf16x2 / half2 / float2 (out's rows are ldo
// elements apart, ldo even, so every pair is aligned). One kernel instance per output dtype and kExtras: the
// plain GEMM carries none of the extras' code, and no instance a dtype switch per element.
template <class C, typename TOut, bool kExtras>
__device__ __forceinline__ void epilogue(float (&acc)[C::kMT][C::kNT][4], uint8_t* smem, int tid, int m0, int n0, int wm,
                                         int wn, const float* __restrict__ lora_act,
                                         const __nv_bfloat16* __restrict__ up_hi,
                                         const __nv_bfloat16* __restrict__ up_lo, const void* __restrict__ bias,
                                         DType bt, TOut* __restrict__ out, int ldo, const void* __restrict__ partial,
                                         const void* __restrict__ residual, const void* __restrict__ gate,
                                         int rows_per_gate, int M, int N, int R) {
  __builtin_assume(tid >= 0 && tid < C::kThreads);  // (reread by inline asm: lets / and % by 2^k be shifts and masks)
  const int lane = tid % 32, grp = lane / 4, t = lane % 4;
  const uint32_t smem0 = smem_addr(smem);
  const bool vec = R % 8 == 0 && ((reinterpret_cast<uintptr_t>(lora_act) | reinterpret_cast<uintptr_t>(up_hi) |
                                   reinterpret_cast<uintptr_t>(up_lo)) % 16) == 0;
  __syncthreads();  // every warp is done with the pipeline's stages
  if (bias != nullptr && tid < C::kBN)
    reinterpret_cast<float*>(smem + C::kBiasOff)[tid] = n0 + tid < N ? load_float(bias, bt, n0 + tid) : 0.f;
  for (int k0 = 0;; k0 += kLrChunk) {
    if (k0 < R) stage_low_rank<C>(smem, tid, m0, n0, k0, lora_act, up_hi, up_lo, M, N, R, vec);
    __syncthreads();
    if (k0 >= R) break;
    low_rank_mma<C>(acc, smem0, wm, wn, lane, k0, R, up_lo != nullptr);
    if (k0 + kLrChunk >= R) break;
    __syncthreads();  // this pass's operands are read before the next pass overwrites them
  }

  if (bias != nullptr) {
    const float* bias_s = reinterpret_cast<const float*>(smem + C::kBiasOff);
#pragma unroll
    for (int nt = 0; nt < C::kNT; ++nt) {
      const float2 b = *reinterpret_cast<const float2*>(bias_s + wn + nt * 8 + 2 * t);
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] += e % 2 ? b.y : b.x;
    }
  }
  if constexpr (kExtras)
    partial_gate_residual<C, TOut>(acc, m0 + wm + grp, n0 + wn + 2 * t, partial, residual, gate, rows_per_gate, M, N,
                                ldo);
#pragma unroll
  for (int nt = 0; nt < C::kNT; ++nt) {
    const int n = n0 + wn + nt * 8 + 2 * t;
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm + mt * 16 + grp + 8 * h;
        if (m < M && n < N) store2(out + static_cast<int64_t>(m) * ldo + n, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
      }
  }
}

// Grouped CTA order: kGroupTilesM tile rows advance along N together, so a wave of CTAs reads each weight
// tile from DRAM about once per kGroupTilesM tile rows instead of once per tile row.
struct TileCoords {
  int m0, n0, wm, wn;
};
template <class C>
__device__ __forceinline__ TileCoords tile_coords(int block, int warp, int M, int N) {
  const int tiles_m = (M + C::kBM - 1) / C::kBM, tiles_n = (N + C::kBN - 1) / C::kBN;
  const int per_group = C::kGroupTilesM * tiles_n;
  const int first_m = (block / per_group) * C::kGroupTilesM;
  const int rows_here = min(tiles_m - first_m, C::kGroupTilesM);
  const int tile_m = first_m + (block % per_group) % rows_here;
  const int tile_n = (block % per_group) / rows_here;
  return {tile_m * C::kBM, tile_n * C::kBN, (warp / C::kWarpsN) * C::kWM, (warp % C::kWarpsN) * C::kWN};
}

// %tid.x / %ctaid.x read again after the main loop: recomputing the epilogue's coordinates is cheaper than
// keeping them in registers (or spilling them) across the loop that needs nearly all 168 (tried: 2 more live
// registers there cost more instructions than the recomputation).
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

template <bool kUnsigned, typename TOut, bool kExtras, int kTileM>
__global__ void __launch_bounds__(Tile<kTileM>::kThreads, 1) w4a4_gemm_kernel(
    const uint8_t* __restrict__ qx, const float* __restrict__ ascales, int as_m, int as_g,
    const uint8_t* __restrict__ qw, const float* __restrict__ wscales, int ws_n, int ws_g,
    const float* __restrict__ lora_act, const __nv_bfloat16* __restrict__ up_hi,
    const __nv_bfloat16* __restrict__ up_lo, const void* __restrict__ bias, DType bt, TOut* __restrict__ out,
    int ldo, const void* __restrict__ partial, const void* __restrict__ residual, const void* __restrict__ gate,
    int rows_per_gate, int M, int N, int K, int R) {
  using C = Tile<kTileM>;
  extern __shared__ __align__(16) uint8_t smem[];
  const uint32_t smem0 = smem_addr(smem);
  constexpr int kSaOff = (C::kBM + C::kBN) * kGroupBytes, kSwOff = kSaOff + C::kThreads * 8;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int grp = lane / 4, t = lane % 4;
  const TileCoords tc = tile_coords<C>(blockIdx.x, warp, M, N);
  const int m0 = tc.m0, n0 = tc.n0, wm = tc.wm, wn = tc.wn;
  const int groups = K / kGroup;
  const int64_t row_bytes = K / 2;

  // This thread's cp.async sources as 32-bit offsets from the tensors' bases (the host checks M K / 2 and
  // N K / 2 < 2^31; 64-bit pointers per load would cost registers the accumulators need).
  constexpr int kALoads = (2 * C::kBM + C::kThreads - 1) / C::kThreads, kBLoads = (2 * C::kBN + C::kThreads - 1) / C::kThreads;
  static_assert(C::kThreads % 16 == 0, "load i + 1 is 8 * (C::kThreads / 16) rows below load i: same swizzle bit");
  // Load i of this thread: chunk tid + i kThreads = row tid / 2 + i kThreads / 2, half tid % 2.
  const int ld_dst = swz(tid / 2, tid % 2);  // + i * (kThreads / 2) * 32 for load i; B adds kBM * 32
  int a_src[kALoads], b_src[kBLoads];
  bool a_ok[kALoads], b_ok[kBLoads];
#pragma unroll
  for (int i = 0; i < kALoads; ++i) {
    const int m = m0 + tid / 2 + i * (C::kThreads / 2);
    a_ok[i] = m < M;
    a_src[i] = (a_ok[i] ? m : 0) * static_cast<int>(row_bytes) + 16 * (tid % 2);
  }
#pragma unroll
  for (int i = 0; i < kBLoads; ++i) {
    const int n = n0 + tid / 2 + i * (C::kThreads / 2);
    b_ok[i] = n < N;
    b_src[i] = (b_ok[i] ? n : 0) * static_cast<int>(row_bytes) + 16 * (tid % 2);
  }
  // Scales: one fp32 per thread (A rows) and per thread < kBN (B columns), any strides (32-bit offsets);
  // group-major [M, G] / [N, G] (strides (1, M) / (1, N)) make each group's loads one coalesced row.
  const bool sa_ok = tid < C::kBM && m0 + tid < M, sw_ok = tid < C::kBN && n0 + tid < N;
  const int sa_src = sa_ok ? (m0 + tid) * as_m : 0;
  const float* sw_row = wscales + (sw_ok ? (n0 + tid) * ws_n : 0);  // + g ws_g: one wide IMAD per group
  // Activation scales do not go through cp.async: thread tid < kBM loads its row's scale one group ahead
  // into a register (a whole iteration to land), then rounds it and stores (sa22, -magic sa22) into the
  // stage two groups ahead of the one being read (free since the previous barrier, read after two more).
  auto load_sa = [&](int g) { return sa_ok ? ascales[sa_src + g * as_g] : 0.f; };
  auto store_sa = [&](int g, float v) {
    const float s22 = round_to_22_bits(v);
    *reinterpret_cast<float2*>(smem + (g % C::kStages) * C::kStageBytes + kSaOff + 8 * tid) = make_float2(s22, -kMagic * s22);
  };

  auto load_stage = [&](int g) {
    const uint32_t base = smem0 + (g % C::kStages) * C::kStageBytes + ld_dst;
#pragma unroll
    for (int i = 0; i < kALoads; ++i)  // 16-byte chunk tid + i kThreads of 2 kBM
      if ((i + 1) * C::kThreads <= 2 * C::kBM || tid + i * C::kThreads < 2 * C::kBM)
        cp_async_16(base + i * (C::kThreads / 2) * kGroupBytes, qx + a_src[i] + g * kGroupBytes, a_ok[i]);
#pragma unroll
    for (int i = 0; i < kBLoads; ++i)
      if ((i + 1) * C::kThreads <= 2 * C::kBN || tid + i * C::kThreads < 2 * C::kBN)
        cp_async_16(base + (C::kBM + i * (C::kThreads / 2)) * kGroupBytes, qw + b_src[i] + g * kGroupBytes, b_ok[i]);
    const uint32_t sbase = smem0 + (g % C::kStages) * C::kStageBytes + 4 * tid;
    cp_async_4(sbase + kSwOff, sw_row + g * ws_g, sw_ok);  // zero-fill for columns past N and tid >= kBN
  };

  float acc[C::kMT][C::kNT][4];
#pragma unroll
  for (int i = 0; i < C::kMT; ++i)
#pragma unroll
    for (int j = 0; j < C::kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ldmatrix row addresses (within a stage): A rows wm + 16 mt + lane % 16, half lane / 16; B rows
  // wn + 16 j + 8 (lane / 16) + lane % 8, half (lane / 8) % 2, giving n tiles 2j and 2j + 1. wm, wn and 16 mt
  // are multiples of 16, so the swizzle bit (row bit 2) is the lane's and mt, j add constant offsets.
  const int a_ld = swz(wm + lane % 16, lane / 16);
  const int b_ld = C::kBM * kGroupBytes + swz(wn + (lane / 16) * 8 + lane % 8, (lane / 8) % 2);

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < groups) load_stage(s);
    cp_async_commit();
  }
  float sa_next = 0.f;  // this thread's activation scale of group g + kStages - 2, in flight
#pragma unroll
  for (int s = 0; s < C::kStages - 2; ++s)
    if (s < groups) store_sa(s, load_sa(s));
  if (C::kStages - 2 < groups) sa_next = load_sa(C::kStages - 2);

  for (int g = 0; g < groups; ++g) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage g is visible to all; stage g - 1 is free to overwrite
    if (g + C::kStages - 1 < groups) load_stage(g + C::kStages - 1);
    cp_async_commit();
    // (unconditional: past the last group it fills a stage nobody reads; threads >= kBM store zeros)
    store_sa(g + C::kStages - 2, sa_next);
    if (g + C::kStages - 1 < groups) sa_next = load_sa(g + C::kStages - 1);

    const uint32_t base = smem0 + (g % C::kStages) * C::kStageBytes;
    const uint8_t* stage = smem + (g % C::kStages) * C::kStageBytes;
    uint32_t a[C::kMT][4];
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt) ldmatrix_x4(a[mt], base + a_ld + mt * 16 * kGroupBytes);
    const float2* sa_s = reinterpret_cast<const float2*>(stage + kSaOff);  // (sa22, -magic sa22) per row
    const float* sw_s = reinterpret_cast<const float*>(stage + kSwOff);
    float2 sa[C::kMT][2];
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt) sa[mt][0] = sa_s[wm + mt * 16 + grp], sa[mt][1] = sa_s[wm + mt * 16 + grp + 8];

#pragma unroll
    for (int j = 0; j < C::kNT / 2; ++j) {  // two n8 tiles per ldmatrix.x4: (b0, b1) of 2j, then of 2j + 1
      uint32_t b[4];
      ldmatrix_x4(b, base + b_ld + j * 16 * kGroupBytes);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int nt = 2 * j + h;
        const float2 sw = *reinterpret_cast<const float2*>(sw_s + wn + nt * 8 + 2 * t);
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt) {
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
    const int tid2 = reread_tid();
    const TileCoords tc2 = tile_coords<C>(reread_ctaid(), tid2 / 32, M, N);
    epilogue<C, TOut, kExtras>(acc, smem, tid2, tc2.m0, tc2.n0, tc2.wm, tc2.wn, lora_act, up_hi, up_lo, bias, bt, out,
                            ldo, partial, residual, gate, rows_per_gate, M, N, R);
  }
}

// One instance's launch. More than 48 KB of dynamic shared memory needs an opt-in, once per kernel and device
// (not a stream operation, but done once so that launches inside a CUDA-graph capture make no other API call).
template <bool kUnsigned, typename TOut, bool kExtras, int kTileM>
cudaError_t launch(cudaStream_t stream, const uint8_t* qx, const float* ascales, int as_m, int as_g,
                   const uint8_t* qweight, const float* wscales, int ws_n, int ws_g, const float* lora_act,
                   const __nv_bfloat16* up_hi, const __nv_bfloat16* up_lo, const void* bias, DType bt, void* out,
                   int ldo, const void* partial, const void* residual, const void* gate, int rows_per_gate, int M,
                   int N, int K, int R) {
  using C = Tile<kTileM>;
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  auto kernel = w4a4_gemm_kernel<kUnsigned, TOut, kExtras, kTileM>;
  const uint64_t bit = uint64_t{1} << (device % 64);
  if ((opted_in.load() & bit) == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
    if (err != cudaSuccess) return err;
    opted_in.fetch_or(bit);
  }
  const int tiles = ((M + C::kBM - 1) / C::kBM) * ((N + C::kBN - 1) / C::kBN);
  kernel<<<tiles, C::kThreads, C::kSmemBytes, stream>>>(qx, ascales, as_m, as_g, qweight, wscales, ws_n, ws_g,
                                                        lora_act, up_hi, up_lo, bias, bt, static_cast<TOut*>(out),
                                                        ldo, partial, residual, gate, rows_per_gate, M, N, K, R);
  return cudaGetLastError();
}

}  // namespace

cudaError_t w4a4_gemm(const uint8_t* qx, const float* ascales, int64_t as_m, int64_t as_g, const uint8_t* qweight,
                      const float* wscales, int64_t ws_n, int64_t ws_g, const float* lora_act,
                      const __nv_bfloat16* up_hi, const __nv_bfloat16* up_lo, const void* bias, DType bt, void* out,
                      DType ot, int64_t ldo, const void* partial, const void* residual, const void* gate,
                      int rows_per_gate, int M, int N, int K, int R, bool is_unsigned, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % kGroup != 0 || ldo % 2 != 0 || ldo < N) return cudaErrorInvalidValue;
  if (residual != nullptr && (gate == nullptr || rows_per_gate <= 0 || M % rows_per_gate != 0)) return cudaErrorInvalidValue;
  // 32-bit offsets inside the kernel (ops.cpp reports these limits with a clear message); rows padded to the
  // larger tile cover both
  const int64_t lim = int64_t{1} << 31;
  if (int64_t{M} * K / 2 >= lim || int64_t{N} * K / 2 >= lim || ldo >= lim) return cudaErrorInvalidValue;
  if ((M + cfg::kBM) * (as_m < 0 ? -as_m : as_m) + (K / kGroup) * (as_g < 0 ? -as_g : as_g) >= lim) return cudaErrorInvalidValue;
  if ((N + cfg::kBN) * (ws_n < 0 ? -ws_n : ws_n) + (K / kGroup) * (ws_g < 0 ? -ws_g : ws_g) >= lim) return cudaErrorInvalidValue;
  const bool extras = partial != nullptr || residual != nullptr;
  // the tile by M (cfg::kSmallMaxM: why 384, see the configuration above); same numerics either way
  const bool small = M <= cfg::kSmallMaxM;
#define SVDQ_LAUNCH(U, T, E, BM)                                                                                  \
  launch<U, T, E, BM>(stream, qx, ascales, static_cast<int>(as_m), static_cast<int>(as_g), qweight, wscales,      \
                      static_cast<int>(ws_n), static_cast<int>(ws_g), lora_act, up_hi, up_lo, bias, bt, out,      \
                      static_cast<int>(ldo), partial, residual, gate, rows_per_gate, M, N, K, R)
#define SVDQ_LAUNCH_TILE(U, T, E) (small ? SVDQ_LAUNCH(U, T, E, cfg::kSmallBM) : SVDQ_LAUNCH(U, T, E, cfg::kBM))
#define SVDQ_LAUNCH_DTYPE(U, E)                                            \
  (ot == DType::F32   ? SVDQ_LAUNCH_TILE(U, float, E)                      \
   : ot == DType::F16 ? SVDQ_LAUNCH_TILE(U, __half, E)                     \
                      : SVDQ_LAUNCH_TILE(U, __nv_bfloat16, E))
  if (is_unsigned) return extras ? SVDQ_LAUNCH_DTYPE(true, true) : SVDQ_LAUNCH_DTYPE(true, false);
  return extras ? SVDQ_LAUNCH_DTYPE(false, true) : SVDQ_LAUNCH_DTYPE(false, false);
#undef SVDQ_LAUNCH_DTYPE
#undef SVDQ_LAUNCH_TILE
#undef SVDQ_LAUNCH
}

}  // namespace svdq
