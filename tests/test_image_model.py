"""scripts/image_model.py (perfmodel.image): the stage-by-stage image model, its calibration and its docs block (issue 26).

The model's figures are modelled, not measured; these tests check that it traces what the code issues,
that its calibration against the published measurement stays within a stated error, and that the
block in docs/benchmarks.md is the one the code gives today.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from perfmodel import image as image_model
from perfmodel import image_price, image_trace

ROOT = Path(__file__).resolve().parents[1]

CALIBRATION_TOLERANCE = 0.25  # |modelled / measured - 1| on the calibration run, eager and compiled


def test_attention_flops_do_not_depend_on_the_layout():
    nhd = image_price.attention_flops((1, 4352, 24, 128), (1, 4352, 24, 128))
    hnd = image_price.attention_flops((1, 24, 4352, 128), (1, 24, 4352, 128))
    assert nhd == hnd == (2 * 24 * 4352 * 4352 * 128,) * 2


def test_the_tracer_sees_the_launches_count_launches_counts():
    """Same skeleton, same stand-in for attention: the per-block op lists agree with the launch counter's
    figures for the fused blocks (22 per double block, 10 per single block, since issue 26's GEMM
    epilogue took the gates and residual adds and the model's forward the single block's
    concatenation; 30 and 14 before)."""
    ops = image_trace.trace_transformer(True, batch=1, size=256, text_tokens=64)
    per_kind = {
        kind: sum(op.where == kind for op in ops) / n
        for kind, n in image_trace.cl.FLUX_SCHNELL_BLOCKS.items()
    }
    assert per_kind == {"transformer_blocks": 22, "single_transformer_blocks": 10}
    gemms = [op for op in ops if op.name == "svdq.w4a4_gemm"]
    assert len(gemms) == 19 * 8 + 38 * 3
    # every GEMM is priced from its real (M, K, N): the image stream's M is the token count
    assert {op.args[0].shape[0] for op in gemms} == {256, 64, 320}
    attn = [op for op in ops if op.name == "count_launches.flash_attention"]
    assert len(attn) == 57 and all(op.args[0].shape[2] == 320 for op in attn)  # [B, H, S, D]


def test_the_single_blocks_concatenation_lever_is_read_from_the_trace(monkeypatch):
    """In the code: one concatenation of the joint (text, image) sequence per step, outside the blocks,
    and the lever's saving is the other single blocks' copies of it. With diffusers' model forward
    (each block concatenates, as before issue 26) the trace has one per single block, priced as the
    saving, and the lever is not in the code."""
    from diffusers import FluxTransformer2DModel

    from engine.flux.model import SVDQFluxTransformer2DModel

    def lever() -> tuple[float, str, bool, int]:
        ops = image_trace.trace_transformer(True, batch=1, size=256, text_tokens=64)
        cats = sum(op.name == "aten.cat" and op.where == "single_transformer_blocks" for op in ops)
        return (*image_model.joint_concat_lever(ops, "A40"), cats)

    joint = torch.empty(1, 64 + 256, 3072, dtype=torch.bfloat16, device="meta")
    one = image_price.price(
        image_trace.Op("aten.cat", "single_transformer_blocks", [], joint.nbytes, joint.nbytes, 0),
        "A40", None, compiled=True, sage=True,
    )  # fmt: skip
    saved, how, applied, cats = lever()
    assert applied and cats == 0 and saved == pytest.approx(37 * one) and "once per step" in how
    monkeypatch.setattr(SVDQFluxTransformer2DModel, "forward", FluxTransformer2DModel.forward)
    saved, how, applied, cats = lever()
    assert not applied and cats == 38 and saved == pytest.approx(38 * one) and "38 torch.cat" in how


def test_sage_preparation_bytes_follow_the_tensor_size():
    q = torch.empty(1, 24, 4352, 128, dtype=torch.bfloat16, device="meta")
    op = image_trace.Op("count_launches.flash_attention", "x", [], 0, 0, 0, (q, q, q))
    t = 4352 * 24 * 128 * 2
    # mean of K (read), K - mean (read + write), V to fp16 (read + write), Q and K to int8 (read + write 1 B)
    assert image_price.sage_prep_bytes(op) == t + 2 * t + 2 * t + 2 * (t + t // 2)


def test_under_sage_the_trace_has_the_fused_preparation_and_prices_its_bytes():
    """go_fast's trace (sage): per block one qk_norm_rope_sage and one sage int8 attention in place
    of qk_norm_rope and the flash stand-in (same op counts per block), priced by the two launches'
    bytes, which are fewer than those of qk_norm_rope plus sageattn's passes."""
    from perfmodel.rope import sage_bytes

    ops = image_trace.trace_transformer(True, batch=1, size=256, text_tokens=64, sage=True)
    per_kind = {
        kind: sum(op.where == kind for op in ops) / n for kind, n in image_trace.cl.FLUX_SCHNELL_BLOCKS.items()
    }
    assert per_kind == {"transformer_blocks": 22, "single_transformer_blocks": 10}  # with the gated epilogues
    names = {op.name for op in ops}
    assert {"svdq.qk_norm_rope_sage", "svdq.sage_attention_int8"} <= names
    assert not {"svdq.qk_norm_rope", "count_launches.flash_attention"} & names
    fused = [op for op in ops if op.name == "svdq.qk_norm_rope_sage"]
    assert len(fused) == 57
    b = image_price.qk_norm_rope_sage_bytes(fused[0])
    assert b == sage_bytes(320, 24, 128, 1, 2)
    t = 320 * 24 * 128  # elements of q (and k, v)
    sums = 24 * 3 * 128 * 4  # [B, H, ceil(320 / 128), D] fp32
    tables = 2 * 320 * 128 * 4  # the cos/sin tables
    # q|k bf16 in (V stays in the projection: the attention reads it there), q8 + scales, k + sums out
    assert b["fused_total"] == 2 * 2 * t + tables + t + 24 * 3 * 4 + 2 * t + sums + (2 * t + sums + t + 24 * 5 * 4)
    assert b["v_copy"] == 2 * t + 2 * t  # what writing sage's fp16 copy of V moved
    assert b["unfused_total"] == 3 * 2 * t + tables + 3 * 2 * t + (2 * t + 4 * t + 4 * t + 2 * 3 * t)
    assert image_price.price(fused[0], "A40", None, compiled=True, sage=True) == image_price.dram_s(
        b["fused_total"], "A40"
    )
    attn = next(op for op in ops if op.name == "svdq.sage_attention_int8")
    qk, pv = image_price.attention_flops(tuple(attn.args[0].shape), tuple(attn.args[2].shape))
    assert qk == pv == 2 * 24 * 320 * 320 * 128
    # V read in place: the text and image projections' column slices, bf16 (no fp16 copy)
    v0, v1 = attn.args[4:6]
    assert v0._is_view() and v1._is_view() and v0.dtype == v1.dtype == torch.bfloat16
    assert (v0.shape[1], v1.shape[1]) == (64, 256)


@pytest.mark.slow
def test_calibration_against_the_published_h100_measurement():
    cal = image_model.calibration()
    for mode, c in cal.items():
        assert c["measured_s"] == image_model.CALIBRATION[f"{mode}_s"]
        assert abs(c["error"]) <= CALIBRATION_TOLERANCE, (mode, c)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc needed for the CUDA kernel's counts")
def test_docs_block_is_current():
    """Regenerated in a subprocess: the Triton kernels compile for GPU targets, not the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "image_model.py"),
            "--check",
            str(ROOT / "docs" / "benchmarks.md"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_the_generated_text_says_which_kernels_price_the_h100_gemms():
    """The block names the kernels and models behind the H100 column's GEMMs and quantizers, with the
    calls the H100 runs on each (perfmodel.hopper_route; tests/test_hopper_route.py holds the routes):
    the W4A8 kernel for the image stream, the W4A4 FP8 kernel for the text stream."""
    routes = {b: image_model.h100_routes(b) for b in (1, 4)}
    note = image_model.hopper_gemm_note(routes)
    for name in ("gemm_sm90_w4a8.py", "hopper_w4a8.py", "act_fp8.py", "h100_w4a8", "gemm_sm90_ws.py",
                 "hopper_ws.py", "gemm_sm90.py", "hopper.py", "triton/epilogue.py"):  # fmt: skip
        assert name in note, name
    one = routes[1]
    assert f"{one['w4a8']} the W4A8 kernel" in note and f"{one['fp8']} the FP8 kernel" in note
    assert f"; {one['epilogue kernel']} of them with the epilogue kernel" in note
    assert image_price.EPILOGUE_COL in note


def test_the_h100_trace_takes_the_w4a8_route_for_the_image_stream(monkeypatch):
    """The H100 column's transformer is traced with kernels.w4a8_route as an H100 decides it: every
    linear called with M >= the route's minimum (the image stream, 4096 rows, and the single blocks,
    4352) issues quantize_act_fp8 (its prologue variant) + w4a8_gemm, the text stream (256) stays
    W4A4; everything else is the A40's trace op for op, and the A40's trace has no W4A8 op (no
    W4A8 route on the A40). Moving the dispatch's threshold moves the trace."""
    from collections import Counter

    from perfmodel.hopper_route import w4a8_min_m

    import engine.kernels.triton_backend as tb

    traces = image_model.transformer_traces(1, 1024)
    h100, a40 = traces["H100 SXM"], traces["A40"]
    lo = w4a8_min_m()
    w4a8 = [op for op in h100 if op.name == "svdq.w4a8_gemm"]
    w4a4 = [op for op in h100 if op.name == "svdq.w4a4_gemm"]
    assert len(w4a8) == 19 * 4 + 38 * 3 and {op.args[0].shape[0] for op in w4a8} == {4096, 4352}
    assert len(w4a4) == 19 * 4 and {op.args[0].shape[0] for op in w4a4} == {256}
    assert min(op.args[0].shape[0] for op in w4a8) >= lo > 256
    fp8 = [op for op in h100 if op.name == "svdq.quantize_act_fp8"]
    variants = Counter(image_price.fp8_prologue(op) for op in fp8)
    # modulation: the double blocks' qkv and fc1, the single blocks' qkv|mlp; gelu: fc2 and proj_out's
    # MLP part; plain: the attention out-projection and proj_out's attention part
    assert variants == {"modulation": 19 * 2 + 38, "gelu": 19 + 38, "": 19 + 38}
    plain = image_trace.trace_transformer(True, 1, 1024, sage=True)
    assert [(op.name, op.shapes) for op in a40] == [(op.name, op.shapes) for op in plain]
    assert not {"svdq.w4a8_gemm", "svdq.quantize_act_fp8"} & {op.name for op in a40}

    def others(ops: list) -> list:
        linear = ("svdq.w4a4_gemm", "svdq.w4a8_gemm", "svdq.quantize_act", "svdq.quantize_act_prologue",
                  "svdq.quantize_act_fp8")  # fmt: skip
        return [(op.name, op.where, op.shapes) for op in ops if op.name not in linear]

    assert others(h100) == others(a40)
    monkeypatch.setattr(tb, "W4A8_MIN_M", 10**9)
    moved = image_trace.trace_transformer(True, 1, 1024, sage=True, hopper=True)
    assert not any(op.name == "svdq.w4a8_gemm" for op in moved)
