"""Static checks and a performance model of the Triton kernels, from their compiled SASS.

No GPU needed: each kernel is compiled for sm_90 and sm_86 by Triton's own ptxas, with the
arguments the backend's launcher really passes for FLUX's shapes (captured from the launcher
called on meta tensors, so strides, group-major scales and Triton's integer specialization are
the real ones), for every config in the kernels' fixed tables. The cubins are disassembled with
the nvdisasm that ships with Triton, and the main loop (the backward branch around the MMA, or
the kernel's longest loop) is counted instruction by instruction.

    python scripts/kernel_model_triton.py [--json PATH] [--markdown]

Gates (exit status 1 when one fails; tests/test_triton_static.py runs them in CI):
  every kernel: no spills (no stack frame, no STL/LDL);
  w4a4_gemm: int8 MMA in the main loop, no I2F there, no flush-to-zero float op there (the
    Hopper conversion reads int32s as fp32 subnormals), an MMA with its accumulator off where
    the config takes the bias-MMA conversion, at most 600 SASS per 64-wide group per thread on
    sm_90 for the config used at M = 4352;
  quantize_act: no global load narrower than 8 bytes in its loop (contiguous tiles, vectors);
  w4a16_gemv: the weight streams as 16-byte vectors.

Model (every figure is MODELLED, not measured): a kernel's time is the larger of its issue time
(SASS per loop iteration x warps / 4 schedulers, for the CTAs resident per SM, in waves over
the SMs), its tensor-core time (the MACs of the loop's MMA instructions, the bias MMA's
included, / int8 MACs per clock per SM) and its DRAM time
(unique bytes / bandwidth). "overlapped" assumes issue and tensor work of the resident warps
overlap perfectly, "serialized" that they add (each group waits on its MMA before scaling).
cuBLAS bf16 is modelled at CUBLAS_BF16_EFFICIENCY of the dense bf16 peak (an assumption, the
value docs/benchmarks.md used before). Datasheet peaks are in perfmodel.devices.DEVICES.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton

from perfmodel.tables import table_head
from perfmodel.triton_model import (
    CUBLAS_BF16_EFFICIENCY,
    format_variants,
    gemv_model,
    model_table,
    scale_ceiling,
)
from perfmodel.triton_static import gate_failures, gemv_bytes, gemv_bytes_subprocess, static_report


def markdown(report: dict, table: list[dict], ceiling: list[dict], nbytes: dict, variants: list[dict]) -> str:
    """The section of docs/benchmarks.md, every figure labelled modelled or counted."""
    lines = [
        "Counted from the SASS (Triton " + triton.__version__ + "'s ptxas, no GPU):",
        "",
        "| kernel | arch | config (BM x BN, warps, stages[, conversion]) | regs | spills | SASS per loop | "
        "I2F in loop | "
        "narrowest load in loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in report["gemm"]:
        lines.append(
            f"| w4a4_gemm {'u4' if e['unsigned'] else 's4'} (per 64-group) | sm_{e['cc']} | {e['config']}: "
            f"{e['block_m']}x{e['block_n']}, {e['num_warps']}, {e['num_stages']}"
            f"{', bias MMA' if e['bias_mma'] else ''} | "
            f"{e['regs']} | {e['spill_instrs']} | {e['loop_sass']} | {e['loop_i2f']} | "
            f"{e['loop_narrowest_load']} B |"
        )
    for e in report["act"]:
        lines.append(
            f"| quantize_act (per 64-group) | sm_{e['cc']} | {e['block_m']} rows, {e['num_warps']}, "
            f"{e['num_stages']} | {e['regs']} | {e['spill_instrs']} | {e['loop_sass']} | {e['loop_i2f']} | "
            f"{e['loop_narrowest_load']} B |"
        )
    for e in report["gemv"]:
        lines.append(
            f"| w4a16_gemv M={e['rows']} (per 256 channels) | sm_{e['cc']} | {e['block_n']} cols, "
            f"{e['num_warps']}, {e['num_stages']} | {e['regs']} | {e['spill_instrs']} | {e['loop_sass']} | "
            f"{e['loop_i2f']} | {e['loop_narrowest_load']} B |"
        )
    lines += [
        "",
        "Modelled at M = 4352 (not measured; cuBLAS bf16 modelled at "
        f"{CUBLAS_BF16_EFFICIENCY:.0%} of the dense bf16 peak):",
        "",
        *table_head(
            "device",
            "K -> N",
            "quantize_act us (DRAM floor)",
            "w4a4_gemm us (CTAs/SM)",
            "int8 peak fraction [serialized, overlapped]",
            "cuBLAS bf16 us",
            "pair vs bf16 [serialized, overlapped]",
        ),
    ]
    for r in table:
        lines.append(
            f"| {r['device']} | {r['k']} -> {r['n']} | {r['act_us']:.1f} ({r['act_dram_floor_us']:.1f}) | "
            f"{r['gemm_us']:.0f} ({r['gemm_ctas_per_sm']}) | {r['gemm_int8_frac']:.0%} "
            f"[{r['gemm_int8_frac_serialized']:.0%}, {r['gemm_int8_frac_overlapped']:.0%}] | "
            f"{r['cublas_bf16_us']:.0f} | **{r['pair_vs_bf16']:.2f}x** "
            f"[{r['pair_vs_bf16_serialized']:.2f}, {r['pair_vs_bf16_overlapped']:.2f}] |"
        )
    lines += [
        "",
        "The modelled figure takes MMA and scaling as overlapped when two or more CTAs share an SM "
        "(one's MMA runs under another's scaling) and as serialized with one CTA per SM (its warpgroups "
        "meet at a barrier every group); the brackets give both bounds.",
        "",
        "Per-64-group scales on both operands, counted in the main loop:",
        "",
        "| device | conversion | SASS per loop | epilogue SASS per output element per group | all loop SASS "
        "per element | dot's share of the tensor work | int8 peak allowed by the epilogue (and that "
        "share) | by the whole loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in ceiling:
        lines.append(
            f"| {c['device']} | {c['conversion']} | {c['loop_sass']} | {c['epilogue_per_elem']:.1f} | "
            f"{c['sass_per_elem']:.1f} | {c['tensor_share']:.0%} | {c['ceiling_epilogue_only']:.0%} | "
            f"{c['ceiling_whole_loop']:.0%} |"
        )
    lines += [
        "",
        "Groups of 128 channels on both operands, modelled the same way (H100 SXM; compiled with the sm_90 "
        "config for that group size: 64x128, 4 warps, 4 stages, magic bits; quantize_act kept at its "
        "64-group time):",
        "",
        *table_head(
            "K -> N", "regs", "SASS per 64 channels", "w4a4_gemm us", "int8 peak fraction", "pair vs bf16"
        ),
    ]
    for v in variants:
        lines.append(
            f"| {v['k']} -> {v['n']} | {v['regs']} | {v['sass_per_64_channels']:g} | {v['gemm_us']:.0f} | "
            f"{v['int8_frac']:.0%} | **{v['pair_vs_bf16']:.2f}x** |"
        )
    if nbytes:
        w = nbytes["qweight"]
        sc = {key: nbytes[key] for key in ("wscales", "wzeros")}
        packed = w["bytes"] + sum(v["bytes"] for v in sc.values())
        unique = sum(v["unique"] for key, v in nbytes.items() if isinstance(v, dict) and "unique" in v)
        lines += [
            "",
            f"W4A16 GEMV, counted from the kernel's own loads (interpreter, GPU launch config, "
            f"M, K, N = {nbytes['shape']}): qweight {w['loaded']:,} B loaded of {w['bytes']:,}, "
            f"{'each byte exactly once' if w['loaded'] == w['unique'] == w['bytes'] else 'NOT each byte once'}; "
            f"scales + zeros {sum(v['loaded'] for v in sc.values()):,} B; unique bytes of all inputs "
            f"{unique:,} = {unique / packed:.3f}x the packed weight + scales + zeros.",
            "",
        ]
    lines += [
        "",
        "W4A16 GEMV, modelled (the larger of DRAM time and issue time on the busiest SM):",
        "",
        *table_head("device", "AdaLN K -> N", "M", "MB read", "us at DRAM peak", "us issue", "modelled us"),
    ]
    for r in gemv_model(report):
        lines.append(
            f"| {r['device']} | {r['k']} -> {r['n']} | {r['rows']} | {r['mb']:.1f} | {r['us_dram']:.1f} | "
            f"{r['us_issue']:.1f} | {r['us']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md tables")
    parser.add_argument("--gemv-bytes-child", help=argparse.SUPPRESS)
    parser.add_argument("--no-gemv-bytes", action="store_true", help="skip the interpreter byte count")
    args = parser.parse_args()
    if args.gemv_bytes_child:
        m, k, n = map(int, args.gemv_bytes_child.split(","))
        json.dump(gemv_bytes(m, k, n), sys.stdout)
        return 0
    report = static_report()
    bad = gate_failures(report)
    table = model_table(report)
    ceiling = scale_ceiling(report)
    variants = format_variants(table)
    nbytes = {} if args.no_gemv_bytes else gemv_bytes_subprocess(4, 3072, 512)
    full = {
        "static": report,
        "gates_failed": bad,
        "model": table,
        "scale_ceiling": ceiling,
        "format_variants": variants,
        "gemv_bytes": nbytes,
    }
    if args.json:
        args.json.write_text(json.dumps(full, indent=1))
    if args.markdown:
        print(markdown(report, table, ceiling, nbytes, variants))
    for line in bad:
        print("GATE FAILED:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
