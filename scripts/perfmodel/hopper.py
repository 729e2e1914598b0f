"""A dependency-aware model of the sm_90 W4A4 GEMM, calibrated on a published H100 figure.

Why a second model: scripts/kernel_model_triton.py counts a loop's instructions against the
chip's issue rate and tensor rate; a loop whose warps wait on barriers, on their own MMAs and on
loads in a serial chain is slower than its count says. Here each main loop is SIMULATED from its
SASS (Triton's ptxas for sm_90, no GPU): one warp's instructions in order, each issued at one per
clock once its source registers are ready (fixed latencies: perfmodel.chain), an MMA completing after the
tensor cores finish the MMAs queued before it (its MACs at the SM's rate plus a pipeline
latency), ``WARPGROUP.DEPBAR`` waiting for those completions, ``DEPBAR.LE SB0, n`` waiting for
the cp.async group committed n groups back to arrive (memory latency), ``BAR.SYNC`` and fences
costing their latency. Three iterations are run; the third one's length is the loop's critical
path per iteration (L). With c CTAs resident per SM, the SM needs per iteration of all of them
``max(L, c x instructions per warp x warps per scheduler, c x tensor clocks)``: the chain, the
issue slots and the tensor cores, whichever binds.

Calibration: the same machinery runs on Triton's fp8 matmul tutorial kernel (03-matrix-
multiplication: blocked tiles, grouped order, ``acc = tl.dot(a, b, acc)`` over K, B K-major),
written out in perfmodel.hopper_calibration and compiled there with the tutorial's fp8 configs (the autotuner's choice is
taken as the fastest modelled config), against the H100 figures published with that kernel:
triton-lang/triton pull request 3546 ("[TUTORIAL] Improve fp8 performance in matmul tutorial",
2024-04-03, "Results on H100", matmul-performance-fp8, M = N = K). The ratio published /
modelled is reported per size, and its mean is the calibration factor applied to our kernel.

    python scripts/kernel_model_hopper.py [--json PATH] [--markdown]

Every figure is MODELLED, not measured. cuBLAS bf16 is modelled as in perfmodel.triton_model
(70% of the dense bf16 peak), quantize_act by that module's model of the shipped kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import triton

import engine.kernels.triton_backend as tb
from engine.kernels.triton import gemm_sm90
from engine.kernels.triton.act import ACT_CONFIGS
from engine.kernels.triton.common import LaunchConfig
from perfmodel.chain import (
    ALU_LAT,
    BAR_LAT,
    FENCE_LAT,
    LDG_LAT,
    LDS_LAT,
    MEM_LAT,
    WGMMA_LAT,
    ctas_per_sm,
    loop_mma_clocks,
    simulate,
)
from perfmodel.devices import H100
from perfmodel.hopper_calibration import DEFAULT_L2, _waves_time, calibrate, compile_cubin, main_loop
from perfmodel.launches import _meta, _Recorder, act_launch, gemm_launch
from perfmodel.loops import compile_sass, opcode_counts
from perfmodel.shapes import FLUX_M, RANK
from perfmodel.tables import table_head
from perfmodel.triton_model import CUBLAS_BF16_EFFICIENCY, model_act

# K -> N of every W4A4 linear of FLUX.1 at 1024x1024: attention q|k|v (fused, 3 x 3072), out,
# MLP up and down, and the single blocks' fused q|k|v|mlp (3072 -> 3 x 3072 + 12288) and their
# proj_out (15360 -> 3072).
FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 21504)]
TARGET_VS_BF16 = 1.5


def sm90_launch(
    m: int,
    k: int,
    n: int,
    cfg: LaunchConfig,
    unsigned: bool,
    out_dtype: torch.dtype = torch.bfloat16,
    rank: int | None = None,
) -> tuple:
    """(args, kwargs) of the sm_90 kernel as its launcher passes them for a FLUX shape (``out_dtype``
    float32: as the dispatch launches it for a call with the partial/gate/residual epilogue)."""
    rec = _Recorder()
    g = k // 64
    rank = RANK if rank is None else rank  # the module's RANK read at the call (a test widens it)
    weight = gemm_sm90.Sm90Weight(
        _meta(n, k, dtype=torch.float8_e4m3fn), _meta(g, n, dtype=torch.float32), _meta(2, g, n)
    )
    gemm_sm90.launch(
        _meta(m, k // 2, dtype=torch.uint8),
        _meta(g, m, dtype=torch.float32).t(),  # group-major, as quantize_act returns them
        weight,
        _meta(m, rank, dtype=torch.float32),
        _meta(n, rank),
        _meta(n),
        unsigned=unsigned,
        out_dtype=out_dtype,
        config=cfg,
        kernel=rec,
    )
    (_, args, kwargs) = rec.calls[0]
    return args, kwargs


def sm90_report(cfg: LaunchConfig, m: int = FLUX_M, shapes: list | None = None) -> list[dict]:
    """Static facts of the sm_90 kernel's loops for every FLUX shape (or ``shapes``) at M = m,
    signed and unsigned."""
    return [
        sm90_entry(m, k, n, cfg, unsigned) for unsigned in (False, True) for k, n in shapes or FLUX_SHAPES
    ]


def sm90_entry(
    m: int,
    k: int,
    n: int,
    cfg: LaunchConfig,
    unsigned: bool,
    out_dtype: torch.dtype = torch.bfloat16,
    rank: int | None = None,
) -> dict:
    """Static facts of the sm_90 kernel's loops at one problem as its launcher launches it (the
    compile cached per specialization: compile_cubin)."""
    args, kwargs = sm90_launch(m, k, n, cfg, unsigned, out_dtype, rank)
    loops, regs, stack, spills, smem = compile_cubin(gemm_sm90.w4a4_gemm_sm90_kernel, args, kwargs)
    body = main_loop(loops, "QGMMA")
    ops = opcode_counts(body)
    corr = [b for b in loops if any("HGMMA" in t for t in b) and b is not body]
    return {
        "m": m,
        "k": k,
        "n": n,
        "unsigned": unsigned,
        "out_size": torch.empty(0, dtype=out_dtype).element_size(),
        "config": asdict(cfg),
        "regs": regs,
        "stack_bytes": stack,
        "spill_instrs": spills,
        "shared_bytes": smem,
        "ctas_per_sm": ctas_per_sm(regs, smem, cfg.num_warps),
        "loop_sass": len(body),
        "loop_ops": dict(ops.most_common()),
        "loop_bar_sync": sum(c for op, c in ops.items() if op.startswith("BAR.SYNC")),
        "loop_mma_waits": ops.get("WARPGROUP.DEPBAR.LE", 0),
        "loop_qgmma": sum(c for op, c in ops.items() if op.startswith("QGMMA")),
        "loop_shared_stores": sum(c for op, c in ops.items() if op.startswith(("STS", "STSM"))),
        "loop_i2f": sum(c for op, c in ops.items() if op.startswith("I2F")),
        "body": body,
        "corr_body": max(corr, key=len) if corr else [],
    }


def sm90_model(entry: dict, l2: float, act_us: float) -> dict:
    """Modelled time of the linear (quantize_act + GEMM) at the entry's problem (its M, K, N and
    output dtype), against cuBLAS bf16."""
    cfg = entry["config"]
    k, n, warps, m = entry["k"], entry["n"], cfg["num_warps"], entry["m"]
    sim = simulate(entry["body"])
    tensor = loop_mma_clocks(entry["body"], warps)
    tiles = triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"])
    groups = k // 64
    # L2 -> SM bytes per CTA and group: A (0.5 B per code) and B (1 B per weight) tiles
    per_iter_bytes = cfg["block_m"] * 32 + cfg["block_n"] * 64
    clocks = _waves_time(tiles, groups, sim, warps, tensor, entry["ctas_per_sm"], per_iter_bytes, l2)
    if entry["corr_body"]:  # the offset correction, once per 16 groups, before the main loop
        csim = simulate(entry["corr_body"])
        ctensor = loop_mma_clocks(entry["corr_body"], warps)
        cbytes = cfg["block_m"] * 16 * 4 + cfg["block_n"] * 16 * 4
        clocks += _waves_time(
            tiles,
            triton.cdiv(groups, gemm_sm90.BLOCK_G),
            csim,
            warps,
            ctensor,
            entry["ctas_per_sm"],
            cbytes,
            l2,
        )
    gemm_us = clocks / (H100.clock_ghz * 1e3)
    dram_us = (m * k / 2 + n * k + entry["out_size"] * m * n + 4 * (m + n) * groups) / (H100.dram_gbs * 1e3)
    gemm_us = max(gemm_us, dram_us)
    ops = 2 * m * n * k
    bf16_us = ops / (H100.bf16_tflops() * 1e12 * CUBLAS_BF16_EFFICIENCY) * 1e6
    c = entry["ctas_per_sm"]
    bound = max(
        ("chain", sim["clocks"]),
        ("issue", sim["instructions"] * max(1, warps // 4) * c),
        ("tensor", c * tensor),
        ("L2", c * per_iter_bytes / l2),
        key=lambda x: x[1],
    )[0]
    return {
        "k": k,
        "n": n,
        "unsigned": entry["unsigned"],
        "chain_clk": sim["clocks"],
        "stalls": sim["stalls"],
        "issue_clk": sim["instructions"],
        "tensor_clk": tensor,
        "ctas_per_sm": c,
        "bound": bound,
        "gemm_us": gemm_us,
        "fp8_frac": ops / (gemm_us * 1e-6) / (H100.int8_tops() * 1e12),
        "act_us": act_us,
        "cublas_bf16_us": bf16_us,
        "linear_vs_bf16": bf16_us / (act_us + gemm_us),
        "l2_bytes_per_group_cta": per_iter_bytes,
    }


def baseline_model(l2: float, acts: dict[int, float]) -> list[dict]:
    """The shipped int8 kernel (engine/kernels/triton/gemm.py, Hopper config, bias MMA) through
    the same simulator and calibration: what routing sm_90 to the FP8 kernel changes."""
    cfg = tb.gemm_config(9, FLUX_M)
    rows = []
    for k, n in FLUX_SHAPES:
        _, args, kwargs = gemm_launch(FLUX_M, k, n, 9, cfg, False)
        loops, regs, _, _, smem = compile_cubin(tb.w4a4_gemm_kernel, args, kwargs)
        body = main_loop(loops, "IGMMA")
        sim = simulate(body)
        tensor = loop_mma_clocks(body, cfg.num_warps)
        c = ctas_per_sm(regs, smem, cfg.num_warps)
        tiles = triton.cdiv(FLUX_M, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        nbytes = cfg.block_m * 32 + cfg.block_n * 32  # both operands packed
        us = _waves_time(tiles, k // 64, sim, cfg.num_warps, tensor, c, nbytes, l2) / (H100.clock_ghz * 1e3)
        ops = 2 * FLUX_M * n * k
        bf16_us = ops / (H100.bf16_tflops() * 1e12 * CUBLAS_BF16_EFFICIENCY) * 1e6
        rows.append(
            {
                "k": k,
                "n": n,
                "chain_clk": sim["clocks"],
                "stalls": sim["stalls"],
                "issue_clk": sim["instructions"],
                "tensor_clk": tensor,
                "ctas_per_sm": c,
                "gemm_us": us,
                "int8_frac": ops / (us * 1e-6) / (H100.int8_tops() * 1e12),
                "linear_vs_bf16": bf16_us / (acts[k] + us),
            }
        )
    return rows


def act_times() -> dict[int, float]:
    """quantize_act's modelled time per K (the shipped kernel, perfmodel.triton_model's model)."""
    out = {}
    for k in sorted({k for k, _ in FLUX_SHAPES}):
        _, args, kwargs = act_launch(FLUX_M, k, 9)
        info = compile_sass(tb.quantize_act_kernel, args, kwargs, 90)
        out[k] = model_act(FLUX_M, k, H100, info, ACT_CONFIGS[9])["us"]
    return out


def gate_failures(static: list[dict]) -> list[str]:
    """The loop-structure gates of the sm_90 kernel (tests/test_hopper_gemm_static.py)."""
    bad = []
    for e in static:
        tag = f"sm90 gemm M={e['m']} {e['k']}->{e['n']} unsigned={e['unsigned']}"
        if e["stack_bytes"] or e["spill_instrs"]:
            bad.append(f"{tag}: spills")
        if e["shared_bytes"] > 227 * 1024 // 2:
            bad.append(f"{tag}: {e['shared_bytes']} B of shared memory, more than half an SM's")
        if e["ctas_per_sm"] < 2:
            bad.append(f"{tag}: one CTA per SM (no other CTA's MMA under its scaling)")
        cfg = e["config"]
        want = 2 * (cfg["block_m"] // 64) // max(1, cfg["num_warps"] // 4)  # two K = 32 steps per m64 tile
        if e["loop_qgmma"] != want:
            bad.append(f"{tag}: {e['loop_qgmma']} FP8 MMAs per group, not {want}")
        if e["loop_mma_waits"] > 2 or e["loop_bar_sync"] > 2:
            bad.append(f"{tag}: {e['loop_mma_waits']} MMA waits, {e['loop_bar_sync']} barriers per group")
        if e["loop_shared_stores"] > 1:
            bad.append(f"{tag}: {e['loop_shared_stores']} shared stores per group (an operand round trip)")
        if e["loop_i2f"]:
            bad.append(f"{tag}: I2F in the main loop")
        if e["loop_sass"] > MAX_LOOP_SASS:
            bad.append(f"{tag}: {e['loop_sass']} SASS per group > {MAX_LOOP_SASS}")
    return bad


MAX_LOOP_SASS = 260


def markdown(cal: dict, static: list[dict], rows: list[dict], base: list[dict]) -> str:
    lines = [
        "Calibration: Triton's fp8 matmul tutorial kernel, compiled here for sm_90 (Triton "
        + triton.__version__
        + "), modelled with the same simulator, against its published H100 figures "
        "(triton-lang/triton pull request 3546, M = N = K):",
        "",
        *table_head(
            "M = N = K",
            "config picked (BM, BN, BK, stages, warps)",
            "chain clk / iter",
            "SASS / iter",
            "tensor clk / iter",
            "CTAs/SM",
            "modelled TFLOPS",
            "published TFLOPS",
            "published / modelled",
        ),
    ]
    for r in cal["rows"]:
        lines.append(
            f"| {r['size']} | {r['config']} | {r['chain_clk']:.0f} | {r['sass']} | {r['tensor_clk']:.0f} | "
            f"{r['ctas_per_sm']} | {r['tflops']:.0f} ({r['uncapped_tflops']:.0f}) | {r['published_tflops']:.0f} | "
            f"{r['ratio']:.2f} |"
        )
    lines += [
        "",
        f"The one fitted parameter, the L2 -> SM bandwidth: **{cal['l2_bytes_per_clk_sm']:g} B per clock per SM** "
        f"({cal['l2_tb_s']:.1f} TB/s at {H100.clock_ghz} GHz), fitted on the sizes from 3072 up (the chip full for "
        f"long). Error there: largest {cal['error_after']:.0%}, mean {cal['mean_error_after']:.0%} "
        f"(without the L2 term the model is off by up to {cal['error_before']:.0%}). Below 3072 the published "
        "figures fall far under any throughput model (launch and fill latency of a few-microsecond kernel), "
        "so they are shown, not fitted.",
        "",
        "The sm_90 W4A4 GEMM (engine/kernels/triton/gemm_sm90.py), counted per 64-channel group:",
        "",
        *table_head(
            "M",
            "tile",
            "K -> N",
            "acts",
            "regs",
            "CTAs/SM",
            "smem KB",
            "SASS / group",
            "BAR.SYNC",
            "MMA waits",
            "FP8 MMAs",
            "shared stores",
        ),
    ]
    for e in static:
        lines.append(
            f"| {e['m']} | {e['config']['block_m']}x{e['config']['block_n']} | {e['k']} -> {e['n']} | "
            f"{'u4' if e['unsigned'] else 's4'} | {e['regs']} | {e['ctas_per_sm']} | "
            f"{e['shared_bytes'] / 1024:.0f} | {e['loop_sass']} | {e['loop_bar_sync']} | {e['loop_mma_waits']} | "
            f"{e['loop_qgmma']} | {e['loop_shared_stores']} |"
        )
    lines += [
        "",
        f"Modelled at M = {FLUX_M} on an H100 SXM (calibrated; quantize_act as modelled for the shipped kernel; "
        f"cuBLAS bf16 at {CUBLAS_BF16_EFFICIENCY:.0%} of its peak):",
        "",
        *table_head(
            "K -> N",
            "acts",
            "chain clk / group (MMA wait, cp.async wait, barriers)",
            "issue clk",
            "tensor clk",
            "bound",
            "GEMM us",
            "fp8 peak",
            "quantize_act us",
            "cuBLAS bf16 us",
            "linear vs bf16",
            "L2 bytes / group / CTA",
        ),
    ]
    for r in rows:
        s = r["stalls"]
        lines.append(
            f"| {r['k']} -> {r['n']} | {'u4' if r['unsigned'] else 's4'} | {r['chain_clk']:.0f} ({s['mma_wait']:.0f}, "
            f"{s['cp_async_wait']:.0f}, {s['barrier']:.0f}) | {r['issue_clk']} | {r['tensor_clk']:.0f} | {r['bound']} | "
            f"{r['gemm_us']:.0f} | {r['fp8_frac']:.0%} | {r['act_us']:.1f} | {r['cublas_bf16_us']:.0f} | "
            f"**{r['linear_vs_bf16']:.2f}x** | {r['l2_bytes_per_group_cta']} |"
        )
    lines += [
        "",
        "The shipped int8 kernel (gemm.py, sm_90 config, bias MMA), the same simulator and L2 figure:",
        "",
        *table_head(
            "K -> N",
            "chain clk / group (MMA wait, cp.async wait, barriers)",
            "issue clk",
            "tensor clk",
            "CTAs/SM",
            "GEMM us",
            "int8 peak",
            "linear vs bf16",
        ),
    ]
    for r in base:
        s = r["stalls"]
        lines.append(
            f"| {r['k']} -> {r['n']} | {r['chain_clk']:.0f} ({s['mma_wait']:.0f}, {s['cp_async_wait']:.0f}, "
            f"{s['barrier']:.0f}) | {r['issue_clk']} | {r['tensor_clk']:.0f} | {r['ctas_per_sm']} | "
            f"{r['gemm_us']:.0f} | {r['int8_frac']:.0%} | **{r['linear_vs_bf16']:.2f}x** |"
        )
    met = all(r["linear_vs_bf16"] >= TARGET_VS_BF16 for r in rows)
    lines += ["", f"Target {TARGET_VS_BF16}x cuBLAS bf16 on every shape: **{'met' if met else 'NOT met'}**."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md tables")
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help=f"skip the tutorial kernel (L2 at {DEFAULT_L2} B/clk/SM, the fitted value)",
    )
    args = parser.parse_args()
    cfg = gemm_sm90.SM90_CONFIGS["large"]
    # the config served at M = 4352 on every FLUX shape, and the small-M one (M <= 1024) on one
    static = sm90_report(cfg) + sm90_report(gemm_sm90.SM90_CONFIGS["small"], 1024, FLUX_SHAPES[:1])
    bad = gate_failures(static)
    cal = {
        "rows": [],
        "l2_bytes_per_clk_sm": DEFAULT_L2,
        "l2_tb_s": 0.0,
        "error_before": 0.0,
        "error_after": 0.0,
        "mean_error_after": 0.0,
    }
    if not args.no_calibration:
        cal = calibrate()
    acts = act_times()
    rows = [sm90_model(e, cal["l2_bytes_per_clk_sm"], acts[e["k"]]) for e in static if e["m"] == FLUX_M]
    base = baseline_model(cal["l2_bytes_per_clk_sm"], acts)
    full = {
        "calibration": cal,
        "static": [{k: v for k, v in e.items() if k not in ("body", "corr_body")} for e in static],
        "model": rows,
        "baseline_int8": base,
        "gates_failed": bad,
        "assumptions": {
            "ALU_LAT": ALU_LAT,
            "LDS_LAT": LDS_LAT,
            "LDG_LAT": LDG_LAT,
            "MEM_LAT": MEM_LAT,
            "BAR_LAT": BAR_LAT,
            "FENCE_LAT": FENCE_LAT,
            "WGMMA_LAT": WGMMA_LAT,
        },
    }
    if args.json:
        args.json.write_text(json.dumps(full, indent=1, default=str))
    if args.markdown:
        print(markdown(cal, static, rows, base))
    for line in bad:
        print("GATE FAILED:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
