"""Static checks of the Triton kernels, no GPU needed.

1. The performance gates of scripts/kernel_model_triton.py: every kernel and config compiled
   for sm_90, sm_86 and sm_80 by triton's ptxas with the launcher's arguments for FLUX's shapes,
   its SASS counted (no spills, int8 MMA and no I2F in the GEMM's main loop, <= 600 SASS per
   group on sm_90, vector loads), and the GEMV's bytes counted from its own loads.
2. The exact arithmetic tricks the compiled kernels rely on, over their whole input range:
   the magic-number int -> float conversion, Hopper's bias-MMA / lowest-binade conversion,
   nibble unpacking, and the FMA division.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from engine.kernels.triton.act import LORA_CHUNK as ACT_LORA_CHUNK
from engine.kernels.triton.common import (
    BIAS_MMA_UNIT,
    I2F_EXACT_LIMIT,
    I2F_MAGIC_BITS,
    MAX_GEMM_GROUP,
    SUB_IN_EXP,
    SUB_OUT_EXP,
    scale_biased,
    scale_lowest_binade,
    unpack_nibbles,
)
from engine.kernels.triton.gemm import bias_mma_channels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kernel_model_triton.py"


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


@pytest.mark.slow
def test_static_performance_gates(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-gemv-bytes", "--json", str(out)],
        env=_env(False),
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    assert res.returncode == 0, (res.stderr[-3000:], report and report["gates_failed"])
    static = report["static"]
    assert {e["cc"] for e in static["gemm"]} == {90, 86, 80}
    for e in static["gemm"] + static["act"] + static["gemv"]:
        assert e["stack_bytes"] == 0 and e["spill_instrs"] == 0, e
    for e in static["gemm"]:
        mma = "IGMMA.64x" if e["cc"] == 90 else "IMMA.16832.S8.S8"
        assert any(op.startswith(mma) for op in e["loop_ops"]), (e["cc"], e["loop_ops"])
        assert e["loop_i2f"] == 0
        assert e["bias_mma"] or e["acc_init"] > 0  # the magic-number conversion is really there
    picked = [e for e in static["gemm"] if e["cc"] == 90 and e["config"] == "large"]
    assert picked and all(e["loop_sass"] <= 600 for e in picked)
    for e in static["gemm"]:
        assert e["loop_ftz"] == 0  # the lowest-binade conversion needs subnormals kept
        if e["bias_mma"]:
            # Hopper: no accumulator resets; one MMA per group with its accumulator off
            # (the bias), its tensor work counted in the model
            assert e["cc"] == 90 and e["acc_init"] == 0 and e["loop_mma_acc_off"] >= 1, e
        elif e["cc"] == 90:
            # wgmma accumulates in place: every accumulator register is reset once per group
            assert e["acc_init"] == e["block_m"] * e["block_n"] / (e["num_warps"] * 32), e
    for e in static["act"]:
        assert e["loop_narrowest_load"] >= 8, e["loop_ops"]  # contiguous tiles, no 2-byte loads
    assert report["model"] and all(r["gemm_us_overlapped"] > 0 for r in report["model"])


@pytest.mark.slow
def test_gemv_moves_the_packed_weight_and_scales_once():
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--gemv-bytes-child", "4,3072,512"],
        env=_env(True),
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    for name in ("qweight", "wscales", "wzeros"):  # every byte loaded, and loaded once
        assert got[name]["loaded"] == got[name]["unique"] == got[name]["bytes"], (name, got[name])
    packed = sum(got[name]["bytes"] for name in ("qweight", "wscales", "wzeros"))
    unique = sum(v["unique"] for v in got.values() if isinstance(v, dict))
    assert packed <= unique <= 1.10 * packed, (unique, packed)
    assert got["max_abs_err_vs_reference"] <= 16  # bf16 outputs of magnitude ~2000: <= 1 ulp


@triton.jit
def _i2f_kernel(v_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    biased = tl.load(v_ptr + offs) + 0x4B400000  # what the MMA leaves: its sum on the magic bits
    tl.store(out_ptr + offs, scale_biased(biased, 1.0, -12582912.0, False))


def test_magic_int_to_float_is_exact_over_its_whole_range():
    """Every int32 the GEMM's dot can produce (|v| <= 2^22 for groups up to 256), through the
    kernel's own conversion (the interpreter's form; the GPU's one-FMA form is checked against
    exact arithmetic below)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the jit helper in the interpreter (CPU CI)")
    v = torch.arange(-I2F_EXACT_LIMIT, I2F_EXACT_LIMIT + 1, dtype=torch.int32)
    block = 1 << 20
    padded = torch.cat([v, v.new_zeros(-v.numel() % block)])
    out = torch.empty(padded.shape, dtype=torch.float32)
    _i2f_kernel[(padded.numel() // block,)](padded, out, BLOCK=block)
    assert torch.equal(out[: v.numel()], v.float())
    assert I2F_EXACT_LIMIT == MAX_GEMM_GROUP * (16 * 8) * (16 * 8)  # both codes -8, both x16
    assert torch.tensor(12582912.0).view(torch.int32).item() == I2F_MAGIC_BITS


@triton.jit
def _unpack_kernel(p_ptr, lo_ptr, hi_ptr, SIGNED: tl.constexpr):
    i = tl.arange(0, 256)
    lo, hi = unpack_nibbles(tl.load(p_ptr + i), SIGNED, False)
    tl.store(lo_ptr + i, lo)
    tl.store(hi_ptr + i, hi)


@pytest.mark.parametrize("signed", [True, False])
def test_unpack_nibbles_every_byte(signed):
    """signed codes come out as 16 * code (exact in int8), unsigned as the code."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the jit helper in the interpreter (CPU CI)")
    p = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    lo, hi = torch.empty(256, dtype=torch.int8), torch.empty(256, dtype=torch.int8)
    _unpack_kernel[(1,)](p, lo, hi, SIGNED=signed)
    code_lo, code_hi = p.int() & 0xF, p.int() >> 4
    if signed:
        code_lo, code_hi = 16 * (code_lo - 16 * (code_lo >= 8)), 16 * (code_hi - 16 * (code_hi >= 8))
    assert torch.equal(lo.int(), code_lo) and torch.equal(hi.int(), code_hi)


def test_word_level_unpacking_equals_bytewise():
    """The GPU path unpacks four bytes per 32-bit instruction (shl/and, shr/and): no nibble
    leaks into a neighbour byte, for every byte value in every lane of a word."""
    b = torch.arange(256, dtype=torch.int64)
    words = b | ((255 - b) << 8) | (b << 16) | ((b ^ 0x5A) << 24)  # every byte value in every lane
    lo_s, hi = ((words << 4) & 0xF0F0F0F0) & 0xFFFFFFFF, words & 0xF0F0F0F0
    lo_u, hi_u = words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F
    for lane in range(4):
        byte = (words >> (8 * lane)) & 0xFF
        assert torch.equal((lo_s >> (8 * lane)) & 0xFF, (byte << 4) & 0xFF)
        assert torch.equal((hi >> (8 * lane)) & 0xFF, byte & 0xF0)
        assert torch.equal((lo_u >> (8 * lane)) & 0xFF, byte & 0x0F)
        assert torch.equal((hi_u >> (8 * lane)) & 0xFF, byte >> 4)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fma with one rounding, emulated: a * b is exact in fp64 (48 bits)."""
    return (a.double() * b.double() + c.double()).float()


def test_fma_division_is_ieee_division():
    """div_correct (engine/kernels/triton/common.py) on the GPU: q = a * RN(1/b), then
    q + fma(-q, b, a) * RN(1/b). Checked against IEEE fp32 division on 4M random pairs over
    the exponent range the kernels see, ties of the code rounding included."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 22
    a = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
    b = torch.rand(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float()) + 1e-30
    k = torch.randint(-16, 17, (n // 4,), generator=g).float() / 2  # quotients at exact half-integers
    a[: n // 4] = k * b[: n // 4]
    rb = 1.0 / b
    q = a * rb
    got = _fma32(_fma32(-q, b, a), rb, q)
    assert torch.equal(got, a / b)


def test_one_fma_removes_the_bias_and_scales_exactly():
    """The GPU GEMM's epilogue: with s22 = the scale rounded to 22 significant bits,
    -1.5 * 2^23 * s22 is exact in fp32 and fma(bits(1.5 * 2^23 + v), s22, -1.5 * 2^23 * s22)
    is RN(v * s22): a single rounding of the exact product, as if v had been converted first."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    v = torch.randint(-I2F_EXACT_LIMIT, I2F_EXACT_LIMIT + 1, (n,), generator=g)
    v[:4] = torch.tensor([-I2F_EXACT_LIMIT, I2F_EXACT_LIMIT, 0, 1])
    s = (torch.rand(n, generator=g) * torch.exp2(torch.randint(-30, 10, (n,), generator=g).float())) / 256
    bits = s.view(torch.int32)
    s22 = ((bits + 2) & -4).view(torch.float32)  # round_to_22_bits
    assert ((s22 - s).abs() <= s * 2.0**-22).all()  # two ulps at most
    bias = torch.full((n,), 12582912.0)
    neg = -12582912.0 * s22
    assert torch.equal(neg.double(), -12582912.0 * s22.double())  # exact
    biased = (v.int() + 0x4B400000).view(torch.float32)
    assert torch.equal(biased.double(), bias.double() + v.double())
    assert torch.equal(_fma32(biased, s22, neg), (v.double() * s22.double()).float())


def _dot_range(group: int, unsigned: bool) -> tuple[int, int]:
    """The most negative and most positive dot of one group as the GEMM's MMA sees it: weights
    x16 (-128..112), activations x16 when signed, codes 0..15 when unsigned."""
    xs = (0, 15) if unsigned else (-128, 112)
    prods = [a * b for a in xs for b in (-128, 112)]
    return group * min(prods), group * max(prods)


def test_bias_mma_keeps_every_dot_in_the_lowest_binade():
    """B + dot in [0, 2^24) for every group size the GEMM takes, signed and unsigned: the range
    where int32 bits read as fp32 are the integer times 2^-149."""
    for group in (64, 128, 256):
        for unsigned in (False, True):
            bias = bias_mma_channels(group, unsigned) * BIAS_MMA_UNIT.value
            lo, hi = _dot_range(group, unsigned)
            assert bias + lo >= 0 and bias + hi < 1 << 24, (group, unsigned)
    bits = torch.tensor([0, 1, (1 << 23) - 1, 1 << 23, (1 << 24) - 1], dtype=torch.int32)
    assert torch.equal(bits.view(torch.float32).double(), bits.double() * 2.0**-149)


@triton.jit
def _lowest_binade_kernel(
    v_ptr, s_ptr, out_ptr, BIAS: tl.constexpr, BIAS_VALUE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(s_ptr + offs)
    biased = tl.load(v_ptr + offs) + BIAS  # what the bias MMA and the data MMA leave
    tl.store(out_ptr + offs, scale_lowest_binade(biased, s, -BIAS_VALUE * s, BIAS_VALUE, False))


@pytest.mark.parametrize("group,unsigned", [(64, False), (64, True), (256, False)])
def test_lowest_binade_conversion_is_exact_over_its_whole_range(group, unsigned):
    """Every dot of a 64-channel group (a million random ones at 256), with activation scales
    over 60 binades: the kernel's interpreter form and the GPU's one-FMA form (emulated
    exactly) both give RN(dot * INV * sa) in units of 2^-69, one rounding."""
    k_bias = bias_mma_channels(group, unsigned)
    bias = k_bias * BIAS_MMA_UNIT.value
    lo, hi = _dot_range(group, unsigned)
    g = torch.Generator().manual_seed(group + unsigned)
    if group == 64:
        v = torch.arange(lo, hi + 1, dtype=torch.int32)
    else:
        v = torch.randint(lo, hi + 1, (1 << 20,), generator=g, dtype=torch.int32)
        v[:2] = torch.tensor([lo, hi])
    n = v.numel()
    inv = 1.0 / 16.0 if unsigned else 1.0 / 256.0
    sa = torch.rand(n, generator=g) * torch.exp2(torch.randint(-40, 20, (n,), generator=g).float()) + 1e-30
    s = sa * (inv * 2.0**SUB_IN_EXP.value)  # the kernel's SCALE_IN: exact, a power of two
    neg = sa * (-inv * bias * 2.0 ** (SUB_IN_EXP.value - 149))  # its NEG_BIAS_IN
    assert torch.equal(neg.double(), -(bias * 2.0**-149) * s.double())  # exact
    want = (v.double() * inv * sa.double() * 2.0**-SUB_OUT_EXP.value).float()
    biased = (v + bias).view(torch.float32)
    assert torch.equal(_fma32(biased, s, neg), want)  # the GPU's single FMA
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's form, through the kernel's helper
        block = 1 << 16
        pad = -n % block
        vp, sp = torch.cat([v, v.new_zeros(pad)]), torch.cat([s, s.new_ones(pad)])
        out = torch.empty(n + pad, dtype=torch.float32)
        value = bias * 2.0**-149
        _lowest_binade_kernel[((n + pad) // block,)](vp, sp, out, BIAS=bias, BIAS_VALUE=value, BLOCK=block)
        assert torch.equal(out[:n], (v.double() * 2.0**-149 * s.double()).float())
        assert torch.equal(out[:n], want)


# --- compiled constants, divisions and NaN; the low-rank gate (scripts/triton_rank_gate.py) ------

GATE = ROOT / "scripts" / "triton_rank_gate.py"


def _gate_env() -> dict:
    env = _env(False)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'scripts'}"
    return env


@pytest.mark.slow  # 5-10 s: kept out of the one-minute working loop, run by CI
def test_compiled_bias_tile_division_and_nan_are_the_references():
    """Read from the PTX and SASS that Triton's ptxas builds for sm_90 and sm_86 (no GPU):
    the GEMM's bias-MMA tile is four 0x80 bytes per word, not the sign-extended 0xFFFFFF80 that
    ``other=0x80`` compiled to (PTX ``mov.u32 %r, 0xffffffffffffff80``, SASS ``MOV ..., -0x80``:
    the interpreter never runs that code); quantize_act's LayerNorm statistics divide with
    ``div.rn`` (IEEE, like the reference), never ``div.full``; its group maximum is ``max.NaN``
    (torch's amax propagates NaN, ``max.f32`` drops it)."""
    res = subprocess.run(
        [sys.executable, str(GATE), "--constants"],
        env=_gate_env(),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    entries = json.loads(res.stdout)
    assert {(e["kind"], e["cc"]) for e in entries} == {(k, cc) for k in ("gemm", "act") for cc in (90, 86)}
    for e in entries:
        assert e["ptx_wide_immediates"] == 0 and e["sass_neg80_movs"] == 0, e
        if e["kind"] == "gemm":
            assert e["ptx_0x80808080"] > 0, e  # the tiles' words are built from 0x80 bytes
        else:
            assert e["ptx_div_approx"] == 0 and e["ptx_div_rn"] >= 3, e  # the statistics
            assert e["ptx_rcp_rn"] >= 1, e  # the scale's reciprocal: IEEE rcp.rn, not rcp.approx
            assert e["ptx_max_drops_nan"] == 0 and e["ptx_max_nan"] > 0, e


@pytest.mark.slow
def test_every_rank_compiles_without_spills_within_shared_memory_at_the_intended_occupancy(tmp_path):
    """The GEMM (every config, signed and unsigned, and sm_86 with the bias MMA) and quantize_act
    (plain, LayerNorm + modulation, GELU) at ranks 32, 48, 96 and 224 for sm_90 and sm_86: no
    spills, shared memory within the device's limit, the CTAs per SM the configs are designed for.
    The low-rank branch is processed in chunks, so ranks past the chunk share one kernel."""
    out = tmp_path / "gate.json"
    res = subprocess.run(
        [sys.executable, str(GATE), "--json", str(out)],
        env=_gate_env(),
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    assert res.returncode == 0, (res.stderr[-3000:], report and report["gates_failed"])
    entries = report["entries"]
    assert {(e["cc"], e["rank"]) for e in entries} == {(cc, r) for cc in (90, 86) for r in (32, 48, 96, 224)}
    for e in entries:
        assert e["spill_instrs"] == 0 and e["stack_bytes"] == 0, e
        assert e["ctas_per_sm"] >= 2, e
    by_variant: dict = {}
    for e in entries:
        # quantize_act compiles its rank-chunk branch out where one chunk holds every rank
        # (ONE_CHUNK: rank <= 32): one kernel for that, one for every rank past it
        past = e["kind"] == "act" and e["rank"] > ACT_LORA_CHUNK
        by_variant.setdefault((e["kind"], e["variant"], e["cc"], past), set()).add(e["kernel_id"])
    assert all(len(ids) == 1 for ids in by_variant.values()), by_variant  # one kernel for every rank


@pytest.mark.slow
def test_gate_residual_epilogue_leaves_the_main_loop_and_registers_alone(tmp_path):
    """The GEMM with its gate/residual epilogue (GATED), compiled for every arch and config: the
    same main loop (SASS, op for op), no spills, no stack, registers within the config's budget
    (sm_86's large tiles sit at 254-255 of 255 without it): the epilogue runs after the loop."""
    code = (
        "import json, sys\n"
        "sys.path.insert(0, 'scripts')\n"
        "from perfmodel.launches import gemm_launch\n"
        "from perfmodel.loops import compile_sass\n"
        "from perfmodel.triton_static import gemm_configs\n"
        "import engine.kernels.triton_backend as tb\n"
        "out = []\n"
        "for cc, name, cfg in gemm_configs():\n"
        "    for unsigned in (False, True):\n"
        "        for gated in (False, True):\n"
        "            _, args, kw = gemm_launch(4352, 3072, 3072, cc // 10, cfg, unsigned, gated=gated)\n"
        "            info = compile_sass(tb.w4a4_gemm_kernel, args, kw, cc)\n"
        "            out.append({'cc': cc, 'config': name, 'unsigned': unsigned, 'gated': gated,\n"
        "                        **{k: info[k] for k in ('regs', 'stack_bytes', 'spill_instrs', 'loop_sass', 'loop_ops')}})\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=_gate_env(), capture_output=True, text=True, timeout=1500, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    entries = json.loads(res.stdout.strip().splitlines()[-1])
    plain = {(e["cc"], e["config"], e["unsigned"]): e for e in entries if not e["gated"]}
    gated = [e for e in entries if e["gated"]]
    assert len(gated) == len(plain) >= 12
    for e in gated:
        p = plain[(e["cc"], e["config"], e["unsigned"])]
        assert e["spill_instrs"] == 0 and e["stack_bytes"] == 0, e
        assert e["regs"] <= 255, e
        # the same main loop: its MMAs and loads op for op, its length within one instruction of
        # ptxas' scheduling (sm_90's large tile counts 260 with the epilogue, 261 without)
        assert _mma_and_memory(e["loop_ops"]) == _mma_and_memory(p["loop_ops"]), (e, p)
        assert e["loop_sass"] <= p["loop_sass"] + 1, (e, p)


def _mma_and_memory(ops: dict[str, int]) -> dict[str, int]:
    return {o: c for o, c in ops.items() if re.match(r"(IGMMA|IMMA|LDG|LDS|LDSM|STS)", o)}
