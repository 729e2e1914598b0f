"""One loop analyser: the instruction mix of a kernel's main loop, from either SASS form of
``sass`` (the CUDA model's classes per loop; the Triton models' opcode counts, loads, MMAs and
accumulator resets), and the Triton kernels' compiled analysis, cached per specialization."""

from __future__ import annotations

import re
from collections import Counter

from perfmodel.sass import Instr, disassemble, load_bytes, ptx_checks, specialize, triton_kernel

CLASSES = {
    "int4 MMA": ("IMMA",),
    "bf16 MMA": ("HMMA",),
    "int->float conversion": ("I2F", "I2FP"),
    "fp32 add/mul/fma": ("FADD", "FMUL", "FFMA"),
    "ldmatrix": ("LDSM",),
    "shared load": ("LDS",),
    "cp.async": ("LDGSTS", "LDGDEPBAR", "DEPBAR"),
    "global load": ("LDG",),
    "global store": ("STG",),
    "local (spill)": ("LDL", "STL"),
    "barrier": ("BAR",),
}


def classify(body: list[Instr]) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    counts["other"] = 0
    for ins in body:
        op = ins.opcode.split(".")[0]
        for cls, prefixes in CLASSES.items():
            if op in prefixes:
                counts[cls] += 1
                break
        else:
            counts["other"] += 1
    counts["total"] = len(body)
    return counts


def ldsm_bytes(ins: Instr) -> int:
    m = re.search(r"M88\.(\d)", ins.opcode)  # LDSM.16.M88.4: four 8x8 b16 matrices of 128 B each
    return 128 * (int(m[1]) if m else 1)


def lds_bytes(ins: Instr) -> int:
    m = re.search(r"\.(32|64|128)\b", ins.opcode)
    return 32 * (int(m[1]) // 8 if m else 4)


def opcode_counts(body: list[str]) -> Counter:
    """Opcodes (predicates stripped) of a list of SASS instructions."""
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)


def analyse(cubin: bytes) -> dict:
    """Registers, spills and the main loop's instruction mix of one kernel."""
    usage, instrs, loops = disassemble(cubin)
    reg = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    # The main loop: the longest loop with an int8 MMA (the GEMM's groups; its low-rank loop runs
    # HMMA), else with any MMA (quantize_act's down-projection), else the longest loop.
    imma = [body for body in loops if any(re.search(r"\b(IGMMA|IMMA)", t) for t in body)]
    mma = [body for body in loops if any(re.search(r"\b(IGMMA|IMMA|HMMA)", t) for t in body)]
    main = max(imma or mma or loops, key=len) if loops else []
    ops = opcode_counts(main)
    # Accumulator resets to the magic bits: moves of the literal, and moves from a register that
    # holds it (ptxas may copy the literal once and move the copy).
    magic, resets = set(), 0
    for t in main:
        op, _, rest = re.sub(r"^@!?U?P\w+\s+", "", t).partition(" ")
        args = [a.strip().removesuffix(".reuse") for a in rest.split(",")]
        dest = args[0] if re.fullmatch(r"R\d+", args[0]) else None
        if "0x4b400000" in t or (op in ("MOV", "IMAD.MOV.U32") and args[-1] in magic):
            resets += 1
            magic.add(dest)
        elif dest:
            magic.discard(dest)
    loads = {op: c for op, c in ops.items() if re.match(r"(LDG|LDGSTS)(\.|$)", op)}
    return {
        "regs": int(reg.group(1)),
        "stack_bytes": int(reg.group(2)),
        "spill_instrs": sum(1 for t in instrs if re.search(r"\b(STL|LDL)\b", t)),
        "loop_sass": len(main),
        "loop_ops": dict(ops.most_common()),
        "loop_i2f": sum(c for op, c in ops.items() if op.startswith("I2F")),
        "loop_mma": sum(c for op, c in ops.items() if re.match(r"(IGMMA|IMMA)", op)),
        "loop_load_bytes": sum(load_bytes(op) * c for op, c in loads.items()),
        "loop_narrowest_load": min((load_bytes(op) for op in loads), default=0),
        "acc_init": resets,
        "loop_mma_acc_off": sum(1 for t in main if re.search(r"\bIGMMA\b.*, RZ, !UPT", t)),
        "loop_ftz": sum(1 for t in main if re.search(r"\bF(FMA|MUL|ADD)\S*\.FTZ", t)),
    }


_COMPILED: dict[str, dict] = {}


def compile_sass(fn, args: tuple, kwargs: dict, cc: int) -> dict:
    """Compile for sm_<cc>; return the SASS analysis (cached per specialization)."""
    sig, const, attrs, options = specialize(fn, args, kwargs)
    key = repr((fn.__name__, cc, sorted(sig.items()), sorted(const.items()), sorted(attrs), options))
    if key not in _COMPILED:
        kernel = triton_kernel(fn, args, kwargs, cc)
        info = analyse(kernel.asm["cubin"]) | ptx_checks(kernel.asm["ptx"])
        info.update(shared_bytes=kernel.metadata.shared, **options)
        _COMPILED[key] = info
    return _COMPILED[key]
