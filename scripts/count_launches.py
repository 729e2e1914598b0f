"""Count the operations one denoising step launches, per transformer block (issue 16's measure).

    python scripts/count_launches.py [--json PATH]
    python scripts/count_launches.py --full-size [--json PATH]

Default: runs the tiny FLUX model (same block structure as FLUX.1-schnell; the count of
operations per block does not depend on the width) on the CPU once, under a dispatch mode that
records every operator call that is not a view: in eager mode on a GPU each is one kernel launch
(each of our custom ops counts once, whatever its backend runs inside). Calls are attributed to
the block they run in; everything outside the blocks is "outside". Full-size figures follow by
multiplying by FLUX.1-schnell's 19 double and 38 single blocks.

``--full-size``: the same count on FLUX.1-schnell's real widths (one double and one single
block, bf16, a 1024x1024 image: 4096 image + 512 text tokens) on the meta device, nothing
computed, for both checkpoint layouts: version 1 (diffusers' blocks, separate q/k/v, the
layout before issue 16) and version 2 (fused blocks). Each launch's bytes are the sizes of the
tensors it reads and writes: a model of its DRAM traffic (each input read once, each output
written once; caches ignored), turned into time at the A40's and H100's DRAM bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

FLUX_SCHNELL_BLOCKS = {"transformer_blocks": 19, "single_transformer_blocks": 38}


# Our ops that belong to a quantized linear (the rest of "svdq." is fused glue: qk_norm_rope, ...).
LINEAR_OPS = ("svdq.quantize_act", "svdq.quantize_act_prologue", "svdq.w4a4_gemm", "svdq.w4a16_gemv")
DRAM_BYTES_PER_S = {"A40": 0.696e12, "H100 SXM": 3.35e12}  # datasheet peaks


def _tensor_bytes(tree: object) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


class LaunchCounter(TorchDispatchMode):
    """Counts non-view operator calls and the bytes they read and write, keyed by the running block."""

    def __init__(self) -> None:
        super().__init__()
        self.where = "outside"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.counts[self.where][str(func.overloadpacket)] += 1
            self.bytes[self.where] += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        return out


def count_step(transformer: torch.nn.Module, inputs: dict) -> LaunchCounter:
    """Operator calls (``.counts``) and bytes (``.bytes``) of one forward, per block instance
    ("transformer_blocks.0", ...)."""
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
    return counter


def summary(counter: LaunchCounter) -> dict:
    """Per block kind: launches and bytes per block (and how many launches are quantized-linear
    ops), full-size totals."""
    counts, out = counter.counts, {}
    for kind, n_full in FLUX_SCHNELL_BLOCKS.items():
        names = [name for name in counts if name.startswith(kind + ".")]
        per_block = sum(sum(counts[n].values()) for n in names) / len(names)
        linear = sum(v for n in names for op, v in counts[n].items() if op in LINEAR_OPS) / len(names)
        out[kind] = {
            "per_block": per_block,
            "svdq_ops_per_block": linear,
            "full_size": per_block * n_full,
            "bytes_per_block": sum(counter.bytes[n] for n in names) / len(names),
            "ops": dict(sum((counts[n] for n in names), collections.Counter())),
        }
    outside = sum(counts["outside"].values())
    out["outside"] = outside
    out["full_size_per_step"] = outside + sum(out[k]["full_size"] for k in FLUX_SCHNELL_BLOCKS)
    return out


def full_size_transformer(
    version: int, rank: int = 32, *, layers: tuple[int, int] = (1, 1), config: dict | None = None
) -> torch.nn.Module:
    """FLUX.1-schnell's widths with ``layers`` (double, single) blocks, quantized, on the meta device.

    Built by the checkpoint loader's own skeleton from a file description (metadata + tensor
    shapes) of checkpoint format ``version``, so the modules are exactly the ones a real file
    gives; by default one block of each kind (counts per block do not depend on the number;
    scripts/memory_report.py asks for all 19 + 38). ``config``: another transformer config
    (the tiny model's, for scripts/gpu_session.py's CPU run); FLUX.1-schnell's by default.
    """
    from diffusers import FluxTransformer2DModel

    from engine.flux import checkpoint
    from engine.flux.blocks import fuse_projections
    from engine.flux.layers import Treatment, split_sizes, target_layers
    from engine.flux.model import SVDQFluxTransformer2DModel
    from engine.quant import SVDQConfig

    config = dict(config or FLUX_SCHNELL_CONFIG, num_layers=layers[0], num_single_layers=layers[1])
    with torch.device("meta"):
        probe = FluxTransformer2DModel.from_config(config)
    if version >= 2:
        fuse_projections(probe)
    shapes: dict[str, tuple[int, ...]] = {}
    unsigned = []
    for name, treatment in target_layers(probe).items():
        if treatment is Treatment.W4A16:
            shapes.update({f"{name}.wzeros": (), f"{name}.bias": ()})
            continue
        parts = (
            [f"{name}.parts.{i}" for i in range(len(split_sizes(probe, name)))]
            if (treatment is Treatment.W4A4_SPLIT)
            else [name]
        )
        for i, part in enumerate(parts):
            shapes[f"{part}.proj_down"] = (rank,)
            shapes[f"{part}.bias"] = ()
            if treatment is Treatment.W4A4_UNSIGNED or (treatment is Treatment.W4A4_SPLIT and i == 1):
                unsigned.append(part)
    metadata = checkpoint.make_metadata(SVDQConfig(rank=rank), config, unsigned)
    metadata["format_version"] = str(version)
    model = checkpoint._skeleton(
        metadata, shapes, Path(f"<FLUX.1-schnell v{version}>"), SVDQFluxTransformer2DModel
    )
    return model.to(torch.bfloat16).eval()


# FLUX.1-schnell's transformer config (black-forest-labs/FLUX.1-schnell, transformer/config.json).
FLUX_SCHNELL_CONFIG = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


def full_size_inputs(width: int = 1024, height: int = 1024, text_tokens: int = 512) -> dict:
    """One denoising step's transformer inputs for a ``width`` x ``height`` image, on meta."""
    tokens = (width // 16) * (height // 16)
    meta = {"device": "meta", "dtype": torch.bfloat16}
    return {
        "hidden_states": torch.empty(1, tokens, 64, **meta),
        "encoder_hidden_states": torch.empty(1, text_tokens, 4096, **meta),
        "pooled_projections": torch.empty(1, 768, **meta),
        "timestep": torch.empty(1, **meta),
        "img_ids": torch.empty(tokens, 3, **meta),
        "txt_ids": torch.empty(text_tokens, 3, **meta),
        "return_dict": False,
    }


@torch.library.custom_op("count_launches::flash_attention", mutates_args=())
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("counted on the meta device only")


@_flash_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


@contextlib.contextmanager
def _attention_as_one_launch():
    """SDPA as one launch reading q, k, v and writing the output, as a flash kernel does on a GPU
    (on meta tensors PyTorch would take its math path, which writes the score matrix)."""
    sdpa = F.scaled_dot_product_attention

    def flash(query, key, value, *args, **kwargs):
        return _flash_attention(query, key, value)

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def full_size_report() -> dict:
    """Launches and modelled DRAM bytes per block and per step, checkpoint v1 vs v2, full size."""
    report = {}
    for version in (1, 2):
        with _attention_as_one_launch():
            result = summary(count_step(full_size_transformer(version), full_size_inputs()))
        step_bytes = sum(result[k]["bytes_per_block"] * n for k, n in FLUX_SCHNELL_BLOCKS.items())
        result["block_bytes_per_step"] = step_bytes
        result["modelled_dram_ms_per_step"] = {d: 1e3 * step_bytes / bw for d, bw in DRAM_BYTES_PER_S.items()}
        report[f"v{version}"] = result
    return report


def main() -> None:
    from engine.tiny_model import CHECKPOINT_NAME, make_tiny_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--model", type=Path, default=None, help="a tiny model folder (made in a temp dir if absent)"
    )
    p.add_argument("--full-size", action="store_true", help="FLUX.1-schnell widths on meta, v1 vs v2 layout")
    args = p.parse_args()
    if args.full_size:
        report = full_size_report()
        for version, r in report.items():
            for kind in FLUX_SCHNELL_BLOCKS:
                print(
                    f"{version} {kind}: {r[kind]['per_block']:.0f} launches, "
                    f"{r[kind]['bytes_per_block'] / 1e6:.0f} MB per block"
                )
            dram = ", ".join(f"{d} {ms:.0f} ms" for d, ms in r["modelled_dram_ms_per_step"].items())
            print(
                f"{version} one step: {r['full_size_per_step']:.0f} launches, "
                f"{r['block_bytes_per_step'] / 1e9:.1f} GB in the blocks (modelled DRAM time: {dram})"
            )
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return
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
