"""kernels.qk_norm_rope_sage against its definer: SageAttention 1.0.6's own preparation.

The definer is the package's ``per_block_int8`` (its Triton kernel, here under TRITON_INTERPRET=1
as in tests/test_attention.py) run on what the plain op gives: q, and k minus ``k.mean(dim=1)``
(sageattn's smoothing). The fused op must give its codes and scales bit for bit, at odd sizes
(S not a multiple of 128 or 64, text and image parts straddling a block), head dims 64 and 128,
bf16 and fp16; and the attention on them (our int8 kernel, V read from the parts in place) must
be the unfused path's output exactly (tests/test_int8_attention.py tests that kernel alone).
"""

import pytest
import torch

from engine import kernels
from engine.flux import attention
from engine.kernels import contract
from engine.quant.ops import SAGE_BLOCK_K, SAGE_BLOCK_Q, sage_per_block_int8, sage_q_multiplier
from engine.quant.ops import qk_norm_rope as reference_qk_norm_rope
from engine.quant.ops import qk_norm_rope_sage as reference_sage

from .test_qk_norm_rope import EPS, flat, random_parts

quant = pytest.importorskip("sageattention.quant_per_block")
tr = pytest.importorskip("engine.kernels.triton.rope")
needs_interpreter = pytest.mark.skipif(
    attention.sage_unavailable_reason(torch.device("cpu"), torch.bfloat16, 64, interpreter=True) is not None,
    reason="sageattention's kernels run here only under TRITON_INTERPRET=1",
)

# (B, S0, S1, H, D): two parts with the boundary inside a query block and S past a block's
# end, one part, a text part longer than a query block, two query blocks exactly
SHAPES = [(1, 37, 150, 2, 64), (2, 70, 0, 1, 128), (1, 130, 61, 1, 64), (1, 128, 128, 1, 128)]


@pytest.fixture(autouse=True)
def _restore_choice():
    before = attention.current()
    yield
    attention._state["kind"] = before


def definer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """sageattn's preparation of Q and K (sageattention/core.py, smooth_k) on the plain op's q, k
    (v: what the package would convert to fp16; our attention reads it in place)."""
    del v
    return quant.per_block_int8(q, k - k.mean(dim=1, keepdim=True), tensor_layout="NHD")


def _args(b, s0, s1, h, d, dtype, **kw):
    parts, cos, sin = random_parts(b, s0, s1, h, d, dtype, extra=8, **kw)
    return parts, (*flat(parts), cos, sin)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_is_sages_per_block_int8_on_the_plain_ops_output(shape, dtype):
    b, s0, s1, h, d = shape
    _, args = _args(b, s0, s1, h, d, dtype, scale=3.0)
    got = tr.qk_norm_rope_sage(*args, heads=h, eps=EPS)
    want = definer(*tr.qk_norm_rope(*args, heads=h, eps=EPS))
    s = s0 + s1
    sizes = [(b, s, h, d), (b, h, -(-s // 128), 1), (b, s, h, d), (b, h, -(-s // 64), 1)]
    for g, w, size in zip(got, want, sizes, strict=True):
        assert g.shape == size and g.dtype == w.dtype and g.is_contiguous()
        assert torch.equal(g, w)


@needs_interpreter
@pytest.mark.parametrize("shape", [(1, 37, 150, 2, 64), (1, 70, 0, 1, 128)])
def test_triton_with_a_large_k_offset(shape):
    """K mostly one shared vector (what sage's smoothing is for; RoPE the identity so it stays
    shared): the mean is then as large as K itself, and the last key block's tokens past S must
    count as 0 (not as minus the mean) in its scale, as in per_block_int8's masked load."""
    b, s0, s1, h, d = shape
    parts, args = _args(b, s0, s1, h, d, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    offset = torch.randn(h * d, generator=g) * 8
    parts = [(qkv.clone(), nq, nk) for qkv, nq, nk in parts]
    for qkv, _, _ in parts:
        qkv[..., h * d : 2 * h * d] += offset.to(qkv.dtype)
    cos, sin = torch.ones_like(args[-2]), torch.zeros_like(args[-1])
    args = (*flat(parts), cos, sin)
    got = tr.qk_norm_rope_sage(*args, heads=h, eps=EPS)
    want = definer(*tr.qk_norm_rope(*args, heads=h, eps=EPS))
    for g_, w in zip(got, want, strict=True):
        assert torch.equal(g_, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_is_sages_preparation(dtype):
    """The reference (torch) against the package's kernel on the reference's own q, k, v."""
    _, args = _args(2, 37, 150, 2, 64, dtype, scale=3.0)
    got = reference_sage(*args, heads=2, eps=EPS)
    for g, w in zip(got, definer(*reference_qk_norm_rope(*args, heads=2, eps=EPS)), strict=True):
        assert torch.equal(g, w)


@needs_interpreter
@pytest.mark.parametrize("s,block,d", [(37, 128, 64), (200, 64, 128), (129, 128, 96)])
def test_reference_quantizer_is_per_block_int8(s, block, d):
    """sage_per_block_int8 against the package's kernel alone, Q's multiplier and K's 1.0."""
    g = torch.Generator().manual_seed(s)
    x = (torch.randn(2, s, 3, d, generator=g) * 4).bfloat16()
    from sageattention.quant_per_block_hd96 import per_block_int8_hd96

    pkg = quant.per_block_int8 if d != 96 else per_block_int8_hd96
    q8, q_scale, k8, k_scale = pkg(x, x, tensor_layout="NHD")
    mult = sage_q_multiplier(d) if block == SAGE_BLOCK_Q else 1.0
    codes, scales = sage_per_block_int8(x, block, mult)
    want = (q8, q_scale) if block == SAGE_BLOCK_Q else (k8, k_scale)
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])


def test_block_sizes_are_the_packages():
    import inspect

    from sageattention import attn_qk_int8_per_block

    defaults = inspect.signature(quant.per_block_int8).parameters
    assert (defaults["BLKQ"].default, defaults["BLKK"].default) == (SAGE_BLOCK_Q, SAGE_BLOCK_K)
    src = inspect.getsource(attn_qk_int8_per_block.forward)
    assert f"BLOCK_M = {SAGE_BLOCK_Q}" in src and f"BLOCK_N = {SAGE_BLOCK_K}" in src


@needs_interpreter
def test_triton_equals_reference_when_the_sums_are_exact():
    """Inputs whose sums of squares are exact (random_parts' exact_sums): the Triton op and the
    torch reference agree on all five outputs, the mean's fp32 sum order included."""
    _, args = _args(1, 37, 150, 2, 64, torch.bfloat16, exact_sums=True)
    got, want = tr.qk_norm_rope_sage(*args, heads=2, eps=EPS), reference_sage(*args, heads=2, eps=EPS)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@needs_interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_attention_is_the_unfused_paths_output(use_kernels, backend):
    """attention.norm_rope_attend with sage: the fused preparation then sage's kernel equals
    sage_attention (the package's steps) on the plain op's q, k, v, bit for bit; with SDPA it is
    attend(qk_norm_rope(...)) as before."""
    use_kernels(backend)
    heads, d = 2, 64
    parts, args = _args(1, 37, 150, heads, d, torch.bfloat16, scale=3.0)
    cos, sin = args[-2:]
    q, k, v = kernels.qk_norm_rope(parts, cos, sin, heads=heads)
    with attention.using("sage"):
        fused = attention.norm_rope_attend(parts, cos, sin, heads=heads, eps=EPS)
    assert torch.equal(fused, attention.sage_attention(q, k, v))
    with attention.using("sdpa"):
        plain = attention.norm_rope_attend(parts, cos, sin, heads=heads, eps=EPS)
    assert torch.equal(plain, attention.sdpa(q, k, v))


def test_the_fused_blocks_call_the_fused_preparation_under_sage():
    """A fused FLUX block pair (head dim 128) traced on the meta device: under sage the rope op
    is qk_norm_rope_sage and the attention sage's int8 kernel; under SDPA, as before."""
    import count_launches as cl

    model = cl.full_size_transformer(2)
    seen = {}
    for kind in ("sage", "sdpa"):
        counter = cl.LaunchCounter()
        with torch.no_grad(), counter, attention.using(kind), cl._attention_as_one_launch():
            model(**cl.full_size_inputs(256, 256, 64))
        seen[kind] = {n for c in counter.counts.values() for n in c}
    assert {"svdq.qk_norm_rope_sage", "svdq.sage_attention_int8"} <= seen["sage"]
    assert not {"svdq.qk_norm_rope", "svdq.sage_attention", "count_launches.flash_attention"} & seen["sage"]
    assert {"svdq.qk_norm_rope", "count_launches.flash_attention"} <= seen["sdpa"]
    assert "svdq.qk_norm_rope_sage" not in seen["sdpa"]


# --- the op: fake, compile, checks, contract ------------------------------------------------------


def test_fake_opcheck_and_compile_without_graph_breaks():
    heads, d = 1, 64
    parts, args = _args(1, 5, 140, heads, d, torch.bfloat16)
    torch.library.opcheck(torch.ops.svdq.qk_norm_rope_sage.default, (*args, heads, EPS))
    meta = [t.to("meta") if t is not None else None for t in args]
    outs = torch.ops.svdq.qk_norm_rope_sage(*meta, heads, EPS)
    assert [(tuple(t.shape), t.dtype) for t in outs] == [
        ((1, 145, heads, d), torch.int8),
        ((1, heads, 2, 1), torch.float32),
        ((1, 145, heads, d), torch.int8),
        ((1, heads, 3, 1), torch.float32),
    ]

    def prologue(txt, img, nq0, nk0, nq1, nk1, cos, sin):
        return kernels.qk_norm_rope_sage([(txt, nq0, nk0), (img, nq1, nk1)], cos, sin, heads=heads)

    inputs = (parts[0][0], parts[1][0], *parts[0][1:], *parts[1][1:], *args[-2:])
    compiled = torch.compile(prologue, backend="aot_eager", fullgraph=True)
    for g, w in zip(compiled(*inputs), prologue(*inputs), strict=True):
        assert torch.equal(g, w)


def test_bad_arguments_are_named():
    parts, args = _args(1, 3, 5, 1, 64, torch.float32)
    with pytest.raises(TypeError, match=r"parts\[0\] qkv must be float16 or bfloat16"):
        kernels.qk_norm_rope_sage(parts, *args[-2:], heads=1)
    parts, args = _args(1, 3, 5, 1, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="head dim D=32 must be one of"):
        tr.qk_norm_rope_sage(*args, heads=1, eps=EPS)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        kernels.qk_norm_rope_sage(parts, *args[-2:], heads=0)


def test_backends_take_the_contracts_arguments():
    import inspect

    want = list(inspect.signature(contract.NormRopeBackend.qk_norm_rope_sage).parameters.values())[1:]
    for fn in (reference_sage, tr.qk_norm_rope_sage):
        got = list(inspect.signature(fn).parameters.values())
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in want], fn.__module__
    schema = torch.ops.svdq.qk_norm_rope_sage.default._schema
    assert [a.name for a in schema.arguments] == [p.name for p in want]


# --- GPU: FLUX's double-block shape ---------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_fused_preparation_at_flux_shape():
    """Compiled kernels at FLUX's double-block shape (512 text + 4096 image tokens, 24 heads,
    D = 128, bf16) against the package's per_block_int8 on the plain kernel's q, k, v: q8 and q_scale
    bit for bit (the same rope arithmetic, the same div.full.f32 as the package's kernel);
    k8 and k_scale too wherever the mean (our fixed-order sum against torch's CUDA reduction)
    rounds alike, which every column but a rare rounding tie does; the attention within the
    package's own quantization of the unfused path."""
    heads, d = 24, 128
    parts, cos, sin = random_parts(1, 512, 4096, heads, d, torch.bfloat16, scale=3.0)
    args = tuple(t.cuda() if t is not None else None for t in (*flat(parts), cos, sin))
    got = tr.qk_norm_rope_sage(*args, heads=heads, eps=EPS)
    q, k, v = tr.qk_norm_rope(*args, heads=heads, eps=EPS)
    want = definer(q, k, v)
    for i in (0, 1):
        assert torch.equal(got[i], want[i]), i
    diff = (got[2].int() - want[2].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    torch.testing.assert_close(got[3], want[3], rtol=2**-7, atol=0)
    v_parts = [qkv[..., 2 * heads * d : 3 * heads * d].unflatten(-1, (heads, d)) for qkv in (args[0], args[3])]
    out = kernels.sage_attention_int8(*got, v_parts, out_dtype=torch.bfloat16)
    ref = attention.sage_attention(q, k, v)
    cos_sim = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0)
    assert cos_sim > 0.9999
