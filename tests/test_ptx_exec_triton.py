"""The Triton kernels' compiled PTX (sm_86, the GPU-only branches on), executed by the PTX
interpreter of tests/ptx_exec.py and compared with the reference backend.

Each launch is the launcher's own (engine.kernels.triton_backend / triton.rope), taken as a GPU
of compute capability 8.x would get it: its sm_86 config, COMPILED=True (inline-PTX nibble
unpacking, FMA conversions and division, libdevice tanh/rsqrt/rint), the host-side reciprocal of
smooth. The GEMM also runs with the bias-MMA conversion that gemm_config picks on sm_90 for
64-channel groups, forced into the sm_86 config (the same source, mma.sync instead of wgmma).
Shapes are edge shapes: odd M and N inside the tile, three K groups, ranks 0, 5 and 48; the
gate/residual epilogue (residual + gate * y, 16-bit roundings) with one, two and four images.

Where the reference is exact, the comparison is exact: GEMM inputs with power-of-two scales and
LoRA factors exact in tf32 (every product and sum is then exact in both), the quantizer's codes
and scales (the backend's contract: bit for bit). Elsewhere (the low-rank product of quantize_act,
the LayerNorm/GELU prologues and RoPE, whose GPU code uses rsqrt.approx / ex2.approx / rcp.approx,
emulated as correctly rounded) to the tolerances stated per test. Every run must also come out
clean of the interpreter's findings (out-of-bounds, misaligned, racy shared-memory accesses).

Broken variants show the checks bite: the GEMM's PTX with the barrier after its cp.async wait
removed, with the wait count one too high, and the bias tile as gemm.py built it before issue 22.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.kernels import reference
from engine.quant import pack_int4

from . import ptx_compile as PC
from .kernel_cases import act_inputs

tb = pytest.importorskip("engine.kernels.triton_backend")
from engine.kernels.triton import gemm as G  # noqa: E402
from engine.kernels.triton import rope as RP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CC = 86
M, N, K = 19, 21, 192  # odd M and N inside one 64 x 64 tile, three groups of 64
# gemm.py's bias tile before the fix of issue 22 (code only: comments may quote it)
_GEMM_CODE = "\n".join(
    line.split("#")[0] for line in (ROOT / "engine/kernels/triton/gemm.py").read_text().splitlines()
)
OLD_BIAS_TILE = re.search(r"other\s*=\s*0x80\b", _GEMM_CODE) is not None
# act.py's group maximum before the fix of issue 22: tl.max, which drops NaN on the GPU
_ACT_CODE = "\n".join(
    line.split("#")[0] for line in (ROOT / "engine/kernels/triton/act.py").read_text().splitlines()
)
OLD_NAN_MAX = "propagate_nan" not in _ACT_CODE


def exact_gemm_inputs(m: int, k: int, n: int, r: int, unsigned: bool, seed: int = 0) -> dict:
    """GEMM operands whose every product and sum is exact in fp32 (and in tf32 for the low-rank
    factors): power-of-two scales in [1/4, 2], LoRA activations in multiples of 1/8 below 1,
    small integer proj_up, bias in multiples of 1/4. Group-major ascales, as quantize_act returns."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if unsigned else (-8, 8)
    groups = k // 64
    pow2 = lambda *s: torch.exp2(torch.randint(-2, 2, s, generator=g).float())  # noqa: E731
    return {
        "qx": pack_int4(torch.randint(lo, hi, (m, k), generator=g, dtype=torch.int8)),
        "ascales": pow2(groups, m).t(),
        "qweight": pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)),
        "wscales": pow2(groups, n).t().to(torch.bfloat16),
        "lora_act": torch.randint(-8, 8, (m, r), generator=g).float() / 8,
        "proj_up": torch.randint(-8, 8, (n, r), generator=g).to(torch.bfloat16),
        "bias": (torch.randint(-16, 16, (n,), generator=g).float() / 4).to(torch.bfloat16),
    }


def _gemm(r: int, unsigned: bool, bias_mma: bool, m: int = M, out_dtype=torch.float32, images: int = 0,
          large: bool = False):  # fmt: skip
    """``images``: the partial/gate/residual epilogue, gate [images, N] (M divisible by it);
    ``large``: sm_86's 128 x 64 config whatever M (its partial-first and two-gate-row paths)."""
    a = exact_gemm_inputs(m, K, N, r, unsigned)
    if images:
        g = torch.Generator().manual_seed(4)
        a["partial"] = (torch.randint(-32, 32, (m, N), generator=g) / 4).to(out_dtype)  # exact
        a["residual"] = (torch.randn(m, N, generator=g) * 8).to(out_dtype)
        a["gate"] = torch.randn(images, N, generator=g).to(out_dtype)

    def launch():
        cfg = G.GEMM_CONFIGS[8]["large"] if large else G.gemm_config(8, m)  # sm_86's (not the interpreter's)
        # sm_90's choice of conversion for 64-channel groups, forced onto the sm_86 tile
        cfg = replace(cfg, bias_mma=G.gemm_config(9, m, 64).bias_mma if bias_mma else False)
        tb.launch_w4a4_gemm(**a, unsigned=unsigned, out_dtype=out_dtype, config=cfg)

    want = reference.w4a4_gemm(**a, unsigned=unsigned, out_dtype=out_dtype)
    return "gemm", launch, want


def _act(r: int, unsigned: bool, prologue: str | None, m: int = M, dtype=torch.bfloat16, nan_at=None):
    a = act_inputs(m, K, r, dtype=dtype, unsigned=unsigned and prologue != "gelu")
    if nan_at:
        a["x"][nan_at] = float("nan")
    kw = {"group_size": 64, "unsigned": unsigned, "shift": 0.171875 if unsigned else 0.0}
    g = torch.Generator().manual_seed(1)
    mods = {"mod_scale": None, "mod_shift": None}
    if prologue == "modulate":
        mods = {"mod_scale": (torch.randn(1, K, generator=g) * 0.3).to(dtype),
                "mod_shift": torch.randn(1, K, generator=g).to(dtype)}  # fmt: skip

    def launch():
        tb.quantize_act_prologue(**a, **mods, **kw, gelu=prologue == "gelu")

    want = reference.quantize_act_prologue(**a, **mods, **kw, gelu=prologue == "gelu")
    return "act", launch, want


def _gemv(m: int = 3):
    g = torch.Generator().manual_seed(2)
    k, n = 512, 21
    x = (torch.randint(-8, 8, (m, k), generator=g).float() / 8).to(torch.bfloat16)
    qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    ws = torch.exp2(torch.randint(-3, 1, (n, k // 64), generator=g).float()).to(torch.bfloat16)
    wz = torch.randint(-8, 8, (n, k // 64), generator=g).to(torch.bfloat16)
    bias = (torch.randint(-8, 8, (n,), generator=g).float() / 4).to(torch.bfloat16)
    return "gemv", lambda: tb.w4a16_gemv(x, qw, ws, wz, bias), reference.w4a16_gemv(x, qw, ws, wz, bias)


def _rope(two_parts: bool = True):
    g = torch.Generator().manual_seed(3)
    h, d = 2, 16
    qkv0 = torch.randn(1, 5, 3 * h * d, generator=g).bfloat16()
    qkv1 = torch.randn(1, 7, 3 * h * d, generator=g).bfloat16()
    w0, w1 = torch.randn(d, generator=g).bfloat16(), torch.randn(d, generator=g).bfloat16()
    ang = torch.randn(12, d // 2, generator=g).repeat_interleave(2, dim=1)
    cos, sin = ang.cos(), ang.sin()
    if not two_parts:
        qkv1, cos, sin = None, cos[:5], sin[:5]
    args = (qkv0, w0, w1, qkv1, w1 if two_parts else None, w0 if two_parts else None, cos, sin)
    kw = {"heads": h, "eps": 1e-6}
    return "rope", lambda: RP.qk_norm_rope(*args, **kw), reference.qk_norm_rope(*args, **kw)


CASES = {
    "gemm_s_r5": lambda: _gemm(5, False, False),
    "gemm_u_r48": lambda: _gemm(48, True, False),
    "gemm_s_r0_biasmma": lambda: _gemm(0, False, True),
    "gemm_u_r5_biasmma": lambda: _gemm(5, True, True),
    # the gate/residual epilogue, bf16 (three roundings, exact: y is) and two images' gate rows
    "gemm_u_r5_gated_bf16": lambda: _gemm(5, True, False, m=20, out_dtype=torch.bfloat16, images=2),
    "act_s_r5": lambda: _act(5, False, None),
    "act_s_r0_modulate": lambda: _act(0, False, "modulate"),
    "act_u_r48_gelu": lambda: _act(48, True, "gelu"),
    "gemv": _gemv,
    "rope": _rope,
    "act_nan": lambda: _act(5, False, None, nan_at=(3, 70)),
    "old_bias_tile": lambda: _old_bias_tile(),
}
SLOW_CASES = {
    "gemm_s_r48_biasmma_2cta": lambda: _gemm(48, False, True, m=70),
    "gemm_s_r0_2cta_bf16": lambda: _gemm(0, False, False, m=70, out_dtype=torch.bfloat16),
    "act_u_r0_2cta_f32": lambda: _act(0, True, None, m=33, dtype=torch.float32),
    "act_s_r48_modulate": lambda: _act(48, False, "modulate"),
    "act_s_r5_f32": lambda: _act(5, False, None, dtype=torch.float32),  # fp32 proj_down: tf32x3
    "gemm_u_r5_bf16": lambda: _gemm(5, True, False, out_dtype=torch.bfloat16),
    "gemm_s_r0_gated_f16_2cta": lambda: _gemm(0, False, False, m=70, out_dtype=torch.float16, images=1),
    "gemm_s_r5_gated_biasmma": lambda: _gemm(5, False, True, m=20, out_dtype=torch.bfloat16, images=4),
    "gemm_s_r5_gated_large_2cta": lambda: _gemm(5, False, False, m=130, out_dtype=torch.bfloat16, images=1, large=True),
    "gemm_u_r0_gated_large_2img": lambda: _gemm(0, True, False, m=40, out_dtype=torch.bfloat16, images=2, large=True),
    "gemv_m1": lambda: _gemv(1),
    "gemv_m4": lambda: _gemv(4),
    "rope_one_part": lambda: _rope(two_parts=False),
}


def _old_bias_tile():
    x = torch.zeros(64, dtype=torch.uint8)
    out = torch.empty(16, 16, dtype=torch.int32)
    launch = PC.Launch("tests.ptx_compile:old_bias_tile_kernel", (1, 1, 1), [x, out, 64],
                       {"BLOCK_N": 16, "K_BIAS": 64}, {"num_warps": 4, "num_stages": 1})  # fmt: skip
    return None, launch, None


def _build(cases: dict) -> dict:
    built = {}
    for name, make in cases.items():
        kind, launch, want = make()
        built[name] = (PC.record(kind, launch) if kind else launch, want)
    results = PC.compile_ptx([launch.request(CC) for launch, _ in built.values()])
    return {name: (lw[0], lw[1], res) for (name, lw), res in zip(built.items(), results, strict=True)}


@pytest.fixture(scope="module")
def compiled() -> dict:
    return _build(CASES)


def _run(launch, res, ptx: str | None = None, approx: str = "exact"):
    return PC.execute(launch, {**res, "ptx": ptx} if ptx else res, approx=approx)


def _outputs(launch) -> dict[str, torch.Tensor]:
    import inspect

    mod, attr = launch.kernel.split(":")
    fn = getattr(__import__(mod, fromlist=[attr]), attr)
    names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    outs = PC.OUTPUTS[attr]
    return {n: a for n, a in zip(names, launch.args, strict=False) if n in outs}


def check(name: str, launch, want, res, approx: str = "exact") -> None:
    findings, written = _run(launch, res, approx=approx)
    assert not findings, findings.report()
    outs = _outputs(launch)
    kind = name.split("_")[0]
    if kind == "gemm":
        y = outs["out_ptr"]
        assert torch.equal(y, want), (y - want.to(y.dtype)).abs().max()
    elif kind == "act":
        qx, ascales, lora = outs["qx_ptr"], outs["ascales_ptr"], outs["lora_ptr"]
        if "modulate" in name or "gelu" in name:
            # rsqrt / tanh (ex2, rcp) are approximate on the GPU: a code may move by one where a
            # value sits on a rounding boundary; the scales to a bf16 ulp of the prologue output
            codes, codes_r = _codes(qx), _codes(want[0])
            assert (codes - codes_r).abs().max() <= 1 and (codes != codes_r).float().mean() < 0.01
            torch.testing.assert_close(ascales, want[1], rtol=2**-7, atol=0)
        else:
            assert torch.equal(qx, want[0])  # codes bit for bit
            assert torch.equal(ascales, want[1])
        # bf16 hi + lo (or tf32x3) against fp32: ~2^-16 relative
        torch.testing.assert_close(lora, want[2], rtol=1e-4, atol=1e-4)
    elif kind == "gemv":
        assert torch.equal(outs["y_ptr"], want)
    elif kind == "rope":
        for got, ref in zip((outs["q_ptr"], outs["k_ptr"], outs["v_ptr"]), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=2**-7, atol=1e-6)  # rsqrt.approx: one bf16 ulp
    for n, w in written.items():  # every byte of every output written
        assert w.all(), f"{n}: {int((~w).sum())} bytes never written"


def _codes(qx: torch.Tensor) -> torch.Tensor:
    """Packed bytes [M, K/2] -> the 4-bit fields [M, K] (low nibble first), as unsigned ints."""
    return torch.stack([qx & 0xF, qx >> 4], dim=-1).flatten(1).int()


SPECIAL = {"act_nan", "old_bias_tile"}  # cases with their own test below


@pytest.mark.parametrize("name", [n for n in CASES if "biasmma" not in n and n not in SPECIAL])
def test_compiled_kernel_matches_reference(compiled, name):
    check(name, *compiled[name])


@pytest.mark.parametrize("name", [n for n in CASES if "biasmma" in n])
def test_bias_mma_path(compiled, name):
    """sm_90's conversion, compiled for sm_86. While gemm.py builds its bias tile with
    ``other=0x80`` (before issue 22's fix), the compiled constant is 0xffffffffffffff80 and the
    result is wrong: the harness must see that; once fixed, the result must be exact."""
    launch, want, res = compiled[name]
    if OLD_BIAS_TILE:
        assert "0xffffffffffffff80" in res["ptx"]
        findings, _ = _run(launch, res)
        assert not findings, findings.report()
        got = _outputs(launch)["out_ptr"]
        assert not torch.allclose(got, want, rtol=0.5), "the old bias tile should give a wrong GEMM"
    else:
        check(name, launch, want, res)


def test_nan_reaches_the_scale(compiled):
    """A NaN in x makes its group's scale NaN, as torch.amax (the reference) does. Before issue
    22's fix, tl.max compiled to ``max.f32``, which drops NaN: the harness must see the finite
    scale there; once fixed, NaN scales in the same places and the other groups exact."""
    launch, want, res = compiled["act_nan"]
    findings, _ = _run(launch, res)
    assert not findings, findings.report()
    outs = _outputs(launch)
    got, ref = outs["ascales_ptr"], want[1]
    nan = torch.isnan(ref)
    assert nan.sum() == 1
    same_nan = torch.equal(torch.isnan(got), nan)
    if OLD_NAN_MAX:
        assert not same_nan, "the old max.f32 reduction should drop the NaN"
    else:
        assert same_nan
    assert torch.equal(got[~nan], ref[~nan])
    codes, codes_r = _codes(outs["qx_ptr"]), _codes(want[0])
    group = nan.repeat_interleave(64, dim=1)  # codes of the NaN group are not compared
    assert torch.equal(codes[~group], codes_r[~group])


@pytest.fixture(scope="module")
def compiled_slow() -> dict:
    return _build({n: f for n, f in SLOW_CASES.items() if not ("biasmma" in n and OLD_BIAS_TILE)})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_compiled_kernel_matches_reference_slow(compiled_slow, name):
    if "biasmma" in name and OLD_BIAS_TILE:
        pytest.skip("gemm.py's old bias tile: test_bias_mma_path shows the wrong result")
    check(name, *compiled_slow[name])


@pytest.mark.parametrize("name", ["gemm_s_r5", "act_s_r5", "gemv"])
def test_exact_paths_do_not_lean_on_approximations(compiled, name):
    """The exact comparisons again with every approximate instruction (rcp/ex2/rsqrt .approx,
    div.full) one ulp off, as the GPU may compute them: the exact paths must not use any."""
    check(name, *compiled[name], approx="perturb")


# --- broken variants: the checks must catch them ---------------------------------------------------


def _loop_wait(ptx: str) -> re.Match:
    """The main loop's ``cp.async.wait_group N; bar.sync 0;`` (the first wait followed by a barrier)."""
    m = re.search(r"cp\.async\.wait_group\s+(\d+);(\s*)bar\.sync\s+0;", ptx)
    assert m, "no cp.async wait + barrier in the GEMM's PTX"
    return m


def test_removed_barrier_is_a_race(compiled):
    launch, _, res = compiled["gemm_s_r5"]
    m = _loop_wait(res["ptx"])
    broken = res["ptx"][: m.start()] + f"cp.async.wait_group {m.group(1)};" + res["ptx"][m.end() :]
    findings, _ = _run(launch, res, broken)
    assert findings.kinds() & {"race-raw", "race-war"}, findings.report()


def test_wait_count_off_by_one_reads_in_flight_data(compiled):
    launch, want, res = compiled["gemm_s_r5"]
    m = _loop_wait(res["ptx"])
    n = int(m.group(1)) + 1
    broken = (
        res["ptx"][: m.start()] + f"cp.async.wait_group {n};{m.group(2)}bar.sync 0;" + res["ptx"][m.end() :]
    )
    findings, _ = _run(launch, res, broken)
    assert "race-inflight" in findings.kinds(), findings.report()
    assert not torch.equal(_outputs(launch)["out_ptr"], want)  # and the stale tiles show in the result


def test_old_bias_tile_constant_is_caught(compiled):
    """gemm.py's bias tile as it was (tests/ptx_compile.py: old_bias_tile_kernel): the harness
    sees the sign-extended constant's product."""
    launch, _, res = compiled["old_bias_tile"]
    findings, written = _run(launch, res)
    assert not findings and written["out_ptr"].all(), findings.report()
    out = launch.args[1]
    if "0xffffffffffffff80" in res["ptx"]:  # triton 3.6: the tile holds (-128, -1, -1, -1) per 4 bytes
        assert (out == 16 * (16384 + 3 * 128)).all(), out
    else:  # a triton that materializes four 0x80 bytes
        assert (out == 64 * (1 << 14)).all(), out


# --- qk_norm_rope_sage: both launches, against the plain kernel's compiled output and the package ----


def _sage_inputs():
    g = torch.Generator().manual_seed(4)
    h, d, s0, s1 = 1, 64, 37, 100  # two query blocks; the part boundary inside the first
    qkv0 = (torch.randn(1, s0, 3 * h * d, generator=g) * 2).bfloat16()
    qkv1 = (torch.randn(1, s1, 3 * h * d, generator=g) * 2).bfloat16()
    w = [(torch.rand(d, generator=g) * 2).bfloat16() for _ in range(4)]
    ang = torch.randn(s0 + s1, d // 2, generator=g).repeat_interleave(2, dim=1)
    return (qkv0, w[0], w[1], qkv1, w[2], w[3], ang.cos(), ang.sin()), {"heads": h, "eps": 1e-6}


def _beyond_warp_reduction_tails(findings, ptx: str) -> list:
    """The findings other than Triton's cross-warp reduction tail, which these kernels' whole-tile
    max and column sums compile to: after the shared-memory exchange only lanes < num_warps load
    a partial (``@%p ld.shared.b32 %rN``), the others shuffle the unwritten %rN within their own
    16-lane (or smaller) butterfly and their store back is predicated off by the same %p, so no
    lane that is stored ever reads it. Every other finding (and any uninitialized register not
    loaded that way) is kept."""
    import re as _re

    tails = set(_re.findall(r"@%p\d+ ld\.shared\.b32 (%r\d+),", ptx))
    kept = []
    for f in findings.items:
        reg = _re.match(r"(%r\d+) read before any write", f.detail)
        benign = f.kind == "uninit-register" and reg and reg.group(1) in tails
        if not (benign and _re.match(r"\s*(\$L__\w+:\s*)?(shfl\.sync\.bfly\.b32|max(\.NaN)?\.f32|add\.f32)", f.line)):
            kept.append(f)
    return kept


@pytest.fixture(scope="module")
def compiled_sage() -> dict:
    args, kw = _sage_inputs()
    ref_q, k_plain, ref_v = reference.qk_norm_rope(*args, **kw)
    # the K launch's input: K with a large shared offset (what sage's smoothing removes), so the
    # mean is as large as K and the last block's tokens past S must count as 0, not -mean
    g = torch.Generator().manual_seed(6)
    ref_k = (k_plain.float() + 6 * torch.randn(k_plain.shape[-1], generator=g)).to(k_plain.dtype)
    nbq = -(-ref_k.shape[1] // 128)
    k_sum = torch.nn.functional.pad(ref_k.float(), (0, 0, 0, 0, 0, 128 * nbq - ref_k.shape[1]))
    k_sum = k_sum.view(1, nbq, 128, *ref_k.shape[2:]).sum(dim=2).permute(0, 2, 1, 3).contiguous()  # [B, H, nbq, D]
    launches = {
        "plain": PC.record("rope", lambda: RP.qk_norm_rope(*args, **kw)),
        "rope_sage": PC.record("rope_sage", lambda: RP.launch_norm_rope_sage(*args, **kw)),
        "sage_k": PC.record("sage_k", lambda: RP.launch_sage_k_quant(ref_k, k_sum)),
    }
    results = PC.compile_ptx([launch.request(CC) for launch in launches.values()])
    return {n: (launch, res) for (n, launch), res in zip(launches.items(), results, strict=True)} | {
        "ref": (ref_q, ref_k, ref_v, k_sum)
    }


def test_compiled_sage_preparation_is_the_packages_arithmetic(compiled_sage):
    """The first launch's PTX (sm_86, 16 warps) next to the plain kernel's on the same inputs: k
    the same bytes; q8 and q_scale per_block_int8's of the plain kernel's q (the reference's
    arithmetic, torch); the per-block sums of k to fp32 rounding (V is not written)."""
    from engine.quant.ops import SAGE_BLOCK_Q, sage_per_block_int8, sage_q_multiplier

    plain, res = compiled_sage["plain"]
    findings, _ = _run(plain, res)
    assert not findings, findings.report()
    q, k = (_outputs(plain)[n] for n in ("q_ptr", "k_ptr"))
    launch, res = compiled_sage["rope_sage"]
    findings, written = _run(launch, res)
    assert not _beyond_warp_reduction_tails(findings, res["ptx"]), findings.report()
    assert all(w.all() for w in written.values()), {n: int((~w).sum()) for n, w in written.items()}
    out = _outputs(launch)
    assert torch.equal(out["k_ptr"], k)
    q8, q_scale = sage_per_block_int8(q, SAGE_BLOCK_Q, sage_q_multiplier(q.shape[-1]))
    assert torch.equal(out["q8_ptr"], q8) and torch.equal(out["q_scale_ptr"], q_scale)
    k_sum = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, 128 * q_scale.shape[2] - k.shape[1]))
    k_sum = k_sum.view(1, -1, 128, *k.shape[2:]).sum(dim=2).permute(0, 2, 1, 3)
    torch.testing.assert_close(out["k_sum_ptr"], k_sum, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("approx", ["exact", "perturb"])
def test_compiled_sage_k_quantization_is_the_packages(compiled_sage, approx):
    """The second launch's PTX (sm_86): the mean from the block sums (IEEE division, rounded to
    bf16) and per_block_int8's codes and scales of T(k - mean), against the reference on the
    same k; with every approximate instruction one ulp off too (its divisions, ``max / 127.`` and
    ``x / scale``, are the package's div.full.f32, as sage's own kernel compiles them: a scale may
    then move by an ulp and a code on a rounding boundary by one; the mean's division is IEEE)."""
    from engine.quant.ops import SAGE_BLOCK_K, sage_per_block_int8

    _, ref_k, _, k_sum = compiled_sage["ref"]
    launch, res = compiled_sage["sage_k"]
    findings, written = _run(launch, res, approx=approx)
    assert not _beyond_warp_reduction_tails(findings, res["ptx"]), findings.report()
    assert all(w.all() for w in written.values())
    mean = (k_sum.sum(dim=2) / ref_k.shape[1]).to(torch.bfloat16)[:, None]  # [B, 1, H, D]
    k8, k_scale = sage_per_block_int8(ref_k - mean, SAGE_BLOCK_K, 1.0)
    out = _outputs(launch)
    if approx == "exact":
        assert torch.equal(out["k_scale_ptr"], k_scale) and torch.equal(out["k8_ptr"], k8)
    else:
        torch.testing.assert_close(out["k_scale_ptr"], k_scale, rtol=2**-22, atol=0)
        diff = (out["k8_ptr"].int() - k8.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


# --- quantize_act as an H100 gets it: sm_90 config, compiled for sm_90 ------------------------------


@pytest.mark.parametrize("unsigned, r", [(False, 5), (True, 48)])
def test_act_compiled_for_sm90_matches_reference(unsigned, r):
    """The act kernel as the launcher runs it on sm_90 (its config, COMPILED, the fp32 smooth and
    its reciprocal from the host), compiled for sm_90 (mma.sync, cp.async, ldmatrix: nothing
    sm_90-only in it) and executed: codes and scales bit for bit, lora_act to hi + lo accuracy."""
    kind, launch, want = _act(r, unsigned, None)
    rec = PC.record(kind, launch, major=9)
    (res,) = PC.compile_ptx([rec.request(90)])
    assert ".target sm_90" in res["ptx"]
    check(f"act_sm90_{r}", rec, want, res)


def test_act_sm90_negative_zeros_give_the_bits_of_x_plus_0():
    """Signed quantize_act with shift 0 skips ``x + shift`` on the GPU (bf16 x), so -0.0 reaches
    the divisions as -0 where the reference's x + 0.0 makes it +0: the codes, the scales and
    the low-rank product must not see it. A row of -0 (its low-rank row +0.0, sign bit clear, as
    the reference's), a group of -0, scattered -0; the sm_90 config compiled for sm_90, executed."""
    a = act_inputs(M, K, 5)
    x = a["x"]
    x[1] = -0.0
    x[2, 64:128] = -0.0
    x[5:, ::7] = -0.0
    kw = {"group_size": 64, "unsigned": False, "shift": 0.0}

    def launch():
        tb.quantize_act(**a, **kw)

    want = reference.quantize_act(**a, **kw)
    rec = PC.record("act", launch, major=9)
    (res,) = PC.compile_ptx([rec.request(90)])
    check("act_sm90_negzero", rec, want, res)
    lora = _outputs(rec)["lora_ptr"]
    assert torch.equal(lora[1].view(torch.int32), torch.zeros(5, dtype=torch.int32))  # +0.0 bits
