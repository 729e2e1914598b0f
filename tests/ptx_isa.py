"""Pure-numpy emulator of three PTX warp-level matrix instructions, written from the PTX ISA text.

Source: NVIDIA "Parallel Thread Execution ISA" (docs.nvidia.com/cuda/parallel-thread-execution), read
as the markdown copy whose section numbers are 9.7.14.x (the text mentions features "introduced in
PTX ISA version 9.1" and renames "from PTX ISA version 9.0"; the ptx.poole.ai mirror with the same
numbering labels it "PTX ISA v9.2"). Section numbers move between ISA versions (9.4 has 9.7.16.x), so
every table below is cited by its section *title*:

* "Matrix Fragments for mma.m16n8k64"                             (9.7.14.5.11, Figures 93-96)
* "Matrix Fragments for mma.m16n8k16 with floating point type"    (9.7.14.5.8, Figures 79, 81, 83)
* "Multiply-and-Accumulate Instruction: mma"                      (9.7.14.5.14: semantics, rounding,
                                                                   integer wrap / .satfinite)
* "Warp-level matrix load instruction: ldmatrix"                  (9.7.14.5.15, Figure 104)
* "Matrix Fragments for mma.m16n8k32" (.s8/.u8 part)               (9.7.14.5.10, Figure 88-90)
* "Matrix Fragments for mma.m16n8k8" (.tf32 part)                  (9.7.14.5.7, Figures 72, 74)

Why it exists: CUDA kernels that hand-place mma/ldmatrix operands are tested against this model on
the CPU, so a layout mistake shows up as a wrong matrix element instead of a silently wrong GEMM.

Conventions used throughout (all arrays are numpy):

* A warp has 32 lanes. A per-lane register file for one operand is an array ``[32, nregs]``; register
  ``r`` of lane ``l`` is ``regs[l, r]``.
* Multiplicand registers (A, B, ldmatrix results) are raw 32-bit patterns, dtype ``uint32``.
* Accumulator registers (C, D) are *values*: ``int32`` for the s32 accumulators, ``float32`` for the
  f32 accumulators (use ``bits_to_f32`` / ``f32_to_bits`` to move between value and bit pattern).
* The ISA numbers a thread's fragment elements a0, a1, ... "low to high" across the vector
  expression: element ``i`` lives in register ``i // epr`` (``epr`` = elements per 32-bit register:
  8 for .s4/.u4, 2 for .f16/.bf16, 1 for .s32/.f32) at bit offset ``(i % epr) * bits``. So for .s4,
  a0 is bits [3:0] of register 0 and a7 is bits [31:28]; for .f16x2, a0 is bits [15:0].
* Matrix shapes are the ISA's: A is M x K (row-major indices ``A[m, k]``), B is K x N (``B[k, n]``),
  C/D are M x N. ``.row.col`` is the only layout these shapes accept, and it only describes the
  fragment maps below; the emulator never needs memory layouts except in ``ldmatrix``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "WARP",
    "MmaSpec",
    "bf16_to_bits",
    "bits_to_bf16",
    "bits_to_f16",
    "bits_to_f32",
    "f16_to_bits",
    "f32_to_bits",
    "frag_m16n8k8_tf32_a",
    "frag_m16n8k8_tf32_b",
    "frag_m16n8k16_a",
    "frag_m16n8k16_b",
    "frag_m16n8k16_c",
    "frag_m16n8k32_a",
    "frag_m16n8k32_b",
    "frag_m16n8k64_a",
    "frag_m16n8k64_b",
    "frag_m16n8k64_c",
    "frag_table",
    "lane_coords",
    "ldmatrix",
    "ldmatrix_addr_lane",
    "ldmatrix_frag",
    "mma_m16n8k16_bf16",
    "mma_m16n8k16_f16",
    "mma_m16n8k64_s4",
    "mma_spec",
    "mma_sync",
    "pack_A_m16n8k16",
    "pack_A_m16n8k64",
    "pack_B_m16n8k16",
    "pack_B_m16n8k64",
    "pack_Bt_m16n8k16",
    "pack_Bt_m16n8k64",
    "pack_C_m16n8k16",
    "pack_C_m16n8k64",
    "round_to_bf16",
    "unpack_A_m16n8k16",
    "unpack_A_m16n8k64",
    "unpack_B_m16n8k16",
    "unpack_B_m16n8k64",
    "unpack_D_m16n8k16",
    "unpack_D_m16n8k64",
]

WARP = 32
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

FragFn = Callable[[int, int, int], tuple[int, int]]


def lane_coords(lane: int) -> tuple[int, int]:
    """Return (groupID, threadID_in_group) = (%laneid >> 2, %laneid % 4), as every fragment table defines."""
    if not 0 <= lane < WARP:
        raise ValueError(f"lane {lane} outside 0..31")
    return lane >> 2, lane % 4


def _check(reg: int, elem: int, nregs: int, epr: int) -> int:
    """Return the ISA element index i = reg * epr + elem after range checks."""
    if not 0 <= reg < nregs:
        raise ValueError(f"register {reg} outside 0..{nregs - 1}")
    if not 0 <= elem < epr:
        raise ValueError(f"element {elem} outside 0..{epr - 1}")
    return reg * epr + elem


# ---------------------------------------------------------------------------------------------
# Fragment maps. Each returns the (row, col) of the ISA matrix held by element `elem` of register
# `reg` of lane `lane`. Comments quote the ISA formulas (i = the ISA's element index ai / bi / ci).
# ---------------------------------------------------------------------------------------------

# --- "Matrix Fragments for mma.m16n8k64" (.s4 / .u4; also .e2m1, not emulated) -------------------
M16N8K64_A_REGS, M16N8K64_B_REGS, M16N8K64_C_REGS = 4, 2, 4
S4_PER_REG = 8


def frag_m16n8k64_a(lane: int, reg: int, elem: int) -> tuple[int, int]:
    """A (16x64, .s4/.u4): four .b32 registers of eight 4-bit elements a0..a31 (Figure 93).

    row = groupID     for ai where 0 <= i < 8 || 16 <= i < 24;  groupID + 8 otherwise
    col = threadID_in_group*8 + (i & 0x7)        for i < 16
          threadID_in_group*8 + (i & 0x7) + 32   for i >= 16
    """
    i = _check(reg, elem, M16N8K64_A_REGS, S4_PER_REG)
    g, t = lane_coords(lane)
    row = g if (0 <= i < 8 or 16 <= i < 24) else g + 8
    col = t * 8 + (i & 0x7) + (32 if i >= 16 else 0)
    return row, col


def frag_m16n8k64_b(lane: int, reg: int, elem: int) -> tuple[int, int]:
    """B (64x8, K x N, .s4/.u4): two .b32 registers of eight 4-bit elements b0..b15 (Figures 94-95).

    row = threadID_in_group*8 + (i & 0x7)        for bi where i < 8
          threadID_in_group*8 + (i & 0x7) + 32   for bi where i >= 8
    col = groupID
    """
    i = _check(reg, elem, M16N8K64_B_REGS, S4_PER_REG)
    g, t = lane_coords(lane)
    row = t * 8 + (i & 0x7) + (32 if i >= 8 else 0)
    return row, g


def frag_m16n8k64_c(lane: int, reg: int, elem: int = 0) -> tuple[int, int]:
    """C/D (16x8, .s32): four .s32 registers c0..c3 (Figure 96).

    row = groupID for ci where i < 2;  groupID + 8 for i >= 2
    col = threadID_in_group*2 + (i & 0x1)
    """
    i = _check(reg, elem, M16N8K64_C_REGS, 1)
    g, t = lane_coords(lane)
    return (g if i < 2 else g + 8), t * 2 + (i & 0x1)


# --- "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16 / .bf16, f32 accum) -------
M16N8K16_A_REGS, M16N8K16_B_REGS, M16N8K16_C_REGS = 4, 2, 4
H_PER_REG = 2


def frag_m16n8k16_a(lane: int, reg: int, elem: int) -> tuple[int, int]:
    """A (16x16, .f16/.bf16): four .f16x2 registers, elements a0..a7 (Figure 79).

    row = groupID     for ai where 0 <= i < 2 || 4 <= i < 6;  groupID + 8 otherwise
    col = threadID_in_group*2 + (i & 0x1)        for i < 4
          threadID_in_group*2 + (i & 0x1) + 8    for i >= 4
    """
    i = _check(reg, elem, M16N8K16_A_REGS, H_PER_REG)
    g, t = lane_coords(lane)
    row = g if (0 <= i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 0x1) + (8 if i >= 4 else 0)
    return row, col


def frag_m16n8k16_b(lane: int, reg: int, elem: int) -> tuple[int, int]:
    """B (16x8, K x N, .f16/.bf16): two .f16x2 registers, elements b0..b3 (Figure 81).

    row = threadID_in_group*2 + (i & 0x1)        for bi where i < 2
          threadID_in_group*2 + (i & 0x1) + 8    for bi where i >= 2
    col = groupID
    """
    i = _check(reg, elem, M16N8K16_B_REGS, H_PER_REG)
    g, t = lane_coords(lane)
    return t * 2 + (i & 0x1) + (8 if i >= 2 else 0), g


def frag_m16n8k16_c(lane: int, reg: int, elem: int = 0) -> tuple[int, int]:
    """C/D (16x8, .f32): four .f32 registers c0..c3 (Figure 83; same formulas as m16n8k64 C/D).

    row = groupID for ci where i < 2;  groupID + 8 for i >= 2
    col = threadID_in_group*2 + (i & 0x1)
    """
    i = _check(reg, elem, M16N8K16_C_REGS, 1)
    g, t = lane_coords(lane)
    return (g if i < 2 else g + 8), t * 2 + (i & 0x1)


def frag_m16n8k16_c_f16(lane: int, reg: int, elem: int) -> tuple[int, int]:
    """C/D (16x8, .f16): two .f16x2 registers, c0 and c1 in the first (c0 in the low half),
    c2 and c3 in the second (Figure 82); each ci where the .f32 layout puts it (Figure 83)."""
    i = _check(reg, elem, 2, 2)
    g, t = lane_coords(lane)
    return (g if i < 2 else g + 8), t * 2 + (i & 0x1)


@cache
def _table(fn: FragFn, nregs: int, epr: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    rows = np.empty((WARP, nregs, epr), dtype=np.int64)
    cols = np.empty((WARP, nregs, epr), dtype=np.int64)
    for lane in range(WARP):
        for reg in range(nregs):
            for elem in range(epr):
                rows[lane, reg, elem], cols[lane, reg, elem] = fn(lane, reg, elem)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def frag_table(fn: FragFn, nregs: int, epr: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Tabulate a fragment map: (rows, cols), each [32, nregs, epr] (read-only), for vectorised gathers.

    ``matrix[rows, cols]`` gives every lane's elements in register/element order.
    """
    return _table(fn, nregs, epr)


# ---------------------------------------------------------------------------------------------
# Bit-level helpers
# ---------------------------------------------------------------------------------------------


def f16_to_bits(x: ArrayLike) -> NDArray[np.uint16]:
    """IEEE binary16 bit patterns of x (rounded to f16 first, round-to-nearest-even)."""
    return np.asarray(x, dtype=np.float16).view(np.uint16)


def bits_to_f16(bits: ArrayLike) -> NDArray[np.float16]:
    """Interpret 16-bit patterns as IEEE binary16."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16)


def bf16_to_bits(x: ArrayLike) -> NDArray[np.uint16]:
    """bfloat16 bit patterns of x: float32 rounded to nearest-even on the upper 16 bits (NaN kept NaN)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    out = np.where(nan, (u >> 16) | 0x40, rounded)
    return out.astype(np.uint16)


def bits_to_bf16(bits: ArrayLike) -> NDArray[np.float32]:
    """Interpret 16-bit patterns as bfloat16, returned exactly as float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x: ArrayLike) -> NDArray[np.float32]:
    """Round float values to the nearest bfloat16, returned as float32 (exact)."""
    return bits_to_bf16(bf16_to_bits(x))


def f32_to_bits(x: ArrayLike) -> NDArray[np.uint32]:
    """IEEE binary32 bit patterns (for accumulators kept as raw registers)."""
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def bits_to_f32(bits: ArrayLike) -> NDArray[np.float32]:
    """Interpret 32-bit patterns as IEEE binary32."""
    return np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32)


def _pack_fields(fields: NDArray[np.integer], bits: int) -> NDArray[np.uint32]:
    """[32, nregs, epr] unsigned fields -> [32, nregs] uint32, element e at bit offset e*bits."""
    epr = fields.shape[-1]
    shifts = (np.arange(epr, dtype=np.uint64) * bits)[None, None, :]
    words = (fields.astype(np.uint64) << shifts).sum(axis=-1)
    return words.astype(np.uint32)


def _unpack_fields(regs: NDArray[np.uint32], bits: int, epr: int) -> NDArray[np.uint32]:
    """[32, nregs] uint32 -> [32, nregs, epr] unsigned fields, element e from bit offset e*bits."""
    r = np.asarray(regs, dtype=np.uint32).astype(np.uint64)[..., None]
    shifts = (np.arange(epr, dtype=np.uint64) * bits)[None, None, :]
    return ((r >> shifts) & ((1 << bits) - 1)).astype(np.uint32)


def _check_regs(regs: ArrayLike, nregs: int, name: str) -> NDArray[np.uint32]:
    a = np.asarray(regs)
    if a.shape != (WARP, nregs):
        raise ValueError(f"{name}: expected shape ({WARP}, {nregs}), got {a.shape}")
    if a.dtype != np.uint32:
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name}: expected uint32 bit patterns, got {a.dtype}")
        a = a.astype(np.int64) & 0xFFFFFFFF
    return a.astype(np.uint32)


def _check_shape(x: ArrayLike, shape: tuple[int, int], name: str) -> NDArray:
    a = np.asarray(x)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    return a


def _to_nibbles(x: NDArray, unsigned: bool, name: str) -> NDArray[np.uint32]:
    """Check the 4-bit range (.u4: 0..15, .s4: -8..7) and return two's-complement nibbles."""
    if not np.issubdtype(x.dtype, np.integer):
        if not np.all(np.equal(np.mod(x, 1), 0)):
            raise ValueError(f"{name}: 4-bit operands must be integers")
        x = x.astype(np.int64)
    lo, hi = (0, 15) if unsigned else (-8, 7)
    if x.size and (x.min() < lo or x.max() > hi):
        raise ValueError(f"{name}: values outside {lo}..{hi} for {'.u4' if unsigned else '.s4'}")
    return (x.astype(np.int64) & 0xF).astype(np.uint32)


def _from_nibbles(n: NDArray[np.uint32], unsigned: bool) -> NDArray[np.int64]:
    v = n.astype(np.int64)
    return v if unsigned else np.where(v >= 8, v - 16, v)


def _scatter(rows: NDArray, cols: NDArray, vals: NDArray, shape: tuple[int, int], dtype) -> NDArray:
    """Place per-lane values back into a matrix; every (row, col) must be hit exactly once."""
    out = np.zeros(shape, dtype=dtype)
    hits = np.zeros(shape, dtype=np.int64)
    np.add.at(hits, (rows.ravel(), cols.ravel()), 1)
    if not np.all(hits == 1):
        raise AssertionError("fragment map is not a bijection onto the matrix")
    out[rows, cols] = vals
    return out


# ---------------------------------------------------------------------------------------------
# mma.m16n8k64 .s4/.u4 -> .s32
# ---------------------------------------------------------------------------------------------


def pack_A_m16n8k64(A: ArrayLike, unsigned: bool = False) -> NDArray[np.uint32]:
    """A[16, 64] (ints in -8..7, or 0..15 if unsigned) -> per-lane registers [32, 4] uint32."""
    a = _check_shape(A, (16, 64), "A")
    rows, cols = frag_table(frag_m16n8k64_a, M16N8K64_A_REGS, S4_PER_REG)
    return _pack_fields(_to_nibbles(a, unsigned, "A")[rows, cols], 4)


def pack_B_m16n8k64(B: ArrayLike, unsigned: bool = False) -> NDArray[np.uint32]:
    """B[64, 8] (K x N, as the ISA writes B) -> per-lane registers [32, 2] uint32."""
    b = _check_shape(B, (64, 8), "B")
    rows, cols = frag_table(frag_m16n8k64_b, M16N8K64_B_REGS, S4_PER_REG)
    return _pack_fields(_to_nibbles(b, unsigned, "B")[rows, cols], 4)


def pack_Bt_m16n8k64(Bt: ArrayLike, unsigned: bool = False) -> NDArray[np.uint32]:
    """Bt[8, 64] (N x K, e.g. a weight matrix W[n, k]; B = Bt.T) -> per-lane registers [32, 2]."""
    return pack_B_m16n8k64(_check_shape(Bt, (8, 64), "Bt").T, unsigned)


def unpack_A_m16n8k64(a_regs: ArrayLike, unsigned: bool = False) -> NDArray[np.int64]:
    """Per-lane A registers [32, 4] -> A[16, 64] (signed -8..7, or 0..15 if unsigned)."""
    regs = _check_regs(a_regs, M16N8K64_A_REGS, "a_regs")
    rows, cols = frag_table(frag_m16n8k64_a, M16N8K64_A_REGS, S4_PER_REG)
    vals = _from_nibbles(_unpack_fields(regs, 4, S4_PER_REG), unsigned)
    return _scatter(rows, cols, vals, (16, 64), np.int64)


def unpack_B_m16n8k64(b_regs: ArrayLike, unsigned: bool = False) -> NDArray[np.int64]:
    """Per-lane B registers [32, 2] -> B[64, 8] (K x N)."""
    regs = _check_regs(b_regs, M16N8K64_B_REGS, "b_regs")
    rows, cols = frag_table(frag_m16n8k64_b, M16N8K64_B_REGS, S4_PER_REG)
    vals = _from_nibbles(_unpack_fields(regs, 4, S4_PER_REG), unsigned)
    return _scatter(rows, cols, vals, (64, 8), np.int64)


def pack_C_m16n8k64(C: ArrayLike) -> NDArray[np.int32]:
    """C[16, 8] s32 values -> per-lane accumulator registers [32, 4] int32."""
    c = _check_shape(C, (16, 8), "C")
    if not np.issubdtype(c.dtype, np.integer) or c.size and (c.min() < INT32_MIN or c.max() > INT32_MAX):
        raise ValueError("C must hold integers in the s32 range")
    rows, cols = frag_table(frag_m16n8k64_c, M16N8K64_C_REGS, 1)
    return c.astype(np.int32)[rows, cols][..., 0]


def unpack_D_m16n8k64(d_regs: ArrayLike) -> NDArray[np.int32]:
    """Per-lane accumulator registers [32, 4] int32 -> D[16, 8] int32 (also works for C)."""
    d = np.asarray(d_regs)
    if d.shape != (WARP, M16N8K64_C_REGS):
        raise ValueError(f"d_regs: expected shape (32, 4), got {d.shape}")
    rows, cols = frag_table(frag_m16n8k64_c, M16N8K64_C_REGS, 1)
    return _scatter(rows, cols, d.astype(np.int32)[..., None], (16, 8), np.int32)


def mma_m16n8k64_s4(
    a_regs: ArrayLike,
    b_regs: ArrayLike,
    c_regs: ArrayLike,
    a_unsigned: bool = False,
    b_unsigned: bool = False,
    satfinite: bool = False,
) -> NDArray[np.int32]:
    """mma.sync.aligned.m16n8k64.row.col{.satfinite}.s32.{s4|u4}.{s4|u4}.s32 d, a, b, c.

    a_regs [32, 4] uint32, b_regs [32, 2] uint32, c_regs [32, 4] int32 -> d [32, 4] int32.
    The product is exact (int64). Per "Multiply-and-Accumulate Instruction: mma": without
    .satfinite the accumulated value wraps modulo 2**32; with it, it clamps to INT32_MIN..INT32_MAX.
    (The ISA does not say whether clamping happens per partial sum; here it is applied once to the
    exact A*B + C, which is the only choice that a hardware test can observe for |A*B| < 2**31.)
    """
    A = unpack_A_m16n8k64(a_regs, a_unsigned)
    B = unpack_B_m16n8k64(b_regs, b_unsigned)
    C = unpack_D_m16n8k64(_check_int_acc(c_regs)).astype(np.int64)
    D = A @ B + C
    if satfinite:
        D = np.clip(D, INT32_MIN, INT32_MAX)
    else:
        D = ((D - INT32_MIN) % (2**32)) + INT32_MIN
    rows, cols = frag_table(frag_m16n8k64_c, M16N8K64_C_REGS, 1)
    return D.astype(np.int32)[rows, cols][..., 0]


def _check_int_acc(c_regs: ArrayLike) -> NDArray[np.int32]:
    c = np.asarray(c_regs)
    if c.shape != (WARP, 4):
        raise ValueError(f"c_regs: expected shape (32, 4), got {c.shape}")
    if c.dtype == np.uint32:
        return c.view(np.int32)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"c_regs: expected int32 values, got {c.dtype}")
    return c.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# mma.m16n8k16 .f16/.bf16 -> .f32
# ---------------------------------------------------------------------------------------------


def _half_bits(x: NDArray, bf16: bool) -> NDArray[np.uint16]:
    return bf16_to_bits(x) if bf16 else f16_to_bits(x)


def _half_vals(bits: NDArray, bf16: bool) -> NDArray[np.float64]:
    return (bits_to_bf16(bits) if bf16 else bits_to_f16(bits)).astype(np.float64)


def pack_A_m16n8k16(A: ArrayLike, bf16: bool = False) -> NDArray[np.uint32]:
    """A[16, 16] floats -> per-lane .f16x2 registers [32, 4] uint32 (values rounded to f16 / bf16, RNE)."""
    a = np.asarray(_check_shape(A, (16, 16), "A"), dtype=np.float32)
    rows, cols = frag_table(frag_m16n8k16_a, M16N8K16_A_REGS, H_PER_REG)
    return _pack_fields(_half_bits(a, bf16)[rows, cols], 16)


def pack_B_m16n8k16(B: ArrayLike, bf16: bool = False) -> NDArray[np.uint32]:
    """B[16, 8] (K x N) floats -> per-lane .f16x2 registers [32, 2] uint32."""
    b = np.asarray(_check_shape(B, (16, 8), "B"), dtype=np.float32)
    rows, cols = frag_table(frag_m16n8k16_b, M16N8K16_B_REGS, H_PER_REG)
    return _pack_fields(_half_bits(b, bf16)[rows, cols], 16)


def pack_Bt_m16n8k16(Bt: ArrayLike, bf16: bool = False) -> NDArray[np.uint32]:
    """Bt[8, 16] (N x K; B = Bt.T) floats -> per-lane registers [32, 2] uint32."""
    return pack_B_m16n8k16(_check_shape(Bt, (8, 16), "Bt").T, bf16)


def unpack_A_m16n8k16(a_regs: ArrayLike, bf16: bool = False) -> NDArray[np.float64]:
    """Per-lane A registers [32, 4] -> A[16, 16] (exact values, float64)."""
    regs = _check_regs(a_regs, M16N8K16_A_REGS, "a_regs")
    rows, cols = frag_table(frag_m16n8k16_a, M16N8K16_A_REGS, H_PER_REG)
    vals = _half_vals(_unpack_fields(regs, 16, H_PER_REG), bf16)
    return _scatter(rows, cols, vals, (16, 16), np.float64)


def unpack_B_m16n8k16(b_regs: ArrayLike, bf16: bool = False) -> NDArray[np.float64]:
    """Per-lane B registers [32, 2] -> B[16, 8] (K x N, exact values, float64)."""
    regs = _check_regs(b_regs, M16N8K16_B_REGS, "b_regs")
    rows, cols = frag_table(frag_m16n8k16_b, M16N8K16_B_REGS, H_PER_REG)
    vals = _half_vals(_unpack_fields(regs, 16, H_PER_REG), bf16)
    return _scatter(rows, cols, vals, (16, 8), np.float64)


def pack_C_m16n8k16(C: ArrayLike) -> NDArray[np.float32]:
    """C[16, 8] -> per-lane f32 accumulator registers [32, 4] float32 (values rounded to f32)."""
    c = np.asarray(_check_shape(C, (16, 8), "C"), dtype=np.float32)
    rows, cols = frag_table(frag_m16n8k16_c, M16N8K16_C_REGS, 1)
    return c[rows, cols][..., 0]


def unpack_D_m16n8k16(d_regs: ArrayLike) -> NDArray:
    """Per-lane accumulator registers [32, 4] -> D[16, 8], keeping the input dtype (float32/float64)."""
    d = np.asarray(d_regs)
    if d.shape != (WARP, M16N8K16_C_REGS):
        raise ValueError(f"d_regs: expected shape (32, 4), got {d.shape}")
    if d.dtype == np.uint32:
        d = d.view(np.float32)
    rows, cols = frag_table(frag_m16n8k16_c, M16N8K16_C_REGS, 1)
    return _scatter(rows, cols, d[..., None], (16, 8), d.dtype)


def _mma_m16n8k16(a_regs: ArrayLike, b_regs: ArrayLike, c_regs: ArrayLike, bf16: bool, f64_out: bool) -> NDArray:
    A = unpack_A_m16n8k16(a_regs, bf16)
    B = unpack_B_m16n8k16(b_regs, bf16)
    c = np.asarray(c_regs)
    if c.shape != (WARP, M16N8K16_C_REGS):
        raise ValueError(f"c_regs: expected shape (32, 4), got {c.shape}")
    if c.dtype == np.uint32:
        c = c.view(np.float32)
    C = unpack_D_m16n8k16(c.astype(np.float32)).astype(np.float64)
    D = A @ B + C  # products exact in float64; 16 products + C summed in float64
    rows, cols = frag_table(frag_m16n8k16_c, M16N8K16_C_REGS, 1)
    out = D[rows, cols][..., 0]
    return out if f64_out else out.astype(np.float32)


def mma_m16n8k16_f16(
    a_regs: ArrayLike, b_regs: ArrayLike, c_regs: ArrayLike, f64_out: bool = False
) -> NDArray:
    """mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 d, a, b, c.

    a_regs [32, 4] uint32, b_regs [32, 2] uint32, c_regs [32, 4] float32 -> d [32, 4] float32.
    Arithmetic (a model, not bit-exact hardware): each f16*f16 product is exact in float64, the 16
    products and C are summed in float64, and the result is rounded once to float32 (RNE); with
    f64_out=True the float64 sum is returned unrounded. The ISA leaves accumulation order, rounding
    and subnormal handling unspecified ("at least single precision"), so compare hardware results
    with a tolerance of a few float32 ulps of sum(|a*b|) + |c|.
    """
    return _mma_m16n8k16(a_regs, b_regs, c_regs, bf16=False, f64_out=f64_out)


def mma_m16n8k16_bf16(
    a_regs: ArrayLike, b_regs: ArrayLike, c_regs: ArrayLike, f64_out: bool = False
) -> NDArray:
    """mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c (same model as the f16 one)."""
    return _mma_m16n8k16(a_regs, b_regs, c_regs, bf16=True, f64_out=f64_out)


# ---------------------------------------------------------------------------------------------
# ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16
# ---------------------------------------------------------------------------------------------
LDM_ROWS = 8
LDM_ROW_BYTES = 16  # 8 elements x 16 bits


def ldmatrix_addr_lane(matrix: int, row: int) -> int:
    """Lane whose address operand gives the start of `row` of 8x8 `matrix` (0..num-1).

    ISA table: threads 0-7 supply addr0-addr7 (rows of matrix 0), threads 8-15 addr8-addr15
    (matrix 1), 16-23 matrix 2, 24-31 matrix 3; so lane = 8*matrix + row.
    """
    if not (0 <= matrix < 4 and 0 <= row < LDM_ROWS):
        raise ValueError("matrix in 0..3, row in 0..7")
    return 8 * matrix + row


def ldmatrix_frag(lane: int, reg: int, elem: int, trans: bool = False) -> tuple[int, int, int]:
    """(matrix, row, col) of the 16-bit element `elem` (0 = bits 15:0, 1 = bits 31:16) of
    destination register `reg` of `lane`, indexed in the matrix as stored in memory (row = the
    row whose address a lane supplied, col = 16-bit element offset within that row).

    Without .trans (Figure 104): lane l receives row l>>2, columns 2*(l%4) and 2*(l%4)+1 of matrix
    `reg` -- "a group of four consecutive threads loads 16 bytes", thread 0 the first fragment.
    With .trans the matrix is read column-major: lane l receives column l>>2, rows 2*(l%4) and
    2*(l%4)+1 (the non-trans fragment of the transposed matrix).
    """
    g, t = lane_coords(lane)
    if not (0 <= reg < 4 and 0 <= elem < 2):
        raise ValueError("reg in 0..3, elem in 0..1")
    if trans:
        return reg, 2 * t + elem, g
    return reg, g, 2 * t + elem


def ldmatrix(
    smem: bytes | bytearray | ArrayLike,
    lane_row_addrs: Sequence[int] | ArrayLike,
    num: int,
    trans: bool = False,
) -> NDArray[np.uint32]:
    """Emulate ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16 r, [p].

    smem: shared memory as bytes (or a uint8 array); lane_row_addrs: the 32 per-lane byte addresses
    `p` (offsets into smem). Only lanes 0..8*num-1 are read (sm_80+ behaviour; the ISA requires all
    32 to be valid on sm_75 and below). Each address must be 16-byte aligned ("naturally aligned"
    for the 16-byte row that four threads load) and the row must lie inside smem.
    Returns [32, num] uint32: register j of each lane holds its fragment of matrix j; 16-bit
    elements are read little-endian and the lower-address element lands in bits 15:0.
    """
    if num not in (1, 2, 4):
        raise ValueError("num must be 1, 2 or 4")
    mem = np.frombuffer(bytes(smem), dtype=np.uint8) if isinstance(smem, (bytes, bytearray)) else (
        np.asarray(smem, dtype=np.uint8).ravel()
    )
    addrs = np.asarray(lane_row_addrs, dtype=np.int64).ravel()
    if addrs.size != WARP:
        raise ValueError("lane_row_addrs must hold 32 addresses (one per lane)")
    # tiles[m, r, c]: 16-bit element c of row r of matrix m, as stored.
    tiles = np.empty((num, LDM_ROWS, LDM_ROWS), dtype=np.uint16)
    for m in range(num):
        for r in range(LDM_ROWS):
            a = int(addrs[ldmatrix_addr_lane(m, r)])
            if a % LDM_ROW_BYTES:
                raise ValueError(f"row address {a} (matrix {m}, row {r}) not 16-byte aligned")
            if a < 0 or a + LDM_ROW_BYTES > mem.size:
                raise IndexError(f"row address {a} (matrix {m}, row {r}) outside shared memory")
            tiles[m, r] = mem[a : a + LDM_ROW_BYTES].view("<u2")
    out = np.empty((WARP, num), dtype=np.uint32)
    for lane in range(WARP):
        for j in range(num):
            halves = [tiles[ldmatrix_frag(lane, j, e, trans)] for e in range(2)]
            out[lane, j] = np.uint32(halves[0]) | (np.uint32(halves[1]) << np.uint32(16))
    return out


# ---------------------------------------------------------------------------------------------
# mma.m16n8k32 .s8/.u8 and mma.m16n8k8 .tf32 (the shapes Triton emits for int8 and tf32 dots),
# and one warp-level entry point for every shape/type pair above (the PTX interpreter's mma).
# ---------------------------------------------------------------------------------------------
M16N8K32_A_REGS, M16N8K32_B_REGS = 4, 2
S8_PER_REG = 4


def frag_m16n8k32_a(lane: int, reg: int, elem: int) -> tuple[int, int]:
    """A (16x32, .s8/.u8): four .b32 registers of four 8-bit elements a0..a15 (Figure 88).

    row = groupID     for ai where 0 <= i < 4 || 8 <= i < 12;  groupID + 8 otherwise
    col = threadID_in_group*4 + (i & 0x3)        for i < 8
          threadID_in_group*4 + (i & 0x3) + 16   for i >= 8
    """
    i = _check(reg, elem, M16N8K32_A_REGS, S8_PER_REG)
    g, t = lane_coords(lane)
    row = g if (0 <= i < 4 or 8 <= i < 12) else g + 8
    return row, t * 4 + (i & 0x3) + (16 if i >= 8 else 0)


def frag_m16n8k32_b(lane: int, reg: int, elem: int) -> tuple[int, int]:
    """B (32x8, K x N, .s8/.u8): two .b32 registers of four 8-bit elements b0..b7 (Figure 89).

    row = threadID_in_group*4 + (i & 0x3)        for bi where i < 4
          threadID_in_group*4 + (i & 0x3) + 16   for bi where i >= 4
    col = groupID
    """
    i = _check(reg, elem, M16N8K32_B_REGS, S8_PER_REG)
    g, t = lane_coords(lane)
    return t * 4 + (i & 0x3) + (16 if i >= 4 else 0), g


def frag_m16n8k8_tf32_a(lane: int, reg: int, elem: int = 0) -> tuple[int, int]:
    """A (16x8, .tf32): four .b32 registers a0..a3, one element each (Figure 72).

    row = groupID for a0 and a2;  groupID + 8 for a1 and a3
    col = threadID_in_group for a0 and a1;  threadID_in_group + 4 for a2 and a3
    """
    i = _check(reg, elem, 4, 1)
    g, t = lane_coords(lane)
    return (g if i in (0, 2) else g + 8), (t if i < 2 else t + 4)


def frag_m16n8k8_tf32_b(lane: int, reg: int, elem: int = 0) -> tuple[int, int]:
    """B (8x8, K x N, .tf32): two .b32 registers b0, b1 (Figure 74).

    row = threadID_in_group for b0;  threadID_in_group + 4 for b1
    col = groupID
    """
    i = _check(reg, elem, 2, 1)
    g, t = lane_coords(lane)
    return (t if i == 0 else t + 4), g


@dataclass(frozen=True)
class MmaSpec:
    """One mma.sync shape and its operand types: fragment maps, registers, element widths."""

    m: int
    n: int
    k: int
    atype: str
    btype: str
    ctype: str
    a_frag: FragFn
    b_frag: FragFn
    c_frag: FragFn
    a_regs: int
    b_regs: int
    c_regs: int = 4

    @property
    def a_bits(self) -> int:
        return _ELEM_BITS[self.atype]

    @property
    def b_bits(self) -> int:
        return _ELEM_BITS[self.btype]


_ELEM_BITS = {"s4": 4, "u4": 4, "s8": 8, "u8": 8, "f16": 16, "bf16": 16, "tf32": 32}


def mma_spec(shape: str, atype: str, btype: str, ctype: str) -> MmaSpec:
    """The spec of ``mma.sync.aligned.<shape>.row.col.<dtype>.<atype>.<btype>.<ctype>``."""
    ints = {"s4", "u4", "s8", "u8"}
    if shape == "m16n8k64" and {atype, btype} <= {"s4", "u4"} and ctype == "s32":
        return MmaSpec(16, 8, 64, atype, btype, ctype, frag_m16n8k64_a, frag_m16n8k64_b, frag_m16n8k64_c, 4, 2)
    if shape == "m16n8k32" and {atype, btype} <= {"s8", "u8"} and ctype == "s32":
        return MmaSpec(16, 8, 32, atype, btype, ctype, frag_m16n8k32_a, frag_m16n8k32_b, frag_m16n8k64_c, 4, 2)
    if shape == "m16n8k16" and atype == btype and atype in ("f16", "bf16") and ctype == "f32":
        return MmaSpec(16, 8, 16, atype, btype, ctype, frag_m16n8k16_a, frag_m16n8k16_b, frag_m16n8k16_c, 4, 2)
    if shape == "m16n8k16" and atype == btype == ctype == "f16":  # .f16 accumulators: two .f16x2 registers
        return MmaSpec(16, 8, 16, atype, btype, ctype, frag_m16n8k16_a, frag_m16n8k16_b, frag_m16n8k16_c_f16,
                       4, 2, 2)  # fmt: skip
    if shape == "m16n8k8" and atype == btype == "tf32" and ctype == "f32":
        return MmaSpec(16, 8, 8, atype, btype, ctype, frag_m16n8k8_tf32_a, frag_m16n8k8_tf32_b, frag_m16n8k16_c,
                       4, 2)  # fmt: skip
    del ints
    raise NotImplementedError(f"mma {shape} {atype}.{btype} -> {ctype}")


def _decode(fields: NDArray[np.uint32], t: str) -> NDArray:
    if t in ("s4", "u4"):
        return _from_nibbles(fields, t == "u4")
    if t in ("s8", "u8"):
        v = fields.astype(np.int64)
        return v if t == "u8" else np.where(v >= 128, v - 256, v)
    if t in ("f16", "bf16"):
        return _half_vals(fields.astype(np.uint16), t == "bf16")
    if t == "tf32":  # only the tf32 bits (sign, exponent, 10 mantissa bits) take part
        return (fields.astype(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
    raise NotImplementedError(t)


def _operand(regs: NDArray[np.uint32], fn: FragFn, nregs: int, t: str, shape: tuple[int, int]) -> NDArray:
    bits = _ELEM_BITS[t]
    epr = 32 // bits
    rows, cols = frag_table(fn, nregs, epr)
    vals = _decode(_unpack_fields(regs, bits, epr) if epr > 1 else regs[..., None], t)
    out = np.zeros(shape, dtype=vals.dtype)
    out[rows, cols] = vals
    return out


def mma_sync(spec: MmaSpec, a_regs: ArrayLike, b_regs: ArrayLike, c_regs: ArrayLike, satfinite: bool = False) -> NDArray[np.uint32]:
    """One warp's ``mma.sync.aligned`` on raw 32-bit registers: a [32, a_regs], b [32, b_regs], c and
    the result [32, 4] (bit patterns: int32 for .s32, fp32 for .f32 accumulators).

    Integer products are exact; .s32 sums wrap modulo 2^32, or clamp with .satfinite. Float
    products are exact in float64, summed with C in float64, rounded once to fp32, or to fp16
    for .f16 accumulators (see mma_m16n8k16_f16 for why this is a model: the ISA leaves
    accumulation order unspecified; for .f16 the hardware's intermediate precision too)."""
    a = _check_regs(a_regs, spec.a_regs, "a_regs")
    b = _check_regs(b_regs, spec.b_regs, "b_regs")
    c = _check_regs(c_regs, spec.c_regs, "c_regs")
    A = _operand(a, spec.a_frag, spec.a_regs, spec.atype, (spec.m, spec.k))
    B = _operand(b, spec.b_frag, spec.b_regs, spec.btype, (spec.k, spec.n))
    if spec.ctype == "f16":
        rows, cols = frag_table(spec.c_frag, spec.c_regs, 2)
        C = np.zeros((spec.m, spec.n), dtype=np.float64)
        C[rows, cols] = _half_vals(_unpack_fields(c, 16, 2), False)
        D = f16_to_bits(A @ B + C).astype(np.uint32)[rows, cols]  # [32, 2, 2] halves
        return D[..., 0] | (D[..., 1] << np.uint32(16))
    rows, cols = frag_table(spec.c_frag, spec.c_regs, 1)
    C = np.zeros((spec.m, spec.n), dtype=np.int64 if spec.ctype == "s32" else np.float64)
    cv = c.view(np.int32).astype(np.int64) if spec.ctype == "s32" else c.view(np.float32).astype(np.float64)
    C[rows, cols] = cv[..., None]
    if spec.ctype == "s32":
        D = A.astype(np.int64) @ B.astype(np.int64) + C
        D = np.clip(D, INT32_MIN, INT32_MAX) if satfinite else ((D - INT32_MIN) % (2**32)) + INT32_MIN
        return D.astype(np.int32)[rows, cols][..., 0].view(np.uint32)
    D = (A @ B + C).astype(np.float32)
    return D[rows, cols][..., 0].view(np.uint32)
