"""The sm_90 instructions of a warp-specialized TMA + wgmma kernel, for tests/ptx_exec.py,
written from the PTX ISA (by instruction name; each handler says what it follows).

* ``mbarrier.init / arrive / arrive.expect_tx / try_wait.parity`` ("Parallel Synchronization and
  Communication Instructions: mbarrier"): a barrier holds its expected arrival count, the pending
  arrivals and the pending transaction bytes of its current phase; the phase completes when both
  reach zero (the pending count is then re-armed) and ``try_wait.parity p`` is true once the phase
  of parity p has completed, i.e. while the current phase's parity differs from p (a fresh barrier
  is in phase 0, so parity 1 passes at once). A thread whose try-wait fails waits (the machine
  runs others) and runs it again when the barrier completes a phase.
* ``cp.async.bulk.tensor.{1,2}d.shared::cluster.global.mbarrier::complete_tx::bytes`` (TMA): the
  box at the coordinates (innermost first) is read from the tensor map's global tensor, elements
  outside it as zeros, written row-major (innermost fastest) from the destination address through
  the map's swizzle, and its full box size signalled to the mbarrier as completed bytes. The copy
  lands when issued (one legal timing; a consumer that reads before the ready barrier completes
  then still reads an unwritten or stale slot, which the shared-memory checks flag).
* swizzle (the ISA's "Shared Memory Matrix Layout", and the same modes of a tensor map): for a
  swizzle width W of 32, 64 or 128 bytes, byte address bits [4, 4 + log2(W/16)) are XORed with bits
  [7, 7 + log2(W/16)).
* ``wgmma.fence / commit_group / wait_group N / mma_async`` ("Asynchronous Warpgroup Level Matrix
  Multiply-Accumulate"): an MMA's register operands are taken when it is issued, its shared-memory
  operand (a matrix descriptor) is read and its accumulators written when a ``wait_group`` retires
  its group (so a slot freed before that wait is read after the producer refilled it). Fragments of
  A (registers) and D (f32) per the ISA's m64nNk16 / m64nNk32 figures: warp w of the warpgroup holds
  rows 16w..16w+15; lane l (g = l / 4, q = l % 4) holds in A register i row g + 8 (i % 2), K
  columns 8 (i / 2) + 2q + {0, 1} (16-bit) or 16 (i / 2) + 4q + {0..3} (8-bit), and in D register i
  (j = i / 4, r = i % 4) row g + 8 (r / 2), column 8j + 2q + r % 2. B (K-major, no transpose): the
  descriptor's start address (bits 0-13, >> 4), stride byte offset (32-45, >> 4) between groups
  of 8 rows and swizzle mode (62-63: 1 = 128 B, 2 = 64 B, 3 = 32 B, 0 = none with the leading byte
  offset (16-29) between 16-byte K chunks); row n of B at start + (n / 8) SBO + (n % 8) W. Products
  and sums in float64, rounded to fp32 once (exact for the FP8 kernel's integer group sums).
* ``bar.sync id, count`` / ``barrier.sync id`` (named barriers): threads wait until ``count``
  (default: the CTA) have arrived at barrier ``id``.
* ``brx.idx`` (per-thread indexed branch over a ``.branchtargets`` list), ``elect.sync`` (the
  lowest active lane of each warp), ``setmaxnreg`` (no effect here), ``stmatrix`` (the inverse of
  ldmatrix's fragments, tests/ptx_isa.ldmatrix_frag), ``fence.proxy.async`` (ordering only).
* ``shf.{l,r}.{clamp,wrap}.b32 d, a, b, c`` ("Integer Arithmetic Instructions: shf", the funnel
  shift the W4A8 kernel's weight expansion uses as a rotate): the 64-bit value b:a (b the upper
  32 bits) shifted by n = c mod 32 (.wrap) or min(c, 32) (.clamp), unsigned; .l writes the upper
  32 bits of the left shift, .r the lower 32 bits of the right shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import ptx_isa as P
from .ptx_ops import HANDLERS, U64, WARP, _bar, _h, _whole_warps, to_int
from .ptx_parse import Instr, PtxError

if TYPE_CHECKING:
    from .ptx_exec import CTA

WARPGROUP = 128
_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()  # the definer's decode


@dataclass
class TensorMap:
    """A TMA tensor map as the test builds it (the driver's 128-byte encoding is opaque): the
    global tensor's address, element size, sizes and byte strides (innermost first, the
    innermost stride is the element), box sizes and the swizzle width (0, 32, 64, 128 bytes)."""

    address: int
    elem_bytes: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    box: tuple[int, ...]
    swizzle: int = 0


def swizzle(addr: np.ndarray, width: int) -> np.ndarray:
    """Byte addresses through a W-byte swizzle (bits 4.. XOR bits 7..)."""
    if width == 0:
        return addr
    bits = {32: 1, 64: 2, 128: 3}[width]
    mask = (1 << bits) - 1
    return addr ^ (((addr >> 7) & mask) << 4)


def _state(c: CTA) -> dict:
    if not c.sm90:
        c.sm90.update(mbar={}, waiters={}, bar={}, wg_pending={}, wg_groups={})
    return c.sm90


def _shared_addr(c: CTA, op) -> np.ndarray:
    return c._address(op).astype(np.int64)


def _one(values: np.ndarray, m: np.ndarray) -> list[int]:
    return sorted({int(v) for v in np.asarray(values)[m]})


# --- mbarrier ---------------------------------------------------------------------------------


def _complete_if_done(c: CTA, addr: int) -> None:
    st = _state(c)
    b = st["mbar"][addr]
    if b["pending"] == 0 and b["tx"] == 0:
        b["phase"] += 1
        b["pending"] = b["count"]
        waiting = st["waiters"].pop(addr, None)
        if waiting is not None:
            c.wake(waiting)
        else:
            c.smem.epoch += 1


def _mbar(c: CTA, addr: int, pc: int, ins: Instr) -> dict:
    b = _state(c)["mbar"].get(addr)
    if b is None:
        raise PtxError(f"mbarrier at shared {addr} used before mbarrier.init: {ins.line}")
    return b


@_h("mbarrier")
def _mbarrier(c: CTA, ins: Instr, m, pc, mask):
    st = _state(c)
    kind = ins.mods[0]
    if kind == "init":
        for a in _one(_shared_addr(c, ins.args[0]), m):
            n = int(c.read(ins.args[1], 32))
            st["mbar"][a] = {"count": n, "pending": n, "tx": 0, "phase": 0}
        return None
    if kind == "inval":
        for a in _one(_shared_addr(c, ins.args[0]), m):
            st["mbar"].pop(a, None)
        return None
    if kind == "arrive":
        addrs = _shared_addr(c, ins.args[1])
        for t in np.nonzero(m)[0]:
            b = _mbar(c, int(addrs[t]), pc, ins)
            if "expect_tx" in ins.mods:
                b["tx"] += int(np.broadcast_to(c.read(ins.args[2], 32), (c.T,))[t])
            b["pending"] -= 1
            if b["pending"] < 0:
                c.f.add("mbarrier-overflow", pc, ins.line, "more arrivals than the barrier's count")
            _complete_if_done(c, int(addrs[t]))
        return None
    if kind in ("try_wait", "test_wait"):
        if "parity" not in ins.mods:
            raise PtxError(f"{ins.op}: only the .parity form")
        dst, addr_op, parity_op = ins.args[:3]
        addrs = _shared_addr(c, addr_op)
        parity = np.broadcast_to(to_int(c.read(parity_op, 32), 32, False), (c.T,)) & 1
        ok = np.zeros(c.T, dtype=bool)
        for t in np.nonzero(m)[0]:
            b = _mbar(c, int(addrs[t]), pc, ins)
            ok[t] = (b["phase"] & 1) != parity[t]
        c.write(dst, ok, m)
        fail = m & ~ok
        if kind == "try_wait" and fail.any():
            for a in np.unique(addrs[fail]):
                w = st["waiters"].setdefault(int(a), np.zeros(c.T, dtype=bool))
                w |= fail & (addrs == a)
            c.block(fail)
            return "stay", fail
        return None
    raise PtxError(f"unsupported {ins.op}")


# --- TMA ------------------------------------------------------------------------------------------


_CP_ASYNC = HANDLERS["cp"]  # cp.async (tests/ptx_ops.py)


@_h("cp")
def _cp_bulk(c: CTA, ins: Instr, m, pc, mask):
    if "bulk" not in ins.mods:
        return _CP_ASYNC(c, ins, m, pc, mask)
    if "tensor" not in ins.mods or "global" not in ins.mods:
        raise PtxError(f"unsupported {ins.op}")
    dst_op, (_, map_op, coords), bar_op = ins.args[:3]
    dst = _shared_addr(c, dst_op)
    bars = _shared_addr(c, bar_op)
    handles = np.broadcast_to(c.read(map_op, 64), (c.T,)).astype(U64)
    cs = [np.broadcast_to(to_int(c.read(x, 32), 32, True), (c.T,)) for x in coords]
    for t in np.nonzero(m)[0]:
        tm = c.tmaps.get(int(handles[t]))
        if tm is None:
            raise PtxError(f"no tensor map with handle {int(handles[t]):#x}: {ins.line}")
        if len(cs) != len(tm.sizes):
            raise PtxError(f"{ins.op}: {len(cs)} coordinates for a {len(tm.sizes)}-d tensor map")
        idx = np.stack(np.meshgrid(*[np.arange(b) for b in reversed(tm.box)], indexing="ij"), -1).reshape(
            -1, len(tm.box)
        )[:, ::-1]  # box elements in row-major order, innermost coordinate first
        g = idx + np.array([int(x[t]) for x in cs])
        inside = np.all((g >= 0) & (g < np.array(tm.sizes)), axis=1)
        data = np.zeros((idx.shape[0], tm.elem_bytes), dtype=np.uint8)
        if inside.any():
            src = np.full(c.T, 0, dtype=U64)
            offs = (g[inside] * np.array(tm.strides)).sum(axis=1)
            for e, off in zip(np.nonzero(inside)[0], offs, strict=True):
                src[0] = U64(tm.address + int(off))
                one = np.zeros(c.T, dtype=bool)
                one[0] = True
                data[e] = c.load_bytes("global", src, tm.elem_bytes, one, pc)[0]
        base = int(dst[t])
        lin = base + np.arange(idx.shape[0] * tm.elem_bytes, dtype=np.int64)
        phys = swizzle(lin, tm.swizzle)
        sm_idx, ok = c._smem_bytes(phys, 1, pc, "cp.async.bulk.tensor")
        if not ok.all():
            continue
        c._check_write(sm_idx, np.full(sm_idx.shape[0], t), pc, None)
        c.smem.data[phys] = data.ravel()
        c.smem.init[phys] = True
        b = _mbar(c, int(bars[t]), pc, ins)
        b["tx"] -= data.size
        _complete_if_done(c, int(bars[t]))
    return None


# --- wgmma ------------------------------------------------------------------------------------------


def _warpgroups(c: CTA, m: np.ndarray, pc: int, ins: Instr) -> list[int]:
    warps = set(_whole_warps(c, m, pc, ins).tolist())
    groups = sorted({w // 4 for w in warps})
    for gi in groups:
        if not all(w in warps for w in range(4 * gi, 4 * gi + 4)):
            c.f.add("warpgroup-divergence", pc, ins.line, "a wgmma instruction reached by part of a warpgroup")
    return groups


def _decode(bits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "e4m3":
        return _E4M3[bits.astype(np.int64)]
    if kind == "bf16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    raise PtxError(f"wgmma input type {kind}")


def _read_b(c: CTA, desc: int, n: int, k: int, ebytes: int, pc: int) -> np.ndarray:
    """B [k, n] from a K-major matrix descriptor (bytes, little-endian elements)."""
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    mode = (desc >> 62) & 3
    width = {0: 0, 1: 128, 2: 64, 3: 32}[mode]
    nn = np.arange(n)[:, None]
    kb = (np.arange(k) * ebytes)[None, :]
    if width:
        addr = start + (nn // 8) * sbo + (nn % 8) * width + kb
    else:
        addr = start + (nn // 8) * sbo + (kb // 16) * lbo + (nn % 8) * 16 + kb % 16
    addr = swizzle(addr.astype(np.int64), width)
    full = (addr[..., None] + np.arange(ebytes)).reshape(-1)
    idx, ok = c._smem_bytes(full, 1, pc, "wgmma B")
    if not ok.all():
        raise PtxError("wgmma B operand outside shared memory")
    c._check_read(idx, np.zeros(idx.shape[0], dtype=np.int64), pc)
    raw = c.smem.data[full].reshape(n, k, ebytes).astype(np.uint32)
    val = np.zeros((n, k), dtype=np.uint32)
    for j in range(ebytes):
        val |= raw[..., j] << np.uint32(8 * j)
    return val.T  # [k, n]


def _frag_a(kbits: int, nregs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(thread in the warpgroup, register, element, row, col) tables of A's fragments."""
    per = 32 // kbits
    lt = np.arange(WARPGROUP)[:, None, None]
    reg = np.arange(nregs)[None, :, None]
    el = np.arange(per)[None, None, :]
    w, lane = lt // 32, lt % 32
    g, q = lane // 4, lane % 4
    row = 16 * w + g + 8 * (reg % 2)
    col = (8 if kbits == 16 else 16) * (reg // 2) + per * q + el
    return np.broadcast_arrays(lt, reg, el, row, col)


def _frag_d(nregs: int) -> tuple[np.ndarray, np.ndarray]:
    lt = np.arange(WARPGROUP)[:, None]
    i = np.arange(nregs)[None, :]
    w, lane = lt // 32, lt % 32
    g, q = lane // 4, lane % 4
    j, r = i // 4, i % 4
    return np.broadcast_arrays(16 * w + g + 8 * (r // 2), 8 * j + 2 * q + r % 2)


def _run_mma(c: CTA, mma: dict, pc: int) -> None:
    gi, shape, atype, dregs = mma["wg"], mma["shape"], mma["atype"], mma["dregs"]
    mm, nn, kk = shape
    threads = np.arange(gi * WARPGROUP, (gi + 1) * WARPGROUP)
    kbits = {"e4m3": 8, "e5m2": 8, "bf16": 16, "f16": 16}[atype]
    a = np.zeros((mm, kk))
    lt, reg, el, row, col = _frag_a(kbits, mma["a"].shape[1])
    bits = (mma["a"][lt, reg] >> (el * kbits).astype(np.uint32)) & np.uint32((1 << kbits) - 1)
    a[row, col] = _decode(bits, atype)
    b = _decode(_read_b(c, mma["desc"], nn, kk, kbits // 8, pc), atype)
    d = a @ b
    drow, dcol = _frag_d(len(dregs))
    if mma["scale_d"]:
        cur = np.stack([np.asarray(c.regs.get(r[1], np.zeros(c.T, dtype=U64)))[threads] for r in dregs], 1)
        acc = np.zeros((mm, nn))
        acc[drow, dcol] = cur.astype(np.uint32).view(np.float32).astype(np.float64)
        d = d + acc
    out = d.astype(np.float32)[drow, dcol].view(np.uint32).astype(U64)  # [128, nregs]
    sel = np.zeros(c.T, dtype=bool)
    sel[threads] = True
    for i, r in enumerate(dregs):
        full = np.zeros(c.T, dtype=U64)
        full[threads] = out[:, i]
        c.write(r, full, sel)


@_h("wgmma")
def _wgmma(c: CTA, ins: Instr, m, pc, mask):
    st = _state(c)
    groups = _warpgroups(c, m, pc, ins)
    kind = ins.mods[0]
    if kind == "fence":
        return None
    if kind == "commit_group":
        for gi in groups:
            st["wg_groups"].setdefault(gi, []).append(st["wg_pending"].pop(gi, []))
        return None
    if kind == "wait_group":
        keep = int(c.read(ins.args[0], 32))
        for gi in groups:
            q = st["wg_groups"].get(gi, [])
            while len(q) > keep:
                for mma in q.pop(0):
                    _run_mma(c, mma, pc)
        return None
    if kind != "mma_async":
        raise PtxError(f"unsupported {ins.op}")
    shape = next(x for x in ins.mods if x.startswith("m64"))
    mm, rest = shape[1:].split("n")
    nn, kk = rest.split("k")
    types = [x for x in ins.mods if x in ("f32", "e4m3", "e5m2", "bf16", "f16")]
    if types[0] != "f32" or types[1] != types[2]:
        raise PtxError(f"{ins.op}: only f32 accumulation with equal input types")
    d_op, a_op, b_op, sd_op = ins.args[:4]
    if a_op[0] != "vec":
        raise PtxError(f"{ins.op}: A from shared memory is not emulated (the kernel keeps A in registers)")
    if types[1] in ("bf16", "f16") and len(ins.args) > 6 and int(c.read(ins.args[6], 32)) != 0:
        raise PtxError(f"{ins.op}: transposed B is not emulated")
    if any(int(c.read(x, 32)) != 1 for x in ins.args[4:6]):
        raise PtxError(f"{ins.op}: negated inputs are not emulated")
    a = np.stack([np.broadcast_to(c.read(r, 32), (c.T,)).astype(U64) for r in a_op[1]], 1).astype(np.uint32)
    desc = np.broadcast_to(c.read(b_op, 64), (c.T,)).astype(U64)
    sd = c.pred(sd_op) if sd_op[0] in ("reg", "not") else np.full(c.T, bool(sd_op[1]))
    for gi in groups:
        th = slice(gi * WARPGROUP, (gi + 1) * WARPGROUP)
        if len(set(desc[th].tolist())) != 1 or len(set(sd[th].tolist())) != 1:
            raise PtxError(f"{ins.op}: descriptor or scale-d differs within a warpgroup")
        mma = {"wg": gi, "shape": (int(mm), int(nn), int(kk)), "atype": types[1], "a": a[th].copy()}
        mma.update(desc=int(desc[th][0]), scale_d=bool(sd[th][0]), dregs=d_op[1])
        st["wg_pending"].setdefault(gi, []).append(mma)
    return None


# --- barriers, branches, warp-level helpers ---------------------------------------------------------


@_h("bar", "barrier")
def _named_bar(c: CTA, ins: Instr, m, pc, mask):
    """Named barriers of a warp-specialized kernel (``bar.sync id, count``); other kernels keep
    the CTA-wide check of tests/ptx_ops.py."""
    if not c.k.branch_targets or "warp" in ins.mods:
        return _bar(c, ins, m, pc, mask)
    st = _state(c)
    bid = int(c.read(ins.args[0], 32)) if ins.args else 0
    count = int(c.read(ins.args[1], 32)) if len(ins.args) > 1 else c.T
    _whole_warps(c, m, pc, ins)
    arrived = st["bar"].setdefault(bid, np.zeros(c.T, dtype=bool))
    arrived |= m
    if int(arrived.sum()) >= count:
        if int(arrived.sum()) > count:
            c.f.add("barrier-overflow", pc, ins.line, f"{int(arrived.sum())} threads at barrier {bid} of {count}")
        c.wake(arrived.copy())
        st["bar"][bid] = np.zeros(c.T, dtype=bool)
    else:
        c.block(m)
    return None


@_h("brx")
def _brx(c: CTA, ins: Instr, m, pc, mask):
    idx = np.broadcast_to(to_int(c.read(ins.args[0], 32), 32, False), (c.T,)).astype(np.int64)
    targets = c.k.branch_targets[ins.args[1][1]]
    if (idx[m] >= len(targets)).any():
        raise PtxError(f"brx.idx index out of its {len(targets)} targets")
    pcs = np.full(c.T, -1, dtype=np.int64)
    pcs[m] = [c.k.labels[targets[i]] for i in idx[m]]
    return "multi", pcs


@_h("elect")
def _elect(c: CTA, ins: Instr, m, pc, mask):
    d = ins.args[0]
    leader = np.zeros(c.T, dtype=np.int64)
    for w in np.unique(c.warp[m]):
        lanes = np.nonzero(m & (c.warp == w))[0]
        leader[c.warp == w] = lanes[0] % WARP
    r, p = d[1].split("|")
    if r != "_":
        c.write(("reg", r), leader.astype(U64), m)
    c.write(("reg", p), c.lane == leader, m)
    return None


@_h("setmaxnreg")
def _setmaxnreg(c: CTA, ins: Instr, m, pc, mask):
    """No effect (registers are unbounded here). Not checked for warpgroup alignment: Triton's
    warp-specialize lowering has the warps of a partly used warpgroup run it at different PCs."""
    return None


@_h("stmatrix")
def _stmatrix(c: CTA, ins: Instr, m, pc, mask):
    num = int(next(x for x in ins.mods if x in ("x1", "x2", "x4"))[1])
    trans = "trans" in ins.mods
    addr = c._address(ins.args[0]).astype(np.int64)
    regs = ins.args[1][1]
    vals = [np.broadcast_to(c.read(r, 32), (c.T,)).astype(U64) for r in regs]
    for w in _whole_warps(c, m, pc, ins):
        base = w * WARP
        for lane in range(WARP):
            for j in range(num):
                for el in range(2):
                    mat, row, col = P.ldmatrix_frag(lane, j, el, trans)
                    a = int(addr[base + 8 * mat + row]) + 2 * col
                    v = (int(vals[j][base + lane]) >> (16 * el)) & 0xFFFF
                    idx, ok = c._smem_bytes(np.array([a]), 2, pc, "stmatrix")
                    if ok.all():
                        c._check_write(idx, np.array([base + lane]), pc, None)
                        c.smem.data[idx[0]] = [v & 0xFF, v >> 8]
                        c.smem.init[idx[0]] = True
    return None


@_h("shf")
def _shf(c: CTA, ins: Instr, m, pc, mask):
    if ins.mods[-1] != "b32" or ins.mods[0] not in ("l", "r") or ins.mods[1] not in ("clamp", "wrap"):
        raise PtxError(f"unsupported {ins.op}")
    a, b, n = (np.broadcast_to(c.read(x, 32), (c.T,)).astype(U64) & U64(0xFFFFFFFF) for x in ins.args[1:4])
    n = n & U64(31) if ins.mods[1] == "wrap" else np.minimum(n, U64(32))
    both = (b << U64(32)) | a  # the 64-bit b:a
    # .l with n <= 32: the left shift's upper half, (b:a << n) >> 32, taken without overflowing 64 bits
    out = (both >> n if ins.mods[0] == "r" else both >> (U64(32) - n)) & U64(0xFFFFFFFF)
    c.write(ins.args[0], out, m)
    return None
