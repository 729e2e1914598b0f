"""Our custom ops under inductor, go_fast's real backend, on the Triton kernels (interpreted on CPU).

aot_eager (tests/test_go_fast.py) traces through the fake ops but asserts nothing about them;
inductor's generated code asserts every custom op's output sizes and strides against its fake
(``assert_size_stride``), as the warm-up compile in setup() does on a GPU. A backend whose
layout differs from its fake (the Triton ``ascales`` were group-major, the fake row-major)
fails here as it would at setup. And the contract test: every backend's outputs have exactly
the fake's sizes, dtypes and strides, op by op, at edge shapes.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engine import kernels
from engine.flux import load_transformer
from engine.go_fast import CompileSettings, _compile_kwargs, configure_compiler, transformer_inputs
from engine.modules import SVDQLinear
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import params_to_float

SETUP = CompileSettings(attention="sdpa")  # setup()'s compile (inductor, its mode, dynamic shapes)


@pytest.fixture()
def fresh_inductor():
    """An empty dynamo cache and no inductor caches: a graph cached by another run (compiled
    against another fake) must not stand in for this compile."""
    import torch.fx.experimental._config as fx_config

    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(force_disable_caches=True),
        torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False),
        fx_config.patch(use_duck_shape=True),
    ):
        yield
    torch._dynamo.reset()


def _needs_interpreter() -> None:
    if kernels.unavailable_reason("triton", torch.device("cpu")):
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")


@pytest.mark.slow  # 5-10 s: kept out of the one-minute working loop, run by CI
def test_quantized_layer_compiles_with_inductor_on_triton(fresh_inductor, use_kernels):
    """A quantized linear, plain, with each prologue (LayerNorm + modulation, GELU) and with the
    GEMM's gate/residual epilogue, through
    inductor with kernels=triton: compiles, and agrees with the eager layer bit for bit (the same
    kernels run; inductor only moves the reshapes around them)."""
    _needs_interpreter()
    use_kernels("triton")
    torch.manual_seed(0)
    layer = SVDQLinear.from_linear(
        torch.nn.Linear(128, 48), torch.randn(64, 128), rank=8, dtype=torch.float32
    )
    x = torch.randn(2, 9, 128)  # M = 18: odd and not a multiple of any tile
    scale, shift = torch.randn(2, 128) * 0.1, torch.randn(2, 128) * 0.1
    residual, gate = torch.randn(2, 9, 48), torch.randn(2, 48)  # the gate/residual epilogue

    def forward(x, scale, shift, residual, gate):
        return (
            layer(x),
            layer(x, modulation=(scale, shift)),
            layer(x, gelu=True),
            layer(x, gelu=True, residual=residual, gate=gate),
            layer(x, partial=residual, residual=residual, gate=gate),
        )

    configure_compiler(SETUP)
    compiled = torch.compile(forward, **_compile_kwargs(SETUP))
    with torch.inference_mode():
        got, want = compiled(x, scale, shift, residual, gate), forward(x, scale, shift, residual, gate)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.slow
def test_tiny_transformer_compiles_with_inductor_on_triton(fresh_inductor, use_kernels, tiny_model_dir):
    """The tiny transformer as setup()'s warm-up compiles it (go_fast's settings, inductor), every
    quantized layer on the Triton kernels (the prologue ops included): compiles, and agrees with
    the eager model on the reference kernels (the interpreter runs the Triton side once)."""
    _needs_interpreter()
    transformer = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
    torch.manual_seed(0)
    inputs = transformer_inputs(transformer, 64, 64, 1, text_tokens=16)  # small: the interpreter runs it
    with torch.inference_mode():
        use_kernels("reference")
        want = transformer(**inputs)[0]
        use_kernels("triton")
        configure_compiler(SETUP)
        got = torch.compile(transformer, **_compile_kwargs(SETUP))(**inputs)[0]
    # Same codes and scales; the order of fp32 sums differs (GEMM groups, low-rank, norms, and
    # inductor's fusion of the glue): tests/test_kernels_triton.py measures 5.5e-5 eagerly.
    err = (got - want).norm() / want.norm()
    assert err < 5e-4, err.item()


# --- the contract: every backend's outputs have the fake's sizes, dtypes and strides -------------


def _cases(device: torch.device) -> list[tuple[str, tuple, dict]]:
    """(op name, args, note) at edge shapes: one row, odd rows, rank 0 and odd ranks, both
    prologues, both signednesses, group 128."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    cases = []
    for m, k, r, group, unsigned in ((1, 64, 0, 64, False), (7, 128, 5, 64, True), (33, 256, 16, 128, False)):
        x, smooth, down = rnd(m, k), rnd(k).abs() + 0.5, rnd(r, k)
        cases.append(("quantize_act", (x, smooth, down, group, unsigned, 0.0)))
        cases.append(
            ("quantize_act_prologue", (x.bfloat16(), smooth, down, None, None, group, unsigned, 0.0, True))
        )
        mod = (rnd(1, k, dtype=torch.bfloat16), rnd(1, k, dtype=torch.bfloat16))
        cases.append(
            ("quantize_act_prologue", (x.bfloat16(), smooth, down, *mod, group, unsigned, 0.0, False))
        )
        qx, ascales, lora_act = kernels.backend_for("cpu").quantize_act(
            x.cpu(), smooth.cpu(), down.cpu(), group_size=group, unsigned=unsigned, shift=0.0
        )
        n = 24
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g).to(device)
        ws = rnd(k // group, n).abs().t()  # group-major, as SVDQLinear holds it
        for bias, out_dtype, gated in ((None, torch.bfloat16, False), (rnd(n), torch.float32, False),
                                        (rnd(n), torch.bfloat16, True)):  # fmt: skip
            # the gate/residual epilogue: a non-contiguous residual (a view), gate [1, N]
            residual = rnd(n, m, dtype=out_dtype).t() if gated else None
            args = (
                qx.to(device),
                ascales.to(device),
                qw,
                ws,
                lora_act.to(device),
                rnd(n, r),
                bias,
                rnd(m, n, dtype=out_dtype) if gated else None,  # partial
                residual,
                rnd(1, n, dtype=out_dtype) if gated else None,
                unsigned,
                out_dtype,
            )
            cases.append(("w4a4_gemm", args))
    qw = torch.randint(0, 256, (40, 64), dtype=torch.uint8, generator=g).to(device)
    for rows in (1, 3):
        cases.append(
            ("w4a16_gemv", (rnd(rows, 128, dtype=torch.bfloat16), qw, rnd(40, 2), rnd(40, 2), rnd(40)))
        )
    return cases


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.stride() if t.numel() else None


def _backends(device: torch.device) -> list[str]:
    return [b for b in kernels.BACKENDS if kernels.unavailable_reason(b, device) is None]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_backend_returns_exactly_the_fake_layout(device, use_kernels):
    """For each backend that runs here, each op's outputs against its fake op's: sizes, dtypes,
    strides (what inductor asserts). An op the backend lacks runs where op_backend_for sends it."""
    device = torch.device(device)
    backends = _backends(device)
    assert "reference" in backends
    for backend in backends:
        use_kernels(backend)
        for name, args in _cases(device):
            op = getattr(torch.ops.svdq, name)
            real = op(*args)
            with FakeTensorMode(allow_non_fake_inputs=False) as mode:
                fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                fake = op(*fake_args)
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            got = [_layout(t) for t in real]
            want = [_layout(t) for t in fake]
            assert got == want, (backend, name, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
