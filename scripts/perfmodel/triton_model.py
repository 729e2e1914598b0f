"""The Triton kernels' performance model (every figure MODELLED, not measured): see
scripts/kernel_model_triton.py's docstring (perfmodel.triton_report) for the model."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import triton

import engine.kernels.triton_backend as tb
from engine.kernels.triton.act import ACT_CONFIGS
from engine.kernels.triton.gemv import GEMV_BLOCK_K, GEMV_CONFIGS
from perfmodel.devices import DEVICES, Device
from perfmodel.launches import act_launch, gemm_launch, gemm_launch_grouped
from perfmodel.loops import compile_sass
from perfmodel.shapes import ADALN_SHAPES, FLUX_M, FLUX_SHAPES, RANK

CUBLAS_BF16_EFFICIENCY = 0.70
DRAM_LATENCY_NS = 800  # loaded DRAM latency, for the bytes-in-flight bound of quantize_act


# --- the model ---------------------------------------------------------------------------------


def _ctas_per_sm(info: dict, warps: int, dev: Device) -> int:
    threads = warps * 32
    regs = math.ceil(info["regs"] / 8) * 8 * threads
    smem = max(info["shared_bytes"], 1)
    return max(1, min(65536 // regs, dev.max_threads_sm // threads, dev.smem_kb_sm * 1024 // smem, 32))


def mma_macs(ops: dict, warps: int) -> int:
    """Int8 MACs of one loop iteration of a CTA, from its MMA instructions: an IGMMA.MxNxK is one
    warpgroup's (four warps issue it together), an IMMA.MNK one warp's."""
    total = 0
    for op, count in ops.items():
        if m := re.match(r"IGMMA\.(\d+)x(\d+)x(\d+)", op):
            total += count * math.prod(map(int, m.groups())) * (warps // 4)
        elif m := re.match(r"IMMA\.(\d+)(\d)(\d\d)", op):
            total += count * math.prod(map(int, m.groups())) * warps
    return total


def model_gemm(m: int, k: int, n: int, dev: Device, info: dict, cfg, group: int = 64) -> dict:
    """Modelled time of w4a4_gemm (see the module docstring); one step is one group of
    ``group`` channels, its SASS the loop's divided by the groups per iteration."""
    c = _ctas_per_sm(info, cfg.num_warps, dev)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    per_sm = math.ceil(tiles / dev.sms)  # tiles on the busiest SM
    groups = k // group
    issue = info["loop_sass"] * cfg.num_warps / 4  # clocks per tile per group: 4 schedulers
    # tensor work as the SASS has it (the bias MMA's included), checked against the tile's dot
    macs = mma_macs(info["loop_ops"], cfg.num_warps)
    assert macs >= cfg.block_m * cfg.block_n * group, (macs, cfg)
    tensor = macs / dev.int8_macs_per_clk_sm
    clk = dev.clock_ghz * 1e9
    dram = (m * k / 2 + n * k / 2 + 2 * m * n + 8 * (m + n) * groups) / (dev.dram_gbs * 1e9)
    t_over = max(per_sm * groups * max(issue, tensor) / clk, dram)
    t_ser = max(per_sm * groups * (issue + tensor) / clk, dram)
    # One CTA per SM: its warpgroups meet at a barrier every group, so MMA and scaling take
    # turns; two or more: one CTA's MMA runs under another's scaling.
    t = t_over if c >= 2 else t_ser
    ops = 2 * m * n * k
    peak = dev.int8_tops() * 1e12
    return {
        "ctas_per_sm": c,
        "tiles_per_sm": per_sm,
        "issue_clk": issue,
        "tensor_clk": tensor,
        "us": t * 1e6,
        "us_overlapped": t_over * 1e6,
        "us_serialized": t_ser * 1e6,
        "int8_frac": ops / t / peak,
        "int8_frac_overlapped": ops / t_over / peak,
        "int8_frac_serialized": ops / t_ser / peak,
    }


def model_act(m: int, k: int, dev: Device, info: dict, cfg) -> dict:
    """Modelled time of quantize_act: issue, DRAM bandwidth and bytes in flight."""
    c = _ctas_per_sm(info, cfg.num_warps, dev)
    programs = triton.cdiv(m, cfg.block_m)
    groups = k // 64
    per_sm = math.ceil(programs / dev.sms)  # programs on the busiest SM
    issue = per_sm * groups * info["loop_sass"] * cfg.num_warps / 4 / (dev.clock_ghz * 1e9)
    nbytes = m * k * 2 + m * k / 2 + m * groups * 4 + m * RANK * 4  # x in, codes, scales, lora out
    in_flight = min(programs, dev.sms * c) * cfg.num_stages * cfg.block_m * 64 * 2  # x tiles
    bw = min(dev.dram_gbs * 1e9, in_flight / (DRAM_LATENCY_NS * 1e-9))
    return {
        "ctas_per_sm": c,
        "us": max(issue, nbytes / bw) * 1e6,
        "us_dram_floor": nbytes / (dev.dram_gbs * 1e9) * 1e6,
        "us_issue": issue * 1e6,
    }


def model_table(report: dict) -> list[dict]:
    """Per device and FLUX shape: the pair's modelled time against modelled cuBLAS bf16."""
    rows = []
    for dev in DEVICES:
        cfg = tb.gemm_config(dev.cc // 10, FLUX_M)
        acfg = ACT_CONFIGS[dev.cc // 10]
        for k, n in FLUX_SHAPES:
            _, args, kwargs = gemm_launch(FLUX_M, k, n, dev.cc // 10, cfg)
            g = model_gemm(FLUX_M, k, n, dev, compile_sass(tb.w4a4_gemm_kernel, args, kwargs, dev.cc), cfg)
            _, args, kwargs = act_launch(FLUX_M, k, dev.cc // 10)
            a = model_act(FLUX_M, k, dev, compile_sass(tb.quantize_act_kernel, args, kwargs, dev.cc), acfg)
            bf16_us = 2 * FLUX_M * n * k / (dev.bf16_tflops() * 1e12 * CUBLAS_BF16_EFFICIENCY) * 1e6
            rows.append(
                {
                    "device": dev.name,
                    "k": k,
                    "n": n,
                    "act_us": a["us"],
                    "act_dram_floor_us": a["us_dram_floor"],
                    **{f"gemm_{key}": v for key, v in g.items()},
                    "cublas_bf16_us": bf16_us,
                    "pair_vs_bf16": bf16_us / (a["us"] + g["us"]),
                    "pair_vs_bf16_overlapped": bf16_us / (a["us"] + g["us_overlapped"]),
                    "pair_vs_bf16_serialized": bf16_us / (a["us"] + g["us_serialized"]),
                }
            )
    return rows


def _ceiling_row(dev: Device, conversion: str, e: dict, cfg) -> dict:
    per_thread = cfg.block_m * cfg.block_n / (cfg.num_warps * 32)
    ops = e["loop_ops"]
    epi = ops.get("FADD", 0) + ops.get("FMUL", 0) + ops.get("FFMA", 0) + e["acc_init"]
    per_elem = epi / per_thread
    # 128 lanes issue per clock per SM; an element's group step is 64 MACs; the tensor cores
    # also run the bias MMA's MACs (Hopper), so only this share of their work is the dot.
    tensor_share = cfg.block_m * cfg.block_n * 64 / mma_macs(ops, cfg.num_warps)
    return {
        "device": dev.name,
        "conversion": conversion,
        "loop_sass": e["loop_sass"],
        "epilogue_per_elem": per_elem,
        "sass_per_elem": e["loop_sass"] / per_thread,
        "tensor_share": tensor_share,
        "ceiling_epilogue_only": min(tensor_share, 128 / per_elem * 64 / dev.int8_macs_per_clk_sm),
        "ceiling_whole_loop": min(
            tensor_share, 128 / (e["loop_sass"] / per_thread) * 64 / dev.int8_macs_per_clk_sm
        ),
    }


def scale_ceiling(report: dict) -> list[dict]:
    """What per-64-group scales on both operands cost: the epilogue instructions per output
    element per group (accumulator resets, bias removal, two scale multiplies), counted in the
    sm_90/sm_86 main loop, the share of the tensor cores' work that is the dot (the rest: the
    bias MMA), and the fraction of int8 peak these allow. On H100 both conversions are counted:
    the shipped one (bias MMA) and the magic bits with a reset per group, compiled with the
    same tile config for 3072 -> 3072."""
    out = []
    for dev in DEVICES:
        cfg = tb.gemm_config(dev.cc // 10, FLUX_M)
        e = next(
            r for r in report["gemm"] if r["cc"] == dev.cc and r["config"] == "large" and not r["unsigned"]
        )
        out.append(_ceiling_row(dev, "bias MMA" if cfg.bias_mma else "magic bits", e, cfg))
        if cfg.bias_mma:
            magic = replace(cfg, bias_mma=False)
            _, args, kwargs = gemm_launch(FLUX_M, 3072, 3072, dev.cc // 10, magic)
            info = compile_sass(tb.w4a4_gemm_kernel, args, kwargs, dev.cc)
            out.append(_ceiling_row(dev, "magic bits (reset per group)", info, magic))
    return out


def format_variants(table: list[dict]) -> list[dict]:
    """The format change the kernel already runs: groups of 128 channels on both operands (a
    checkpoint of our own quantizer; the public 64-group checkpoints cannot be regrouped),
    compiled with the sm_90 config for that group size and modelled on H100 like the main
    table, with quantize_act's time kept at its 64-group figure."""
    dev = DEVICES[0]
    cfg = tb.gemm_config(dev.cc // 10, FLUX_M, 128)
    rows = []
    for k, n in FLUX_SHAPES:
        _, args, kwargs = gemm_launch_grouped(FLUX_M, k, n, dev.cc // 10, cfg, 128)
        info = compile_sass(tb.w4a4_gemm_kernel, args, kwargs, dev.cc)
        assert not info["stack_bytes"] and not info["spill_instrs"], info
        g = model_gemm(FLUX_M, k, n, dev, info, cfg, group=128)
        base = next(r for r in table if r["device"] == dev.name and (r["k"], r["n"]) == (k, n))
        rows.append(
            {
                "device": dev.name,
                "k": k,
                "n": n,
                "group": 128,
                "regs": info["regs"],
                "sass_per_64_channels": info["loop_sass"] / 2,
                "gemm_us": g["us"],
                "int8_frac": g["int8_frac"],
                "pair_vs_bf16": base["cublas_bf16_us"] / (base["act_us"] + g["us"]),
            }
        )
    return rows


def gemv_model(report: dict) -> list[dict]:
    """Modelled GEMV time: the larger of its DRAM time (packed weight + scales + zeros) and its
    issue time (SASS per loop step, counted for each M, on the busiest SM)."""
    rows = []
    for dev in DEVICES:
        cfg = GEMV_CONFIGS[dev.cc // 10]
        for e in (e for e in report["gemv"] if e["cc"] == dev.cc):
            for k, n in ADALN_SHAPES:
                packed = n * k / 2 + 2 * 2 * n * k / 64  # codes + bf16 scales and zeros
                per_sm = math.ceil(triton.cdiv(n, cfg.block_n) / dev.sms)
                steps = triton.cdiv(k, GEMV_BLOCK_K)
                issue = per_sm * steps * e["loop_sass"] * cfg.num_warps / 4 / (dev.clock_ghz * 1e9)
                dram = packed / (dev.dram_gbs * 1e9)
                rows.append(
                    {
                        "device": dev.name,
                        "rows": e["rows"],
                        "k": k,
                        "n": n,
                        "mb": packed / 1e6,
                        "us_dram": dram * 1e6,
                        "us_issue": issue * 1e6,
                        "us": max(dram, issue) * 1e6,
                    }
                )
    return rows
