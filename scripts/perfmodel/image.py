"""Modelled time of one FLUX.1-schnell image, stage by stage, on an A40 and an H100, calibrated.

    python scripts/image_model.py [--markdown docs/benchmarks.md] [--json PATH] [--check docs/benchmarks.md]

Why: the per-kernel models (scripts/kernel_model*.py) say how fast each kernel is; nothing added
up an image, and nothing checked the method against a measured result. This script does both,
with no GPU:

1. Ops and bytes from the code as it is: the real transformer (checkpoint v2 skeleton, one block
   of each kind, FLUX.1-schnell's widths) runs on the meta device under a dispatch mode that
   records every operator call, its tensors and FLOPs (count_launches.py's tracer); the VAE
   decoder (diffusers' AutoencoderKL with FLUX's config), the T5-XXL and CLIP-L text encoders
   (transformers) are traced the same way. Attention counts as one launch (a flash kernel).
2. Each op's time: our kernels from their compiled instruction counts, through the existing
   models' readers (imported, not copied): w4a4_gemm and quantize_act on the A40 from the CUDA
   cubin (kernel_model.py), on the H100 from Triton's SASS (quantize_act: kernel_model_triton.py;
   each w4a4_gemm call: the kernel the sm_90 dispatch runs it on, perfmodel.hopper_route, priced by
   perfmodel.hopper_ws or perfmodel.hopper, plus the dispatch's epilogue kernel, one DRAM pass, where it has one);
   on the H100 the transformer is traced with the W4A8 route as an H100 takes it
   (perfmodel.hopper_route.h100_w4a8), so the linears it takes (M >= the route's minimum: the image
   stream) are priced as quantize_act_fp8 (perfmodel.act_fp8, per prologue variant) and w4a8_gemm
   (perfmodel.hopper_w4a8 at the call's M, K, N; the A40 has no W4A8 route); the W4A4
   prologue variants as quantize_act plus their LayerNorm statistics pass over x; the W4A16 GEMV
   and qk_norm_rope at their DRAM bytes (kernel_model_triton.py and kernel_model_rope.py put them
   at or near their DRAM time on the A40; kernel_model_rope.py's minimum bytes for the latter).
   16-bit matmuls and convolutions by roofline at a stated efficiency; attention by FLOPs at a stated efficiency (SageAttention: QK^T at the int8
   rate, its preparation passes by their bytes); everything else by the bytes it moves at a
   stated fraction of DRAM bandwidth, eager (one launch per op) or under torch.compile (the
   elementwise glue fused: a stated fraction of the eager bytes).
3. Calibration: the same method applied to diffusers' bf16 FluxPipeline (FLUX.1-dev, 28 steps,
   1024x1024, 256 T5 tokens, one H100) against xDiT's published measurement of that run
   (github.com/xdit-project/xDiT, docs/performance/flux.md, "Scalability of Flux.1 Dev", 1 GPU:
   6.71 s eager PyTorch, 4.30 s torch.compile; whether that H100 was SXM or PCIe is not stated,
   SXM is assumed); the model's error is printed beside every table. No A40 measurement of FLUX is published that we could find, so
   the A40 column uses the same stated efficiencies with the A40's datasheet peaks.
4. Levers: each one's modelled saving on the A40 (what it removes from the traced ops, priced
   by the same model).

Every time this script prints is MODELLED, not measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from perfmodel.devices import IMAGE_PEAKS as DEVICES
from perfmodel.image_price import (
    CPU_BPS,
    EFF,
    EPILOGUE_COL,
    LAUNCH_US,
    KernelTimes,
    Stage,
    attention_flops,
    classify,
    dram_s,
    post_bytes,
    postprocess_stage,
    price,
    qk_norm_rope_sage_bytes,
    stage,
)
from perfmodel.image_trace import Op, trace_text_encoders, trace_transformer, trace_vae
from perfmodel.rope import sage_bytes
from perfmodel.tables import table_head, write_markdown

MARK_BEGIN = "<!-- image_model.py: begin (generated, do not edit by hand) -->"
MARK_END = "<!-- image_model.py: end -->"
HEADING = "## One image, stage by stage: modelled and calibrated"


# Calibration target: xDiT, docs/performance/flux.md ("Scalability of Flux.1 Dev", 1 GPU row):
# FLUX.1-dev bf16, 28 steps, 1024px, max_sequence_length=256 (examples/flux_example.py), one H100.
CALIBRATION = {"steps": 28, "eager_s": 6.71, "compiled_s": 4.30, "device": "H100 SXM"}


def image_model(kt: KernelTimes, batch: int = 1, steps: int = 4, size: int = 1024) -> list[Stage]:
    """Our served pipeline (go_fast on: compiled transformer, SageAttention) per stage."""
    subpixel, compiled = vae_subpixel(), vae_compiled()  # the VAE as served, read from the code
    return [
        stage(
            "text encoders (T5-XXL 256 + CLIP-L, bf16, eager)",
            trace_text_encoders(),
            kt,
            compiled=False,
            sage=False,
        ),
        stage(
            f"transformer x {steps} steps (go_fast)",
            transformer_traces(batch, size),
            kt,
            compiled=True,
            sage=True,
            repeat=steps,
        ),
        stage(
            f"VAE decode (bf16, {'compiled' if compiled else 'eager'}{', sub-pixel upsamplers' if subpixel else ''})",
            trace_vae(batch, size, subpixel=subpixel),
            kt,
            compiled=compiled,
            sage=False,
        ),
        postprocess_stage(batch, size, safety_on_gpu=safety_input_on_gpu()),
    ]


def transformer_traces(batch: int, size: int) -> dict[str, list[Op]]:
    """One go_fast step's ops per device: the H100's traced with the W4A8 route as an H100 takes
    it (perfmodel.hopper_route.h100_w4a8), the A40's without (it has no W4A8 route)."""
    return {d: trace_transformer(True, batch, size, sage=True, hopper=d == "H100 SXM") for d in DEVICES}


def vae_compiled() -> bool:
    """Whether go_fast compiles the VAE decoder, from the code: the service hands its VAE to GoFast,
    and GoFast with the serving settings compiles that VAE's decoder in place (on a meta-device VAE;
    nothing runs)."""
    import inspect

    from diffusers import AutoencoderKL

    from engine import go_fast
    from engine.service import FluxService

    if "vae=" not in inspect.getsource(FluxService.__init__) or not hasattr(go_fast, "compiled_vae"):
        return False
    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)
    go_fast.compiled_vae(vae, go_fast.CompileSettings())  # what GoFast.__init__ does with it
    return vae.decoder._compiled_call_impl is not None


def vae_subpixel() -> bool:
    """Whether the pipeline serves the VAE decoder's upsamplers as sub-pixel convolutions, from the
    code: FluxGenerator.from_pretrained (which FluxService.setup calls without the argument) does so
    by default through engine.vae_upsample, and that swaps FLUX's decoder's upsamplers (meta
    device; nothing runs)."""
    import inspect

    from engine.pipeline import FluxGenerator

    load = inspect.signature(FluxGenerator.from_pretrained).parameters.get("vae_subpixel")
    if load is None or load.default is not True:
        return False
    if "use_subpixel_upsampling(pipe.vae.decoder)" not in inspect.getsource(FluxGenerator.from_pretrained):
        return False
    from diffusers import AutoencoderKL

    from engine.vae_upsample import use_subpixel_upsampling
    from perfmodel.image_trace import FLUX_VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(FLUX_VAE_CONFIG)
    return use_subpixel_upsampling(vae.decoder) == len(FLUX_VAE_CONFIG["block_out_channels"]) - 1


def safety_input_on_gpu() -> bool:
    """Whether the safety checker's input is prepared where the images are, from the code: the
    service hands the generator's device pixels to the checker, and SafetyChecker.flags prepares
    meta-device pixels without leaving the device (a host path would need their values)."""
    import inspect

    from transformers import CLIPImageProcessor

    from engine import safety
    from engine.service import FluxService

    if "generate_pixels" not in inspect.getsource(FluxService.predict):
        return False
    seen = []

    def checker(images, clip_input):
        seen.append(clip_input.device.type)
        return images, [False] * clip_input.shape[0]

    checker.dtype = torch.float32
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    pixels = torch.empty(2, 768, 1344, 3, dtype=torch.uint8, device="meta")
    try:
        safety.SafetyChecker(checker, processor, torch.device("meta")).flags(pixels)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):  # needs the values: a host path
        return False
    return seen == ["meta"]


def calibration() -> dict:
    """diffusers' bf16 FLUX.1-dev pipeline, modelled, against xDiT's measured H100 run."""
    steps, device = CALIBRATION["steps"], CALIBRATION["device"]
    step_ops = trace_transformer(False, 1, 1024)
    fixed = trace_text_encoders() + trace_vae(1, 1024)
    out = {}
    for mode, compiled in (("eager", False), ("compiled", True)):
        t = steps * sum(price(op, device, None, compiled=compiled, sage=False) for op in step_ops)
        t += sum(price(op, device, None, compiled=False, sage=False) for op in fixed)
        t += postprocess_stage(1, 1024).seconds[device]
        measured = CALIBRATION[f"{mode}_s"]
        out[mode] = {"modelled_s": t, "measured_s": measured, "error": t / measured - 1}
    return out


# --- levers ----------------------------------------------------------------------------------------------


def levers(kt: KernelTimes) -> list[dict]:
    """Each lever's modelled saving per image on the A40 (what it removes, priced by the model)."""
    dev, steps = "A40", 4
    step_ops = trace_transformer(True, 1, 1024, sage=True)
    rows = []

    def add(name: str, seconds: float, how: str, applied: bool = False, listed: bool = True) -> None:
        """``listed``: one of issue 26's levers (the others are further options the model points to)."""
        rows.append(
            {"lever": name, "saving_ms": 1e3 * seconds, "how": how, "in_code": applied, "listed": listed}
        )

    # (a) two FFMA per accumulator and group (was FADD + FMUL + FFMA): priced as the loop with one more
    # instruction per accumulator (64 per warp per group) against the loop as compiled now
    loop = kt.cuda_report.gemm["s4"].counts
    p = kt.cuda_report.params
    accumulators = (p["kBM"] // p["kWarpsM"] // 16) * (p["kBN"] // p["kWarpsN"] // 8) * 4
    applied = loop["fp32 add/mul/fma"] <= 2 * accumulators + 2
    saved = _gemm_with_loop_delta(kt, step_ops, accumulators) * steps
    add(
        "CUDA GEMM: 2 FFMA per accumulator and group (22-bit ascales)",
        saved,
        f"{accumulators} SASS per warp per group; loop now {loop['total']} = "
        f"{loop['total'] / loop['int4 MMA']:.1f} per int4 MMA",
        applied,
    )
    # (b) group-major ascales from the CUDA quantize: coalesced scale loads; the model counts the scale
    # bytes once either way, so it prices no saving (the L1 sectors it saves are not in the model)
    add(
        "group-major ascales (CUDA quantize + GEMM)",
        0.0,
        "one coalesced row per group instead of one sector per row every 8 groups: not priced",
        True,
    )
    # (c) small-M tile: the GEMMs the host launches with the small tile (M <= kSmallMaxM: the text stream's),
    # priced with the large tile against the tile they get (in the totals when the small tile's instances
    # are compiled)
    saved, how, applied = small_tile_lever(kt, step_ops)
    add("tile for small M (text stream, M = 256)", steps * saved, how, applied)
    # (d) gate multiply + residual add in the GEMM epilogues, proj_out's two parts in one output
    # (applied when the blocks' GEMMs carry a residual); the single block's concatenation below
    gemms = [op for op in step_ops if op.name == "svdq.w4a4_gemm"]
    gated = [op for op in gemms if isinstance(op.args[8], torch.Tensor)]
    glue = [op for op in step_ops if op.where != "outside" and classify(op).startswith("glue")]
    if gated:
        replaced = [g for op in gated for g in _replaced_glue(op)]
        # what the epilogue costs the GEMM: its reads, and the epilogue instance's longer code
        cost = sum(
            price(op, dev, kt, compiled=True, sage=True) - kt.gemm(dev, *_mkn(op), bool(op.args[10]))
            for op in gated
        )
        saved = sum(price(g, dev, kt, compiled=True, sage=True) for g in replaced) - cost
        how = (
            f"{len(replaced)} glue ops per step (gate *, residual +, proj_out parts +; compiled) less what the "
            f"{len(gated)} GEMM epilogues cost (reads of residual, gate, partial; {1e3 * steps * cost:.0f} ms)"
        )
    else:
        residual_reads = sum(op.out_bytes for op in glue if op.name == "aten.add")  # the epilogue reads h
        glue_now = [op for op in glue if op.name != "aten.cat"]
        saved = sum(price(op, dev, kt, compiled=True, sage=True) for op in glue_now) - dram_s(
            residual_reads, dev
        )
        how = f"{len(glue_now)} glue ops per step in the blocks (compiled), less one read of the residual per fused GEMM"
    add(
        "gate + residual in the GEMM epilogues, proj_out's parts in one output",
        steps * saved,
        how,
        bool(gated),
    )
    saved, how, applied = joint_concat_lever(step_ops, dev)
    add("no concatenation in the single block", steps * saved, how, applied)
    # (e) SageAttention's preparation folded into qk_norm_rope: in the code when the blocks issue
    # svdq.qk_norm_rope_sage under sage. Priced either way as the bytes of qk_norm_rope + sageattn's
    # passes less those of the fused op's two launches (K's quantize pass is left: the mean is global)
    fused = [op for op in step_ops if op.name == "svdq.qk_norm_rope_sage"]
    attn = [op for op in step_ops if op.name in ("count_launches.flash_attention", "svdq.sage_attention_int8")]
    if fused:
        b = [qk_norm_rope_sage_bytes(op) for op in fused]
    else:  # the unfused path: the same figures at each attention's q shape ([B, H, S, D] from SDPA)
        b = [sage_bytes(op.args[0].shape[2], op.args[0].shape[1], op.args[0].shape[3], op.args[0].shape[0])
             for op in attn]  # fmt: skip
    # (the fused op as it came first: V read and written as sage's fp16 copy; the next lever removes that)
    v_copy = sum(x["v_copy"] for x in b)
    before, after = sum(x["unfused_total"] for x in b), sum(x["fused_total"] for x in b) + v_copy
    add(
        "SageAttention preparation folded into qk_norm_rope",
        steps * (dram_s(before, dev) - dram_s(after, dev)),
        f"k mean, k - mean, v to fp16, int8 Q/K as separate passes: {before / 1e9:.1f} -> "
        f"{after / 1e9:.1f} GB per step (one pass over K left for its quantization)",
        bool(fused),
    )
    # (e') our int8 attention (kernels.sage_attention_int8) reads V from the projection in bf16 and
    # converts in registers: no fp16 copy of V. In the code when the attention's V is a view (of
    # the projection output), not a tensor of its own. The attention reads the same bytes either way.
    in_place = bool(attn) and all(
        op.name == "svdq.sage_attention_int8" and op.args[4]._is_view() for op in attn
    )
    add(
        "int8 attention reads V in place (no fp16 copy of V)",
        steps * dram_s(v_copy, dev),
        f"qk_norm_rope_sage's read of V and write of its fp16 copy: {v_copy / 1e9:.2f} GB per step "
        "(the in-register conversion's instructions not priced: kernel_model_int8_attention.py counts them)",
        in_place,
    )
    # beyond the list: P.V in int8 as well (SageAttention 1.0.6 has it in fp16; the A40 runs fp16 at
    # the bf16 rate whatever the accumulator, so only int8 is faster there). Quality not measured.
    eff = EFF["attention"][dev]
    keys = {"count_launches.flash_attention": 1, "svdq.sage_attention_int8": 2}  # k's argument
    pv = sum(attention_flops(tuple(op.args[0].shape), tuple(op.args[keys[op.name]].shape))[1] for op in attn)
    add(
        "attention P.V in int8 too (quality unmeasured)",
        steps * pv * (1 / (eff * DEVICES[dev]["bf16"]) - 1 / (eff * DEVICES[dev]["int8"])),
        "half of the attention's tensor work at twice the rate",
        listed=False,
    )
    # beyond the list: fc1's GEMM epilogue applies GELU and quantizes for fc2 (as nunchaku fuses it), so
    # the 16-bit MLP hidden state is neither written by fc1 nor read back by fc2's quantize_act. What
    # stays: the codes and scales written from the epilogue (priced in the quantize op's own time
    # below, kept out of the saving), and fc2's low-rank down-projection, which needs a whole row
    # of K: each of fc1's N-tiles writes an fp32 partial [M, R] that a fixed-order sum reads back.
    # The epilogue's own instructions (GELU, group max, rounding, a rank-R MMA) are not priced.
    gelu_q = [op for op in step_ops if op.name == "svdq.quantize_act_prologue" and op.args[8]]
    saved = 0.0
    for op in gelu_q:
        m, k = op.args[0].shape
        r = op.args[2].shape[0]
        writes = m * k // 2 + m * (k // op.args[5]) * 4  # the codes and scales fc2 still needs
        partials = 2 * m * r * 4 * (k // 128)  # written by fc1's N-tiles of 128, read by the sum
        saved += price(op, dev, kt, compiled=True, sage=True) - dram_s(writes, dev)  # the quantize pass
        saved += dram_s(m * k * 2, dev) - dram_s(writes + partials, dev)  # fc1 writes codes, not 16 bits
    add(
        "fc1's GEMM epilogue emits fc2's 4-bit activations (GELU + quantize fused)",
        steps * saved,
        f"{len(gelu_q)} GELU quantize_act passes per step and fc1's 16-bit output, less fp32 low-rank "
        "partials per 128-column tile; the epilogue's instructions not priced (saving errs high)",
        listed=False,
    )
    # (f) VAE compiled + channels_last: the glue fused, convolutions unchanged
    vae = trace_vae(1, 1024)  # diffusers' upsamplers
    sub = trace_vae(1, 1024, subpixel=True)
    subpixel, compiled = vae_subpixel(), vae_compiled()  # read from the code once
    served = sub if subpixel else vae
    eager = sum(price(op, dev, kt, compiled=False, sage=False) for op in served)
    fused = sum(price(op, dev, kt, compiled=True, sage=False) for op in served)
    add(
        "VAE decoder in channels_last (on CUDA)",
        0.0,
        f"not priced: the convolutions' efficiency is held at {EFF['conv']} either way",
        True,
    )
    add("VAE decoder compiled", eager - fused, "inductor fuses GroupNorm/SiLU/adds", compiled)
    # beyond the list: the decoder's nearest x2 + 3x3 upsamplers as 2x2 sub-pixel convolutions at the
    # low resolution (engine.vae_upsample), priced as the decode before and after, compiled as served
    flops = [sum(op.flops for op in ops) for ops in (vae, sub)]
    add(
        "VAE upsamplers as 2x2 sub-pixel convolutions (engine.vae_upsample)",
        sum(price(op, dev, kt, compiled=compiled, sage=False) for op in vae)
        - sum(price(op, dev, kt, compiled=compiled, sage=False) for op in sub),
        f"decoder {flops[0] / 1e12:.2f} -> {flops[1] / 1e12:.2f} TFLOP (the 3 upsample convolutions at 4/9), "
        f"less the phases' interleaving copy; same conv efficiency ({EFF['conv']}) assumed for 2x2 as 3x3",
        subpixel,
        listed=False,
    )
    # (g) post-processing on the GPU (in the code), the safety checker's input preparation (not yet)
    b = post_bytes(1, 1024)
    before = b["before_to_host"] / DEVICES[dev]["pcie"] + b["before_host"] / CPU_BPS
    now = dram_s(b["gpu"], dev) + b["to_host"] / DEVICES[dev]["pcie"] + b["host_pil"] / CPU_BPS
    add(
        "post-processing to uint8 on the GPU (engine.pipeline.to_pil)",
        before - now,
        "diffusers' float32 copy to the host and its numpy passes",
        True,
    )
    add(
        "safety checker input prepared on the GPU (engine.safety_input)",
        b["host_safety"] / CPU_BPS - dram_s(b["gpu_safety"], dev),
        "np.asarray(float32) / 255 per image and CLIPImageProcessor on the host",
        safety_input_on_gpu(),
    )
    return rows


def joint_concat_lever(step_ops: list[Op], dev: str) -> tuple[float, str, bool]:
    """The single block's concatenation, read from one step's trace: (seconds saved per step, what it
    removes, whether it is in the code). Not in the code: each single block concatenates (text, image)
    itself (diffusers' block does), priced as those copies. In the code: the model's forward forms the
    joint sequence once before the single blocks (SVDQFluxTransformer2DModel.forward), priced as the
    copies the other single blocks no longer make (the one left is in the totals)."""
    from perfmodel.image_trace import cl

    in_blocks = [op for op in step_ops if op.name == "aten.cat" and op.where == "single_transformer_blocks"]
    if in_blocks:
        mb = sum(op.out_bytes for op in in_blocks) / len(in_blocks) / 1e6
        saved = sum(price(op, dev, None, compiled=True, sage=True) for op in in_blocks)
        return saved, f"{len(in_blocks)} torch.cat of (text, image) per step, about {mb:.0f} MB written each", False
    joint = [op for op in step_ops if op.name == "aten.cat" and op.where == "outside"
             and len(op.shapes) == 2 and all(len(s) == 3 for s in op.shapes)]  # fmt: skip
    if len(joint) != 1:
        raise ValueError(f"expected one concatenation of the joint sequence per step, traced {len(joint)}")
    blocks = cl.FLUX_SCHNELL_BLOCKS["single_transformer_blocks"]
    saved = (blocks - 1) * price(joint[0], dev, None, compiled=True, sage=True)
    return saved, (
        f"the joint sequence ({joint[0].out_bytes / 1e6:.0f} MB) concatenated once per step, before the "
        f"{blocks} single blocks, instead of in each"
    ), True


def _mkn(op: Op) -> tuple[int, int, int]:
    """A w4a4_gemm call's M, K, N."""
    return op.args[0].shape[0], 2 * op.args[0].shape[1], op.args[2].shape[0]


def _replaced_glue(op: Op) -> list[Op]:
    """The elementwise ops one gated w4a4_gemm call replaces (what the blocks issued before):
    ``gate * y`` and ``residual + ...``, and with a partial the parts' sum ``y_attn + y_mlp``."""
    out = op.args[8]  # residual [M, N], the shape and dtype of y and of the result
    y = out.numel() * out.element_size()
    gate = op.args[9].numel() * op.args[9].element_size()
    ops = [Op("aten.mul", op.where, [], y + gate, y, 0), Op("aten.add", op.where, [], 2 * y, y, 0)]
    if isinstance(op.args[7], torch.Tensor):
        ops.append(Op("aten.add", op.where, [], 2 * y, y, 0))
    return ops


def _gemm_with_loop_delta(kt: KernelTimes, step_ops: list[Op], delta: int) -> float:
    """Seconds the A40 GEMMs of one step would take longer with ``delta`` more SASS per warp per group."""
    import copy

    report = copy.deepcopy(kt.cuda_report)
    for variant in ("s4", "s4" + kt.cuda.tile_label(report.params, True)):  # either tile, as the host picks
        report.gemm[variant].counts["total"] += delta
    saved = 0.0
    for op in step_ops:
        if op.name == "svdq.w4a4_gemm":
            m, k, n = op.args[0].shape[0], 2 * op.args[0].shape[1], op.args[2].shape[0]
            saved += kt.cuda.model_gemm(report, m, k, n)["time_us"] * 1e-6 - kt.gemm("A40", m, k, n, False)
    return saved


def small_tile_lever(kt: KernelTimes, step_ops: list[Op]) -> tuple[float, str, bool]:
    """Seconds per step the A40 GEMMs that take w4a4_gemm's small-M tile save against the large tile, a
    description, and whether the small tile is compiled (its instances in the static report)."""
    report, km = kt.cuda_report, kt.cuda
    p = report.params
    if "kSmallBM" not in p or f"s4{km.tile_label(p, True)}" not in report.gemm:
        return 0.0, "no small-M tile compiled", False
    small = [op for op in step_ops if op.name == "svdq.w4a4_gemm" and km.uses_small_tile(p, _mkn(op)[0])]
    saved = 0.0
    for op in small:
        m, k, n = _mkn(op)
        variant = "s4+epilogue" if any(isinstance(t, torch.Tensor) for t in op.args[7:10]) else "s4"
        large = km.model_gemm(report, m, k, n, variant=variant, tile="large")["time_us"]
        saved += (large - km.model_gemm(report, m, k, n, variant=variant)["time_us"]) * 1e-6
    tp = km.tile_config(p, True)
    return saved, (
        f"{len(small)} GEMM calls per step at M <= {p['kSmallMaxM']} on a {tp['kBM']}x{tp['kBN']} tile "
        f"({tp['kWarpsM'] * tp['kWarpsN']} warps) instead of {p['kBM']}x{p['kBN']}"
    ), True


# --- output ----------------------------------------------------------------------------------------------


def run() -> dict:
    kt = KernelTimes()
    one = image_model(kt, 1)
    four = image_model(kt, 4)
    return {
        "one": one,
        "four": four,
        "calibration": calibration(),
        "levers": levers(kt),
        "h100_routes": {b: h100_routes(b) for b in (1, 4)},
        "w4a8_share": {1: w4a8_share(kt, one, 1), 4: w4a8_share(kt, four, 4)},
    }


def h100_routes(batch: int, steps: int = 4) -> dict[str, int]:
    """How many of one image's (``batch`` images') GEMM calls the H100 runs on each kernel: the
    W4A8 kernel where kernels.w4a8_route takes the linear ("w4a8", "w4a8 split"; the H100's trace,
    perfmodel.hopper_route.h100_w4a8), else the W4A4 kernel the dispatch sends the call to
    (perfmodel.hopper_route.route); and how many of them run the epilogue kernel after it."""
    from perfmodel.hopper_route import route, w4a8_route

    counts: dict[str, int] = {}
    for op in trace_transformer(True, batch, 1024, sage=True, hopper=True):
        if op.name in ("svdq.w4a4_gemm", "svdq.w4a8_gemm"):
            r = route(op.args) if op.name == "svdq.w4a4_gemm" else w4a8_route(op.args)
            kind = r.kernel + (" split" if r.split is not None else "")
            for key in (kind, "epilogue kernel" if r.epilogue_bytes else None):
                if key:
                    counts[key] = counts.get(key, 0) + steps
    return counts


def w4a8_share(kt: KernelTimes, stages: list[Stage], batch: int, steps: int = 4) -> dict[str, float]:
    """The H100's seconds on the W4A8 linears over ``steps`` steps of ``batch`` images (their
    quantize_act_fp8, w4a8_gemm and the epilogue kernel after it: the H100's trace priced op by
    op), and that as a share of the transformer stage and of the image (``stages``)."""
    dev = "H100 SXM"
    ops = trace_transformer(True, batch, 1024, sage=True, hopper=True)
    w4a8 = steps * sum(
        price(op, dev, kt, compiled=True, sage=True)
        for op in ops
        if op.name in ("svdq.w4a8_gemm", "svdq.quantize_act_fp8")
    )
    st = next(s for s in stages if s.name.startswith("transformer"))
    image = sum(s.seconds[dev] for s in stages)
    return {"seconds": w4a8, "of_transformer": w4a8 / st.seconds[dev], "of_image": w4a8 / image}


def hopper_gemm_note(routes: dict[int, dict[str, int]]) -> str:
    """The generated text's statement of which kernels and models price the H100 column's GEMMs
    and quantizers (the W4A8 route's and the W4A4 route's)."""
    from perfmodel.hopper_route import w4a8_min_m

    def say(c: dict[str, int]) -> str:
        names = {
            "w4a8": "the W4A8 kernel",
            "w4a8 split": "the W4A8 kernel with its last wave split in K",
            "ws": "the warp-specialized Gluon kernel",
            "ws split": "the same with its last wave split in K",
            "fp8": "the FP8 kernel",
            "int8": "the int8 kernel",
        }
        return ", ".join(f"{c[k]} {names[k]}" for k in names if c.get(k))

    one, four = routes[1], routes[4]
    return (
        "H100 column, GEMMs: the transformer traced with the W4A8 route as an H100 takes it (kernels.w4a8_route "
        "with the triton backend on sm_90, the W4A8 GEMM's self-check taken as passed: "
        "scripts/perfmodel/hopper_route.py h100_w4a8; the A40 column's trace has no W4A8 route). Linears "
        f"called with M >= {w4a8_min_m()} rows (the image stream and the single blocks) run as W4A8: "
        "quantize_act_fp8 (engine/kernels/triton/act_fp8.py, its sm_90 SASS for the call's prologue variant "
        "through scripts/perfmodel/act_fp8.py) and w4a8_gemm (gemm_sm90_w4a8.py at its launch tile, its compiled "
        "loop through scripts/perfmodel/hopper_w4a8.py at the call's M, K, N: the persistent grid's waves, the "
        "DRAM floor, the split of the last wave where the dispatch plans one). The rest (the text stream) "
        "run as W4A4: each w4a4_gemm call priced with the model of the kernel the Triton backend's "
        "dispatch (engine/kernels/triton_backend.py w4a4_gemm, run on the call's meta tensors: "
        "scripts/perfmodel/hopper_route.py) sends it to on sm_90, its self-checks taken as passed: "
        "the warp-specialized Gluon kernel (gemm_sm90_ws.py, scripts/perfmodel/hopper_ws.py, with its split-K "
        "of the last wave where gemm_sm90_ws.plan takes one) or the FP8 kernel (gemm_sm90.py, "
        "scripts/perfmodel/hopper.py), both at the calibrated L2 figure; where a call (W4A4 or W4A8) has a "
        "partial, gate or residual, the kernel writes fp32 and the dispatch's epilogue kernel "
        "(engine/kernels/triton/epilogue.py, bit for bit ops.gemm_epilogue) runs after it, priced as one DRAM "
        f"pass over its bytes (column \"{EPILOGUE_COL}\"). Calls per image over 4 steps: {say(one)}; "
        f"{one.get('epilogue kernel', 0)} of them with the epilogue kernel. For four images: {say(four)}; "
        f"{four.get('epilogue kernel', 0)} with the epilogue kernel. "
        "quantize_act on the H100: the Triton kernel's model (perfmodel.triton_model)."
    )


def w4a8_note(shares: dict[int, dict[str, float]]) -> str:
    """The generated text's statement of the W4A8 linears' share of the H100 column."""

    def say(x: dict[str, float]) -> str:
        return (
            f"{1e3 * x['seconds']:.0f} ms, {100 * x['of_transformer']:.0f}% of the transformer stage, "
            f"{100 * x['of_image']:.0f}% of the total"
        )

    return (
        "The W4A8 linears on the H100 (quantize_act_fp8, w4a8_gemm and the epilogue kernel after it; "
        f"4 steps): one image {say(shares[1])}; four images {say(shares[4])}."
    )


def markdown(result: dict) -> str:
    cal = result["calibration"]
    err = ", ".join(f"{m} {100 * c['error']:+.0f}%" for m, c in cal.items())
    lines = [
        MARK_BEGIN,
        "**Modelled, not measured** (`python scripts/image_model.py --markdown docs/benchmarks.md`; "
        "tests/test_image_model.py checks this block is current). One 1024x1024 FLUX.1-schnell image, "
        "4 steps, go_fast on, from the ops the code issues (traced on the meta device) and our kernels' "
        "compiled instruction counts.",
        "",
        hopper_gemm_note(result["h100_routes"]),
        "",
        "**Calibration** (the method applied to diffusers' bf16 FLUX.1-dev pipeline, 28 steps, 1024x1024, "
        "256 T5 tokens, one H100 (SXM assumed), against xDiT's published measurement, "
        "github.com/xdit-project/xDiT docs/performance/flux.md): "
        + "; ".join(
            f"{m}: modelled {c['modelled_s']:.2f} s, measured {c['measured_s']:.2f} s, error {100 * c['error']:+.0f}%"
            for m, c in cal.items()
        )
        + ". No published A40 measurement was found; the A40 column uses the same efficiencies.",
        "",
    ]
    for label, stages in (("num_outputs = 1", result["one"]), ("num_outputs = 4", result["four"])):
        lines += [
            f"{label} (model error on the calibration run: {err}):",
            "",
            *table_head("stage", "A40 ms", "H100 SXM ms"),
        ]
        for s in stages:
            lines.append(f"| {s.name} | {1e3 * s.seconds['A40']:.0f} | {1e3 * s.seconds['H100 SXM']:.0f} |")
            if s.name.startswith("transformer"):
                for col in dict.fromkeys([*s.detail["A40"], *s.detail["H100 SXM"]]):
                    lines.append(
                        f"| &nbsp;&nbsp;{col} | {1e3 * s.detail['A40'].get(col, 0.0):.0f} | "
                        f"{1e3 * s.detail['H100 SXM'].get(col, 0.0):.0f} |"
                    )
        total = {d: sum(s.seconds[d] for s in stages) for d in DEVICES}
        lines += [f"| **total** | **{1e3 * total['A40']:.0f}** | **{1e3 * total['H100 SXM']:.0f}** |", ""]
    lines += [w4a8_note(result["w4a8_share"]), ""]
    a40 = sum(s.seconds["A40"] for s in result["one"])
    lines += [
        f"Levers, modelled saving per image on the A40 (model error as above; target 1.3 s, modelled now "
        f"{a40:.2f} s):",
        "",
        *table_head("lever", "in the code", "saving ms", "what it removes"),
    ]
    for r in result["levers"]:
        done = "yes (in the totals)" if r["in_code"] else ("no" if r["listed"] else "no (*not listed*)")
        lines.append(f"| {r['lever']} | {done} | {r['saving_ms']:.0f} | {r['how']} |")
    listed = sum(r["saving_ms"] for r in result["levers"] if not r["in_code"] and r["listed"]) / 1e3
    extra = sum(r["saving_ms"] for r in result["levers"] if not r["in_code"] and not r["listed"]) / 1e3
    lines += [
        "",
        f"With every listed lever not yet in the code: **{a40 - listed:.2f} s** modelled on the A40 for one "
        f"image (calibration error {err}), against the 1.3 s target; with the further option(s) too "
        f"(marked *not listed*): {a40 - listed - extra:.2f} s.",
        "",
        "Assumptions: "
        + ", ".join(f"{k} {v}" for k, v in EFF.items() if not isinstance(v, dict))
        + f", SDPA attention {EFF['attention']}, {LAUNCH_US} us per eager launch, host numpy "
        f"{CPU_BPS / 1e9:.0f} GB/s, datasheet peaks. WebP encoding (CPU, measured above) is not in the totals.",
        MARK_END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", type=Path, help="replace the generated block in this file")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--check", type=Path, help="exit 1 if this file's generated block is not current")
    args = ap.parse_args(argv)
    result = run()
    block = markdown(result)
    if args.check:
        text = args.check.read_text()
        current = (
            MARK_BEGIN in text
            and text[text.index(MARK_BEGIN) : text.index(MARK_END) + len(MARK_END)] == block
        )
        print("current" if current else f"stale: run python scripts/image_model.py --markdown {args.check}")
        return 0 if current else 1
    print(block)
    if args.markdown:
        write_markdown(args.markdown, block, MARK_BEGIN, MARK_END, HEADING)
    if args.json:
        payload = {k: [s.__dict__ for s in v] if k in ("one", "four") else v for k, v in result.items()}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0
