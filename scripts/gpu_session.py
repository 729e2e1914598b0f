"""One part of the prepared GPU session (scripts/gpu_session.sh runs each under its own timeout).

    python scripts/gpu_session.py PART --out DIR [--size full|tiny]

Each part writes ``DIR/<part>.json`` and rewrites it after every case, so a part killed by its
timeout or a crash leaves what it finished. ``--size tiny`` runs the same code at tiny sizes
(the CPU test, tests/test_gpu_session.py); ``full`` uses FLUX.1-schnell's shapes.

kernels  every kernel against the reference (engine.quant.ops) at FLUX's shapes: fused widths,
         M of 256 (text) and 4096 (image) tokens, batch 4, ranks with LoRAs (32, 96, 224),
         the prologues, the GEMV, qk_norm_rope; per configured backend (triton, cuda)
compile  the tiny transformer compiled with inductor on the GPU kernels (Triton), as go_fast
         compiles it at setup, against the eager reference
bench    kernel times against cuBLAS bf16 at FLUX's shapes (scripts/bench.py --mode kernels)
step     one full-size transformer step, random int4 weights built directly (no calibration),
         its time and torch.cuda.max_memory_allocated, beside the meta trace's figure
memory   max_memory_allocated of scripts/memory_report.py's cases (1 and 4 images, 1024x1024
         and 21:9, fast and small modes) beside the traced peaks
post     the stages after the denoising that issue 26 changed: the safety checker's input
         prepared on the device (engine.safety_input) against the host processor, and FLUX's VAE
         decoder (random weights) eager with diffusers' upsamplers, then with the sub-pixel ones
         (engine.vae_upsample, as served), then compiled as go_fast compiles it: compile time,
         decode time, difference, and the graphs over every served size
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import kernels
from engine.quant import ops as ref
from engine.quant import pack_int4, unpack_int4


class Record:
    """``DIR/<part>.json``: the part's facts and one row per case, rewritten after each."""

    def __init__(self, out: Path, part: str, size: str, device: torch.device) -> None:
        self.path = out / f"{part}.json"
        self.data: dict = {
            "part": part,
            "size": size,
            "device": _device_name(device),
            "rows": [],
            "done": False,
        }
        self.write()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")

    def case(self, label: dict, fn: Callable[[], dict]) -> None:
        """Run one case; an exception is recorded in its row, and the part goes on."""
        t0 = time.perf_counter()
        try:
            row = {**label, **fn()}
        except Exception as e:  # a failing case is a finding: record it and go on
            row = {**label, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.add(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- kernels ----------------------------------------------------------------------------------
# bf16 outputs: relative error (Frobenius) against the fp32 reference; fp32 outputs tighter.
BF16_REL, FP32_REL, CODES_MATCH = 1e-2, 1e-3, 0.999
FULL_LINEARS = [
    (3072, 3072),
    (3072, 9216),
    (3072, 12288),
    (12288, 3072),
    (15360, 3072),
    (3072, 21504),
]  # (K, N)


def kernel_cases(size: str) -> dict:
    if size == "tiny":
        return {
            "linear": [
                (m, k, n, r, k == 192) for m in (8, 33) for k, n in [(128, 128), (192, 64)] for r in (16, 48)
            ],
            "prologue": [(2, 8, 128, False), (1, 9, 192, True)],  # (B, S, K, gelu)
            "gemv": [(1, 128, 192), (3, 128, 64)],  # (M, K, N)
            "rope": [(1, 4, 8, 2, 32), (2, 4, 8, 2, 32)],  # (B, S_txt, S_img, H, D)
            # (B, S_txt, S_img, H, D), S a multiple of 64: the package's kernel counts padding keys
            "int8_attention": [(1, 64, 64, 1, 64), (2, 37, 91, 1, 128)],
        }
    linear = [(m, k, n, 32, k == 12288) for m in (256, 4096) for k, n in FULL_LINEARS]
    linear += [
        (4 * 4096, k, n, 32, k == 12288) for k, n in [(3072, 3072), (12288, 3072), (15360, 3072)]
    ]  # batch 4
    linear += [
        (4096, k, n, r, k == 12288) for r in (96, 224) for k, n in [(3072, 3072), (12288, 3072)]
    ]  # LoRAs
    return {
        "linear": linear,
        "prologue": [
            (1, 4352, 3072, False),
            (4, 4352, 3072, False),
            (1, 4352, 12288, True),
            (4, 4096, 12288, True),
        ],
        "gemv": [(1, 3072, 18432), (4, 3072, 18432), (1, 3072, 9216), (4, 3072, 9216)],
        "rope": [(1, 256, 4096, 24, 128), (4, 256, 4096, 24, 128)],
        "int8_attention": [(1, 256, 4096, 24, 128), (1, 256, 4096, 24, 64)],
    }


def _act(m: int, k: int, r: int, device, unsigned: bool, gen: torch.Generator) -> tuple:
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    smooth = torch.rand(k, generator=gen) + 0.5
    down = torch.randn(r, k, generator=gen) / k**0.5
    return tuple(t.to(device, torch.bfloat16) for t in (x, smooth, down))


def check_linear(m: int, k: int, n: int, r: int, unsigned: bool, device: torch.device) -> dict:
    """quantize_act then w4a4_gemm, each against the reference on the same inputs."""
    g = torch.Generator().manual_seed(m + k + n + r)
    x, smooth, down = _act(m, k, r, device, unsigned, g)
    shift = 0.171875 if unsigned else 0.0
    qx, asc, la = kernels.quantize_act(x, smooth, down, unsigned=unsigned, shift=shift)
    rqx, rasc, rla = ref.quantize_act(x, smooth, down, group_size=64, unsigned=unsigned, shift=shift)
    codes = (
        (unpack_int4(qx, signed=not unsigned) == unpack_int4(rqx, signed=not unsigned)).float().mean().item()
    )
    qweight = pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)).to(device)
    wscales = (torch.rand(n, k // 64, generator=g) / 10 + 1e-3).to(device, torch.bfloat16)
    up = torch.randn(n, r, generator=g).to(device, torch.bfloat16)
    bias = torch.randn(n, generator=g).to(device, torch.bfloat16)
    rasc = rasc.t().contiguous().t()  # the contract's layout: [M, G] group-major, strides (1, M)
    y = kernels.w4a4_gemm(rqx, rasc, qweight, wscales, rla, up, bias, unsigned=unsigned)
    yr = ref.w4a4_gemm(
        rqx, rasc, qweight, wscales, rla, up, bias, unsigned=unsigned, out_dtype=torch.bfloat16
    )
    row = {
        "codes_match": codes,
        "ascales_rel": _rel(asc, rasc),
        "ascales_group_major": asc.stride() == (1, m) or asc.shape[1] == 1,
        "lora_act_rel": _rel(la, rla),
        "gemm_rel": _rel(y, yr),
    }
    row["ok"] = (
        codes >= CODES_MATCH
        and row["ascales_group_major"]
        and row["ascales_rel"] <= FP32_REL
        and row["lora_act_rel"] <= FP32_REL
        and row["gemm_rel"] <= BF16_REL
    )
    return row


def check_prologue(b: int, s: int, k: int, gelu: bool, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(b * s + k)
    x, smooth, down = _act(b * s, k, 32, device, False, g)
    mod = None
    if not gelu:
        mod = tuple((0.1 * torch.randn(b, k, generator=g)).to(device, torch.bfloat16) for _ in range(2))
    args = {"unsigned": gelu, "shift": 0.171875 if gelu else 0.0}
    qx, asc, la = kernels.quantize_act(x.view(b, s, k), smooth, down, modulation=mod, gelu=gelu, **args)
    rqx, rasc, rla = ref.quantize_act_prologue(
        x, smooth, down, *(mod or (None, None)), group_size=64, gelu=gelu, **args
    )
    codes = (unpack_int4(qx, signed=not gelu) == unpack_int4(rqx, signed=not gelu)).float().mean().item()
    row = {"codes_match": codes, "ascales_rel": _rel(asc, rasc), "lora_act_rel": _rel(la, rla)}
    # the prologue's bf16 intermediate may round differently: allow a few codes to differ
    row["ok"] = codes >= 0.99 and row["ascales_rel"] <= BF16_REL and row["lora_act_rel"] <= BF16_REL
    return row


def check_gemv(m: int, k: int, n: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(device)
    wscales = (torch.rand(n, k // 64, generator=g) / 50).to(device, torch.bfloat16)
    wzeros = (-8 * wscales.float()).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(device, torch.bfloat16)
    row = {
        "rel": _rel(
            kernels.w4a16_gemv(x, qweight, wscales, wzeros, bias),
            ref.w4a16_gemv(x, qweight, wscales, wzeros, bias),
        )
    }
    row["ok"] = row["rel"] <= BF16_REL
    return row


def check_rope(b: int, s_txt: int, s_img: int, h: int, d: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(b + s_img)
    bf = {"device": device, "dtype": torch.bfloat16}
    txt = torch.randn(b, s_txt, 3 * h * d, generator=g).to(**bf)
    img = torch.randn(b, s_img, 3 * h * d + 4 * h * d, generator=g).to(**bf)[
        ..., : 3 * h * d
    ]  # a column slice
    norms = [(torch.rand(d, generator=g) + 0.5).to(**bf) for _ in range(4)]
    angles = torch.rand(s_txt + s_img, d // 2, generator=g).repeat_interleave(2, dim=-1) * 6.28
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    got = kernels.qk_norm_rope([(txt, *norms[:2]), (img, *norms[2:])], cos, sin, heads=h)
    want = ref.qk_norm_rope(txt, *norms[:2], img, *norms[2:], cos, sin, heads=h, eps=1e-6)
    row = {name: _rel(a, b) for name, a, b in zip("qkv", got, want, strict=True)}
    row["ok"] = max(row.values()) <= BF16_REL
    return row


def check_int8_attention(b: int, s_txt: int, s_img: int, h: int, d: int, device: torch.device) -> dict:
    """kernels.sage_attention_int8 (V read in place from the two projections, bf16) against the
    package's own kernel on ``v.to(float16)``: the same bits; and the time of each (the package's
    with its fp16 copy of V, which qk_norm_rope_sage no longer writes). S a multiple of 64: elsewhere
    the package's kernel gives its padding keys weight and ours does not (the same bits are not
    expected; engine/kernels/triton/attention.py)."""
    if (s_txt + s_img) % 64:
        raise ValueError(f"S = {s_txt + s_img} is not a multiple of 64")
    from sageattention.attn_qk_int8_per_block import forward
    from sageattention.quant_per_block import per_block_int8

    g = torch.Generator().manual_seed(b + s_img + d)
    s, hd = s_txt + s_img, h * d
    q, k = (torch.randn(b, s, h, d, generator=g).to(device, torch.bfloat16) for _ in range(2))
    q8, q_scale, k8, k_scale = per_block_int8(q, k - k.mean(dim=1, keepdim=True), tensor_layout="NHD")
    qkv = [torch.randn(b, n, 3 * hd, generator=g).to(device, torch.bfloat16) for n in (s_txt, s_img)]
    v_parts = [t[..., 2 * hd :].unflatten(-1, (h, d)) for t in qkv]

    def pkg() -> torch.Tensor:
        v16 = torch.cat(v_parts, dim=1).to(torch.float16)
        return forward(q8, k8, v16, q_scale, k_scale, tensor_layout="NHD", output_dtype=torch.bfloat16)

    ours = lambda: kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts, out_dtype=torch.bfloat16)  # noqa: E731
    got, t_ours = _timed_s(device, ours)
    want, t_pkg = _timed_s(device, pkg)
    same = torch.equal(got.view(torch.int16), want.view(torch.int16))
    return {"same_bits": same, "ours_ms": 1e3 * t_ours, "package_with_v_copy_ms": 1e3 * t_pkg, "ok": same}


def part_kernels(rec: Record, device: torch.device, size: str) -> None:
    backends = []
    for name in ("triton", "cuda"):
        reason = kernels.unavailable_reason(name, device)
        rec.data.setdefault("skipped", {})[name] = reason
        if reason is None:
            backends.append(name)
    cases = kernel_cases(size)
    for name in backends:
        kernels.configure(name)
        for m, k, n, r, unsigned in cases["linear"]:
            label = {"backend": name, "op": "linear", "M": m, "K": k, "N": n, "R": r, "unsigned": unsigned}
            rec.case(label, lambda a=(m, k, n, r, unsigned): check_linear(*a, device))
        for b, s, k, gelu in cases["prologue"]:
            label = {"backend": name, "op": "prologue", "B": b, "S": s, "K": k, "gelu": gelu}
            rec.case(label, lambda a=(b, s, k, gelu): check_prologue(*a, device))
        for m, k, n in cases["gemv"]:
            rec.case(
                {"backend": name, "op": "w4a16_gemv", "M": m, "K": k, "N": n},
                lambda a=(m, k, n): check_gemv(*a, device),
            )
        for b, st, si, h, d in cases["rope"]:
            label = {"backend": name, "op": "qk_norm_rope", "B": b, "S_txt": st, "S_img": si, "H": h, "D": d}
            rec.case(label, lambda a=(b, st, si, h, d): check_rope(*a, device))
    kernels.configure("auto")
    for b, st, si, h, d in cases["int8_attention"]:  # Triton only, whatever the backend
        label = {"backend": "triton", "op": "sage_attention_int8", "B": b, "S_txt": st, "S_img": si, "H": h, "D": d}
        rec.case(label, lambda a=(b, st, si, h, d): check_int8_attention(*a, device))


# --- compile ----------------------------------------------------------------------------------


def part_compile(rec: Record, device: torch.device, size: str) -> None:
    """The tiny transformer (random int4 weights), inductor-compiled on the Triton kernels as
    go_fast compiles it, against the same transformer eager on the reference kernels."""
    transformer = random_quantized_transformer(device, "tiny")
    dtype = next(transformer.parameters()).dtype
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    tokens, text = (64 * 64, 256) if size == "full" else (64, 16)

    def inputs(batch: int) -> dict:
        return {
            "hidden_states": torch.randn(batch, tokens, cfg.in_channels, generator=g).to(device, dtype),
            "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g).to(
                device, dtype
            ),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(
                device, dtype
            ),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, device=device),
            "txt_ids": torch.zeros(text, 3, device=device),
            "return_dict": False,
        }

    backend = "triton" if kernels.unavailable_reason("triton", device) is None else "reference"
    rec.data["backend"] = backend
    # A fresh compile, as a cold container's: inductor's caches do not key on our ops' fakes, and a
    # graph cached by an older checkout would be replayed (engine/service/setup_phases.py).
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True
    compiled = torch.compile(transformer, backend="inductor", dynamic=False)
    for batch in (1, 2) if size == "full" else (1,):

        def run(batch=batch) -> dict:
            x = inputs(batch)
            with torch.no_grad():
                kernels.configure("reference")
                want = transformer(**x)[0]
                kernels.configure(backend)
                t0 = time.perf_counter()
                got = compiled(**x)[0]
                _sync(device)
                first = time.perf_counter() - t0
            kernels.configure("auto")
            rel = _rel(got, want)
            return {"compile_and_run_s": round(first, 2), "rel": rel, "ok": rel <= BF16_REL}

        rec.case({"op": "inductor tiny transformer", "batch": batch, "tokens": tokens}, run)


# --- bench ------------------------------------------------------------------------------------


def part_bench(rec: Record, device: torch.device, size: str) -> None:
    import bench

    for row in bench.bench_kernels(device, ["triton", "cuda"]):
        rec.add(row)


# --- step -------------------------------------------------------------------------------------


def random_fill(module: torch.nn.Module) -> torch.nn.Module:
    """Random values in every tensor of a materialized skeleton: int4 codes anywhere in 0..255,
    scales small and positive, smoothing factors near 1, the rest N(0, 0.02). No calibration:
    timing and memory do not depend on the values."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.dtype == torch.uint8:
                t.random_(0, 256)
            elif name.endswith("wscales"):
                t.uniform_(0.01, 0.02)
            elif name.endswith("smooth_factor"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0.0, 0.02)
            elif t.dtype in (torch.int64, torch.int32):  # position ids and the like
                t.copy_(torch.arange(t.numel(), device=t.device).view(t.shape) % max(t.shape[-1], 1))
    return module


def random_quantized_transformer(device: torch.device, size: str) -> torch.nn.Module:
    """FLUX.1-schnell's quantized transformer (all 19 + 38 blocks; ``tiny``: 1 + 1 at the tiny
    model's widths) built by the checkpoint loader's skeleton, filled with random values on
    ``device``."""
    from count_launches import full_size_transformer

    from engine.tiny_model import TINY_TRANSFORMER

    if size == "full":
        model = full_size_transformer(2, layers=(19, 38))
    else:
        model = full_size_transformer(2, rank=16, layers=(1, 1), config=dict(TINY_TRANSFORMER))
    if device.type == "cpu":
        model = model.float()  # the CPU run (tiny sizes): bf16 math is slow there
    return random_fill(model.to_empty(device=device)).eval()


def transformer_inputs(
    model: torch.nn.Module, batch: int, side: int, text: int, device: torch.device
) -> dict:
    cfg, dtype = model.config, next(model.parameters()).dtype
    tokens = (side // 16) ** 2
    return {
        "hidden_states": torch.randn(batch, tokens, cfg.in_channels).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim).to(device, dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim).to(device, dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": torch.zeros(tokens, 3, device=device),
        "txt_ids": torch.zeros(text, 3, device=device),
        "return_dict": False,
    }


def part_step(rec: Record, device: torch.device, size: str) -> None:
    t0 = time.perf_counter()
    model = random_quantized_transformer(device, size)
    _sync(device)
    rec.data["build_s"] = round(time.perf_counter() - t0, 2)
    rec.data["weights_bytes"] = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    side, text = (1024, 256) if size == "full" else (128, 16)
    for batch in (1, 4):

        def run(batch=batch) -> dict:
            x = transformer_inputs(model, batch, side, text, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with torch.no_grad():
                model(**x)  # warm-up: kernels compiled and loaded
                _sync(device)
                t1 = time.perf_counter()
                y = model(**x)[0]
                _sync(device)
            row = {
                "step_s": round(time.perf_counter() - t1, 4),
                "finite": bool(torch.isfinite(y.float()).all()),
            }
            if device.type == "cuda":
                row["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
                row["activation_peak_bytes"] = row["max_memory_allocated"] - base
            row["ok"] = row["finite"]
            return row

        rec.case({"op": "transformer step", "batch": batch, "side": side, "text_tokens": text}, run)


# --- memory -----------------------------------------------------------------------------------


def part_memory(rec: Record, device: torch.device, size: str) -> None:
    """The memory report's cases on the device: max_memory_allocated beside the traced peak."""
    import memory_report as mr

    cases = mr.CASES if size == "full" else ((128, 128, 1), (128, 128, 4))
    for mode in ("small", "fast"):
        _memory_mode(rec, device, mode, cases, size)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _memory_mode(rec: Record, device: torch.device, mode: str, cases, size: str) -> None:
    import memory_report as mr
    from torch.func import functional_call

    from engine import memory

    gen, safety, resident = mr.full_size_pipeline(mode, tiny=size == "tiny")
    traced = {c[:3]: mr.trace_prediction(gen, safety, *c, safety_resident=resident) for c in cases}
    for module in (
        gen.pipe.transformer,
        gen.pipe.text_encoder,
        gen.pipe.text_encoder_2,
        gen.pipe.vae,
        safety,
    ):
        random_fill(
            module.to_empty(device=device if resident or module is not safety else torch.device("cpu"))
        )
        if device.type == "cpu":
            module.float()  # the CPU run (tiny sizes): bf16 math is slow there
    gen.device = device
    host = None if resident else memory.OnDemand(safety, device)
    dtype = next(iter(host.host_state.values())).dtype if host else next(safety.parameters()).dtype

    def check_safety(n: int) -> None:
        clip_input = torch.randn(n, 3, 224, 224, device=device, dtype=dtype)
        if host is None:
            safety.visual_projection(safety.vision_model(clip_input)[1])
            return
        state = memory.device_copies(host.host_state, device)  # what OnDemand does per call
        prefix = "vision_model."
        vision = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        functional_call(host.module.vision_model, vision, (clip_input,))

    for w, h, n in cases:

        def run(w=w, h=h, n=n) -> dict:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                images = gen.generate("a red fox in fresh snow", width=w, height=h, steps=1, num_outputs=n)
                check_safety(n)
            _sync(device)
            t = traced[(w, h, n)]
            row = {
                "images": len(images),
                "seconds_1_step": round(time.perf_counter() - t0, 3),
                "traced_peak_allocated_bytes": t["peak_allocated_bytes"],
                "traced_peak_stage": t["peak_stage"],
                "traced_card_bytes": t["card_bytes"],
            }
            if device.type == "cuda":
                row["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
                row["max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
                row["measured_over_traced"] = row["max_memory_allocated"] / t["peak_allocated_bytes"]
            return row

        rec.case({"mode": mode, "width": w, "height": h, "num_outputs": n}, run)


# --- post -------------------------------------------------------------------------------------


def _timed_s(device: torch.device, fn: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    """``fn()``'s result and its best time of ``repeats`` (seconds), the device synchronized."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best


def part_post(rec: Record, device: torch.device, size: str) -> None:
    """Safety input on the device vs the host processor; the VAE decoder eager (diffusers' and the
    sub-pixel upsamplers) vs compiled (sub-pixel, as served)."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from engine.go_fast import CompileSettings, compile_vae_decoder, configure_compiler, graphs_compiled
    from engine.inputs import served_sizes
    from engine.safety_input import pixel_values

    # CompVis/stable-diffusion-safety-checker's preprocessor_config.json (tests/test_safety_input.py)
    clip = CLIPImageProcessor(
        crop_size=224,
        size=224,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    sides = [(1024, 1024), (1344, 768)] if size == "full" else [(96, 64)]
    for w, h in sides:

        def safety(w=w, h=h) -> dict:
            pixels = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, device=device)
            host = [Image.fromarray(pixels[0].cpu().numpy())]

            def on_host():  # what engine.safety did before: the processor and float32 copies
                [np.asarray(im, dtype=np.float32) / 255.0 for im in host]
                return clip(images=host, return_tensors="pt").pixel_values

            ref, t_host = _timed_s(device, on_host)
            got, t_dev = _timed_s(device, lambda: pixel_values(pixels, clip))
            d = (got.cpu() - ref).abs() * torch.tensor(clip.image_std).view(1, -1, 1, 1) * 255
            return {
                "host_ms": 1e3 * t_host,
                "device_ms": 1e3 * t_dev,
                "max_levels": d.max().item(),
                "ok": d.max().item() <= 1.001,
            }

        rec.case({"op": "safety input", "width": w, "height": h}, safety)

    from diffusers import AutoencoderKL

    if size == "full":
        from perfmodel.image_trace import FLUX_VAE_CONFIG as cfg
    else:  # the tiny model's VAE widths (no mid-block attention)
        cfg = {
            "latent_channels": 16,
            "block_out_channels": (16,) * 4,
            "layers_per_block": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "norm_num_groups": 8,
            "mid_block_add_attention": False,
        }
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = random_fill(AutoencoderKL.from_config(cfg)).to(device, dtype).eval()
    if device.type == "cuda":
        vae.to(memory_format=torch.channels_last)  # as engine.pipeline serves it
    side = 1024 if size == "full" else 128
    z = torch.randn(1, 16, side // 8, side // 8, device=device, dtype=dtype)
    state: dict = {}

    def eager() -> dict:
        with torch.inference_mode():
            state["eager"], t = _timed_s(device, lambda: vae.decode(z, return_dict=False)[0])
        return {"decode_ms": 1e3 * t}

    rec.case({"op": "VAE decode eager", "side": side}, eager)

    def subpixel() -> dict:  # the upsamplers as engine.pipeline serves them; compiled below so
        from engine.vae_upsample import use_subpixel_upsampling

        n = use_subpixel_upsampling(vae.decoder)
        with torch.inference_mode():
            got, t = _timed_s(device, lambda: vae.decode(z, return_dict=False)[0])
        rel = _rel(got, state["eager"])
        state["eager"] = got
        return {"upsamplers": n, "decode_ms": 1e3 * t, "rel": rel, "ok": rel <= BF16_REL}

    rec.case({"op": "VAE decode eager, sub-pixel upsamplers", "side": side}, subpixel)

    def compiled() -> dict:
        settings = CompileSettings(backend="inductor" if device.type == "cuda" else "aot_eager")
        configure_compiler(settings)
        compile_vae_decoder(vae, settings)
        before, t0 = graphs_compiled(), time.perf_counter()
        with torch.inference_mode():
            vae.decode(z, return_dict=False)
            _sync(device)
            first = time.perf_counter() - t0
            got, t = _timed_s(device, lambda: vae.decode(z, return_dict=False)[0])
        rel = _rel(got, state["eager"])
        return {
            "backend": settings.backend,
            "compile_and_run_s": round(first, 2),
            "decode_ms": 1e3 * t,
            "graphs": graphs_compiled() - before,
            "rel": rel,
            "ok": rel <= BF16_REL,
        }

    rec.case({"op": "VAE decode compiled", "side": side}, compiled)

    def sizes() -> dict:
        before, t0 = graphs_compiled(), time.perf_counter()
        sizes = served_sizes() if size == "full" else [(128, 128), (96, 160), (160, 96)]
        with torch.inference_mode():
            for w, h in sizes:
                vae.decode(torch.randn(1, 16, h // 8, w // 8, device=device, dtype=dtype), return_dict=False)
        _sync(device)
        return {
            "sizes": len(sizes),
            "new_graphs": graphs_compiled() - before,
            "seconds_all": round(time.perf_counter() - t0, 2),
        }

    rec.case({"op": "VAE decode compiled, served sizes"}, sizes)


PARTS = {
    "kernels": part_kernels,
    "compile": part_compile,
    "bench": part_bench,
    "step": part_step,
    "memory": part_memory,
    "post": part_post,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Record(args.out, args.part, args.size, device)
    torch.manual_seed(0)
    PARTS[args.part](rec, device, args.size)
    rec.data["done"] = True
    rec.write()
    rows = rec.data["rows"]
    bad = [r for r in rows if "error" in r or r.get("ok") is False]
    print(f"{args.part}: {len(rows)} case(s), {len(bad)} failed or in error -> {rec.path}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
