"""Write an embedded model's folder and its 4-bit checkpoint.

    python scripts/make_tiny_model.py --out weights/tiny-shapes                # the trained model (default)
    python scripts/make_tiny_model.py --out weights/tiny --kind random         # random weights (tests)

``shapes``: the trained tiny FLUX that draws one coloured shape (docs/tiny-model.md), from
weights/tiny-shapes.safetensors (scripts/train_tiny_model.py makes that file). ``random``: the
same architecture family with random weights, fixed seed: every code path, noise images.
diffusers loads either folder with FluxPipeline.from_pretrained; the quantized transformer is
DIR/svdq-transformer.safetensors. Takes seconds, needs no network, same bytes every run.
"""

import argparse
import logging
import time

from engine.tiny_model import make_tiny_model
from engine.tiny_shapes import make_shapes_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--kind", choices=("shapes", "random"), default="shapes")
    p.add_argument("--seed", type=int, default=0, help="the random model's seed")
    p.add_argument("--no-quantize", action="store_true", help="skip the quantized checkpoint")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    if args.kind == "shapes":
        out = make_shapes_model(args.out, quantize=not args.no_quantize)
    else:
        out = make_tiny_model(args.out, seed=args.seed, quantize=not args.no_quantize)
    print(f"{args.kind} tiny model written to {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
