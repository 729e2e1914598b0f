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

Warp-specialized sm_90 kernels (tests/ptx_sm90.py adds their instructions: TMA, mbarriers,
named barriers, wgmma): threads that wait (a failed mbarrier try-wait, a named barrier not yet
full) block and the others run; the threads a barrier or an mbarrier phase releases run first;
``launch(..., schedule="high_warpgroup_first")`` runs the highest warpgroup that can run first
(a producer warp fills its ring before the consumers start). A completed barrier or mbarrier
phase opens a new shared-memory epoch for the race checks (lenient: it orders everyone, not only
the threads it synchronizes); the results are compared exactly, under both schedules.

Layout: tests/ptx_parse.py reads the PTX text, tests/ptx_ops.py holds the instructions (one
handler per opcode), tests/ptx_sm90.py the sm_90 ones, this module the memory, the checks, the
SIMT machine and ``launch``.

Not modelled: ptxas contracting an unrounded ``mul`` + ``add`` into an FMA (the interpreter rounds
each), memory ordering across CTAs (they run one after another), ``.local`` memory, calls, and
instructions the kernels here do not use (an unknown one raises PtxError, never runs silently).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import ptx_sm90  # noqa: F401  (registers the sm_90 handlers)
from .ptx_ops import HANDLERS, SHARED_WINDOW, U64, WARP, _Copy, _mask, from_f32
from .ptx_parse import _TYPE_BITS, Instr, Kernel, PtxError, parse

__all__ = [
    "CTA",
    "Finding",
    "Findings",
    "GlobalMemory",
    "Kernel",
    "PtxError",
    "SharedMemory",
    "launch",
    "parse",
]

GLOBAL_STRIDE = 1 << 32  # allocation i lives at (i + 1) << 32: any stray address falls between them


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
        self.tmaps: dict[int, object] = {}  # sm_90: tensor maps by handle (tests/ptx_sm90.py)
        self.sm90: dict = {}  # sm_90 state: mbarriers, named barriers, wgmma queues
        self.schedule = "lowest_pc"

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
            if op[1] in self.params:  # the address of a .param (a tensor map): its handle
                return U64(self.params[op[1]])
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
        """Lowest pending PC first among the threads not waiting; threads a barrier or an
        mbarrier just released run before the others (so a producer waiting for a free slot
        refills it as soon as it is freed: a consumer that frees a slot too early then reads the
        next group's data). ``schedule`` "high_warpgroup_first" (warp-specialized kernels) runs
        the highest warpgroup that can run first: the producer fills the ring before the consumers
        start and then waits on every slot's release."""
        pc = np.zeros(self.T, dtype=np.int64)
        done = np.zeros(self.T, dtype=bool)
        self.blocked = np.zeros(self.T, dtype=bool)
        self.prio = np.zeros(self.T, dtype=np.int64)
        steps = 0
        n = len(self.k.instrs)
        while not done.all():
            ready = ~done & ~self.blocked
            if not ready.any():
                raise PtxError("deadlock: every live thread waits on a barrier or an mbarrier")
            ready &= self.prio == self.prio[ready].max()
            if self.schedule == "high_warpgroup_first":  # e.g. a producer warp before its consumers
                wg = self.tid // 128
                ready &= wg == wg[ready].max()
            live_pc = np.where(ready, pc, n + 1)
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
            h = HANDLERS.get(ins.base)
            if h is None:
                raise PtxError(f"unsupported instruction {ins.op} at pc {p}: {ins.line}")
            self.cur, self.pc = active, p
            nxt = h(self, ins, active, p, mask)
            if nxt is None:
                pc[mask] = p + 1
            elif nxt[0] == "stay":  # these threads wait here and run the instruction again
                pc[mask & ~nxt[1]] = p + 1
            elif nxt[0] == "multi":  # a per-thread branch target (brx.idx)
                pc[mask] = np.where(nxt[1][mask] >= 0, nxt[1][mask], p + 1)
            else:
                target, taken = nxt
                if target == -1:  # exit/ret
                    done |= taken
                    pc[mask & ~taken] = p + 1
                else:
                    pc[mask & taken] = target
                    pc[mask & ~taken] = p + 1
        self._drain_copies()

    def block(self, m: np.ndarray) -> None:
        """Threads ``m`` wait until ``wake``."""
        self.blocked |= m

    def wake(self, m: np.ndarray) -> None:
        """Release waiting threads ``m``; they run before the threads that did not wait."""
        if m.any():
            self.blocked &= ~m
            self.prio[m] = self.prio.max() + 1
            self.smem.epoch += 1  # a barrier or a completed mbarrier phase orders shared memory

    def _drain_copies(self) -> None:
        """At exit, in-flight copies land (no reader can see them any more)."""
        for c in self.copies:
            self.smem.data[c.dst] = c.data
            self.smem.init[c.dst] = True
            np.subtract.at(self.smem.pending, c.dst.ravel(), 1)
        self.copies = []


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
           shared_bytes: int, ctas: list[tuple[int, int, int]] | None = None, approx: str = "exact",
           tmaps: dict | None = None, schedule: str = "lowest_pc") -> Findings:  # fmt: skip
    """Run ``kernel`` over ``grid`` (or only the CTAs in ``ctas``) with ``args`` (ints/floats in PTX
    parameter order; pointers are GlobalMemory addresses). Returns what the checks found.

    ``approx``: "exact" gives approximate instructions (``.approx``, ``div.full``) their correctly
    rounded result; "perturb" moves each such result one ulp away from zero (inside every bound
    the ISA gives them), so that a result that must be exact cannot lean on an approximation
    being better on the CPU than on the GPU. ``tmaps``: TMA tensor maps (tests/ptx_sm90.TensorMap)
    by the handle passed as their kernel parameter; ``schedule``: see ``CTA.run``."""
    if approx not in ("exact", "perturb"):
        raise ValueError(f"approx must be 'exact' or 'perturb', got {approx!r}")
    if len(args) != len(kernel.params):
        raise PtxError(f"{kernel.name} takes {len(kernel.params)} parameters, got {len(args)}")
    params = {name: param_bits(t, v) for (name, t), v in zip(kernel.params, args, strict=True)}
    findings = Findings()
    order = ctas or [(x, y, z) for z in range(grid[2]) for y in range(grid[1]) for x in range(grid[0])]
    for cta in order:
        c = CTA(kernel, mem, params, cta, grid, nthreads, shared_bytes, findings, approx)
        c.tmaps = dict(tmaps or {})
        if schedule not in ("lowest_pc", "high_warpgroup_first"):
            raise ValueError(f"schedule must be 'lowest_pc' or 'high_warpgroup_first', got {schedule!r}")
        c.schedule = schedule
        c.run()
    return findings
