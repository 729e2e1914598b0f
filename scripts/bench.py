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
        "SVDQ_KERNELS": kernels.config().backend,  # as main() configured it
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


def kernel_row(m: int, k: int, n: int, backend: str, t: Timing, weight_bytes: int, base: Timing) -> dict:
    return {
        "K": k,
        "N": n,
        "M": m,
        "backend": backend,
        **dataclasses.asdict(t),
        "TOPS": 2.0 * m * n * k / t.median_ms / 1e9,
        "ratio_to_bf16": base.median_ms / t.median_ms,
        "weight_bytes": weight_bytes,
    }


def bench_kernels(device: torch.device, backends: list[str]) -> list[dict]:
    shapes, m = (FLUX_SHAPES, FLUX_TOKENS) if device.type == "cuda" else (CPU_SHAPES, CPU_TOKENS)
    rows = []
    for k, n in shapes:
        a = kernel_inputs(m, k, n, device)
        bf16 = measure(lambda a=a: torch.nn.functional.linear(a["x"], a["w"], a["bias"]), device)
        rows.append(kernel_row(m, k, n, "torch-bf16", bf16, n * k * 2 + n * 2, bf16))
        w4_bytes = n * k // 2 + n * (k // 64) * 2 + (n + k) * RANK * 2 + k * 2 + n * 2
        for name in backends:
            reason = kernels.unavailable_reason(name, device)
            if reason:
                print(f"  {name}: skipped ({reason})")
                continue
            backend = kernels.get_backend(name, device)
            t = measure(lambda a=a, b=backend: run_pair(a, b), device)
            rows.append(kernel_row(m, k, n, name, t, w4_bytes, bf16))
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


def random_transformer(device: torch.device) -> tuple[torch.nn.Module, dict, torch.dtype, int]:
    """The full-size FLUX.1-schnell transformer on a GPU, the tiny one on CPU; random weights
    (speed does not depend on their values). Also the image side it is timed at."""
    from diffusers import FluxTransformer2DModel

    from engine.tiny_model import TINY_TRANSFORMER

    on_gpu = device.type == "cuda"
    config, dtype = (FLUX_SCHNELL, torch.bfloat16) if on_gpu else (TINY_TRANSFORMER, torch.float32)
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    return model, config, dtype, 1024 if on_gpu else 256


def quantize_random(model: torch.nn.Module) -> float:
    """Quantize ``model`` in place with random FLUX-like calibration (timing only); seconds."""
    from engine.flux import quantize_transformer
    from engine.quant import SVDQConfig

    t0 = time.perf_counter()
    config = SVDQConfig(rank=RANK, alphas=(0.5,), svd_niter=2)
    quantize_transformer(model, random_stats(model), config, dtype=torch.bfloat16)
    return time.perf_counter() - t0


def bench_e2e(device: torch.device, steps: int = 4) -> list[dict]:
    import tempfile

    from engine.flux import load_transformer, save_checkpoint
    from engine.quant import SVDQConfig

    on_gpu = device.type == "cuda"
    model, config, dtype, size = random_transformer(device)
    n_params = sum(p.numel() for p in model.parameters())
    inputs = transformer_inputs(config, size, size, device, dtype)

    def run_image(m: torch.nn.Module, label: str, base: Timing | None) -> dict:
        def image():
            with torch.inference_mode():
                for _ in range(steps):
                    m(**inputs)

        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t = measure(image, device)
        return {
            "model": label,
            "config": "FLUX.1-schnell" if on_gpu else "tiny",
            "size": size,
            "steps": steps,
            "seconds_per_image": t.median_ms / 1e3,
            "ratio_to_16bit": (base or t).median_ms / t.median_ms,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if on_gpu else None,
            "transformer_bytes": param_bytes(m),
            "bytes_per_param": param_bytes(m) / n_params,
            "_t": t,
        }

    rows = [run_image(model, "bf16 diffusers" if on_gpu else "fp32 diffusers (CPU)", None)]
    t_quant = quantize_random(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(model, Path(tmp) / "bench.safetensors", SVDQConfig(rank=RANK))
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model = load_transformer(path, device)
        t_load = time.perf_counter() - t0
        extra = {"checkpoint_bytes": path.stat().st_size, "load_seconds": t_load, "quantize_seconds": t_quant}
    for p in model.parameters():
        p.data = p.data.to(dtype)
    label = f"SVDQuant W4A4 r{RANK} ({kernels.backend_for(device).NAME})"
    rows.append({**run_image(model, label, rows[0]["_t"]), **extra})
    for r in rows:
        del r["_t"]
    return rows


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

    model, config, dtype, size = random_transformer(device)
    quantize_random(model)
    inputs = transformer_inputs(config, size, size, device, dtype)

    def step():
        with torch.inference_mode():
            model(**inputs)

    def once(fn) -> float:
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
        t_parse = once(lambda sd=sd, rank=rank: parsed.__setitem__(rank, parse_lora(sd, model)))
        t_apply = once(lambda rank=rank: manager.set([(f"r{rank}", parsed[rank], 1.0)]))
        t = measure(step, device).median_ms
        rows.append(
            {
                "lora": f"rank {rank}",
                "rank": rank,
                "parse_s": t_parse,
                "apply_s": t_apply,
                "step_ms": t,
                "step_overhead": t / base.median_ms - 1,
            }
        )
    t_swap = once(lambda: manager.set([("r16", parsed[16], 1.0)]))
    rows.append({"lora": "swap r64 -> r16", "swap_s": t_swap, "remove_s": once(lambda: manager.set([]))})
    return rows


# One markdown table per mode: (header, row key, format); "-" where a row has no such value.
COLUMNS = {
    "kernels": [
        ("K", "K", "d"),
        ("N", "N", "d"),
        ("M", "M", "d"),
        ("backend", "backend", "s"),
        ("median ms", "median_ms", ".3f"),
        ("p20 ms", "p20_ms", ".3f"),
        ("p80 ms", "p80_ms", ".3f"),
        ("TOPS", "TOPS", ".1f"),
        ("speed vs bf16", "ratio_to_bf16", ".2f"),
        ("weight MB", "weight_bytes", "mb"),
    ],
    "e2e": [
        ("model", "model", "s"),
        ("config", "config", "s"),
        ("image px", "size", "d"),
        ("steps", "steps", "d"),
        ("s/image (transformer)", "seconds_per_image", ".3f"),
        ("speed vs 16-bit", "ratio_to_16bit", ".2f"),
        ("peak GPU GB", "peak_gpu_bytes", "gb"),
        ("transformer GB", "transformer_bytes", "gb"),
        ("bytes/param", "bytes_per_param", ".3f"),
        ("checkpoint GB", "checkpoint_bytes", "gb"),
        ("load s", "load_seconds", ".2f"),
        ("quantize s", "quantize_seconds", ".1f"),
    ],
    "lora": [
        ("LoRA", "lora", "s"),
        ("parse s", "parse_s", ".3f"),
        ("apply s", "apply_s", ".3f"),
        ("step ms", "step_ms", ".1f"),
        ("step overhead", "step_overhead", "+.1%"),
        ("swap s", "swap_s", ".3f"),
        ("remove s", "remove_s", ".3f"),
    ],
}


def print_table(rows: list[dict], mode: str) -> None:
    def cell(r: dict, key: str, fmt: str) -> str:
        v = r.get(key)
        if v is None:
            return "-"
        scale = {"mb": 1e6, "gb": 1e9}.get(fmt)
        return f"{v / scale:.{2 if fmt == 'mb' else 3}f}" if scale else format(v, fmt)

    cols = COLUMNS[mode]
    print("| " + " | ".join(h for h, _, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(cell(r, k, f) for _, k, f in cols) + " |")


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
    kernels.configure(os.environ.get(kernels.ENV_VAR, "auto"))  # SVDQ_KERNELS, read here only
    device = torch.device(args.device)
    default = "triton,cuda" if device.type == "cuda" else "reference,triton"
    backends = [b.strip() for b in (args.backends or default).split(",") if b.strip()]

    env = environment(device)
    print(
        f"# {args.mode} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})"
    )
    rows = {
        "kernels": lambda: bench_kernels(device, backends),
        "e2e": lambda: bench_e2e(device),
        "lora": lambda: bench_lora(device),
    }[args.mode]()
    print_table(rows, args.mode)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"mode": args.mode, "environment": env, "results": rows}, indent=2) + "\n"
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
