"""Measure one image's stages on the machine it runs on: the figures scripts/image_model.py models.

    python scripts/gpu_stages.py --model DIR --checkpoint FILE [--size 1024] [--steps 4]
                                 [--num-outputs 1] [--repeats 3] [--json OUT.json]
    python scripts/gpu_stages.py --tiny [--size 256] ...     # the tiny model, made in a temp dir

Why: the image model (docs/benchmarks.md, "One image, stage by stage") is a model; this script
times the same stages through the same code on a GPU, so the two can be set side by side and the
model's efficiencies corrected. Stages, as engine.pipeline.FluxGenerator.generate runs them:

* ``text encoders``: ``pipe.encode_prompt`` (CLIP-L pooled + T5 at the model's token count);
* ``transformer x steps``: the denoising loop, ``pipe(..., output_type="latent")`` with the
  prompt embeddings given (the transformer, the scheduler and the latents' preparation);
* ``VAE decode``: unpack, scale and ``vae.decode`` as FluxPipeline does after the loop;
* ``post-processing``: diffusers' post-processing to [0, 1], ``engine.pipeline.to_uint8`` and
  ``pil_images`` (the copy to the host);
* ``safety checker`` (when the model folder has one): ``engine.safety.SafetyChecker.flags``.

Each stage is timed with the device synchronized before and after it (``torch.cuda.synchronize``
on a GPU); the first run is a warm-up (and compiles, under go_fast) and is reported apart; the
median of ``--repeats`` runs follows. On a CPU it runs too (the tests use the tiny model), but its
figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("text encoders", "transformer x steps", "VAE decode", "post-processing", "safety checker")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> tuple[object, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


@torch.inference_mode()
def run_once(
    gen, checker, prompt: str, size: int, steps: int, num_outputs: int, seed: int = 0
) -> tuple[dict[str, float], list]:
    """One image (or batch) through the pipeline's stages, each timed on its own (seconds); and the
    images (the ones ``gen.generate`` gives for this prompt, size, steps and seed)."""
    from engine.pipeline import pil_images, to_uint8

    pipe, device = gen.pipe, gen.device
    times: dict[str, float] = {}
    (embeds, pooled, _), times["text encoders"] = _timed(
        device,
        lambda: pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_outputs,
            max_sequence_length=gen.text_tokens,
        ),
    )
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_outputs)]
    latents, times["transformer x steps"] = _timed(
        device,
        lambda: (
            pipe(
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=0.0,
                generator=generators,
                output_type="latent",
            ).images
        ),
    )

    def decode():
        z = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.vae.decode(z, return_dict=False)[0]

    image, times["VAE decode"] = _timed(device, decode)
    pixels, t_uint8 = _timed(
        device, lambda: to_uint8(pipe.image_processor.postprocess(image, output_type="pt"))
    )
    images, t_host = _timed(device, lambda: pil_images(pixels))
    times["post-processing"] = t_uint8 + t_host
    if checker is not None:  # as the service runs it: on the device pixels (engine.safety_input)
        _, times["safety checker"] = _timed(device, lambda: checker.flags(pixels))
    return times, images


def measure(gen, checker, *, prompt: str, size: int, steps: int, num_outputs: int, repeats: int) -> dict:
    """Warm-up run, then the median of ``repeats`` runs per stage (seconds), and their total."""
    warm, _ = run_once(gen, checker, prompt, size, steps, num_outputs)
    runs = [run_once(gen, checker, prompt, size, steps, num_outputs, seed=i + 1)[0] for i in range(repeats)]
    median = {stage: statistics.median(r[stage] for r in runs) for stage in runs[0]}
    device = gen.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "size": size,
        "steps": steps,
        "num_outputs": num_outputs,
        "repeats": repeats,
        "warm_up_s": warm,
        "median_s": median,
        "total_median_s": sum(median.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="diffusers model folder (text encoders, VAE, scheduler)")
    ap.add_argument("--checkpoint", type=Path, help="our quantized transformer checkpoint")
    ap.add_argument("--tiny", action="store_true", help="build and use the tiny model (tests, CPU)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-outputs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="a photo of a red fox in the snow, detailed fur")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if not args.tiny and (args.model is None or args.checkpoint is None):
        ap.error("give --model and --checkpoint, or --tiny")

    from engine.pipeline import FluxGenerator
    from engine.safety import SafetyChecker

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from engine.tiny_model import CHECKPOINT_NAME, make_tiny_model

            model = make_tiny_model(Path(tmp) / "tiny")
            checkpoint = model / CHECKPOINT_NAME
        else:
            model, checkpoint = args.model, args.checkpoint
        gen = FluxGenerator.from_pretrained(model, checkpoint)
        checker = SafetyChecker.load(model, gen.device)
        result = measure(
            gen,
            checker,
            prompt=args.prompt,
            size=args.size,
            steps=args.steps,
            num_outputs=args.num_outputs,
            repeats=args.repeats,
        )
    for stage, s in result["median_s"].items():
        print(f"{stage:>22}: {1e3 * s:9.1f} ms (warm-up {1e3 * result['warm_up_s'][stage]:.1f})")
    print(f"{'total':>22}: {1e3 * result['total_median_s']:9.1f} ms on {result['device']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
