"""The Triton backend against the reference: exact codes and integer sums, float parts to tolerance.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), on small shapes; the
``gpu`` tests repeat the comparison on FLUX's shapes.
"""

import os
import subprocess
import sys

import pytest
import torch

from engine.kernels import reference
from engine.quant import unpack_int4

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


def ref_act(a, **kw):
    return reference.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)


@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (17, 128, 16), (40, 192, 32), (33, 128, 3)])
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


@pytest.mark.parametrize("m,k,n,r", [(1, 64, 16, 0), (19, 128, 40, 16), (33, 192, 17, 32), (16, 64, 48, 5)])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_reference(m, k, n, r, unsigned, bias):
    a = gemm_inputs(m, k, n, r, unsigned=unsigned, bias=bias, device=DEVICE)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = tb.w4a4_gemm(**a, unsigned=unsigned, out_dtype=out_dtype)
        y_r = reference.w4a4_gemm(**a, unsigned=unsigned, out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n)
        torch.testing.assert_close(y, y_r, **OUT_TOL[out_dtype])


@pytest.mark.parametrize("unsigned", [False, True])
def test_gemm_integer_part_exact(unsigned):
    a = gemm_inputs(21, 256, 33, 0, unsigned=unsigned, bias=False, device=DEVICE)
    a["ascales"].fill_(1.0)
    a["wscales"].fill_(1.0)
    y = tb.w4a4_gemm(**a, unsigned=unsigned, out_dtype=torch.float32)
    exact = unpack_int4(a["qx"], signed=not unsigned).long() @ unpack_int4(a["qweight"]).long().T
    assert torch.equal(y.long().cpu(), exact.cpu()) and torch.equal(y, y.round())


def test_deterministic_bytes():
    a = act_inputs(37, 128, 16, device=DEVICE)
    first = tb.quantize_act(a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0)
    second = tb.quantize_act(a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0)
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    g = gemm_inputs(37, 128, 24, 16, device=DEVICE)
    y1 = tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.bfloat16)
    y2 = tb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.bfloat16)
    assert torch.equal(y1.view(torch.int16), y2.view(torch.int16))


def test_compiles_without_graph_break(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    from engine.modules import SVDQLinear

    monkeypatch.setenv("SVDQ_KERNELS", "triton")
    layer = SVDQLinear.from_linear(torch.nn.Linear(128, 32), torch.randn(64, 128), rank=16).to(DEVICE)
    x = torch.randn(2, 5, 128, device=DEVICE)
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True, backend=counter)(x)
    assert counter.frame_count == 1 and torch.equal(y, layer(x))
    ops = " ".join(str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function")
    assert "svdq.quantize_act" in ops and "svdq.w4a4_gemm" in ops


def test_dispatch_uses_triton_when_asked(monkeypatch):
    from engine import kernels

    monkeypatch.setenv("SVDQ_KERNELS", "triton")
    assert kernels.backend_for(DEVICE) is tb


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SVDQ_KERNELS"] = "triton"
    code = (
        "import torch; from engine import kernels\n"
        "kernels.quantize_act(torch.randn(2, 64), torch.ones(64), torch.zeros(0, 64))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "SVDQ_KERNELS=triton: the triton backend cannot run on cpu" in res.stderr
    assert "TRITON_INTERPRET=1" in res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)])
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


_COMPILE_FOR_TARGETS = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import engine.kernels.triton_backend as tb

qsig = {"x_ptr": "*bf16", "smooth_ptr": "*bf16", "down_ptr": "*bf16", "qx_ptr": "*u8", "ascales_ptr": "*fp32",
        "lora_ptr": "*fp32", "M": "i32", "K": "i32", "R": "i32", "shift": "fp32"}
qconst = {"BLOCK_M": 32, "BLOCK_R": 32, "GROUP": 64, "UNSIGNED": True, "HAS_LORA": True, "LIBDEVICE_RINT": True}
gsig = {"qx_ptr": "*u8", "ascales_ptr": "*fp32", "qw_ptr": "*u8", "wscales_ptr": "*bf16", "lora_ptr": "*fp32",
        "up_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "R": "i32"}
gconst = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_R": 32, "GROUP": 64, "UNSIGNED": False, "HAS_LORA": True,
          "HAS_BIAS": True}
out = {}
for cc in (80, 86, 90):
    target = GPUTarget("cuda", cc, 32)
    src = ASTSource(fn=tb._quantize_act_kernel, signature={**qsig, **dict.fromkeys(qconst, "constexpr")},
                    constexprs=qconst)
    cubin = triton.compile(src, target=target).asm["cubin"]
    src = ASTSource(fn=tb._w4a4_gemm_kernel.fn, signature={**gsig, **dict.fromkeys(gconst, "constexpr")},
                    constexprs=gconst)
    ptx = triton.compile(src, target=target, options={"num_warps": 8, "num_stages": 3}).asm["ptx"]
    tokens = ptx.replace(";", " ").replace(",", " ").split()
    out[cc] = {"quantize_cubin_bytes": len(cubin), "gemm_mma": sorted({t for t in tokens if "mma." in t})}
json.dump(out, sys.stdout)
"""


def test_kernels_compile_to_int8_tensor_cores_for_gpu_targets():
    """Compiled (not interpreted) for sm_80, sm_86 and sm_90 by triton's own ptxas, no GPU needed:
    the GEMM must lower to int8 tensor-core MMA (mma.sync on Ampere/Ada, wgmma on Hopper)."""
    import json
    import re

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_TARGETS], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    for cc, info in got.items():
        assert info["quantize_cubin_bytes"] > 0
        pattern = (
            r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8"
            if int(cc) >= 90
            else r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32"
        )
        assert any(re.fullmatch(pattern, m) for m in info["gemm_mma"]), (cc, info["gemm_mma"])
