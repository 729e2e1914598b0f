"""Static evidence for quantize_act's prologues (LayerNorm + AdaLN modulation, GELU), no GPU.

Compiles the Triton act kernel's plain, modulation and GELU variants for sm_90 and sm_86 with
Triton's own compiler, through perfmodel's helpers (the launcher's real
arguments captured on meta tensors), and reports registers, spills, SASS per 64-wide group
of every loop (the statistics pass and the quantizing pass) and the narrowest global load.
Then the bytes each call saves against diffusers' unfused path, and what that is in DRAM time
and in the act kernel's modelled time (every time figure MODELLED, not measured).

    python scripts/kernel_model_prologue.py [--json PATH]

Exit status 1 when a variant spills or loads narrower than 8 bytes in a loop.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import engine.kernels.triton_backend as tb
from engine.kernels.triton.act import ACT_CONFIGS
from perfmodel.devices import DEVICES
from perfmodel.launches import _meta, capture
from perfmodel.loops import analyse, opcode_counts
from perfmodel.sass import disassemble, load_bytes, triton_kernel
from perfmodel.shapes import FLUX_M, RANK
from perfmodel.triton_model import model_act

K_MOD, K_GELU = 3072, 12288  # LayerNorm before qkv/fc1; GELU before fc2
VARIANTS = (("plain", K_MOD), ("plain", K_GELU), ("modulation", K_MOD), ("gelu", K_GELU))


def launch(variant: str, m: int, k: int, major: int) -> tuple:
    """(grid, args, kwargs) of the act kernel for one variant, as the backend launches it."""
    x, smooth, down = _meta(m, k), _meta(k), _meta(RANK, k)

    def call():
        if variant == "plain":
            tb.quantize_act(x, smooth, down, group_size=64, unsigned=False, shift=0.0)
        elif variant == "modulation":  # a chunk of the AdaLN linear's output: row stride 6K
            emb = _meta(1, 6 * k)
            tb.quantize_act_prologue(
                x,
                smooth,
                down,
                emb[:, :k],
                emb[:, k : 2 * k],
                group_size=64,
                unsigned=False,
                shift=0.0,
                gelu=False,
            )
        else:
            tb.quantize_act_prologue(
                x, smooth, down, None, None, group_size=64, unsigned=True, shift=0.171875, gelu=True
            )

    return capture("quantize_act_kernel", major, call)


def loops(cubin: bytes) -> list[dict]:
    """Every loop of the kernel: its SASS count and its global loads (bytes per thread)."""
    out = []
    for body in disassemble(cubin)[2]:
        ops = opcode_counts(body)
        loads = [op for op in ops if re.match(r"(LDG|LDGSTS)(\.|$)", op)]
        ld = [load_bytes(op) for op in loads]
        out.append(
            {
                "sass": len(body),
                "global_loads": sum(ops[o] for o in loads),
                "narrowest_load": min(ld, default=0),
                "mma": any(re.search(r"MMA", t) for t in body),
            }
        )
    return [lp for lp in out if lp["global_loads"]]  # the loops over groups (the rest are libdevice's)


def static_report() -> list[dict]:
    rows = []
    for cc in (90, 86):
        for variant, k in VARIANTS:
            _, args, kwargs = launch(variant, FLUX_M, k, cc // 10)
            kernel = triton_kernel(tb.quantize_act_kernel, args, kwargs, cc)
            info = analyse(kernel.asm["cubin"])
            info.update(shared_bytes=kernel.metadata.shared)
            rows.append(
                {
                    "cc": cc,
                    "variant": variant,
                    "k": k,
                    "regs": info["regs"],
                    "stack_bytes": info["stack_bytes"],
                    "spill_instrs": info["spill_instrs"],
                    "main_loop_sass": info["loop_sass"],
                    "loops": loops(kernel.asm["cubin"]),
                    "info": info,
                }
            )
    return rows


def saving(m: int, k: int, variant: str) -> dict:
    """16-bit bytes per call: diffusers' unfused ops then quantize_act, against the fused kernel
    (the codes, scales and lora_act written are the same in both and left out)."""
    x = 2 * m * k
    if variant == "modulation":  # layer_norm r+w, (1 + scale) on [B, K] (negligible), mul r+w, add r+w
        unfused, fused = 2 * x + 2 * x + 2 * x + x, 2 * x  # then quantize_act reads x'; fused: x twice
    else:  # gelu r+w, then quantize_act reads
        unfused, fused = 2 * x + x, x
    saved = unfused - fused
    return {
        "m": m,
        "k": k,
        "variant": variant,
        "unfused_bytes": unfused,
        "fused_bytes": fused,
        "saved_bytes": saved,
        **{f"saved_us_{d.name}": saved / (d.dram_gbs * 1e9) * 1e6 for d in DEVICES},
        "unfused_launches_saved": 3 if variant == "modulation" else 1,
    }


def act_time(rows: list[dict]) -> list[dict]:
    """The act kernel's modelled time per variant (model_act: issue vs DRAM; the statistics
    pass adds one read of x and its loop's SASS), and against it the unfused path: the plain
    kernel at the same K plus the 16-bit ops' DRAM time (saving())."""
    out = []
    for dev in DEVICES:
        cfg = ACT_CONFIGS[dev.cc // 10]
        plain = {}
        for r in rows:
            if r["cc"] != dev.cc:
                continue
            t = model_act(FLUX_M, r["k"], dev, r["info"] | {"loop_sass": r["main_loop_sass"]}, cfg)
            stats = [lp["sass"] for lp in r["loops"] if not lp["mma"]]
            if r["variant"] == "modulation" and stats:
                per_sm = math.ceil(math.ceil(FLUX_M / cfg.block_m) / dev.sms)
                issue = per_sm * (r["k"] // 64) * stats[0] * cfg.num_warps / 4 / (dev.clock_ghz * 1e9)
                t = {
                    **t,
                    "us_issue": t["us_issue"] + issue * 1e6,
                    "us_dram_floor": t["us_dram_floor"] + 2 * FLUX_M * r["k"] / (dev.dram_gbs * 1e9) * 1e6,
                }
                t["us"] = max(t["us_issue"], t["us_dram_floor"])
            entry = {"device": dev.name, "variant": r["variant"], "k": r["k"], **t}
            if r["variant"] == "plain":
                plain[r["k"]] = t["us"]
            else:
                s = saving(FLUX_M, r["k"], r["variant"])
                ops_us = (s["unfused_bytes"] - 2 * FLUX_M * r["k"]) / (dev.dram_gbs * 1e9) * 1e6
                entry["unfused_us"] = plain[r["k"]] + ops_us
                entry["net_saving_us"] = entry["unfused_us"] - t["us"]
            out.append({k: round(v, 1) if isinstance(v, float) else v for k, v in entry.items()})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    rows = static_report()
    report = {
        "static": [{k: v for k, v in r.items() if k != "info"} for r in rows],
        "saving_modelled": [saving(FLUX_M, K_MOD, "modulation"), saving(FLUX_M, K_GELU, "gelu")],
        "act_time_modelled": act_time(rows),
    }
    bad = [f"sm_{r['cc']} {r['variant']}: spills" for r in rows if r["stack_bytes"] or r["spill_instrs"]]
    bad += [
        f"sm_{r['cc']} {r['variant']}: a {lp['narrowest_load']}-byte load in a loop"
        for r in rows
        for lp in r["loops"]
        if lp["narrowest_load"] < 8
    ]
    report["gates_failed"] = bad
    text = json.dumps(report, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 1 if bad else 0
