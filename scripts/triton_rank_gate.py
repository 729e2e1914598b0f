"""The low-rank gate of the Triton kernels: every kernel with a low-rank branch, compiled at the
ranks LoRAs bring (the base 32, plus LoRAs of 16, 64, 192: ranks 32, 48, 96, 224) for sm_90 and
sm_86 by Triton's own ptxas, with the launcher's real arguments at FLUX's shapes. No GPU needed.

    python scripts/triton_rank_gate.py [--json PATH] [--ranks 32,48,96,224]

Gates (exit status 1 when one fails; tests/test_triton_static.py runs it in CI), per kernel,
variant, arch and rank:
  no spills (no stack frame, no STL/LDL);
  shared memory per CTA within the device's per-block limit (227 KB sm_90, 99 KB sm_86);
  CTAs per SM (registers, shared memory, threads, blocks) at least the design's (INTENDED_CTAS);
  the PTX checks of perfmodel.sass.ptx_checks: no sign-extended narrow immediate (the old
  bias-MMA tile), and in quantize_act no approximate fp32 division and no NaN-dropping max.
Where several ranks share one specialization (the low-rank branch is processed LORA_CHUNK ranks
at a time, so every rank >= the chunk compiles to one kernel), the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from perfmodel.launches import act_launch, gemm_launch
from perfmodel.loops import compile_sass
from perfmodel.sass import disassemble, ptx_checks, triton_kernel
from perfmodel.shapes import FLUX_M

import engine.kernels.triton_backend as tb
from engine.kernels.triton.gemm import GEMM_CONFIGS

RANKS = (32, 48, 96, 224)
ARCHS = (90, 86)
FLUX_K = 3072  # a FLUX width (every K compiles to the same kernel: it is a runtime argument)


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of a compute capability (CUDA programming guide, table of limits)."""

    smem_block: int  # largest shared memory one CTA may opt into
    smem_sm: int  # shared memory per SM (each CTA also takes 1 KB reserved by the system)
    threads: int
    blocks: int
    regs: int = 65536


LIMITS = {90: SmLimits(227 * 1024, 228 * 1024, 2048, 32), 86: SmLimits(99 * 1024, 100 * 1024, 1536, 16)}
# The occupancy the configs are designed for (engine/kernels/triton/gemm.py and act.py): the
# GEMM two CTAs per SM on both archs (one CTA's MMA under the other's scaling); quantize_act at
# least two (its 16-row programs stream x: two or three per SM at FLUX's 4352 tokens).
INTENDED_CTAS = {"gemm": 2, "act": 2}


def ctas_per_sm(regs: int, warps: int, smem: int, cc: int) -> int:
    """Resident CTAs per SM, as the occupancy calculator counts them: registers allocated per warp
    in units of 256, warps in units of 4; 1 KB of system shared memory per CTA."""
    lim = LIMITS[cc]
    per_warp = math.ceil(regs * 32 / 256) * 256
    warps_by_regs = (lim.regs // per_warp) // 4 * 4
    by_regs = warps_by_regs // warps
    by_smem = lim.smem_sm // (smem + 1024)
    return min(by_regs, by_smem, lim.threads // (warps * 32), lim.blocks)


def launches(cc: int, rank: int) -> list[tuple[str, str, object, tuple]]:
    """(kind, variant, kernel, captured launch) of every low-rank kernel at ``rank``."""
    out = []
    for name, cfg in GEMM_CONFIGS[cc // 10].items():
        for unsigned in (False, True):
            launch = gemm_launch(FLUX_M, FLUX_K, FLUX_K, cc // 10, cfg, unsigned, rank=rank)
            out.append(("gemm", f"{name} unsigned={unsigned}", tb.w4a4_gemm_kernel, launch))
        if cc == 86:  # the bias-MMA path is Hopper's; compiled for an mma.sync target too
            launch = gemm_launch(FLUX_M, FLUX_K, FLUX_K, 8, replace(cfg, bias_mma=True), rank=rank)
            out.append(("gemm", f"{name} bias_mma", tb.w4a4_gemm_kernel, launch))
    for prologue in ("", "modulation", "gelu"):
        launch = act_launch(FLUX_M, FLUX_K, cc // 10, rank=rank, prologue=prologue)
        out.append(("act", prologue or "plain", tb.quantize_act_kernel, launch))
    return out


def gate(ranks: tuple[int, ...] = RANKS) -> tuple[list[dict], list[str]]:
    """Compile every low-rank kernel at each rank and arch; the entries and the failed gates."""
    entries, bad = [], []
    for cc in ARCHS:
        for rank in ranks:
            for kind, variant, fn, (_grid, args, kwargs) in launches(cc, rank):
                info = compile_sass(fn, args, kwargs, cc)
                warps = kwargs["num_warps"]
                e = {
                    "kind": kind,
                    "variant": variant,
                    "cc": cc,
                    "rank": rank,
                    "block_r": kwargs["BLOCK_R"],
                    "regs": info["regs"],
                    "spill_instrs": info["spill_instrs"],
                    "stack_bytes": info["stack_bytes"],
                    "shared_bytes": info["shared_bytes"],
                    "num_warps": warps,
                    "ctas_per_sm": ctas_per_sm(info["regs"], warps, info["shared_bytes"], cc),
                    "kernel_id": id(info),  # ranks that share one compiled kernel share this
                    **{k: v for k, v in info.items() if k.startswith("ptx_")},
                }
                entries.append(e)
                bad += failures(e)
    return entries, bad


def failures(e: dict) -> list[str]:
    tag = f"{e['kind']} {e['variant']} sm_{e['cc']} rank {e['rank']}"
    bad = []
    if e["spill_instrs"] or e["stack_bytes"]:
        bad.append(f"{tag}: spills ({e['stack_bytes']} B stack, {e['spill_instrs']} STL/LDL)")
    if e["shared_bytes"] > LIMITS[e["cc"]].smem_block:
        bad.append(f"{tag}: {e['shared_bytes']} B shared memory > {LIMITS[e['cc']].smem_block}")
    if e["ctas_per_sm"] < INTENDED_CTAS[e["kind"]]:
        bad.append(f"{tag}: {e['ctas_per_sm']} CTAs per SM < {INTENDED_CTAS[e['kind']]} (regs {e['regs']})")
    if e["ptx_wide_immediates"]:
        bad.append(f"{tag}: {e['ptx_wide_immediates']} sign-extended immediates in 32-bit PTX instructions")
    if e["kind"] == "act" and e["ptx_div_approx"]:
        bad.append(f"{tag}: {e['ptx_div_approx']} approximate fp32 divisions (div.full/div.approx)")
    if e["kind"] == "act" and e["ptx_max_drops_nan"]:
        bad.append(f"{tag}: {e['ptx_max_drops_nan']} fp32 max/min that drop NaN")
    return bad


def compiled_constants() -> list[dict]:
    """The PTX/SASS facts the bias-MMA tile, the LayerNorm statistics and the group maximum rely
    on, for the GEMM with the bias MMA (sm_90's small config, and sm_86's compiled with it) and
    quantize_act with the LayerNorm prologue (sm_90, sm_86), at rank 32."""
    out = []
    for cc in ARCHS:
        cfg = replace(GEMM_CONFIGS[cc // 10]["small"], bias_mma=True)
        gemm = gemm_launch(FLUX_M, FLUX_K, FLUX_K, cc // 10, cfg)
        act = act_launch(FLUX_M, FLUX_K, cc // 10, prologue="modulation")
        for kind, fn, (_grid, args, kwargs) in (
            ("gemm", tb.w4a4_gemm_kernel, gemm),
            ("act", tb.quantize_act_kernel, act),
        ):
            kernel = triton_kernel(fn, args, kwargs, cc)
            ptx = kernel.asm["ptx"]
            _usage, sass, _loops = disassemble(kernel.asm["cubin"])
            out.append(
                {
                    "kind": kind,
                    "cc": cc,
                    **ptx_checks(ptx),
                    # the old tile: IMAD.MOV.U32 R16, RZ, RZ, -0x80 then STS.128 of it
                    "sass_neg80_movs": sum(1 for t in sass if re.search(r"\bMOV\b.*, -0x80$", t)),
                    # the tile written as four 0x80 bytes per word (0x80808080 = -2139062144)
                    "ptx_0x80808080": len(re.findall(r"(?:-2139062144|0x80808080)\b", ptx)),
                    "ptx_max_nan": len(re.findall(r"\bmax\.NaN\.f32\b", ptx)),
                    "ptx_div_rn": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
                    "ptx_rcp_rn": len(re.findall(r"\brcp\.rn\.f32\b", ptx)),  # the group scale's 1 / denom
                }
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the entries and failures here")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--constants", action="store_true", help="print compiled_constants() as JSON")
    args = parser.parse_args()
    if args.constants:
        json.dump(compiled_constants(), sys.stdout)
        return 0
    entries, bad = gate(tuple(int(r) for r in args.ranks.split(",")))
    for e in entries:
        print(
            f"{e['kind']:4} {e['variant']:24} sm_{e['cc']} rank {e['rank']:3}: BLOCK_R {e['block_r']:2} "
            f"regs {e['regs']:3} spills {e['spill_instrs']} smem {e['shared_bytes']:6} B "
            f"CTAs/SM {e['ctas_per_sm']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"entries": entries, "gates_failed": bad}, indent=1))
    for line in bad:
        print("GATE FAILED:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
