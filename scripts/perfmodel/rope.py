"""Static figures of the qk_norm_rope Triton kernel at FLUX's shape, without a GPU.

    python scripts/kernel_model_rope.py [--json PATH]

1. Compiled for sm_90 and sm_86 by Triton's own compiler (perfmodel's helpers, with the
   arguments the launcher really passes, captured on meta tensors, and its
   ``enable_fp_fusion=False``): registers, spills, the global load and store widths, FFMA count (must be 0: the arithmetic rounds every product like torch's eager
   ops), for a double block (text 512 + image 4096 tokens, q|k|v = [B, S, 9216]) and a single
   block (one part, q|k|v the first 9216 of 21504 columns).
2. Bytes: what the kernel moves per call (from its launch geometry) against the minimum (q, k,
   v read once, written once, cos/sin once), and the MODELLED DRAM time at 3.35 TB/s (H100 SXM)
   and 0.70 TB/s (A40): minimum bytes / bandwidth, assuming the cos/sin tile of a token block,
   read by its H programs in a row, is served from L2 after the first.
3. Checked from the kernel's own accesses (interpreter, GPU launch config, a reduced shape):
   every q/k/v byte of the projection output is loaded exactly once, the columns after them
   never, every output byte stored exactly once.
4. ``qk_norm_rope_sage`` (SageAttention's preparation folded in): both launches compiled the same
   way (registers, spills, widths), and its bytes against qk_norm_rope + sageattn's own passes.

Exit status 1 when a gate fails (spills, FFMA, loads or stores narrower than 16 bytes, a byte
not read or written exactly once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from perfmodel.devices import ROPE_BANDWIDTH
from perfmodel.loops import analyse
from perfmodel.sass import disassemble, load_bytes, specialize

B, S_TXT, S_IMG, HEADS, DIM = 1, 512, 4096, 24, 128
SINGLE_EXTRA = 12288  # a single block's proj_mlp columns after q | k | v
SCRIPT = Path(__file__).resolve().parents[1] / "kernel_model_rope.py"  # the command line, for the child
ARCHS = (90, 86)


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _inputs(single: bool, device: str = "meta", s_txt: int = S_TXT, s_img: int = S_IMG, heads: int = HEADS):
    hd3 = 3 * heads * DIM
    if device == "meta":
        t = _meta
    else:
        gen = torch.Generator().manual_seed(0)

        def t(*shape, dtype=torch.bfloat16):
            return torch.randn(*shape, generator=gen).to(dtype)

    w = [t(DIM) for _ in range(4)]
    if single:
        qkv = t(B, s_txt + s_img, hd3 + SINGLE_EXTRA)[..., :hd3]
        parts = [qkv, w[0], w[1], None, None, None]
    else:
        parts = [t(B, s_txt, hd3), w[0], w[1], t(B, s_img, hd3), w[2], w[3]]
    cs = [t(s_txt + s_img, DIM, dtype=torch.float32) for _ in range(2)]
    return parts, cs


def capture(single: bool, major: int) -> tuple:
    """(grid, args, kwargs) of the launch the launcher makes at FLUX's shape on ``major``."""
    import engine.kernels.triton.rope as tr
    from perfmodel.launches import _Recorder

    rec, saved = _Recorder(), (tr.qk_norm_rope_kernel, tr._major)
    tr.qk_norm_rope_kernel, tr._major = rec, (lambda device: major)
    try:
        parts, (cos, sin) = _inputs(single)
        tr.qk_norm_rope(*parts, cos, sin, heads=HEADS, eps=1e-6)
    finally:
        tr.qk_norm_rope_kernel, tr._major = saved
    (launch,) = rec.calls
    return launch


def capture_sage(single: bool, major: int) -> dict:
    """{kernel name: (grid, args, kwargs)} of qk_norm_rope_sage's two launches at FLUX's shape."""
    import engine.kernels.triton.rope as tr
    from perfmodel.launches import _Recorder

    names = ("qk_norm_rope_sage_kernel", "sage_k_quant_kernel")
    recs = {n: _Recorder() for n in names}
    saved = {n: getattr(tr, n) for n in names}, tr._major
    for n in names:
        setattr(tr, n, recs[n])
    tr._major = lambda device: major
    try:
        parts, (cos, sin) = _inputs(single)
        tr.qk_norm_rope_sage(*parts, cos, sin, heads=HEADS, eps=1e-6)
    finally:
        for n in names:
            setattr(tr, n, saved[0][n])
        tr._major = saved[1]
    return {n: recs[n].calls[0] for n in names}


def _compiled_counts(fn, args: tuple, kwargs: dict, cc: int) -> dict:
    """Compile ``fn`` for sm_<cc> with the launch's arguments; registers, spills, access widths."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    fusion = kwargs.pop("enable_fp_fusion", True)
    sig, const, attrs, options = specialize(fn, args, kwargs)
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", cc, 32),
        options={**options, "enable_fp_fusion": fusion},
    )
    info = analyse(kernel.asm["cubin"])
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in disassemble(kernel.asm["cubin"])[1]]
    return {"info": info, "ops": ops, "options": options}


def compile_sage_report(single: bool, cc: int) -> list[dict]:
    """qk_norm_rope_sage's two kernels compiled for sm_<cc>: registers, spills, SASS, widths."""
    import engine.kernels.triton.rope as tr

    out = []
    for name, (grid, args, kwargs) in capture_sage(single, cc // 10).items():
        c = _compiled_counts(getattr(tr, name), args, kwargs, cc)
        ops, info = c["ops"], c["info"]
        out.append(
            {
                "kernel": name,
                "variant": "single block (1 part, strided)" if single else "double block (2 parts)",
                "cc": cc,
                "grid": list(grid),
                "num_warps": c["options"]["num_warps"],
                "regs": info["regs"],
                "stack_bytes": info["stack_bytes"],
                "spill_instrs": info["spill_instrs"],
                "sass": len(ops),
                "narrowest_load": min(load_bytes(op) for op in ops if re.match(r"LDG(\.|$)", op)),
                "narrowest_store": min(load_bytes(op) for op in ops if re.match(r"STG(\.|$)", op)),
                "ffma": sum(op.startswith("FFMA") for op in ops),
            }
        )
    return out


def sage_bytes(
    s: int = S_TXT + S_IMG, heads: int = HEADS, dim: int = DIM, batch: int = B, elt: int = 2
) -> dict:
    """DRAM bytes of one attention's preparation: qk_norm_rope_sage's two launches against
    qk_norm_rope followed by sageattn's passes (engine.flux.attention.sage_attention). Minimum
    traffic of each launch (every tensor read or written once; the per-block sums and scales
    included), ``elt``-byte q|k|v in (the image model prices its traced ops with this). V is
    neither read nor written by the fused launches: the int8 attention reads it from the
    projection (kernels.sage_attention_int8), the same bytes it read from sage's fp16 copy."""
    t = batch * s * heads * dim  # elements of one of q, k, v
    nbq, nbk = -(-s // 128), -(-s // 64)
    tables = 2 * s * dim * 4
    sums = batch * heads * nbq * dim * 4
    # q|k and the tables in; q8, its scales, k (elt), the sums out
    fused_rope = 2 * elt * t + tables + t + batch * heads * nbq * 4 + elt * t + sums
    fused_k = elt * t + sums + t + batch * heads * nbk * 4  # k and the sums in, k8 and its scales out
    plain_rope = 3 * elt * t + tables + 3 * elt * t
    # sageattn's passes: k.mean (read k), k - mean (read, write), v to fp16 (read, write 2 B), Q and
    # K to int8 (read, write 1 B each)
    sage_passes = elt * t + 2 * elt * t + (elt + 2) * t + 2 * (elt * t + t)
    return {
        "v_copy": (elt + 2) * t,  # what the rope launch moved when it wrote sage's fp16 copy of V
        "fused_rope_sage": fused_rope,
        "fused_k_quant": fused_k,
        "fused_total": fused_rope + fused_k,
        "unfused_total": plain_rope + sage_passes,
        "unfused_rope": plain_rope,
        "unfused_sage_passes": sage_passes,
    }


def compile_report(single: bool, cc: int) -> dict:
    """Compile one variant for sm_<cc> and read its SASS."""
    import engine.kernels.triton.rope as tr

    grid, args, kwargs = capture(single, cc // 10)
    c = _compiled_counts(tr.qk_norm_rope_kernel, args, kwargs, cc)
    info, ops, options = c["info"], c["ops"], c["options"]
    loads = [load_bytes(op) for op in ops if re.match(r"LDG(\.|$)", op)]
    stores = [load_bytes(op) for op in ops if re.match(r"STG(\.|$)", op)]
    return {
        "variant": "single block (1 part, strided)" if single else "double block (2 parts)",
        "cc": cc,
        "grid": list(grid),
        "block_s": kwargs["BLOCK_S"],
        "num_warps": options["num_warps"],
        "regs": info["regs"],
        "stack_bytes": info["stack_bytes"],
        "spill_instrs": info["spill_instrs"],
        "sass": len(ops),
        "ldg": len(loads),
        "stg": len(stores),
        "narrowest_load": min(loads),
        "narrowest_store": min(stores),
        "ffma": sum(op.startswith("FFMA") for op in ops),
        "mufu_rsq": sum(op.startswith("MUFU.RSQ") for op in ops),
    }


def bytes_model(block_s: int) -> dict:
    """Bytes per call at FLUX's double-block shape: the kernel's (launch geometry) vs the minimum."""
    s, elt = S_TXT + S_IMG, 2
    qkv = B * s * 3 * HEADS * DIM * elt
    programs = HEADS * B * (-(-S_TXT // block_s) + -(-S_IMG // block_s))
    rope_tables = 2 * s * DIM * 4
    minimum = 2 * qkv + rope_tables + 4 * DIM * elt
    requested = 2 * qkv + HEADS * B * rope_tables + programs * 2 * DIM * elt  # L2 requests
    out = {
        "qkv_in_bytes": qkv,
        "qkv_out_bytes": qkv,
        "cos_sin_bytes": rope_tables,
        "minimum_bytes": minimum,
        "dram_bytes_modelled": minimum,
        "l2_request_bytes": requested,
        "programs": programs,
    }
    for name, bw in ROPE_BANDWIDTH.items():
        out[f"modelled_us {name}"] = minimum / bw * 1e6
    return out


def access_check(s_txt: int = 40, s_img: int = 72, heads: int = 3) -> dict:
    """Every load and store of the kernel recorded under the interpreter (GPU launch config):
    bytes of each tensor touched, and how often. Must run with TRITON_INTERPRET=1."""
    import numpy as np
    from triton.runtime import interpreter

    import engine.kernels.triton.rope as tr
    from engine.quant.ops import qk_norm_rope as reference_qk_norm_rope

    out: dict = {}
    for single in (False, True):
        parts, (cos, sin) = _inputs(single, "cpu", s_txt, s_img, heads)
        bases = {"part0": parts[0], "part1": parts[3]} if not single else {"part0": parts[0]}
        spans = {n: (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for n, t in bases.items()}
        loads: list = []
        stores: list = []
        orig_load, orig_store = (
            interpreter.InterpreterBuilder.create_masked_load,
            interpreter.InterpreterBuilder.create_masked_store,
        )

        def rec(into, ptrs, mask):
            live = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
            elem = ptrs.dtype.element_ty.primitive_bitwidth // 8
            into.append((ptrs.data[live].astype(np.int64)[:, None] + np.arange(elem)).ravel())

        def load(self, ptrs, mask, *rest, _into=loads, _orig=orig_load):
            rec(_into, ptrs, mask)
            return _orig(self, ptrs, mask, *rest)

        def store(self, ptrs, value, mask, *rest, _into=stores, _orig=orig_store):
            rec(_into, ptrs, mask)
            return _orig(self, ptrs, value, mask, *rest)

        saved_cfg = tr.rope_config
        tr.rope_config = lambda major: tr.ROPE_CONFIGS[9]
        interpreter.InterpreterBuilder.create_masked_load = load
        interpreter.InterpreterBuilder.create_masked_store = store
        try:
            q, k, v = tr.qk_norm_rope(*parts, cos, sin, heads=heads, eps=1e-6)
        finally:
            interpreter.InterpreterBuilder.create_masked_load = orig_load
            interpreter.InterpreterBuilder.create_masked_store = orig_store
            tr.rope_config = saved_cfg
        loaded = np.concatenate(loads)
        stored = np.concatenate(stores)
        res: dict = {"shape": [B, s_txt, s_img, heads, DIM]}
        for name, t in bases.items():
            base, nbytes = spans[name]
            hit = loaded[(loaded >= base) & (loaded < base + nbytes)] - base
            width = 3 * heads * DIM * 2  # bytes of q | k | v per token
            row = t.stride(1) * 2
            in_qkv = (hit % row) < width
            counts = np.bincount(hit[in_qkv], minlength=nbytes)
            want = np.zeros(nbytes, dtype=bool)
            tokens = t.shape[1]
            for tok in range(tokens):
                want[tok * row : tok * row + width] = True
            res[name] = {
                "qkv_bytes": int(want.sum()),
                "each_loaded_once": bool((counts[want] == 1).all()),
                "bytes_loaded_outside_qkv": int((~in_qkv).sum()),
            }
        outs = {"q": q, "k": k, "v": v}
        for name, t in outs.items():
            base, nbytes = t.data_ptr(), t.numel() * t.element_size()
            hit = stored[(stored >= base) & (stored < base + nbytes)] - base
            res[f"{name}_out"] = {
                "bytes": nbytes,
                "each_stored_once": bool((np.bincount(hit, minlength=nbytes) == 1).all()),
            }
        ref = reference_qk_norm_rope(*parts, cos, sin, heads=heads, eps=1e-6)
        res["v_equal_reference"] = bool(torch.equal(v, ref[2]))
        out["single" if single else "double"] = res
    return out


def gate_failures(static: list[dict], access: dict) -> list[str]:
    bad = []
    for e in static:
        tag = f"{e['variant']} sm_{e['cc']}"
        if e["stack_bytes"] or e["spill_instrs"]:
            bad.append(f"{tag}: spills")
        if e["ffma"]:
            bad.append(f"{tag}: {e['ffma']} FFMA (products must round before the sum)")
        if e["narrowest_load"] < 16 or e["narrowest_store"] < 16:
            bad.append(f"{tag}: narrowest load {e['narrowest_load']} B, store {e['narrowest_store']} B")
    for variant, res in access.items():
        for name, r in res.items():
            if isinstance(r, dict) and not all(
                r.get(k, True) for k in ("each_loaded_once", "each_stored_once")
            ):
                bad.append(f"access {variant} {name}: {r}")
            if isinstance(r, dict) and r.get("bytes_loaded_outside_qkv"):
                bad.append(f"access {variant} {name}: loads outside q|k|v")
    return bad


def sage_gate_failures(static: list[dict]) -> list[str]:
    """qk_norm_rope_sage's kernels: no spills; the rope launch without FFMA (its products round
    like the plain op's) and with 16-byte loads (its scalar scale and sum stores are 4 bytes)."""
    bad = []
    for e in static:
        tag = f"{e['kernel']} {e['variant']} sm_{e['cc']}"
        if e["stack_bytes"] or e["spill_instrs"]:
            bad.append(f"{tag}: spills")
        if e["kernel"] == "qk_norm_rope_sage_kernel" and (e["ffma"] or e["narrowest_load"] < 16):
            bad.append(f"{tag}: {e['ffma']} FFMA, narrowest load {e['narrowest_load']} B")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--access-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.access_child:
        json.dump(access_check(), sys.stdout)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this script compiles the kernel for GPU targets")
    static = [compile_report(single, cc) for cc in ARCHS for single in (False, True)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run(
        [sys.executable, str(SCRIPT), "--access-child"], env=env, capture_output=True, text=True, timeout=1200
    )
    if child.returncode:
        raise RuntimeError(child.stderr[-3000:])
    access = json.loads(child.stdout)
    sage = [e for cc in ARCHS for single in (False, True) for e in compile_sage_report(single, cc)]
    report = {
        "static": static,
        "bytes": bytes_model(static[0]["block_s"]),
        "access": access,
        "sage_static": sage,
        "sage_bytes": sage_bytes(),
    }
    report["gates_failed"] = gate_failures(static, access) + sage_gate_failures(sage)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 1 if report["gates_failed"] else 0
