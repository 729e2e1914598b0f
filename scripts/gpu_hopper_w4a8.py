"""Measure Hopper's W4A8 route at FLUX's shapes against cuBLAS bf16 (run first by
scripts/gpu_hopper_gemm.py, gpu_session.sh's ``hopper_gemm`` part, or alone).

For each K -> N at M = 4352: the GEMM's (engine/kernels/triton/gemm_sm90_w4a8.py) error against
the definer ``ops.w4a8_gemm`` on codes from ``ops.quantize_act_fp8`` of random activations (the
rank-32 branch and bias included), the equality of two runs, its time (bf16 output, and fp32 as
the route launches it before the epilogue), its TFLOPS; the quantizer's (triton/act_fp8.py)
codes and scales against ``ops.quantize_act_fp8`` and its time; the whole linear as the triton
backend serves it (quantize_act_fp8 + w4a8_gemm) and its ratio to torch's bf16 matmul (cuBLAS)
of the same [M, K] x [K, N], the figure issue 27 asks for; where ``gemm_sm90_w4a8.plan`` splits
the last wave at the device's SM count, the split GEMM's error, determinism and time; first the
GEMM's own device self-checks (``gemm_sm90_w4a8.self_check``, plain and split grids: exact
inputs, bit for bit).

    python scripts/gpu_hopper_w4a8.py --out $OUT/hopper_w4a8.json   # on an H100/H200
    python scripts/gpu_hopper_w4a8.py --tiny --out x.json           # CPU: the inputs and the
                                                                    # reference only (Gluon kernels
                                                                    # do not run without a GPU)

Timings: triton.testing.do_bench medians (ms -> us). Nothing is timed on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from engine.kernels import triton_backend as tb
from engine.kernels.triton import gemm_sm90_w4a8 as w4a8
from engine.quant import ops, pack_int4

FLUX_M = 4352
FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 21504)]
TINY = (100, [(384, 292)])  # M, shapes: a partial token tile, a partial weight tile, six groups
RANK = 32
MAX_REL_ERR = 1e-3  # fp32 sums in the tensor cores' order against the reference's (and bf16 out)


def _inputs(m: int, k: int, n: int, device: torch.device, seed: int = 0) -> dict:
    """Contract tensors: FP8 codes from quantize_act_fp8 of random activations, random weight
    codes -7..7 (the W4A8 route takes weights without a -8)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    smooth = torch.rand(k, generator=g) + 0.5
    proj_down = torch.randn(RANK, k, generator=g) / k**0.5
    codes, ascale, lora_act = ops.quantize_act_fp8(x, smooth, proj_down, shift=0.0)
    w_codes = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    t = {
        "x": x.to(torch.bfloat16),
        "smooth": smooth,
        "proj_down": proj_down.to(torch.bfloat16),
        "codes": codes,
        "ascale": ascale,
        "qweight": pack_int4(w_codes),
        "wscales": (torch.rand(n, k // 64, generator=g) / 50 + 1e-3).to(torch.bfloat16),
        "lora_act": lora_act,
        "proj_up": (torch.randn(n, RANK, generator=g) / 8).to(torch.bfloat16),
        "bias": torch.randn(n, generator=g).to(torch.bfloat16),
        "x_bf16": x.to(torch.bfloat16),
        "w_bf16": (w_codes.float() * 0.01).to(torch.bfloat16),
    }
    return {key: v.to(device) for key, v in t.items()}


def _time_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)


def measure_shape(m: int, k: int, n: int, device: torch.device, hopper: bool) -> dict:
    """One K -> N: the reference, then (on Hopper) the kernel's error, determinism and times."""
    a = _inputs(m, k, n, device)
    args = (a["codes"], a["ascale"], a["qweight"], a["wscales"], a["lora_act"], a["proj_up"], a["bias"])
    ref = ops.w4a8_gemm(*args, out_dtype=torch.float32)
    row = {"k": k, "n": n, "reference_abs_max": ref.abs().max().item()}
    if not hopper:
        return row | {"gemm_us": None, "note": "Hopper only (a Gluon kernel: no run without a GPU)"}
    if not w4a8.supports(m, n, k, RANK, 64):
        return row | {"gemm_us": None, "note": "shape outside the kernel's rules"}
    weight = w4a8.prepare_weight(a["qweight"], a["wscales"])

    def run(dtype: torch.dtype = torch.bfloat16):
        return w4a8.launch(a["codes"], a["ascale"], weight, a["lora_act"], a["proj_up"], a["bias"], out_dtype=dtype)

    y32 = run(torch.float32)
    row["max_rel_err_fp32_vs_reference"] = _rel(y32, ref)
    row["max_rel_err_bf16_vs_reference"] = _rel(run(), ref)
    row["deterministic"] = bool(torch.equal(y32, run(torch.float32)))
    row["gemm_us"] = _time_us(run)
    row["gemm_fp32_out_us"] = _time_us(lambda: run(torch.float32))
    row["gemm_tflops"] = 2 * m * n * k / row["gemm_us"] / 1e6
    row["cublas_bf16_us"] = _time_us(lambda: torch.nn.functional.linear(a["x_bf16"], a["w_bf16"]))
    row["gemm_vs_bf16"] = row["cublas_bf16_us"] / row["gemm_us"]
    split = w4a8.plan(m, n, k, torch.cuda.get_device_properties(device).multi_processor_count)
    row["split"] = [split.full, split.slices, split.slice_groups] if split else None
    if split is not None:

        def run_split(dtype: torch.dtype = torch.bfloat16):
            return w4a8.launch(a["codes"], a["ascale"], weight, a["lora_act"], a["proj_up"], a["bias"],
                               out_dtype=dtype, split=split)  # fmt: skip

        s32 = run_split(torch.float32)
        row["split_max_rel_err_fp32_vs_reference"] = _rel(s32, ref)
        row["split_deterministic"] = bool(torch.equal(s32, run_split(torch.float32)))
        row["gemm_split_us"] = _time_us(run_split)
        row["gemm_split_vs_bf16"] = row["cublas_bf16_us"] / row["gemm_split_us"]

    def quantize():
        return tb.quantize_act_fp8(a["x"], a["smooth"], a["proj_down"], shift=0.0)

    codes, ascale, _ = quantize()
    want = ops.quantize_act_fp8(a["x"], a["smooth"], a["proj_down"], shift=0.0)
    row["quantize_codes_equal"] = bool(torch.equal(codes.view(torch.uint8), want[0].view(torch.uint8)))
    row["quantize_ascale_equal"] = bool(torch.equal(ascale, want[1]))
    row["quantize_us"] = _time_us(quantize)

    def linear():  # as served: the triton backend's pair (the route's kernels on sm_90)
        c, s, la = quantize()
        return tb.w4a8_gemm(c, s, a["qweight"], a["wscales"], la, a["proj_up"], a["bias"], out_dtype=torch.bfloat16)

    row["linear_us"] = _time_us(linear)
    row["linear_vs_bf16"] = row["cublas_bf16_us"] / row["linear_us"]
    return row


def measure(
    m: int, shapes: list[tuple[int, int]], device: torch.device, saved: Callable[[dict], None] | None = None
) -> dict:
    """The report, handed to ``saved`` after each step (written out by the caller, so a part cut
    off by its time limit keeps what it finished)."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "m": m,
        "config": vars(w4a8.CONFIG) | {"block_w": w4a8.CONFIG.block_w},
        "self_check": None,
        "self_check_split": None,
        "shapes": [],
    }
    save = saved or (lambda report: None)
    save(report)
    if hopper:
        report["self_check"] = w4a8.self_check(device)
        save(report)
        report["self_check_split"] = w4a8.self_check(device, w4a8.CHECK_SPLIT)
        save(report)
    for k, n in shapes:
        report["shapes"].append(measure_shape(m, k, n, device, hopper))
        save(report)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke run)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m, shapes = TINY if args.tiny or device.type == "cpu" else (FLUX_M, FLUX_SHAPES)
    report = measure(m, shapes, device, lambda r: args.out.write_text(json.dumps(r, indent=1)))
    print(json.dumps(report, indent=1))
    return 1 if failed(report) else 0


def failed(report: dict) -> bool:
    """Whether a report shows a wrong result: a self-check, an error past MAX_REL_ERR, two runs
    that differ (plain or split grid), or the quantizer's codes or scales not the reference's."""
    return False in (report["self_check"], report.get("self_check_split")) or any(
        max(r.get("max_rel_err_fp32_vs_reference", 0), r.get("split_max_rel_err_fp32_vs_reference", 0)) > MAX_REL_ERR
        or False in (r.get("deterministic"), r.get("split_deterministic"), r.get("quantize_codes_equal"),
                     r.get("quantize_ascale_equal"))
        for r in report["shapes"]
    )


if __name__ == "__main__":
    sys.exit(main())
