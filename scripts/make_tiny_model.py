"""Write a tiny FLUX-architecture model folder (random weights, fixed seed) and its checkpoint.

    python scripts/make_tiny_model.py --out weights/tiny

diffusers loads the folder with FluxPipeline.from_pretrained; the quantized transformer is
DIR/svdq-transformer.safetensors. Takes seconds, needs no network, same bytes every run.
"""

import argparse
import logging
import time

from engine.tiny_model import make_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quantize", action="store_true", help="skip the quantized checkpoint")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    out = make_tiny_model(args.out, seed=args.seed, quantize=not args.no_quantize)
    print(f"tiny model written to {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
