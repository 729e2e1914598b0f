"""The W4A8 sm_90 GEMM (engine/kernels/triton/gemm_sm90_w4a8.py) on the host: its launch rules and
input checks, the GPU session's part on the CPU, and its weight layout (``prepare_weight``): the
kernel expands each 32-bit word of packed sign-magnitude codes with three instructions,
lo = w & 0x87878787 and hi = rotate_right(w, 4) & 0x87878787 (its inline PTX: and.b32,
shf.r.wrap.b32, and.b32). Emulated here bit for bit on the host over every code -7..7 in every
position of a word, the e4m3 bytes must be the codes times 2^-9 at the channels the kernel's two
wgmmas pair them with (channels kk and 32 + kk of the group for byte kk); a code -8 has no
sign-magnitude form and is read as -7 (the contract, ops.w4a8_gemm)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels.triton import gemm_sm90_w4a8 as w4a8
from engine.quant import ops, pack_int4

MASK = w4a8.SIGN_MAGNITUDE_MASK
ROOT = Path(__file__).resolve().parents[1]


def _expand(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's expansion on the host: packed u8 [N, K/2] -> (lo, hi) e4m3 bytes [N, K/2]."""
    w = packed.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # little-endian words
    rot = ((w >> 4) | (w << 28)) & 0xFFFFFFFF  # shf.r.wrap.b32 d, w, w, 4
    lo, hi = w & MASK, rot & MASK
    as_bytes = lambda v: v.to(torch.int32).contiguous().view(torch.uint8)  # noqa: E731
    return as_bytes(lo), as_bytes(hi)


def test_random_codes_expand_to_their_e4m3_values():
    g = torch.Generator().manual_seed(0)
    n, k = 60, 256
    codes = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    codes[:15] = torch.arange(-7, 8, dtype=torch.int8)[:, None]  # whole rows of each code
    wscales = torch.rand(n, k // 64, generator=g).to(torch.bfloat16)
    weight = w4a8.prepare_weight(pack_int4(codes), wscales)
    assert weight is not None and weight.packed.shape == (n, k // 2) and weight.packed.dtype == torch.uint8
    lo, hi = _expand(weight.packed)
    val = lambda b: b.view(torch.float8_e4m3fn).float()  # noqa: E731
    grp = codes.view(n, k // 64, 2, 32).float() * 2.0**-9  # [N, G, half, kk]
    assert torch.equal(val(lo).view(n, k // 64, 32), grp[:, :, 0])
    assert torch.equal(val(hi).view(n, k // 64, 32), grp[:, :, 1])
    # the scales: times 2^9 (the codes' unit), exact, group-major
    assert torch.equal(weight.sw, (wscales.float() * 512).t())


def test_all_positions_of_a_word_hold_each_code():
    """The sign bit of a "hi" code lives in the next byte of its word: every (code, byte) pair."""
    n, k = 15 * 4, 64
    codes = torch.zeros(n, k, dtype=torch.int8)
    for q in range(-7, 8):
        for j in range(4):
            row = 4 * (q + 7) + j
            codes[row, j::4] = q  # code q at byte position j of every word, lo and hi channels
    lo, hi = _expand(w4a8.prepare_weight(pack_int4(codes), torch.ones(n, 1)).packed)
    want = codes.float() * 2.0**-9
    assert torch.equal(lo.view(torch.float8_e4m3fn).float(), want[:, :32])
    assert torch.equal(hi.view(torch.float8_e4m3fn).float(), want[:, 32:])


@pytest.mark.parametrize("where", [(0, 0), (5, 37), (9, 127)])
def test_a_code_of_minus_8_is_read_as_minus_7(where):
    codes = torch.randint(-7, 8, (10, 128), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    codes[where] = -8
    lo, hi = _expand(w4a8.prepare_weight(pack_int4(codes), torch.ones(10, 2)).packed)
    val = lambda b: b.view(torch.float8_e4m3fn).float().view(10, 2, 32)  # noqa: E731
    want = codes.clamp_min(-7).view(10, 2, 2, 32).float() * 2.0**-9  # [N, G, half, kk]
    assert torch.equal(val(lo), want[:, :, 0]) and torch.equal(val(hi), want[:, :, 1])


def test_mismatched_scales_name_the_field():
    with pytest.raises(ValueError, match="wscales"):
        w4a8.prepare_weight(pack_int4(torch.zeros(4, 128, dtype=torch.int8)), torch.ones(4, 3))


def test_supports_the_flux_shapes_and_refuses_what_the_tma_rules_exclude():
    for k, n in [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 21504)]:
        assert w4a8.supports(4352, n, k, 32, 64)
    assert not w4a8.supports(4352, 3072, 3072 + 32, 32, 64)  # K not whole groups
    assert not w4a8.supports(4352, 3074, 3072, 32, 64)  # N % 4: the scale vector's TMA rows
    assert not w4a8.supports(4352, 3072, 3072, 32, 128)  # group 64 only
    assert not w4a8.supports(4352, 3072, 3072, w4a8.MAX_RANK + 1, 64)
    assert not w4a8.supports(2**16, 2**15, 3072, 32, 64)  # int32 output offsets
    assert not w4a8.supports(4352, 3072, 0, 32, 64) and not w4a8.supports(4352, 0, 3072, 32, 64)


def test_launch_names_the_bad_field():
    x = w4a8.exact_inputs(8, 64, 128, 4)
    weight = w4a8.prepare_weight(x["qweight"], x["wscales"])
    rest = (x["lora_act"], x["proj_up"], x["bias"])
    with pytest.raises(TypeError, match="codes"):
        w4a8.launch(x["codes"].float(), x["ascale"], weight, *rest, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="ascale"):
        w4a8.launch(x["codes"], x["ascale"][:4], weight, *rest, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="weight K"):
        w4a8.launch(x["codes"][:, :64], x["ascale"], weight, *rest, out_dtype=torch.float32)


def test_gpu_part_on_the_cpu_reports_the_reference_and_no_kernel_figures(tmp_path):
    """scripts/gpu_hopper_w4a8.py (the GPU session's part) on its tiny CPU shape: the inputs and
    the reference run, the kernel is reported as not run (a Gluon kernel needs the GPU)."""
    out = tmp_path / "w4a8.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_hopper_w4a8.py"), "--tiny", "--out", str(out)],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["self_check"] is None and report["config"]["block_w"] == 192
    (row,) = report["shapes"]
    assert (row["k"], row["n"]) == (384, 292) and row["reference_abs_max"] > 0
    assert row["gemm_us"] is None and "Hopper only" in row["note"]


def _launch_from_the_packing(codes, ascale, weight, lora_act, proj_up, bias, *, out_dtype, programs=None, split=None):
    """The kernel's arithmetic on the host from its own weight layout (the expansion above):
    stands in for the GPU launch so that the self-check's own logic runs here."""
    n, half = weight.packed.shape
    lo, hi = _expand(weight.packed)
    val = lambda b: (b.view(torch.float8_e4m3fn).float() * 512).round().to(torch.int8)  # noqa: E731
    q = torch.stack([val(lo).view(n, -1, 32), val(hi).view(n, -1, 32)], dim=2).view(n, 2 * half)
    ws = (weight.sw / 512).t()
    return ops.w4a8_gemm(codes, ascale, pack_int4(q), ws, lora_act, proj_up, bias, out_dtype=out_dtype)


def test_self_check_passes_a_right_kernel_and_fails_a_wrong_one(monkeypatch):
    monkeypatch.setattr(w4a8, "launch", _launch_from_the_packing)
    assert w4a8.self_check(torch.device("cpu"))
    assert w4a8.self_check(torch.device("cpu"), w4a8.CHECK_SPLIT)

    def off_by_one_ulp(*args, **kw):
        y = _launch_from_the_packing(*args, **kw)
        y[7, 5] = torch.nextafter(y[7, 5], torch.tensor(float("inf")))
        return y

    monkeypatch.setattr(w4a8, "launch", off_by_one_ulp)
    assert not w4a8.self_check(torch.device("cpu"))
