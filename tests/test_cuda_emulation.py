"""The CUDA kernels' data movement, emulated on the CPU and checked against the reference backend.

The instructions (ldmatrix, mma.m16n8k64 s4/u4, mma.m16n8k16 bf16) come from tests/ptx_isa.py, an
emulator written from the PTX ISA's fragment tables by someone who had not seen kernels.cu (now
csrc/*.cu). What this file adds is the kernels' *design*: which thread copies which 16 bytes into which
swizzled shared-memory slot of which pipeline stage, the addresses each lane hands to ldmatrix, how warps split the CTA tile, the grouped
CTA order, the magic-number int32 -> fp32 conversion (with the activation scale rounded to 22 bits so that
one FMA removes the offset and scales), the activation scales' register pipeline (loaded one group ahead,
stored as (sa22, -magic sa22) pairs two stages ahead of the one read), where each register's scale is read,
how the low-rank operands are staged in shared memory after the loop (bf16 rows of kLrChunk ranks, 16-byte
chunks swizzled) and read back by ldmatrix, and where each accumulator is stored, and, in quantize_act, which channels each lane owns and how they fill the bf16 MMA
fragments. The tile parameters are read from the kernel sources. If any design choice disagreed with the ISA's
fragment layouts, the emulated result would not be the reference's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from perfmodel import cuda as kernel_model

from engine.kernels import reference

from . import ptx_isa as P
from .kernel_cases import act_inputs, gemm_inputs

ROOT = Path(__file__).resolve().parents[1]
PRM = kernel_model.tile_params()

MAGIC_BITS = 0x4B400000  # float 1.5 * 2^23
MAGIC = np.float32(12582912.0)


# --- shared helpers -------------------------------------------------------------------------------


def swizzled(row: int, half: int) -> int:
    """Byte offset of 16-byte half `half` of code row `row` in a stage: halves swap on rows with bit 2 set."""
    return row * 32 + 16 * (half ^ ((row >> 2) & 1))


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 fused multiply-add: the float32 product is exact in float64, then one rounding (to 2^-53 first)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def bf16x2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A bf16x2 register: element 0 (a) in bits 15:0, as the ISA orders elements."""
    return P.bf16_to_bits(a).astype(np.uint32) | (P.bf16_to_bits(b).astype(np.uint32) << 16)


def bf16_pair_bits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) bf16x2 registers of fp32 pairs: hi = bf16(v), lo = bf16(v - hi)."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    hx, hy = P.round_to_bf16(x), P.round_to_bf16(y)
    return bf16x2(hx, hy), bf16x2((x - hx).astype(np.float32), (y - hy).astype(np.float32))


def round_to_22_bits(s: np.ndarray) -> np.ndarray:
    """round_to_22_bits of fragments.cuh: (bits + 2) & ~3 on the fp32 pattern (to nearest, 22 significant
    bits)."""
    bits = np.asarray(s, np.float32).view(np.int32)
    return ((bits + 2) & ~np.int32(3)).view(np.float32)


def lr_swizzled(row: int, chunk: int) -> int:
    """Byte offset of 16-byte chunk `chunk` (0..3) of a staged low-rank row (kLrChunk bf16 = 64 bytes):
    chunks permuted by row bits 1-2, so the 8 rows of one ldmatrix fall in distinct banks."""
    return row * 2 * PRM["kLrChunk"] + 16 * (chunk ^ ((row >> 1) & 3))


def staged(x: np.ndarray) -> np.ndarray:
    """Shared memory holding the bf16 values x [rows, kLrChunk] in the lr_swizzled layout."""
    rows, width = x.shape
    bits = P.bf16_to_bits(x)
    mem = np.zeros(rows * width * 2, np.uint8)
    for row in range(rows):
        for c in range(width // 8):
            o = lr_swizzled(row, c)
            mem[o : o + 16] = bits[row, 8 * c : 8 * c + 8].view(np.uint8)
    return mem


def gather(t: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """t[rows, cols] with 0 outside t (the kernels' guarded loads)."""
    ok = (rows < t.shape[0]) & (cols < t.shape[1])
    if t.size == 0:
        return np.zeros(np.broadcast(rows, cols).shape, np.float32)
    return np.where(ok, t[np.minimum(rows, t.shape[0] - 1), np.minimum(cols, t.shape[1] - 1)], 0).astype(
        np.float32
    )


def grouped_order(tiles_m: int, tiles_n: int, group_m: int) -> list[tuple[int, int]]:
    """The grouped CTA order as a definition: bands of `group_m` tile rows; inside a band, column by column."""
    return sorted(
        ((tm, tn) for tm in range(tiles_m) for tn in range(tiles_n)),
        key=lambda x: (x[0] // group_m, x[1], x[0]),
    )


def kernel_tile_formula(block: int, tiles_m: int, tiles_n: int, group_m: int) -> tuple[int, int]:
    """tile_coords() of w4a4_gemm.cu, transcribed (checked against grouped_order below)."""
    per_group = group_m * tiles_n
    first_m = (block // per_group) * group_m
    rows_here = min(tiles_m - first_m, group_m)
    return first_m + (block % per_group) % rows_here, (block % per_group) // rows_here


@pytest.mark.parametrize("tiles_m,tiles_n", [(1, 1), (3, 5), (34, 24), (34, 96), (17, 7)])
def test_cta_order_visits_every_tile_once_in_grouped_order(tiles_m, tiles_n):
    gm = PRM["kGroupTilesM"]
    got = [kernel_tile_formula(b, tiles_m, tiles_n, gm) for b in range(tiles_m * tiles_n)]
    assert got == grouped_order(tiles_m, tiles_n, gm)


def test_magic_number_conversion_is_exact_over_the_whole_range():
    """bits(1.5 * 2^23) + c, read as fp32, minus 1.5 * 2^23 is c for every |c| < 2^22 (exhaustive)."""
    c = np.arange(-(2**22), 2**22, dtype=np.int64)
    f = (c + MAGIC_BITS).astype(np.int32).view(np.float32) - MAGIC
    assert np.array_equal(f.astype(np.int64), c)
    # a group's partial sums: 64 products of at most 15 * 8 (u4 x s4) or 8 * 8 (s4 x s4)
    assert 64 * 15 * 8 < 2**22 and 64 * 8 * 8 < 2**22
    # and the MMA really delivers c + magic: exhaustively over the s4/u4 products of one k64 dot
    a = np.full((16, 64), 15)
    b = np.full((64, 8), -8)
    d = P.mma_m16n8k64_s4(
        P.pack_A_m16n8k64(a, unsigned=True),
        P.pack_B_m16n8k64(b),
        np.full((32, 4), MAGIC_BITS, np.int32),
        a_unsigned=True,
    )
    assert np.all(d.view(np.float32) - MAGIC == -7680)


# --- w4a4_gemm ------------------------------------------------------------------------------------


def emulate_gemm(
    qx: np.ndarray,
    ascales: np.ndarray,
    qweight: np.ndarray,
    wscales: np.ndarray,
    lora_act: np.ndarray,
    up: np.ndarray,
    bias: np.ndarray | None,
    unsigned: bool,
    small: bool = False,
) -> np.ndarray:
    """``small``: the small-M tile (Tile<kSmallBM>), else the large one."""
    tile = kernel_model.tile_config(PRM, small)
    bm, bn, wm_n, wn_n, stages, gm = (
        tile[k] for k in ("kBM", "kBN", "kWarpsM", "kWarpsN", "kStages", "kGroupTilesM")
    )
    threads, warps = 32 * wm_n * wn_n, wm_n * wn_n
    mt_n, nt_n = bm // wm_n // 16, bn // wn_n // 8
    m, n, k, r = qx.shape[0], qweight.shape[0], 2 * qx.shape[1], lora_act.shape[1]
    groups = k // 64
    # per stage: codes, then one (sa22, -magic sa22) slot and one wscales slot per thread
    sa_off, sw_off = (bm + bn) * 32, (bm + bn) * 32 + threads * 8
    stage_bytes = sw_off + threads * 4
    out = np.full((m, n), np.nan, np.float32)
    written = np.zeros((m, n), np.int64)
    lane = np.arange(32)
    grp, tig = lane // 4, lane % 4
    magic = np.full((32, 4), MAGIC_BITS, np.int32)

    tiles_m, tiles_n = math.ceil(m / bm), math.ceil(n / bn)
    for tm, tn in grouped_order(tiles_m, tiles_n, gm):
        m0, n0 = tm * bm, tn * bn
        ring = np.zeros((stages, stage_bytes), np.uint8)
        tag = [-1] * stages  # which group each stage's codes and wscales hold
        tag_sa = [-1] * stages  # which group each stage's activation scales hold

        def load_sa(g: int, m0: int = m0) -> np.ndarray:
            """Each thread's LDG of its row's scale (rows past M and threads >= kBM: 0)."""
            rows = m0 + np.arange(threads)
            ok = (np.arange(threads) < bm) & (rows < m)
            return np.where(ok, ascales[np.minimum(rows, m - 1), g], 0).astype(np.float32)

        def store_sa(g: int, v: np.ndarray, ring: np.ndarray = ring, tag_sa: list = tag_sa) -> None:
            """Every thread's STS.64 of (sa22, -magic sa22) into stage g % stages (unconditional)."""
            s22 = round_to_22_bits(v)
            pair = np.stack([s22, (-MAGIC * s22).astype(np.float32)], 1)  # exact: 22-bit significand
            ring[g % stages, sa_off : sa_off + threads * 8] = pair.reshape(-1).view(np.uint8)
            tag_sa[g % stages] = g

        def load(g: int, m0: int = m0, n0: int = n0, ring: np.ndarray = ring, tag: list = tag) -> None:
            """Every thread's cp.async for group g (zero-fill past M / N)."""
            s = g % stages
            assert tag[s] in (-1, g - stages), "overwrote a stage that is still to be read"
            buf = ring[s]
            for tid in range(threads):
                for i in range(-(-2 * bm // threads)):
                    if tid + i * threads >= 2 * bm:
                        continue
                    row, half = tid // 2 + i * threads // 2, tid % 2
                    src = qx[m0 + row, g * 32 + 16 * half : g * 32 + 16 * half + 16] if m0 + row < m else 0
                    buf[swizzled(row, half) : swizzled(row, half) + 16] = src
                for i in range(-(-2 * bn // threads)):
                    if tid + i * threads >= 2 * bn:
                        continue
                    row, half = tid // 2 + i * threads // 2, tid % 2
                    src = (
                        qweight[n0 + row, g * 32 + 16 * half : g * 32 + 16 * half + 16] if n0 + row < n else 0
                    )
                    o = bm * 32 + swizzled(row, half)
                    buf[o : o + 16] = src
                # every thread's 4-byte cp.async of wscales (zero-filled past N and for tid >= kBN)
                v = wscales[n0 + tid, g] if tid < bn and n0 + tid < n else 0.0
                buf[sw_off + 4 * tid : sw_off + 4 * tid + 4] = np.array([v], np.float32).view(np.uint8)
            tag[s] = g

        acc = np.zeros((warps, mt_n, nt_n, 32, 4), np.float32)
        for g in range(min(stages - 1, groups)):
            load(g)
        for g in range(min(stages - 2, groups)):
            store_sa(g, load_sa(g))
        sa_next = load_sa(stages - 2) if stages - 2 < groups else np.zeros(threads, np.float32)
        for g in range(groups):
            # barrier: every warp finished group g - 1, so its stage may be refilled with g + stages - 1
            if g + stages - 1 < groups:
                load(g + stages - 1)
            # stage (g + stages - 2) % stages was last read in iteration g - 2: free since this barrier
            assert tag_sa[(g + stages - 2) % stages] < g, "overwrote activation scales still to be read"
            store_sa(g + stages - 2, sa_next)
            if g + stages - 1 < groups:
                sa_next = load_sa(g + stages - 1)
            assert tag[g % stages] == g and tag_sa[g % stages] == g
            buf = ring[g % stages]
            sa_s = buf[sa_off : sa_off + threads * 8].view(np.float32).reshape(threads, 2)
            sw_s = buf[sw_off : sw_off + bn * 4].view(np.float32)
            for w in range(warps):
                wm, wn = (w // wn_n) * (bm // wm_n), (w % wn_n) * (bn // wn_n)
                a = [
                    P.ldmatrix(buf, [swizzled(wm + mt * 16 + ln % 16, ln // 16) for ln in range(32)], 4)
                    for mt in range(mt_n)
                ]
                for j in range(nt_n // 2):
                    b = P.ldmatrix(
                        buf,
                        [
                            bm * 32 + swizzled(wn + 16 * j + 8 * (ln // 16) + ln % 8, (ln // 8) % 2)
                            for ln in range(32)
                        ],
                        4,
                    )
                    for h in range(2):
                        nt = 2 * j + h
                        sw = np.stack(
                            [sw_s[wn + nt * 8 + 2 * tig], sw_s[wn + nt * 8 + 2 * tig + 1]], 1
                        )  # [32, 2]
                        for mt in range(mt_n):
                            d = P.mma_m16n8k64_s4(a[mt], b[:, 2 * h : 2 * h + 2], magic, a_unsigned=unsigned)
                            b32 = d.view(np.float32)  # 1.5 * 2^23 + the group's dot, exactly (test above)
                            pairs = [sa_s[wm + mt * 16 + grp], sa_s[wm + mt * 16 + grp + 8]]  # [32, 2] each
                            for e in range(4):
                                s22, neg_bias = pairs[e // 2][:, 0], pairs[e // 2][:, 1]
                                part = fma32(b32[:, e], s22, neg_bias)  # RN(dot * sa22): one rounding
                                acc[w, mt, nt, :, e] = fma32(part, sw[:, e % 2], acc[w, mt, nt, :, e])
        # epilogue: the low-rank operands of each pass of kLrChunk ranks staged in shared memory as bf16
        # [row][kLrChunk] (lora_act hi and lo, proj_up), 16-byte chunks swizzled; fragments by ldmatrix;
        # bf16 MMAs per k16 step (hi x hi, then lo x hi); then bias and the stores
        chunk = PRM["kLrChunk"]
        for k0 in range(0, r, chunk):
            cols = k0 + np.arange(chunk)[None, :]
            a = gather(lora_act, m0 + np.arange(bm)[:, None], cols)  # zeros past M and R
            a_hi = P.round_to_bf16(a)
            a_lo = P.round_to_bf16((a - a_hi).astype(np.float32))
            b_hi = P.round_to_bf16(gather(up, n0 + np.arange(bn)[:, None], cols))
            smem_a_hi, smem_a_lo, smem_b = (staged(x) for x in (a_hi, a_lo, b_hi))
            for w in range(warps):
                wm, wn = (w // wn_n) * (bm // wm_n), (w % wn_n) * (bn // wn_n)
                for ks in range(chunk // 16):
                    if k0 + 16 * ks >= r:
                        break
                    for mt in range(mt_n):
                        a_addr = [lr_swizzled(wm + mt * 16 + ln % 16, 2 * ks + ln // 16) for ln in range(32)]
                        ah, al = P.ldmatrix(smem_a_hi, a_addr, 4), P.ldmatrix(smem_a_lo, a_addr, 4)
                        for j in range(nt_n // 2):
                            b_addr = [
                                lr_swizzled(wn + 16 * j + 8 * (ln // 16) + ln % 8, 2 * ks + (ln // 8) % 2)
                                for ln in range(32)
                            ]
                            bh = P.ldmatrix(smem_b, b_addr, 4)
                            for h in range(2):
                                nt = 2 * j + h
                                acc[w, mt, nt] = P.mma_m16n8k16_bf16(
                                    ah, bh[:, 2 * h : 2 * h + 2], acc[w, mt, nt]
                                )
                                acc[w, mt, nt] = P.mma_m16n8k16_bf16(
                                    al, bh[:, 2 * h : 2 * h + 2], acc[w, mt, nt]
                                )
        for w in range(warps):
            wm, wn = (w // wn_n) * (bm // wm_n), (w % wn_n) * (bn // wn_n)
            for nt in range(nt_n):
                for mt in range(mt_n):
                    for e in range(4):
                        rows = m0 + wm + mt * 16 + grp + 8 * (e // 2)
                        cols = n0 + wn + nt * 8 + 2 * tig + e % 2
                        for ln in range(32):
                            if rows[ln] < m and cols[ln] < n:
                                y = acc[w, mt, nt, ln, e] + (
                                    np.float32(bias[cols[ln]]) if bias is not None else 0
                                )
                                out[rows[ln], cols[ln]] = y
                                written[rows[ln], cols[ln]] += 1
    assert np.all(written == 1), "every output element is written exactly once"
    return out


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.float().numpy()


@pytest.mark.parametrize("unsigned,small", [(False, False), (True, False), (False, True)])
def test_gemm_integer_part_is_bit_exact(unsigned, small):
    """Unit scales, no low-rank, no bias: the emulated kernel returns the exact integer product (ragged M, N),
    with either tile (the small-M one: 8 warps, 128 rows)."""
    m, k, n = 133, 192, 141  # two tile rows (of either tile) and columns, both ragged
    g = gemm_inputs(m, k, n, 0, unsigned=unsigned, bias=False, seed=3)
    ones_a, ones_w = np.ones((m, k // 64), np.float32), np.ones((n, k // 64), np.float32)
    y = emulate_gemm(
        g["qx"].numpy(),
        ones_a,
        g["qweight"].numpy(),
        ones_w,
        np.zeros((m, 0), np.float32),
        np.zeros((n, 0), np.float32),
        None,
        unsigned,
        small,
    )
    exact = {**g, "ascales": torch.ones(m, k // 64), "wscales": torch.ones(n, k // 64)}
    ref = reference.w4a4_gemm(**exact, unsigned=unsigned, out_dtype=torch.float32)
    assert np.array_equal(y, ref.numpy())


@pytest.mark.parametrize(
    "unsigned,r,small",
    [
        (False, 16, False),
        (False, 16, True),
        pytest.param(True, 32, False, marks=pytest.mark.slow),
        pytest.param(False, 40, False, marks=pytest.mark.slow),
    ],
)
def test_gemm_with_scales_low_rank_and_bias_matches_reference(unsigned, r, small):
    m, k, n = 37, 128, 40
    g = gemm_inputs(m, k, n, r, unsigned=unsigned, seed=r)
    y = emulate_gemm(
        g["qx"].numpy(),
        _np(g["ascales"]),
        g["qweight"].numpy(),
        _np(g["wscales"]),
        _np(g["lora_act"]),
        _np(g["proj_up"]),
        _np(g["bias"]),
        unsigned,
        small,
    )
    ref = reference.w4a4_gemm(**g, unsigned=unsigned, out_dtype=torch.float32).numpy()
    # the group sums differ from the reference by fp32 rounding only; lora_act enters as bf16 hi + lo
    lora_scale = np.abs(_np(g["lora_act"])) @ np.abs(_np(g["proj_up"])).T
    assert np.all(np.abs(y - ref) <= 1e-5 * np.abs(ref) + 2**-15 * lora_scale + 1e-5)


# --- quantize_act ---------------------------------------------------------------------------------


def emulate_quantize(x: np.ndarray, smooth: np.ndarray, down: np.ndarray, unsigned: bool, shift: float):
    rows_per_cta, warps = PRM["kQRows"], PRM["kQWarps"]
    m, k = x.shape
    r, groups = down.shape[0], k // 64
    qx = np.full((m, k // 2), 0xEE, np.uint8)
    ascales_mem = np.full(groups * m, -1.0, np.float32)  # the kernel's buffer: group-major, strides (1, M)
    lora = np.zeros((m, r), np.float32)
    lane = np.arange(32)
    grp, tig = lane // 4, lane % 4
    qmax, lo, hi = (15, 0, 15) if unsigned else (7, -8, 7)
    down_hi = P.round_to_bf16(down.astype(np.float32))
    down_lo = P.round_to_bf16((down - down_hi).astype(np.float32))
    nt_pass = 4 if r <= 32 else 8
    for m0 in range(0, m, rows_per_cta):
        for r0 in range(0, max(r, 1), nt_pass * 8):
            partial = np.zeros((warps, rows_per_cta, nt_pass * 8), np.float32)
            for w in range(warps):
                acc = np.zeros((2, nt_pass, 32, 4), np.float32)
                for g in range(w, groups, warps):
                    ch = g * 64 + 16 * tig[:, None] + np.arange(16)  # [32 lanes, 16 channels]
                    h = np.zeros((2, 2, 32, 16), np.float32)
                    for mt in range(2):
                        for rr in range(2):
                            rows = m0 + mt * 16 + grp + 8 * rr
                            xv = np.where((rows < m)[:, None], x[np.minimum(rows, m - 1)[:, None], ch], 0)
                            h[mt, rr] = (xv.astype(np.float32) + np.float32(shift)) / smooth[ch]
                            if r0 > 0:
                                continue
                            v = h[mt, rr] if unsigned else np.abs(h[mt, rr])
                            top = (
                                np.maximum(v.max(1), 0).reshape(8, 4).max(1).repeat(4)
                            )  # quad max by shuffles
                            nan = np.isnan(h[mt, rr]).any(1).reshape(8, 4).any(1).repeat(4)
                            scale = np.where(nan, np.float32(np.nan), top / np.float32(qmax)).astype(
                                np.float32
                            )
                            with np.errstate(invalid="ignore", divide="ignore"):
                                q = np.where(scale[:, None] > 0, np.rint(h[mt, rr] / scale[:, None]), 0)
                            q = np.clip(np.nan_to_num(q), lo, hi).astype(np.int64) & 0xF
                            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)  # [32, 8] bytes
                            for ln in range(32):
                                if rows[ln] < m:
                                    qx[rows[ln], g * 32 + 8 * tig[ln] : g * 32 + 8 * tig[ln] + 8] = packed[ln]
                                    if tig[ln] == 0:
                                        ascales_mem[g * m + rows[ln]] = scale[ln]
                    if r == 0:
                        continue
                    for step in range(4):
                        c = 4 * step
                        regs = [
                            bf16_pair_bits(
                                h[mt, i % 2][:, c + 2 * (i // 2)], h[mt, i % 2][:, c + 2 * (i // 2) + 1]
                            )
                            for mt in range(2)
                            for i in range(4)
                        ]
                        for nt in range(nt_pass):
                            rows_b = r0 + nt * 8 + grp
                            chb = g * 64 + 16 * tig + c
                            bh = np.stack(
                                [
                                    bf16x2(
                                        gather(down_hi, rows_b, chb + 2 * i),
                                        gather(down_hi, rows_b, chb + 2 * i + 1),
                                    )
                                    for i in range(2)
                                ],
                                1,
                            )
                            bl = np.stack(
                                [
                                    bf16x2(
                                        gather(down_lo, rows_b, chb + 2 * i),
                                        gather(down_lo, rows_b, chb + 2 * i + 1),
                                    )
                                    for i in range(2)
                                ],
                                1,
                            )
                            for mt in range(2):
                                ah = np.stack([regs[mt * 4 + i][0] for i in range(4)], 1)
                                al = np.stack([regs[mt * 4 + i][1] for i in range(4)], 1)
                                acc[mt, nt] = P.mma_m16n8k16_bf16(ah, bh, acc[mt, nt])
                                acc[mt, nt] = P.mma_m16n8k16_bf16(al, bh, acc[mt, nt])
                                acc[mt, nt] = P.mma_m16n8k16_bf16(ah, bl, acc[mt, nt])
                for mt in range(2):
                    for nt in range(nt_pass):
                        for e in range(4):
                            partial[w, mt * 16 + grp + 8 * (e // 2), nt * 8 + 2 * tig + e % 2] = acc[
                                mt, nt, :, e
                            ]
            total = partial[0]
            for w in range(1, warps):  # fixed order: deterministic
                total = total + partial[w]
            for row in range(rows_per_cta):
                for col in range(nt_pass * 8):
                    if m0 + row < m and r0 + col < r:
                        lora[m0 + row, r0 + col] = total[row, col]
    return qx, ascales_mem.reshape(groups, m).T, lora


@pytest.mark.parametrize(
    "unsigned,r,dtype",
    [
        (False, 32, torch.bfloat16),
        pytest.param(True, 40, torch.float32, marks=pytest.mark.slow),
        pytest.param(False, 0, torch.float16, marks=pytest.mark.slow),
    ],
)
def test_quantize_act_matches_reference(unsigned, r, dtype):
    m, k = 45, 320  # ragged rows; 5 groups over 4 warps
    a = act_inputs(m, k, r, unsigned=unsigned, dtype=dtype, seed=7)
    a["x"][3, 70] = float("nan")  # a NaN group: scale NaN, codes 0, like torch.amax
    shift = 0.171875 if unsigned else 0.0
    kw = {"group_size": 64, "unsigned": unsigned, "shift": shift}
    ref = reference.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    qx, sc, lora = emulate_quantize(_np(a["x"]), _np(a["smooth"]), _np(a["proj_down"]), unsigned, shift)
    assert np.array_equal(qx, ref[0].numpy())
    assert np.array_equal(sc, ref[1].numpy(), equal_nan=True) and np.isnan(sc[3, 1])
    ok = ~np.isnan(ref[2].numpy()).any(1)  # the row with the NaN has NaN low-rank outputs in both
    # x_hat enters the bf16 MMAs as hi + lo (16 significant bits): error up to ~2^-16 of sum |x_hat p|
    x_hat = (np.abs(_np(a["x"])) + shift) / _np(a["smooth"])
    bound = 2**-15 * (x_hat @ np.abs(_np(a["proj_down"])).T) + 1e-6
    assert np.all(np.abs(lora[ok] - ref[2].numpy()[ok]) <= bound[ok])
    assert np.isnan(lora[3]).all() == np.isnan(ref[2].numpy()[3]).all()
