"""Bake the weights into the image: fetch, verify and convert everything into weights/baked/
before `cog build`, so the container downloads nothing at boot.

    HF_TOKEN=hf_... python scripts/bake_weights.py           # from the manifest's sources
    python scripts/bake_weights.py --mirror https://bucket.example/flux-schnell
    python scripts/bake_weights.py --warm                    # also fill the compile caches (GPU)
    python scripts/bake_weights.py --clean                   # leave baked mode
    cog build                                                # COPY . /src takes weights/baked

What it writes (git-ignored; .dockerignore keeps weights/cache and weights/tiny out of the image
but not this folder, so the image holds it exactly when it exists):

    weights/baked/<model>/...             every manifest file, sha256-checked, with hash records
    weights/baked/converted/*.safetensors the public checkpoint converted to ours, once
    weights/baked/compile-cache/          with --warm: inductor's and Triton's caches

setup() uses weights/baked/<model> when every manifest file is there (checked by size: the
files were hashed here), loads the converted checkpoint from weights/baked/converted, and keeps
its compile caches in weights/baked/compile-cache. --warm runs setup() once, which compiles
go_fast's graphs and the Triton kernels into that folder: run it on a GPU of the kind that will
serve (the caches are specific to the GPU and the software versions), or leave it out and the
first boot fills weights/cache/compile-cache instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.flux.converted import converted_checkpoint  # noqa: E402
from engine.weights import (  # noqa: E402
    BAKED,
    MANIFEST,
    Sources,
    WeightsError,
    check_model_folder,
    ensure_files,
    load_manifest,
    recorded_sha256,
    transformer_file,
)

logger = logging.getLogger("bake_weights")


def bake(model: str, baked: Path, sources: Sources, manifest: Path = MANIFEST) -> Path:
    """Every manifest file of ``model`` into ``baked/<model>``, and its checkpoint converted."""
    root = baked / model
    entries = load_manifest(model, manifest)
    ensure_files(entries, root, sources=sources)
    check_model_folder(root)
    checkpoint = root / transformer_file(model, manifest)
    converted = converted_checkpoint(checkpoint, lambda: recorded_sha256(checkpoint), [baked / "converted"])
    size = sum(p.stat().st_size for p in baked.rglob("*") if p.is_file())
    logger.info("baked %s into %s (%.1f GiB); transformer: %s", model, baked, size / 2**30, converted.name)
    logger.info(
        "to serve it from a mirror instead: upload %s/ to <bucket>/ and %s as "
        "<bucket>/converted/%s, then set SVDQ_WEIGHTS_URL=<bucket URL>",
        root,
        converted,
        checkpoint.name,
    )
    return root


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="flux-schnell", help="a model of weights/manifest.json")
    parser.add_argument("--mirror", default=os.environ.get("SVDQ_WEIGHTS_URL"), help="base URL of a mirror")
    parser.add_argument("--out", type=Path, default=BAKED, help="the baked folder (default weights/baked)")
    parser.add_argument(
        "--warm", action="store_true", help="then run setup() once to fill the compile caches"
    )
    parser.add_argument("--clean", action="store_true", help="remove the baked folder (leave baked mode)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.clean:
        shutil.rmtree(args.out, ignore_errors=True)
        logger.info("removed %s: the next cog build has no baked weights", args.out)
        return 0
    sources = dataclasses.replace(Sources.from_env(), mirror=args.mirror or None)
    try:
        bake(args.model, args.out, sources)
    except WeightsError as e:
        logger.error("%s", e)
        return 1
    if args.warm:
        from engine.service import FluxService
        from engine.service.config import ServiceConfig

        config = dataclasses.replace(ServiceConfig.from_env(), model=args.model, baked_dir=args.out)
        FluxService.setup(config, gpu=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
