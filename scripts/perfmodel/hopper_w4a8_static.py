"""The W4A8 sm_90 GEMM (engine/kernels/triton/gemm_sm90_w4a8.py, Gluon) compiled for sm_90 without
a GPU, and its loops counted from the SASS: what the W4A8 model (perfmodel.hopper_w4a8) and the
static gates (tests/test_w4a8_gemm_static.py) read.

    python scripts/perfmodel/hopper_w4a8_static.py [consumers block_t consumer_regs]   (prints JSON)

ptxas is also run on the PTX by hand (``ptxas_report``) for its register count and warnings:
C7512 ("wgmma serialized ... insufficient register resources") is its answer to register
pressure, which the SASS shows as extra wgmma waits.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository and scripts/ on the path
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from engine.kernels.triton import gemm_sm90_w4a8 as w4a8
from perfmodel.chain import MACS_PER_CLK
from perfmodel.hopper_ws import _innermost, compile_gluon, ops_of
from perfmodel.launches import _meta
from perfmodel.sass import _TYPES, BIN, disassemble
from perfmodel.shapes import RANK

_TYPES.setdefault(torch.float8_e4m3fn, "fp8e4nv")
_COMPILED: dict[tuple, dict] = {}


def w4a8_launch(m: int, k: int, n: int, cfg: w4a8.W4A8Config = w4a8.CONFIG, rank: int = RANK,
                bias: bool = True, out_dtype: torch.dtype = torch.bfloat16, programs: int | None = None,
                split: w4a8.Split | None = None) -> tuple:
    """(args, kwargs, grid) of the Gluon kernel as its launcher builds them, on meta tensors
    (``programs``: the persistent grid's CTAs, e.g. an H100's 132; the compiled code is the same;
    ``split``: the K-sliced grid and its workspace)."""
    g = k // 64
    weight = w4a8.W4A8Weight(_meta(n, k // 2, dtype=torch.uint8), _meta(g, n, dtype=torch.float32))
    tiles = -(-m // cfg.block_t) * -(-n // cfg.block_w)
    space = None
    if split is not None:
        space = _meta(*w4a8.workspace_shape(tiles, split, cfg.block_w, cfg.block_t), dtype=torch.float32)
    return w4a8.launch_args(
        _meta(m, k, dtype=torch.float8_e4m3fn),
        _meta(m, dtype=torch.float32),
        weight,
        _meta(m, rank, dtype=torch.float32),
        _meta(n, rank),
        _meta(n) if bias else None,
        _meta(m, n, dtype=out_dtype),
        cfg,
        programs,
        split,
        space,
    )


def compile_w4a8(m: int, k: int, n: int, cfg: w4a8.W4A8Config = w4a8.CONFIG, rank: int = RANK,
                 bias: bool = True, out_dtype: torch.dtype = torch.bfloat16, split: w4a8.Split | None = None):
    """The compiled kernel (triton's CompiledKernel) for sm_90 at this problem (``split``: its
    K-sliced variant)."""
    args, kwargs, _ = w4a8_launch(m, k, n, cfg, rank, bias, out_dtype, split=split)
    return compile_gluon(w4a8.w4a8_gemm_sm90_kernel, args, kwargs)


def ptxas_report(ptx: str) -> dict:
    """ptxas -v on the PTX for sm_90a: registers, spill bytes and the C7512 warnings."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(BIN / "ptxas"), "-v", "-arch=sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)  # fmt: skip
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {
        "ptxas_rc": res.returncode,
        "ptxas_regs": int(regs.group(1)) if regs else None,
        "ptxas_spill_bytes": sum(spills),
        "ptxas_c7512": len(re.findall(r"C7512", text)),
        "ptxas_warnings": [t for t in text.splitlines() if "warning" in t.lower()][:8],
    }


def group_bytes(cfg: w4a8.W4A8Config) -> int:
    """TMA bytes per group and CTA: packed weights (0.5 B/elem), e4m3 codes (1 B/elem), the
    weight scales."""
    return cfg.block_w * 32 + cfg.block_t * 64 + 4 * cfg.block_w


def w4a8_static(m: int, k: int, n: int, cfg: w4a8.W4A8Config = w4a8.CONFIG, rank: int = RANK,
                bias: bool = True, out_dtype: torch.dtype = torch.bfloat16, ptxas: bool = False,
                split: w4a8.Split | None = None) -> dict:
    """Registers, spills, shared memory and the consumer's and producer's loops of one compile
    (per group and consumer warp: the SASS of the consumer loop; ``ptxas``: also ptxas -v;
    ``split``: the K-sliced variant, whose loop must be the same)."""
    key = (m, k, n, cfg, rank, bias, out_dtype, ptxas, split)
    if key in _COMPILED:
        return _COMPILED[key]
    kernel = compile_w4a8(m, k, n, cfg, rank, bias, out_dtype, split)
    usage, instrs, loops = disassemble(kernel.asm["cubin"])
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    cons = _innermost(loops, r"\bQGMMA")
    # each consumer partition has its own copy of the loop (different register budgets): all of them
    group_loops = [b for b in loops if any("QGMMA" in t for t in b) and len(b) < 2 * len(cons)]
    copies = sorted(len(b) for b in group_loops)
    prod = _innermost(loops, r"\bUTMALDG")
    cops, pops = ops_of(cons), ops_of(prod)
    ptx = kernel.asm["ptx"]
    elems = 64 * cfg.block_t // 128  # accumulator elements per consumer thread
    e = {
        "m": m,
        "k": k,
        "n": n,
        "config": dataclasses.asdict(cfg) | {"block_w": cfg.block_w},
        "split": dataclasses.astuple(split) if split else None,
        "acc_elems_per_thread": elems,
        "regs": regs,
        "stack_bytes": stack,
        "spill_instrs": sum(1 for t in instrs if re.search(r"\b(STL|LDL)\b", t)),
        # in the group loops (every consumer copy and the producer's): the split variant's gate
        "group_loop_spill_instrs": sum(1 for b in [*group_loops, _innermost(loops, r"\bUTMALDG")] for t in b
                                       if re.search(r"\b(STL|LDL)\b", t)),
        "shared_bytes": kernel.metadata.shared,
        "threads": int(re.search(r"\.reqntid (\d+)", ptx).group(1)),
        "setmaxnreg": sorted({int(x) for x in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        "consumer_sass": len(cons),
        "consumer_loop_copies_sass": copies,
        "producer_sass": len(prod),
        "consumer_ops": dict(cops.most_common()),
        "producer_ops": dict(pops.most_common()),
        "loop_ffma": cops.get("FFMA", 0),
        "loop_fp32": sum(c for op, c in cops.items() if op.split(".")[0] in ("FFMA", "FMUL", "FADD")),
        "loop_mma_waits": cops.get("WARPGROUP.DEPBAR.LE", 0),
        "loop_wait_pending": [int(t.rsplit(",", 1)[1], 16) for t in cons if "WARPGROUP.DEPBAR.LE" in t],
        "loop_warpgroup_arrives": sum(c for op, c in cops.items() if op.startswith("WARPGROUP.ARRIVE")),
        "loop_bar_sync": sum(c for op, c in cops.items() if op.startswith("BAR.SYNC")),
        "loop_bar_threads": sorted({t.split(",")[1].strip() if "," in t else "all" for t in cons if "BAR.SYNC" in t}),
        "loop_qgmma": sum(c for op, c in cops.items() if op.startswith("QGMMA")),
        "loop_mbar_waits": sum(c for op, c in cops.items() if op.startswith("SYNCS.PHASECHK")),
        "loop_mbar_arrives": sum(c for op, c in cops.items() if op.startswith("SYNCS.ARRIVE")),
        "loop_shared_loads": sum(c for op, c in cops.items() if op.startswith(("LDS", "LDSM"))),
        "loop_shared_stores": sum(c for op, c in cops.items() if op.startswith(("STS", "STSM"))),
        "producer_tma": sum(c for op, c in pops.items() if op.startswith("UTMALDG")),
        "group_bytes": group_bytes(cfg),
        "tensor_clocks_per_group": cfg.consumers * 64 * cfg.block_t * 64 // MACS_PER_CLK["fp8"],
        "body": cons,
        "producer_body": prod,
    }
    if ptxas:
        e |= ptxas_report(ptx)
    _COMPILED[key] = e
    return e


def gate_failures(e: dict) -> list[str]:
    """What the loop must hold per group and consumer warp (tests/test_w4a8_gemm_static.py)."""
    tag = f"{e['config']}"
    bad = []
    if e["loop_ffma"] != e["acc_elems_per_thread"] or e["loop_fp32"] != e["loop_ffma"]:
        bad.append(f"{tag}: {e['loop_fp32']} fp32 ops ({e['loop_ffma']} FFMA), not one FFMA per element")
    if e["loop_mma_waits"] != 1 or e["loop_wait_pending"] != [0]:
        bad.append(f"{tag}: MMA waits {e['loop_wait_pending']} per group, not one (ptxas serialized the wgmmas?)")
    if e["loop_qgmma"] != 2:
        bad.append(f"{tag}: {e['loop_qgmma']} QGMMA per group, not 2")
    if e["loop_mbar_waits"] != 1 or e["loop_mbar_arrives"] != 1:
        bad.append(f"{tag}: mbarrier waits/arrives {e['loop_mbar_waits']}/{e['loop_mbar_arrives']}, not 1/1")
    if e["loop_bar_threads"] not in ([], ["0x80"]) or e["loop_bar_sync"] > 2:
        bad.append(f"{tag}: barriers {e['loop_bar_sync']} over {e['loop_bar_threads']} (not one warpgroup's)")
    if e["loop_shared_stores"]:
        bad.append(f"{tag}: {e['loop_shared_stores']} shared stores in the loop")
    if e["stack_bytes"] or e["spill_instrs"]:
        bad.append(f"{tag}: spills ({e['stack_bytes']} stack bytes, {e['spill_instrs']} STL/LDL)")
    if e["producer_tma"] != 2 * e["config"]["consumers"] + 2:
        bad.append(f"{tag}: the producer issues {e['producer_tma']} TMA loads per group, not 2 x consumers + 2")
    return bad


def main(argv: list[str]) -> int:
    cfgs = [w4a8.CONFIG]
    if argv:
        c, t, r = (int(x) for x in argv[:3])
        cfgs = [w4a8.W4A8Config(consumers=c, block_t=t, consumer_regs=r)]
    out = []
    for cfg in cfgs:
        e = w4a8_static(4352, 3072, 3072, cfg, ptxas=True)
        out.append({key: v for key, v in e.items() if key not in ("body", "producer_body")}
                   | {"gates": gate_failures(e)})  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
