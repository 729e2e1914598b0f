"""Measure Hopper's GEMMs against cuBLAS bf16 at FLUX's shapes (a part for gpu_session.sh).

First the W4A8 route, which serves the image stream on Hopper (scripts/gpu_hopper_w4a8.py:
self-check, errors, the whole linear against cuBLAS bf16; report key "w4a8"). Then, for each K -> N: the whole linear as served (quantize_act + w4a4_gemm with the rank-32 branch
and bias) on the Triton backend, the FP8 kernel alone (engine/kernels/triton/gemm_sm90.py),
the warp-specialized Gluon kernel alone (gemm_sm90_ws.py; Hopper only: it does not run in the
interpreter) and its split-K grid where the dispatch plans one (gemm_sm90_ws_split: error,
equality of two runs, time), the int8 kernel they replace on Hopper (gemm.py), and torch's bf16 matmul (cuBLAS)
of the same [M, K] x [K, N]; plus the correctness checks: each kernel's output against the
reference backend, the integer part exact with every group at its extreme codes (Hopper's FP8
accumulation, and e4m3 subnormals in the tensor cores, are assumptions of the kernels that only
a GPU can test), and the ws kernel's own device self-check (the dispatch's condition).

    python scripts/gpu_hopper_gemm.py --out $OUT/hopper-gemm.json            # on an H100/H200
    TRITON_INTERPRET=1 python scripts/gpu_hopper_gemm.py --tiny --out x.json  # CPU smoke run

Timings: triton.testing.do_bench medians on a GPU (ms -> us); on the CPU (interpreter) one
wall-clock call, which says nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gpu_hopper_w4a8
import torch

from engine.kernels import reference
from engine.kernels import triton_backend as tb
from engine.kernels.triton import gemm_sm90, gemm_sm90_ws
from engine.quant import pack_int4

FLUX_M = 4352
FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 21504)]
TINY = (33, [(192, 40)])  # M, shapes: odd M, three groups, N not a multiple of the tile
RANK = 32


def _time_us(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def _inputs(m: int, k: int, n: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w_codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    return {
        "x": (torch.randn(m, k, generator=g) * 2).to(device, torch.bfloat16),
        "smooth": (torch.rand(k, generator=g) + 0.5).to(device, torch.bfloat16),
        "proj_down": (torch.randn(RANK, k, generator=g) / k**0.5).to(device, torch.bfloat16),
        "qweight": pack_int4(w_codes).to(device),
        "wscales": (torch.rand(n, k // 64, generator=g) / 50 + 1e-3).to(device, torch.bfloat16),
        "proj_up": (torch.randn(n, RANK, generator=g) / 8).to(device, torch.bfloat16),
        "bias": torch.randn(n, generator=g).to(device, torch.bfloat16),
        "w_bf16": (w_codes.float() * 0.01).to(device, torch.bfloat16),
    }


def measure_shape(m: int, k: int, n: int, device: torch.device) -> dict:
    """One K -> N: correctness against the reference, then the timings."""
    a = _inputs(m, k, n, device)
    kw = {"unsigned": False, "out_dtype": torch.bfloat16}

    def quantize():
        return tb.quantize_act(a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0)

    def linear():  # as served: the backend's dispatch (the FP8 kernel on sm_90)
        qx, ascales, lora = quantize()
        return tb.w4a4_gemm(qx, ascales, a["qweight"], a["wscales"], lora, a["proj_up"], a["bias"], **kw)

    qx, ascales, lora = quantize()
    weight = gemm_sm90.prepare_weight(a["qweight"], a["wscales"])
    y = gemm_sm90.launch(qx, ascales, weight, lora, a["proj_up"], a["bias"], **kw)
    y_ref = reference.w4a4_gemm(qx, ascales, a["qweight"], a["wscales"], lora, a["proj_up"], a["bias"], **kw)
    err = (y.float() - y_ref.float()).abs().max().item() / max(y_ref.float().abs().max().item(), 1e-30)
    row = {
        "k": k,
        "n": n,
        "max_rel_err_vs_reference": err,
        "linear_us": _time_us(linear, device),
        "quantize_act_us": _time_us(quantize, device),
        "sm90_gemm_us": _time_us(
            lambda: gemm_sm90.launch(qx, ascales, weight, lora, a["proj_up"], a["bias"], **kw), device
        ),
        "int8_gemm_us": _time_us(
            lambda: tb.launch_w4a4_gemm(
                qx, ascales, a["qweight"], a["wscales"], lora, a["proj_up"], a["bias"], **kw
            ),
            device,
        ),
        "cublas_bf16_us": _time_us(lambda: torch.nn.functional.linear(a["x"], a["w_bf16"]), device),
    }
    row["linear_vs_bf16"] = row["cublas_bf16_us"] / row["linear_us"]
    row["sm90_tops"] = 2 * m * n * k / row["sm90_gemm_us"] / 1e6
    row.update(_measure_ws(m, n, k, qx, ascales, weight, lora, a, y_ref, kw, device))
    row["linear_with_ws_vs_bf16"] = (
        row["cublas_bf16_us"] / (row["quantize_act_us"] + row["ws_gemm_us"]) if row["ws_gemm_us"] else None
    )
    if row.get("ws_split_gemm_us"):
        row["linear_with_ws_split_vs_bf16"] = row["cublas_bf16_us"] / (row["quantize_act_us"] + row["ws_split_gemm_us"])
    return row


def _measure_ws(m, n, k, qx, ascales, weight, lora, a, y_ref, kw, device) -> dict:
    """The warp-specialized kernel at one shape: error against the reference and its time (None,
    with the reason, off Hopper or where the kernel does not take the shape)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return {"ws_gemm_us": None, "ws_note": "Hopper only (a Gluon kernel: no interpreter run)"}
    if not gemm_sm90_ws.supports(m, n, k, lora.shape[1], k // ascales.shape[1]):
        return {"ws_gemm_us": None, "ws_note": "shape outside the kernel's TMA/tile rules"}
    ws = gemm_sm90_ws.prepare_weight(weight)

    def run():
        return gemm_sm90_ws.launch(qx, ascales, ws, lora, a["proj_up"], a["bias"], **kw)

    y = run()
    err = (y.float() - y_ref.float()).abs().max().item() / max(y_ref.float().abs().max().item(), 1e-30)
    us = _time_us(run, device)
    row = {"ws_max_rel_err_vs_reference": err, "ws_gemm_us": us, "ws_tops": 2 * m * n * k / us / 1e6}
    # the split of the last partial wave, where the dispatch plans one at this GPU's SM count
    split = gemm_sm90_ws.plan(m, n, k, torch.cuda.get_device_properties(device).multi_processor_count)
    row["ws_split"] = None if split is None else [split.full, split.slices, split.slice_groups]
    if split is not None:

        def run_split():
            return gemm_sm90_ws.launch(qx, ascales, ws, lora, a["proj_up"], a["bias"], **kw, split=split)

        y_split = run_split()
        row["ws_split_max_rel_err_vs_reference"] = (y_split.float() - y_ref.float()).abs().max().item() / max(
            y_ref.float().abs().max().item(), 1e-30
        )
        row["ws_split_deterministic"] = bool(torch.equal(y_split, run_split()))
        row["ws_split_gemm_us"] = _time_us(run_split, device)
    return row


def measure(m: int, shapes: list[tuple[int, int]], device: torch.device, out: Path | None = None) -> dict:
    """The report: device, the exactness checks, one row per shape (written to ``out`` after each
    step, so a part cut off by its time limit keeps what it finished)."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "m": m,
        "extreme_codes_exact": gemm_sm90.extreme_codes_exact(device),
        "ws_self_check": None,
        "w4a8": None,
        "shapes": [],
    }

    def save():
        if out is not None:
            out.write_text(json.dumps(report, indent=1))

    def save_w4a8(part: dict) -> None:
        report["w4a8"] = part
        save()

    save()
    w4a8_m, w4a8_shapes = (m, shapes) if hopper else gpu_hopper_w4a8.TINY
    gpu_hopper_w4a8.measure(w4a8_m, w4a8_shapes, device, save_w4a8)  # first: Hopper's route
    report["ws_self_check"] = gemm_sm90_ws.self_check(device) if hopper else None
    report["ws_split_self_check"] = gemm_sm90_ws.self_check(device, gemm_sm90_ws.CHECK_SPLIT) if hopper else None
    save()
    for k, n in shapes:
        report["shapes"].append(measure_shape(m, k, n, device))
        save()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] != 9:
        print("not a Hopper GPU: the sm_90 kernel is only routed on compute capability 9.x", file=sys.stderr)
    m, shapes = TINY if args.tiny or device.type == "cpu" else (FLUX_M, FLUX_SHAPES)
    report = measure(m, shapes, device, args.out)
    print(json.dumps(report, indent=1))
    bad = (
        not report["extreme_codes_exact"]
        or gpu_hopper_w4a8.failed(report["w4a8"])
        or report["ws_self_check"] is False
        or any(r["max_rel_err_vs_reference"] > 2e-2 for r in report["shapes"])
        or any(r.get("ws_max_rel_err_vs_reference", 0) > 2e-2 for r in report["shapes"])
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
