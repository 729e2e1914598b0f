"""The W4A8 quantizer's model (engine/kernels/triton/act_fp8.py; every figure MODELLED, not
measured): its sm_90 SASS per 64-channel group, counted per loop (the statistics pass of the
modulation prologue, pass 1: amax and the low-rank product, pass 2: the codes), and its time on
an H100 by perfmodel.triton_model's model of quantize_act (issue clocks of the busiest SM against
DRAM bytes over the bandwidth that the x tiles in flight allow, 800 ns loaded latency).

The DRAM bytes: x read once, the e4m3 codes written (1 byte per element, twice quantize_act's
int4), ascale and lora_act; and x read again by pass 2 where it has left L2. Whether it has: in
the window between a row's two reads every program in flight reads its own 16 rows x K x 2 B
once, so the resident set is programs in flight x that (at M = 4352 all 272 programs run at
once: all of x); below the L2 size (H100: 50 MB, of which ~40 MB is taken as usable here) pass 2
reads L2. Above it, pass 2 walking K backwards re-reads the rows' ends first: under LRU the last
~40 MB read are L2 hits, the rest DRAM. ``reread`` says which the model assumed (an assumption
about an L2 whose replacement policy NVIDIA does not document; "l2" and "dram" bound it).

    PYTHONPATH=.:scripts python scripts/perfmodel/act_fp8.py [--json PATH]   (no TRITON_INTERPRET)

``compile_act_fp8(k, prologue)`` is the compile-and-count entry point for other models.
"""

from __future__ import annotations

import json
import math
import re

import torch
import triton

from engine.kernels.triton import act_fp8 as AF
from perfmodel.devices import H100, Device
from perfmodel.launches import _meta
from perfmodel.loops import opcode_counts
from perfmodel.sass import disassemble, ptx_checks, specialize, triton_kernel
from perfmodel.shapes import FLUX_M, RANK
from perfmodel.triton_model import DRAM_LATENCY_NS, _ctas_per_sm

L2_USABLE_BYTES = 40e6  # of an H100's 50 MB L2: what pass 2's re-read may count on
MODEL_KS = (3072, 12288, 15360)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def act_fp8_launch(
    m: int, k: int, major: int = 9, rank: int = RANK, prologue: str = "", config=None
) -> tuple:
    """(grid, args, kwargs) of the launcher's own launch on meta tensors (bf16 x, shift 0), as a
    GPU of compute capability ``major`` gets it; ``prologue``: "", "modulation" or "gelu"."""
    rec, saved = _Recorder(), (AF.quantize_act_fp8_kernel, AF._major, AF.INTERPRET)
    AF.quantize_act_fp8_kernel, AF._major, AF.INTERPRET = rec, (lambda device: major), False
    try:
        mod = (_meta(1, k), _meta(1, k)) if prologue == "modulation" else (None, None)
        AF.quantize_act_fp8(
            _meta(m, k), _meta(k), _meta(rank, k), *mod, shift=0.0, gelu=prologue == "gelu", config=config
        )
    finally:
        AF.quantize_act_fp8_kernel, AF._major, AF.INTERPRET = saved
    (launch,) = rec.calls
    return launch


_COMPILED: dict[tuple, dict] = {}


def compile_act_fp8(
    k: int = 3072, prologue: str = "", cc: int = 90, m: int = FLUX_M, rank: int = RANK, config=None
) -> dict:
    """Compile the kernel as the launcher runs it on sm_<cc> (bf16 x, a bf16 proj_down of ``rank``)
    and count its SASS: ``loops`` {kind: SASS per 64-channel group} for "stats" (modulation
    only), "pass1", "pass2"; ``group_sass`` their sum (one group's issue work over all passes);
    ``regs``, ``spill_instrs``, ``shared_bytes``, ``loop_ops`` (opcodes per loop) and ``ptx``.
    The loops step 64 to 256 channels (the config's block_k1 / block_k2): counts are per 64."""
    key = (k, prologue, cc, m, rank, config)
    if key in _COMPILED:
        return _COMPILED[key]
    _, args, kwargs = act_fp8_launch(m, k, cc // 10, rank, prologue, config)
    kernel = triton_kernel(AF.quantize_act_fp8_kernel, args, kwargs, cc)
    usage, instrs, loops = disassemble(kernel.asm["cubin"])
    widths = {"stats": kwargs["BLOCK_K1"], "pass1": kwargs["BLOCK_K1"], "fixup": kwargs["BLOCK_K2"],
              "pass2": kwargs["BLOCK_K2"]}  # fmt: skip
    counts, ops = {}, {}
    seen_pass1 = False
    for body in loops:  # in program order: statistics, pass 1, the NaN fix-up, pass 2
        if len(body) <= 2:  # the trap after the exit (a branch to itself)
            continue
        if any(re.search(r"\b(HMMA|IMMA|HGMMA)", t) for t in body):
            kind, seen_pass1 = "pass1", True
        elif any(re.search(r"\bSTG", t) for t in body):
            kind = "pass2"  # the only loop that stores (the codes)
        else:
            kind = "fixup" if seen_pass1 else "stats"  # fixup: runs only for a row with NaN amax
        if kind in counts:
            raise RuntimeError(f"two {kind} loops in the SASS of act_fp8 (k={k}, {prologue or 'plain'})")
        counts[kind] = len(body) / (widths[kind] // 64)
        ops[kind] = dict(opcode_counts(body).most_common())
    reg = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    *_, options = specialize(AF.quantize_act_fp8_kernel, args, kwargs)
    info = {
        "k": k,
        "prologue": prologue or "none",
        "cc": cc,
        "regs": int(reg.group(1)),
        "stack_bytes": int(reg.group(2)),
        "spill_instrs": sum(1 for t in instrs if re.search(r"\b(STL|LDL)\b", t)),
        "shared_bytes": kernel.metadata.shared,
        "loops": counts,
        "group_sass": sum(v for kind, v in counts.items() if kind != "fixup"),
        "loop_ops": ops,
        "e4m3_cvt": sum(
            c for op, c in ops.get("pass2", {}).items() if op.startswith("F2FP") and "E4M3" in op
        ),
        "ptx": kernel.asm["ptx"],
        **ptx_checks(kernel.asm["ptx"]),
        "ptx_e4m3_cvt": len(re.findall(r"\bcvt\.rn\.satfinite\.e4m3x2\.f32\b", kernel.asm["ptx"])),
        "num_warps": options.get("num_warps"),
        "block_k1": kwargs["BLOCK_K1"],
        "block_k2": kwargs["BLOCK_K2"],
        "stages2": kwargs["STAGES2"],
    }
    _COMPILED[key] = info
    return info


def model_act_fp8(m: int, k: int, dev: Device, info: dict, cfg, reread: str = "auto") -> dict:
    """Modelled time of the kernel: triton_model.model_act's issue and bandwidth terms, with the
    SASS of every pass per group and this kernel's bytes. ``reread``: "l2" (pass 2 reads x from
    L2), "dram" (from DRAM), or "auto": L2 where the programs in flight hold less than
    L2_USABLE_BYTES of x, else the share of x beyond that from DRAM (pass 2 walks K backwards,
    so the rows' ends are re-read first, an LRU's last-in data)."""
    c = _ctas_per_sm({"regs": info["regs"], "shared_bytes": info["shared_bytes"]}, cfg.num_warps, dev)
    programs = triton.cdiv(m, cfg.block_m)
    groups = k // 64
    per_sm = math.ceil(programs / dev.sms)  # programs on the busiest SM
    clk = dev.clock_ghz * 1e9
    issue = per_sm * groups * info["group_sass"] * cfg.num_warps / 4 / clk
    in_flight_programs = min(programs, dev.sms * c)
    resident = in_flight_programs * cfg.block_m * k * 2  # x bytes held between a row's two reads
    fits = resident <= L2_USABLE_BYTES
    if reread == "auto":
        # pass 2 walks K backwards: under LRU the last L2_USABLE_BYTES of the resident set (the
        # ends of the rows) are still in L2 when it re-reads them, the rest comes from DRAM
        miss = 0.0 if fits else 1.0 - L2_USABLE_BYTES / resident
        reread = "l2" if fits else f"dram {miss:.0%}"
    else:
        miss = {"l2": 0.0, "dram": 1.0}[reread]
    # the modulation's statistics pass and pass 1 both walk forwards: pass 1 re-reads from DRAM
    # whenever the resident set is larger than L2 (LRU, cyclic order)
    x_reads = 1 + miss + (info["prologue"] == "modulation" and not fits)
    nbytes = x_reads * m * k * 2 + m * k + m * 4 + m * RANK * 4  # x, codes, ascale, lora_act
    # x tiles in flight: the smaller of the two passes' (pipeline depth x tile)
    tile = min(cfg.num_stages * info["block_k1"], info["stages2"] * info["block_k2"])
    in_flight = in_flight_programs * tile * cfg.block_m * 2
    bw = min(dev.dram_gbs * 1e9, in_flight / (DRAM_LATENCY_NS * 1e-9))
    floor1 = (m * k * 2 + m * k + m * 4 + m * RANK * 4) / (dev.dram_gbs * 1e9)
    return {
        "m": m,
        "k": k,
        "prologue": info["prologue"],
        "ctas_per_sm": c,
        "group_sass": info["group_sass"],
        "loops": info["loops"],
        "resident_mb": resident / 1e6,
        "reread": reread,
        "dram_mb": nbytes / 1e6,
        "us_issue": issue * 1e6,
        "us_dram": nbytes / bw * 1e6,
        "us_dram_floor_one_read": floor1 * 1e6,
        "us": max(issue, nbytes / bw) * 1e6,
    }


def table(dev: Device = H100, m: int = FLUX_M) -> list[dict]:
    """The model at M = ``m`` on the FLUX widths, for each prologue, pass 2 re-reading x from L2
    and from DRAM (and the "auto" choice)."""
    rows = []
    cfg = AF.ACT_FP8_CONFIGS[9]
    for prologue in ("", "modulation", "gelu"):
        for k in MODEL_KS:
            info = compile_act_fp8(k, prologue)
            row = model_act_fp8(m, k, dev, info, cfg)
            row["us_reread_l2"] = model_act_fp8(m, k, dev, info, cfg, "l2")["us"]
            row["us_reread_dram"] = model_act_fp8(m, k, dev, info, cfg, "dram")["us"]
            row["regs"], row["spill_instrs"] = info["regs"], info["spill_instrs"]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the table (or write it and the compiled counts, without PTX, to ``--json PATH``)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write {table, static} here instead of printing the table")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = table()
    if not args.json:
        print(json.dumps(rows, indent=1))
        return 0
    static = [
        {k: v for k, v in compile_act_fp8(k, p).items() if k != "ptx"}
        for p in ("", "modulation", "gelu")
        for k in MODEL_KS[:1]
    ]
    # quantize_act's (the W4A4 route's) loop at the same shape, for comparison
    import engine.kernels.triton_backend as tb
    from perfmodel.launches import act_launch
    from perfmodel.loops import compile_sass

    w4a4 = {p or "none": compile_sass(tb.quantize_act_kernel, *act_launch(FLUX_M, MODEL_KS[0], 9, prologue=p)[1:], 90)["loop_sass"]
            for p in ("", "modulation", "gelu")}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({"table": rows, "static": static, "quantize_act_loop_sass": w4a4}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
