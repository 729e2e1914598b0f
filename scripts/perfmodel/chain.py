"""A loop's dependency chain, simulated from its SASS (Hopper latencies): one warp's instructions
in order, each issued at one per clock once its source registers are ready (fixed latencies
below), an MMA completing after the tensor cores finish the MMAs queued before it (its MACs at
the SM's rate plus a pipeline latency), ``WARPGROUP.DEPBAR`` waiting for those completions,
``DEPBAR.LE SB0, n`` waiting for the cp.async group committed n groups back to arrive (memory
latency), ``BAR.SYNC`` and fences costing their latency. The model on top: perfmodel.hopper."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Latencies in clocks (Hopper; dependent-issue latencies as public microbenchmarks report them,
# rounded): fixed-latency ALU 4, shared memory 33, a global load served by L2 260, a cp.async
# group from issue to arrival MEM_LAT (a DRAM/L2 mix), barrier 20, memory fence 20, MMA
# pipeline latency on top of its tensor time WGMMA_LAT.
ALU_LAT = 4
LDS_LAT = 33
LDG_LAT = 260
MEM_LAT = 600
BAR_LAT = 20
FENCE_LAT = 20
WGMMA_LAT = 32
MACS_PER_CLK = {"fp8": 4096, "int8": 4096, "bf16": 2048, "f16": 2048, "tf32": 1024}


# --- reading the SASS into instructions with operands ------------------------------------------


@dataclass
class Instr:
    op: str
    dests: list[str]
    srcs: list[str]
    text: str


_REG = re.compile(r"\b(U?R\d+|U?P\d)\b")
_NO_DEST = (
    "ST",
    "LDGSTS",
    "BAR",
    "BRA",
    "WARPGROUP",
    "DEPBAR",
    "LDGDEPBAR",
    "MEMBAR",
    "FENCE",
    "RED",
    "EXIT",
)


def _width(op: str) -> int:
    """Registers a load writes (vector width)."""
    if op.startswith("LDSM"):
        return int(op.rsplit(".", 1)[1])
    for suffix, n in ((".128", 4), (".64", 2)):
        if suffix in op:
            return n
    return 2 if op.startswith("IMAD.WIDE") else 1


def _expand(reg: str, n: int) -> list[str]:
    m = re.fullmatch(r"(U?R)(\d+)", reg)
    return [f"{m.group(1)}{int(m.group(2)) + i}" for i in range(n)] if m else [reg]


def parse(text: str) -> Instr:
    """One SASS instruction -> opcode, registers written, registers read."""
    body = re.sub(r"^@!?U?P\w+\s+", "", text)
    pred = re.match(r"^@!?(U?P\w+)\s+", text)
    op, _, rest = body.partition(" ")
    args = [a.strip() for a in rest.split(",")] if rest else []
    dests, srcs = [], [pred.group(1)] if pred else []
    gmma = re.match(r"[QHI]GMMA\.(\d+)x(\d+)x(\d+)", op)
    if gmma:
        acc_regs = int(gmma.group(1)) * int(gmma.group(2)) // 128  # fp32/int32 accumulators per thread
        dests = _expand(args[0].removesuffix(".reuse"), acc_regs)
        if re.fullmatch(r"R\d+", args[1]):
            srcs += _expand(args[1], 4)  # A from registers: 16 bytes per thread
        return Instr(op, dests, srcs, text)
    if args and not op.startswith(_NO_DEST) and _REG.fullmatch(args[0].removesuffix(".reuse")):
        first = args[0].removesuffix(".reuse")
        dests = _expand(first, _width(op)) if op.startswith(("LD", "IMAD.WIDE")) else [first]
        if op.startswith(("ISETP", "FSETP", "UISETP", "PLOP3")) and len(args) > 1 and _REG.fullmatch(args[1]):
            dests.append(args[1])
            args = args[1:]
        args = args[1:]
    for a in args:
        srcs += [r for r in _REG.findall(a) if r not in ("PT", "UPT")]
    return Instr(op, [d for d in dests if d not in ("RZ", "URZ", "PT", "UPT")], srcs, text)


def _latency(op: str) -> int:
    if op.startswith(("LDS", "LDSM", "SYNCS.PHASECHK")):  # an mbarrier try-wait reads shared memory
        return LDS_LAT
    if op.startswith("LDG") and not op.startswith("LDGSTS"):
        return LDG_LAT
    if op.startswith(("MUFU", "I2F", "F2I")):
        return 16
    return ALU_LAT


def _mma_clocks(op: str) -> float:
    m = re.match(r"([QHI])GMMA\.(\d+)x(\d+)x(\d+)\.\w+\.(\w+)", op)
    kind = {"Q": "fp8", "I": "int8"}.get(m.group(1)) or ("tf32" if "TF32" in op else "bf16")
    return math.prod(int(x) for x in m.groups()[1:4]) / MACS_PER_CLK[kind]


def simulate(body: list[str], iterations: int = 3) -> dict:
    """One warp through ``iterations`` passes of a loop body: the last pass's length in clocks
    (the critical path per iteration), and where the clocks went."""
    code = [parse(t) for t in body]
    ready: dict[str, float] = {}
    t = 0.0
    tensor_free = 0.0  # when the tensor cores finish the MMAs queued so far
    mma_done: list[float] = []  # completion of each committed MMA group (gsb0)
    pending_mma = 0.0
    groups: list[float] = []  # commit time of each cp.async group
    starts = []
    stall = {"mma_wait": 0.0, "cp_async_wait": 0.0, "barrier": 0.0, "operands": 0.0}
    for _ in range(iterations):
        starts.append(t)
        stall = dict.fromkeys(stall, 0.0)
        for ins in code:
            t0 = t
            t = max([t] + [ready.get(r, 0.0) for r in ins.srcs])
            stall["operands"] += t - t0
            op = ins.op
            if re.match(r"[QHI]GMMA", op):
                start = max(t, tensor_free)
                tensor_free = start + _mma_clocks(op)
                pending_mma = max(pending_mma, tensor_free + WGMMA_LAT)
                if "gsb0" in ins.text:
                    mma_done.append(pending_mma)
                for d in ins.dests:
                    ready[d] = pending_mma
            elif op.startswith("WARPGROUP.DEPBAR"):
                keep = int(ins.text.rsplit(",", 1)[1].strip(), 16)
                if len(mma_done) > keep:
                    t1 = max(t, mma_done[len(mma_done) - keep - 1])
                    stall["mma_wait"] += t1 - t
                    t = t1
            elif op == "LDGDEPBAR":
                groups.append(t)
            elif op.startswith("DEPBAR.LE"):
                keep = int(ins.text.rsplit(",", 1)[1].strip(), 16)
                if len(groups) > keep:
                    t1 = max(t, groups[len(groups) - keep - 1] + MEM_LAT)
                    stall["cp_async_wait"] += t1 - t
                    t = t1
            elif op.startswith("BAR.SYNC"):
                stall["barrier"] += BAR_LAT
                t += BAR_LAT
            elif op.startswith(("MEMBAR", "FENCE")):
                stall["barrier"] += FENCE_LAT
                t += FENCE_LAT
            else:
                lat = _latency(op)
                for d in ins.dests:
                    ready[d] = t + lat
            t += 1  # one issue slot
    return {"clocks": t - starts[-1], "instructions": len(code), "stalls": stall}


def main_loop(loops: list[list[str]], mma_prefix: str) -> list[str]:
    """The longest loop that holds an MMA of the given kind (QGMMA, HGMMA)."""
    return max((b for b in loops if any(re.search(rf"\b{mma_prefix}", t) for t in b)), key=len)


def loop_mma_clocks(body: list[str], warps: int) -> float:
    """Tensor clocks of one iteration for the whole CTA (each warpgroup issues its own)."""
    return sum(_mma_clocks(parse(t).op) for t in body if re.search(r"\b[QHI]GMMA", t)) * (warps // 4)


def ctas_per_sm(regs: int, smem: int, warps: int) -> int:
    threads = 32 * warps
    return max(
        1, min(65536 // (math.ceil(regs / 8) * 8 * threads), 2048 // threads, 228 * 1024 // max(smem, 1))
    )


def loop_time(sim: dict, warps: int, tensor_clk: float, c: int, nbytes: float, l2: float) -> float:
    """Clocks per iteration of all c resident CTAs: chain, issue slots, tensor cores or the L2
    (``nbytes`` per CTA and iteration at ``l2`` bytes per clock per SM)."""
    per_scheduler = sim["instructions"] * max(1, warps // 4) * c
    return max(sim["clocks"], per_scheduler, c * tensor_clk, c * nbytes / l2)
