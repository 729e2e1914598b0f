"""Train the embedded model's transformer with flow matching on engine.tiny_scenes' pictures.

    OMP_NUM_THREADS=1 python scripts/train_tiny_model.py    # writes weights/tiny-shapes.safetensors

The data are generated: every caption of engine.tiny_scenes except the held-out colour/shape
pairs, rendered at the latent resolution (the analytic VAE's latent is the picture at 1/64 size),
at 1024x1024 (a 16x16 latent, 8x8 image tokens). The text encoders are the
analytic ones of engine.tiny_shapes and stay fixed; their outputs are computed once per caption
exactly as FluxPipeline computes them (256 T5 tokens). Every pad's T5 output is the same, so
the transformer sees the pads as identical tokens: training keeps the caption's tokens and one pad
whose attention weight is raised by log(its count), which is the same attention arithmetic.

Sigmas: half the batch at 1 (pure noise, where the picture's layout is decided from the caption
alone), a quarter at schnell's other steps (0.75, 0.5, 0.25: the steps the server takes), a
quarter uniform. Same seed and steps give the same weights on the same torch build (single
thread). A checkpoint (--out with .ckpt) is written every --save-every steps; --resume goes on
from it. Time on this project's loaded 2-core machine: see docs/tiny-model.md.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.pipeline import SCHNELL_TEXT_TOKENS
from engine.tiny_scenes import Scene, all_scenes, check, render, shape_mask
from engine.tiny_shapes import SHAPES_WEIGHTS, VAE_FACTOR, build_shapes_pipeline

logger = logging.getLogger("train_tiny_model")
# The training pictures' size: the service's default (aspect ratio 1:1, 1 megapixel), 8x8 image
# tokens. One size only: a token knows its position (RoPE against the text tokens at 0) but not the
# grid's size, so "left" at 512x512 (column 1 of 4) and at 1024x1024 (column 2 of 8) would ask
# for contradicting pictures.
HEIGHT, WIDTH = 1024, 1024
INFERENCE_SIGMAS = (1.0, 0.75, 0.5, 0.25)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], FluxPipeline._pack_latents' order."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] -> [B, C, h, w] (the latent's height and width)."""
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids for a latent of h x w."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def latents_of(scenes: list[Scene], height: int, width: int) -> torch.Tensor:
    """The analytic VAE's latents of the pictures: RGB in channels 0-2, channel 3 zero."""
    lat = torch.zeros(len(scenes), 4, height // VAE_FACTOR, width // VAE_FACTOR)
    for i, s in enumerate(scenes):
        lat[i, :3] = render(s, height // VAE_FACTOR, width // VAE_FACTOR)
    return lat


class Captions:
    """Every caption's text conditioning, compressed: the T5 tokens up to the last non-pad one plus
    one pad slot, and the attention bias that gives that pad the weight of all 256 - n pads."""

    def __init__(self, pipe, captions: list[str], chunk: int = 64) -> None:
        embeds, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(captions), chunk):
                e, p, _ = pipe.encode_prompt(
                    prompt=captions[i : i + chunk], prompt_2=None, max_sequence_length=SCHNELL_TEXT_TOKENS
                )
                embeds.append(e)
                pooled.append(p)
        full = torch.cat(embeds)
        # a pad is a row equal to its caption's last (to float rounding: sums over other counts of pads)
        is_pad = (full - full[:, -1:]).abs().amax(-1) <= 1e-6  # [C, 256]
        n = int((~is_pad).float().cumsum(1).argmax(1).max()) + 1  # tokens up to the last non-pad
        if not is_pad[:, n:].all():
            raise RuntimeError("the T5 pads' outputs differ: the compression would not be exact")
        self.length = n + 1
        self.embeds = full[:, : self.length].contiguous()
        self.pooled = torch.cat(pooled)
        self.index = {c: i for i, c in enumerate(captions)}
        self.pad_bias = math.log(SCHNELL_TEXT_TOKENS - self.length + 1)

    def batch(self, captions: list[str], n_image: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T5 tokens [B, L, D], pooled [B, P], attention bias [B, 1, 1, L + n_image])."""
        idx = [self.index[c] for c in captions]
        bias = torch.zeros(len(idx), 1, 1, self.length + n_image)
        bias[..., self.length - 1] = self.pad_bias
        return self.embeds[idx], self.pooled[idx], bias


def velocity(model, x, sigma, embeds, pooled, bias, h: int, w: int) -> torch.Tensor:
    """The transformer's call as FluxPipeline makes it (schnell: no guidance), with the pad bias."""
    return model(
        hidden_states=x,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=image_ids(h, w),
        txt_ids=torch.zeros(embeds.shape[1], 3),
        joint_attention_kwargs={"attention_mask": bias},
        return_dict=False,
    )[0]


@torch.no_grad()
def sample(model, caps: Captions, captions: list[str], height: int, width: int, steps: int, seed: int):
    """Euler samples as FluxPipeline takes them: [B, 3, h, w] latent pictures."""
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    g = torch.Generator().manual_seed(seed)
    x = pack(torch.randn(len(captions), 4, h, w, generator=g))
    embeds, pooled, bias = caps.batch(captions, x.shape[1])
    sigmas = [*torch.linspace(1.0, 1.0 / steps, steps).tolist(), 0.0]
    for s, s_next in itertools.pairwise(sigmas):
        v = velocity(model, x, torch.full((len(captions),), s), embeds, pooled, bias, h, w)
        x = x + (s_next - s) * v
    return unpack(x, h, w)[:, :3]


def evaluate(
    model, caps: Captions, scenes: list[Scene], height: int, width: int, steps: int = 4
) -> tuple[float, float]:
    """Fractions of the drawings whose shape colour (at its position), background colour is right."""
    pictures = sample(model, caps, [s.caption for s in scenes], height, width, steps, seed=0)
    shape = background = 0
    for pic, s in zip(pictures, scenes, strict=True):
        seen = check(pic, s)
        shape += seen["shape"] == s.colour
        background += seen["background"] == s.background
    return shape / len(scenes), background / len(scenes)


def train(args) -> dict[str, torch.Tensor]:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    pipe = build_shapes_pipeline(args.seed)
    model = pipe.transformer.train()
    scenes, held = all_scenes(held_out=False), all_scenes(held_out=True)
    t0 = time.perf_counter()
    caps = Captions(pipe, [s.caption for s in scenes + held])
    logger.info(
        "%d captions encoded in %.1f s (%d text slots)",
        len(caps.index),
        time.perf_counter() - t0,
        caps.length,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            min(1.0, (i + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps)))
        ),
    )
    ckpt = args.out.with_suffix(".ckpt")
    start = 0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        logger.info("resumed at step %d", start)
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        height, width = HEIGHT, WIDTH
        h, w = height // VAE_FACTOR, width // VAE_FACTOR
        batch = [scenes[rng.randrange(len(scenes))] for _ in range(args.batch)]
        x0 = pack(latents_of(batch, height, width))
        # the shape covers a few percent of the picture: its tokens weigh more, or the model
        # learns the background first and the shape late
        fg = pack(torch.stack([shape_mask(s, h, w) for s in batch])[:, None].expand(-1, 4, -1, -1))
        weight = 1.0 + args.shape_weight * fg
        noise = torch.randn_like(x0)
        # half the batch at sigma 1 (pure noise: where the layout is decided, from the caption
        # alone), a quarter on the other steps the server takes, a quarter uniform
        grid = torch.tensor(INFERENCE_SIGMAS)[torch.randint(1, len(INFERENCE_SIGMAS), (args.batch,))]
        u = torch.rand(args.batch)
        sigma = torch.where(
            u < 0.5, torch.ones(args.batch), torch.where(u < 0.75, grid, torch.rand(args.batch))
        )
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        embeds, pooled, bias = caps.batch([s.caption for s in batch], x0.shape[1])
        v = velocity(model, xt, sigma, embeds, pooled, bias, h, w)
        loss = (weight * (v - (noise - x0)).pow(2)).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            logger.info(
                "step %d/%d %dx%d loss %.4f %.0f s",
                step,
                args.steps,
                height,
                width,
                loss.item(),
                time.perf_counter() - t0,
            )
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            r = random.Random(step)
            logger.info(
                "  checks passed: 4 steps: training %s, held-out %s; 1 step: held-out %s",
                *(
                    "shape {:.2f} background {:.2f}".format(
                        *evaluate(model, caps, r.sample(pool, n), HEIGHT, WIDTH, k)
                    )
                    for pool, n, k in ((scenes, 16, 4), (held, 32, 4), (held, 16, 1))
                ),
            )
            model.train()
        if (step + 1) % args.save_every == 0:
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "step": step + 1,
            }
            torch.save(state, ckpt)
    logger.info("trained %d steps in %.0f s", args.steps - start, time.perf_counter() - t0)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=SHAPES_WEIGHTS)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape-weight", type=float, default=2.0, help="extra loss weight of the shape's tokens")
    p.add_argument("--eval-every", type=int, default=200)  # the log's checks; they do not change the weights
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    state = train(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in vars(args).items() if k in ("steps", "batch", "lr", "seed", "shape_weight")}
    # float16 halves the committed file (7 -> 3.6 MB); the served model loads it into float32
    save_file({k: v.half() for k, v in state.items()}, args.out, metadata=meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
