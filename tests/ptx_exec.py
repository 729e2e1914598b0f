"""A PTX interpreter for whole kernels, written from the PTX ISA, with memory and race checks.

Why: under TRITON_INTERPRET=1 the tests run the kernels' Python semantics, not what a GPU runs;
a constant the compiler materializes wrongly, a missing barrier or an off-by-one cp.async wait
count pass there and fail on the GPU. This executes the PTX that triton (or nvcc) emits for an
mma.sync target (sm_80/sm_86), one CTA at a time, with every instruction applied to all threads
of the CTA at once (numpy arrays of one value per thread; SIMT with per-thread program counters:
the lowest pending PC runs next, with the threads that sit on it as its mask, which reconverges
structured control flow). The warp-level instructions (mma, ldmatrix) take their operand layouts
from tests/ptx_isa.py, written from the ISA's fragment tables.

Semantics, per the ISA ("Instruction Set" chapter, by instruction name):
* integer ops wrap modulo 2^width; ``shl``/``shr`` clamp the shift to the width; ``bfe``, ``prmt``
  (default mode), ``lop3``, ``selp``, ``setp`` (with ``.u`` float comparisons true on NaN);
* float ops with ``.rn`` (and without: the interpreter never contracts mul + add) round to nearest
  even; ``fma`` rounds once (exact: round-to-odd in float64, then to the target); ``.ftz`` flushes
  subnormal inputs and results to signed zero; ``min``/``max.f32`` return the non-NaN operand;
* ``.approx`` instructions (rcp, rsqrt, ex2, lg2, sqrt, div.full, tanh) return the correctly rounded
  value, one result the ISA's error bounds allow (hardware may differ by the bound);
* ``cvt`` with the rounding modes rn/rz/rm/rp (float results), rni/rzi/rmi/rpi (integers, saturating,
  NaN to 0), ``.rna`` to tf32, the bf16x2/f16x2 packing (``a`` in the upper half);
* ``mma.sync`` on tf32 reads only a register's upper 19 bits (the tf32 bits).

Checks (``Findings``), each with the PC and line of the instruction: global accesses outside every
allocation, writes to read-only inputs; shared accesses outside the kernel's shared memory;
misaligned addresses (natural alignment of the access size, 16 for cp.async of 16 and ldmatrix
rows); shared-memory races, tracked per byte: the last writer and the readers of the current
barrier epoch (``bar.sync`` opens a CTA-wide epoch, ``bar.warp.sync`` one per warp), so a read of
another thread's write, or a write over another thread's read, without a barrier between them is
a race; cp.async destinations stay "in flight" until the issuing thread's ``wait_group`` completes
their group (the data lands then), so reading them earlier is a race that also sees stale data;
reads of shared memory never written; registers read by threads that never wrote them; barriers and
warp-synchronous instructions reached by part of a CTA or warp; integer division by zero.

Not modelled: ptxas contracting an unrounded ``mul`` + ``add`` into an FMA (the interpreter rounds
each), memory ordering across CTAs (they run one after another), ``.local`` memory, calls, and
instructions the kernels here do not use (an unknown one raises PtxError, never runs silently).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import ptx_isa as P

WARP = 32
U64 = np.uint64
GLOBAL_STRIDE = 1 << 32  # allocation i lives at (i + 1) << 32: any stray address falls between them
SHARED_WINDOW = 1 << 48  # generic addresses of the shared window (cvta.shared)


class PtxError(RuntimeError):
    """The interpreter cannot go on (an unsupported instruction, a runaway loop, a bad launch)."""


@dataclass
class Finding:
    kind: str
    pc: int
    line: str
    detail: str


@dataclass
class Findings:
    """Everything the checks flagged during a run, first instance of each (kind, pc) kept."""

    items: list[Finding] = field(default_factory=list)
    counts: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, pc: int, line: str, detail: str) -> None:
        key = (kind, pc)
        if key not in self.counts:
            self.items.append(Finding(kind, pc, line, detail))
        self.counts[key] += 1

    def kinds(self) -> set[str]:
        return {f.kind for f in self.items}

    def __bool__(self) -> bool:
        return bool(self.items)

    def report(self, limit: int = 12) -> str:
        rows = [
            f"{f.kind} x{self.counts[(f.kind, f.pc)]} at pc {f.pc} `{f.line}`: {f.detail}" for f in self.items
        ]
        more = f"\n... {len(rows) - limit} more" if len(rows) > limit else ""
        return "\n".join(rows[:limit]) + more


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


@dataclass
class Instr:
    op: str  # the full opcode, e.g. "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"
    base: str  # "mma"
    mods: list[str]  # ["sync", "aligned", ...]
    args: list
    pred: tuple[str, bool] | None  # (register, negated)
    line: str


@dataclass
class Kernel:
    name: str
    params: list[tuple[str, str]]  # (name, type) in order
    instrs: list[Instr]
    labels: dict[str, int]
    widths: dict[str, int]  # register name or prefix -> bits (1 = predicate)
    shared_symbols: dict[str, tuple[int, int]]  # name -> (size, align); size 0 = extern


_TYPE_BITS = {"pred": 1, "b8": 8, "s8": 8, "u8": 8, "b16": 16, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
              "b32": 32, "s32": 32, "u32": 32, "f32": 32, "f16x2": 32, "bf16x2": 32, "b64": 64, "s64": 64,
              "u64": 64, "f64": 64}  # fmt: skip


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = (line.split("//")[0] for line in text.splitlines())
    return "\n".join(line for line in lines if not re.match(r"\s*\.(loc|file)\b", line))


def _split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _parse_operand(s: str, rename):
    s = s.strip()
    if s.startswith("{"):
        return ("vec", [_parse_operand(x, rename) for x in _split_args(s[1:-1])])
    if s.startswith("["):
        inner = s[1:-1].replace(" ", "")
        m = re.fullmatch(r"([%\w$.]+)?(?:\+(-?(?:0x[0-9a-fA-F]+|\d+)))?", inner)
        if not m:
            raise PtxError(f"bad address {s}")
        base = m.group(1)
        off = int(m.group(2), 0) if m.group(2) else 0
        if base and base.startswith("%"):
            return ("addr", ("reg", rename(base)), None, off)
        return ("addr", None, base, off)
    if s == "_":
        return ("sink",)
    if s.startswith("!"):
        return ("not", _parse_operand(s[1:], rename))
    if s.startswith("%"):
        special = s in ("%tid.x", "%tid.y", "%tid.z", "%ntid.x", "%ntid.y", "%ntid.z", "%ctaid.x", "%ctaid.y",
                        "%ctaid.z", "%nctaid.x", "%nctaid.y", "%nctaid.z", "%laneid", "%warpid", "%clock",
                        "%clock64", "%globaltimer")  # fmt: skip
        return ("special", s) if special else ("reg", rename(s))
    m = re.fullmatch(r"0([fF])([0-9a-fA-F]{8})|0([dD])([0-9a-fA-F]{16})", s)
    if m:
        return ("fimm", int(m.group(2), 16), 32) if m.group(1) else ("fimm", int(m.group(4), 16), 64)
    m = re.fullmatch(r"(-?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)[uU]?", s)
    if m:
        v = int(m.group(2), 16) if m.group(2).lower().startswith("0x") else int(m.group(2), 8 if
                                                                              m.group(2).startswith("0") and len(m.group(2)) > 1 else 10)  # fmt: skip
        return ("imm", -v if m.group(1) else v)
    if re.fullmatch(r"-?\d+\.\d*(e[-+]?\d+)?", s):
        return ("fimm", int(np.float64(float(s)).view(np.uint64)), 64)
    if re.fullmatch(r"[A-Za-z_$][\w$.]*", s):
        scoped = rename(s)  # an inline-asm block's own registers have no % sign
        return ("reg", scoped) if scoped != s else ("sym", s)
    raise PtxError(f"cannot parse operand {s!r}")


def parse(ptx: str, name: str | None = None) -> Kernel:
    """Parse the ``.entry`` function ``name`` (the first one if None) of a PTX module."""
    text = _strip_comments(ptx)
    shared_symbols: dict[str, tuple[int, int]] = {}
    for m in re.finditer(r"\.shared\s+(?:\.align\s+(\d+)\s+)?\.\w+\s+([\w$]+)\s*\[(\d*)\]", text):
        shared_symbols[m.group(2)] = (int(m.group(3) or 0), int(m.group(1) or 1))
    entries = list(re.finditer(r"\.entry\s+([\w$]+)\s*\(", text))
    if not entries:
        raise PtxError("no .entry in the PTX")
    em = next((e for e in entries if name is None or e.group(1) == name), None)
    if em is None:
        raise PtxError(f"no .entry {name}; have {[e.group(1) for e in entries]}")
    close = text.index(")", em.end())
    params = []
    for decl in text[em.end() : close].split(","):
        if decl.strip():
            words = decl.split()
            params.append((words[-1], next(w[1:] for w in words[1:] if w[1:] in _TYPE_BITS)))
    start = text.index("{", close)
    depth, i = 0, start
    while True:
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                break
        i += 1
    body = text[start + 1 : i]
    shared_symbols = {k: v for k, v in shared_symbols.items() if re.search(rf"\b{re.escape(k)}\b", body)}

    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    widths: dict[str, int] = {}
    scopes: list[dict[str, str]] = [{}]
    counter = [0]

    def rename(reg: str) -> str:
        for sc in reversed(scopes):
            if reg in sc:
                return sc[reg]
        return reg

    for stmt in body.split(";"):
        s = stmt.strip()
        while True:
            if s.startswith("{"):
                scopes.append({})
                s = s[1:].strip()
            elif s.startswith("}"):
                scopes.pop()
                s = s[1:].strip()
            elif m := re.match(r"^([\w$]+):", s):
                labels[m.group(1)] = len(instrs)
                s = s[m.end() :].strip()
            else:
                break
        if not s:
            continue
        if s.startswith(".reg"):
            m = re.match(r"\.reg\s+\.(\w+)\s+(.*)", s, re.S)
            bits = _TYPE_BITS[m.group(1)]
            for decl in m.group(2).split(","):
                decl = decl.strip()
                if mm := re.fullmatch(r"(%?[\w$]+)<\d+>", decl):
                    widths[mm.group(1)] = bits
                else:
                    if len(scopes) > 1:
                        counter[0] += 1
                        new = f"{decl}@{counter[0]}"
                        scopes[-1][decl] = new
                        decl = new
                    widths[decl] = bits
            continue
        if s.startswith(
            (".local", ".shared", ".pragma", ".maxnreg", ".reqntid", ".maxntid", ".minnctapersm")
        ):
            if s.startswith(".local"):
                raise PtxError(f"local memory is not supported: {s}")
            continue
        pred = None
        if m := re.match(r"^@(!?)(%?[\w$@]+)\s+", s):
            pred = (rename(m.group(2)), m.group(1) == "!")
            s = s[m.end() :]
        m = re.match(r"^([\w.:]+)\s*(.*)$", s, re.S)
        op, rest = m.group(1), m.group(2).strip()
        parts = op.split(".")
        args = [_parse_operand(a, rename) for a in _split_args(rest)] if rest else []
        line = " ".join(stmt.split())
        instrs.append(Instr(op, parts[0], parts[1:], args, pred, line))
    instrs.append(Instr("exit", "exit", [], [], None, "<end of kernel>"))
    return Kernel(em.group(1), params, instrs, labels, widths, shared_symbols)


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
        return x32.astype(np.float16).view(np.uint16).astype(U64)


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


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


class GlobalMemory:
    """Allocations at (i + 1) << 32; each a byte array with a read-only flag and per-byte writers."""

    def __init__(self) -> None:
        self.bufs: list[np.ndarray] = []
        self.names: list[str] = []
        self.readonly: list[bool] = []
        self.writer: list[np.ndarray] = []  # global thread id of the last write (-1: none)

    def alloc(
        self, name: str, data: np.ndarray | bytes | int, readonly: bool = False, fill: int = 0xFF
    ) -> int:
        """Place ``data`` (bytes of an array, or a size: filled with ``fill``); return its address."""
        if isinstance(data, int):
            buf = np.full(data, fill, dtype=np.uint8)
        else:
            buf = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8).copy()
        self.bufs.append(buf)
        self.names.append(name)
        self.readonly.append(readonly)
        self.writer.append(np.full(buf.size, -1, dtype=np.int64))
        return len(self.bufs) * GLOBAL_STRIDE

    def base(self, name: str) -> int:
        return (self.names.index(name) + 1) * GLOBAL_STRIDE

    def get(self, name: str) -> np.ndarray:
        return self.bufs[self.names.index(name)]

    def written(self, name: str) -> np.ndarray:
        return self.writer[self.names.index(name)] >= 0

    def locate(self, addr: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(buffer index, offset, in bounds) per address."""
        idx = (addr >> U64(32)).astype(np.int64) - 1
        off = (addr & U64(0xFFFFFFFF)).astype(np.int64)
        ok = (idx >= 0) & (idx < len(self.bufs))
        sizes = np.array([b.size for b in self.bufs] + [0], dtype=np.int64)
        ok &= off + size <= sizes[np.where(ok, idx, len(self.bufs))]
        return idx, off, ok


class SharedMemory:
    """One CTA's shared memory with its race-tracking shadow, per byte."""

    def __init__(self, size: int, nthreads: int) -> None:
        self.size = size
        self.data = np.zeros(size, dtype=np.uint8)
        self.init = np.zeros(size, dtype=bool)
        self.w_thread = np.full(size, -1, dtype=np.int64)
        self.w_epoch = np.zeros(size, dtype=np.int64)
        self.w_wepoch = np.zeros(size, dtype=np.int64)
        self.r_epoch = np.full(size, -1, dtype=np.int64)
        self.r_thread = np.full(size, -1, dtype=np.int64)  # -2: several readers
        self.r_warps = np.zeros(size, dtype=np.int64)  # bitmask of reading warps (this epoch)
        self.r_wepoch = np.zeros(size, dtype=np.int64)
        self.pending = np.zeros(size, dtype=np.int64)  # cp.async writes in flight
        self.epoch = 0
        self.wepoch = np.zeros((nthreads + WARP - 1) // WARP, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------


@dataclass
class _Copy:
    threads: np.ndarray  # issuing threads
    group: np.ndarray  # their group number
    dst: np.ndarray  # [n, size] byte addresses
    data: np.ndarray  # [n, size] bytes


class CTA:
    """Executes one CTA of a kernel (all its threads as numpy vectors)."""

    MAX_STEPS = 2_000_000

    def __init__(self, kernel: Kernel, mem: GlobalMemory, params: dict[str, int], ctaid: tuple[int, int, int],
                 nctaid: tuple[int, int, int], nthreads: int, shared_bytes: int, findings: Findings,
                 approx: str = "exact") -> None:  # fmt: skip
        self.k = kernel
        self.approx = approx
        self.mem = mem
        self.params = params
        self.ctaid, self.nctaid = ctaid, nctaid
        self.T = nthreads
        self.tid = np.arange(nthreads, dtype=np.int64)
        self.gtid = self.tid + nthreads * (ctaid[0] + nctaid[0] * (ctaid[1] + nctaid[1] * ctaid[2]))
        self.lane = self.tid % WARP
        self.warp = self.tid // WARP
        self.regs: dict[str, np.ndarray] = {}
        self.undef: dict[str, np.ndarray] = {}  # threads that never wrote a partially written register
        self.cur = np.ones(nthreads, dtype=bool)  # the threads executing the current instruction
        self.pc = 0
        self.f = findings
        # shared symbols: the extern one at 0 (dynamic), static ones after it
        self.sym_addr: dict[str, int] = {}
        top = 0
        for name, (size, align) in kernel.shared_symbols.items():
            if size:
                top = (top + align - 1) // align * align
                self.sym_addr[name] = top
                top += size
        for name, (size, _) in kernel.shared_symbols.items():
            if not size:
                top = (top + 127) // 128 * 128
                self.sym_addr[name] = top
        self.smem = SharedMemory(top + shared_bytes, nthreads)
        self.groups = np.zeros(nthreads, dtype=np.int64)  # committed cp.async groups per thread
        self.copies: list[_Copy] = []
        self.uncommitted = np.zeros(nthreads, dtype=bool)

    # --- registers and operands ----------------------------------------------------------------

    def width(self, reg: str) -> int:
        if reg in self.k.widths:
            return self.k.widths[reg]
        prefix = reg.rstrip("0123456789")
        if prefix in self.k.widths:
            return self.k.widths[prefix]
        raise PtxError(f"undeclared register {reg}")

    def special(self, name: str) -> np.ndarray:
        axis = {"x": 0, "y": 1, "z": 2}
        if name.startswith("%tid."):
            return (self.tid if name.endswith("x") else np.zeros(self.T, np.int64)).astype(U64)
        if name.startswith("%ntid."):
            return np.full(self.T, self.T if name.endswith("x") else 1, dtype=U64)
        if name.startswith("%ctaid."):
            return np.full(self.T, self.ctaid[axis[name[-1]]], dtype=U64)
        if name.startswith("%nctaid."):
            return np.full(self.T, self.nctaid[axis[name[-1]]], dtype=U64)
        if name == "%laneid":
            return self.lane.astype(U64)
        if name == "%warpid":
            return self.warp.astype(U64)
        return np.zeros(self.T, dtype=U64)  # clocks

    def read(self, op, bits: int) -> np.ndarray:
        """An operand's raw bits (uint64 per thread, or a scalar for immediates)."""
        kind = op[0]
        if kind == "reg":
            v = self.regs.get(op[1])
            undef = self.undef.get(op[1]) if v is not None else None
            if (v is None and self.cur.any()) or (undef is not None and (undef & self.cur).any()):
                self.f.add("uninit-register", self.pc, self.k.instrs[self.pc].line,
                           f"{op[1]} read before any write in {int(self.cur.sum())} active threads")  # fmt: skip
            if v is None:
                if self.width(op[1]) == 1:
                    return np.zeros(self.T, dtype=bool)
                return np.zeros(self.T, dtype=U64)
            return v
        if kind == "imm":
            return U64(op[1] & ((1 << bits) - 1) if bits < 64 else op[1] & 0xFFFFFFFFFFFFFFFF)
        if kind == "fimm":
            if op[2] == bits:
                return U64(op[1])
            if op[2] == 64 and bits == 32:  # a double literal in a single-precision op
                return from_f32(np.float32(np.uint64(op[1]).view(np.float64)))
            return U64(op[1] & ((1 << bits) - 1))
        if kind == "special":
            return self.special(op[1])
        if kind == "sym":
            if op[1] in self.sym_addr:
                return U64(self.sym_addr[op[1]])
            raise PtxError(f"unknown symbol {op[1]}")
        if kind == "not":
            return ~self.read(op[1], bits).astype(bool)
        raise PtxError(f"cannot read operand {op}")

    def pred(self, op) -> np.ndarray:
        v = self.read(op, 1)
        return np.broadcast_to(np.asarray(v, dtype=bool), (self.T,))

    def write(self, op, value, mask: np.ndarray) -> None:
        if op[0] == "sink":
            return
        if op[0] != "reg":
            raise PtxError(f"cannot write operand {op}")
        name = op[1]
        bits = self.width(name)
        if bits == 1:
            v = np.broadcast_to(np.asarray(value, dtype=bool), (self.T,))
        else:
            v = np.broadcast_to(np.asarray(value, dtype=U64) & _mask(bits), (self.T,))
        if mask.all():
            self.regs[name] = v.copy()
            self.undef.pop(name, None)
        else:
            old = self.regs.get(name)
            self.regs[name] = np.where(mask, v, np.zeros_like(v) if old is None else old)
            if old is None:
                self.undef[name] = ~mask
            elif name in self.undef:
                self.undef[name] = self.undef[name] & ~mask

    # --- shared memory checks ---------------------------------------------------------------------

    def _smem_bytes(self, addr: np.ndarray, size: int, pc: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Byte indices [n, size] of shared accesses, with a per-access in-bounds mask."""
        a = addr.astype(np.int64)
        ok = (a >= 0) & (a + size <= self.smem.size)
        if not ok.all():
            self.f.add("oob-shared", pc, self.k.instrs[pc].line,
                       f"{what} of {size} B at shared {int(a[~ok][0])} (size {self.smem.size})")  # fmt: skip
        return a[:, None] + np.arange(size), ok

    def _align(self, addr: np.ndarray, size: int, pc: int, space: str) -> None:
        bad = (addr.astype(np.int64) % size) != 0
        if bad.any():
            self.f.add("misaligned", pc, self.k.instrs[pc].line,
                       f"{space} address {int(addr[bad][0]):#x} not {size}-byte aligned")  # fmt: skip

    def _check_read(self, idx: np.ndarray, threads: np.ndarray, pc: int) -> None:
        """idx [n, size] shared bytes read by threads [n] (in bounds)."""
        sm = self.smem
        t = np.broadcast_to(threads[:, None], idx.shape).ravel()
        b = idx.ravel()
        line = self.k.instrs[pc].line
        if (sm.pending[b] > 0).any():
            self.f.add(
                "race-inflight", pc, line, "read of a cp.async destination before its wait_group completed"
            )
        if not sm.init[b].all():
            self.f.add(
                "uninit-shared", pc, line, f"read of shared byte {int(b[~sm.init[b]][0])} never written"
            )
        w = sm.w_thread[b]
        other = (w >= 0) & (w != t)
        if other.any():
            wt = np.where(other, w, 0) % self.T
            ordered = (sm.w_epoch[b] < sm.epoch) | (
                ((wt // WARP) == (t // WARP)) & (sm.w_wepoch[b] < sm.wepoch[t // WARP])
            )
            bad = other & ~ordered
            if bad.any():
                i = int(np.argmax(bad))
                self.f.add("race-raw", pc, line,
                           f"thread {int(t[i])} reads shared byte {int(b[i])} written by thread {int(w[i])} "
                           "with no barrier between")  # fmt: skip
        # record readers
        new = sm.r_epoch[b] != sm.epoch
        if new.any():
            nb = b[new]
            sm.r_epoch[nb] = sm.epoch
            sm.r_thread[nb] = -1
            sm.r_warps[nb] = 0
        prev = sm.r_thread[b]
        sm.r_thread[b] = np.where((prev == -1) | (prev == t), t, -2)
        # several distinct readers of one byte in this instruction
        order = np.lexsort((t, b))
        bs, ts = b[order], t[order]
        dup = (bs[1:] == bs[:-1]) & (ts[1:] != ts[:-1])
        if dup.any():
            sm.r_thread[bs[1:][dup]] = -2
        np.bitwise_or.at(sm.r_warps, b, (np.int64(1) << (t // WARP)))
        sm.r_wepoch[b] = np.maximum(sm.r_wepoch[b], sm.wepoch[t // WARP])

    def _check_write(self, idx: np.ndarray, threads: np.ndarray, pc: int, values: np.ndarray | None) -> None:
        sm = self.smem
        t = np.broadcast_to(threads[:, None], idx.shape).ravel()
        b = idx.ravel()
        line = self.k.instrs[pc].line
        if (sm.pending[b] > 0).any():
            self.f.add("race-inflight", pc, line, "write to a cp.async destination still in flight")
        w = sm.w_thread[b]
        wt = np.where(w >= 0, w, 0)
        same_warp = (wt // WARP) == (t // WARP)
        other = (w >= 0) & (w != t)
        ordered = (sm.w_epoch[b] < sm.epoch) | (same_warp & (sm.w_wepoch[b] < sm.wepoch[t // WARP]))
        if (other & ~ordered).any():
            i = int(np.argmax(other & ~ordered))
            self.f.add("race-waw", pc, line, f"thread {int(t[i])} overwrites shared byte {int(b[i])} of thread "
                       f"{int(w[i])} with no barrier between")  # fmt: skip
        cur = sm.r_epoch[b] == sm.epoch
        rt = sm.r_thread[b]
        foreign = cur & (rt != -1) & (rt != t)
        if foreign.any():
            own_warp_only = sm.r_warps[b] == (np.int64(1) << (t // WARP))
            synced = own_warp_only & (sm.r_wepoch[b] < sm.wepoch[t // WARP])
            bad = foreign & ~synced
            if bad.any():
                i = int(np.argmax(bad))
                self.f.add("race-war", pc, line, f"thread {int(t[i])} writes shared byte {int(b[i])} read by "
                           "another thread with no barrier between")  # fmt: skip
        if values is not None:
            order = np.lexsort((t, b))
            bs, ts, vs = b[order], t[order], values.ravel()[order]
            clash = (bs[1:] == bs[:-1]) & (ts[1:] != ts[:-1]) & (vs[1:] != vs[:-1])
            if clash.any():
                self.f.add("race-waw", pc, line, f"threads write different values to shared byte "
                           f"{int(bs[1:][clash][0])} in one instruction")  # fmt: skip
        sm.w_thread[b] = t
        sm.w_epoch[b] = sm.epoch
        sm.w_wepoch[b] = sm.wepoch[t // WARP]

    # --- memory access ----------------------------------------------------------------------------

    def _space(self, ins: Instr) -> str:
        for s in ("param", "global", "shared", "local", "const"):
            if s in ins.mods:
                return s
        return "generic"

    def _address(self, op) -> np.ndarray:
        _, base, sym, off = op
        if base is not None:
            a = np.broadcast_to(self.read(base, 64), (self.T,)).astype(U64)
        elif sym in self.sym_addr:
            a = np.full(self.T, self.sym_addr[sym], dtype=U64)
        else:
            raise PtxError(f"address of unknown symbol {sym}")
        return a + U64(off & 0xFFFFFFFFFFFFFFFF)

    def load_bytes(self, space: str, addr: np.ndarray, size: int, m: np.ndarray, pc: int) -> np.ndarray:
        """[T, size] bytes loaded by active threads (zeros elsewhere, and where out of bounds)."""
        out = np.zeros((self.T, size), dtype=np.uint8)
        th = np.nonzero(m)[0]
        if th.size == 0:
            return out
        a = addr[th]
        if space == "generic":
            sh = a >= U64(SHARED_WINDOW)
            if sh.all():
                space, a = "shared", a - U64(SHARED_WINDOW)
            elif not sh.any():
                space = "global"
            else:
                raise PtxError("generic load mixing shared and global addresses")
        self._align(a, size, pc, space)
        if space == "shared":
            idx, ok = self._smem_bytes(a, size, pc, "load")
            if ok.any():
                self._check_read(idx[ok], th[ok], pc)
                out[th[ok]] = self.smem.data[idx[ok]]
            return out
        if space == "global":
            bi, off, ok = self.mem.locate(a, size)
            if not ok.all():
                self.f.add("oob-global", pc, self.k.instrs[pc].line,
                           f"load of {size} B at {int(a[~ok][0]):#x} outside every allocation")  # fmt: skip
            for buf in np.unique(bi[ok]):
                sel = ok & (bi == buf)
                out[th[sel]] = self.mem.bufs[buf][off[sel][:, None] + np.arange(size)]
            return out
        raise PtxError(f"load from {space}")

    def store_bytes(self, space: str, addr: np.ndarray, data: np.ndarray, m: np.ndarray, pc: int) -> None:
        th = np.nonzero(m)[0]
        if th.size == 0:
            return
        size = data.shape[1]
        a, d = addr[th], data[th]
        if space == "generic":
            sh = a >= U64(SHARED_WINDOW)
            if sh.all():
                space, a = "shared", a - U64(SHARED_WINDOW)
            elif not sh.any():
                space = "global"
            else:
                raise PtxError("generic store mixing shared and global addresses")
        self._align(a, size, pc, space)
        if space == "shared":
            idx, ok = self._smem_bytes(a, size, pc, "store")
            if ok.any():
                self._check_write(idx[ok], th[ok], pc, d[ok])
                self.smem.data[idx[ok]] = d[ok]
                self.smem.init[idx[ok]] = True
            return
        if space == "global":
            bi, off, ok = self.mem.locate(a, size)
            line = self.k.instrs[pc].line
            if not ok.all():
                self.f.add(
                    "oob-global",
                    pc,
                    line,
                    f"store of {size} B at {int(a[~ok][0]):#x} outside every allocation",
                )
            for buf in np.unique(bi[ok]):
                sel = ok & (bi == buf)
                if self.mem.readonly[buf]:
                    self.f.add("write-readonly", pc, line, f"store into input {self.mem.names[buf]}")
                    continue
                pos = off[sel][:, None] + np.arange(size)
                prev = self.mem.writer[buf][pos]
                g = np.broadcast_to(self.gtid[th[sel]][:, None], pos.shape)
                clash = (prev >= 0) & (prev != g) & (self.mem.bufs[buf][pos] != d[sel])
                if clash.any():
                    self.f.add(
                        "race-global",
                        pc,
                        line,
                        f"{self.mem.names[buf]} byte written twice with different values",
                    )
                self.mem.bufs[buf][pos] = d[sel]
                self.mem.writer[buf][pos] = g
            return
        raise PtxError(f"store to {space}")

    # --- execution --------------------------------------------------------------------------------

    def run(self) -> None:
        pc = np.zeros(self.T, dtype=np.int64)
        done = np.zeros(self.T, dtype=bool)
        steps = 0
        n = len(self.k.instrs)
        while not done.all():
            live_pc = np.where(done, n + 1, pc)
            p = int(live_pc.min())
            mask = live_pc == p
            ins = self.k.instrs[p]
            steps += 1
            if steps > self.MAX_STEPS:
                raise PtxError("step limit reached (runaway loop?)")
            active = mask
            if ins.pred is not None:
                pv = self.regs.get(ins.pred[0], np.zeros(self.T, dtype=bool))
                active = mask & (~pv if ins.pred[1] else pv)
            h = _HANDLERS.get(ins.base)
            if h is None:
                raise PtxError(f"unsupported instruction {ins.op} at pc {p}: {ins.line}")
            self.cur, self.pc = active, p
            nxt = h(self, ins, active, p, mask)
            if nxt is None:
                pc[mask] = p + 1
            else:
                target, taken = nxt
                if target == -1:  # exit/ret
                    done |= taken
                    pc[mask & ~taken] = p + 1
                else:
                    pc[mask & taken] = target
                    pc[mask & ~taken] = p + 1
        self._drain_copies()

    def _drain_copies(self) -> None:
        """At exit, in-flight copies land (no reader can see them any more)."""
        for c in self.copies:
            self.smem.data[c.dst] = c.data
            self.smem.init[c.dst] = True
            np.subtract.at(self.smem.pending, c.dst.ravel(), 1)
        self.copies = []


# ------------------------------------------------------------------------------------------------
# Instruction handlers: (cta, ins, active, pc, mask) -> None (fall through) or (target, taken mask)
# ------------------------------------------------------------------------------------------------

_HANDLERS = {}


def _h(*names):
    def deco(fn):
        for nm in names:
            _HANDLERS[nm] = fn
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
    _HANDLERS[_n] = _int_binop(_n)


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


@_h("cvt")
def _cvt(c: CTA, ins: Instr, m, pc, mask):
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


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


def param_bits(ptype: str, value) -> int:
    """A kernel argument as the bits of its .param type."""
    if ptype == "f32":
        return int(np.float32(value).view(np.uint32))
    if ptype == "f64":
        return int(np.float64(value).view(np.uint64))
    bits = _TYPE_BITS[ptype]
    return int(value) & ((1 << bits) - 1)


def launch(kernel: Kernel, mem: GlobalMemory, args: list, grid: tuple[int, int, int], nthreads: int,
           shared_bytes: int, ctas: list[tuple[int, int, int]] | None = None, approx: str = "exact") -> Findings:  # fmt: skip
    """Run ``kernel`` over ``grid`` (or only the CTAs in ``ctas``) with ``args`` (ints/floats in PTX
    parameter order; pointers are GlobalMemory addresses). Returns what the checks found.

    ``approx``: "exact" gives approximate instructions (``.approx``, ``div.full``) their correctly
    rounded result; "perturb" moves each such result one ulp away from zero (inside every bound
    the ISA gives them), so that a result that must be exact cannot lean on an approximation
    being better on the CPU than on the GPU."""
    if approx not in ("exact", "perturb"):
        raise ValueError(f"approx must be 'exact' or 'perturb', got {approx!r}")
    if len(args) != len(kernel.params):
        raise PtxError(f"{kernel.name} takes {len(kernel.params)} parameters, got {len(args)}")
    params = {name: param_bits(t, v) for (name, t), v in zip(kernel.params, args, strict=True)}
    findings = Findings()
    order = ctas or [(x, y, z) for z in range(grid[2]) for y in range(grid[1]) for x in range(grid[0])]
    for cta in order:
        CTA(kernel, mem, params, cta, grid, nthreads, shared_bytes, findings, approx).run()
    return findings


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
