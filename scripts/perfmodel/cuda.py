"""Static performance model of the CUDA int4 kernels on an A40, from the compiled code (no GPU needed).

Why: until a GPU of compute capability 8.x measures the kernels, their speed has evidence only from what
the compiler produced. This script compiles engine/kernels/cuda/csrc/*.cu (one file per kernel family) for sm_86 (nvcc), reads
ptxas' resource report, disassembles the cubin (cuobjdump from the triton package), finds each kernel's
main loop (the backward branch around the MMAs), counts its instructions per iteration, and combines those
counts with the tile parameters read from the sources and the A40's published peaks into a modelled time
per FLUX shape. Every figure it prints is *modelled*, not measured.

Model (per SM: 4 schedulers issuing one warp instruction per clock; int4 MMA at 2048 MAC/clock; shared
memory 128 B/clock; all SMs share 696 GB/s of DRAM):
  w4a4_gemm   one main-loop iteration (one 64-channel group) of a CTA costs
              max(tensor = MMAs * 8192 MAC / 2048, issue = instructions * warps / 4, smem bytes / 128) clocks;
              a tile costs groups * that + its non-loop instructions (prologue, low-rank branch, bias,
              epilogue, stores: issue-bound at warps * instructions / 4 clocks, not overlapped with the
              tensor pipe, every compiled path counted, once per tile; the low-rank pass loop once per
              kLrChunk ranks: once at rank 32); the instances priced are those a FLUX call launches
              (bf16 output; s4/u4 plain, +epilogue with the partial/gate/residual epilogue), each on the
              CTA tile the host takes by M (192x128 with 12 warps, or 128x128 with 8 for M <= kSmallMaxM:
              its own instances, counted alike);
              tiles run in waves of 84 * CTAs-per-SM; DRAM bytes follow the grouped CTA order (a wave reads
              kGroupTilesM A tile rows and the W tiles of its columns, once each); time = max(compute, DRAM).
  quantize_act issue time of its group loop on the busiest SM (CTAs of 32 rows spread over 84 SMs) vs. DRAM
              time of x in, codes, scales and the low-rank product out.
  cuBLAS bf16 at 70% of its 149.7 TFLOPS peak (or its DRAM time, whichever is larger) is the baseline.

Usage: python scripts/kernel_model.py [--arch 86] [--markdown docs/benchmarks.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from perfmodel.devices import A40
from perfmodel.loops import classify, lds_bytes, ldsm_bytes
from perfmodel.sass import TILE_SOURCES, cuobjdump_sass, find_kernel, main_loop, nvcc_cubin
from perfmodel.shapes import FLUX_M, FLUX_SHAPES, RANK, TEXT_M, TEXT_SHAPES
from perfmodel.tables import table_head, write_markdown

CUBLAS_FRACTION = 0.70
TARGET_INT4_FRACTION = 0.50
TARGET_SPEEDUP = 2.5
MARK_BEGIN = "<!-- kernel_model.py: begin (generated, do not edit by hand) -->"
MARK_END = "<!-- kernel_model.py: end -->"
HEADING = "## CUDA kernels v2: modelled"


def tile_params(sources: tuple[Path, ...] = TILE_SOURCES) -> dict[str, int]:
    """The `constexpr int kName = <literal>;` constants of the kernel sources."""
    text = "\n".join(source.read_text() for source in sources)
    return {m[1]: int(m[2]) for m in re.finditer(r"constexpr int (k\w+) = (\d+);", text)}


@dataclass
class GemmLoop:
    counts: dict[str, int]
    smem_read_bytes_per_warp: int
    other_instructions: int  # outside the main loop, per warp (upper bound: every path counted)
    low_rank_pass_instructions: int = 0  # the loop over passes of kLrChunk ranks (part of other_instructions)


def trailing_padding(code: list) -> int:
    """Instructions after a kernel's last EXIT that never run: the branch-to-self and NOP alignment
    padding the compiler appends (not counted as non-loop code)."""
    n = 0
    for ins in reversed(code):
        if ins.opcode == "NOP" or (ins.opcode == "BRA" and ins.operands == f"{ins.addr:#x}"):
            n += 1
        else:
            break
    return n


# w4a4_gemm's instances (w4a4_gemm_kernel<kUnsigned, TOut, kExtras, kTileM>) by their mangled template arguments
GEMM_OUT_DTYPES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


def tile_config(p: dict[str, int], small: bool) -> dict[str, int]:
    """The tile parameters of one of w4a4_gemm's two CTA tiles (Tile<kTileM> in w4a4_gemm.cu): the large one
    is the sources' kBM/kWarpsM, the small one (M <= kSmallMaxM) kSmallBM/kSmallWarpsM, the rest shared."""
    if not small:
        return dict(p)
    return {**p, "kBM": p["kSmallBM"], "kWarpsM": p["kSmallWarpsM"]}


def tile_label(p: dict[str, int], small: bool) -> str:
    """Suffix of the small tile's instances in ``StaticReport.gemm`` and ``gemm_other_by_instance``."""
    return f"@{p['kSmallBM']}" if small else ""


def uses_small_tile(p: dict[str, int], m: int) -> bool:
    """The host's choice (svdq::w4a4_gemm): the small tile for M <= kSmallMaxM."""
    return m <= p["kSmallMaxM"]


@dataclass
class QuantLoop:
    counts: dict[str, int]
    global_loads: list[str]  # opcodes of the loop's LDG instructions


@dataclass
class StaticReport:
    arch: str
    params: dict[str, int]
    resources: dict[str, dict]
    gemm: dict[str, GemmLoop] = field(default_factory=dict)
    quant: QuantLoop | None = None
    gemm_hmma_total: int = 0
    # SASS outside the main loop of every w4a4_gemm instance, per warp: "s4 bf16", "u4+epilogue fp32", ...
    # (the small tile's: "s4@128 bf16", ...)
    gemm_other_by_instance: dict[str, int] = field(default_factory=dict)


def analyse(arch: str = "86", work: Path | None = None) -> StaticReport:
    """Compile, disassemble and count: everything the gates and the model need."""
    with tempfile.TemporaryDirectory() as tmp:
        cubins, res, _ = nvcc_cubin(arch, work or Path(tmp))
        funcs = {name: code for cubin in cubins for name, code in cuobjdump_sass(cubin).items()}
    report = StaticReport(arch, tile_params(), {k: asdict(v) for k, v in res.items()})
    # One instance per activation code (s4, u4), output dtype and epilogue. The model prices those a FLUX call
    # launches: bf16 output (the model's dtype), without (s4, u4) or with (+epilogue) the partial/gate/residual
    # epilogue; every instance's non-loop count is kept for the static gate.
    # Each of them for both CTA tiles ("@128": the small one).
    for small, unsigned, extras in itertools.product((False, True), repeat=3):
        bm = tile_config(report.params, small)["kBM"]
        for mangled, dtype in GEMM_OUT_DTYPES.items():
            _, code = find_kernel(
                funcs, "w4a4_gemm_kernel", f"ILb{int(unsigned)}E{mangled}Lb{int(extras)}ELi{bm}EE"
            )
            body = main_loop(code, "IMMA")
            name = (
                ("u4" if unsigned else "s4")
                + ("+epilogue" if extras else "")
                + tile_label(report.params, small)
            )
            other = len(code) - len(body) - trailing_padding(code)
            report.gemm_other_by_instance[f"{name} {dtype}"] = other
            if dtype != "bf16":
                continue
            smem = sum(ldsm_bytes(i) for i in body if i.opcode.startswith("LDSM"))
            smem += sum(lds_bytes(i) for i in body if i.opcode.split(".")[0] == "LDS")
            lr_pass = main_loop(code, "HMMA")  # the epilogue's loop over passes of kLrChunk ranks
            report.gemm[name] = GemmLoop(classify(body), smem, other, len(lr_pass))
            if not extras and not small:
                report.gemm_hmma_total = sum(i.opcode.startswith("HMMA") for i in code)
    _, qcode = find_kernel(funcs, "quantize_act_kernel", "nv_bfloat16Li4E")
    qloop = main_loop(qcode, "HMMA")
    report.quant = QuantLoop(classify(qloop), [i.opcode for i in qloop if i.opcode.startswith("LDG")])
    return report


# --- the model -------------------------------------------------------------------------------------------


def gemm_smem_bytes(p: dict[str, int]) -> int:
    """Dynamic shared memory of w4a4_gemm (w4a4_gemm.cu's kStageBytes x kStages): per stage the A and B
    codes, then one 8-byte (sa22, -magic sa22) slot and one 4-byte wscales slot per thread."""
    threads = 32 * p["kWarpsM"] * p["kWarpsN"]
    return p["kStages"] * ((p["kBM"] + p["kBN"]) * 32 + threads * 12)


def gemm_registers(report: StaticReport, small: bool = False) -> int:
    """The most registers of one tile's w4a4_gemm instances (ptxas)."""
    bm = tile_config(report.params, small)["kBM"]
    return max(r["registers"] for n, r in report.resources.items() if "w4a4_gemm" in n and f"ELi{bm}EE" in n)


def gemm_ctas_per_sm(report: StaticReport, hw: dict = A40, small: bool = False) -> int:
    p = tile_config(report.params, small)
    threads = 32 * p["kWarpsM"] * p["kWarpsN"]
    regs = gemm_registers(report, small)
    smem = gemm_smem_bytes(p)
    by_regs = hw["regs_per_sm"] // (math.ceil(regs / 8) * 8 * threads)
    return max(0, min(by_regs, hw["smem_per_sm"] // smem, hw["max_threads_per_sm"] // threads))


def model_gemm(
    report: StaticReport, m: int, k: int, n: int, hw: dict = A40, variant: str = "s4", tile: str = "auto"
) -> dict:
    """``variant``: a GemmLoop of ``report.gemm`` (``s4+epilogue``: the instance with the partial/gate/
    residual epilogue, whose extra reads the image model adds). ``tile``: "auto" (the host's choice by M),
    "large" or "small"."""
    if tile not in ("auto", "large", "small"):
        raise ValueError(f"tile must be 'auto', 'large' or 'small', got {tile!r}")
    small = uses_small_tile(report.params, m) if tile == "auto" else tile == "small"
    p, loop = tile_config(report.params, small), report.gemm[variant + tile_label(report.params, small)]
    warps = p["kWarpsM"] * p["kWarpsN"]
    mac_per_clk = hw["int4_tops"] / 2 / hw["sms"] / hw["clock_hz"]
    ctas = gemm_ctas_per_sm(report, hw, small)
    # per main-loop iteration (one group) of one CTA; CTAs on one SM share its pipes
    tensor = loop.counts["int4 MMA"] * warps * 16 * 8 * 64 / mac_per_clk
    issue = loop.counts["total"] * warps / hw["schedulers"]
    smem_bytes = loop.smem_read_bytes_per_warp * warps + (p["kBM"] + p["kBN"]) * 32 + 32 * warps * 12
    # reads + cp.async fills of the codes + every thread's scale slots
    smem = smem_bytes / hw["smem_bytes_per_clk"]
    per_iter = max(tensor, issue, smem)
    groups = k // 64
    # the non-loop code once per tile, issue-bound and not overlapped with the tensor pipe, every path
    # counted; the low-rank pass loop once more per further kLrChunk ranks
    passes = max(1, math.ceil(RANK / p["kLrChunk"]))
    other = loop.other_instructions + (passes - 1) * loop.low_rank_pass_instructions
    tile_clk = groups * per_iter + other * warps / hw["schedulers"]
    tiles_m, tiles_n = math.ceil(m / p["kBM"]), math.ceil(n / p["kBN"])
    slots = hw["sms"] * ctas
    waves = math.ceil(tiles_m * tiles_n / slots)
    compute_s = (
        waves * tile_clk * ctas / hw["clock_hz"]
    )  # ctas share an SM: a wave of them takes ctas x longer
    # DRAM: a wave covers kGroupTilesM tile rows x (slots / kGroupTilesM) tile columns; each tile's K strip
    # is read once per wave that needs it (nothing assumed to survive in L2 between waves).
    gm = min(p["kGroupTilesM"], tiles_m)
    cols_per_wave = max(1, slots // gm)
    a_reads = math.ceil(tiles_n / cols_per_wave)  # how often all of qx is streamed
    w_reads = math.ceil(tiles_m / gm)  # how often all of qweight is streamed
    g = k // 64
    a_bytes = m * (k // 2 + 4 * g)
    w_bytes = n * (k // 2 + 4 * g)
    dram = a_reads * a_bytes + w_reads * w_bytes + m * n * 2 + m * RANK * 4 + n * RANK * 2
    dram_s = dram / hw["dram_bps"]
    t = max(compute_s, dram_s)
    ops = 2 * m * n * k
    l2_bps = tiles_m * tiles_n * groups * (p["kBM"] + p["kBN"]) * 36 / t
    return {
        "shape": f"{k} -> {n}",
        "tile": f"{p['kBM']}x{p['kBN']}",
        "tensor_clk_per_iter": tensor,
        "issue_clk_per_iter": issue,
        "smem_clk_per_iter": smem,
        "waves": waves,
        "dram_MB": dram / 1e6,
        "compute_us": compute_s * 1e6,
        "dram_us": dram_s * 1e6,
        "time_us": t * 1e6,
        "int4_fraction": ops / t / hw["int4_tops"],
        "l2_to_sm_TBps": l2_bps / 1e12,
    }


def model_quant(report: StaticReport, m: int, k: int, hw: dict = A40) -> dict:
    p, loop = report.params, report.quant
    rows, warps = p["kQRows"], p["kQWarps"]
    groups = k // 64
    ctas = math.ceil(m / rows)
    # The busiest SM runs ceil(ctas / SMs) CTAs; its warps split their groups and share its 4 schedulers.
    warp_iters = math.ceil(ctas / hw["sms"]) * groups
    issue_s = warp_iters * loop.counts["total"] / (hw["schedulers"] * hw["clock_hz"])
    dram = m * k * 2 + m * k // 2 + m * groups * 4 + m * RANK * 4 + k * 2 + RANK * k * 2
    dram_s = dram / hw["dram_bps"]
    return {
        "K": k,
        "warps": ctas * warps,
        "issue_us": issue_s * 1e6,
        "dram_us": dram_s * 1e6,
        "time_us": max(issue_s, dram_s) * 1e6,
    }


def cublas_bf16_us(m: int, k: int, n: int, hw: dict = A40) -> float:
    flops = 2 * m * n * k
    dram = 2 * (m * k + n * k + m * n)
    return max(flops / (CUBLAS_FRACTION * hw["bf16_tflops"]), dram / hw["dram_bps"]) * 1e6


def model_table(report: StaticReport, hw: dict = A40) -> list[dict]:
    rows = []
    for k, n in FLUX_SHAPES:
        g = model_gemm(report, FLUX_M, k, n, hw)
        q = model_quant(report, FLUX_M, k, hw)
        base = cublas_bf16_us(FLUX_M, k, n, hw)
        rows.append(
            {
                **g,
                "quantize_us": q["time_us"],
                "linear_us": q["time_us"] + g["time_us"],
                "cublas_bf16_us": base,
                "speedup": base / (q["time_us"] + g["time_us"]),
            }
        )
    return rows


def small_m_table(report: StaticReport, hw: dict = A40) -> list[dict]:
    """The text stream's GEMM shapes at M = 256 with the large tile (what the host launched before the
    small-M tile) and with the host's choice (the small tile)."""
    rows = []
    for k, n in TEXT_SHAPES:
        large = model_gemm(report, TEXT_M, k, n, hw, tile="large")
        auto = model_gemm(report, TEXT_M, k, n, hw)
        rows.append({"shape": f"{k} -> {n}", "large": large, "auto": auto})
    return rows


def markdown(report: StaticReport, rows: list[dict], hw: dict = A40) -> str:
    p, loop, q = report.params, report.gemm["s4"], report.quant
    sp, small_label = tile_config(p, True), tile_label(p, True)
    small_loop = report.gemm["s4" + small_label].counts
    res = {n: r for n, r in report.resources.items()}
    gemm_res = next(r for n, r in res.items() if "w4a4_gemm" in n and f"ELi{p['kBM']}EE" in n)
    small_res = next(r for n, r in res.items() if "w4a4_gemm" in n and f"ELi{sp['kBM']}EE" in n)
    quant_regs = sorted({r["registers"] for n, r in res.items() if "quantize_act" in n})
    c = loop.counts
    lines = [
        MARK_BEGIN,
        f"All figures in this section are **modelled** by `scripts/kernel_model.py` from the sm_{report.arch} "
        f"cubin (nvcc, ptxas -v, cuobjdump) and the {hw['name']}'s published peaks "
        f"(int4 {hw['int4_tops'] / 1e12:.1f} TOPS, bf16 {hw['bf16_tflops'] / 1e12:.1f} TFLOPS, "
        f"{hw['dram_bps'] / 1e9:.0f} GB/s, {hw['sms']} SMs at {hw['clock_hz'] / 1e9:.2f} GHz). "
        "No GPU has run these kernels yet.",
        "",
        f"w4a4_gemm: CTA tile {p['kBM']}x{p['kBN']}, {p['kWarpsM'] * p['kWarpsN']} warps "
        f"({p['kWarpsM']}x{p['kWarpsN']}), {p['kStages']}-stage cp.async pipeline, grouped CTA order "
        f"({p['kGroupTilesM']} tile rows); {gemm_res['registers']} registers, {gemm_res['spill_stores']} B spills, "
        f"{gemm_res['stack']} B stack; {gemm_ctas_per_sm(report, hw)} CTA per SM. Small-M tile (the host takes it "
        f"for M <= {p['kSmallMaxM']}): {sp['kBM']}x{sp['kBN']}, {sp['kWarpsM'] * sp['kWarpsN']} warps "
        f"({sp['kWarpsM']}x{sp['kWarpsN']}), the same warp tile and kernel body; {gemm_registers(report, True)} "
        f"registers, {small_res['spill_stores']} B spills, {small_res['stack']} B stack; "
        f"{gemm_ctas_per_sm(report, hw, True)} CTA per SM. "
        f"quantize_act: {quant_regs} registers, no spills.",
        "",
        f"Per main-loop iteration of a warp (one 64-channel group): {c['total']} instructions, of which "
        f"{c['int4 MMA']} int4 MMA, {c['fp32 add/mul/fma']} fp32 add/mul/fma (2 FFMA per accumulator: remove the "
        f"magic offset and scale by the 22-bit ascales, FMA with wscales; one FMUL for the row's offset), {c['ldmatrix']} ldmatrix, {c['shared load']} shared "
        f"loads (scales), {c['cp.async']} cp.async, {c['barrier']} barrier, {c['int->float conversion']} int->float "
        f"conversions, {c['global load']} global load (the activation scale of a later group), {c['other']} other "
        f"({c['total'] / c['int4 MMA']:.1f} per int4 MMA; the small tile's loop {small_loop['total']}, "
        f"{small_loop['total'] / small_loop['int4 MMA']:.1f} per int4 MMA). "
        f"The low-rank up-projection is {report.gemm_hmma_total} bf16 MMAs in the epilogue "
        f"(one pass of {p['kLrChunk']} ranks, its operands staged through shared memory). "
        f"quantize_act's group loop: {q.counts['total']} instructions per warp iteration "
        f"({q.counts['bf16 MMA']} bf16 MMA for the down-projection).",
        "",
        "Outside the main loop (prologue, low-rank branch, bias, epilogue, stores), per warp and tile, every "
        "compiled path counted: "
        + ", ".join(f"{name} {n}" for name, n in report.gemm_other_by_instance.items())
        + " (one instance per activation code, output dtype and epilogue; a FLUX call launches the bf16 "
        "ones, which the table prices as issue-bound clocks once per tile, not overlapped with the MMAs).",
        "",
        *table_head(
            "K -> N (M = 4352)",
            "tensor / issue / smem clk per iter",
            "waves",
            "DRAM MB",
            "w4a4_gemm us",
            "int4 peak",
            "quantize_act us",
            "linear us",
            "cuBLAS bf16 @70% us",
            "speed-up",
        ),
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tensor_clk_per_iter']:.0f} / {r['issue_clk_per_iter']:.0f} / "
            f"{r['smem_clk_per_iter']:.0f} | {r['waves']} | {r['dram_MB']:.0f} | {r['time_us']:.0f} | "
            f"{100 * r['int4_fraction']:.0f}% | {r['quantize_us']:.0f} | {r['linear_us']:.0f} | "
            f"{r['cublas_bf16_us']:.0f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        f"The text stream's GEMMs at M = {TEXT_M} (the double blocks' text q|k|v, out, fc1, fc2), w4a4_gemm alone, "
        "with the large tile (two tile rows, two thirds of the second empty) and with the small-M tile the host "
        "takes at this M:",
        "",
        *table_head(
            f"K -> N (M = {TEXT_M})",
            f"{p['kBM']}x{p['kBN']}: waves, us",
            f"{sp['kBM']}x{sp['kBN']}: waves, us",
            "saving",
        ),
    ]
    for r in small_m_table(report, hw):
        lg, au = r["large"], r["auto"]
        lines.append(
            f"| {r['shape']} | {lg['waves']}, {lg['time_us']:.1f} | {au['waves']}, {au['time_us']:.1f} | "
            f"{100 * (1 - au['time_us'] / lg['time_us']):.0f}% |"
        )
    lines += [
        "",
        "Not in the model: L2 bandwidth (the A40's is not published; the table's shapes need "
        f"{min(r['l2_to_sm_TBps'] for r in rows):.1f}-{max(r['l2_to_sm_TBps'] for r in rows):.1f} TB/s from L2 "
        "to the SMs), instruction latencies and dual-issue limits, the clock under load (the model uses the "
        "boost clock), launch overhead. Issue time counts every instruction of the loop body, including "
        "those on paths skipped at run time, and the non-loop code of a tile is counted as if every path "
        "ran, so it errs high. Scale traffic assumes both scales group-major (ascales as every quantize_act writes them, wscales "
        "as SVDQLinear stores them): each group's scales are one coalesced row.",
        MARK_END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="86", help="sm_XX to compile and count (the A40 is 86)")
    ap.add_argument(
        "--markdown", type=Path, help="replace the generated block in this file (e.g. docs/benchmarks.md)"
    )
    ap.add_argument("--json", type=Path, help="write counts and the table as JSON")
    args = ap.parse_args(argv)
    report = analyse(args.arch)
    rows = model_table(report)
    block = markdown(report, rows)
    print(block)
    if args.markdown:
        write_markdown(args.markdown, block, MARK_BEGIN, MARK_END, HEADING)
    if args.json:
        args.json.write_text(json.dumps({"report": asdict(report), "rows": rows}, indent=2))
    ok = all(r["int4_fraction"] >= TARGET_INT4_FRACTION and r["speedup"] >= TARGET_SPEEDUP for r in rows)
    print(
        f"\ntargets (w4a4_gemm >= {TARGET_INT4_FRACTION:.0%} of int4 peak, linear >= {TARGET_SPEEDUP}x "
        f"cuBLAS bf16 @70%): {'met' if ok else 'NOT met'} (modelled)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
