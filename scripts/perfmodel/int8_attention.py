"""Static figures of our int8 attention kernel (engine/kernels/triton/attention.py) against
SageAttention 1.0.6's own kernel, both compiled by Triton for sm_86 and sm_90 without a GPU.

    python scripts/kernel_model_int8_attention.py [--json PATH]

Both launches are captured on meta tensors at FLUX's shape (256 text + 4096 image tokens, 24
heads, D = 128; and D = 64), the package's from its ``forward`` with an fp16 V, ours from its
launcher with V as bf16 column slices of the q|k|v projections (one part: the single block's
projection; two: the double block's text and image projections, joined at a key-block
boundary; and joined inside a block). Per kernel: registers, spills, shared memory, SASS per
main-loop iteration (one block of 64 keys) and its MMAs. What V in place costs: the loop's extra
instructions per PV MMA, against the conversion's own count: three instructions per pair of
elements, each element converted once per CTA (in the load's layout; the fp16 tile goes through
shared memory to the dot). Converted in the PV dot's operand layout instead, as Triton does with
a cast or a pure inline asm, every warp would convert the whole [64, D] tile (on sm_86, where the
warps split the queries only): ``per_warp`` below, 6 per PV MMA at D = 128.

Gates (exit status 1): no spills; shared memory within what a block gets (99 KB on sm_86, 227 KB
on sm_90); ours with the package's MMAs per iteration; on sm_86 the extra instructions per PV
MMA at most the once-per-CTA conversion's count plus one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

import torch

from perfmodel.launches import _Recorder
from perfmodel.loops import compile_sass
from perfmodel.sass import _TYPES

S_TXT, S_IMG, HEADS = 256, 4096, 24
ARCHS = (86, 90)
HEAD_DIMS = (128, 64)
_TYPES.setdefault(torch.int8, "i8")


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def capture(d: int, major: int, s_txt: int = S_TXT, s_img: int = S_IMG, heads: int = HEADS) -> dict:
    """{name: (kernel, args, kwargs)}: the package's launch and ours as a GPU of compute
    capability ``major`` gets it (one V part; two joined at a block boundary; two joined inside
    a block)."""
    import sageattention.attn_qk_int8_per_block as sage_mod

    import engine.kernels.triton.attention as ours

    s = s_txt + s_img
    qk8 = (_meta(1, s, heads, d, dtype=torch.int8), _meta(1, s, heads, d, dtype=torch.int8))
    scales = (
        _meta(1, heads, -(-s // 128), 1, dtype=torch.float32),
        _meta(1, heads, -(-s // 64), 1, dtype=torch.float32),
    )
    rec = _Recorder()
    sage_mod._attn_fwd = rec
    try:
        sage_mod.forward(qk8[0], qk8[1], _meta(1, s, heads, d, dtype=torch.float16), scales[0], scales[1],
                         tensor_layout="NHD", output_dtype=torch.bfloat16)  # fmt: skip
    finally:
        sage_fn = importlib.reload(sage_mod)._attn_fwd

    def v_of(n: int, width: int) -> torch.Tensor:  # V as the column slice of a projection output
        return _meta(1, n, width)[..., 2 * heads * d : 3 * heads * d].unflatten(-1, (heads, d))

    hd3 = 3 * heads * d
    ours_rec, fn, arch = _Recorder(), ours.int8_attention_kernel, ours._major
    ours.int8_attention_kernel, ours._major = ours_rec, lambda device: major
    try:
        for parts in ([v_of(s, hd3 + 4 * heads * d)], [v_of(s_txt, hd3), v_of(s_img, hd3)],
                      [v_of(s_txt + 13, hd3), v_of(s_img - 13, hd3)]):  # fmt: skip
            ours.int8_attention(*qk8[:1], scales[0], qk8[1], scales[1], parts[0], parts[1] if len(parts) > 1 else None,
                                out_dtype=torch.bfloat16)  # fmt: skip
    finally:
        ours.int8_attention_kernel, ours._major = fn, arch
    (_, sage_args, sage_kw), *mine = [(None, *c[1:]) for c in rec.calls + ours_rec.calls]
    names = ("ours, one V part", "ours, two V parts", "ours, two V parts joined inside a block")
    return {"sage": (sage_fn, sage_args, sage_kw)} | {
        n: (fn, args, kw) for n, (_, args, kw) in zip(names, mine, strict=True)
    }


def _pv_mma(ops: dict, cc: int) -> int:
    pattern = r"HGMMA" if cc >= 90 else r"HMMA\.16816\.F16"
    return sum(c for op, c in ops.items() if re.match(pattern, op))


def _mma_counts(ops: dict) -> dict:
    return {op: c for op, c in ops.items() if re.match(r"(IMMA|HMMA|IGMMA|HGMMA)", op)}


def static_report(head_dims: tuple[int, ...] = HEAD_DIMS) -> list[dict]:
    """Every kernel compiled for every arch and head dim: registers, spills, the loop."""
    out = []
    for d in head_dims:
        for cc in ARCHS:
            launches = capture(d, cc // 10)
            base = None
            for name, (fn, args, kwargs) in launches.items():
                e = compile_sass(fn, args, kwargs, cc)
                ops = e["loop_ops"]
                row = {
                    "cc": cc,
                    "d": d,
                    "kernel": name,
                    "num_warps": kwargs["num_warps"],
                    "regs": e["regs"],
                    "stack_bytes": e["stack_bytes"],
                    "spill_instrs": e["spill_instrs"],
                    "shared_bytes": e["shared_bytes"],
                    "loop_sass": e["loop_sass"],
                    "mma": _mma_counts(ops),
                    "pv_mma": _pv_mma(ops, cc),
                    "cvt_ops": {
                        op: c for op, c in ops.items() if re.match(r"(F2FP|PRMT|LOP3|SHF\.L|IMAD\.U32)", op)
                    },
                }
                if base is None:
                    base = row
                else:
                    row["extra_per_iteration"] = row["loop_sass"] - base["loop_sass"]
                    row["extra_per_pv_mma"] = round(row["extra_per_iteration"] / max(row["pv_mma"], 1), 2)
                out.append(row)
    return out


SHARED_LIMIT = {86: 101376, 90: 232448}  # bytes of shared memory one block may use (opt-in maximum)


def conversion_per_pv_mma(d: int, num_warps: int, per_warp: bool = False) -> float:
    """sm_86: instructions per PV MMA of converting V (3 per pair of elements), each element once
    per CTA, or (``per_warp``) the whole [64, D] tile by every warp (the P rows split over warps,
    V's columns not)."""
    pairs = 64 * d // 2 // 32 // (1 if per_warp else num_warps)  # per lane per key block
    mmas = (128 // num_warps // 16) * (d // 8) * (64 // 16)  # m16n8k16 per warp per key block
    return 3 * pairs / mmas


def gate_failures(report: list[dict]) -> list[str]:
    bad = []
    sage = {(e["cc"], e["d"]): e for e in report if e["kernel"] == "sage"}
    for e in report:
        tag = f"{e['kernel']} D={e['d']} sm_{e['cc']}"
        if e["stack_bytes"] or e["spill_instrs"]:
            bad.append(f"{tag}: spills")
        if e["shared_bytes"] > SHARED_LIMIT[e["cc"]]:
            bad.append(f"{tag}: {e['shared_bytes']} B of shared memory > {SHARED_LIMIT[e['cc']]}")
        if e["kernel"] == "sage":
            continue
        if e["mma"] != sage[e["cc"], e["d"]]["mma"]:
            bad.append(f"{tag}: MMAs {e['mma']} where the package's loop has {sage[e['cc'], e['d']]['mma']}")
        if e["cc"] == 86 and "inside" not in e["kernel"]:
            bound = conversion_per_pv_mma(e["d"], e["num_warps"]) + 1
            if e["extra_per_pv_mma"] > bound:
                bad.append(f"{tag}: {e['extra_per_pv_mma']} extra instructions per PV MMA > {bound}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS), choices=HEAD_DIMS)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this script compiles the kernels for GPU targets")
    static = static_report(tuple(args.head_dims))
    report = {"static": static, "gates_failed": gate_failures(static)}
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 1 if report["gates_failed"] else 0
