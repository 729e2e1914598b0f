"""The Triton W4A8 quantizer (engine/kernels/triton/act_fp8.py) against its definer,
engine.quant.ops.quantize_act_fp8: in the interpreter (tests run under TRITON_INTERPRET=1) and
as compiled for sm_90, its PTX executed by tests/ptx_exec.py.

Codes and ascale bit for bit (a NaN code matches a NaN code: the sign of a NaN made by inf * 0
is the platform's, not IEEE's), lora_act to quantize_act's bound (bf16 hi + lo or tf32x3 MMAs).
The prologues as test_prologue bounds quantize_act's: bf16 / fp16 x exact; fp32 x, whose
LayerNorm statistics are summed in the kernel's order, within a few fp32 ulps of x' (ascale
2^-20 relative; a code may then move to its neighbour where x_hat * inv sits on a tie).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from engine.quant.ops import FP8_MAX, quantize_act_fp8

from . import ptx_compile as PC
from .kernel_cases import act_inputs
from .ptx_ops import to_e4m3_bits
from .test_ptx_exec_triton import _beyond_warp_reduction_tails

AF = pytest.importorskip("engine.kernels.triton.act_fp8")
from engine.kernels.triton import act as ACT  # noqa: E402

LORA_TOL = {"rtol": 2e-3, "atol": 2e-3}  # test_kernels_triton's
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
E4M3 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # +0 .. 448


def _nan_code(b: torch.Tensor) -> torch.Tensor:
    return (b & 0x7F) == 0x7F


def assert_codes(got: torch.Tensor, want: torch.Tensor, neighbours: float = 0.0) -> None:
    """e4m3 codes equal bit for bit (NaN to NaN); with ``neighbours`` > 0 that fraction of them
    may instead be the adjacent e4m3 value (same sign)."""
    assert got.dtype == torch.float8_e4m3fn and got.shape == want.shape
    g, w = got.view(torch.uint8).int(), want.view(torch.uint8).int()
    assert torch.equal(_nan_code(g), _nan_code(w)), "NaN codes differ"
    g, w = torch.where(_nan_code(g), 0, g), torch.where(_nan_code(w), 0, w)
    diff = g != w
    if neighbours:
        assert ((g - w).abs()[diff] == 1).all(), "a code off by more than one step"
        assert diff.float().mean() <= neighbours, diff.float().mean()
    else:
        bad = diff.nonzero()[:5].tolist()
        assert not diff.any(), (
            f"{int(diff.sum())} codes differ, e.g. at {bad}: {g[diff][:5]} vs {w[diff][:5]}"
        )


def assert_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 tensors equal bit for bit, NaN to NaN."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def check(got, want, scale_rtol: float = 0.0, neighbours: float = 0.0) -> None:
    codes, ascale, lora = got
    assert_codes(codes, want[0], neighbours)
    if scale_rtol:
        torch.testing.assert_close(ascale, want[1], rtol=scale_rtol, atol=0, equal_nan=True)
    else:
        assert_bits(ascale, want[1])
    finite = torch.isfinite(want[2]).all(dim=1)  # an inf row: its lora_act is inf or NaN
    assert lora.shape == want[2].shape
    torch.testing.assert_close(lora[finite], want[2][finite], **LORA_TOL)
    assert not torch.isfinite(lora[~finite]).all(dim=1).any()


def edge_inputs(m: int, k: int, r: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """act_inputs plus the rows the format has edges at: all zero, all -0, scattered -0, one inf,
    one -inf, one NaN (rows 1 to 6); row 0 keeps its zero group."""
    a = act_inputs(m, k, r, dtype=dtype, seed=seed)
    x = a["x"]
    x[1] = 0.0
    x[2] = -0.0
    x[3, ::5] = -0.0
    x[4, 7] = float("inf")
    x[5, k - 1] = float("-inf")
    x[6, 9] = float("nan")
    return a


# --- the interpreter ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, r", [(21, 64, 5), (17, 192, 16), (37, 384, 48), (16, 640, 0)])
def test_matches_reference(m, k, r, dtype):
    """M not a multiple of 16, K of 64 x odd (192: not a multiple of pass 1's 128-channel step,
    640: nor of pass 2's 256), ranks 0, one chunk and two; the edge rows."""
    a = edge_inputs(m, k, r, dtype)
    for shift in (0.0, 0.171875):
        check(AF.quantize_act_fp8(**a, shift=shift), quantize_act_fp8(**a, shift=shift))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flux_width(dtype):
    """K = 3072 (48 groups), 24 rows."""
    a = edge_inputs(24, 3072, 32, dtype, seed=3)
    check(AF.quantize_act_fp8(**a, shift=0.0), quantize_act_fp8(**a, shift=0.0))


def tie_inputs(dtype: torch.dtype) -> dict:
    """Rows whose x_hat * inv lands on every e4m3 rounding tie, and on x's dtype's neighbours of
    each, positive and negative: row j has amax 448 * 2^-k_j (so inv = 2^k_j, exact) and the
    other values t * 2^-k_j, t the midpoints of consecutive e4m3 values (subnormal ones, 2^-6's,
    432 between 416 and 448). smooth powers of two (exact divisions)."""
    mids = (E4M3[:-1] + E4M3[1:]) / 2  # 126 midpoints
    mids = mids.to(dtype)
    assert torch.equal(mids.float(), (E4M3[:-1] + E4M3[1:]) / 2)  # exact in every dtype tested
    bits = mids.view(torch.int16 if dtype != torch.float32 else torch.int32)
    up, down = (bits + 1).view(dtype), (bits - 1).view(dtype)
    vals = torch.cat([mids, up, down[1:]]).float()  # 377 values (down of 2^-10 is subnormal-ish)
    ks = [0, 2] if dtype == torch.float16 else [0, 3, 7, 20]
    k = 768
    smooth = 2.0 ** (torch.arange(k) % 3 - 1).float()  # 0.5, 1, 2
    rows = []
    for e in ks:
        for sign in (1.0, -1.0):
            row = torch.zeros(k)
            row[0] = FP8_MAX
            row[1 : 1 + vals.numel()] = vals
            rows.append(sign * row * 2.0**-e)
    x_hat = torch.stack(rows)
    x = (x_hat * smooth).to(dtype)
    assert torch.equal(x.float() / smooth, x_hat), "the tie values are not exact in x's dtype"
    g = torch.Generator().manual_seed(5)
    return {"x": x, "smooth": smooth.to(dtype), "proj_down": (torch.randn(8, k, generator=g) / 30).to(dtype)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_ties_go_to_even(dtype):
    a = tie_inputs(dtype)
    got = AF.quantize_act_fp8(**a, shift=0.0)
    want = quantize_act_fp8(**a, shift=0.0)
    check(got, want)
    # not vacuous: the reference's ties went both ways, and to the even code
    codes = want[0].view(torch.uint8)[0, 1:127].int()
    assert (codes & 1).eq(0).all() and len(set(codes.tolist())) > 60


def test_e4m3_emulation_is_torchs_conversion():
    """The PTX interpreter's cvt.rn.satfinite.e4m3x2 (tests/ptx_ops.to_e4m3_bits) against torch's
    float8_e4m3fn cast of the clamped value: every tie, its fp32 neighbours, random values over
    the whole range, +-0, saturation, NaN."""
    mids = ((E4M3[:-1] + E4M3[1:]) / 2).numpy().astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e9))])
    rnd = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * np.exp2(
        np.random.default_rng(1).integers(-14, 9, 4000)
    ).astype(np.float32)
    x = np.concatenate([near, -near, rnd, [0.0, -0.0, 448.0, 460.0, 470.0, 1e30, -1e30, np.inf, -np.inf]])
    x = x.astype(np.float32)
    want = torch.from_numpy(x).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    got = to_e4m3_bits(x)
    assert np.array_equal(got.astype(np.int64), want.numpy().astype(np.int64))
    assert to_e4m3_bits(np.array([np.nan], np.float32))[0] == 0x7F


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, r, b", [(40, 192, 16, 2), (17, 512, 3, 1), (32, 256, 5, 2)])
def test_modulation_matches_reference(m, k, r, b, dtype):
    """Rows of two images (S = 20: blocks straddle them), one, and two of S = 16 (a block each)."""
    a = edge_inputs(m, k, r, dtype)
    a["x"] = a["x"] + 0.25  # a non-zero mean
    a["x"][1] = 0.0  # and a constant row
    g = torch.Generator().manual_seed(3)
    emb = (torch.randn(b, 6 * k, generator=g) * 0.4).to(dtype)  # chunks of it: row stride 6K
    mod = {"mod_scale": emb[:, k : 2 * k], "mod_shift": emb[:, :k]}
    got = AF.quantize_act_fp8(**a, **mod, shift=0.0)
    want = quantize_act_fp8(**a, **mod, shift=0.0)
    exact = dtype != torch.float32
    check(got, want, scale_rtol=0.0 if exact else 2**-20, neighbours=0.0 if exact else 2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, r", [(33, 128, 16), (9, 320, 0)])
def test_gelu_matches_reference(m, k, r, dtype):
    a = edge_inputs(m, k, r, dtype)
    got = AF.quantize_act_fp8(**a, shift=0.171875, gelu=True)
    want = quantize_act_fp8(**a, shift=0.171875, gelu=True)
    exact = dtype != torch.float32
    check(got, want, scale_rtol=0.0 if exact else 2**-20, neighbours=0.0 if exact else 2e-3)


def test_bad_inputs_are_named():
    a = act_inputs(4, 96, 2)
    with pytest.raises(ValueError, match="K must be a multiple of 64"):
        AF.quantize_act_fp8(**a, shift=0.0)
    a = act_inputs(4, 128, 2)
    with pytest.raises(ValueError, match="mod_scale and mod_shift"):
        AF.quantize_act_fp8(**a, mod_scale=a["x"][:1], shift=0.0)
    with pytest.raises(ValueError, match="smooth must be"):
        AF.quantize_act_fp8(a["x"], a["smooth"][:64], a["proj_down"], shift=0.0)
    with pytest.raises(ValueError, match="proj_down must be"):
        AF.quantize_act_fp8(a["x"], a["smooth"], a["proj_down"][:, :64], shift=0.0)
    with pytest.raises(ValueError, match="mod_shift must be"):
        AF.quantize_act_fp8(**a, mod_scale=a["x"][:1], mod_shift=a["x"][:1, :64], shift=0.0)
    with pytest.raises(ValueError, match="must divide M"):
        AF.quantize_act_fp8(**a, mod_scale=a["x"][:3], mod_shift=a["x"][:3], shift=0.0)
    codes, ascale, lora = AF.quantize_act_fp8(a["x"][:0], a["smooth"], a["proj_down"], shift=0.0)
    assert codes.shape == (0, 128) and ascale.shape == (0,) and lora.shape == (0, 2)


def test_block_k_divides_k():
    assert [AF.block_k(k, 256) for k in (64, 192, 384, 640, 3072, 15360)] == [64, 64, 128, 128, 256, 256]


# --- compiled for sm_90, executed by the PTX interpreter -------------------------------------------


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
@pytest.mark.parametrize("major", [9, 8])
def test_sm90_compile_executes_to_the_reference_bits(major):
    """The launch an H100 gets (sm_90 config, COMPILED: FMA divisions from the host's reciprocal,
    bf16 MMAs, the hardware e4m3 conversion), compiled for sm_90 and executed: codes and ascale
    bit for bit, lora_act to the hi + lo bound; the edge rows and a tie row included; every byte
    written, no findings (out of bounds, races). And an sm_8x GPU's (sm_86: its config, the
    conversion on the bits, compiled)."""
    m, k, r = 19, 256, 5
    a = edge_inputs(m, k, r, torch.bfloat16)
    smooth = 2.0 ** (torch.arange(k) % 3 - 1).float()
    a["smooth"] = smooth.to(torch.bfloat16)
    tie = torch.zeros(k)
    tie[0] = FP8_MAX
    tie[1:127] = (E4M3[:-1] + E4M3[1:]) / 2
    a["x"][7] = (tie * 2.0**-3 * smooth).to(torch.bfloat16)  # row 7: inv = 8, x_hat * inv on ties
    a["x"][8] = -a["x"][7]
    a["x"][9, 0] = 3e38  # / 0.5: x_hat past fp32's range, inf (the row's amax and ascale inf)
    rec = PC.record("act_fp8", lambda: AF.quantize_act_fp8(**a, shift=0.0), major=major)
    cc = 90 if major == 9 else 86
    (res,) = PC.compile_ptx([rec.request(cc)])
    assert f".target sm_{cc}" in res["ptx"]
    assert ("cvt.rn.satfinite.e4m3x2.f32" in res["ptx"]) == (major == 9)
    findings, written = PC.execute(rec, res)
    # the block's NaN check after pass 1 is Triton's cross-warp reduction, whose tail lanes
    # shuffle registers they never loaded and never store (test_ptx_exec_triton's filter)
    assert not _beyond_warp_reduction_tails(findings, res["ptx"]), findings.report()
    assert all(w.all() for w in written.values()), {n: int((~w).sum()) for n, w in written.items()}
    out = _outputs(rec)
    want = quantize_act_fp8(**a, shift=0.0)
    assert torch.isinf(want[1][[4, 5, 9]]).all() and torch.isnan(want[1][6])  # the edge rows are edges
    codes = out["codes_ptr"].view(torch.float8_e4m3fn)
    check((codes, out["ascale_ptr"], out["lora_ptr"]), want)
    assert torch.equal(codes.view(torch.uint8)[2], torch.zeros(k, dtype=torch.uint8))  # -0 row: +0 codes


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
@pytest.mark.parametrize("prologue", ["modulation", "gelu"])
def test_sm90_prologues_execute_to_the_reference(prologue):
    """The prologue variants as an H100 gets them, compiled for sm_90 and executed. The GPU's
    rsqrt / tanh (rsqrt.approx, ex2.approx, rcp.approx, emulated correctly rounded) and its
    statistics' order are not the CPU reference's, so as test_ptx_exec_triton bounds quantize_act's
    prologues: a code may move to its neighbour (< 1% of them), ascale within a bf16 ulp of x'."""
    m, k, r = 19, 256, 5
    a = act_inputs(m, k, r, seed=4)
    g = torch.Generator().manual_seed(1)
    kw = {"shift": 0.0}
    if prologue == "modulation":
        kw |= {"mod_scale": (torch.randn(1, k, generator=g) * 0.3).to(torch.bfloat16),
               "mod_shift": torch.randn(1, k, generator=g).to(torch.bfloat16)}  # fmt: skip
    else:
        kw |= {"gelu": True, "shift": 0.171875}
    rec = PC.record("act_fp8", lambda: AF.quantize_act_fp8(**a, **kw), major=9)
    (res,) = PC.compile_ptx([rec.request(90)])
    findings, written = PC.execute(rec, res)
    assert not _beyond_warp_reduction_tails(findings, res["ptx"]), findings.report()
    assert all(w.all() for w in written.values())
    out = _outputs(rec)
    want = quantize_act_fp8(**a, **kw)
    assert_codes(out["codes_ptr"].view(torch.float8_e4m3fn), want[0], neighbours=0.01)
    torch.testing.assert_close(out["ascale_ptr"], want[1], rtol=2**-7, atol=0)
    torch.testing.assert_close(out["lora_ptr"], want[2], **LORA_TOL)


def _outputs(rec) -> dict[str, torch.Tensor]:
    import inspect

    params = list(inspect.signature(AF.quantize_act_fp8_kernel.fn).parameters)
    return {n: rec.args[params.index(n)] for n in ("codes_ptr", "ascale_ptr", "lora_ptr")}


@triton.jit
def modulate_pair_kernel(
    x_ptr, ms_ptr, mh_ptr, mean_ptr, rstd_ptr, out_ptr, BM: tl.constexpr, BK: tl.constexpr
):
    """act_fp8.modulate16 and act.modulate, compiled (COMPILED=True) on the same tile: out[0], out[1]."""
    r = tl.arange(0, BM)
    offs = r[:, None] * BK + tl.arange(0, BK)[None, :]
    x = tl.load(x_ptr + offs).to(tl.float32)
    mean, rstd = tl.load(mean_ptr + r), tl.load(rstd_ptr + r)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    tl.store(out_ptr + offs, AF.modulate16(x, mean, rstd, ms_ptr + offs, mh_ptr + offs, dt, True))
    tl.store(out_ptr + BM * BK + offs, ACT.modulate(x, mean, rstd, ms_ptr + offs, mh_ptr + offs, dt, True))


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90_modulate16_is_act_modulate(dtype):
    """The 16-bit form of the modulation (mul.rn / add on bf16x2 or f16x2) against act.modulate's
    fp32 ops rounded to x's dtype, both compiled for sm_90 and executed: the same bits on values
    over a wide range of magnitudes (shift up to 2^12 times the product and down to 2^-12 of it,
    where an fp32 sum is rounded before the 16-bit rounding). A product fused into the add (an
    FMA, as Triton contracts ``a * b + c``) differs here."""
    bm, bk = 16, 64
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(bm, bk, generator=g) * 3).to(dtype)
    scale = (torch.randn(bm, bk, generator=g) * 0.5).to(dtype)
    spread = 2.0 ** torch.randint(-12, 13, (bm, bk), generator=g).float()
    shift = (torch.randn(bm, bk, generator=g) * spread).clamp(-6e4, 6e4).to(dtype)
    mean, rstd = torch.randn(bm, generator=g), torch.rand(bm, generator=g) + 0.5
    out = torch.empty(2, bm, bk)
    launch = PC.Launch(
        "tests.test_act_fp8:modulate_pair_kernel", (1, 1, 1), [x, scale, shift, mean, rstd, out],
        {"BM": bm, "BK": bk}, {"num_warps": 4},
    )  # fmt: skip
    PC.OUTPUTS.setdefault("modulate_pair_kernel", {"out_ptr"})
    (res,) = PC.compile_ptx([launch.request(90)])
    assert "mul.rn." in res["ptx"] and "fma.rn.bf16" not in res["ptx"] and "fma.rn.f16" not in res["ptx"]
    findings, written = PC.execute(launch, res)
    assert not findings, findings.report()
    assert written["out_ptr"].all()
    assert torch.equal(out[0].view(torch.int32), out[1].view(torch.int32))
    # and the tile's arithmetic is torch's: (xn * a rounded) + shift rounded, in x's dtype
    xn = ((x.float() - mean[:, None]) * rstd[:, None]).to(dtype)
    want = (xn * (1 + scale.float()).to(dtype) + shift).float()
    assert torch.equal(out[1], want)
