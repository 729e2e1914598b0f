"""The instructions of tests/ptx_exec.py: bit-level helpers and one handler per PTX opcode.

A handler is called as ``handler(cta, ins, active, pc, mask)`` with ``active`` the threads that
execute it (its predicate applied) and ``mask`` the threads at this PC; it returns None to fall
through, or ``(target, taken)`` for a branch (target -1: exit). Every value is computed for all
threads at once; the semantics are the PTX ISA's (see ptx_exec.py's docstring).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import ptx_isa as P
from .ptx_parse import _TYPE_BITS, Instr, PtxError

if TYPE_CHECKING:
    from .ptx_exec import CTA

WARP = 32
U64 = np.uint64
SHARED_WINDOW = 1 << 48  # generic addresses of the shared window (cvta.shared)


# ------------------------------------------------------------------------------------------------
# Bit helpers
# ------------------------------------------------------------------------------------------------


def _mask(bits: int) -> U64:
    return U64((1 << bits) - 1) if bits < 64 else U64(0xFFFFFFFFFFFFFFFF)


def to_int(v, bits: int, signed: bool) -> np.ndarray:
    """Bits -> int64 values (signed: two's complement of ``bits``)."""
    v = np.asarray(v, dtype=U64) & _mask(bits)
    if bits == 64:
        return v.view(np.int64) if signed else v.astype(np.int64)  # u64 above 2^63 never reaches here
    i = v.astype(np.int64)
    return np.where(i >= (1 << (bits - 1)), i - (1 << bits), i) if signed else i


def from_int(v, bits: int) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype != U64:
        v = v.astype(np.int64).view(U64) if v.dtype.kind == "i" else v.astype(U64)
    return v & _mask(bits)


def f32(v) -> np.ndarray:
    return (np.asarray(v, dtype=U64) & _mask(32)).astype(np.uint32).view(np.float32)


def from_f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(U64)


def f64(v) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=U64).view(np.float64)


def from_f64(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(U64)


def half_to_f64(v, kind: str) -> np.ndarray:
    b = (np.asarray(v, dtype=U64) & _mask(16)).astype(np.uint16)
    return (P.bits_to_bf16(b) if kind == "bf16" else P.bits_to_f16(b)).astype(np.float64)


def _ftz32(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < np.float32(2.0**-126), np.copysign(np.float32(0), x), x).astype(np.float32)


def round_odd_f64(p: np.ndarray, c: np.ndarray) -> np.ndarray:
    """p + c (float64) rounded to odd: a correct single rounding to any format of <= 51 bits follows."""
    with np.errstate(all="ignore"):
        s = p + c
        bp = s - c
        err = (p - bp) + (c - (s - bp))  # TwoSum: s + err == p + c exactly
        inexact = (err != 0) & np.isfinite(s)
        even = (s.view(np.int64) & 1) == 0
        fix = inexact & even
        if fix.any():
            s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s


def f64_to_f32_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd (for a second, correct rounding to bf16/f16)."""
    with np.errstate(all="ignore"):
        r = x.astype(np.float32)
        inexact = (r.astype(np.float64) != x) & np.isfinite(x) & np.isfinite(r)
        even = (r.view(np.int32) & 1) == 0
        fix = inexact & even
        if fix.any():
            r = np.where(fix, np.nextafter(r, np.where(x > r, np.float32(np.inf), np.float32(-np.inf))), r)
    return r.astype(np.float32)


def to_half_bits(x64: np.ndarray, kind: str, mode: str = "rn") -> np.ndarray:
    """float64 values -> bf16 / f16 bits, rounded to nearest even (``rn``) or toward zero (``rz``)."""
    x32 = f64_to_f32_odd(np.asarray(x64, dtype=np.float64))
    if kind == "bf16":
        if mode == "rz":
            return (x32.view(np.uint32) >> 16).astype(U64)
        return P.bf16_to_bits(x32).astype(U64)
    with np.errstate(all="ignore"):
        h = x32.astype(np.float16)
        if mode == "rz":  # one step toward zero where nearest-even rounded away (past 65504: 65504)
            away = np.abs(h.astype(np.float64)) > np.abs(x32.astype(np.float64))
            h = np.where(away, np.nextafter(h, np.float16(0)), h)
        return h.view(np.uint16).astype(U64)


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 a * b + c with one rounding (the product is exact in float64, the sum rounded to odd)."""
    p = a.astype(np.float64) * b.astype(np.float64)
    with np.errstate(all="ignore"):
        return round_odd_f64(p, c.astype(np.float64)).astype(np.float32)


def round_f64_to_f32(x: np.ndarray, mode: str) -> np.ndarray:
    """float64 -> float32 with a rounding mode (rn, rz, rm, rp)."""
    with np.errstate(all="ignore"):
        r = x.astype(np.float32)
        if mode == "rn":
            return r
        r64 = r.astype(np.float64)
        if mode == "rz":
            bad = np.abs(r64) > np.abs(x)
            return np.where(bad, np.nextafter(r, np.float32(0)), r).astype(np.float32)
        if mode == "rm":
            return np.where(r64 > x, np.nextafter(r, np.float32(-np.inf)), r).astype(np.float32)
        if mode == "rp":
            return np.where(r64 < x, np.nextafter(r, np.float32(np.inf)), r).astype(np.float32)
    raise PtxError(f"rounding mode {mode}")


@dataclass
class _Copy:
    threads: np.ndarray  # issuing threads
    group: np.ndarray  # their group number
    dst: np.ndarray  # [n, size] byte addresses
    data: np.ndarray  # [n, size] bytes


# ------------------------------------------------------------------------------------------------
# Instruction handlers: (cta, ins, active, pc, mask) -> None (fall through) or (target, taken mask)
# ------------------------------------------------------------------------------------------------

HANDLERS: dict = {}


def _h(*names):
    def deco(fn):
        for nm in names:
            HANDLERS[nm] = fn
        return fn

    return deco


def _type(ins: Instr) -> str:
    for m in reversed(ins.mods):
        if m in _TYPE_BITS:
            return m
    raise PtxError(f"no type in {ins.op}")


def _rnd(ins: Instr, default: str = "rn") -> str:
    for m in ins.mods:
        if m in ("rn", "rz", "rm", "rp", "rna", "rni", "rzi", "rmi", "rpi", "rs"):
            return m
    return default


def _away(r: np.ndarray) -> np.ndarray:
    """One ulp away from zero (finite non-zero values), for approx="perturb"."""
    r = np.asarray(r, dtype=np.float32)
    ok = np.isfinite(r) & (r != 0)
    return np.where(ok, np.nextafter(r, np.copysign(np.float32(np.inf), r)), r).astype(np.float32)


def _fval(c: CTA, op, t: str) -> np.ndarray:
    v = c.read(op, _TYPE_BITS[t])
    if t == "f32":
        return f32(v)
    if t == "f64":
        return np.broadcast_to(f64(np.atleast_1d(U64(v) if np.isscalar(v) else v)), (c.T,))
    raise PtxError(f"float type {t}")


def _ival(c: CTA, op, t: str) -> np.ndarray:
    bits = _TYPE_BITS[t]
    return to_int(c.read(op, bits), bits, t[0] == "s")


def _wf(c: CTA, op, x: np.ndarray, t: str, m: np.ndarray) -> None:
    c.write(op, from_f32(x) if t == "f32" else from_f64(x), m)


@_h("ld")
def _ld(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    bits = _TYPE_BITS[t]
    vec = next((int(x[1:]) for x in ins.mods if re.fullmatch(r"v\d", x)), 1)
    dst, src = ins.args
    space = c._space(ins)
    if space == "param":
        _, _base, sym, _off = src
        if sym not in c.params:
            raise PtxError(f"unknown parameter {sym}")
        v = U64(c.params[sym] & ((1 << 64) - 1))
        if dst[0] == "reg" and c.width(dst[1]) == 64 and bits == 32 and t[0] == "s":  # ld.param.s32 into b64
            v = from_int(to_int(v, 32, True), 64)
        c.write(dst, np.full(c.T, v, dtype=U64), m)
        return None
    addr = c._address(src)
    nb = bits // 8
    raw = c.load_bytes(space, addr, nb * vec, m, pc)
    regs = dst[1] if dst[0] == "vec" else [dst]
    words = raw.reshape(c.T, vec, nb)
    for i, r in enumerate(regs):
        val = np.zeros(c.T, dtype=U64)
        for j in range(nb):
            val |= words[:, i, j].astype(U64) << U64(8 * j)
        if t[0] == "s" and r[0] == "reg" and c.width(r[1]) > bits:
            val = from_int(to_int(val, bits, True), c.width(r[1]))
        c.write(r, val, m)
    return None


@_h("st")
def _st(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    nb = _TYPE_BITS[t] // 8
    dst, src = ins.args
    regs = src[1] if src[0] == "vec" else [src]
    data = np.zeros((c.T, nb * len(regs)), dtype=np.uint8)
    for i, r in enumerate(regs):
        v = np.broadcast_to(c.read(r, nb * 8), (c.T,)).astype(U64)
        for j in range(nb):
            data[:, i * nb + j] = ((v >> U64(8 * j)) & U64(0xFF)).astype(np.uint8)
    c.store_bytes(c._space(ins), c._address(dst), data, m, pc)
    return None


@_h("mov")
def _mov(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    dst, src = ins.args
    if dst[0] == "vec":  # unpack: mov.b64 {a, b}, d
        v = np.broadcast_to(c.read(src, _TYPE_BITS[t]), (c.T,)).astype(U64)
        w = _TYPE_BITS[t] // len(dst[1])
        for i, r in enumerate(dst[1]):
            c.write(r, (v >> U64(w * i)) & _mask(w), m)
        return None
    if src[0] == "vec":  # pack
        w = _TYPE_BITS[t] // len(src[1])
        v = np.zeros(c.T, dtype=U64)
        for i, r in enumerate(src[1]):
            v |= (np.broadcast_to(c.read(r, w), (c.T,)).astype(U64) & _mask(w)) << U64(w * i)
        c.write(dst, v, m)
        return None
    if t == "pred":
        c.write(dst, c.pred(src), m)
        return None
    c.write(dst, c.read(src, _TYPE_BITS[t]), m)
    return None


@_h("cvta")
def _cvta(c: CTA, ins: Instr, m, pc, mask):
    dst, src = ins.args
    v = np.broadcast_to(c.read(src, 64), (c.T,)).astype(U64)
    if "shared" in ins.mods:
        v = v - U64(SHARED_WINDOW) if "to" in ins.mods else v + U64(SHARED_WINDOW)
    c.write(dst, v, m)
    return None


def _int_binop(name):
    def fn(c: CTA, ins: Instr, m, pc, mask):
        t = _type(ins)
        if t == "pred":
            a, b = c.pred(ins.args[1]), c.pred(ins.args[2])
            r = {"and": a & b, "or": a | b, "xor": a ^ b}[name]
            c.write(ins.args[0], r, m)
            return None
        if t in ("f16", "bf16", "f16x2", "bf16x2"):
            return _half_arith(c, ins, m, name, t)
        bits = _TYPE_BITS[t]
        if t in ("f32", "f64"):
            return _float_arith(c, ins, m, name, t)
        signed = t[0] == "s"
        a = np.broadcast_to(c.read(ins.args[1], bits), (c.T,)).astype(U64)
        b = np.broadcast_to(c.read(ins.args[2], bits), (c.T,)).astype(U64)
        if name in ("add", "sub", "and", "or", "xor"):
            r = {"add": lambda: a + b, "sub": lambda: a - b, "and": lambda: a & b, "or": lambda: a | b,
                 "xor": lambda: a ^ b}[name]()  # fmt: skip
            c.write(ins.args[0], r & _mask(bits), m)
        elif name in ("min", "max"):
            ia, ib = to_int(a, bits, signed), to_int(b, bits, signed)
            if bits == 64 and not signed:
                r = np.minimum(a, b) if name == "min" else np.maximum(a, b)
                c.write(ins.args[0], r, m)
            else:
                r = np.minimum(ia, ib) if name == "min" else np.maximum(ia, ib)
                c.write(ins.args[0], from_int(r, bits), m)
        elif name == "mul":
            if "wide" in ins.mods:
                r = to_int(a, bits, signed) * to_int(b, bits, signed)
                c.write(ins.args[0], from_int(r, 2 * bits), m)
            elif "hi" in ins.mods:
                r = (to_int(a, bits, signed) * to_int(b, bits, signed)) >> bits
                c.write(ins.args[0], from_int(r, bits), m)
            else:
                c.write(ins.args[0], (a * b) & _mask(bits), m)
        elif name in ("div", "rem"):
            ia, ib = to_int(a, bits, signed), to_int(b, bits, signed)
            zero = ib == 0
            if (zero & m).any():
                c.f.add("div-by-zero", pc, ins.line, "integer division by zero")
            ib = np.where(zero, 1, ib)
            q = np.abs(ia) // np.abs(ib) * np.sign(ia) * np.sign(ib)
            r = q if name == "div" else ia - q * ib
            c.write(ins.args[0], from_int(r, bits), m)
        elif name in ("shl", "shr"):
            n = np.minimum(to_int(b, 32, False), bits).astype(np.int64)
            if name == "shl":
                r = np.where(n >= bits, U64(0), (a << n.astype(U64)) & _mask(bits))
            elif signed:
                ia = to_int(a, bits, True)
                r = from_int(ia >> np.minimum(n, 63), bits)
            else:
                r = np.where(n >= bits, U64(0), a >> np.minimum(n, 63).astype(U64))
            c.write(ins.args[0], r, m)
        return None

    return fn


for _n in ("add", "sub", "and", "or", "xor", "min", "max", "mul", "div", "rem", "shl", "shr"):
    HANDLERS[_n] = _int_binop(_n)


def _half_arith(c: CTA, ins: Instr, m, name: str, t: str):
    """add / sub / mul / min / max on f16, bf16 and their x2 pairs (lane h in bits 16h..16h+15), each
    lane in float64 (exact for two 16-bit operands) rounded once to the type, as the ISA specifies
    (``.rn`` default; LLVM emits these for a 16-bit op done in fp32 and rounded, an identical result)."""
    kind = t[:-2] if t.endswith("x2") else t
    lanes = 2 if t.endswith("x2") else 1
    if name not in ("add", "sub", "mul", "min", "max") or (_rnd(ins) or "rn") != "rn":
        raise PtxError(f"{name}.{t} with modifiers {ins.mods}")
    srcs = [np.broadcast_to(c.read(a, 16 * lanes), (c.T,)).astype(U64) for a in ins.args[1:3]]
    out = np.zeros(c.T, dtype=U64)
    with np.errstate(all="ignore"):
        for h in range(lanes):
            a, b = (half_to_f64(s >> U64(16 * h), kind) for s in srcs)
            ops = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "min": np.fmin, "max": np.fmax}
            r = ops[name](a, b)
            out |= to_half_bits(r, kind) << U64(16 * h)
    c.write(ins.args[0], out, m)
    return None


def _float_arith(c: CTA, ins: Instr, m, name: str, t: str):
    a, b = _fval(c, ins.args[1], t), _fval(c, ins.args[2], t)
    ftz = "ftz" in ins.mods and t == "f32"
    if ftz:
        a, b = _ftz32(a), _ftz32(b)
    with np.errstate(all="ignore"):
        if name in ("add", "sub", "mul") and _rnd(ins) != "rn" and t == "f32":
            ex = {"add": lambda: a.astype(np.float64) + b, "sub": lambda: a.astype(np.float64) - b,
                  "mul": lambda: a.astype(np.float64) * b}[name]()  # fmt: skip
            r = round_f64_to_f32(ex, _rnd(ins))
        elif name == "add":
            r = a + b
        elif name == "sub":
            r = a - b
        elif name == "mul":
            r = a * b
        elif name == "div":
            r = a / b  # div.rn, and div.full / div.approx as one result their bounds allow
            if ("full" in ins.mods or "approx" in ins.mods) and c.approx == "perturb":
                r = _away(r)
        elif name in ("min", "max"):
            r = np.fmin(a, b) if name == "min" else np.fmax(a, b)
            if "NaN" in ins.mods:
                r = np.where(np.isnan(a) | np.isnan(b), np.float32(np.nan), r)
        else:
            raise PtxError(f"float {name}")
    if "sat" in ins.mods:
        r = np.where(np.isnan(r), 0, np.clip(r, 0, 1))
    if ftz:
        r = _ftz32(r.astype(np.float32))
    _wf(c, ins.args[0], np.asarray(r, dtype=np.float32 if t == "f32" else np.float64), t, m)
    return None


@_h("mad")
def _mad(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    if t in ("f32", "f64"):
        return _fma(c, ins, m, pc, mask)
    bits = _TYPE_BITS[t]
    signed = t[0] == "s"
    a = np.broadcast_to(c.read(ins.args[1], bits), (c.T,)).astype(U64)
    b = np.broadcast_to(c.read(ins.args[2], bits), (c.T,)).astype(U64)
    if "wide" in ins.mods:
        p = from_int(to_int(a, bits, signed) * to_int(b, bits, signed), 2 * bits)
        cc = np.broadcast_to(c.read(ins.args[3], 2 * bits), (c.T,)).astype(U64)
        c.write(ins.args[0], (p + cc) & _mask(2 * bits), m)
    elif "hi" in ins.mods:
        p = from_int((to_int(a, bits, signed) * to_int(b, bits, signed)) >> bits, bits)
        cc = np.broadcast_to(c.read(ins.args[3], bits), (c.T,)).astype(U64)
        c.write(ins.args[0], (p + cc) & _mask(bits), m)
    else:
        cc = np.broadcast_to(c.read(ins.args[3], bits), (c.T,)).astype(U64)
        c.write(ins.args[0], (a * b + cc) & _mask(bits), m)
    return None


@_h("fma")
def _fma(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    if t in ("bf16", "f16", "bf16x2", "f16x2"):
        kind = t[:-2] if t.endswith("x2") else t
        lanes = 2 if t.endswith("x2") else 1
        out = np.zeros(c.T, dtype=U64)
        srcs = [
            np.broadcast_to(c.read(a, 32 if lanes == 2 else 16), (c.T,)).astype(U64) for a in ins.args[1:4]
        ]
        for h in range(lanes):
            a, b, cc = (half_to_f64(s >> U64(16 * h), kind) for s in srcs)
            r = round_odd_f64(a * b, cc)
            out |= to_half_bits(r, kind) << U64(16 * h)
        c.write(ins.args[0], out, m)
        return None
    a, b, cc = (_fval(c, x, t) for x in ins.args[1:4])
    ftz = "ftz" in ins.mods
    if ftz:
        a, b, cc = _ftz32(a), _ftz32(b), _ftz32(cc)
    if t == "f32":
        r = fma_f32(a, b, cc)
        if "sat" in ins.mods:
            r = np.where(np.isnan(r), np.float32(0), np.clip(r, 0, 1)).astype(np.float32)
        if ftz:
            r = _ftz32(r)
    else:
        raise PtxError("fma.f64")
    _wf(c, ins.args[0], r, t, m)
    return None


@_h("neg", "abs", "not", "sqrt", "rsqrt", "rcp", "ex2", "lg2", "tanh", "sin", "cos", "popc", "clz", "brev")
def _unary(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    base = ins.base
    if t == "pred":
        c.write(ins.args[0], ~c.pred(ins.args[1]), m)
        return None
    if t in ("f32", "f64"):
        x = _fval(c, ins.args[1], t)
        ftz = "ftz" in ins.mods and t == "f32"
        if ftz:
            x = _ftz32(x)
        x64 = x.astype(np.float64)
        with np.errstate(all="ignore"):
            r64 = {"neg": lambda: -x64, "abs": lambda: np.abs(x64), "sqrt": lambda: np.sqrt(x64),
                   "rsqrt": lambda: 1.0 / np.sqrt(x64), "rcp": lambda: 1.0 / x64, "ex2": lambda: np.exp2(x64),
                   "lg2": lambda: np.log2(x64), "tanh": lambda: np.tanh(x64), "sin": lambda: np.sin(x64),
                   "cos": lambda: np.cos(x64)}[base]()  # fmt: skip
        if t == "f32":
            with np.errstate(all="ignore"):
                if base in ("sqrt", "rcp") and _rnd(ins) == "rn":  # IEEE, in fp32 itself (no double rounding)
                    r = np.sqrt(x) if base == "sqrt" else np.float32(1) / x
                elif base in ("sqrt", "rcp") and "approx" not in ins.mods:
                    r = round_f64_to_f32(r64, _rnd(ins))
                else:
                    r = r64.astype(np.float32)
            if "approx" in ins.mods and c.approx == "perturb":
                r = _away(r)
            if ftz:
                r = _ftz32(r)
            _wf(c, ins.args[0], r, t, m)
        else:
            _wf(c, ins.args[0], r64, t, m)
        return None
    bits = _TYPE_BITS[t]
    v = np.broadcast_to(c.read(ins.args[1], bits), (c.T,)).astype(U64)
    if base == "not":
        r = ~v & _mask(bits)
    elif base == "neg":
        r = (U64(0) - v) & _mask(bits)
    elif base == "abs":
        r = from_int(np.abs(to_int(v, bits, True)), bits)
    elif base == "popc":
        r = np.array([bin(int(x)).count("1") for x in v], dtype=U64)
    elif base == "clz":
        r = np.array([bits - int(x).bit_length() for x in v], dtype=U64)
    elif base == "brev":
        r = np.array([int(format(int(x), f"0{bits}b")[::-1], 2) for x in v], dtype=U64)
    else:
        raise PtxError(f"{ins.op}")
    c.write(ins.args[0], r, m)
    return None


@_h("copysign")
def _copysign(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    a, b = _fval(c, ins.args[1], t), _fval(c, ins.args[2], t)
    _wf(c, ins.args[0], np.copysign(b, a), t, m)  # d = b with a's sign
    return None


@_h("selp")
def _selp(c: CTA, ins: Instr, m, pc, mask):
    bits = _TYPE_BITS[_type(ins)]
    a = np.broadcast_to(c.read(ins.args[1], bits), (c.T,))
    b = np.broadcast_to(c.read(ins.args[2], bits), (c.T,))
    c.write(ins.args[0], np.where(c.pred(ins.args[3]), a, b), m)
    return None


_CMP = {
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal, "lo": np.less, "ls": np.less_equal, "hi": np.greater, "hs": np.greater_equal,
}  # fmt: skip


@_h("setp")
def _setp(c: CTA, ins: Instr, m, pc, mask):
    cmp, t = ins.mods[0], _type(ins)
    if t in ("f32", "f64"):
        a, b = _fval(c, ins.args[1], t), _fval(c, ins.args[2], t)
        if "ftz" in ins.mods:
            a, b = _ftz32(a), _ftz32(b)
        nan = np.isnan(a) | np.isnan(b)
        if cmp == "num":
            r = ~nan
        elif cmp == "nan":
            r = nan
        elif cmp.endswith("u") and cmp[:-1] in _CMP:
            with np.errstate(invalid="ignore"):
                r = _CMP[cmp[:-1]](a, b) | nan
        else:
            with np.errstate(invalid="ignore"):
                r = _CMP[cmp](a, b) & ~nan
    else:
        bits = _TYPE_BITS[t]
        signed = t[0] == "s" and cmp not in ("lo", "ls", "hi", "hs")
        a = np.broadcast_to(c.read(ins.args[1], bits), (c.T,)).astype(U64)
        b = np.broadcast_to(c.read(ins.args[2], bits), (c.T,)).astype(U64)
        if signed:
            a, b = to_int(a, bits, True), to_int(b, bits, True)
        r = _CMP[cmp](a, b)
    r = np.broadcast_to(r, (c.T,))
    boolop = next((x for x in ins.mods if x in ("and", "or", "xor")), None)
    if boolop:
        q = c.pred(ins.args[3])
        r = {"and": r & q, "or": r | q, "xor": r ^ q}[boolop]
    d = ins.args[0]
    if d[0] == "reg" and "|" in d[1]:
        p, q = d[1].split("|")
        c.write(("reg", p), r, m)
        c.write(("reg", q), ~r, m)
    else:
        c.write(d, r, m)
    return None


@_h("bfe")
def _bfe(c: CTA, ins: Instr, m, pc, mask):
    t = _type(ins)
    bits = _TYPE_BITS[t]
    a = np.broadcast_to(c.read(ins.args[1], bits), (c.T,)).astype(U64)
    pos = np.broadcast_to(to_int(c.read(ins.args[2], 32), 8, False), (c.T,))
    ln = np.broadcast_to(to_int(c.read(ins.args[3], 32), 8, False), (c.T,))
    out = np.zeros(c.T, dtype=U64)
    for i in range(bits):
        src = np.minimum(pos + i, bits - 1)
        bit = (a >> src.astype(U64)) & U64(1)
        take = i < ln
        if t[0] == "s":
            sbit = (a >> np.minimum(pos + ln - 1, bits - 1).clip(0).astype(U64)) & U64(1)
            sbit = np.where(ln == 0, U64(0), sbit)
            bit = np.where(take & (pos + i < bits), bit, sbit)
        else:
            bit = np.where(take & (pos + i < bits), bit, U64(0))
        out |= bit << U64(i)
    c.write(ins.args[0], out, m)
    return None


@_h("prmt")
def _prmt(c: CTA, ins: Instr, m, pc, mask):
    if len(ins.mods) > 1:
        raise PtxError(f"prmt mode {ins.op}")
    a = np.broadcast_to(c.read(ins.args[1], 32), (c.T,)).astype(U64)
    b = np.broadcast_to(c.read(ins.args[2], 32), (c.T,)).astype(U64)
    sel = np.broadcast_to(c.read(ins.args[3], 32), (c.T,)).astype(U64)
    both = a | (b << U64(32))
    out = np.zeros(c.T, dtype=U64)
    for i in range(4):
        s = (sel >> U64(4 * i)) & U64(0xF)
        byte = (both >> ((s & U64(7)) * U64(8))) & U64(0xFF)
        sign = np.where((byte & U64(0x80)) != 0, U64(0xFF), U64(0))
        out |= np.where((s & U64(8)) != 0, sign, byte) << U64(8 * i)
    c.write(ins.args[0], out, m)
    return None


@_h("lop3")
def _lop3(c: CTA, ins: Instr, m, pc, mask):
    a, b, cc = (np.broadcast_to(c.read(x, 32), (c.T,)).astype(U64) for x in ins.args[1:4])
    lut = int(c.read(ins.args[4], 32))
    out = np.zeros(c.T, dtype=U64)
    full = _mask(32)
    for i in range(8):
        if lut >> i & 1:
            term = (a if i & 4 else ~a & full) & (b if i & 2 else ~b & full) & (cc if i & 1 else ~cc & full)
            out |= term
    c.write(ins.args[0], out, m)
    return None


def to_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """float values -> e4m3 (float8_e4m3fn) bytes, rounded to nearest even from the exact value,
    saturated to +-448 (``.satfinite``); NaN -> 0x7F. Subnormals are multiples of 2^-9 (their
    byte is that multiple: 8 is 2^-6, the first normal, 0x08)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), 448.0)
    with np.errstate(all="ignore"):
        frac, e = np.frexp(np.where(a > 0, a, 1.0))  # a = frac * 2^e, frac in [0.5, 1)
        q = np.rint(frac * 16.0)  # 3 mantissa bits below the leading one: 8..16, half to even
        e = np.where(q == 16, e + 1, e).astype(np.int64)
        q = np.where(q == 16, 8, q).astype(np.int64)
        normal = ((e - 1 + 7) << 3) | (q - 8)
        sub = np.rint(a * 512.0).astype(np.int64)
    code = np.where(a < 2.0**-6, sub, normal)
    code = np.where(np.signbit(x), code | 0x80, code)
    return np.where(np.isnan(x), 0x7F, code).astype(U64)


@_h("cvt")
def _cvt(c: CTA, ins: Instr, m, pc, mask):
    if "e4m3x2" in ins.mods:  # cvt.rn.satfinite.e4m3x2.f32 d, a, b: a's byte high, b's low
        if "rn" not in ins.mods or "satfinite" not in ins.mods or "f32" not in ins.mods or "relu" in ins.mods:
            raise PtxError(f"unsupported e4m3x2 conversion: {ins}")
        hi = to_e4m3_bits(f32(c.read(ins.args[1], 32)))
        lo = to_e4m3_bits(f32(c.read(ins.args[2], 32)))
        c.write(ins.args[0], np.broadcast_to((hi << U64(8)) | lo, (c.T,)), m)
        return None
    types = [x for x in ins.mods if x in _TYPE_BITS or x == "tf32"]
    dt, at = types[0], types[1]
    rnd = _rnd(ins, "")
    ftz = "ftz" in ins.mods
    sat = "sat" in ins.mods
    dst = ins.args[0]
    if dt in ("bf16x2", "f16x2"):  # d = {cvt(a) in the upper half, cvt(b) in the lower}
        kind = dt[:-2]
        a, b = _fval(c, ins.args[1], at), _fval(c, ins.args[2], at)
        if "relu" in ins.mods:
            a, b = np.where(a < 0, np.float32(0), a), np.where(b < 0, np.float32(0), b)
        hi = to_half_bits(a.astype(np.float64), kind, rnd or "rn")
        lo = to_half_bits(b.astype(np.float64), kind, rnd or "rn")
        c.write(dst, (hi << U64(16)) | lo, m)
        return None
    if dt == "tf32":
        x = f32(c.read(ins.args[1], 32)).astype(np.float32)
        u = x.view(np.uint32).astype(U64)
        if rnd == "rna":
            r = (u + U64(0x1000)) & U64(0xFFFFE000)
        elif rnd == "rz":
            r = u & U64(0xFFFFE000)
        else:
            raise PtxError(f"cvt to tf32 with {rnd}")
        r = np.where(np.isnan(x), U64(0x7FFFFFFF), r)
        c.write(dst, np.where(np.isinf(x), u, r), m)
        return None
    fl = ("f32", "f64", "f16", "bf16")
    if at in fl:
        v = c.read(ins.args[1], _TYPE_BITS[at])
        x = half_to_f64(v, at) if at in ("f16", "bf16") else (f32(v).astype(np.float64) if at == "f32" else f64(
            np.broadcast_to(v, (c.T,)).astype(U64)))  # fmt: skip
        x = np.broadcast_to(x, (c.T,))
        if ftz and at == "f32":
            x = _ftz32(x.astype(np.float32)).astype(np.float64)
        if dt in fl:
            if dt == "f32":
                r = round_f64_to_f32(x, rnd or "rn")
                if ftz:
                    r = _ftz32(r)
                if sat:
                    r = np.where(np.isnan(r), np.float32(0), np.clip(r, 0, 1)).astype(np.float32)
                c.write(dst, from_f32(r), m)
            elif dt == "f64":
                c.write(dst, from_f64(x), m)
            else:
                c.write(dst, to_half_bits(x, dt, rnd or "rn"), m)
            return None
        # float -> int
        mode = rnd or "rzi"
        with np.errstate(all="ignore"):
            r = {"rni": np.rint, "rzi": np.trunc, "rmi": np.floor, "rpi": np.ceil, "rn": np.rint,
                 "rz": np.trunc}[mode](x)  # fmt: skip
        bits = _TYPE_BITS[dt]
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dt[0] == "s" else (0, (1 << bits) - 1)
        r = np.where(np.isnan(r), 0, np.clip(r, lo, hi))
        c.write(dst, from_int(r.astype(np.int64), bits), m)
        return None
    # int -> ...
    ab = _TYPE_BITS[at]
    iv = np.broadcast_to(to_int(c.read(ins.args[1], ab), ab, at[0] == "s"), (c.T,))
    if dt in fl:
        x = iv.astype(np.float64)
        if dt == "f32":
            c.write(dst, from_f32(round_f64_to_f32(x, {"": "rn"}.get(rnd, rnd))), m)
        elif dt == "f64":
            c.write(dst, from_f64(x), m)
        else:
            c.write(dst, to_half_bits(x, dt, rnd or "rn"), m)
        return None
    bits = _TYPE_BITS[dt]
    if sat:
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dt[0] == "s" else (0, (1 << bits) - 1)
        iv = np.clip(iv, lo, hi)
    r = from_int(iv, bits)
    if dst[0] == "reg" and c.width(dst[1]) > bits and dt[0] == "s":
        r = from_int(to_int(r, bits, True), c.width(dst[1]))
    c.write(dst, r, m)
    return None


@_h("bra")
def _bra(c: CTA, ins: Instr, m, pc, mask):
    target = ins.args[0][1]
    return c.k.labels[target], m


@_h("ret", "exit")
def _ret(c: CTA, ins: Instr, m, pc, mask):
    return -1, m


def _whole_warps(c: CTA, m: np.ndarray, pc: int, ins: Instr) -> np.ndarray:
    """Warps that execute a warp-synchronous instruction; flags warps reaching it partially."""
    per = m.reshape(-1, WARP) if c.T % WARP == 0 else None
    if per is None:
        raise PtxError("block size not a multiple of 32")
    some, all_ = per.any(axis=1), per.all(axis=1)
    if (some & ~all_).any():
        c.f.add("warp-divergence", pc, ins.line, "a warp-synchronous instruction reached by part of a warp")
    return np.nonzero(all_)[0]


@_h("bar", "barrier")
def _bar(c: CTA, ins: Instr, m, pc, mask):
    if "warp" in ins.mods:
        for w in _whole_warps(c, m, pc, ins):
            c.smem.wepoch[w] += 1
        return None
    if not m.all():
        c.f.add("barrier-divergence", pc, ins.line, f"bar.sync reached by {int(m.sum())} of {c.T} threads")
    c.smem.epoch += 1
    return None


@_h("membar", "fence")
def _membar(c: CTA, ins: Instr, m, pc, mask):
    return None


@_h("shfl")
def _shfl(c: CTA, ins: Instr, m, pc, mask):
    mode = ins.mods[1]
    d = ins.args[0]
    a = np.broadcast_to(c.read(ins.args[1], 32), (c.T,)).astype(U64)
    b = np.broadcast_to(to_int(c.read(ins.args[2], 32), 32, False), (c.T,)) & 31
    cc = np.broadcast_to(to_int(c.read(ins.args[3], 32), 32, False), (c.T,))
    membermask = np.broadcast_to(c.read(ins.args[4], 32), (c.T,))
    if (membermask[m] != 0xFFFFFFFF).any():
        raise PtxError("shfl with a partial member mask")
    _whole_warps(c, m, pc, ins)
    lane = c.lane
    clamp, seg = cc & 31, (cc >> 8) & 31
    max_lane = (lane & seg) | (clamp & ~seg)
    min_lane = lane & seg
    if mode == "up":
        j = lane - b
        ok = j >= max_lane
    elif mode == "down":
        j = lane + b
        ok = j <= max_lane
    elif mode == "bfly":
        j = lane ^ b
        ok = j <= max_lane
    elif mode == "idx":
        j = min_lane | (b & ~seg)
        ok = j <= max_lane
    else:
        raise PtxError(f"shfl mode {mode}")
    j = np.where(ok, j, lane)
    src = c.warp * WARP + j
    if not m[src[m]].all():
        c.f.add("shfl-inactive", pc, ins.line, "shfl reads an inactive lane")
    if d[0] == "reg" and "|" in d[1]:
        pn, qn = d[1].split("|")
        c.write(("reg", pn), a[src], m)
        c.write(("reg", qn), ok, m)
    else:
        c.write(d, a[src], m)
    return None


@_h("cp")
def _cp(c: CTA, ins: Instr, m, pc, mask):
    if "commit_group" in ins.mods:
        c.groups[m] += 1
        return None
    if "wait_group" in ins.mods or "wait_all" in ins.mods:
        n = 0 if "wait_all" in ins.mods else int(c.read(ins.args[0], 32))
        if "wait_all" in ins.mods:
            c.groups[m] += 1
        keep = []
        for cp in c.copies:
            # a group is complete for thread t once at most n newer groups are pending
            done = m[cp.threads] & (cp.group < c.groups[cp.threads] - n)
            if done.any():
                dst, data = cp.dst[done], cp.data[done]
                c.smem.data[dst] = data
                c.smem.init[dst] = True
                np.subtract.at(c.smem.pending, dst.ravel(), 1)
                sm = c.smem
                t = np.broadcast_to(cp.threads[done][:, None], dst.shape)
                sm.w_thread[dst] = t
                sm.w_epoch[dst] = sm.epoch
                sm.w_wepoch[dst] = sm.wepoch[t // WARP]
            if (~done).any():
                keep.append(_Copy(cp.threads[~done], cp.group[~done], cp.dst[~done], cp.data[~done]))
        c.copies = keep
        return None
    if "async" not in ins.mods:
        raise PtxError(f"{ins.op}")
    # cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}{, ignore-src}
    dst_op, src_op, size_op = ins.args[:3]
    size = int(c.read(size_op, 32))
    th = np.nonzero(m)[0]
    if th.size == 0:
        return None
    src_size = np.full(c.T, size, dtype=np.int64)
    if len(ins.args) > 3:
        extra = ins.args[3]
        if extra[0] == "reg" and c.width(extra[1]) == 1:
            src_size = np.where(c.pred(extra), 0, size)
        else:
            src_size = np.broadcast_to(to_int(c.read(extra, 32), 32, False), (c.T,)).astype(np.int64)
    dst = c._address(dst_op)[th]
    src = c._address(src_op)[th]
    c._align(dst, size, pc, "shared")
    ss = src_size[th]
    reading = ss > 0
    if reading.any():
        c._align(src[reading], size, pc, "global")
    data = np.zeros((th.size, size), dtype=np.uint8)
    if reading.any():
        rd = np.zeros(c.T, dtype=bool)
        rd[th[reading]] = True
        addr_full = np.zeros(c.T, dtype=U64)
        addr_full[th] = src
        # read only src-size bytes; reading cp-size of them is a superset when src-size < cp-size
        for k in np.unique(ss[reading]):
            sel = np.zeros(c.T, dtype=bool)
            sel[th[ss == k]] = True
            got = c.load_bytes("global", addr_full, int(k), sel, pc)
            data[np.isin(th, np.nonzero(sel)[0]), : int(k)] = got[sel]
    idx, ok = c._smem_bytes(dst, size, pc, "cp.async")
    if not ok.all():
        th, idx, data = th[ok], idx[ok], data[ok]
    c._check_write(idx, th, pc, None)
    np.add.at(c.smem.pending, idx.ravel(), 1)
    c.copies.append(_Copy(th, c.groups[th].copy(), idx, data))
    return None


@_h("ldmatrix")
def _ldmatrix(c: CTA, ins: Instr, m, pc, mask):
    num = int(next(x for x in ins.mods if x in ("x1", "x2", "x4"))[1])
    trans = "trans" in ins.mods
    dst, src = ins.args
    addr = c._address(src)
    warps = _whole_warps(c, m, pc, ins)
    regs = dst[1]
    outs = [np.zeros(c.T, dtype=U64) for _ in regs]
    for w in warps:
        lanes = w * WARP + np.arange(8 * num)
        a = addr[lanes].astype(np.int64)
        c._align(a, 16, pc, "shared")
        idx, ok = c._smem_bytes(a, 16, pc, "ldmatrix")
        if not ok.all():
            continue
        c._check_read(idx, lanes, pc)
        full = np.zeros(WARP, dtype=np.int64)
        full[: 8 * num] = a
        got = P.ldmatrix(c.smem.data, full, num, trans)  # [32, num]
        for j in range(num):
            outs[j][w * WARP : (w + 1) * WARP] = got[:, j]
    for r, v in zip(regs, outs, strict=True):
        c.write(r, v, m)
    return None


@_h("mma")
def _mma(c: CTA, ins: Instr, m, pc, mask):
    shape = next(x for x in ins.mods if x.startswith("m") and "n" in x and "k" in x)
    types = [x for x in ins.mods if x in _TYPE_BITS or x in ("tf32", "s4", "u4")]
    _dtype, atype, btype, ctype = types
    satfinite = "satfinite" in ins.mods
    d_op, a_op, b_op, c_op = ins.args
    warps = _whole_warps(c, m, pc, ins)
    spec = P.mma_spec(shape, atype, btype, ctype)

    def gather(op, n, bits=32):
        regs = op[1]
        if len(regs) != n:
            raise PtxError(f"{ins.op}: expected {n} registers, got {len(regs)}")
        return np.stack([np.broadcast_to(c.read(r, bits), (c.T,)).astype(U64) for r in regs], axis=1)

    A = gather(a_op, spec.a_regs)
    B = gather(b_op, spec.b_regs)
    C = gather(c_op, spec.c_regs)
    D = np.zeros_like(C)
    for w in warps:
        sl = slice(w * WARP, (w + 1) * WARP)
        D[sl] = P.mma_sync(spec, A[sl].astype(np.uint32), B[sl].astype(np.uint32), C[sl].astype(np.uint32),
                           satfinite)  # fmt: skip
    for i, r in enumerate(d_op[1]):
        c.write(r, D[:, i], m)
    return None


@_h("bfi")
def _bfi(c: CTA, ins: Instr, m, pc, mask):
    bits = _TYPE_BITS[_type(ins)]
    a, b = (np.broadcast_to(c.read(x, bits), (c.T,)).astype(U64) for x in ins.args[1:3])
    pos = np.broadcast_to(to_int(c.read(ins.args[3], 32), 8, False), (c.T,))
    ln = np.broadcast_to(to_int(c.read(ins.args[4], 32), 8, False), (c.T,))
    ln = np.clip(np.minimum(ln, bits - np.minimum(pos, bits)), 0, bits)
    field = np.where(ln >= 64, _mask(64), (U64(1) << ln.astype(U64)) - U64(1))
    sh = np.minimum(pos, bits - 1).astype(U64)
    keep = (pos >= bits) | (ln == 0)
    d = (b & ~(field << sh) & _mask(bits)) | ((a & field) << sh)
    c.write(ins.args[0], np.where(keep, b, d & _mask(bits)), m)
    return None


@_h("vote")
def _vote(c: CTA, ins: Instr, m, pc, mask):
    if "ballot" not in ins.mods:
        raise PtxError(ins.op)
    _whole_warps(c, m, pc, ins)
    p = c.pred(ins.args[1]) & m
    w = (p.reshape(-1, WARP).astype(np.int64) << np.arange(WARP)).sum(axis=1)
    c.write(ins.args[0], w[c.warp].astype(U64), m)
    return None
