"""4-bit quality on a trained diffusion transformer: the embedded shapes model at 16 and 4 bits.

    python scripts/tiny_quality.py

For a fixed prompt set (held-out colour/shape pairs and training captions, engine.tiny_scenes),
each 4-bit variant's images are compared with the 16-bit model's for the same seeds (PSNR, SSIM;
on the 16x16 pictures the VAE upsamples),
and every image is checked for what its caption asks (shape colour at the named position,
background colour). Variants: naive W4A4 (no smoothing, no low-rank branch, round to nearest),
SVDQuant with round-to-nearest residuals, SVDQuant with the project's GPTQ rounding (the
default, what the service serves). The 16-bit model is the float32 one (the CPU's dtype).
Runs on the CPU in a few minutes (reference kernels).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from engine.quant import SVDQConfig
from engine.tiny_scenes import Scene, all_scenes, check
from engine.tiny_shapes import SHAPES_RANK, SHAPES_WEIGHTS, build_shapes_pipeline, quantize_shapes

VARIANTS = {
    "naive W4A4 (no smoothing, no low-rank, round to nearest)": SVDQConfig(
        rank=0, alphas=(None,), rounding="rtn"
    ),
    f"SVDQuant rank {SHAPES_RANK}, round to nearest": SVDQConfig(rank=SHAPES_RANK, rounding="rtn"),
    f"SVDQuant rank {SHAPES_RANK}, GPTQ rounding (ours, served)": SVDQConfig(rank=SHAPES_RANK),
}
OURS = f"SVDQuant rank {SHAPES_RANK}, GPTQ rounding (ours, served)"
NAIVE = "naive W4A4 (no smoothing, no low-rank, round to nearest)"
SIZE = 1024  # the size the model was trained at (the service's default)


def prompt_set(n_held: int = 12, n_train: int = 12) -> list[Scene]:
    """A fixed, spread-out selection of held-out and training scenes."""
    held, train = all_scenes(held_out=True), all_scenes(held_out=False)
    return held[:: max(1, len(held) // n_held)][:n_held] + train[7 :: max(1, len(train) // n_train)][:n_train]


def load_pipe():
    """The embedded model's float pipeline with the committed trained weights."""
    from safetensors.torch import load_file

    pipe = build_shapes_pipeline(transformer_state=load_file(SHAPES_WEIGHTS))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def draw(pipe, scenes: list[Scene], size: int = SIZE, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """[B, 3, size/64, size/64] pictures in [0, 1], one per scene, seed + i each (as the service
    seeds): the pipeline's latents, which the analytic VAE decodes by nearest-neighbour upsampling
    only (tests/test_tiny_shapes.py checks that), so they are the images' content at 1/64 size."""
    images = []
    for i, s in enumerate(scenes):
        latents = pipe(
            s.caption,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(seed + i),
            max_sequence_length=256,
            output_type="latent",
        ).images
        picture = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)[0, :3]
        images.append((picture.float() / 2 + 0.5).clamp(0, 1))
    return torch.stack(images)


def quantized(pipe, config: SVDQConfig):
    """A copy of ``pipe`` whose transformer is quantized with ``config``, calibrated as the
    embedded model is (engine.tiny_shapes.quantize_shapes)."""
    q = copy.deepcopy(pipe)
    quantize_shapes(q, config)
    return q


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), images in [0, 1] (capped at 100 dB for equal ones)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, per
    channel), images [B, 3, H, W] in [0, 1]."""
    x = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, w, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def steering(images: torch.Tensor, scenes: list[Scene]) -> float:
    """Fraction of (shape colour at its position, background colour) checks the images pass."""
    ok = 0
    for img, s in zip(images, scenes, strict=True):
        seen = check(img * 2 - 1, s)
        ok += (seen["shape"] == s.colour) + (seen["background"] == s.background)
    return ok / (2 * len(scenes))


def report(scenes: list[Scene], held_out: list[Scene]) -> list[dict]:
    """One row per model: PSNR and SSIM against the 16-bit images on ``scenes``, and the caption
    checks passed on ``scenes`` and on ``held_out``."""
    pipe = load_pipe()
    ref = draw(pipe, scenes)
    rows = [
        {
            "variant": "16-bit (float32, the reference)",
            "psnr": None,
            "ssim": 1.0,
            "steering": steering(ref, scenes),
            "held_out": steering(draw(pipe, held_out), held_out),
        }
    ]
    for name, config in VARIANTS.items():
        q = quantized(pipe, config)
        img = draw(q, scenes)
        rows.append(
            {
                "variant": name,
                "psnr": psnr(img, ref),
                "ssim": ssim(img, ref),
                "steering": steering(img, scenes),
                "held_out": steering(draw(q, held_out), held_out),
            }
        )
    return rows


def markdown(rows: list[dict], n: int, n_held: int) -> str:
    """The table of docs/quantization.md."""
    lines = [
        f"| model ({n} prompts, {SIZE}x{SIZE}, 4 steps; metrics on the {SIZE // 64}x{SIZE // 64} latent "
        f"pictures) | PSNR vs 16-bit (dB) | SSIM vs 16-bit | caption checks passed | "
        f"checks passed, all {n_held} held-out scenes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        p = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
        lines.append(
            f"| {r['variant']} | {p} | {r['ssim']:.3f} | {r['steering']:.1%} | {r['held_out']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args()
    t0 = time.perf_counter()
    scenes, held_out = prompt_set(), all_scenes(held_out=True)
    print(markdown(report(scenes, held_out), len(scenes), len(held_out)))
    print(f"\n({time.perf_counter() - t0:.0f} s on the CPU)")


if __name__ == "__main__":
    main()
