"""Count the operations one denoising step launches, per transformer block (issue 16's baseline).

    python scripts/count_launches.py [--json PATH]

Runs the tiny FLUX model (same block structure as FLUX.1-schnell; the count of operations per
block does not depend on the width) on the CPU once, under a dispatch mode that records every
operator call that is not a view: in eager mode on a GPU each is one kernel launch (our two
custom ops each count once, whatever their backend runs inside). Calls are attributed to the
block they run in; everything outside the blocks is "outside". Full-size figures follow by
multiplying by FLUX.1-schnell's 19 double and 38 single blocks.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FLUX_SCHNELL_BLOCKS = {"transformer_blocks": 19, "single_transformer_blocks": 38}


class LaunchCounter(TorchDispatchMode):
    """Counts non-view operator calls, keyed by the block that is running."""

    def __init__(self) -> None:
        super().__init__()
        self.where = "outside"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[self.where][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(transformer: torch.nn.Module, inputs: dict) -> dict[str, collections.Counter]:
    """Operator calls of one forward, per block instance ("transformer_blocks.0", ...)."""
    counter = LaunchCounter()
    hooks = []
    for kind in FLUX_SCHNELL_BLOCKS:
        for i, block in enumerate(getattr(transformer, kind)):
            name = f"{kind}.{i}"
            hooks.append(
                block.register_forward_pre_hook(lambda m, a, name=name: setattr(counter, "where", name))
            )
            hooks.append(block.register_forward_hook(lambda m, a, o: setattr(counter, "where", "outside")))
    try:
        with torch.no_grad(), counter:
            transformer(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return counter.counts


def summary(counts: dict[str, collections.Counter]) -> dict:
    """Per block kind: launches per block (and how many are our quantized ops), full-size totals."""
    out = {}
    for kind, n_full in FLUX_SCHNELL_BLOCKS.items():
        blocks = [c for name, c in counts.items() if name.startswith(kind + ".")]
        per_block = sum(sum(c.values()) for c in blocks) / len(blocks)
        svdq = sum(v for c in blocks for op, v in c.items() if op.startswith("svdq.")) / len(blocks)
        out[kind] = {"per_block": per_block, "svdq_ops_per_block": svdq, "full_size": per_block * n_full}
    outside = sum(counts["outside"].values())
    out["outside"] = outside
    out["full_size_per_step"] = outside + sum(out[k]["full_size"] for k in FLUX_SCHNELL_BLOCKS)
    return out


def main() -> None:
    from engine.tiny_model import CHECKPOINT_NAME, make_tiny_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--model", type=Path, default=None, help="a tiny model folder (made in a temp dir if absent)"
    )
    args = p.parse_args()
    import tempfile

    from engine.flux import load_transformer
    from engine.pipeline import FluxGenerator

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or make_tiny_model(Path(tmp) / "tiny")
        gen = FluxGenerator.from_pretrained(folder, folder / CHECKPOINT_NAME)
        seen = []
        hook = gen.pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw) if not seen else None, with_kwargs=True
        )
        gen.generate("a fox", width=256, height=256, steps=1, seed=0)
        hook.remove()
        transformer = load_transformer(folder / CHECKPOINT_NAME)
        result = summary(count_step(transformer, {**seen[0], "return_dict": False}))
    for kind in FLUX_SCHNELL_BLOCKS:
        r = result[kind]
        print(
            f"{kind}: {r['per_block']:.0f} launches per block ({r['svdq_ops_per_block']:.0f} of them our "
            f"quantize_act/w4a4_gemm), x{FLUX_SCHNELL_BLOCKS[kind]} = {r['full_size']:.0f}"
        )
    print(f"outside the blocks: {result['outside']}; one full-size step: {result['full_size_per_step']:.0f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
