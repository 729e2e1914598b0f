"""Self-tests of ptx_isa.py against the PTX ISA text (sections cited by title; see ptx_isa.py header).

Three kinds of checks, so that a mistake in one table cannot hide behind the same mistake elsewhere:
* hand-worked entries of the ISA formulas / figures (fixed numbers, not recomputed by the module);
* packing a matrix into fragments, running the emulated mma and unpacking == numpy A @ B + C;
* ldmatrix (whose lane map comes from the ldmatrix section only) feeding mma fragments
  (whose maps come from the "Matrix Fragments" sections) reproduces the stored matrices.

Copied from the emulator's author (/work/ptx_emu, with ptx_isa.py unchanged); only the import of
ptx_isa (a package-relative import instead of a sys.path insert) and zip(strict=True) differ. The
m16n8k32 .s8 / m16n8k8 .tf32 tests at the end came later, with the PTX interpreter (ptx_exec.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from . import ptx_isa as P

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- fragment maps


def test_lane_coords() -> None:
    assert P.lane_coords(0) == (0, 0)
    assert P.lane_coords(13) == (3, 1)
    assert P.lane_coords(31) == (7, 3)
    with pytest.raises(ValueError):
        P.lane_coords(32)


@pytest.mark.parametrize(
    ("lane", "reg", "elem", "expected"),
    [
        # "Matrix Fragments for mma.m16n8k64", Figure 93: T0 holds a0..a7 = row 0, cols 0..7.
        (0, 0, 0, (0, 0)),
        (0, 0, 7, (0, 7)),
        (0, 1, 0, (8, 0)),  # a8: row groupID + 8
        (0, 2, 0, (0, 32)),  # a16: col + 32
        (0, 3, 7, (8, 39)),  # a31
        (5, 1, 3, (9, 11)),  # groupID 1, tid 1, i = 11
        (31, 3, 7, (15, 63)),
    ],
)
def test_frag_m16n8k64_a_entries(lane: int, reg: int, elem: int, expected: tuple[int, int]) -> None:
    assert P.frag_m16n8k64_a(lane, reg, elem) == expected


@pytest.mark.parametrize(
    ("lane", "reg", "elem", "expected"),
    [
        (0, 0, 0, (0, 0)),
        (1, 0, 5, (13, 0)),  # tid 1: rows 8..15
        (4, 0, 0, (0, 1)),  # groupID 1 -> col 1
        (2, 1, 0, (48, 0)),  # b8: row tid*8 + 32
        (31, 1, 7, (63, 7)),
    ],
)
def test_frag_m16n8k64_b_entries(lane: int, reg: int, elem: int, expected: tuple[int, int]) -> None:
    assert P.frag_m16n8k64_b(lane, reg, elem) == expected


@pytest.mark.parametrize(
    ("lane", "reg", "expected"),
    [(0, 0, (0, 0)), (0, 1, (0, 1)), (0, 2, (8, 0)), (0, 3, (8, 1)), (6, 1, (1, 5)), (31, 3, (15, 7))],
)
def test_frag_c_entries(lane: int, reg: int, expected: tuple[int, int]) -> None:
    assert P.frag_m16n8k64_c(lane, reg) == expected
    assert P.frag_m16n8k16_c(lane, reg) == expected  # identical tables in the ISA


@pytest.mark.parametrize(
    ("lane", "reg", "elem", "expected"),
    [
        (0, 0, 0, (0, 0)),
        (0, 0, 1, (0, 1)),
        (0, 1, 0, (8, 0)),  # a2
        (0, 2, 1, (0, 9)),  # a5: col + 8
        (0, 3, 0, (8, 8)),  # a6
        (7, 2, 0, (1, 14)),
        (31, 3, 1, (15, 15)),
    ],
)
def test_frag_m16n8k16_a_entries(lane: int, reg: int, elem: int, expected: tuple[int, int]) -> None:
    assert P.frag_m16n8k16_a(lane, reg, elem) == expected


@pytest.mark.parametrize(
    ("lane", "reg", "elem", "expected"),
    [(0, 0, 0, (0, 0)), (0, 0, 1, (1, 0)), (3, 0, 1, (7, 0)), (3, 1, 1, (15, 0)), (29, 1, 0, (10, 7))],
)
def test_frag_m16n8k16_b_entries(lane: int, reg: int, elem: int, expected: tuple[int, int]) -> None:
    assert P.frag_m16n8k16_b(lane, reg, elem) == expected


@pytest.mark.parametrize(
    ("fn", "nregs", "epr", "shape"),
    [
        (P.frag_m16n8k64_a, 4, 8, (16, 64)),
        (P.frag_m16n8k64_b, 2, 8, (64, 8)),
        (P.frag_m16n8k64_c, 4, 1, (16, 8)),
        (P.frag_m16n8k16_a, 4, 2, (16, 16)),
        (P.frag_m16n8k16_b, 2, 2, (16, 8)),
        (P.frag_m16n8k16_c, 4, 1, (16, 8)),
    ],
)
def test_frag_maps_are_bijections(fn, nregs: int, epr: int, shape: tuple[int, int]) -> None:
    rows, cols = P.frag_table(fn, nregs, epr)
    seen = set(zip(rows.ravel().tolist(), cols.ravel().tolist(), strict=True))
    assert len(seen) == shape[0] * shape[1] == rows.size
    assert rows.min() == 0 and rows.max() == shape[0] - 1
    assert cols.min() == 0 and cols.max() == shape[1] - 1


def test_s4_nibble_order_in_register() -> None:
    """Elements "low to high": a0 in bits 3:0 ... a7 in bits 31:28 of the first register."""
    regs = np.zeros((32, 4), dtype=np.uint32)
    regs[0, 0] = 0x7654_3210
    regs[0, 2] = 0x0000_00F8  # a16 = -8 (0x8), a17 = -1 (0xF)
    A = P.unpack_A_m16n8k64(regs)
    assert A[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert A[0, 32] == -8 and A[0, 33] == -1
    assert np.count_nonzero(A) == 7 + 2
    assert P.unpack_A_m16n8k64(regs, unsigned=True)[0, 32] == 8


def test_f16x2_half_order_in_register() -> None:
    """a0 in bits 15:0, a1 in bits 31:16 of an .f16x2 register."""
    regs = np.zeros((32, 4), dtype=np.uint32)
    regs[0, 0] = (0x4000 << 16) | 0x3C00  # a1 = 2.0, a0 = 1.0
    A = P.unpack_A_m16n8k16(regs)
    assert A[0, 0] == 1.0 and A[0, 1] == 2.0 and np.count_nonzero(A) == 2


# ----------------------------------------------------------------------------- mma m16n8k64


def _rand_s4(shape: tuple[int, int], unsigned: bool) -> np.ndarray:
    return RNG.integers(0, 16, shape) if unsigned else RNG.integers(-8, 8, shape)


@pytest.mark.parametrize("a_unsigned", [False, True])
@pytest.mark.parametrize("trial", range(5))
def test_mma_m16n8k64_random(a_unsigned: bool, trial: int) -> None:
    A = _rand_s4((16, 64), a_unsigned)
    B = _rand_s4((64, 8), False)
    C = RNG.integers(-(2**20), 2**20, (16, 8))
    d = P.mma_m16n8k64_s4(
        P.pack_A_m16n8k64(A, a_unsigned), P.pack_B_m16n8k64(B), P.pack_C_m16n8k64(C), a_unsigned
    )
    assert d.dtype == np.int32 and d.shape == (32, 4)
    np.testing.assert_array_equal(P.unpack_D_m16n8k64(d), A @ B + C)


@pytest.mark.parametrize(
    ("a_val", "b_val", "a_unsigned"),
    [
        (-8, -8, False),
        (7, -8, False),
        (-8, 7, False),
        (7, 7, False),
        (15, -8, True),
        (15, 7, True),
        (0, -8, True),
    ],
)
def test_mma_m16n8k64_extremes(a_val: int, b_val: int, a_unsigned: bool) -> None:
    A = np.full((16, 64), a_val)
    B = np.full((64, 8), b_val)
    d = P.mma_m16n8k64_s4(
        P.pack_A_m16n8k64(A, a_unsigned), P.pack_B_m16n8k64(B), np.zeros((32, 4), np.int32), a_unsigned
    )
    np.testing.assert_array_equal(P.unpack_D_m16n8k64(d), np.full((16, 8), 64 * a_val * b_val))


def test_mma_m16n8k64_extreme_mix() -> None:
    """Only -8 / 7 (s4) and 0 / 15 (u4) values, mixed per element."""
    A_s = RNG.choice([-8, 7], (16, 64))
    A_u = RNG.choice([0, 15], (16, 64))
    B = RNG.choice([-8, 7], (64, 8))
    zero = np.zeros((32, 4), np.int32)
    for A, uns in ((A_s, False), (A_u, True)):
        d = P.mma_m16n8k64_s4(P.pack_A_m16n8k64(A, uns), P.pack_B_m16n8k64(B), zero, uns)
        np.testing.assert_array_equal(P.unpack_D_m16n8k64(d), A @ B)


def test_mma_m16n8k64_same_bits_signed_vs_unsigned() -> None:
    """The .u4/.s4 qualifier changes the meaning of the same bits: nibble 0xF is 15 or -1."""
    A = np.full((16, 64), 15)
    a = P.pack_A_m16n8k64(A, unsigned=True)
    B = np.ones((64, 8), dtype=np.int64)
    b = P.pack_B_m16n8k64(B)
    zero = np.zeros((32, 4), np.int32)
    assert np.all(P.mma_m16n8k64_s4(a, b, zero, a_unsigned=True) == 64 * 15)
    assert np.all(P.mma_m16n8k64_s4(a, b, zero, a_unsigned=False) == -64)


def test_mma_m16n8k64_transposed_B_and_unsigned_B() -> None:
    A = _rand_s4((16, 64), False)
    W = _rand_s4((8, 64), True)  # weights as N x K, .u4
    d = P.mma_m16n8k64_s4(
        P.pack_A_m16n8k64(A), P.pack_Bt_m16n8k64(W, True), np.zeros((32, 4), np.int32), b_unsigned=True
    )
    np.testing.assert_array_equal(P.unpack_D_m16n8k64(d), A @ W.T)


def test_mma_m16n8k64_wrap_and_satfinite() -> None:
    """ "Multiply-and-Accumulate Instruction: mma": wrap without .satfinite, clamp with it."""
    A = np.full((16, 64), 7)
    B = np.full((64, 8), 7)  # A@B = 3136 everywhere
    C = np.full((16, 8), P.INT32_MAX - 100)
    args = (P.pack_A_m16n8k64(A), P.pack_B_m16n8k64(B), P.pack_C_m16n8k64(C))
    wrapped = P.unpack_D_m16n8k64(P.mma_m16n8k64_s4(*args))
    assert np.all(wrapped == P.INT32_MIN + 3136 - 101)
    sat = P.unpack_D_m16n8k64(P.mma_m16n8k64_s4(*args, satfinite=True))
    assert np.all(sat == P.INT32_MAX)


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        P.pack_A_m16n8k64(np.full((16, 64), 8))
    with pytest.raises(ValueError):
        P.pack_A_m16n8k64(np.full((16, 64), -1), unsigned=True)
    with pytest.raises(ValueError):
        P.pack_B_m16n8k64(np.zeros((8, 64), dtype=int))


def test_pack_unpack_roundtrip_s4() -> None:
    A = _rand_s4((16, 64), False)
    B = _rand_s4((64, 8), True)
    np.testing.assert_array_equal(P.unpack_A_m16n8k64(P.pack_A_m16n8k64(A)), A)
    np.testing.assert_array_equal(P.unpack_B_m16n8k64(P.pack_B_m16n8k64(B, True), True), B)


# ----------------------------------------------------------------------------- mma m16n8k16


@pytest.mark.parametrize("bf16", [False, True])
def test_mma_m16n8k16_exact_small_integers(bf16: bool) -> None:
    """Small integer values: every product and sum is exact in f16/bf16/f32, so D must equal A@B+C."""
    A = RNG.integers(-8, 8, (16, 16)).astype(np.float32)
    B = RNG.integers(-8, 8, (16, 8)).astype(np.float32)
    C = RNG.integers(-100, 100, (16, 8)).astype(np.float32)
    mma = P.mma_m16n8k16_bf16 if bf16 else P.mma_m16n8k16_f16
    d = mma(P.pack_A_m16n8k16(A, bf16), P.pack_B_m16n8k16(B, bf16), P.pack_C_m16n8k16(C))
    assert d.dtype == np.float32 and d.shape == (32, 4)
    np.testing.assert_array_equal(P.unpack_D_m16n8k16(d), A @ B + C)


@pytest.mark.parametrize("bf16", [False, True])
def test_mma_m16n8k16_random(bf16: bool) -> None:
    A = RNG.standard_normal((16, 16)).astype(np.float32)
    B = RNG.standard_normal((16, 8)).astype(np.float32)
    C = RNG.standard_normal((16, 8)).astype(np.float32)
    rnd = P.round_to_bf16 if bf16 else (lambda x: np.asarray(x, np.float16).astype(np.float32))
    Aq, Bq = rnd(A).astype(np.float64), rnd(B).astype(np.float64)
    mma = P.mma_m16n8k16_bf16 if bf16 else P.mma_m16n8k16_f16
    a, b, c = P.pack_A_m16n8k16(A, bf16), P.pack_B_m16n8k16(B, bf16), P.pack_C_m16n8k16(C)
    ref = Aq @ Bq + C.astype(np.float64)
    np.testing.assert_allclose(P.unpack_D_m16n8k16(mma(a, b, c)), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(P.unpack_D_m16n8k16(mma(a, b, c, f64_out=True)), ref, rtol=1e-13, atol=1e-13)
    # the unrounded model differs from a plain f32 (non-quantized) product: rounding to f16/bf16 matters
    assert not np.allclose(A.astype(np.float64) @ B, Aq @ Bq, rtol=1e-7, atol=0)


def test_mma_m16n8k16_transposed_B() -> None:
    A = RNG.integers(-4, 4, (16, 16)).astype(np.float32)
    W = RNG.integers(-4, 4, (8, 16)).astype(np.float32)
    d = P.mma_m16n8k16_f16(P.pack_A_m16n8k16(A), P.pack_Bt_m16n8k16(W), np.zeros((32, 4), np.float32))
    np.testing.assert_array_equal(P.unpack_D_m16n8k16(d), A @ W.T)


def test_bf16_rounding_is_nearest_even() -> None:
    one_ulp = 2.0**-7  # bf16 ulp at 1.0
    x = np.array([1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, 1.0 + one_ulp / 4], dtype=np.float32)
    np.testing.assert_array_equal(P.round_to_bf16(x), [1.0, 1.0 + 2 * one_ulp, 1.0])
    assert P.bf16_to_bits(np.float32(1.0)) == 0x3F80


# ----------------------------------------------------------------------------- ldmatrix


def _smem_from_rows(rows_bytes: list[bytes], stride: int) -> bytearray:
    mem = bytearray(stride * len(rows_bytes))
    for i, rb in enumerate(rows_bytes):
        mem[i * stride : i * stride + len(rb)] = rb
    return mem


def test_ldmatrix_lane_address_table() -> None:
    assert [P.ldmatrix_addr_lane(m, 0) for m in range(4)] == [0, 8, 16, 24]
    assert P.ldmatrix_addr_lane(2, 5) == 21


def test_ldmatrix_x1_single_tile_entries() -> None:
    """One row-major 8x8 b16 tile: lane l gets row l>>2, cols 2(l%4), 2(l%4)+1 (Figure 104)."""
    M = np.arange(64, dtype=np.uint16).reshape(8, 8) + 0x100  # element (r, c) = 0x100 + 8r + c
    mem = M.astype("<u2").tobytes()
    addrs = [16 * r for r in range(8)] + [-1] * 24  # lanes 8..31 are ignored for .x1
    regs = P.ldmatrix(mem, addrs, 1)
    assert regs.shape == (32, 1) and regs.dtype == np.uint32
    assert regs[0, 0] == (0x101 << 16) | 0x100  # row 0, cols 0,1
    assert regs[3, 0] == (0x107 << 16) | 0x106  # row 0, cols 6,7
    assert regs[5, 0] == (0x10B << 16) | 0x10A  # row 1, cols 2,3
    regs_t = P.ldmatrix(mem, addrs, 1, trans=True)
    assert regs_t[0, 0] == (0x108 << 16) | 0x100  # col 0, rows 0,1
    assert regs_t[5, 0] == (0x119 << 16) | 0x111  # col 1, rows 2,3
    assert regs_t[31, 0] == (0x13F << 16) | 0x137  # col 7, rows 6,7


def test_ldmatrix_x4_f16_tile_is_mma_A_fragment() -> None:
    """A[16,16] f16 stored row-major (padded stride) -> ldmatrix.x4 == the m16n8k16 A fragment.

    Lanes 0-7 address rows 0-7 at col 0, lanes 8-15 rows 8-15 at col 0, lanes 16-23 rows 0-7 at
    col 8, lanes 24-31 rows 8-15 at col 8 (a0a1 / a2a3 / a4a5 / a6a7 sub-tiles of Figure 79).
    """
    A = RNG.integers(-50, 50, (16, 16)).astype(np.float16)
    stride = 48
    mem = _smem_from_rows([row.astype("<f2").tobytes() for row in A], stride)
    addrs = []
    for lane in range(32):
        m, r = divmod(lane, 8)
        addrs.append((r + 8 * (m % 2)) * stride + 2 * 8 * (m // 2))
    regs = P.ldmatrix(mem, addrs, 4)
    np.testing.assert_array_equal(regs, P.pack_A_m16n8k16(A.astype(np.float32)))
    np.testing.assert_array_equal(P.unpack_A_m16n8k16(regs), A.astype(np.float64))
    # and it drives the mma correctly
    B = RNG.integers(-5, 5, (16, 8)).astype(np.float32)
    d = P.mma_m16n8k16_f16(regs, P.pack_B_m16n8k16(B), np.zeros((32, 4), np.float32))
    np.testing.assert_array_equal(P.unpack_D_m16n8k16(d), A.astype(np.float32) @ B)


def test_ldmatrix_x2_B_from_n_by_k_storage() -> None:
    """W[8,16] (N x K, row-major bf16): ldmatrix.x2 (no .trans) == the B fragment of B = W.T."""
    W = P.round_to_bf16(RNG.standard_normal((8, 16)).astype(np.float32))
    mem = P.bf16_to_bits(W).astype("<u2").tobytes()  # 32 bytes per row
    addrs = [(lane % 8) * 32 + 16 * (lane // 8) for lane in range(16)] + [0] * 16
    regs = P.ldmatrix(mem, addrs, 2)
    np.testing.assert_array_equal(regs, P.pack_Bt_m16n8k16(W, bf16=True))
    np.testing.assert_array_equal(P.unpack_B_m16n8k16(regs, bf16=True), W.T.astype(np.float64))


def test_ldmatrix_x2_trans_B_from_k_by_n_storage() -> None:
    """B[16,8] (K x N, row-major f16): ldmatrix.x2.trans == the B fragment (Figure 81)."""
    B = RNG.integers(-100, 100, (16, 8)).astype(np.float16)
    mem = B.astype("<f2").tobytes()  # 16 bytes per row
    addrs = [16 * (8 * (lane // 8) + lane % 8) for lane in range(16)] + [0] * 16
    regs = P.ldmatrix(mem, addrs, 2, trans=True)
    np.testing.assert_array_equal(regs, P.pack_B_m16n8k16(B.astype(np.float32)))
    # without .trans the same addresses give the fragment of the transposed matrix instead
    wrong = P.ldmatrix(mem, addrs, 2, trans=False)
    assert not np.array_equal(wrong, regs)


def test_ldmatrix_x4_trans_A_from_column_major_storage() -> None:
    """A stored column-major (A.T row-major) -> ldmatrix.x4.trans == the m16n8k16 A fragment."""
    A = RNG.integers(-50, 50, (16, 16)).astype(np.float16)
    mem = np.ascontiguousarray(A.T).astype("<f2").tobytes()  # row k of storage = column k of A
    addrs = []
    for lane in range(32):
        m, r = divmod(lane, 8)
        # matrix m covers A rows 8*(m%2).., cols 8*(m//2)..: storage rows = A cols
        addrs.append((8 * (m // 2) + r) * 32 + 2 * 8 * (m % 2))
    regs = P.ldmatrix(mem, addrs, 4, trans=True)
    np.testing.assert_array_equal(regs, P.pack_A_m16n8k16(A.astype(np.float32)))


def _pack_nibbles_rowmajor(X: np.ndarray) -> bytes:
    """Row-major 4-bit storage, element 2j in the low nibble of byte j (little-endian order)."""
    n = (X.astype(np.int64) & 0xF).astype(np.uint8)
    return (n[:, 0::2] | (n[:, 1::2] << 4)).astype(np.uint8).tobytes()


def test_ldmatrix_x4_b16_on_packed_s4_is_mma_m16n8k64_A_fragment() -> None:
    """ldmatrix .b16 moves 4 nibbles per element: a 16x64 s4 tile (32 bytes/row) via .x4 == A frag."""
    A = _rand_s4((16, 64), False)
    mem = _pack_nibbles_rowmajor(A)
    addrs = []
    for lane in range(32):
        m, r = divmod(lane, 8)
        addrs.append((r + 8 * (m % 2)) * 32 + 16 * (m // 2))
    regs = P.ldmatrix(mem, addrs, 4)
    np.testing.assert_array_equal(regs, P.pack_A_m16n8k64(A))
    B = _rand_s4((64, 8), False)
    d = P.mma_m16n8k64_s4(regs, P.pack_B_m16n8k64(B), np.zeros((32, 4), np.int32))
    np.testing.assert_array_equal(P.unpack_D_m16n8k64(d), A @ B)


def test_ldmatrix_x2_b16_on_packed_u4_weights_is_mma_m16n8k64_B_fragment() -> None:
    W = _rand_s4((8, 64), True)  # N x K weights
    mem = _pack_nibbles_rowmajor(W)
    addrs = [(lane % 8) * 32 + 16 * (lane // 8) for lane in range(16)] + [0] * 16
    regs = P.ldmatrix(mem, addrs, 2)
    np.testing.assert_array_equal(regs, P.pack_Bt_m16n8k64(W, unsigned=True))


def test_ldmatrix_rejects_misaligned_and_out_of_bounds() -> None:
    mem = bytes(256)
    with pytest.raises(ValueError):
        P.ldmatrix(mem, [8] + [0] * 31, 1)
    with pytest.raises(IndexError):
        P.ldmatrix(mem, [256] + [0] * 31, 1)
    with pytest.raises(ValueError):
        P.ldmatrix(mem, [0] * 32, 3)


# ----------------------------------------------------------------------------- m16n8k32 s8, m16n8k8 tf32
# (added with the PTX interpreter, tests/ptx_exec.py; ISA sections "Matrix Fragments for mma.m16n8k32"
# and "Matrix Fragments for mma.m16n8k8", hand-worked entries below)


@pytest.mark.parametrize(
    "fn,lane,reg,elem,expected",
    [
        (P.frag_m16n8k32_a, 5, 0, 2, (1, 6)),  # g=1 t=1, i=2: row g, col 4t+2
        (P.frag_m16n8k32_a, 5, 1, 0, (9, 4)),  # i=4: row g+8, col 4t
        (P.frag_m16n8k32_a, 5, 2, 3, (1, 23)),  # i=11: row g, col 4t+3+16
        (P.frag_m16n8k32_a, 5, 3, 1, (9, 21)),  # i=13: row g+8, col 4t+1+16
        (P.frag_m16n8k32_b, 6, 0, 3, (11, 1)),  # g=1 t=2, i=3: row 4t+3, col g
        (P.frag_m16n8k32_b, 6, 1, 0, (24, 1)),  # i=4: row 4t+16
        (P.frag_m16n8k8_tf32_a, 9, 0, 0, (2, 1)),  # g=2 t=1: a0 (g, t)
        (P.frag_m16n8k8_tf32_a, 9, 1, 0, (10, 1)),  # a1 (g+8, t)
        (P.frag_m16n8k8_tf32_a, 9, 2, 0, (2, 5)),  # a2 (g, t+4)
        (P.frag_m16n8k8_tf32_a, 9, 3, 0, (10, 5)),  # a3 (g+8, t+4)
        (P.frag_m16n8k8_tf32_b, 9, 0, 0, (1, 2)),  # b0 (t, g)
        (P.frag_m16n8k8_tf32_b, 9, 1, 0, (5, 2)),  # b1 (t+4, g)
    ],
)
def test_frag_new_shapes_entries(fn, lane: int, reg: int, elem: int, expected: tuple[int, int]) -> None:
    assert fn(lane, reg, elem) == expected


@pytest.mark.parametrize(
    "fn,nregs,epr,shape",
    [
        (P.frag_m16n8k32_a, 4, 4, (16, 32)),
        (P.frag_m16n8k32_b, 2, 4, (32, 8)),
        (P.frag_m16n8k8_tf32_a, 4, 1, (16, 8)),
        (P.frag_m16n8k8_tf32_b, 2, 1, (8, 8)),
    ],
)
def test_new_frag_maps_are_bijections(fn, nregs: int, epr: int, shape: tuple[int, int]) -> None:
    test_frag_maps_are_bijections(fn, nregs, epr, shape)


def _lane_rows(row_addr) -> np.ndarray:
    """ldmatrix.x4 lane addresses: lane l gives row l % 8 of matrix l // 8."""
    return np.array([row_addr(lane // 8, lane % 8) for lane in range(32)])


def test_mma_sync_s8_from_ldmatrix_equals_matmul() -> None:
    """int8 A [16, 32] and W [8, 32] stored row-major, loaded by ldmatrix (its own lane map): the
    m16n8k32 fragments (the mma section's maps) multiply to A @ W^T, wrapping / saturating."""
    a = RNG.integers(-128, 128, (16, 32)).astype(np.int8)
    w = RNG.integers(-128, 128, (8, 32)).astype(np.int8)
    smem = np.concatenate([a.view(np.uint8).ravel(), w.view(np.uint8).ravel()])
    # A: matrices 0..3 = rows 0-7 / 8-15, bytes 0-15 / 16-31 (a0..a3 of the fragment table)
    a_regs = P.ldmatrix(smem, _lane_rows(lambda mt, r: (r + 8 * (mt % 2)) * 32 + 16 * (mt // 2)), 4)
    b_regs = P.ldmatrix(smem, _lane_rows(lambda mt, r: 512 + r * 32 + 16 * (mt % 2)), 2)
    c = RNG.integers(-1000, 1000, (16, 8)).astype(np.int32)
    spec = P.mma_spec("m16n8k32", "s8", "s8", "s32")
    rows, cols = P.frag_table(P.frag_m16n8k64_c, 4, 1)
    d = P.mma_sync(spec, a_regs, b_regs, c[rows, cols][..., 0].view(np.uint32))
    assert np.array_equal(P.unpack_D_m16n8k64(d.view(np.int32)), a.astype(np.int64) @ w.T.astype(np.int64) + c)
    u = P.mma_spec("m16n8k32", "u8", "s8", "s32")
    d = P.mma_sync(u, a_regs, b_regs, np.zeros((32, 4), np.uint32))
    assert np.array_equal(P.unpack_D_m16n8k64(d.view(np.int32)), a.view(np.uint8).astype(np.int64) @ w.T.astype(np.int64))
    big = np.full((32, 4), 2**31 - 1, dtype=np.int32).view(np.uint32)
    ones = np.full((32, 4), 0x01010101, np.uint32)
    sat = P.mma_sync(spec, ones, ones[:, :2], big, satfinite=True).view(np.int32)
    wrap = P.mma_sync(spec, ones, ones[:, :2], big).view(np.int32)
    assert (sat == 2**31 - 1).all() and (wrap == -(2**31) + 31).all()


def test_mma_sync_tf32_from_ldmatrix_reads_only_tf32_bits() -> None:
    """fp32 A [16, 8] and W [8, 8] row-major through ldmatrix (b16 pairs = one fp32 element):
    the m16n8k8 tf32 fragments give A @ W^T; the 13 low mantissa bits are not used."""
    a = (RNG.integers(-64, 64, (16, 8)) / 8).astype(np.float32)  # exact in tf32
    w = (RNG.integers(-64, 64, (8, 8)) / 4).astype(np.float32)
    noise = RNG.integers(0, 1 << 13, a.shape).astype(np.uint32)
    a_noisy = (a.view(np.uint32) | noise).view(np.float32)  # same tf32 bits
    smem = np.concatenate([a_noisy.view(np.uint8).ravel(), w.view(np.uint8).ravel()])
    a_regs = P.ldmatrix(smem, _lane_rows(lambda mt, r: (r + 8 * (mt % 2)) * 32 + 16 * (mt // 2)), 4)
    b_regs = P.ldmatrix(smem, _lane_rows(lambda mt, r: 512 + r * 32 + 16 * (mt % 2)), 2)
    spec = P.mma_spec("m16n8k8", "tf32", "tf32", "f32")
    d = P.mma_sync(spec, a_regs, b_regs, np.zeros((32, 4), np.uint32))
    assert np.array_equal(P.unpack_D_m16n8k16(d.view(np.float32)), a @ w.T)


def test_mma_sync_agrees_with_the_shape_specific_emulators() -> None:
    a4, b4 = RNG.integers(-8, 8, (16, 64)), RNG.integers(-8, 8, (64, 8))
    ar, br = P.pack_A_m16n8k64(a4), P.pack_B_m16n8k64(b4)
    c = RNG.integers(-99, 99, (32, 4)).astype(np.int32)
    got = P.mma_sync(P.mma_spec("m16n8k64", "s4", "s4", "s32"), ar, br, c.view(np.uint32)).view(np.int32)
    assert np.array_equal(got, P.mma_m16n8k64_s4(ar, br, c))
    ah, bh = RNG.standard_normal((16, 16)), RNG.standard_normal((16, 8))
    ar, br = P.pack_A_m16n8k16(ah, bf16=True), P.pack_B_m16n8k16(bh, bf16=True)
    cf = RNG.standard_normal((32, 4)).astype(np.float32)
    got = P.mma_sync(P.mma_spec("m16n8k16", "bf16", "bf16", "f32"), ar, br, cf.view(np.uint32)).view(np.float32)
    assert np.array_equal(got, P.mma_m16n8k16_bf16(ar, br, cf))


def test_mma_sync_f16_accumulators() -> None:
    """m16n8k16 .f16.f16.f16.f16 (sageattention's PV dot): C and D as two .f16x2 registers, c0/c1
    in the first (c0 low), at the .f32 layout's positions; small-integer operands, so the products
    and sums are exact and the model's single rounding is no rounding."""
    a, b = RNG.integers(-8, 8, (16, 16)), RNG.integers(-8, 8, (16, 8))
    c = RNG.integers(-64, 64, (16, 8))
    spec = P.mma_spec("m16n8k16", "f16", "f16", "f16")
    rows, cols = P.frag_table(P.frag_m16n8k16_c_f16, 2, 2)
    halves = P.f16_to_bits(c[rows, cols]).astype(np.uint32)  # [32, 2, 2]
    c_regs = halves[..., 0] | (halves[..., 1] << np.uint32(16))
    d = P.mma_sync(spec, P.pack_A_m16n8k16(a), P.pack_B_m16n8k16(b), c_regs)
    got = np.zeros((16, 8))
    got[rows, cols] = P.bits_to_f16(np.stack([d & 0xFFFF, d >> 16], axis=-1).astype(np.uint16))
    assert np.array_equal(got, a @ b + c)
    f32_rows, f32_cols = P.frag_table(P.frag_m16n8k16_c, 4, 1)  # the same places as the .f32 c0..c3
    assert np.array_equal(rows.reshape(32, 4), f32_rows[..., 0]) and np.array_equal(cols.reshape(32, 4), f32_cols[..., 0])
