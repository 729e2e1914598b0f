"""Benchmarks: numbers, not tests. Every figure is measured in this run, on this machine.

    python scripts/bench.py --mode kernels [--json PATH] [--backends triton,cuda]
    python scripts/bench.py --mode e2e [--json PATH]
    python scripts/bench.py --mode lora [--json PATH]

kernels: for FLUX.1's linear shapes at 1024x1024 (M = 4096 image + 256 text tokens), the time
and TOPS of our quantize_act + w4a4_gemm pair per backend, of torch's bf16 matmul (cuBLAS) on
the same inputs, their ratio, and the bytes of weights each reads. On a CPU it runs one tiny
shape so that CI keeps this script from rotting; CPU figures say nothing about GPU speed.

e2e: the FLUX.1-schnell transformer (full-size config on a GPU, the tiny one on CPU) with random
weights (speed does not depend on their values), quantized with random calibration data; the
time of a 4-step 1024x1024 image's transformer passes for the bf16 model and for ours, their
ratio, peak GPU memory of each, bytes per parameter, checkpoint size and load time.

lora: on the same quantized transformer, the time to parse + apply a rank-16 and a rank-64 LoRA
covering every quantized layer, to swap between them, and one denoising step with each.

Timing: CUDA events around each call (or perf_counter on CPU) after warm-up; median and the
20th/80th percentiles of the repetitions, as triton.testing.do_bench reports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine import kernels

FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]  # (K, N)
FLUX_TOKENS = 4096 + 256
CPU_SHAPES = [(128, 128)]
CPU_TOKENS = 64
RANK = 32


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def measure(fn: Callable[[], object], device: torch.device) -> Timing:
    """Median and 20/80 percentiles of ``fn``'s run time over repeated calls after warm-up."""
    warmup, reps = (10, 50) if device.type == "cuda" else (1, 5)  # CPU: only keeps the script honest
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7])


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": time.strftime("%Y-%m-%d"),
        "SVDQ_KERNELS": os.environ.get("SVDQ_KERNELS", "auto"),
    }


def kernel_inputs(m: int, k: int, n: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    return {
        "x": torch.randn(m, k, generator=g).to(device, torch.bfloat16),
        "w": (torch.randn(n, k, generator=g) / k**0.5).to(device, torch.bfloat16),
        "qweight": torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(device),
        "wscales": (torch.rand(n, k // 64, generator=g) / 50).to(device, torch.bfloat16),
        "smooth": (torch.rand(k, generator=g) + 0.5).to(device, torch.bfloat16),
        "proj_down": (torch.randn(RANK, k, generator=g) / k**0.5).to(device, torch.bfloat16),
        "proj_up": torch.randn(n, RANK, generator=g).to(device, torch.bfloat16),
        "bias": torch.randn(n, generator=g).to(device, torch.bfloat16),
    }


def run_pair(a: dict, backend) -> torch.Tensor:
    qx, ascales, lora_act = backend.quantize_act(
        a["x"], a["smooth"], a["proj_down"], group_size=64, unsigned=False, shift=0.0
    )
    return backend.w4a4_gemm(
        qx,
        ascales,
        a["qweight"],
        a["wscales"],
        lora_act,
        a["proj_up"],
        a["bias"],
        unsigned=False,
        out_dtype=torch.bfloat16,
    )


def bench_kernels(device: torch.device, backends: list[str]) -> list[dict]:
    shapes, m = (FLUX_SHAPES, FLUX_TOKENS) if device.type == "cuda" else (CPU_SHAPES, CPU_TOKENS)
    rows = []
    for k, n in shapes:
        a = kernel_inputs(m, k, n, device)
        ops = 2.0 * m * n * k
        bf16 = measure(lambda a=a: torch.nn.functional.linear(a["x"], a["w"], a["bias"]), device)
        w4_bytes = n * k // 2 + n * (k // 64) * 2 + (n + k) * RANK * 2 + k * 2 + n * 2
        rows.append(
            {
                "K": k,
                "N": n,
                "M": m,
                "backend": "torch-bf16",
                "median_ms": bf16.median_ms,
                "p20_ms": bf16.p20_ms,
                "p80_ms": bf16.p80_ms,
                "TOPS": ops / bf16.median_ms / 1e9,
                "ratio_to_bf16": 1.0,
                "weight_bytes": n * k * 2 + n * 2,
            }
        )
        for name in backends:
            reason = kernels.unavailable_reason(name, device)
            if reason:
                print(f"  {name}: skipped ({reason})")
                continue
            backend = kernels.get_backend(name, device)
            t = measure(lambda a=a, b=backend: run_pair(a, b), device)
            rows.append(
                {
                    "K": k,
                    "N": n,
                    "M": m,
                    "backend": name,
                    "median_ms": t.median_ms,
                    "p20_ms": t.p20_ms,
                    "p80_ms": t.p80_ms,
                    "TOPS": ops / t.median_ms / 1e9,
                    "ratio_to_bf16": bf16.median_ms / t.median_ms,
                    "weight_bytes": w4_bytes,
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


FLUX_SCHNELL = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


def transformer_inputs(config: dict, width: int, height: int, device, dtype) -> dict:
    """The transformer's inputs for one denoising step of a ``width x height`` image."""
    g = torch.Generator().manual_seed(0)
    h, w = height // 16, width // 16
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "hidden_states": torch.randn(1, h * w, config["in_channels"], generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, 512, config["joint_attention_dim"], generator=g).to(
            device, dtype
        ),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
        "timestep": torch.tensor([1.0], device=device, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(device, dtype),
        "txt_ids": torch.zeros(512, 3, device=device, dtype=dtype),
        "return_dict": False,
    }


def random_stats(model: torch.nn.Module, samples: int = 64) -> dict:
    """Calibration statistics with FLUX-like outliers, without running the model (timing only)."""
    from engine.flux import target_layers
    from engine.quant import LayerStats
    from engine.quant.synthetic import outlier_activations

    stats = {}
    for i, name in enumerate(target_layers(model)):
        k = model.get_submodule(name).in_features
        x = (
            outlier_activations(samples, k, seed=i).abs()
            if name.endswith((".net.2", "proj_out"))
            else outlier_activations(samples, k, seed=i)
        )
        stats[name] = LayerStats(x.abs().amax(0), x, torch.zeros(samples), torch.Generator())
    return stats


def param_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bench_e2e(device: torch.device, steps: int = 4) -> list[dict]:
    import tempfile
    from pathlib import Path as _Path

    from diffusers import FluxTransformer2DModel

    from engine.flux import load_transformer, quantize_transformer, save_checkpoint
    from engine.quant import SVDQConfig
    from engine.tiny_model import TINY_TRANSFORMER

    on_gpu = device.type == "cuda"
    config = FLUX_SCHNELL if on_gpu else TINY_TRANSFORMER
    dtype = torch.bfloat16 if on_gpu else torch.float32
    size = 1024 if on_gpu else 256
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    inputs = transformer_inputs(config, size, size, device, dtype)
    rows = []

    def run_image(m) -> Timing:
        def image():
            with torch.inference_mode():
                for _ in range(steps):
                    m(**inputs)

        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        return measure(image, device)

    t16 = run_image(model)
    peak16 = torch.cuda.max_memory_allocated(device) if on_gpu else None
    bytes16 = param_bytes(model)
    rows.append(
        {
            "model": "bf16 diffusers" if on_gpu else "fp32 diffusers (CPU)",
            "config": "FLUX.1-schnell" if on_gpu else "tiny",
            "size": size,
            "steps": steps,
            "seconds_per_image": t16.median_ms / 1e3,
            "ratio_to_16bit": 1.0,
            "peak_gpu_bytes": peak16,
            "transformer_bytes": bytes16,
            "bytes_per_param": bytes16 / n_params,
        }
    )
    t0 = time.perf_counter()
    quantize_transformer(
        model, random_stats(model), SVDQConfig(rank=32, alphas=(0.5,), svd_niter=2), dtype=torch.bfloat16
    )
    t_quant = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(model, _Path(tmp) / "bench.safetensors", SVDQConfig(rank=32))
        file_bytes = path.stat().st_size
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model = load_transformer(path, device)
        t_load = time.perf_counter() - t0
    for p in model.parameters():
        p.data = p.data.to(dtype)
    tq = run_image(model)
    peak4 = torch.cuda.max_memory_allocated(device) if on_gpu else None
    bytes4 = param_bytes(model)
    rows.append(
        {
            "model": f"SVDQuant W4A4 r32 ({kernels.backend_for(device).NAME})",
            "config": rows[0]["config"],
            "size": size,
            "steps": steps,
            "seconds_per_image": tq.median_ms / 1e3,
            "ratio_to_16bit": t16.median_ms / tq.median_ms,
            "peak_gpu_bytes": peak4,
            "transformer_bytes": bytes4,
            "bytes_per_param": bytes4 / n_params,
            "checkpoint_bytes": file_bytes,
            "load_seconds": t_load,
            "quantize_seconds": t_quant,
        }
    )
    return rows


def quantized_random_transformer(device: torch.device):
    """The transformer of the e2e mode, quantized with random calibration (timing only)."""
    from diffusers import FluxTransformer2DModel

    from engine.flux import quantize_transformer
    from engine.quant import SVDQConfig
    from engine.tiny_model import TINY_TRANSFORMER

    on_gpu = device.type == "cuda"
    config = FLUX_SCHNELL if on_gpu else TINY_TRANSFORMER
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    quantize_transformer(
        model, random_stats(model), SVDQConfig(rank=32, alphas=(0.5,), svd_niter=2), dtype=torch.bfloat16
    )
    return model, config, dtype


def random_lora(model: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA on every quantized layer of ``model``."""
    from engine.flux import treatment_of

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in [n for n, _ in model.named_modules() if treatment_of(n)]:
        m = model.get_submodule(name)
        k = m.in_features
        n = m.out_features
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, k, generator=g) / k**0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(n, rank, generator=g) / 100
    return sd


def bench_lora(device: torch.device) -> list[dict]:
    from engine.lora import LoraManager, parse_lora

    model, config, dtype = quantized_random_transformer(device)
    inputs = transformer_inputs(
        config, 1024 if device.type == "cuda" else 256, 1024 if device.type == "cuda" else 256, device, dtype
    )

    def step():
        with torch.inference_mode():
            model(**inputs)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    manager = LoraManager(model)
    base = measure(step, device)
    rows = [{"lora": "none", "rank": 0, "step_ms": base.median_ms}]
    parsed = {}
    for rank in (16, 64):
        sd = random_lora(model, rank, seed=rank)
        t_parse = timed(lambda sd=sd, rank=rank: parsed.__setitem__(rank, parse_lora(sd, model)))
        t_apply = timed(lambda rank=rank: manager.set([(f"r{rank}", parsed[rank], 1.0)]))
        t = measure(step, device)
        rows.append(
            {
                "lora": f"rank {rank}",
                "rank": rank,
                "parse_s": t_parse,
                "apply_s": t_apply,
                "step_ms": t.median_ms,
                "step_overhead": t.median_ms / base.median_ms - 1,
            }
        )
    t_swap = timed(lambda: manager.set([("r16", parsed[16], 1.0)]))
    t_clear = timed(lambda: manager.set([]))
    rows.append({"lora": "swap r64 -> r16", "swap_s": t_swap, "remove_s": t_clear})
    return rows


def print_lora(rows: list[dict]) -> None:
    print("| LoRA | parse s | apply s | step ms | step overhead | swap s | remove s |")
    print("|---|---|---|---|---|---|---|")
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
    for r in rows:
        print(
            f"| {r['lora']} | {f(r, 'parse_s', '.3f')} | {f(r, 'apply_s', '.3f')} | {f(r, 'step_ms', '.1f')} | "
            f"{f(r, 'step_overhead', '+.1%')} | {f(r, 'swap_s', '.3f')} | {f(r, 'remove_s', '.3f')} |"
        )


def print_e2e(rows: list[dict]) -> None:
    print(
        "| model | config | image | s/image (transformer) | speed vs 16-bit | peak GPU GB | transformer GB | "
        "bytes/param | checkpoint GB | load s | quantize s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gb = lambda v: "-" if v is None else f"{v / 1e9:.3f}"  # noqa: E731
    for r in rows:
        print(
            f"| {r['model']} | {r['config']} | {r['size']}px x{r['steps']} | {r['seconds_per_image']:.3f} | "
            f"{r['ratio_to_16bit']:.2f}x | {gb(r['peak_gpu_bytes'])} | {gb(r['transformer_bytes'])} | "
            f"{r['bytes_per_param']:.3f} | {gb(r.get('checkpoint_bytes'))} | "
            f"{r.get('load_seconds', float('nan')):.2f} | {r.get('quantize_seconds', float('nan')):.1f} |"
        )


def print_table(rows: list[dict]) -> None:
    print("| K -> N | M | backend | median ms (p20-p80) | TOPS | speed vs bf16 | weight MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['K']} -> {r['N']} | {r['M']} | {r['backend']} | {r['median_ms']:.3f} "
            f"({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | {r['TOPS']:.1f} | {r['ratio_to_bf16']:.2f}x | "
            f"{r['weight_bytes'] / 1e6:.2f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["kernels", "e2e", "lora"], default="kernels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated kernel backends (default: triton,cuda on a GPU; reference,triton on CPU)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    default = "triton,cuda" if device.type == "cuda" else "reference,triton"
    backends = [b.strip() for b in (args.backends or default).split(",") if b.strip()]

    env = environment(device)
    print(
        f"# {args.mode} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})"
    )
    if args.mode == "kernels":
        rows = bench_kernels(device, backends)
        print_table(rows)
    elif args.mode == "e2e":
        rows = bench_e2e(device)
        print_e2e(rows)
    else:
        rows = bench_lora(device)
        print_lora(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"mode": args.mode, "environment": env, "results": rows}, indent=2) + "\n"
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
