"""The W4A8 route through the serving stack (issue 27): kernels.w4a8_route, the W4A8 custom ops
and SVDQLinear's use of them, on the CPU with the route forced (``configure(w4a8="force")``: the
W4A8 ops then run on the reference, engine.quant.ops, the contract's definer).

What holds here: a forced call computes exactly ops.quantize_act_fp8 + ops.w4a8_gemm (with the
block's prologue, its partial/gate/residual epilogue and LoRAs); it lies within stated bounds of
the W4A4 route and of the unquantized linear; the fakes give the reference's sizes, strides and
dtypes; inductor compiles the route; and the route is not taken by default on the CPU or below
the minimum M. What does not: the Hopper kernels themselves
(Gluon: no run without a GPU; their compiled PTX is executed in tests/test_w4a8_gemm_exec.py and
tests/test_act_fp8.py).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engine import kernels
from engine.modules import SVDQLinear
from engine.quant import ops
from engine.quant.int4 import unpack_int4

MIN_M = kernels.W4A8_MIN_M


@pytest.fixture()
def forced(use_kernels):
    """The W4A8 route forced on any device (the reference serves its ops here)."""
    use_kernels("auto", w4a8="force")
    yield
    # use_kernels resets to configure("auto"): w4a8 back to auto


def _layer(k: int = 128, n: int = 48, rank: int = 8, *, unsigned: bool = False, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
        linear.bias.copy_(torch.randn(n, generator=g) * 0.1)
    calib = torch.randn(256, k, generator=g)
    if unsigned:
        calib = torch.nn.functional.gelu(calib, approximate="tanh")
    layer = SVDQLinear.from_linear(
        linear, calib, rank=rank, dtype=torch.float32, unsigned=unsigned, act_shift=0.17 if unsigned else 0.0
    )
    return layer, linear


def _fp8_linear(layer: SVDQLinear, x: torch.Tensor, *, modulation=None, gelu=False, partial=None,
                residual=None, gate=None) -> torch.Tensor:  # fmt: skip
    """The contract's W4A8 arithmetic for ``layer`` on x [B, S, K] (ops, not kernels)."""
    down = layer.proj_down if layer._lora_down is None else layer._lora_down
    up = layer.proj_up if layer._lora_up is None else layer._lora_up
    bias = layer.bias if layer._lora_bias is None else layer._lora_bias
    mod = modulation or (None, None)
    codes, ascale, lora_act = ops.quantize_act_fp8(
        x.reshape(-1, x.shape[-1]), layer.smooth_factor, down, *mod, shift=layer.act_shift, gelu=gelu
    )
    n = layer.out_features
    flat = [None if t is None else t.reshape(-1, n) for t in (partial, residual)]
    y = ops.w4a8_gemm(codes, ascale, layer.qweight, layer.wscales, lora_act, up, bias, *flat, gate,
                      out_dtype=x.dtype)  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_minimum_m_is_the_hopper_dispatchs():
    """W4A8 takes the calls the warp-specialized kernel takes (M > 1024), not the text stream's."""
    from engine.kernels.triton import gemm_sm90_ws

    assert kernels.W4A8_MIN_M == gemm_sm90_ws.MIN_M
    assert kernels.w4a8_min_m(torch.device("cpu")) == kernels.W4A8_MIN_M


def _exact_activations(layer: SVDQLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer with its quantized weight and unquantized activations: what both routes
    approximate, so their distance to it is the activation format's error alone."""
    n, k = layer.out_features, layer.in_features
    x_hat = (x.reshape(-1, k).float() + layer.act_shift) / layer.smooth_factor.float()
    g = layer.wscales.shape[1]
    w = unpack_int4(layer.qweight).float().view(n, g, k // g) * layer.wscales.float()[:, :, None]
    y = x_hat @ w.view(n, k).T + x_hat @ layer.proj_down.float().T @ layer.proj_up.float().T + layer.bias
    return y.reshape(*x.shape[:-1], n)


@pytest.mark.parametrize("unsigned", [False, True])
def test_forced_layer_is_the_w4a8_arithmetic_and_close_to_w4a4_and_float(forced, unsigned):
    """M = MIN_M (the first M taken). Measured here (K=128, N=48, rank 8, fp32, seed 0; signed,
    unsigned): against the exact-activation layer, W4A8 0.021, 0.023 and W4A4 0.089, 0.055;
    against the unquantized linear W4A8 0.089, 0.082 and W4A4 0.124, 0.097 (the 4-bit weight's
    0.087, 0.079 dominates); W4A8 against W4A4 0.092, 0.060."""
    layer, linear = _layer(unsigned=unsigned)
    x = torch.randn(1, MIN_M, 128)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")  # fc2's input, >= -0.17
    with torch.no_grad():
        got = layer(x)
        assert torch.equal(got, _fp8_linear(layer, x))
        want, exact = linear(x), _exact_activations(layer, x)
        kernels.configure("auto", w4a8="off")
        w4a4 = layer(x)
    act8, act4 = _rel(got, exact), _rel(w4a4, exact)
    assert act8 < 0.03 and act8 < act4 / 2, (act8, act4)
    assert _rel(got, want) < _rel(w4a4, want) < 0.15
    assert 0 < _rel(got, w4a4) < 0.12


def test_forced_layer_with_prologues_epilogue_and_lora(forced):
    """modulation (LayerNorm + AdaLN), GELU, partial + gate + residual, and a LoRA widening the
    low-rank branch: each is ops' arithmetic exactly; removing the LoRA restores the base."""
    layer, _ = _layer()
    b, s, k, n = 2, 520, 128, 48  # M = 1040
    x = torch.randn(b, s, k)
    mod = (torch.randn(b, k) * 0.1, torch.randn(b, k) * 0.1)
    partial, residual, gate = torch.randn(b, s, n), torch.randn(b, s, n), torch.randn(b, n)
    cases = [
        {"modulation": mod},
        {"gelu": True},
        {"gelu": True, "partial": partial, "residual": residual, "gate": gate},
        {"modulation": mod, "residual": residual, "gate": gate},
    ]
    with torch.no_grad():
        base = layer(x)
        g = torch.Generator().manual_seed(5)
        layer.add_lora(
            "style", torch.randn(4, k, generator=g) * 0.1, torch.randn(n, 4, generator=g) * 0.1, 0.8
        )
        assert layer._lora_down.shape[0] == layer.rank + 4
        with_lora = layer(x)
        assert torch.equal(with_lora, _fp8_linear(layer, x)) and not torch.equal(with_lora, base)
        for kw in cases:
            assert torch.equal(layer(x, **kw), _fp8_linear(layer, x, **kw)), sorted(kw)
        layer.remove_lora("style")
        assert torch.equal(layer(x), base)


def test_not_taken_by_default_on_cpu_below_the_minimum_or_for_a_code_minus_8(use_kernels, monkeypatch):
    layer, _ = _layer()
    taken = []
    real = kernels.w4a8_gemm
    monkeypatch.setattr(kernels, "w4a8_gemm", lambda *a, **kw: taken.append(a[0].shape[0]) or real(*a, **kw))
    big, small = torch.randn(MIN_M, 128), torch.randn(MIN_M - 1, 128)

    def w4a4(x):
        qx, sa, la = ops.quantize_act(x, layer.smooth_factor, layer.proj_down, group_size=64, unsigned=False,
                                      shift=0.0)  # fmt: skip
        return ops.w4a4_gemm(qx, sa, layer.qweight, layer.wscales, la, layer.proj_up, layer.bias, unsigned=False,
                             out_dtype=x.dtype)  # fmt: skip

    with torch.no_grad():
        for backend in ("auto", "reference"):  # the CPU's backends: neither serves W4A8
            use_kernels(backend)
            assert not kernels.w4a8_served(torch.device("cpu"))
            assert torch.equal(layer(big), w4a4(big)) and not taken
        use_kernels("auto", w4a8="force")
        assert torch.equal(layer(small), w4a4(small)) and not taken  # M = 1024: the text stream's side
        layer(big)
        assert taken == [MIN_M]
        # a weight with a code -8 takes the route too: the contract reads it as -7
        with torch.no_grad():
            layer.qweight[3, 7] = 0x80 | (layer.qweight[3, 7] & 0x0F)
        layer(big)
        assert taken == [MIN_M, MIN_M]


def test_configure_names_the_field():
    with pytest.raises(ValueError, match="w4a8='on'"):
        kernels.configure("auto", w4a8="on")


# --- the ops: argument checks and fakes ----------------------------------------------------------


def _gemm_args(m=5, k=128, n=24, r=3, out_dtype=torch.bfloat16, gated=True):
    g = torch.Generator().manual_seed(1)
    codes, ascale, lora_act = ops.quantize_act_fp8(
        torch.randn(m, k, generator=g),
        torch.rand(k, generator=g) + 0.5,
        torch.randn(r, k, generator=g),
        shift=0.0,
    )
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    ws = torch.rand(k // 64, n, generator=g).t()  # group-major, as SVDQLinear holds it
    extra = (
        (torch.randn(m, n, generator=g).to(out_dtype), torch.randn(n, m, generator=g).to(out_dtype).t(),
         torch.randn(1, n, generator=g).to(out_dtype)) if gated else (None, None, None)
    )  # fmt: skip
    return (
        codes,
        ascale,
        qw,
        ws,
        lora_act,
        torch.randn(n, r, generator=g),
        torch.randn(n, generator=g),
        *extra,
    )


_NAMES = (
    "codes",
    "ascale",
    "qweight",
    "wscales",
    "lora_act",
    "proj_up",
    "bias",
    "partial",
    "residual",
    "gate",
)


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("codes", lambda t: t.to(torch.float32), "codes must be a 2-D float8_e4m3fn"),
        ("ascale", lambda t: t[:-1], r"ascale must have shape \[5\]"),
        ("qweight", lambda t: t[:, :-1], r"qweight must have shape \[N, 64\]"),
        (
            "wscales",
            lambda t: t[:, :1].expand(24, 3),
            r"wscales must have shape \[24, G\] with G dividing K=128",
        ),
        ("lora_act", lambda t: t[:-1], r"lora_act must have shape \[5, R\]"),
        ("proj_up", lambda t: t[:, :-1], r"proj_up must have shape \[24, 3\]"),
        ("bias", lambda t: t[:-1], r"bias must have shape \[24\]"),
        ("partial", lambda t: t.float(), "partial must have out_dtype"),
        ("gate", lambda t: None, "residual and gate come together"),
        ("residual", lambda t: t[:-1], r"residual must have shape \[5, 24\]"),
    ],
)
def test_w4a8_gemm_names_the_bad_field(name, bad, match):
    args = list(_gemm_args())
    i = _NAMES.index(name)
    args[i] = bad(args[i])
    with pytest.raises((TypeError, ValueError), match=match):
        kernels.w4a8_gemm(*args, out_dtype=torch.bfloat16)


def test_quantize_act_fp8_names_the_bad_field():
    x, smooth, down = torch.randn(2, 3, 64), torch.ones(64), torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"smooth must have shape \[64\]"):
        kernels.quantize_act_fp8(x, smooth[:32], down)
    with pytest.raises(ValueError, match=r"proj_down must have shape \[R, 64\]"):
        kernels.quantize_act_fp8(x, smooth, down[:, :32])
    with pytest.raises(ValueError, match="one prologue"):
        kernels.quantize_act_fp8(
            x, smooth, down, modulation=(torch.zeros(2, 64), torch.zeros(2, 64)), gelu=True
        )
    with pytest.raises(TypeError, match="x must be float32"):
        kernels.quantize_act_fp8(x.to(torch.int32), smooth, down)


def _act_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(2)
    cases = []
    for m, k, r in ((1, 64, 0), (7, 128, 5), (33, 256, 16)):
        x, smooth, down = (
            torch.randn(m, k, generator=g),
            torch.rand(k, generator=g) + 0.5,
            torch.randn(r, k, generator=g),
        )
        mod = (torch.randn(1, k, generator=g).bfloat16(), torch.randn(1, k, generator=g).bfloat16())
        cases += [(x, smooth, down, None, None, 0.0, False), (x.bfloat16(), smooth, down, None, None, 0.17, True),
                  (x.bfloat16(), smooth, down, *mod, 0.0, False)]  # fmt: skip
    return cases


def _bits(t: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as their bytes (bit for bit; NaN codes compare equal), other tensors as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.stride() if t.numel() else None


def _fake_matches(op, args) -> None:
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert [_layout(t) for t in real] == [_layout(t) for t in fake]


def test_fakes_are_the_references_layouts(use_kernels):
    """Each op's outputs against its fake's: sizes, dtypes, strides (inductor asserts them), on
    every backend that runs here (the W4A8 ops run on the reference wherever a backend lacks them)."""
    for backend in [
        b for b in kernels.BACKENDS if kernels.unavailable_reason(b, torch.device("cpu")) is None
    ]:
        use_kernels(backend)
        for args in _act_cases():
            _fake_matches(torch.ops.svdq.quantize_act_fp8, args)
        for out_dtype in (torch.bfloat16, torch.float32):
            for gated in (False, True):
                _fake_matches(
                    torch.ops.svdq.w4a8_gemm, (*_gemm_args(out_dtype=out_dtype, gated=gated), out_dtype)
                )
        _fake_matches(torch.ops.svdq.w4a8_gemm, (*_gemm_args(m=1, r=0, gated=False), torch.float16))


# --- the FLUX model: its blocks' prologues, epilogues and LoRAs on the route, and compiled --------


@pytest.fixture(scope="module")
def tiny_w4a8(tiny_model_dir):
    """The tiny quantized transformer (fp32) and inputs of 1088 image tokens (544x512): the
    image stream and the joint sequence reach MIN_M, the text stream (16 tokens) does not."""
    from engine.flux import load_transformer
    from engine.go_fast import transformer_inputs
    from engine.tiny_model import CHECKPOINT_NAME

    from .flux_cases import params_to_float

    transformer = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
    torch.manual_seed(0)
    return transformer, transformer_inputs(transformer, 544, 512, 1, text_tokens=16)


class _Spy:
    """Records each W4A8 / W4A4 call the model's SVDQLinears make (kernels' public functions)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fp8, self.gemm, self.w4a4 = [], [], []
        act, gemm, act4 = kernels.quantize_act_fp8, kernels.w4a8_gemm, kernels.quantize_act

        def spy_act(x, smooth, down, **kw):
            self.fp8.append(
                ("modulation" if kw.get("modulation") else "gelu" if kw.get("gelu") else "", down.shape[0])
            )
            return act(x, smooth, down, **kw)

        def spy_gemm(*a, **kw):
            self.gemm.append(("partial" if a[7] is not None else "") + ("gated" if a[8] is not None else ""))
            return gemm(*a, **kw)

        def spy_w4a4(x, *a, **kw):
            self.w4a4.append(x.numel() // x.shape[-1])
            return act4(x, *a, **kw)

        monkeypatch.setattr(kernels, "quantize_act_fp8", spy_act)
        monkeypatch.setattr(kernels, "w4a8_gemm", spy_gemm)
        monkeypatch.setattr(kernels, "quantize_act", spy_w4a4)


def _velocity(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def test_flux_model_takes_the_route_with_prologues_epilogues_and_loras(tiny_w4a8, tiny_model_dir, monkeypatch,
                                                                       use_kernels):  # fmt: skip
    """Forced, every image-stream and joint-sequence linear runs W4A8 (the modulation and GELU
    prologues, the gated and partial+gated epilogues among them), the text stream's W4A4; the
    velocity lies within the stated bounds of the W4A4 route's and the unquantized model's
    (relative, measured: W4A8 vs float 1.40e-3, W4A4 vs float 1.88e-3, W4A8 vs W4A4 1.41e-3;
    with a LoRA on every quantized linear, its rank reaching quantize_act_fp8, W4A8 vs W4A4
    1.46e-3)."""
    from diffusers import FluxTransformer2DModel

    transformer, inputs = tiny_w4a8
    floats = FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").float()
    want = _velocity(floats, inputs)
    w4a4 = _velocity(transformer, inputs)  # auto: not taken on the CPU
    spy = _Spy(monkeypatch)
    use_kernels("auto", w4a8="force")
    got = _velocity(transformer, inputs)
    kinds = {kind for kind, _ in spy.fp8} | set(spy.gemm)
    assert {"modulation", "gelu", "gated", "partialgated"} <= kinds, kinds
    assert spy.w4a4 and set(spy.w4a4) == {16}  # the text stream only
    e8, e4, e84 = _rel(got, want), _rel(w4a4, want), _rel(got, w4a4)
    assert e8 < e4 < 5e-3 and 0 < e84 < 3e-3, (e8, e4, e84)

    layers = [m for m in transformer.modules() if isinstance(m, SVDQLinear)]
    g = torch.Generator().manual_seed(7)
    try:
        for layer in layers:
            k, n = layer.in_features, layer.out_features
            layer.add_lora(
                "style", torch.randn(4, k, generator=g) * 0.05, torch.randn(n, 4, generator=g) * 0.05
            )
        spy.fp8.clear()
        lora8 = _velocity(transformer, inputs)
        assert spy.fp8 and {r for _, r in spy.fp8} == {layer.rank + 4 for layer in layers}
        use_kernels("auto")
        lora4 = _velocity(transformer, inputs)
    finally:
        for layer in layers:
            layer.clear_loras()
    assert not torch.equal(lora8, got)
    assert 0 < _rel(lora8, lora4) < 3e-3


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_go_fast_compiles_the_route_into_each_block_class(tiny_w4a8, fresh_dynamo, use_kernels):
    """go_fast's regional compile (fullgraph, dynamic) with the route forced: no graph break, one
    graph per block class, the eager velocity bit for bit (aot_eager: the same ops run); a LoRA
    on every linear (wider static buffers) compiles its own two, also bit for bit."""
    from engine.go_fast import CompileSettings, GoFast, graphs_compiled

    transformer, inputs = tiny_w4a8
    use_kernels("auto", w4a8="force")
    eager = _velocity(transformer, inputs)
    fast = GoFast(transformer, CompileSettings(backend="aot_eager", mode=None, attention="sdpa"))
    layers = [m for m in transformer.modules() if isinstance(m, SVDQLinear)]
    try:
        before = graphs_compiled()
        with torch.no_grad():
            got = fast.compiled(**inputs)[0]
        assert graphs_compiled() - before == 2
        assert torch.equal(got, eager)
        g = torch.Generator().manual_seed(3)
        for layer in layers:
            layer.add_lora("style", torch.randn(4, layer.in_features, generator=g) * 0.05,
                           torch.randn(layer.out_features, 4, generator=g) * 0.05)  # fmt: skip
        with fast.disabled():
            eager_lora = _velocity(transformer, inputs)
        with torch.no_grad():
            got = fast.compiled(**inputs)[0]
        assert graphs_compiled() - before == 4
        assert torch.equal(got, eager_lora) and not torch.equal(got, eager)
    finally:
        for layer in layers:
            layer.clear_loras()
        for block in fast.eager.modules():
            if getattr(block, "_compiled_call_impl", None) is not None:
                block._compiled_call_impl = None


def test_inductor_compiles_the_route_without_stride_asserts(fresh_dynamo, use_kernels):
    """Inductor asserts every custom op's outputs against its fake (assert_size_stride): a quantized
    linear with each prologue and the partial/gate/residual epilogue, compiled as go_fast compiles
    (dynamic), runs W4A8 at M >= MIN_M and W4A4 below (a guard on the symbolic M: two graphs),
    each bit for bit the eager layer."""
    from engine.go_fast import CompileSettings, _compile_kwargs, configure_compiler, graphs_compiled

    use_kernels("auto", w4a8="force")
    layer, _ = _layer()
    scale, shift = torch.randn(2, 128) * 0.1, torch.randn(2, 128) * 0.1

    def forward(x, residual, gate):
        return (
            layer(x),
            layer(x, modulation=(scale, shift)),
            layer(x, gelu=True, residual=residual, gate=gate),
            layer(x, partial=residual, residual=residual, gate=gate),
        )

    settings = CompileSettings(attention="sdpa")
    configure_compiler(settings)
    compiled = torch.compile(forward, **_compile_kwargs(settings))
    before = graphs_compiled()
    # no inductor caches: a graph cached by another run (against another fake) must not stand in
    with torch._inductor.config.patch(force_disable_caches=True), torch.inference_mode():
        for s in (520, 9):  # M = 1040 (W4A8), then 18 (W4A4)
            x, residual, gate = torch.randn(2, s, 128), torch.randn(2, s, 48), torch.randn(2, 48)
            got, want = compiled(x, residual, gate), forward(x, residual, gate)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w), s
    assert graphs_compiled() - before == 2


# --- the triton backend's W4A8 pair -------------------------------------------------------------


def test_triton_backend_w4a8_ops_are_the_contract_on_cpu():
    """Off sm_90 the triton backend's GEMM is the reference's arithmetic; its quantizer is the
    Triton kernel (interpreted here) where it is in the build, else the reference: bit for bit
    ops' either way, in the fake's layouts."""
    import engine.kernels.triton_backend as tb

    if kernels.unavailable_reason("triton", torch.device("cpu")):
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    for x, smooth, down, mod_scale, mod_shift, shift, gelu in _act_cases():
        got = tb.quantize_act_fp8(x, smooth, down, mod_scale, mod_shift, shift=shift, gelu=gelu)
        want = ops.quantize_act_fp8(x, smooth, down, mod_scale, mod_shift, shift=shift, gelu=gelu)
        assert [_layout(t) for t in got] == [_layout(t) for t in want]
        assert torch.equal(_bits(got[0]), _bits(want[0])) and torch.equal(got[1], want[1])  # codes, ascale
        # lora_act: fp32 sums in the kernel's order (bf16 hi/lo MMAs for a bf16 proj_down)
        torch.testing.assert_close(got[2], want[2], rtol=2e-5, atol=1e-4)
    args = _gemm_args()
    got = tb.w4a8_gemm(*args, out_dtype=torch.bfloat16)
    assert torch.equal(got, ops.w4a8_gemm(*args, out_dtype=torch.bfloat16)) and got.is_contiguous()
    assert not tb.w4a8_serves(torch.device("cpu"))


@pytest.fixture()
def w4a8_kernels():
    """The W4A8 kernels' modules (act_fp8, gemm_sm90_w4a8)."""
    from engine.kernels.triton import act_fp8, gemm_sm90_w4a8

    return act_fp8, gemm_sm90_w4a8


def _meta_problem(m: int, k: int = 3072, n: int = 3072, r: int = 32, group: int = 64) -> dict:
    meta = {"device": "meta"}
    bf16 = {"dtype": torch.bfloat16, **meta}
    return {
        "x": torch.empty(1, m, k, **bf16),
        "qweight": torch.empty(n, k // 2, dtype=torch.uint8, **meta),
        "wscales": torch.empty(k // group, n, **bf16).t(),
        "proj_up": torch.empty(n, r, **bf16),
    }


def test_hopper_takes_the_w4a8_route_for_the_image_stream(w4a8_kernels, monkeypatch, use_kernels):
    """The route on an H100 as the dispatch sees it (meta tensors, the architecture read as
    sm_90, the GEMM's self-check taken as passed, the triton backend chosen as auto chooses it
    there): the image stream's and single blocks' calls (M > 1024) take W4A8; the text stream's
    (M <= 1024), a LoRA past the kernel's rank limit and group 128 stay W4A4; w4a8="off" turns it off."""
    import engine.kernels.triton_backend as tb

    _, gemm = w4a8_kernels
    monkeypatch.setattr(tb, "_major", lambda device: 9)
    monkeypatch.setattr(gemm, "serves", lambda device: True)
    monkeypatch.setattr(kernels, "backend_for", lambda device: tb)
    use_kernels("auto")

    def route(m, **kw):
        p = _meta_problem(m, **kw)
        return kernels.w4a8_route(p["x"], p["qweight"], p["wscales"], p["proj_up"])

    assert kernels.w4a8_backend_for("meta") is tb and kernels.w4a8_min_m(torch.device("meta")) == 1025
    assert route(4352) and route(1025) and route(4096, k=12288) and route(4352, n=21504)
    assert not route(1024) and not route(256)  # the text stream: gemm_sm90's small tiles
    assert route(4352, r=32 + 32) and not route(4352, r=32 + 64)  # a rank-64 LoRA: past MAX_RANK
    assert not route(4352, group=128)
    use_kernels("auto", w4a8="off")
    assert not route(4352)


def test_hopper_w4a8_gemm_launches_the_kernel_and_runs_the_epilogue_after_it(w4a8_kernels, monkeypatch):
    """The triton backend's w4a8_gemm on sm_90 (meta tensors, launchers recorded): the kernel with
    the prepared weight, out_dtype where there is no epilogue, fp32 and the epilogue kernel where
    there is; the reference for a problem the kernel does not take; quantize_act_fp8 launches act_fp8's kernel."""
    import engine.kernels.triton_backend as tb

    act_fp8, gemm = w4a8_kernels
    seen = []
    monkeypatch.setattr(tb, "_major", lambda device: 9)
    monkeypatch.setattr(gemm, "serves", lambda device: True)
    monkeypatch.setattr(gemm, "split_for", lambda device, m, n, k: ("split", m, n, k))  # the plan, passed on
    monkeypatch.setattr(gemm, "launch", lambda *a, out_dtype, split: seen.append(("kernel", a[2], out_dtype, split))
                        or torch.empty(a[0].shape[0], a[2].shape[0], dtype=out_dtype, device="meta"))  # fmt: skip
    monkeypatch.setattr(tb, "sm90_epilogue", lambda y, partial, residual, gate, out_dtype: seen.append(
        ("epilogue", y.dtype, partial is not None, residual is not None)) or torch.empty_like(y, dtype=out_dtype))  # fmt: skip
    monkeypatch.setattr(act_fp8, "quantize_act_fp8", lambda *a, **kw: seen.append(("act", kw["gelu"])))
    monkeypatch.setattr(ops, "w4a8_gemm", lambda *a, **kw: seen.append(("reference",)))
    prepared = torch.empty(3072, 1536, dtype=torch.uint8, device="meta")  # stands for the W4A8Weight
    monkeypatch.setattr(tb, "sm90_w4a8_weight", lambda qweight, wscales: prepared)

    m, k, n = 4352, 3072, 3072
    meta = {"device": "meta", "dtype": torch.bfloat16}
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device="meta")
    ascale, lora_act = torch.empty(m, device="meta"), torch.empty(m, 32, device="meta")
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, device="meta")
    wscales, up, bias = (
        torch.empty(k // 64, n, **meta).t(),
        torch.empty(n, 32, **meta),
        torch.empty(n, **meta),
    )
    residual, gate = torch.empty(m, n, **meta), torch.empty(1, n, **meta)
    base = (codes, ascale, qweight, wscales, lora_act, up, bias)
    tb.w4a8_gemm(*base, out_dtype=torch.bfloat16)
    assert seen.pop() == ("kernel", prepared, torch.bfloat16, ("split", m, n, k))
    tb.w4a8_gemm(*base, residual, residual, gate, out_dtype=torch.bfloat16)
    assert seen[-2:] == [("kernel", prepared, torch.float32, ("split", m, n, k)), ("epilogue", torch.float32, True, True)]
    tb.w4a8_gemm(*base[:4], lora_act.new_empty(m, 96), up.new_empty(n, 96), bias, out_dtype=torch.bfloat16)
    assert seen[-1] == ("reference",)  # rank 96: past the kernel's limit
    tb.quantize_act_fp8(
        torch.empty(m, k, **meta), bias.new_empty(k), up.new_empty(32, k), shift=0.0, gelu=True
    )
    assert seen[-1] == ("act", True)


def test_the_w4a8_weight_is_prepared_once_per_tensor(w4a8_kernels):
    """sm90_w4a8_weight: the kernel's layout made at the first call and kept; remade after an
    in-place write."""
    import engine.kernels.triton_backend as tb

    layer, _ = _layer(k=128, n=64)
    first = tb.sm90_w4a8_weight(layer.qweight, layer.wscales)
    assert first is not None and tb.sm90_w4a8_weight(layer.qweight, layer.wscales) is first
    with torch.no_grad():
        layer.qweight[0, 0] = 0x08  # a code -8 (stored as -7)
    again = tb.sm90_w4a8_weight(layer.qweight, layer.wscales)
    assert again is not first and tb.sm90_w4a8_weight(layer.qweight, layer.wscales) is again


@pytest.mark.slow  # inductor's C++ compile of two FLUX blocks on the CPU
def test_inductor_compiles_flux_blocks_on_the_route(tiny_model_dir, fresh_dynamo, use_kernels):
    """go_fast's regional compile under inductor (setup's backend: every custom op's outputs
    asserted against its fake) of one double and one single block, the route forced: two
    graphs, the eager velocity to fp32 rounding (inductor fuses the glue between the ops)."""
    from engine.flux import load_transformer
    from engine.go_fast import CompileSettings, GoFast, graphs_compiled, transformer_inputs
    from engine.tiny_model import CHECKPOINT_NAME

    from .flux_cases import params_to_float

    model = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
    model.transformer_blocks = model.transformer_blocks[:1]
    model.single_transformer_blocks = model.single_transformer_blocks[:1]
    torch.manual_seed(0)
    inputs = transformer_inputs(model, 544, 512, 1, text_tokens=16)
    use_kernels("auto", w4a8="force")
    eager = _velocity(model, inputs)
    with torch._inductor.config.patch(force_disable_caches=True):
        fast = GoFast(model, CompileSettings(backend="inductor", mode=None, attention="sdpa"))
        before = graphs_compiled()
        got = _velocity(fast.compiled, inputs)
    assert graphs_compiled() - before == 2
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_setup_compiles_a_graph_for_each_side_of_the_w4a8_guard(use_kernels):
    """The route's M guard splits go_fast's double-block graph by whether the image stream has
    >= w4a8_min_m rows: where W4A8 serves, setup's warm-up shapes (service.warm_up_shapes) must
    reach every (batch 1 or 2-4, side of the guard) class a served size x batch falls in, so no
    request compiles; where it does not serve, the base shapes only."""
    from engine import inputs
    from engine.service import WARM_UP_SHAPES, warm_up_shapes

    cpu = torch.device("cpu")
    assert warm_up_shapes(cpu) == WARM_UP_SHAPES  # auto on a CPU: W4A8 not served
    use_kernels("auto", w4a8="force")
    min_m = kernels.w4a8_min_m(cpu)

    def graph_class(width, height, batch):  # torch specialises batch 1; the guard splits on M
        return batch == 1, (width // 16) * (height // 16) * batch >= min_m

    warm = {graph_class(*shape) for shape in warm_up_shapes(cpu)}
    served = {graph_class(w, h, b) for w, h in inputs.served_sizes() for b in range(1, 5)}
    assert served <= warm, served - warm
    assert len(warm_up_shapes(cpu)) == len(WARM_UP_SHAPES) + 1  # one graph more, not one per size
