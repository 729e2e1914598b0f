"""The sm_90 W4A4 GEMM (engine/kernels/triton/gemm_sm90.py) against the reference.

On CPU the kernel runs under TRITON_INTERPRET=1 (conftest.py) with the FP8 dots done as exact
fp32 dots of the same e4m3 values; the e4m3 encodings themselves are checked against torch's
float8_e4m3fn (the definer of the format here). The compiled loop's structure is gated in
tests/test_hopper_gemm_static.py; the GPU checks (FP8 accumulation exact, timings) are
scripts/gpu_hopper_gemm.py and the ``gpu`` test below.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from engine.kernels import reference
from engine.quant import pack_int4, unpack_int4

from .kernel_cases import gemm_inputs

tb = pytest.importorskip("engine.kernels.triton_backend")
from engine.kernels.triton import gemm_sm90  # noqa: E402 (after the importorskip)

# An out-of-bounds read shows in the interpreter as garbage that overflows a dot: make it fail.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL = {
    torch.float32: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}


def _sm90(a: dict, unsigned: bool, out_dtype: torch.dtype) -> torch.Tensor:
    weight = gemm_sm90.prepare_weight(a["qweight"], a["wscales"])
    return gemm_sm90.launch(
        a["qx"],
        a["ascales"],
        weight,
        a["lora_act"],
        a["proj_up"],
        a["bias"],
        unsigned=unsigned,
        out_dtype=out_dtype,
    )


def test_prepared_weight_is_the_codes_in_e4m3():
    """w8 decodes (torch's e4m3) to the signed codes, each group's even channels then its odd
    ones; wscales are the scales times 2^9, group-major; wcorr's halves sum to -8 x the group's
    code sum x its scale."""
    a = gemm_inputs(3, 192, 5, 0)
    w = gemm_sm90.prepare_weight(a["qweight"], a["wscales"])
    codes = unpack_int4(a["qweight"]).float()  # [N, K], the definer's unpacking
    n, k = codes.shape
    by_group = codes.view(n, k // 64, 32, 2)  # channel 2j, 2j+1
    want = torch.cat([by_group[..., 0], by_group[..., 1]], dim=2).reshape(n, k)
    assert w.w8.dtype == torch.float8_e4m3fn and torch.equal(w.w8.float(), want)
    assert torch.equal(w.wscales, a["wscales"].float().t() * 512)
    corr = (w.wcorr[0].float() + w.wcorr[1].float()).t()  # [N, G]
    exact = -8 * codes.view(n, k // 64, 64).sum(2) * a["wscales"].float()
    torch.testing.assert_close(corr, exact, rtol=2**-15, atol=0)


@triton.jit
def _expand_kernel(p_ptr, lo_ptr, hi_ptr, UNSIGNED: tl.constexpr):
    i = tl.arange(0, 256)
    lo, hi = gemm_sm90.expand_codes(tl.load(p_ptr + i), UNSIGNED, False)
    tl.store(lo_ptr + i, lo.to(tl.uint8, bitcast=True))
    tl.store(hi_ptr + i, hi.to(tl.uint8, bitcast=True))


@pytest.mark.parametrize("unsigned", [False, True])
def test_activation_bytes_are_e4m3_codes(unsigned):
    """Every packed byte: each nibble's byte, read as e4m3 by torch, is (code + 8) * 2^-9 signed
    or code * 2^-9 unsigned (the subnormals and the lowest binade are linear in the bits); and
    the GPU's word-wide form (and, xor / shift, and, xor) gives the same bytes in every lane."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the jit helper in the interpreter (CPU CI)")
    p = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    lo, hi = torch.empty(256, dtype=torch.uint8), torch.empty(256, dtype=torch.uint8)
    _expand_kernel[(1,)](p, lo, hi, UNSIGNED=unsigned)
    code_lo, code_hi = p.int() & 0xF, p.int() >> 4
    if not unsigned:
        code_lo = code_lo - 16 * (code_lo >= 8) + 8
        code_hi = code_hi - 16 * (code_hi >= 8) + 8
    assert torch.equal(lo.view(torch.float8_e4m3fn).double() * 512, code_lo.double())
    assert torch.equal(hi.view(torch.float8_e4m3fn).double() * 512, code_hi.double())
    words = p.long() | (p.flip(0).long() << 8) | (p.long() << 16) | ((p.long() ^ 0x5A) << 24)
    flip = 0 if unsigned else 0x08080808
    w_lo, w_hi = (words & 0x0F0F0F0F) ^ flip, ((words >> 4) & 0x0F0F0F0F) ^ flip
    for lane in range(4):
        byte = (words >> (8 * lane)) & 0xFF
        assert torch.equal((w_lo >> (8 * lane)) & 0xFF, lo[byte].long())
        assert torch.equal((w_hi >> (8 * lane)) & 0xFF, hi[byte].long())


@pytest.mark.parametrize("m,k,n,r", [(1, 64, 16, 0), (19, 128, 40, 16), (33, 192, 17, 32), (16, 1088, 48, 5)])
@pytest.mark.parametrize("unsigned", [False, True])
def test_sm90_gemm_matches_reference(m, k, n, r, unsigned):
    """Odd shapes (partial tiles, a K of 17 groups: the offset correction's chunk tail), with
    and without bias, fp32 and bf16 out."""
    a = gemm_inputs(m, k, n, r, unsigned=unsigned, bias=r % 2 == 0, device=DEVICE)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = _sm90(a, unsigned, out_dtype)
        y_r = reference.w4a4_gemm(**a, unsigned=unsigned, out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n)
        torch.testing.assert_close(y, y_r, **OUT_TOL[out_dtype])


def test_sm90_gemm_group_128_matches_reference():
    a = gemm_inputs(9, 256, 24, 8, device=DEVICE)
    a["ascales"] = a["ascales"][:, ::2].contiguous()
    a["wscales"] = a["wscales"][:, ::2].contiguous()
    y = _sm90(a, False, torch.float32)
    torch.testing.assert_close(
        y, reference.w4a4_gemm(**a, unsigned=False, out_dtype=torch.float32), **OUT_TOL[torch.float32]
    )


@pytest.mark.parametrize("unsigned", [False, True])
def test_sm90_integer_part_exact_at_the_extremes(unsigned):
    """Scales 1: the output is the exact integer dot, with every group at its most negative and
    most positive (the signed offset's correction included), and every code once."""
    lo, hi = (0, 15) if unsigned else (-8, 7)
    m, n, k = 18, 34, 256
    x = torch.full((m, k), hi, dtype=torch.int8)
    x[m // 2 :] = lo
    x[:, :64] = lo
    x[:, 128:192] = (torch.arange(64) % (hi - lo + 1) + lo).to(torch.int8)
    w = torch.full((n, k), -8, dtype=torch.int8)
    w[n // 2 :] = 7
    w[:, 192:] = (torch.arange(n * 64).view(n, 64) % 16 - 8).to(torch.int8)
    a = {
        "qx": pack_int4(x).to(DEVICE),
        "ascales": torch.ones(m, k // 64, device=DEVICE),
        "qweight": pack_int4(w).to(DEVICE),
        "wscales": torch.ones(n, k // 64, device=DEVICE),
        "lora_act": torch.zeros(m, 0, device=DEVICE),
        "proj_up": torch.zeros(n, 0, device=DEVICE),
        "bias": None,
    }
    y = _sm90(a, unsigned, torch.float32)
    assert torch.equal(y.cpu().double(), x.double() @ w.double().T)


def test_hopper_dispatch_takes_the_sm90_kernel(monkeypatch):
    """On compute capability 9 the backend's w4a4_gemm runs gemm_sm90 (here in the interpreter),
    with the weight transformed once per tensor and again after an in-place write."""
    calls = []
    real_launch, real_prepare = gemm_sm90.launch, gemm_sm90.prepare_weight
    monkeypatch.setattr(tb, "_major", lambda device: 9)
    monkeypatch.setattr(gemm_sm90, "serves", lambda device: True)
    monkeypatch.setattr(gemm_sm90, "launch", lambda *a, **kw: calls.append("launch") or real_launch(*a, **kw))
    monkeypatch.setattr(gemm_sm90, "prepare_weight", lambda *a: calls.append("prepare") or real_prepare(*a))
    a = gemm_inputs(5, 128, 24, 4, device=DEVICE)
    kw = {"unsigned": False, "out_dtype": torch.float32}
    y = tb.w4a4_gemm(**a, **kw)
    tb.w4a4_gemm(**a, **kw)
    assert calls == ["prepare", "launch", "launch"]
    torch.testing.assert_close(y, reference.w4a4_gemm(**a, **kw), **OUT_TOL[torch.float32])
    a["qweight"].copy_(a["qweight"].flip(0))  # an in-place load (load_state_dict)
    y2 = tb.w4a4_gemm(**a, **kw)
    assert calls[-2:] == ["prepare", "launch"]
    torch.testing.assert_close(y2, reference.w4a4_gemm(**a, **kw), **OUT_TOL[torch.float32])


def test_hopper_dispatch_sends_ranks_above_the_sm90_tile_to_the_chunked_int8_kernel(monkeypatch):
    """A low-rank branch wider than gemm_sm90.MAX_RANK (the base plus LoRAs) would spill in the
    FP8 kernel's whole-rank tile: the int8 kernel, chunked, runs it."""
    calls = []
    monkeypatch.setattr(tb, "_major", lambda device: 9)
    monkeypatch.setattr(gemm_sm90, "serves", lambda device: True)
    monkeypatch.setattr(gemm_sm90, "launch", lambda *a, **kw: calls.append("sm90"))
    kw = {"unsigned": False, "out_dtype": torch.float32}
    tb.w4a4_gemm(**gemm_inputs(5, 128, 24, gemm_sm90.MAX_RANK, device=DEVICE), **kw)
    assert calls == ["sm90"]
    a = gemm_inputs(5, 128, 24, gemm_sm90.MAX_RANK + 1, device=DEVICE)
    y = tb.w4a4_gemm(**a, **kw)
    assert calls == ["sm90"]  # not launched again: the int8 kernel ran
    torch.testing.assert_close(y, reference.w4a4_gemm(**a, **kw), **OUT_TOL[torch.float32])


def test_hopper_dispatch_checks_the_gpu_once_and_falls_back_loudly(monkeypatch, caplog):
    """Where the FP8 sums do not check exact on the device, w4a4_gemm takes the int8 kernel and
    says so once; the check itself passes on the interpreter's exact arithmetic."""
    assert gemm_sm90.extreme_codes_exact(torch.device(DEVICE))
    checks = []
    monkeypatch.setattr(tb, "_major", lambda device: 9)
    monkeypatch.setattr(gemm_sm90, "extreme_codes_exact", lambda device: checks.append(device) or False)
    monkeypatch.setattr(gemm_sm90, "launch", lambda *a, **kw: pytest.fail("the FP8 kernel ran"))
    gemm_sm90._exact_on.cache_clear()
    try:
        a = gemm_inputs(5, 128, 24, 4, device=DEVICE)
        kw = {"unsigned": False, "out_dtype": torch.float32}
        with caplog.at_level("WARNING"):
            y = tb.w4a4_gemm(**a, **kw)
            tb.w4a4_gemm(**a, **kw)
        assert len(checks) == 1 and "not exact" in caplog.text
        torch.testing.assert_close(y, reference.w4a4_gemm(**a, **kw), **OUT_TOL[torch.float32])
    finally:
        gemm_sm90._exact_on.cache_clear()


@pytest.mark.slow
def test_gpu_measurement_script_runs_tiny(tmp_path):
    """scripts/gpu_hopper_gemm.py, the GPU session's part, on its tiny CPU shapes: it reports
    the exactness check, the error against the reference and every timing."""
    out = tmp_path / "hopper.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_hopper_gemm.py"), "--tiny", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["extreme_codes_exact"] is True
    (row,) = report["shapes"]
    assert row["max_rel_err_vs_reference"] < 1e-2
    for key in ("linear_us", "quantize_act_us", "sm90_gemm_us", "int8_gemm_us", "cublas_bf16_us"):
        assert row[key] > 0
    assert row["ws_gemm_us"] is None and "Hopper only" in row["ws_note"]  # a Gluon kernel: GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 21504), (15360, 3072)])
def test_sm90_flux_shapes_on_gpu(k, n):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm_90 kernel is routed on Hopper only")
    a = gemm_inputs(4352, k, n, 32, device="cuda")
    kw = {"unsigned": False, "out_dtype": torch.bfloat16}
    torch.testing.assert_close(
        tb.w4a4_gemm(**a, **kw), reference.w4a4_gemm(**a, **kw), **OUT_TOL[torch.bfloat16]
    )


def test_sm90_weight_cache_takes_inference_tensors():
    """Weights loaded under torch.inference_mode keep no version counter: cached all the same."""
    with torch.inference_mode():
        a = gemm_inputs(2, 128, 16, 0)
        first = tb.sm90_weight(a["qweight"], a["wscales"])
        assert tb.sm90_weight(a["qweight"], a["wscales"]) is first


def test_hopper_epilogue_calls_keep_the_fp8_kernel_and_the_contracts_arithmetic(monkeypatch):
    """Gate/residual/partial calls (the blocks' out-projections, fc2, proj_out) on Hopper: the FP8
    kernel writes fp32 and the epilogue kernel (triton/epilogue.py, bit for bit the reference's
    ops.gemm_epilogue) runs after it, so the result is the contract's (partial added in fp32, then
    diffusers' roundings) without the slower int8 kernel."""
    calls = []
    real_epilogue = tb.sm90_epilogue
    monkeypatch.setattr(tb, "sm90_epilogue", lambda *a: calls.append("epilogue") or real_epilogue(*a))
    real_launch = gemm_sm90.launch
    monkeypatch.setattr(tb, "_major", lambda device: 9)
    monkeypatch.setattr(gemm_sm90, "serves", lambda device: True)

    def launch(*a, **kw):
        calls.append(kw["out_dtype"])
        return real_launch(*a, **kw)

    monkeypatch.setattr(gemm_sm90, "launch", launch)
    a = gemm_inputs(6, 128, 24, 4, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    bf = torch.bfloat16
    a["partial"] = torch.randn(6, 24, generator=gen).to(bf).to(DEVICE)
    a["residual"] = torch.randn(6, 24, generator=gen).to(bf).to(DEVICE)
    a["gate"] = torch.randn(2, 24, generator=gen).to(bf).to(DEVICE)  # two images of 3 rows
    kw = {"unsigned": False, "out_dtype": bf}
    y = tb.w4a4_gemm(**a, **kw)
    assert calls == [torch.float32, "epilogue"] and y.dtype == bf
    # the kernel's fp32 sum against the reference's: equal up to summation order, so the result
    # matches the reference's to one bf16 rounding
    torch.testing.assert_close(y.float(), reference.w4a4_gemm(**a, **kw).float(), rtol=1.6e-2, atol=1e-2)
    del a["residual"], a["gate"]
    y = tb.w4a4_gemm(**a, **kw)  # partial alone: the single block's proj_out without a gate
    torch.testing.assert_close(y.float(), reference.w4a4_gemm(**a, **kw).float(), rtol=1.6e-2, atol=1e-2)
