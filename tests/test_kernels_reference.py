"""The reference backend and the dispatch: contract, exactness, errors."""

import pytest
import torch

from engine import kernels
from engine.kernels import reference
from engine.quant import dequantize_int4, unpack_int4

from .kernel_cases import act_inputs, gemm_inputs


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("r", [0, 16])
def test_integer_gemm_equals_dequantized_matmul(unsigned, r):
    a = gemm_inputs(37, 256, 48, r, unsigned=unsigned, dtype=torch.float32)
    y = kernels.w4a4_gemm(**a, unsigned=unsigned, out_dtype=torch.float32)
    x_deq = dequantize_int4(unpack_int4(a["qx"], signed=not unsigned), a["ascales"])
    w_deq = dequantize_int4(unpack_int4(a["qweight"]), a["wscales"])
    ref = (
        x_deq.double() @ w_deq.double().T
        + a["lora_act"].double() @ a["proj_up"].double().T
        + a["bias"].double()
    )
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_integer_part_is_exact():
    # Unit scales, no epilogue: every output is an integer sum, exact in fp32.
    a = gemm_inputs(19, 512, 24, 0, bias=False, dtype=torch.float32)
    a["ascales"].fill_(1.0)
    a["wscales"].fill_(1.0)
    y = kernels.w4a4_gemm(**a, out_dtype=torch.float32)
    xi = unpack_int4(a["qx"]).long()
    wi = unpack_int4(a["qweight"]).long()
    assert torch.equal(y.long(), xi @ wi.T) and torch.equal(y, y.round())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype_and_leading_shape(dtype):
    a = act_inputs(12, 128, 8, dtype=dtype)
    x = a["x"].reshape(3, 4, 128)
    qx, ascales, lora_act = kernels.quantize_act(x, a["smooth"], a["proj_down"])
    assert qx.shape == (12, 64) and qx.dtype == torch.uint8
    assert ascales.shape == (12, 2) and ascales.dtype == torch.float32
    assert lora_act.shape == (12, 8) and lora_act.dtype == torch.float32
    assert (ascales[0, 0] == 0).item()  # the all-zero group


def test_quantize_act_matches_its_definition():
    a = act_inputs(16, 128, 4, dtype=torch.float32, unsigned=True)
    qx, ascales, lora_act = kernels.quantize_act(**a, unsigned=True, shift=0.171875)
    x_hat = (a["x"] + 0.171875) / a["smooth"]
    codes = unpack_int4(qx, signed=False)
    assert codes.min() >= 0 and codes.max() <= 15
    torch.testing.assert_close(ascales, x_hat.unflatten(-1, (2, 64)).amax(-1) / 15)
    torch.testing.assert_close(lora_act, x_hat @ a["proj_down"].T)


def test_bad_inputs_name_the_argument():
    a = act_inputs(4, 128, 4)
    with pytest.raises(ValueError, match="K=96 must be a multiple of the group size 64"):
        kernels.quantize_act(torch.randn(4, 96), torch.ones(96), torch.zeros(0, 96))
    with pytest.raises(TypeError, match="x must be float32"):
        kernels.quantize_act(a["x"].to(torch.int32), a["smooth"], a["proj_down"])
    with pytest.raises(ValueError, match=r"smooth must have shape \[128\]"):
        kernels.quantize_act(a["x"], a["smooth"][:64], a["proj_down"])
    with pytest.raises(ValueError, match="proj_down"):
        kernels.quantize_act(a["x"], a["smooth"], a["proj_down"][:, :64])
    g = gemm_inputs(4, 128, 8, 2)
    with pytest.raises(TypeError, match="qweight must be a 2-D uint8"):
        kernels.w4a4_gemm(**{**g, "qweight": g["qweight"].to(torch.int8)})
    with pytest.raises(ValueError, match="qweight must have shape"):
        kernels.w4a4_gemm(**{**g, "qweight": g["qweight"][:, :32]})
    with pytest.raises(ValueError, match="wscales"):
        kernels.w4a4_gemm(**{**g, "wscales": g["wscales"][:4]})
    with pytest.raises(ValueError, match="proj_up"):
        kernels.w4a4_gemm(**{**g, "proj_up": g["proj_up"][:, :1]})
    with pytest.raises(ValueError, match="bias"):
        kernels.w4a4_gemm(**{**g, "bias": g["bias"][:3]})
    with pytest.raises(TypeError, match="out_dtype"):
        kernels.w4a4_gemm(**g, out_dtype=torch.int32)


def test_dispatch_selection(use_kernels):
    use_kernels("reference")
    assert kernels.backend_for("cpu") is reference
    use_kernels(" Auto ")
    assert kernels.backend_for("cpu") is reference  # the interpreter is never chosen automatically
    with pytest.raises(ValueError, match="SVDQ_KERNELS='fastest' is not a kernel backend"):
        use_kernels("fastest")
    assert kernels.config().backend == "auto"  # a refused choice changes nothing


@pytest.mark.parametrize("name", ["cuda"])
def test_named_backend_that_cannot_run_is_a_clear_error(use_kernels, name):
    reason = kernels.unavailable_reason(name, torch.device("cpu"))
    assert reason  # the CUDA backend does not run on a CPU tensor
    use_kernels(name)
    with pytest.raises(kernels.BackendUnavailableError, match=f"the {name} backend cannot run on cpu"):
        kernels.quantize_act(**act_inputs(4, 64, 0))


def test_custom_ops_pass_opcheck():
    a = act_inputs(6, 128, 8)
    torch.library.opcheck(
        torch.ops.svdq.quantize_act.default, (a["x"], a["smooth"], a["proj_down"], 64, False, 0.0)
    )
    g = gemm_inputs(6, 128, 16, 8)
    torch.library.opcheck(
        torch.ops.svdq.w4a4_gemm.default, (*g.values(), None, None, None, False, torch.bfloat16)
    )
    e = _epilogue(6, 16, 2, torch.bfloat16)
    p = torch.randn(6, 16).bfloat16()
    torch.library.opcheck(torch.ops.svdq.w4a4_gemm.default, (*g.values(), p, *e.values(), False, torch.bfloat16))
    meta = {k: v.to("meta") for k, v in g.items()}
    y = torch.ops.svdq.w4a4_gemm(*meta.values(), None, None, None, False, torch.float16)
    assert y.shape == (6, 16) and y.dtype == torch.float16 and y.device.type == "meta"


def _epilogue(m: int, n: int, images: int, dtype: torch.dtype, seed: int = 5) -> dict:
    """The gate/residual epilogue's operands: residual [M, N] (the block's stream, larger than y)
    and gate [images, N] (AdaLN's per-image gates)."""
    g = torch.Generator().manual_seed(seed)
    return {"residual": (torch.randn(m, n, generator=g) * 16).to(dtype),
            "gate": torch.randn(images, n, generator=g).to(dtype)}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("images", [1, 3])
def test_gate_residual_epilogue_is_diffusers_eager_arithmetic(dtype, images):
    """The epilogue against the definer: diffusers' block computes ``h + gate.unsqueeze(1) * y``
    on the linear's output y in the model's dtype (FluxTransformerBlock.forward); on y from the
    same GEMM without the epilogue, the reference's result is that, bit for bit, for every dtype;
    rows take their own image's gate row."""
    m, n = 3 * 7, 24
    g = gemm_inputs(m, 128, n, 5, dtype=dtype)
    e = _epilogue(m, n, images, dtype)
    y = reference.w4a4_gemm(**g, unsigned=False, out_dtype=dtype)  # [M, N] the linear's output
    h = reference.w4a4_gemm(**g, **e, unsigned=False, out_dtype=dtype)
    b, s = images, m // images
    want = (e["residual"].view(b, s, n) + e["gate"].unsqueeze(1) * y.view(b, s, n)).view(m, n)
    assert h.dtype == dtype and torch.equal(h, want)
    # and through the public op on the reference backend
    assert torch.equal(kernels.w4a4_gemm(**g, **e, out_dtype=dtype), want)
    if images > 1:  # image 0's gate on every row would be another result
        wrong = e["residual"] + e["gate"][:1] * y
        assert not torch.equal(h, wrong)
    # a split-input linear's two parts in one output (the single block's proj_out): the second
    # GEMM adds the first's output before the gate, y = rnd(y1 + y0) (one rounding where
    # SplitInputLinear's part0(x0) + part1(x1) rounds y1 first)
    g1 = gemm_inputs(m, 64, n, 3, dtype=dtype, seed=1)
    y1 = reference.w4a4_gemm(**g1, unsigned=True, out_dtype=torch.float32)
    h2 = kernels.w4a4_gemm(**g1, partial=y, **e, unsigned=True, out_dtype=dtype)
    y01 = (y1 + y.float()).to(dtype)
    assert torch.equal(h2, (e["residual"].view(b, s, n) + e["gate"].unsqueeze(1) * y01.view(b, s, n)).view(m, n))


def test_bad_epilogue_inputs_name_the_argument():
    g = gemm_inputs(6, 128, 8, 2)
    e = _epilogue(6, 8, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="residual and gate come together"):
        kernels.w4a4_gemm(**g, residual=e["residual"])
    with pytest.raises(TypeError, match="gate must have out_dtype"):
        kernels.w4a4_gemm(**g, residual=e["residual"], gate=e["gate"].float())
    with pytest.raises(ValueError, match=r"residual must have shape \[6, 8\]"):
        kernels.w4a4_gemm(**g, residual=e["residual"][:4], gate=e["gate"])
    with pytest.raises(TypeError, match="partial must have out_dtype"):
        kernels.w4a4_gemm(**g, partial=torch.zeros(6, 8))
    with pytest.raises(ValueError, match=r"partial must have shape \[6, 8\]"):
        kernels.w4a4_gemm(**g, partial=torch.zeros(6, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"gate must have shape .* B dividing M=6"):
        kernels.w4a4_gemm(**g, residual=e["residual"], gate=torch.zeros(4, 8, dtype=torch.bfloat16))
