"""The PTX interpreter (tests/ptx_exec.py) instruction by instruction, on hand-written kernels.

Each expectation is computed here from the ISA's definition, one lane at a time in plain Python
(exact rationals for the float roundings), not by the interpreter's vectorised code; and each
check of the memory model (races, in-flight cp.async data, bounds, alignment, divergence) is
shown to fire on a kernel that has the fault and to stay quiet on the same kernel without it.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest

from . import ptx_exec as X
from . import ptx_isa as P

T = 64  # two warps
RNG = np.random.default_rng(7)

HEAD = """.version 8.7
.target sm_86
.address_size 64
.extern .shared .align 16 .b8 smem[];
.visible .entry k(.param .u64 k_out, .param .u64 k_in)
{
.reg .pred %p<20>;
.reg .b16 %rs<20>;
.reg .b32 %r<100>;
.reg .b64 %rd<40>;
ld.param.u64 %rd1, [k_out];
ld.param.u64 %rd2, [k_in];
mov.u32 %r1, %tid.x;
mul.wide.u32 %rd3, %r1, 4;
add.s64 %rd4, %rd1, %rd3;
add.s64 %rd5, %rd2, %rd3;
ld.global.b32 %r10, [%rd5];
ld.global.b32 %r11, [%rd5+256];
ld.global.b32 %r12, [%rd5+512];
"""


def run(body: str, a, b=None, c=None, smem: int = 1024, threads: int = T, approx: str = "exact"):
    """Run ``body`` with r10, r11, r12 = a, b, c of the thread (uint32 bit patterns); the kernel
    stores its result with ``st.global.b32 [%rd4], ...``. Returns (out uint32 [T], findings)."""
    ins = np.zeros(3 * T, dtype=np.uint32)
    for i, v in enumerate((a, b, c)):
        if v is not None:
            ins[i * T : (i + 1) * T] = (
                np.asarray(v).view(np.uint32) if np.asarray(v).dtype.itemsize == 4 else v
            )
    mem = X.GlobalMemory()
    out = mem.alloc("out", threads * 4, fill=0)
    inp = mem.alloc("in", ins, readonly=True)
    kernel = X.parse(HEAD + body + "\nret;\n}\n")
    findings = X.launch(kernel, mem, [out, inp], (1, 1, 1), threads, smem, approx=approx)
    return mem.get("out").view(np.uint32).copy(), findings


def u32(x) -> np.ndarray:
    return (np.asarray(x, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def rand32(n: int = T) -> np.ndarray:
    return RNG.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)


# --- integer and bit instructions --------------------------------------------------------------


def test_prmt_default_mode():
    a, b = rand32(), rand32()
    sels = [0x3210, 0x7654, 0x5410, 0x3340, 0x8888, 0xC0A1]
    for sel in sels:
        got, _ = run(f"prmt.b32 %r20, %r10, %r11, {sel:#x};\nst.global.b32 [%rd4], %r20;", a, b)
        for lane in range(0, T, 7):
            both = int(a[lane]) | int(b[lane]) << 32  # bytes 0-3 from a, 4-7 from b
            want = 0
            for i in range(4):
                s = sel >> (4 * i) & 0xF
                byte = both >> (8 * (s & 7)) & 0xFF
                if s & 8:  # replicate the sign bit of the selected byte
                    byte = 0xFF if byte & 0x80 else 0
                want |= byte << (8 * i)
            assert got[lane] == want, (hex(sel), lane)


@pytest.mark.parametrize("signed", [False, True])
def test_bfe(signed):
    a = rand32()
    for pos, ln in [(0, 8), (4, 4), (28, 8), (31, 1), (3, 0), (40, 4), (1, 31)]:
        t = "s32" if signed else "u32"
        got, _ = run(f"bfe.{t} %r20, %r10, {pos}, {ln};\nst.global.b32 [%rd4], %r20;", a)
        for lane in range(0, T, 5):
            x = int(a[lane])
            if ln == 0:
                want = 0
            else:
                field = [(x >> min(pos + i, 31)) & 1 if pos + i < 32 else None for i in range(32)]
                sbit = (x >> min(pos + ln - 1, 31)) & 1 if signed else 0
                want = sum(((field[i] if i < ln and field[i] is not None else sbit) << i) for i in range(32))
            assert got[lane] == want, (pos, ln, lane)


def test_lop3_shifts_and_wide_multiplies():
    a, b, c = rand32(), rand32(), rand32()
    for lut in (0x96, 0xE8, 0xF0, 0x1B):
        got, _ = run(f"lop3.b32 %r20, %r10, %r11, %r12, {lut:#x};\nst.global.b32 [%rd4], %r20;", a, b, c)
        for lane in range(0, T, 9):
            want = 0
            for bit in range(32):
                idx = (
                    (int(a[lane]) >> bit & 1) << 2
                    | (int(b[lane]) >> bit & 1) << 1
                    | (int(c[lane]) >> bit & 1)
                )
                want |= (lut >> idx & 1) << bit
            assert got[lane] == want
    sh = u32(RNG.integers(0, 40, T))
    got, _ = run("shl.b32 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;", a, sh)
    assert all(got[i] == ((int(a[i]) << int(sh[i])) & 0xFFFFFFFF if sh[i] < 32 else 0) for i in range(T))
    got, _ = run("shr.s32 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;", a, sh)
    s = a.view(np.int32).astype(np.int64)
    assert all(got[i] == (int(s[i]) >> min(int(sh[i]), 31)) & 0xFFFFFFFF for i in range(T))
    got, _ = run("mul.hi.s32 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;", a, b)
    sb = b.view(np.int32).astype(np.int64)
    assert all(got[i] == ((int(s[i]) * int(sb[i])) >> 32) & 0xFFFFFFFF for i in range(T))
    body = "mul.wide.s32 %rd10, %r10, %r11;\nshr.u64 %rd11, %rd10, 32;\ncvt.u32.u64 %r20, %rd11;\n"
    got, _ = run(body + "st.global.b32 [%rd4], %r20;", a, b)
    assert all(got[i] == ((int(s[i]) * int(sb[i])) >> 32) & 0xFFFFFFFF for i in range(T))
    d = u32(RNG.integers(-100, 100, T) | 1)
    got, _ = run("div.s32 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;", a, d)
    sd = d.view(np.int32)
    assert all(got[i] == math.trunc(Fraction(int(s[i]), int(sd[i]))) & 0xFFFFFFFF for i in range(T))
    got, _ = run("min.u32 %r20, %r10, %r11;\nmin.s32 %r21, %r10, %r11;\nadd.s32 %r22, %r20, %r21;\n"
                 "st.global.b32 [%rd4], %r22;", a, b)  # fmt: skip
    assert all(
        got[i] == (min(int(a[i]), int(b[i])) + min(int(s[i]), int(sb[i]))) & 0xFFFFFFFF for i in range(T)
    )


# --- floating point -----------------------------------------------------------------------------


def _f(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _rn32(x: Fraction) -> int:
    """The fp32 bits nearest to the exact rational x, ties to even (normal range only)."""
    if x == 0:
        return 0
    sign = 0x80000000 if x < 0 else 0
    x = abs(x)
    e = math.floor(math.log2(x))
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    scaled = x / Fraction(2) ** (e - 23)  # in [2^23, 2^24)
    q, r = divmod(scaled.numerator, scaled.denominator)
    twice = 2 * r
    if twice > scaled.denominator or (twice == scaled.denominator and q & 1):
        q += 1
    if q == 1 << 24:
        q, e = 1 << 23, e + 1
    return sign | (e + 127) << 23 | (q - (1 << 23))


def test_fma_rounds_once():
    """Including the double-rounding trap: a*b + c exactly above an fp32 midpoint that float64
    rounds onto the midpoint (then RNE would go down)."""
    one_ulp12 = struct.unpack("<I", struct.pack("<f", 1 + 2**-12))[0]
    tiny = struct.unpack("<I", struct.pack("<f", 2.0**-60))[0]
    a = rand32()
    a = ((a & 0x807FFFFF) | 0x3F000000).astype(np.uint32)  # |a| in [0.5, 1)
    b = ((rand32() & 0x807FFFFF) | 0x3F800000).astype(np.uint32)
    c = ((rand32() & 0x807FFFFF) | 0x3E800000).astype(np.uint32)
    a[0], b[0], c[0] = one_ulp12, one_ulp12, tiny
    got, _ = run("fma.rn.f32 %r20, %r10, %r11, %r12;\nst.global.b32 [%rd4], %r20;", a, b, c)
    for lane in range(T):
        exact = Fraction(_f(int(a[lane]))) * Fraction(_f(int(b[lane]))) + Fraction(_f(int(c[lane])))
        assert got[lane] == _rn32(exact), lane
    assert _f(int(got[0])) == 1 + 2**-11 + 2**-23


def test_conversions():
    vals = np.array([2.5, -3.5, 0.5, 1.5, -0.5, 7.49, 1e10, -1e10, np.nan, 3.0] * 7, dtype=np.float32)[:T]
    got, _ = run("cvt.rni.s32.f32 %r20, %r10;\nst.global.b32 [%rd4], %r20;", vals.view(np.uint32))
    for v, g in zip(vals, got.view(np.int32), strict=True):  # ties to even, saturating, NaN -> 0
        want = 0 if np.isnan(v) else max(min(round(float(v)), 2**31 - 1), -(2**31))
        assert g == want, (v, g)
    got, _ = run("cvt.rzi.s32.f32 %r20, %r10;\nst.global.b32 [%rd4], %r20;", vals.view(np.uint32))
    assert got.view(np.int32)[5] == 7 and got.view(np.int32)[1] == -3
    ints = u32([2**24 + 1, 2**24 + 3, -(2**24) - 1, 7] * 16)
    got, _ = run("cvt.rn.f32.s32 %r20, %r10;\nst.global.b32 [%rd4], %r20;", ints)
    assert [_f(int(g)) for g in got[:4]] == [2.0**24, 2.0**24 + 4, -(2.0**24), 7.0]
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)] * 16, dtype=np.float32)  # bf16 ties
    y = np.full(T, 2.0, dtype=np.float32)
    got, _ = run(
        "cvt.rn.bf16x2.f32 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;",
        x.view(np.uint32),
        y.view(np.uint32),
    )
    assert all(int(g) & 0xFFFF == 0x4000 for g in got)  # b (2.0) in the lower half
    assert [int(g) >> 16 for g in got[:4]] == [0x3F80, 0x3F80, 0x3F82, 0xBF80]  # a, ties to even
    t = np.array([1 + 2**-11, 1 + 2**-11 + 2**-12, -(1 + 2**-11)] * 22, dtype=np.float32)[
        :T
    ]  # tf32 ulp 2^-10
    got, _ = run("cvt.rna.tf32.f32 %r20, %r10;\nst.global.b32 [%rd4], %r20;", t.view(np.uint32))
    assert [_f(int(g)) for g in got[:3]] == [1 + 2**-10, 1 + 2**-10, -(1 + 2**-10)]  # ties away from zero


def test_half_precision_arithmetic_rounds_once_per_lane():
    """add.f16 / mul.f16x2 / add.bf16x2 (LLVM's form of a 16-bit op computed in fp32 and rounded,
    as the GEMM's gate/residual epilogue compiles): each lane rounded once to its type. Before,
    these fell through to the integer handler and added bit patterns."""
    a = RNG.standard_normal(2 * T).astype(np.float16)
    b = (RNG.standard_normal(2 * T) * 8).astype(np.float16)

    def pack(v: np.ndarray) -> np.ndarray:  # pairs of 16-bit values as x2 registers, element 0 low
        u = v.view(np.uint16).astype(np.uint32)
        return u[0::2] | (u[1::2] << 16)

    got, findings = run("mul.rn.f16x2 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;", pack(a), pack(b))
    assert not findings
    want = (a.astype(np.float64) * b.astype(np.float64)).astype(np.float16)  # exact product, one rounding
    assert np.array_equal(got, pack(want))
    got, _ = run("mov.b32 {%rs1, %rs2}, %r10;\nmov.b32 {%rs3, %rs4}, %r11;\nadd.f16 %rs5, %rs1, %rs3;\n"
                 "cvt.u32.u16 %r20, %rs5;\nst.global.b32 [%rd4], %r20;", pack(a), pack(b))  # fmt: skip
    assert np.array_equal(got, (a[0::2].astype(np.float64) + b[0::2]).astype(np.float16).view(np.uint16))
    x, y = a.astype(np.float32), b.astype(np.float32) / 1000
    bf = lambda v: P.bf16_to_bits(v.astype(np.float32)).astype(np.uint32)  # noqa: E731
    got, _ = run("add.rn.bf16x2 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;",
                 bf(x[0::2]) | (bf(x[1::2]) << 16), bf(y[0::2]) | (bf(y[1::2]) << 16))  # fmt: skip
    xs, ys = (P.bits_to_bf16(bf(v).astype(np.uint16)).astype(np.float64) for v in (x, y))
    want = bf((xs + ys).astype(np.float32))  # f64 sum exact here, then one bf16 rounding
    assert np.array_equal(got, want[0::2] | (want[1::2] << 16))


def test_float_compare_and_minmax_nan():
    a = np.array([1.0, np.nan, 2.0, np.nan] * 16, dtype=np.float32)
    b = np.array([np.nan, 1.0, 3.0, np.nan] * 16, dtype=np.float32)
    body = ("setp.lt.f32 %p1, %r10, %r11;\nsetp.ltu.f32 %p2, %r10, %r11;\nsetp.num.f32 %p3, %r10, %r11;\n"
            "selp.b32 %r20, 1, 0, %p1;\nselp.b32 %r21, 2, 0, %p2;\nselp.b32 %r22, 4, 0, %p3;\n"
            "or.b32 %r23, %r20, %r21;\nor.b32 %r23, %r23, %r22;\nst.global.b32 [%rd4], %r23;")  # fmt: skip
    got, _ = run(body, a.view(np.uint32), b.view(np.uint32))
    assert list(got[:4]) == [2, 2, 1 | 2 | 4, 2]  # ordered compares are false on NaN, .u ones true
    got, _ = run(
        "max.f32 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;", a.view(np.uint32), b.view(np.uint32)
    )
    assert list(got.view(np.float32)[:3]) == [1.0, 1.0, 3.0] and np.isnan(got.view(np.float32)[3])
    got, _ = run(
        "max.NaN.f32 %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;", a.view(np.uint32), b.view(np.uint32)
    )
    assert np.isnan(got.view(np.float32)[:2]).all() and got.view(np.float32)[2] == 3.0


def test_approximate_instructions_exact_or_one_ulp_off():
    """approx="exact": the correctly rounded value; "perturb": one ulp away from zero (both inside
    the ISA's bounds); the IEEE forms (.rn) are never perturbed."""
    x = (RNG.standard_normal(T) * 10).astype(np.float32)
    y = (RNG.standard_normal(T) + 3).astype(np.float32)
    body = "rcp.approx.ftz.f32 %r20, %r10;\nst.global.b32 [%rd4], %r20;"
    exact, _ = run(body, x.view(np.uint32))
    off, _ = run(body, x.view(np.uint32), approx="perturb")
    assert np.array_equal(exact.view(np.float32), np.float32(1) / x)
    assert np.array_equal(
        off.view(np.float32), np.nextafter(np.float32(1) / x, np.copysign(np.inf, x).astype(np.float32))
    )
    for op, perturbed in (("div.full.f32", True), ("div.rn.f32", False)):
        body = f"{op} %r20, %r10, %r11;\nst.global.b32 [%rd4], %r20;"
        got, _ = run(body, x.view(np.uint32), y.view(np.uint32), approx="perturb")
        q = x / y
        want = np.nextafter(q, np.copysign(np.inf, q).astype(np.float32)) if perturbed else q
        assert np.array_equal(got.view(np.float32), want), op


# --- warp shuffles --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,b,c", [("bfly", 5, 31), ("idx", 13, 31), ("up", 3, 0), ("down", 6, 31),
                                      ("bfly", 1, 0x1C1F), ("down", 2, 0x181F), ("idx", 2, 0x181F)])  # fmt: skip
def test_shfl_sync(mode, b, c):
    a = rand32()
    got, f = run(f"shfl.sync.{mode}.b32 %r20, %r10, {b}, {c:#x}, -1;\nst.global.b32 [%rd4], %r20;", a)
    assert not f
    for t in range(T):  # the ISA's pseudo-code, per lane
        lane, warp0 = t % 32, t - t % 32
        clamp, seg = c & 31, (c >> 8) & 31
        max_lane, min_lane = (lane & seg) | (clamp & ~seg), lane & seg
        j = {"up": lane - b, "down": lane + b, "bfly": lane ^ b, "idx": min_lane | (b & ~seg)}[mode]
        ok = j >= max_lane if mode == "up" else j <= max_lane
        assert got[t] == a[warp0 + (j if ok else lane)], (t, j)


# --- control flow ---------------------------------------------------------------------------------


def test_divergent_branches_reconverge():
    body = """and.b32 %r20, %r1, 1;
setp.eq.s32 %p1, %r20, 0;
mov.u32 %r21, 0;
@%p1 bra $EVEN;
add.u32 %r21, %r10, 100;
bra.uni $JOIN;
$EVEN:
add.u32 %r21, %r10, 200;
$JOIN:
mov.u32 %r22, 0;
$LOOP:
add.u32 %r22, %r22, 1;
setp.lt.u32 %p2, %r22, %r1;
@%p2 bra $LOOP;
add.u32 %r21, %r21, %r22;
st.global.b32 [%rd4], %r21;"""
    a = u32(np.arange(T) * 3)
    got, f = run(body, a)
    assert not f
    for t in range(T):  # per-thread trip counts: max(t, 1)
        assert got[t] == a[t] + (200 if t % 2 == 0 else 100) + max(t, 1)


# --- the memory checks ------------------------------------------------------------------------------

EXCHANGE = """shl.b32 %r20, %r1, 2;
mov.u32 %r21, smem;
add.u32 %r22, %r21, %r20;
st.shared.b32 [%r22], %r10;
{sync}
xor.b32 %r23, %r1, {partner};
shl.b32 %r23, %r23, 2;
add.u32 %r24, %r21, %r23;
ld.shared.b32 %r25, [%r24];
st.global.b32 [%rd4], %r25;"""


@pytest.mark.parametrize("partner,sync,race", [(32, "bar.sync 0;", False), (32, "", True), (1, "bar.warp.sync -1;", False),
                                               (1, "", True), (32, "bar.warp.sync -1;", True)])  # fmt: skip
def test_read_after_write_race(partner, sync, race):
    a = rand32()
    got, f = run(EXCHANGE.format(sync=sync, partner=partner), a)
    assert ("race-raw" in f.kinds()) == race, f.report()
    assert np.array_equal(got, a[np.arange(T) ^ partner])  # lockstep: the data itself is right


def test_write_after_read_race():
    body = """shl.b32 %r20, %r1, 2;
mov.u32 %r21, smem;
add.u32 %r22, %r21, %r20;
st.shared.b32 [%r22], %r10;
bar.sync 0;
xor.b32 %r23, %r20, 128;
add.u32 %r24, %r21, %r23;
ld.shared.b32 %r25, [%r24];
{sync}
st.shared.b32 [%r22], %r11;
st.global.b32 [%rd4], %r25;"""
    assert "race-war" in run(body.format(sync=""), rand32(), rand32())[1].kinds()
    assert not run(body.format(sync="bar.sync 0;"), rand32(), rand32())[1]


def test_bounds_alignment_and_uninitialized_shared():
    _, f = run("ld.global.b32 %r20, [%rd5+768];\nst.global.b32 [%rd4], %r20;", rand32())
    assert "oob-global" in f.kinds()  # the input holds 3 x 256 bytes
    _, f = run("ld.global.b32 %r20, [%rd5+2];\nst.global.b32 [%rd4], %r20;", rand32())
    assert "misaligned" in f.kinds()
    _, f = run("st.global.b32 [%rd5], %r10;", rand32())
    assert "write-readonly" in f.kinds()
    _, f = run("mov.u32 %r21, smem;\nld.shared.b32 %r20, [%r21+1024];\nst.global.b32 [%rd4], %r20;", rand32())
    assert "oob-shared" in f.kinds()
    _, f = run("mov.u32 %r21, smem;\nld.shared.b32 %r20, [%r21+16];\nst.global.b32 [%rd4], %r20;", rand32())
    assert "uninit-shared" in f.kinds()


CP_ASYNC = """shl.b32 %r20, %r1, 2;
mov.u32 %r21, smem;
add.u32 %r22, %r21, %r20;
cp.async.ca.shared.global [%r22], [%rd5], 4;
cp.async.commit_group;
cp.async.ca.shared.global [%r22+256], [%rd5+256], 4;
cp.async.commit_group;
cp.async.wait_group {n};
bar.sync 0;
xor.b32 %r23, %r20, 128;
add.u32 %r24, %r21, %r23;
ld.shared.b32 %r25, [%r24+{off}];
st.global.b32 [%rd4], %r25;"""


@pytest.mark.parametrize("n,off,inflight", [(0, 256, False), (1, 0, False), (1, 256, True), (2, 0, True)])
def test_cp_async_groups(n, off, inflight):
    a, b = rand32(), rand32()
    got, f = run(CP_ASYNC.format(n=n, off=off), a, b)
    assert ("race-inflight" in f.kinds()) == inflight, f.report()
    src = a if off == 0 else b
    assert np.array_equal(got, src[np.arange(T) ^ 32]) != inflight  # in-flight data reads stale


def test_cp_async_zero_fill_reads_nothing():
    body = """shl.b32 %r20, %r1, 2;
mov.u32 %r21, smem;
add.u32 %r22, %r21, %r20;
add.s64 %rd6, %rd5, 4096;
cp.async.ca.shared.global [%r22], [%rd6], 4, 0;
cp.async.wait_all;
ld.shared.b32 %r25, [%r22];
st.global.b32 [%rd4], %r25;"""
    got, f = run(body, rand32())
    assert not f and (got == 0).all()  # src-size 0: zeros, and the far source address is not read


def test_barrier_and_warp_divergence_are_flagged():
    body = """setp.lt.u32 %p1, %r1, 16;
@%p1 bra $SKIP;
bar.sync 0;
$SKIP:
st.global.b32 [%rd4], %r10;"""
    assert "barrier-divergence" in run(body, rand32())[1].kinds()
    body = """setp.lt.u32 %p1, %r1, 16;
@%p1 bra $SKIP;
shfl.sync.bfly.b32 %r20, %r10, 1, 31, -1;
$SKIP:
st.global.b32 [%rd4], %r10;"""
    assert "warp-divergence" in run(body, rand32())[1].kinds()


def test_register_read_before_write_is_flagged():
    body = """setp.lt.u32 %p1, %r1, {n};
@%p1 mov.u32 %r20, 7;
add.u32 %r21, %r20, 1;
st.global.b32 [%rd4], %r21;"""
    assert "uninit-register" in run(body.format(n=16), rand32())[1].kinds()  # threads 16.. never wrote r20
    got, f = run(body.format(n=T), rand32())
    assert not f and (got == 8).all()
