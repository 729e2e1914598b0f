"""The W4A16 GEMV op: reference semantics, the Triton kernel against it, and W4A16Linear's use.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (conftest.py) on small shapes.
"""

import pytest
import torch
from torch import nn

from engine import kernels
from engine.kernels import reference
from engine.modules import W4A16Linear
from engine.quant import dequantize_int4_asym, pack_int4, unpack_int4

tb = pytest.importorskip("engine.kernels.triton_backend")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 sums in a different order, then one rounding to the output dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def gemv_inputs(m, k, n, *, dtype=torch.bfloat16, group=64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(m, k, generator=g).to(DEVICE, dtype),
        "qweight": pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)).to(DEVICE),
        "wscales": (torch.rand(n, k // group, generator=g) / 10).to(DEVICE, torch.bfloat16),
        "wzeros": (torch.randn(n, k // group, generator=g) / 2).to(DEVICE, torch.bfloat16),
        "bias": torch.randn(n, generator=g).to(DEVICE, torch.bfloat16) if bias else None,
    }


def test_reference_is_the_dequantized_matmul():
    a = gemv_inputs(3, 128, 16, dtype=torch.float32)
    w = dequantize_int4_asym(unpack_int4(a["qweight"], signed=False), a["wscales"], a["wzeros"])
    expected = a["x"] @ w.T + a["bias"].float()
    assert torch.equal(reference.w4a16_gemv(**a), expected)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("k,n", [(256, 40), (192, 17), (512, 33)])  # K % 256 != 0 takes the masked path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_triton_gemv_matches_reference(m, k, n, dtype):
    a = gemv_inputs(m, k, n, dtype=dtype, bias=m != 2)
    y = tb.w4a16_gemv(**a)
    y_ref = reference.w4a16_gemv(**a)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype] * y_ref.abs().max().item())


def test_triton_gemv_group_128_and_strided_scales():
    a = gemv_inputs(2, 512, 24, dtype=torch.float32, group=128)
    a["wscales"] = a["wscales"].t().contiguous().t()  # group-major
    torch.testing.assert_close(tb.w4a16_gemv(**a), reference.w4a16_gemv(**a), rtol=1e-5, atol=1e-4)


def test_triton_gemv_limits():
    with pytest.raises(ValueError, match="at most 4 rows"):
        tb.w4a16_gemv(**gemv_inputs(5, 128, 8))
    a = gemv_inputs(1, 192, 8, group=96)
    with pytest.raises(ValueError, match="power of two >= 64"):
        tb.w4a16_gemv(**a)


def test_op_checks_its_arguments():
    a = gemv_inputs(1, 128, 8)
    with pytest.raises(TypeError, match="qweight must be a uint8 tensor of shape \\[N, 64\\]"):
        kernels.w4a16_gemv(a["x"], a["qweight"][:, :32], a["wscales"], a["wzeros"])
    with pytest.raises(ValueError, match="wzeros must have shape"):
        kernels.w4a16_gemv(a["x"], a["qweight"], a["wscales"], a["wzeros"][:, :1])


def test_w4a16_linear_takes_the_gemv_op_for_few_rows(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("SVDQ_KERNELS", "triton")
    lin = nn.Linear(256, 48).to(torch.bfloat16)
    layer = W4A16Linear.from_linear(lin).to(DEVICE)
    x = torch.randn(2, 1, 256, dtype=torch.bfloat16, device=DEVICE)  # two images, one vector each
    dense = torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32).to(x.dtype), layer.bias)
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True, backend=counter)(x)
    ops = " ".join(str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function")
    assert "svdq.w4a16_gemv" in ops
    assert y.shape == (2, 1, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, dense, rtol=2e-2, atol=2e-2 * dense.abs().max().item())
    many = torch.randn(5, 256, dtype=torch.bfloat16, device=DEVICE)  # past 4 rows: one dequantized matmul
    torch.testing.assert_close(
        layer(many),
        reference.w4a16_gemv(many, layer.qweight, layer.wscales, layer.wzeros, layer.bias),
        rtol=2e-2,
        atol=2e-2,
    )


def test_a_backend_without_the_gemv_delegates_it(monkeypatch):
    """The CUDA extension has no GEMV: where it serves the W4A4 ops, the GEMV goes to Triton."""
    import types

    monkeypatch.setattr(kernels, "backend_for", lambda device: types.SimpleNamespace(NAME="cuda"))
    assert kernels.op_backend_for(DEVICE, "w4a16_gemv") is tb  # triton runs on DEVICE (GPU, or the interpreter)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("k,n", [(3072, 18432), (3072, 9216)])
def test_adaln_shapes_on_gpu(m, k, n):
    a = gemv_inputs(m, k, n)
    torch.testing.assert_close(tb.w4a16_gemv(**a), reference.w4a16_gemv(**a), rtol=8e-3, atol=8e-3 * 64)
