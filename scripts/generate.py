"""Text to image from the command line, without Cog.

    python scripts/generate.py --model DIR [--checkpoint FILE] --prompt "..." --out out.png
        [--seed 0 --steps 4 --width 1024 --height 1024 --num-outputs 1]

--model is a diffusers-format FLUX folder; --checkpoint our quantized transformer (without
it the folder's float transformer runs, for comparison). Several outputs are numbered:
out-0.png, out-1.png, ...
"""

import argparse
import logging
import os
import time
from pathlib import Path

from engine import kernels
from engine.pipeline import FluxGenerator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers-format FLUX model folder")
    p.add_argument("--checkpoint", default=None, help="our quantized transformer (.safetensors)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--num-outputs", type=int, default=1)
    p.add_argument("--out", default="out.png", help="PNG path; numbered when several")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    kernels.configure(os.environ.get(kernels.ENV_VAR, "auto"))  # SVDQ_KERNELS, read here only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    gen = FluxGenerator.from_pretrained(args.model, args.checkpoint, device=args.device)
    t0 = time.perf_counter()
    images = gen.generate(
        args.prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        seed=args.seed,
        num_outputs=args.num_outputs,
        on_step=lambda i, n: logging.info("step %d/%d", i, n),
    )
    logging.info("generated %d image(s) in %.2f s", len(images), time.perf_counter() - t0)
    out = Path(args.out)
    paths = (
        [out]
        if len(images) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    )
    for img, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
        print(path)


if __name__ == "__main__":
    main()
