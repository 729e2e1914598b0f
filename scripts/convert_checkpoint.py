"""Convert the public engine's (nunchaku's) INT4 FLUX checkpoint into our plain format.

    python scripts/convert_checkpoint.py --src svdq-int4_r32-flux.1-schnell.safetensors --out FILE

The serving loader also reads their file directly (converting in memory at load); converting
once ahead of time saves that work at every start. Layout notes: docs/checkpoint-format.md.
"""

import argparse
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from engine.flux import read_metadata
from engine.flux.nunchaku import convert_state_dict, is_nunchaku


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="the public engine's .safetensors")
    p.add_argument("--out", required=True, type=Path, help="our .safetensors")
    args = p.parse_args()
    t0 = time.perf_counter()
    metadata, shapes = read_metadata(args.src)
    if not is_nunchaku(metadata, set(shapes)):
        raise SystemExit(
            f"{args.src}: not a checkpoint of the public engine (no 'config' metadata, no qkv_proj)"
        )
    state, ours = convert_state_dict(load_file(str(args.src)), metadata)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file(state, tmp, metadata=ours)
    tmp.replace(args.out)
    print(
        f"wrote {args.out} ({len(state)} tensors, {args.out.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
