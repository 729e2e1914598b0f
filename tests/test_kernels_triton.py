"""The Triton backend against the reference: exact codes and integer sums, float parts to tolerance.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), on small shapes; the
``gpu`` tests repeat the comparison on FLUX's shapes. The compiled kernels' static checks (SASS
counts for sm_90/86/80) are in test_triton_static.py.
"""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from engine.kernels import reference
from engine.quant import pack_int4, unpack_int4
from engine.quant.ops import gate_residual

from .kernel_cases import act_inputs, gemm_inputs

tb = pytest.importorskip("engine.kernels.triton_backend")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 low-rank dots may run in TF32 on tensor cores (10-bit mantissa); the integer part is exact.
LORA_TOL = {"rtol": 2e-3, "atol": 2e-3}
OUT_TOL = {
    torch.float32: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


@pytest.mark.parametrize("m,n,r,images,unsigned", [(1, 16, 0, 1, False), (20, 40, 5, 2, True), (33, 17, 16, 3, False)])
def test_gemm_gate_residual_epilogue_matches_reference(m, n, r, images, unsigned):
    """residual + gate * y in the kernel's epilogue (contract: three roundings to out_dtype): 16-bit
    outputs bit for bit the contract's arithmetic (engine.quant.ops.gate_residual) on the kernel's
    own fp32 y (its group sums' order differs from the reference's), and close to the reference;
    fp32 to the plain GEMM's tolerance."""
    a = gemm_inputs(m, 128, n, r, unsigned=unsigned, device=DEVICE)
    g = torch.Generator().manual_seed(7)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        e = {"partial": torch.randn(m, n, generator=g).to(DEVICE, out_dtype),
             "residual": (torch.randn(m, n, generator=g) * 16).to(DEVICE, out_dtype),
             "gate": torch.randn(images, n, generator=g).to(DEVICE, out_dtype)}  # fmt: skip
        h = tb.w4a4_gemm(**a, **e, unsigned=unsigned, out_dtype=out_dtype)
        h_r = reference.w4a4_gemm(**a, **e, unsigned=unsigned, out_dtype=out_dtype)
        assert h.dtype == out_dtype and h.shape == (m, n) and h.is_contiguous()
        if out_dtype == torch.float32:
            torch.testing.assert_close(h, h_r, **OUT_TOL[out_dtype])
            continue
        y32 = tb.w4a4_gemm(**a, unsigned=unsigned, out_dtype=torch.float32)  # the kernel's fp32 y
        y32 = y32 + e["partial"].float()  # the contract's y + partial, in fp32
        want = gate_residual(y32, e["residual"], e["gate"], out_dtype)
        if DEVICE == "cpu":
            assert torch.equal(h, want)
        else:  # sm_90 adds the partial before the bias (fp32 order): a 16-bit rounding may move
            assert (h != want).float().mean() < 0.01
            torch.testing.assert_close(h, want, rtol=2**-7, atol=2**-3)
        # y's order of sums may move rnd(y) by one ulp: one bf16 ulp of the sum (|residual| ~ 16)
        torch.testing.assert_close(h, h_r, rtol=2**-7, atol=2**-3)


def ref_act(a, **kw):
    return reference.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)


@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (17, 128, 16), (40, 192, 32), (33, 128, 3), (9, 128, 80)])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_act_matches_reference(m, k, r, unsigned, dtype):
    a = act_inputs(m, k, r, dtype=dtype, unsigned=unsigned, device=DEVICE)
    kw = {"group_size": 64, "unsigned": unsigned, "shift": 0.171875 if unsigned else 0.0}
    qx, ascales, lora = tb.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    qx_r, ascales_r, lora_r = ref_act(a, **kw)
    assert torch.equal(qx, qx_r)  # codes bit for bit
    assert torch.equal(ascales, ascales_r)
    torch.testing.assert_close(lora, lora_r, **LORA_TOL)


@pytest.mark.parametrize(
    "m,k,n,r", [(1, 64, 16, 0), (19, 128, 40, 16), (33, 192, 17, 32), (16, 64, 48, 5), (20, 128, 24, 50)]
)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_reference(m, k, n, r, unsigned, bias):
    a = gemm_inputs(m, k, n, r, unsigned=unsigned, bias=bias, device=DEVICE)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = tb.w4a4_gemm(**a, unsigned=unsigned, out_dtype=out_dtype)
        y_r = reference.w4a4_gemm(**a, unsigned=unsigned, out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n)
        torch.testing.assert_close(y, y_r, **OUT_TOL[out_dtype])


@pytest.mark.parametrize("m,k,n,r", [(19, 128, 40, 16), (33, 192, 17, 32)])
@pytest.mark.parametrize("unsigned", [False, True])
def test_gemm_bias_mma_conversion_matches_the_magic_one(m, k, n, r, unsigned):
    """Hopper's conversion (bias MMA, lowest binade, accumulator in units of 2^-69) against the
    magic-bits one: the same sums to fp32 rounding (the magic path rounds ascales to 22 bits)."""
    a = gemm_inputs(m, k, n, r, unsigned=unsigned, bias=True, device=DEVICE)
    kw = {"unsigned": unsigned, "out_dtype": torch.float32}
    y_magic = tb.launch_w4a4_gemm(**a, **kw, config=_config(m, False))
    y_bias = tb.launch_w4a4_gemm(**a, **kw, config=_config(m, True))
    torch.testing.assert_close(y_bias, y_magic, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(y_bias, reference.w4a4_gemm(**a, **kw), **OUT_TOL[torch.float32])


def _config(m: int, bias_mma: bool):
    """The launch config the device would take, with the Hopper conversion on or off (the
    interpreter's small tiles on CPU): both conversions are tested wherever the tests run."""
    from engine.kernels.triton.gemm import INTERPRETER_CONFIG, gemm_config

    major = torch.cuda.get_device_capability()[0] if DEVICE == "cuda" else 0
    base = INTERPRETER_CONFIG if DEVICE == "cpu" else gemm_config(major, m)
    return replace(base, bias_mma=bias_mma)


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("bias_mma", [False, True])
def test_gemm_integer_part_exact(unsigned, bias_mma):
    a = gemm_inputs(21, 256, 33, 0, unsigned=unsigned, bias=False, device=DEVICE)
    a["ascales"].fill_(1.0)
    a["wscales"].fill_(1.0)
    y = tb.launch_w4a4_gemm(**a, unsigned=unsigned, out_dtype=torch.float32, config=_config(21, bias_mma))
    exact = unpack_int4(a["qx"], signed=not unsigned).long() @ unpack_int4(a["qweight"]).long().T
    assert torch.equal(y.long().cpu(), exact.cpu()) and torch.equal(y, y.round())


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("bias_mma", [False, True])
@pytest.mark.parametrize("group", [64, 256])
def test_gemm_extreme_codes_exact(unsigned, bias_mma, group):
    """Every group's dot at its most negative and most positive (the bias MMA's B must cover
    the one and stay below 2^24 with the other): exact integers, scales 1."""
    lo, hi = (0, 15) if unsigned else (-8, 7)
    m, n, k = 16, 32, 2 * group
    # signed: -8 x -8 (first group) is the most positive dot, -8 x 7 the most negative;
    # unsigned: 15 x 7 and 15 x -8 (second group, first rows)
    x = torch.full((m, k), hi, dtype=torch.int8)
    x[m // 2 :] = lo
    x[:, :group] = lo
    w = torch.full((n, k), -8, dtype=torch.int8)
    w[n // 2 :] = 7
    a = {
        "qx": pack_int4(x).to(DEVICE),
        "ascales": torch.ones(m, k // group, device=DEVICE),
        "qweight": pack_int4(w).to(DEVICE),
        "wscales": torch.ones(n, k // group, device=DEVICE),
        "lora_act": torch.zeros(m, 0, device=DEVICE),
        "proj_up": torch.zeros(n, 0, device=DEVICE),
        "bias": None,
    }
    y = tb.launch_w4a4_gemm(**a, unsigned=unsigned, out_dtype=torch.float32, config=_config(m, bias_mma))
    exact = x.long() @ w.long().T
    assert torch.equal(y.long().cpu(), exact), (y, exact)


def test_deterministic_bytes():
    a = act_inputs(37, 128, 16, device=DEVICE)
    first = tb.quantize_act(a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0)
    second = tb.quantize_act(a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0)
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    g = gemm_inputs(37, 128, 24, 16, device=DEVICE)
    y1 = tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.bfloat16)
    y2 = tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.bfloat16)
    assert torch.equal(y1.view(torch.int16), y2.view(torch.int16))


def test_compiles_without_graph_break(use_kernels):
    from torch._dynamo.testing import CompileCounterWithBackend

    from engine.modules import SVDQLinear

    use_kernels("triton")
    layer = SVDQLinear.from_linear(torch.nn.Linear(128, 32), torch.randn(64, 128), rank=16).to(DEVICE)
    x = torch.randn(2, 5, 128, device=DEVICE)
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True, backend=counter)(x)
    assert counter.frame_count == 1 and torch.equal(y, layer(x))
    ops = " ".join(str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function")
    assert "svdq.quantize_act" in ops and "svdq.w4a4_gemm" in ops


def test_dispatch_uses_triton_when_asked(use_kernels):
    from engine import kernels

    use_kernels("triton")
    assert kernels.backend_for(DEVICE) is tb


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch; from engine import kernels\n"
        "kernels.configure('triton')\n"
        "kernels.quantize_act(torch.randn(2, 64), torch.ones(64), torch.zeros(0, 64))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "SVDQ_KERNELS=triton: the triton backend cannot run on cpu" in res.stderr
    assert "TRITON_INTERPRET=1" in res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)])
def test_flux_shapes_on_gpu(k, n):
    m, r = 4352, 32
    a = act_inputs(m, k, r, device="cuda")
    qx, ascales, lora = tb.quantize_act(
        a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0
    )
    qx_r, ascales_r, lora_r = ref_act(a, group_size=64, unsigned=False, shift=0.0)
    assert torch.equal(qx, qx_r) and torch.equal(ascales, ascales_r)
    torch.testing.assert_close(lora, lora_r, **LORA_TOL)
    g = gemm_inputs(m, k, n, r, device="cuda")
    y = tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.bfloat16)
    torch.testing.assert_close(
        y, reference.w4a4_gemm(**g, unsigned=False, out_dtype=torch.bfloat16), **OUT_TOL[torch.bfloat16]
    )


@pytest.mark.parametrize("unsigned", [False, True])
def test_a_nan_in_x_reaches_the_scale_and_the_output_as_in_the_reference(unsigned):
    """torch's amax propagates NaN; the kernel's group maximum does too (max.NaN.f32 on the GPU:
    test_triton_static.py reads it), so a NaN input gives that row and group a NaN scale and a NaN
    output row in both, never a finite-looking result. (The codes of a NaN group are unspecified:
    the output does not depend on them.)"""
    a = act_inputs(5, 128, 8, device=DEVICE)
    a["x"][2, 70] = float("nan")
    kw = {"group_size": 64, "unsigned": unsigned, "shift": 0.0}
    _, ascales, _ = tb.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    _, ascales_r, _ = ref_act(a, **kw)
    assert torch.equal(ascales.isnan(), ascales_r.isnan()) and ascales.isnan().sum() == 1
    assert ascales[2, 1].isnan()
    g = gemm_inputs(5, 128, 24, 8, unsigned=unsigned, device=DEVICE)
    g["ascales"] = ascales
    y = tb.w4a4_gemm(**g, unsigned=unsigned, out_dtype=torch.float32)
    assert y[2].isnan().all() and not y[[0, 1, 3, 4]].isnan().any()


def test_ascales_come_back_group_major_and_any_scale_strides_give_the_same_bits():
    a = act_inputs(19, 192, 8, device=DEVICE)
    _, ascales, _ = tb.quantize_act(
        a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0
    )
    assert ascales.shape == (19, 3) and ascales.stride() == (1, 19)  # one contiguous vector per group
    g = gemm_inputs(19, 192, 24, 8, device=DEVICE)
    row_major = tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32)
    g["ascales"] = g["ascales"].t().contiguous().t()
    g["wscales"] = g["wscales"].float().t().contiguous().t()  # what SVDQLinear stores
    assert torch.equal(tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32), row_major)
    g["wscales"] = torch.stack([g["wscales"], -g["wscales"]], dim=-1)[..., 0]  # strides (6, 2)
    assert torch.equal(tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32), row_major)


def test_group_size_128_matches_reference():
    a = act_inputs(9, 256, 16, device=DEVICE)
    kw = {"group_size": 128, "unsigned": False, "shift": 0.0}
    qx, ascales, lora = tb.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    qx_r, ascales_r, lora_r = ref_act(a, **kw)
    assert torch.equal(qx, qx_r) and torch.equal(ascales, ascales_r)
    torch.testing.assert_close(lora, lora_r, **LORA_TOL)
    g = gemm_inputs(9, 256, 20, 16, device=DEVICE)
    g["ascales"], g["wscales"] = g["ascales"][:, ::2].contiguous(), g["wscales"][:, ::2].contiguous()
    y = tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32)
    torch.testing.assert_close(
        y, reference.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32), **OUT_TOL[torch.float32]
    )


def test_gemm_group_sizes_past_its_exact_conversion_are_rejected():
    g = gemm_inputs(2, 512, 8, 0, device=DEVICE)
    g["ascales"], g["wscales"] = torch.ones(2, 1, device=DEVICE), torch.ones(8, 1, device=DEVICE)
    with pytest.raises(ValueError, match="at most 256"):
        tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32)


@pytest.mark.parametrize("group_size", [32, 96, 192])
def test_group_sizes_a_gpu_cannot_compile_are_rejected_everywhere(group_size):
    """The interpreter would run them; a GPU compile would fail (tl.arange needs a power of two)."""
    a = act_inputs(2, 2 * group_size, 0, device=DEVICE)
    with pytest.raises(ValueError, match="power of two >= 64"):
        tb.quantize_act(a["x"], a["smooth"], a["proj_down"], group_size=group_size, unsigned=False, shift=0.0)
    g = gemm_inputs(2, 192, 8, 0, device=DEVICE)  # K = 192: every size above divides it
    g["ascales"] = torch.ones(2, 192 // group_size, device=DEVICE)
    g["wscales"] = torch.ones(8, 192 // group_size, device=DEVICE)
    with pytest.raises(ValueError, match="power of two >= 64"):
        tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32)


def test_launch_configs_are_fixed_tables_not_autotuned():
    """Autotuning benchmarks (and synchronizes) on first use, which breaks CUDA-graph capture."""
    from triton.runtime.autotuner import Autotuner

    for kernel in (tb.w4a4_gemm_kernel, tb.quantize_act_kernel, tb.w4a16_gemv_kernel):
        assert not isinstance(kernel, Autotuner)


@pytest.mark.gpu
def test_ops_capture_in_a_cuda_graph():
    """Warm up (compiles each kernel variant), capture, replay: the same bytes as eager."""
    a = act_inputs(256, 3072, 32, device="cuda")
    g = gemm_inputs(256, 3072, 3072, 32, device="cuda")
    g["wscales"] = g["wscales"].float().t().contiguous().t()

    def step():
        qx, ascales, lora = tb.quantize_act(
            a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0
        )
        y = tb.w4a4_gemm(
            qx,
            ascales,
            g["qweight"],
            g["wscales"],
            lora,
            g["proj_up"],
            g["bias"],
            unsigned=False,
            out_dtype=torch.bfloat16,
        )
        return qx, y

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(eager, captured, strict=True))


@pytest.mark.gpu
@pytest.mark.slow
def test_row_offsets_past_2_to_the_31():
    """M * K > 2^31 (K = 15360, 140k tokens): the last rows must still be right (int64 offsets)."""
    m, k = 140_000, 15360
    a = act_inputs(64, k, 32, device="cuda")
    x = a["x"][:1].expand(m, k).contiguous()
    x[-64:] = a["x"]
    qx, ascales, lora = tb.quantize_act(
        x, a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0
    )
    qx_r, ascales_r, lora_r = ref_act(a, group_size=64, unsigned=False, shift=0.0)
    assert torch.equal(qx[-64:], qx_r) and torch.equal(ascales[-64:], ascales_r)
    torch.testing.assert_close(lora[-64:], lora_r, **LORA_TOL)
    g = gemm_inputs(64, k, 64, 32, device="cuda")
    big = {**g, "qx": qx, "ascales": ascales, "lora_act": lora}
    y = tb.w4a4_gemm(**big, unsigned=False, out_dtype=torch.float32)[-64:]
    small = {**g, "qx": qx[-64:], "ascales": ascales[-64:], "lora_act": lora[-64:]}
    torch.testing.assert_close(
        y, reference.w4a4_gemm(**small, unsigned=False, out_dtype=torch.float32), **OUT_TOL[torch.float32]
    )


@pytest.mark.slow
def test_fused_tiny_transformer_on_triton_matches_the_reference(tiny_model_dir, use_kernels):
    """The fused blocks end to end on the Triton kernels (interpreter): the modulation and GELU
    prologues on strided views and chunked scale/shift, qk_norm_rope on the fused outputs, the
    GEMM on group-major ascales, all in one forward, against the same forward on the reference."""
    from engine.flux import load_transformer
    from engine.tiny_model import CHECKPOINT_NAME

    from .flux_cases import first_step_inputs, float_pipe

    transformer = load_transformer(tiny_model_dir / CHECKPOINT_NAME)
    inputs = first_step_inputs(float_pipe(tiny_model_dir), "a fox", size=128)
    with torch.no_grad():
        use_kernels("reference")
        expected = transformer(**inputs)[0].float()
        use_kernels("triton")
        got = transformer(**inputs)[0].float()
    # Same codes and scales; only the order of fp32 sums (GEMM groups, low-rank, norms) differs:
    # 5.5e-5 measured; a wrong prologue, RoPE or scale layout gives errors of order 1e-2 and more.
    err = (got - expected).norm() / expected.norm()
    assert err < 5e-4, err.item()
