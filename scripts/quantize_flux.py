"""Quantize a diffusers-format FLUX model's transformer with SVDQuant into our checkpoint.

    python scripts/quantize_flux.py --model DIR --out FILE [--rank 32 --group-size 64
        --calib-prompts 32 --steps 4 --device cuda --svd-niter 2 | --exact-svd --rounding gptq]

Runs the float pipeline on the built-in calibration prompts at several resolutions,
records what each layer sees, then fuses the layers that share an input (q/k/v, and in the
single blocks proj_mlp too: one layer each, engine/flux/blocks.py) and quantizes layer by layer
(alpha searched per layer, jointly on a fused layer's concatenated weight; the 4-bit residual
rounded with GPTQ error compensation by default) and prints a per-layer error summary. The
file (format version 2) is described in docs/checkpoint-format.md.
"""

import argparse
import logging
import os
import time

import torch
from tqdm import tqdm

from engine import kernels
from engine.flux import (
    DEFAULT_RESOLUTIONS,
    calibrate,
    fuse_projections,
    quantize_transformer,
    save_checkpoint,
    target_layers,
)
from engine.quant import DEFAULT_DAMP, ROUNDINGS, SVDQConfig


def parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(tuple(int(v) for v in r.lower().split("x")) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolutions: expected WxH[,WxH...], got {text!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers-format FLUX model folder")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument(
        "--group-size",
        type=int,
        choices=(64, 128),
        default=64,
        help="input channels per 4-bit scale: 64 (the public checkpoint's format, every backend) or 128 "
        "(our Hopper option, served by the Triton and reference kernels; about 12%% more error: "
        "docs/quantization.md)",
    )
    p.add_argument("--calib-prompts", type=int, default=32, help="how many built-in prompts to calibrate on")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per calibration prompt")
    p.add_argument("--resolutions", type=parse_resolutions, default=DEFAULT_RESOLUTIONS, help="WxH,WxH,...")
    p.add_argument(
        "--max-samples", type=int, default=256, help="input rows kept per layer for the alpha search and GPTQ's X^T X"
    )
    p.add_argument(
        "--svd-niter",
        type=int,
        default=2,
        help="power iterations of the randomized SVD (default 2: the same error as exact on FLUX-sized layers, "
        "7-23x faster; docs/quantization.md)",
    )
    p.add_argument("--exact-svd", action="store_true", help="full SVD instead of the randomized one")
    p.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default="gptq",
        help="rounding of the 4-bit residual: gptq (error-compensating, the default: 10.7%% lower held-out "
        "error than rtn on real activations, docs/quantization.md) or rtn (round to nearest)",
    )
    p.add_argument("--gptq-damp", type=float, default=DEFAULT_DAMP, help="GPTQ damping, relative to mean(diag X^T X)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    kernels.configure(os.environ.get(kernels.ENV_VAR, "auto"))  # SVDQ_KERNELS, read here only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from diffusers import FluxPipeline

    config = SVDQConfig(
        rank=args.rank,
        group_size=args.group_size,
        svd_niter=None if args.exact_svd else args.svd_niter,
        rounding=args.rounding,
        gptq_damp=args.gptq_damp,
    )
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    with tqdm(total=args.calib_prompts, desc="calibrating", unit="prompt") as bar:
        stats = calibrate(
            pipe,
            n_prompts=args.calib_prompts,
            resolutions=args.resolutions,
            steps=args.steps,
            max_samples=args.max_samples,
            on_prompt=lambda i, n: bar.update(1),
        )
    t_cal = time.perf_counter() - t0
    fuse_projections(pipe.transformer)  # q/k/v (+ proj_mlp) as one layer each: what is quantized
    n_layers = len(target_layers(pipe.transformer))
    with tqdm(total=n_layers, desc="quantizing", unit="layer") as bar:
        reports = quantize_transformer(
            pipe.transformer, stats, config, dtype=torch.bfloat16, on_layer=lambda r: bar.update(1)
        )
    t_q = time.perf_counter() - t0 - t_cal
    path = save_checkpoint(pipe.transformer, args.out, config)

    print(f"\n{'layer':60s} {'kind':14s} {'alpha':>6s} {'rel.err':>8s}")
    for r in reports:
        alpha = "-" if r.alpha is None else f"{r.alpha:.3f}"
        print(f"{r.name:60s} {r.treatment.value:14s} {alpha:>6s} {r.error:8.4f}")
    errs = sorted(r.error for r in reports)
    print(f"\n{len(reports)} layers; relative error median {errs[len(errs) // 2]:.4f}, worst {errs[-1]:.4f}")
    print(
        f"calibration {t_cal:.1f} s, quantization {t_q:.1f} s; wrote {path} "
        f"({path.stat().st_size / 1e6:.1f} MB)"
    )


if __name__ == "__main__":
    main()
