"""kernels.sage_attention_int8 (our Triton port of SageAttention 1.0.6's per-block int8 kernel,
V read in place) against its definer: the installed package's own ``forward`` on
``cat(v_parts).to(float16)``.

Under TRITON_INTERPRET=1 both kernels run in Triton's interpreter on the same int8 Q/K (made by
the package's ``per_block_int8``), so the outputs must be the same bits: head dims 64 and 128,
batch 2, S not a multiple of 64 or 128, V from one strided projection or from two joined at a
key-block boundary (two loops) or inside a block (per-row source), V in bf16 or fp16, and V
values where the fp16 rounding is not exact (fp16 subnormals, beyond fp16's range). The compiled
kernel (sm_86, sm_90) is gated in SASS against the package's kernel compiled the same way
(scripts/perfmodel/int8_attention.py).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.flux import attention

from .ptx_compile import run_compiled

sage_attn = pytest.importorskip("sageattention.attn_qk_int8_per_block")
sage_quant = pytest.importorskip("sageattention.quant_per_block")
needs_interpreter = pytest.mark.skipif(
    attention.sage_unavailable_reason(torch.device("cpu"), torch.bfloat16, 64, interpreter=True) is not None,
    reason="the Triton kernels run here only under TRITON_INTERPRET=1",
)
ROOT = Path(__file__).resolve().parents[1]


def make_inputs(b, s0, s1, h, d, v_dtype=torch.bfloat16, *, seed=0, v_scale=2.0, extra=8):
    """int8 Q/K and scales from the package's per_block_int8, and V as column slices of one or two
    q|k|v projection outputs (row stride 3HD + extra: a strided view, as the blocks pass it)."""
    g = torch.Generator().manual_seed(seed)
    s = s0 + s1
    q = torch.randn(b, s, h, d, generator=g).bfloat16()
    k = (torch.randn(b, s, h, d, generator=g) + 2).bfloat16()
    q8, q_scale, k8, k_scale = sage_quant.per_block_int8(
        q, k - k.mean(dim=1, keepdim=True), tensor_layout="NHD"
    )
    hd = h * d
    v_parts = []
    for n in (s0, s1) if s1 else (s0,):
        qkv = (torch.randn(b, n, 3 * hd + extra, generator=g) * v_scale).to(v_dtype)
        v_parts.append(qkv[..., 2 * hd : 3 * hd].unflatten(-1, (h, d)))  # [B, n, H, D], strided
    return q8, q_scale, k8, k_scale, v_parts


def definer(q8, q_scale, k8, k_scale, v_parts, out_dtype=torch.bfloat16):
    v16 = torch.cat(v_parts, dim=1).to(torch.float16)
    return sage_attn.forward(q8, k8, v16, q_scale, k_scale, tensor_layout="NHD", output_dtype=out_dtype)


def softmax_over_real_keys(q8, q_scale, k8, k_scale, v_parts) -> torch.Tensor:
    """The attention the kernel computes, in float64 over the S_kv real keys only: scores
    (q8 . k8) * q_scale * k_scale per (query block, key block) as the package defines its scales
    (log2(e) / sqrt(D) folded into q's), softmax in base 2, V rounded to fp16. [B, S, H, D]."""
    bq, bk = 128, 64  # the package's BLOCK_M / BLOCK_N, the blocks of its scales
    s_q, s_kv = q8.shape[1], k8.shape[1]
    qs = q_scale[..., 0].double().repeat_interleave(bq, dim=-1)[..., :s_q]  # [B, H, S_q]
    ks = k_scale[..., 0].double().repeat_interleave(bk, dim=-1)[..., :s_kv]  # [B, H, S_kv]
    s = torch.einsum("bqhd,bkhd->bhqk", q8.double(), k8.double()) * qs[..., None] * ks[..., None, :]
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    v = torch.cat(v_parts, dim=1).to(torch.float16).double()
    o = torch.einsum("bhqk,bkhd->bqhd", p, v) / p.sum(-1).transpose(1, 2)[..., None]
    return o


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# (B, S0, S1, H, D): two parts joined at a block boundary with a partial last block; joined inside
# a block, batch 2, D = 128; one part, S not a multiple of 64; exact blocks; shorter than a block;
# a text part longer than a query block, joined inside a key block
SHAPES = [
    (1, 64, 100, 2, 64),
    (2, 37, 150, 1, 128),
    (1, 200, 0, 1, 64),
    (2, 128, 128, 1, 128),
    (1, 5, 50, 1, 64),
    (1, 130, 61, 1, 128),
]


@needs_interpreter
@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_is_the_packages_kernel_on_v_in_fp16(shape, v_dtype):
    """Where S_kv is a multiple of 64 the package's result bit for bit; elsewhere the package
    scores its padding keys 0 (our kernel: -inf), so there the softmax over the real keys is the
    definer, within the fp16 sums of P V (the package's kernel meets the same bound where it has
    no padding: checked on the aligned shapes)."""
    args = make_inputs(*shape, v_dtype)
    got = kernels.sage_attention_int8(*args, out_dtype=torch.bfloat16)
    b, s0, s1, h, d = shape
    assert got.shape == (b, s0 + s1, h, d) and got.is_contiguous()
    exact = softmax_over_real_keys(*args)
    tol = 2e-2 * exact.abs().amax()  # P in fp16, PV summed in fp16 per 64 keys, bf16 out
    assert (got.double() - exact).abs().amax() <= tol
    if (s0 + s1) % 64 == 0:
        assert same_bits(got, definer(*args))


@needs_interpreter
@pytest.mark.parametrize("s_kv", [100, 150])
def test_padding_keys_weigh_nothing(s_kv):
    """Every real score far below 0 (q . k < 0): the package's kernel, whose padding keys score 0,
    returns nearly 0; ours returns the softmax over the real keys (here: V's mean, all scores equal)."""
    h, d = 1, 64
    q8 = torch.full((1, s_kv, h, d), 100, dtype=torch.int8)
    k8 = torch.full((1, s_kv, h, d), -100, dtype=torch.int8)
    q_scale = torch.full((1, h, -(-s_kv // 128), 1), 1e-2)
    k_scale = torch.full((1, h, -(-s_kv // 64), 1), 1e-2)  # every score -64 (base 2)
    v = [torch.randn(1, s_kv, h, d).bfloat16() + 3]
    got = kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v, out_dtype=torch.float32)
    mean = v[0].to(torch.float16).float().mean(1, keepdim=True).expand_as(got)
    torch.testing.assert_close(got, mean, atol=2e-2, rtol=0)
    theirs = definer(q8, q_scale, k8, k_scale, v, torch.float32)
    assert theirs.abs().amax() < 1e-3  # the package's padding keys take the whole softmax


@needs_interpreter
@pytest.mark.parametrize("shape", [(1, 64, 128, 2, 64), (1, 37, 91, 1, 128)])
def test_v_rounding_where_fp16_is_not_exact(shape):
    """bf16 V in fp16's subnormal range (where bf16 -> fp16 rounds) and, in the first 4 columns
    of a few rows, beyond its largest value (inf): the in-register conversion must round as
    torch's ``.to(float16)``; the other columns stay finite and nonzero, so they are compared too."""
    args = make_inputs(*shape, v_scale=2.0**-18)
    for v in args[4]:
        v[:, :3, :, :4] *= 2.0**36  # past 65504
    v = torch.cat(args[4], 1)
    assert not torch.equal(v.to(torch.float16).float(), v.float())  # the conversion rounds here
    got = kernels.sage_attention_int8(*args, out_dtype=torch.bfloat16)
    assert same_bits(got, definer(*args))
    assert torch.isfinite(got[..., 4:]).all() and (got[..., 4:] != 0).float().mean() > 0.9
    assert not torch.isfinite(got[..., :4]).all()


@needs_interpreter
def test_out_dtypes():
    args = make_inputs(1, 64, 64, 1, 64)
    for out_dtype in (torch.float16, torch.float32):
        assert torch.equal(kernels.sage_attention_int8(*args, out_dtype=out_dtype), definer(*args, out_dtype))


@needs_interpreter
def test_fused_path_reads_the_projections_v_and_equals_sage_attention():
    """attention.norm_rope_attend under sage, text length a multiple of 64 (the double block's two
    loops) and not: the result is sage_attention's (the package's steps) on the plain op's q, k, v."""
    from .test_qk_norm_rope import EPS, random_parts

    heads, d = 2, 64
    for s0, s1 in ((64, 90), (37, 90), (150, 0)):
        parts, cos, sin = random_parts(1, s0, s1, heads, d, torch.bfloat16, extra=8, scale=3.0)
        q, k, v = kernels.qk_norm_rope(parts, cos, sin, heads=heads)
        with attention.using("sage"):
            fused = attention.norm_rope_attend(parts, cos, sin, heads=heads, eps=EPS)
        assert torch.equal(fused, attention.sage_attention(q, k, v)), (s0, s1)


# --- the op: fake, compile, checks ----------------------------------------------------------------


@needs_interpreter
def test_fake_opcheck_and_compile_without_graph_breaks():
    q8, q_scale, k8, k_scale, (v0, v1) = make_inputs(1, 64, 40, 1, 64)
    torch.library.opcheck(
        torch.ops.svdq.sage_attention_int8.default, (q8, q_scale, k8, k_scale, v0, v1, torch.bfloat16)
    )
    meta = [t.to("meta") for t in (q8, q_scale, k8, k_scale, v0, v1)]
    out = torch.ops.svdq.sage_attention_int8(*meta, torch.bfloat16)
    assert (tuple(out.shape), out.dtype, out.is_contiguous()) == ((1, 104, 1, 64), torch.bfloat16, True)

    def attend(q8, q_scale, k8, k_scale, qkv0, qkv1):
        v_parts = [t[..., 128:192].unflatten(-1, (1, 64)) for t in (qkv0, qkv1)]
        return kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts, out_dtype=torch.bfloat16)

    inputs = (q8, q_scale, k8, k_scale, v0._base, v1._base)
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*inputs), attend(*inputs))


def test_bad_arguments_are_named():
    q8, q_scale, k8, k_scale, v_parts = make_inputs(1, 64, 40, 1, 64)
    ok = dict(out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="v_parts must be a list of 1 or 2"):
        kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts * 2, **ok)
    with pytest.raises(ValueError, match=r"must add up to k8's S_kv = 104"):
        kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts[:1], **ok)
    with pytest.raises(TypeError, match=r"v_parts\[1\] must be torch.bfloat16 or torch.float16"):
        kernels.sage_attention_int8(q8, q_scale, k8, k_scale, [v_parts[0], v_parts[1].float()], **ok)
    with pytest.raises(TypeError, match=r"v_parts\[1\] must have v_parts\[0\]'s dtype"):
        kernels.sage_attention_int8(q8, q_scale, k8, k_scale, [v_parts[0], v_parts[1].half()], **ok)
    with pytest.raises(ValueError, match=r"k_scale must have shape \[1, 1, 2, 1\]"):
        kernels.sage_attention_int8(q8, q_scale, k8, k_scale[:, :, :1], v_parts, **ok)
    with pytest.raises(ValueError, match="last dimension must have stride 1"):
        kernels.sage_attention_int8(q8, q_scale, k8, k_scale, [v_parts[0], v_parts[1].transpose(1, 3)
                                                               .contiguous().transpose(1, 3)], **ok)  # fmt: skip
    with pytest.raises(ValueError, match="head dim D=32 must be one of"):
        kernels.sage_attention_int8(q8[..., :32], q_scale, k8[..., :32], k_scale, v_parts, **ok)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts, out_dtype=torch.int8)


# --- the compiled kernel: SASS against the package's, no GPU needed -----------------------------


@pytest.mark.slow  # 20 s: kept out of the one-minute working loop, run by CI
def test_compiled_loop_against_the_packages():
    """sm_86 and sm_90, FLUX's shape (256 text + 4096 image tokens, 24 heads, D = 128; the script's
    default adds D = 64):
    no spills, the PV and QK^T MMAs of the package's loop, and the in-register conversion within
    its bound of instructions per PV MMA (perfmodel.int8_attention.gate_failures)."""
    res = run_compiled(
        [sys.executable, str(ROOT / "scripts" / "kernel_model_int8_attention.py"), "--head-dims", "128"], scripts=True
    )
    assert res.returncode in (0, 1), res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert not report["gates_failed"], report["gates_failed"]
    rows = {(e["cc"], e["d"], e["kernel"]) for e in report["static"]}
    assert {(86, 128, "ours, two V parts"), (90, 128, "ours, one V part"), (86, 128, "sage")} <= rows


# --- the compiled sm_86 PTX of both kernels, run by tests/ptx_exec.py's interpreter ------------------


def _recorded(module, attr: str, call) -> "object":
    """The one launch ``call`` makes of ``module.attr``, as an sm_86 GPU would get it."""
    from unittest import mock

    import engine.kernels.triton.attention as ours

    from . import ptx_compile as PC

    rec = PC._Recorder(f"{module.__name__}:{attr}")
    with (
        mock.patch.object(module, attr, rec),
        mock.patch.object(ours, "INTERPRET", False),
        mock.patch.object(ours, "_major", lambda device: 8),
    ):
        call()
    (launch,) = rec.launches
    return launch


@pytest.mark.slow  # 10 s each
@pytest.mark.parametrize("shape", [(1, 64, 64, 1, 64), (1, 37, 27, 1, 128)])
def test_compiled_ptx_is_the_packages_compiled_kernel(shape):
    """Our kernel's sm_86 PTX (V bf16 in place, the cvt.rn.f16x2.f32 conversion) and the
    package's own kernel's sm_86 PTX (on ``v.to(float16)``), run by the PTX interpreter on the
    same int8 Q/K: the same output bits. Where the conversion rounds: V's first half of columns
    positive and in fp16's subnormal range, summed with P = 1 by the first 64 queries (their
    codes 0: every score 0), and one value past fp16's range (inf). Two key-block loops (text
    length 64), and the per-row source (37)."""
    import engine.kernels.triton.attention as ours

    from . import ptx_compile as PC

    q8, q_scale, k8, k_scale, v_parts = make_inputs(*shape, seed=3)
    d = shape[4]
    q8[:, :64] = 0
    for v in v_parts:
        v[..., : d // 2] = v[..., : d // 2].abs() * 2.0**-20  # fp16 subnormals: the conversion rounds
    v_parts[1][:, 3, :, d // 2] = 70000.0  # inf in fp16
    v16 = torch.cat(v_parts, 1).to(torch.float16)
    mine = _recorded(ours, "int8_attention_kernel", lambda: ours.int8_attention(
        q8, q_scale, k8, k_scale, v_parts[0], v_parts[1], out_dtype=torch.bfloat16))  # fmt: skip
    pkg = _recorded(sage_attn, "_attn_fwd", lambda: sage_attn.forward(
        q8, k8, v16, q_scale, k_scale, tensor_layout="NHD", output_dtype=torch.bfloat16))  # fmt: skip
    # the package passes H and num_kv_groups (constexprs) positionally, last
    pkg = type(pkg)(pkg.kernel, pkg.grid, pkg.args[:-2], {**pkg.constexprs, "H": pkg.args[-2],
                    "num_kv_groups": pkg.args[-1]}, pkg.options)  # fmt: skip
    assert mine.constexprs["PAIRS_ASM"] and mine.constexprs["V_JOIN"] == (1 if shape[1] % 64 == 0 else 2)
    res_mine, res_pkg = PC.compile_ptx([mine.request(86), pkg.request(86)])
    assert "cvt.rn.f16x2.f32" in res_mine["ptx"]
    assert "mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16" in res_pkg["ptx"]
    outs = []
    for launch, res in ((mine, res_mine), (pkg, res_pkg)):
        findings, written = PC.execute(launch, res)
        assert not findings.items, findings.report()
        assert all(w.all() for w in written.values())
        outs.append(launch.args[6] if launch is mine else launch.args[5])
    assert same_bits(outs[0], outs[1])
    # and near the Triton interpreter's result: the two interpreters model the fp16-accumulated PV
    # MMA differently (one rounding per m16n8k16 here, numpy's fp16 matmul there), |o| ~ 0.1
    ref = definer(q8, q_scale, k8, k_scale, v_parts)
    torch.testing.assert_close(outs[0], ref, rtol=2**-6, atol=2e-3)
    assert not same_bits(outs[0], ref)  # which is why the bits are compared kernel to kernel


@pytest.mark.slow  # inductor's C++ compile: 10-20 s
@needs_interpreter
def test_inductor_passes_the_projections_v_without_a_copy():
    """go_fast's backend: the V parts are column slices of the q|k|v projections (extern matmuls
    here, as the W4A4 GEMM ops are in the blocks); inductor hands the op views of those buffers
    (``reinterpret_tensor`` at V's column offset), so no fp16 or contiguous copy of V is made."""
    import re

    from torch._inductor.utils import run_and_get_code

    h, d = 1, 64
    q8, q_scale, k8, k_scale, _ = make_inputs(1, 64, 40, h, d)
    g = torch.Generator().manual_seed(1)
    x0, x1 = (torch.randn(1, n, 32, generator=g).bfloat16() for n in (64, 40))
    w0, w1 = (torch.randn(32, 3 * h * d + 8, generator=g).bfloat16() for _ in range(2))

    def attend(x0, x1, w0, w1, q8, q_scale, k8, k_scale):
        v_parts = [(x @ w)[..., 2 * h * d : 3 * h * d].unflatten(-1, (h, d)) for x, w in ((x0, w0), (x1, w1))]
        return kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts, out_dtype=torch.bfloat16)

    inputs = (x0, x1, w0, w1, q8, q_scale, k8, k_scale)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        out, (code, *_) = run_and_get_code(torch.compile(attend, backend="inductor", fullgraph=True), *inputs)
    torch._dynamo.reset()
    assert torch.equal(out, attend(*inputs))
    (call,) = [line for line in code.splitlines() if "torch.ops.svdq.sage_attention_int8.default(" in line]
    views = re.findall(r"reinterpret_tensor\((buf\d+), \(1, (\d+), 1, 64\), \(\d+, 200, 64, 1\), 128\)", call)
    assert [n for _, n in views] == ["64", "40"], call
    assert "cpp_fused" not in code  # nothing but the two matmuls and the op


@needs_interpreter
def test_sage_attention_takes_fp32_v_as_before():
    """The custom op ``svdq::sage_attention`` (diffusers' processors' path) on fp32 q, k, v, as it
    took them before it ran our port: V rounded to fp16 first, the result within int8 QK^T's
    error of SDPA's, over a partial last key block."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 70, 1, 64, generator=g) for _ in range(3))
    got = attention.sage_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert got.dtype == torch.float32 and (got - ref).abs().amax() < 3e-2
