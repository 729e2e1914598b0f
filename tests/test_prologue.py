"""quantize_act's prologues (LayerNorm + AdaLN modulation, GELU) against diffusers' own modules.

The definer is diffusers' unfused path: its AdaLayerNormZero / AdaLayerNormZeroSingle (and
FeedForward's GELU module), then quantize_act. The reference backend's fused op must give the
same codes, scales and lora_act bit for bit; the Triton kernel (interpreter on CPU) must too
where it reproduces the definition exactly. Its LayerNorm statistics are fp32 in its own
summation order, and its tanh (the interpreter's: fp64 exponentials) may differ from torch's
CPU tanhf in the last fp32 bit; measured in the interpreter on FLUX-like rows (6 x 256 rows, K = 3072, 1/256 of
the channels 200x the rest, B = 2, half of them offset by +20 on every channel): bf16 x: 0 of
4.7M codes and 0 of 74k scales differ (modulation and GELU); fp32 x: 0 codes differ, 10% of the
scales (modulation) / 0.16% (GELU) differ, by at most 4.2e-7 relative (a few fp32 ulps of x').
The bounds asserted below: bf16 exact, fp32 codes exact and scales within 2^-20 relative.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.activations import GELU
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

from engine import kernels
from engine.kernels import reference
from engine.modules import SVDQLinear

from .kernel_cases import act_inputs
from .ptx_compile import run_compiled

ROOT = Path(__file__).resolve().parents[1]
K = 128
KW = {"group_size": 64, "unsigned": False, "shift": 0.0}
GELU_KW = {"group_size": 64, "unsigned": True, "shift": 0.171875}


def _adaln(single: bool, dtype: torch.dtype, b: int, seed: int = 0):
    """diffusers' norm module, its conditioning, and the (scale, shift) it applies."""
    torch.manual_seed(seed)
    norm = (AdaLayerNormZeroSingle(K) if single else AdaLayerNormZero(K)).to(dtype)
    emb = torch.randn(b, K).to(dtype)
    chunks = norm.linear(norm.silu(emb)).chunk(3 if single else 6, dim=1)  # shift, scale first
    return norm, emb, (chunks[1], chunks[0])


def _x(b: int, s: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, K, generator=g) * torch.exp(torch.randn(K, generator=g)) + 0.5
    return x.to(dtype)


def _equal(got, want) -> None:
    for name, p, q in zip(("qx", "ascales", "lora_act"), got, want, strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_modulation_is_diffusers_adaln_then_quantize(single, b, dtype, use_kernels):
    use_kernels("reference")
    norm, emb, modulation = _adaln(single, dtype, b)
    a = act_inputs(1, K, 16, dtype=dtype)
    x = _x(b, 7, dtype)
    with torch.no_grad():
        x_mod = norm(x, emb=emb)[0]  # diffusers' unfused path
        want = kernels.quantize_act(x_mod, a["smooth"], a["proj_down"], **KW)
        got = kernels.quantize_act(x, a["smooth"], a["proj_down"], **KW, modulation=modulation)
    _equal(got, want)


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_gelu_is_diffusers_gelu_then_quantize(b, dtype, use_kernels):
    use_kernels("reference")
    act = GELU(K, K, approximate="tanh")
    a = act_inputs(1, K, 16, dtype=dtype)
    x = _x(b, 5, dtype)
    want = kernels.quantize_act(act.gelu(x), a["smooth"], a["proj_down"], **GELU_KW)
    got = kernels.quantize_act(x, a["smooth"], a["proj_down"], **GELU_KW, gelu=True)
    _equal(got, want)


def test_svdq_linear_forward_with_modulation_is_the_unfused_block(use_kernels):
    use_kernels("reference")
    layer = SVDQLinear.from_linear(torch.nn.Linear(K, 48), torch.randn(64, K), rank=16)
    norm, emb, modulation = _adaln(False, torch.bfloat16, 2)
    x = _x(2, 9, torch.bfloat16)
    with torch.no_grad():
        want = layer(norm(x, emb=emb)[0])
        got = layer(x, modulation=modulation)
    assert got.shape == (2, 9, 48) and torch.equal(got, want)
    fc2 = SVDQLinear.from_linear(
        torch.nn.Linear(K, 32), torch.randn(64, K), rank=16, unsigned=True, act_shift=0.171875
    )
    with torch.no_grad():
        assert torch.equal(fc2(x, gelu=True), fc2(GELU(K, K, approximate="tanh").gelu(x)))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"modulation": (torch.zeros(2, K), torch.zeros(2, K)), "gelu": True}, ValueError, "not both"),
        ({"modulation": (torch.zeros(2, K - 64), torch.zeros(2, K))}, ValueError, "modulation scale"),
        ({"modulation": (torch.zeros(2, K), torch.zeros(2, K, 1))}, ValueError, "modulation shift"),
        ({"modulation": (torch.zeros(2, K), torch.zeros(1, K))}, ValueError, "modulation shift"),
        ({"modulation": (torch.zeros(4, K), torch.zeros(4, K))}, ValueError, "modulation: x"),
        ({"modulation": (torch.zeros(2, K, dtype=torch.bfloat16),) * 2}, TypeError, "x's dtype"),
        ({"modulation": torch.zeros(2, K)}, TypeError, "modulation must be a pair"),
        ({"gelu": 1}, TypeError, "gelu must be a bool"),
    ],
)
def test_bad_prologue_arguments_are_named(kwargs, error, match, use_kernels):
    use_kernels("reference")
    x = torch.randn(2, 3, K)  # M = 6: B = 4 does not divide it
    with pytest.raises(error, match=match):
        kernels.quantize_act(x, torch.ones(K), torch.zeros(4, K), **KW, **kwargs)


def test_rows_of_an_m_k_input_take_their_image_row(use_kernels):
    """x [M, K] with M = B * S: row r is image r // S, as x [B, S, K] is."""
    use_kernels("reference")
    _, _, modulation = _adaln(True, torch.float32, 2)
    a = act_inputs(1, K, 8, dtype=torch.float32)
    x = _x(2, 4, torch.float32)
    flat = kernels.quantize_act(x.reshape(8, K), a["smooth"], a["proj_down"], **KW, modulation=modulation)
    _equal(flat, kernels.quantize_act(x, a["smooth"], a["proj_down"], **KW, modulation=modulation))
    lone = kernels.quantize_act(
        x[1], a["smooth"], a["proj_down"], **KW, modulation=[m[1:] for m in modulation]
    )
    # Codes and scales are per row: exact. lora_act is a matmul, whose fp32 sums CPU BLAS may
    # block differently for 4 rows than for 8 (seen on some CPUs), so it gets a rounding bound.
    _equal([t[4:] for t in flat[:2]] + [lone[2]], lone)
    torch.testing.assert_close(flat[2][4:], lone[2], rtol=1e-6, atol=1e-6)


def test_compiles_without_graph_break(use_kernels):
    from torch._dynamo.testing import CompileCounterWithBackend

    use_kernels("reference")
    layer = SVDQLinear.from_linear(torch.nn.Linear(K, 32), torch.randn(64, K), rank=16)
    _, _, modulation = _adaln(False, torch.float32, 2)
    modulation = tuple(m.detach() for m in modulation)
    x = torch.randn(2, 5, K)
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    y = torch.compile(lambda x, s, h: layer(x, modulation=(s, h)), fullgraph=True, backend=counter)(
        x, *modulation
    )
    assert counter.frame_count == 1 and torch.equal(y, layer(x, modulation=modulation))
    ops = " ".join(str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function")
    assert "svdq.quantize_act_prologue" in ops and "svdq.w4a4_gemm" in ops


def test_where_cuda_serves_w4a4_the_prologue_runs_on_triton(monkeypatch):
    """The CUDA extension has no prologue kernel: its w4a4_gemm takes Triton's outputs."""
    tb = pytest.importorskip("engine.kernels.triton_backend")
    import engine.kernels.cuda as cuda_backend

    assert not hasattr(cuda_backend, "quantize_act_prologue")
    monkeypatch.setattr(kernels, "backend_for", lambda device: cuda_backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert kernels.op_backend_for(device, "quantize_act_prologue") is tb
    assert kernels.op_backend_for(device, "w4a16_gemv") is tb


# --- the Triton kernel (interpreter on CPU) ---------------------------------------------------

tb = pytest.importorskip("engine.kernels.triton_backend")
LORA_TOL = {"rtol": 2e-3, "atol": 2e-3}


def _triton_vs_reference(x, smooth, down, mod_scale, mod_shift, kw, gelu):
    got = tb.quantize_act_prologue(x, smooth, down, mod_scale, mod_shift, **kw, gelu=gelu)
    want = reference.quantize_act_prologue(x, smooth, down, mod_scale, mod_shift, **kw, gelu=gelu)
    assert torch.equal(got[0], want[0])  # codes exact (measured: never differ, see the docstring)
    if x.dtype == torch.float32:  # the fp32 statistics' order: scales within a few ulps
        torch.testing.assert_close(got[1], want[1], rtol=2**-20, atol=0)
    else:
        assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], **LORA_TOL)
    assert got[1].stride() == (1, x.shape[0])  # group-major, like the plain kernel


@pytest.mark.parametrize("m,k,r,b", [(40, 192, 16, 2), (17, 128, 3, 1), (1, 64, 0, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_triton_modulation_matches_reference(m, k, r, b, dtype):
    a = act_inputs(m, k, r, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    emb = (torch.randn(b, 6 * k, generator=g) * 0.4).to(dtype)  # chunks of it: row stride 6K
    x = a["x"] + 0.25  # a non-zero mean; row 0 keeps a constant group
    _triton_vs_reference(x, a["smooth"], a["proj_down"], emb[:, k : 2 * k], emb[:, :k], KW, False)


@pytest.mark.parametrize("m,k,r", [(33, 128, 16), (5, 64, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_triton_gelu_matches_reference(m, k, r, dtype):
    a = act_inputs(m, k, r, dtype=dtype)
    _triton_vs_reference(a["x"], a["smooth"], a["proj_down"], None, None, GELU_KW, True)


@pytest.mark.slow
def test_triton_modulation_on_flux_like_rows():
    """FLUX's width, outlier channels 200x the rest, two images: the bound of the docstring."""
    m, k, b = 128, 3072, 2
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(m, k, generator=g) * (0.5 + torch.rand(m, 1, generator=g))
        + torch.randn(1, k, generator=g) / 2
    )
    x[:, torch.randperm(k, generator=g)[: k // 256]] *= 200.0
    mod = [torch.randn(b, k, generator=g) / 2 for _ in range(2)]
    smooth, down = torch.rand(k, generator=g) + 0.5, torch.randn(32, k, generator=g) / k**0.5
    for dtype in (torch.bfloat16, torch.float32):
        args = [t.to(dtype) for t in (x, smooth, down, *mod)]
        _triton_vs_reference(*args, KW, False)
        _triton_vs_reference(*args[:3], None, None, GELU_KW, True)


@pytest.mark.slow
def test_prologue_kernels_compile_without_spills_and_with_vector_loads(tmp_path):
    """sm_90 and sm_86 by Triton's own compiler (scripts/kernel_model_prologue.py): no spills,
    no global load narrower than 16 bytes in any loop of the plain, modulation, GELU variants."""
    out = tmp_path / "report.json"
    res = run_compiled([sys.executable, str(ROOT / "scripts" / "kernel_model_prologue.py"), "--json", str(out)], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    static = json.loads(out.read_text())["static"]
    want = {
        (c, v, k)
        for c in (90, 86)
        for v, k in (("plain", 3072), ("plain", 12288), ("modulation", 3072), ("gelu", 12288))
    }
    assert {(e["cc"], e["variant"], e["k"]) for e in static} == want
    for e in static:
        assert e["stack_bytes"] == 0 and e["spill_instrs"] == 0, e
        assert e["loops"] and all(lp["narrowest_load"] == 16 for lp in e["loops"]), e
    stats_loops = [lp for e in static if e["variant"] == "modulation" for lp in e["loops"] if not lp["mma"]]
    assert len(stats_loops) == 2  # one statistics pass per arch, beside the quantizing loop


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_prologues_on_gpu_at_flux_shapes(dtype):
    """On the GPU the reference is torch's CUDA LayerNorm (its own Welford order, rsqrtf) and
    CUDA gelu (tanhf, the kernel's same instruction sequence). Not yet run on a GPU (none was
    lent to this task): the bound below is the CPU-measured one widened to allow a 16-bit ulp of
    x' at a group maximum (scale) or at a rounding tie (code +-1, at most 1e-4 of the codes)."""
    from engine.quant import unpack_int4

    m, k, b = 4352, 3072, 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g) * (0.5 + torch.rand(m, 1, generator=g))
    x[:, torch.randperm(k, generator=g)[: k // 256]] *= 200.0
    mod = [(torch.randn(b, k, generator=g) / 2).to("cuda", dtype) for _ in range(2)]
    smooth, down = torch.rand(k, generator=g) + 0.5, torch.randn(32, k, generator=g) / k**0.5
    x, smooth, down = (t.to("cuda", dtype) for t in (x, smooth, down))
    for mod_args, kw, gelu in (((*mod,), KW, False), ((None, None), GELU_KW, True)):
        got = tb.quantize_act_prologue(x, smooth, down, *mod_args, **kw, gelu=gelu)
        want = reference.quantize_act_prologue(x, smooth, down, *mod_args, **kw, gelu=gelu)
        signed = not kw["unsigned"]
        d = (unpack_int4(got[0], signed=signed).int() - unpack_int4(want[0], signed=signed).int()).abs()
        assert d.max() <= 1 and d.float().mean() <= 1e-4, (gelu, d.float().mean().item())
        torch.testing.assert_close(got[1], want[1], rtol=2**-7, atol=0)
        torch.testing.assert_close(got[2], want[2], **LORA_TOL)
