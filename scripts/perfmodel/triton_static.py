"""The Triton kernels' static report and its gates: every kernel and config compiled for each
arch on FLUX's shapes, the SASS counted; and the W4A16 GEMV's bytes from its own loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import engine.kernels.triton_backend as tb
from engine.kernels.triton.act import ACT_CONFIGS
from engine.kernels.triton.gemm import GEMM_CONFIGS
from engine.kernels.triton.gemv import GEMV_CONFIGS
from perfmodel.launches import act_launch, gemm_launch, gemv_launch
from perfmodel.loops import compile_sass
from perfmodel.shapes import ADALN_SHAPES, FLUX_M, FLUX_SHAPES

SCRIPT = Path(__file__).resolve().parents[1] / "kernel_model_triton.py"  # the command line, for the child
ARCHS = (90, 86, 80)  # sm_80 shares sm_86's configs; compiled for the spill and MMA gates only
MAX_SASS_PER_GROUP_SM90 = 600


# --- gates ---------------------------------------------------------------------------------------


def gemm_configs() -> list[tuple[int, str, object]]:
    return [(cc, name, cfg) for cc in ARCHS for name, cfg in GEMM_CONFIGS[cc // 10].items()]


def _variants(fn, cc: int, launches: dict) -> list[tuple[list, dict]]:
    """Compile each shape's launch; group the shapes that share one specialization."""
    by_key: dict[int, tuple[list, dict]] = {}
    for shape, (_, args, kwargs) in launches.items():
        info = compile_sass(fn, args, kwargs, cc)
        by_key.setdefault(id(info), ([], info))[0].append(list(shape))
    return list(by_key.values())


def static_report() -> dict:
    """Compile every kernel and config for each arch on FLUX's shapes; count the SASS."""
    report: dict = {"gemm": [], "act": [], "gemv": []}
    for cc, name, cfg in gemm_configs():
        for unsigned in (False, True):
            launches = {
                (FLUX_M, k, n): gemm_launch(FLUX_M, k, n, cc // 10, cfg, unsigned) for k, n in FLUX_SHAPES
            }
            for shapes, info in _variants(tb.w4a4_gemm_kernel, cc, launches):
                entry = {"cc": cc, "config": name, **asdict(cfg), "unsigned": unsigned, "shapes": shapes}
                report["gemm"].append(entry | info)
    for cc in ARCHS:
        launches = {(FLUX_M, k): act_launch(FLUX_M, k, cc // 10) for k in sorted({k for k, _ in FLUX_SHAPES})}
        for shapes, info in _variants(tb.quantize_act_kernel, cc, launches):
            report["act"].append({"cc": cc, **asdict(ACT_CONFIGS[cc // 10]), "shapes": shapes, **info})
        for m in (1, 2, 4):
            launches = {(m, k, n): gemv_launch(m, k, n, cc // 10) for k, n in ADALN_SHAPES}
            for shapes, info in _variants(tb.w4a16_gemv_kernel, cc, launches):
                report["gemv"].append(
                    {"cc": cc, "rows": m, **asdict(GEMV_CONFIGS[cc // 10]), "shapes": shapes, **info}
                )
    return report


def gate_failures(report: dict) -> list[str]:
    """The static performance gates; an empty list when all pass."""
    bad = []
    for kind in ("gemm", "act", "gemv"):
        for e in report[kind]:
            tag = f"{kind} sm_{e['cc']} {e.get('config', '')} {e}"[:120]
            if e["stack_bytes"] or e["spill_instrs"]:
                bad.append(f"{tag}: spills ({e['stack_bytes']} B stack, {e['spill_instrs']} STL/LDL)")
    for e in report["gemm"]:
        tag = f"gemm sm_{e['cc']} {e['config']} unsigned={e['unsigned']}"
        if not e["loop_mma"]:
            bad.append(f"{tag}: no int8 MMA in the main loop")
        if e["loop_i2f"]:
            bad.append(f"{tag}: {e['loop_i2f']} I2F in the main loop")
        if e["cc"] == 90 and e["config"] == "large" and e["loop_sass"] > MAX_SASS_PER_GROUP_SM90:
            bad.append(f"{tag}: {e['loop_sass']} SASS per group > {MAX_SASS_PER_GROUP_SM90}")
        if e["loop_ftz"]:
            bad.append(f"{tag}: {e['loop_ftz']} flush-to-zero float ops in the main loop")
        if e["bias_mma"] and not e["loop_mma_acc_off"]:
            bad.append(f"{tag}: bias_mma without an MMA that has its accumulator off")
    for e in report["act"]:
        if e["loop_narrowest_load"] < 8:
            bad.append(
                f"quantize_act sm_{e['cc']}: a {e['loop_narrowest_load']}-byte global load in its loop"
            )
        # two CTA barriers per group: the low-rank operand's trip through shared memory; the
        # scale's store goes straight from the threads that reduced it (no round trip)
        bars = sum(c for op, c in e["loop_ops"].items() if op.startswith("BAR."))
        if bars > 2:
            bad.append(f"quantize_act sm_{e['cc']}: {bars} CTA barriers per group (at most 2)")
    for e in report["gemv"]:
        if e["loop_ops"].get("LDG.E.128", 0) + e["loop_ops"].get("LDGSTS.E.BYPASS.128", 0) == 0:
            bad.append(
                f"w4a16_gemv sm_{e['cc']} rows={e['rows']}: the weight does not load as 16-byte vectors"
            )
    return bad


# --- W4A16 GEMV: bytes from the kernel's own loads (interpreter) -----------------------------------


def gemv_bytes(m: int, k: int, n: int) -> dict:
    """Run the GEMV under the interpreter with its GPU launch config, recording every load's
    addresses: total and unique bytes per tensor. Must run with TRITON_INTERPRET=1."""
    import numpy as np
    from triton.runtime import interpreter

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "x": torch.randn(m, k, generator=gen).bfloat16(),
        "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8),
        "wscales": torch.rand(n, k // 64, generator=gen).bfloat16(),
        "wzeros": torch.rand(n, k // 64, generator=gen).bfloat16(),
        "bias": torch.randn(n, generator=gen).bfloat16(),
    }
    spans = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in tensors.items()}
    seen: dict[str, list] = {name: [] for name in tensors}
    original = interpreter.InterpreterBuilder.create_masked_load

    def recording_load(self, ptrs, mask, *rest):
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        addrs = ptrs.data[live]
        elem = ptrs.dtype.element_ty.primitive_bitwidth // 8
        for name, (lo, hi) in spans.items():
            hit = addrs[(addrs >= lo) & (addrs < hi)].astype(np.int64)
            if hit.size:
                seen[name].append(hit[:, None] + np.arange(elem))  # every byte the load touches
        return original(self, ptrs, mask, *rest)

    saved_cfg = tb.gemv_config
    tb.gemv_config = lambda major: GEMV_CONFIGS[9]  # the GPU launch config, not the interpreter's
    interpreter.InterpreterBuilder.create_masked_load = recording_load
    try:
        y = tb.w4a16_gemv(*tensors.values())
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original
        tb.gemv_config = saved_cfg
    err = (y.float() - _gemv_reference(tensors).float()).abs().max().item()
    out = {"shape": [m, k, n], "max_abs_err_vs_reference": err}
    for name, hits in seen.items():
        loaded = sum(h.size for h in hits)
        unique = np.unique(np.concatenate([h.ravel() for h in hits])).size if hits else 0
        out[name] = {
            "bytes": tensors[name].numel() * tensors[name].element_size(),
            "loaded": int(loaded),
            "unique": int(unique),
        }
    return out


def _gemv_reference(t: dict) -> torch.Tensor:
    from engine.kernels import reference

    return reference.w4a16_gemv(t["x"], t["qweight"], t["wscales"], t["wzeros"], t["bias"])


def gemv_bytes_subprocess(m: int, k: int, n: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = [sys.executable, str(SCRIPT), "--gemv-bytes-child", f"{m},{k},{n}"]
    res = subprocess.run(code, env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout)
