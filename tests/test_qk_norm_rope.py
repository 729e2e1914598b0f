"""kernels.qk_norm_rope against its definer, and the Triton kernel against the reference.

The definer is diffusers 0.42.1's FluxAttnProcessor run on its own FluxAttention module (random
projection and norm weights), with the q, k, v it hands to attention captured: the reference
must give them bit for bit. The Triton kernel (TRITON_INTERPRET=1 on CPU) is bit-exact wherever
the fp32 sum of squares is exact in any order, and otherwise within the bound below, which is
the one freedom it takes: a different summation order of that sum (rsqrt of a 1-ulp-different
variance, then a rounding that may flip).
"""

import inspect

import pytest
import torch
from count_launches import LaunchCounter
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import transformer_flux
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, FluxPosEmbed

from engine import kernels
from engine.kernels import contract
from engine.quant.ops import qk_norm_rope as reference_qk_norm_rope

EPS = 1e-6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# |triton - reference| <= BOUND * eps(dtype) * (|n| |cos| + |rot n| |sin|) per element, n the
# normed value; measured at B=2, S=64+448, H=4, D=128 under the interpreter (2 seeds): max 0.84
# (bf16), 1.14 (fp16), 3.7 (fp32) with 0 to 1.3e-5 (bf16), 3e-5 to 6e-5 (fp16) and ~16% (fp32)
# of q/k elements differing. Stated with headroom: 2 for 16-bit, 6 for fp32.
BOUND = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 6.0}
MAX_MISMATCH_16BIT = 1e-3  # fraction of q/k elements allowed to differ at all in bf16/fp16


def flux_rope(s_txt: int, height: int, width: int, axes: tuple[int, int, int]):
    """cos, sin [S_txt + H*W, sum(axes)] from diffusers' FluxPosEmbed on FLUX's ids (text ids
    zero, image ids (0, row, col)), as FluxTransformer2DModel builds them."""
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    ids = torch.cat([torch.zeros(s_txt, 3), img_ids.reshape(-1, 3)])
    return FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)


def flux_attention(heads: int, dim: int, dtype: torch.dtype, *, joint: bool) -> FluxAttention:
    """A FluxAttention like a FLUX double block's (joint) or single block's, random weights."""
    kw = {"added_kv_proj_dim": heads * dim, "context_pre_only": False} if joint else {"pre_only": True}
    attn = FluxAttention(
        heads * dim, heads=heads, dim_head=dim, bias=True, eps=EPS, processor=FluxAttnProcessor(), **kw
    )
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(torch.rand_like(p) * 2 if "norm" in name else torch.randn_like(p) / (heads * dim) ** 0.5)
    return attn.to(dtype)


def definer_qkv(monkeypatch, attn, hidden, encoder, cos, sin):
    """The q, k, v diffusers' FluxAttnProcessor hands to attention ([B, S, H, D])."""
    seen = {}

    def capture(query, key, value, **kwargs):
        seen.update(q=query, k=key, v=value)
        return query

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", capture)
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=encoder, image_rotary_emb=(cos, sin))
    return seen["q"], seen["k"], seen["v"]


def projections(q_proj, k_proj, v_proj, x, *, extra: int):
    """[B, S, 3HD] q | k | v, as a strided view of a wider tensor when extra > 0 (the fused
    projection's output with more columns after them)."""
    with torch.no_grad():
        cols = [q_proj(x), k_proj(x), v_proj(x)]
        if extra:
            cols.append(torch.randn(*x.shape[:-1], extra, dtype=x.dtype))
        qkv = torch.cat(cols, dim=-1)
    return qkv[..., : 3 * q_proj.out_features]


# --- the reference against the definer ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [0, 40])
def test_reference_is_the_double_blocks_processor(monkeypatch, dtype, extra):
    heads, dim, s_txt, hw = 3, 32, 7, (3, 5)
    attn = flux_attention(heads, dim, dtype, joint=True)
    cos, sin = flux_rope(s_txt, *hw, axes=(4, 14, 14))
    hidden = torch.randn(2, hw[0] * hw[1], heads * dim).to(dtype)
    encoder = torch.randn(2, s_txt, heads * dim).to(dtype)
    want = definer_qkv(monkeypatch, attn, hidden, encoder, cos, sin)
    txt = projections(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, encoder, extra=extra)
    img = projections(attn.to_q, attn.to_k, attn.to_v, hidden, extra=extra)
    parts = [
        (txt, attn.norm_added_q.weight, attn.norm_added_k.weight),
        (img, attn.norm_q.weight, attn.norm_k.weight),
    ]
    with torch.no_grad():
        got = kernels.qk_norm_rope(parts, cos, sin, heads=heads, eps=EPS)
    assert kernels.op_backend_for("cpu", "qk_norm_rope").NAME == "reference"
    for g, w in zip(got, want, strict=True):
        assert g.shape == (2, s_txt + hw[0] * hw[1], heads, dim) and g.dtype == dtype and g.is_contiguous()
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_single_blocks_processor(monkeypatch, dtype):
    heads, dim, s_txt, hw = 2, 16, 4, (2, 3)
    attn = flux_attention(heads, dim, dtype, joint=False)
    cos, sin = flux_rope(s_txt, *hw, axes=(2, 6, 8))
    hidden = torch.randn(1, s_txt + hw[0] * hw[1], heads * dim).to(dtype)  # text and image, joined
    want = definer_qkv(monkeypatch, attn, hidden, None, cos, sin)
    qkv = projections(attn.to_q, attn.to_k, attn.to_v, hidden, extra=24)  # proj_mlp's columns after
    with torch.no_grad():
        got = kernels.qk_norm_rope([(qkv, attn.norm_q.weight, attn.norm_k.weight)], cos, sin, heads=heads)
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous() and torch.equal(g, w)


def test_the_definers_norm_is_torchs_rms_norm():
    """FluxAttention builds torch.nn.RMSNorm, not diffusers' RMSNorm (which rounds to bf16 once
    more): the op follows the module the model really runs, and the two really differ."""
    from diffusers.models.normalization import RMSNorm

    attn = flux_attention(2, 64, torch.bfloat16, joint=True)
    assert all(type(attn.get_submodule(n)) is torch.nn.RMSNorm for n in ("norm_q", "norm_k", "norm_added_q"))
    ours = RMSNorm(64, eps=EPS).to(torch.bfloat16)
    x = torch.randn(64, 2, 64).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.copy_(attn.norm_q.weight)
        assert not torch.equal(ours(x), attn.norm_q(x))


def test_rotation_is_diffusers_apply_rotary_emb():
    """The reference's rotation alone, through one part with unit norm weights and inputs
    whose rms is exactly 1 (so the norm is the identity): diffusers' apply_rotary_emb."""
    heads, dim, s = 2, 16, 9
    cos, sin = flux_rope(3, 2, 3, axes=(2, 6, 8))
    x = torch.randint(0, 2, (1, s, 3 * heads * dim)).float() * 2 - 1  # +-1: mean of squares is 1
    one = torch.ones(dim)
    q, _, _ = kernels.qk_norm_rope([(x, one, one)], cos, sin, heads=heads, eps=0.0)
    want = apply_rotary_emb(x[..., : heads * dim].unflatten(-1, (heads, dim)), (cos, sin), sequence_dim=1)
    assert torch.equal(q, want)


# --- Triton (interpreter on CPU) against the reference ------------------------------------------

tr = pytest.importorskip("engine.kernels.triton.rope")


def random_parts(b, s0, s1, heads, dim, dtype, *, extra=0, exact_sums=False, scale=1.0):
    """One or two parts (s1 = 0: one), strided when extra > 0. exact_sums: every value a multiple
    of 1/4 in [-2, 2], so the fp32 sum of squares is exact in any order."""
    parts = []
    for s in (s0, s1) if s1 else (s0,):
        if exact_sums:
            x = torch.randint(-8, 9, (b, s, 3 * heads * dim + extra)).float() / 4
        else:
            x = torch.randn(b, s, 3 * heads * dim + extra) * scale
        w = [torch.rand(dim) * 2 for _ in range(2)]
        parts.append((x.to(dtype)[..., : 3 * heads * dim], *(t.to(dtype) for t in w)))
    ang = torch.randn(s0 + s1, dim // 2, dtype=torch.float64) * 30
    return parts, ang.cos().repeat_interleave(2, 1).float(), ang.sin().repeat_interleave(2, 1).float()


def flat(parts):
    out = [t for p in parts for t in p]
    return out + [None] * (6 - len(out))


def within_bound(got, want, normed, cos, sin, dtype):
    """Max of |got - want| / (eps * (|n| |cos| + |rot n| |sin|)) and the fraction that differ."""
    n = normed.float()
    rot = torch.stack([-n[..., 1::2], n[..., 0::2]], dim=-1).flatten(3)
    scale = n.abs() * cos.abs()[None, :, None] + rot.abs() * sin.abs()[None, :, None]
    err = (got.float() - want.float()).abs()
    return (err / (torch.finfo(dtype).eps * scale)).max().item(), (got != want).float().mean().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,s0,s1,heads,dim,extra",
    [(1, 5, 0, 2, 16, 0), (2, 7, 19, 3, 32, 8), (1, 16, 33, 1, 64, 0), (2, 1, 17, 2, 16, 16)],
)
def test_triton_exact_when_the_sum_of_squares_is(dtype, b, s0, s1, heads, dim, extra):
    parts, cos, sin = random_parts(b, s0, s1, heads, dim, dtype, extra=extra, exact_sums=True)
    args = (*flat(parts), cos, sin)
    got = tr.qk_norm_rope(*args, heads=heads, eps=EPS)
    want = reference_qk_norm_rope(*args, heads=heads, eps=EPS)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype and g.is_contiguous()
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_within_the_stated_bound(dtype):
    heads, dim = 2, 128
    parts, cos, sin = random_parts(2, 23, 41, heads, dim, dtype, extra=8, scale=3.0)
    args = (*flat(parts), cos, sin)
    got = tr.qk_norm_rope(*args, heads=heads, eps=EPS)
    want = reference_qk_norm_rope(*args, heads=heads, eps=EPS)
    assert torch.equal(got[2], want[2])  # v: only moved
    one, zero = torch.ones_like(cos), torch.zeros_like(sin)
    normed = reference_qk_norm_rope(*flat(parts)[:6], one, zero, heads=heads, eps=EPS)  # no rotation
    for g, w, n in zip(got[:2], want[:2], normed[:2], strict=True):
        worst, differing = within_bound(g, w, n, cos, sin, dtype)
        assert worst <= BOUND[dtype]
        if dtype != torch.float32:
            assert differing <= MAX_MISMATCH_16BIT


def test_triton_at_flux_head_size_through_the_op(use_kernels):
    """The custom op on the triton backend (interpreter), FLUX's head size, FluxPosEmbed's cos/sin."""
    use_kernels("triton")
    heads, dim = 2, 128
    parts, _, _ = random_parts(1, 32, 80, heads, dim, torch.bfloat16, extra=64)
    cos, sin = flux_rope(32, 8, 10, axes=(16, 56, 56))
    assert kernels.op_backend_for("cpu", "qk_norm_rope").NAME == "triton"
    got = kernels.qk_norm_rope(parts, cos, sin, heads=heads)
    want = reference_qk_norm_rope(*flat(parts), cos, sin, heads=heads, eps=EPS)
    normed = reference_qk_norm_rope(
        *flat(parts), torch.ones_like(cos), torch.zeros_like(sin), heads=heads, eps=EPS
    )
    assert torch.equal(got[2], want[2])
    for g, w, n in zip(got[:2], want[:2], normed[:2], strict=True):
        worst, differing = within_bound(g, w, n, cos, sin, torch.bfloat16)
        assert worst <= BOUND[torch.bfloat16] and differing <= MAX_MISMATCH_16BIT


def test_triton_rejects_head_sizes_it_cannot_compile():
    parts, cos, sin = random_parts(1, 3, 0, 1, 24, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        tr.qk_norm_rope(*flat(parts), cos, sin, heads=1, eps=EPS)


# --- the wrapper's checks, the op, the contract ---------------------------------------------------


def _bad(parts, cos, sin, **kw):
    return lambda: kernels.qk_norm_rope(parts, cos, sin, **{"heads": 2, **kw})


def test_bad_arguments_are_named():
    parts, cos, sin = random_parts(1, 3, 5, 2, 16, torch.float32)
    (txt, nq, nk), (img, nq1, nk1) = parts
    cases = {
        "parts must be a list of 1 or 2": _bad([], cos, sin),
        r"parts\[1\] must be a \(qkv": _bad([parts[0], (img, nq1)], cos, sin),
        r"parts\[1\] qkv must have shape \[B, S_i, >= 3\*heads\*D = 96\]": _bad(
            [parts[0], (img[..., :90], nq1, nk1)], cos, sin
        ),
        r"parts\[1\] qkv must have shape .* one B": _bad(
            [parts[0], (img.expand(2, -1, -1), nq1, nk1)], cos, sin
        ),
        r"parts\[0\] norm_k must have shape \[16\]": _bad([(txt, nq, nk[:8]), parts[1]], cos, sin),
        r"parts\[1\] norm_q must have shape \[D\]": _bad([parts[0], (img, nq1[:8], nk1)], cos, sin),
        r"parts\[1\] norm_q must have the dtype": _bad([parts[0], (img, nq1.half(), nk1)], cos, sin),
        r"parts\[0\] qkv's last dimension must have stride 1": _bad(
            [(txt.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :96], nq, nk), parts[1]], cos, sin
        ),
        r"cos must have shape \[S_total, D\] = \[8, 16\]": _bad(parts, cos[:7], sin),
        "sin must be float32": _bad(parts, cos, sin.long()),
        "heads must be a positive int": _bad(parts, cos, sin, heads=0),
        "cos must be on parts\\[0\\] qkv's device": _bad(parts, cos.to("meta"), sin),
        r"parts\[1\] norm_k must be on": _bad([parts[0], (img, nq1, nk1.to("meta"))], cos, sin),
    }
    for message, call in cases.items():
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def test_fake_impl_and_compile_without_graph_breaks():
    heads, dim = 2, 16
    parts, cos, sin = random_parts(2, 3, 5, heads, dim, torch.bfloat16, extra=8)

    def prologue(txt, img, nq0, nk0, nq1, nk1, cos, sin):
        return kernels.qk_norm_rope([(txt, nq0, nk0), (img, nq1, nk1)], cos, sin, heads=heads)

    args = (parts[0][0], parts[1][0], *parts[0][1:], *parts[1][1:], cos, sin)
    compiled = torch.compile(prologue, backend="aot_eager", fullgraph=True)  # a graph break raises
    for g, w in zip(compiled(*args), prologue(*args), strict=True):
        assert torch.equal(g, w)
    meta = [t.to("meta") if t is not None else None for t in (*flat(parts), cos, sin)]
    for t in torch.ops.svdq.qk_norm_rope(*meta, heads, EPS):
        assert t.device.type == "meta" and t.shape == (2, 8, heads, dim) and t.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.svdq.qk_norm_rope.default, (*flat(parts), cos, sin, heads, EPS))


def test_backends_and_custom_op_take_the_contracts_arguments():
    want = list(inspect.signature(contract.NormRopeBackend.qk_norm_rope).parameters.values())[1:]
    for fn in (reference_qk_norm_rope, tr.qk_norm_rope):
        got = list(inspect.signature(fn).parameters.values())
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in want], fn.__module__
    schema = torch.ops.svdq.qk_norm_rope.default._schema
    assert [a.name for a in schema.arguments] == [p.name for p in want]
    assert contract.OPS[contract.NormRopeBackend] == ("qk_norm_rope", "qk_norm_rope_sage")


@pytest.mark.parametrize("dtype,launches", [(torch.float32, 37), (torch.bfloat16, 51)])
def test_one_launch_replaces_the_processors_glue(dtype, launches):
    """Operator calls (each one launch in eager mode on a GPU) of FluxAttnProcessor's work between
    the projections and attention in a double block, counted like scripts/count_launches.py: 37
    in fp32 (issue 16's count, on the fp32 tiny model: 4 x 6 for the norms, 2 x 5 for RoPE, 3
    cats), 51 in bf16 (14 dtype conversions more: 2 per norm, 3 per RoPE)."""
    heads, dim = 2, 16
    attn = flux_attention(heads, dim, dtype, joint=True)
    cos, sin = flux_rope(3, 2, 2, axes=(2, 6, 8))
    txt = torch.randn(1, 3, 3 * heads * dim).to(dtype)
    img = torch.randn(1, 4, 3 * heads * dim).to(dtype)

    def glue():  # FluxAttnProcessor.__call__ between _get_qkv_projections and dispatch_attention_fn
        q, k, v = (t.unflatten(-1, (-1, dim)) for t in img.chunk(3, dim=-1))
        eq, ek, ev = (t.unflatten(-1, (-1, dim)) for t in txt.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        return (
            apply_rotary_emb(q, (cos, sin), sequence_dim=1),
            apply_rotary_emb(k, (cos, sin), sequence_dim=1),
            v,
        )

    parts = [
        (txt, attn.norm_added_q.weight, attn.norm_added_k.weight),
        (img, attn.norm_q.weight, attn.norm_k.weight),
    ]
    counts = {}
    for name, fn in (
        ("diffusers", glue),
        ("ours", lambda: kernels.qk_norm_rope(parts, cos, sin, heads=heads)),
    ):
        counter = LaunchCounter()
        with torch.no_grad(), counter:
            out = fn()
        counts[name] = counter.counts["outside"]
        if name == "diffusers":
            want = out
    assert all(torch.equal(g, w) for g, w in zip(out, want, strict=True))
    assert counts["ours"] == {"svdq.qk_norm_rope": 1}
    assert sum(counts["diffusers"].values()) == launches, counts["diffusers"]


@pytest.mark.slow
def test_static_figures_at_flux_shape(tmp_path):
    """scripts/kernel_model_rope.py: compiled for sm_90 and sm_86 at FLUX's shape, no spills, no
    FFMA, 16-byte loads and stores only; every q/k/v byte loaded once, every output byte stored
    once (counted from the kernel's own accesses under the interpreter)."""
    import json
    import sys

    from .ptx_compile import ROOT, run_compiled

    out = tmp_path / "rope.json"
    res = run_compiled([sys.executable, str(ROOT / "scripts" / "kernel_model_rope.py"), "--json", str(out)], timeout=1200)
    report = json.loads(out.read_text()) if out.exists() else None
    assert res.returncode == 0, (res.stderr[-3000:], report and report["gates_failed"])
    assert {(e["cc"], e["variant"][:6]) for e in report["static"]} == {
        (90, "double"),
        (90, "single"),
        (86, "double"),
        (86, "single"),
    }
    for e in report["static"]:
        assert e["spill_instrs"] == 0 and e["ffma"] == 0 and e["narrowest_load"] == e["narrowest_store"] == 16
    assert report["bytes"]["minimum_bytes"] == 2 * 3 * 4608 * 3072 * 2 + 2 * 4608 * 128 * 4 + 4 * 128 * 2
    # qk_norm_rope_sage's two kernels (16 warps for the rope launch: 128 registers, none spilled)
    assert {(e["cc"], e["kernel"]) for e in report["sage_static"]} == {
        (cc, k) for cc in (90, 86) for k in ("qk_norm_rope_sage_kernel", "sage_k_quant_kernel")
    }
    for e in report["sage_static"]:
        assert e["spill_instrs"] == e["stack_bytes"] == 0 and e["regs"] <= 128, e
    sage = report["sage_bytes"]
    assert sage["fused_total"] < 0.55 * sage["unfused_total"], sage


@pytest.mark.gpu
def test_triton_on_the_gpu_at_flux_shape():
    """Compiled kernel against the reference's torch CUDA ops, FLUX's double-block shape, bf16:
    the same stated bound (both use the GPU's rsqrt.approx; the sum order may differ)."""
    heads, dim = 24, 128
    parts, _, _ = random_parts(1, 512, 4096, heads, dim, torch.bfloat16, extra=0)
    parts = [tuple(t.cuda() for t in p) for p in parts]
    cos, sin = (t.cuda() for t in flux_rope(512, 64, 64, axes=(16, 56, 56)))
    got = tr.qk_norm_rope(*flat(parts), cos, sin, heads=heads, eps=EPS)
    want = reference_qk_norm_rope(*flat(parts), cos, sin, heads=heads, eps=EPS)
    normed = reference_qk_norm_rope(
        *flat(parts), torch.ones_like(cos), torch.zeros_like(sin), heads=heads, eps=EPS
    )
    assert torch.equal(got[2], want[2])
    for g, w, n in zip(got[:2], want[:2], normed[:2], strict=True):
        worst, differing = within_bound(g, w, n, cos, sin, torch.bfloat16)
        assert worst <= BOUND[torch.bfloat16] and differing <= MAX_MISMATCH_16BIT
