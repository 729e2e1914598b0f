"""Convert the public engine's (nunchaku's) INT4 FLUX checkpoint into our plain format.

    python scripts/convert_checkpoint.py --src svdq-int4_r32-flux.1-schnell.safetensors --out FILE

The serving loader also reads their file directly (converting in memory at load); converting
once ahead of time saves that work at every start. Layout notes: docs/checkpoint-format.md.
"""

import argparse
import time
from pathlib import Path

from engine.flux.checkpoint import CheckpointError, convert_public_checkpoint, write_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="the public engine's .safetensors")
    p.add_argument("--out", required=True, type=Path, help="our .safetensors")
    args = p.parse_args()
    t0 = time.perf_counter()
    try:
        state, metadata = convert_public_checkpoint(args.src)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    write_checkpoint(state, args.out, metadata)
    print(
        f"wrote {args.out} ({len(state)} tensors, {args.out.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
