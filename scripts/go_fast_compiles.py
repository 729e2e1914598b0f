"""Count the graphs go_fast compiles over every input combination, on the tiny model, on CPU.

Calls the transformer directly with the shapes the pipeline gives it for each of the 88
aspect ratio x megapixels x num_outputs combinations (then again with LoRAs of two ranks
set), and reports how many graphs each strategy compiles and how long the compiles took:

    python scripts/go_fast_compiles.py --backend aot_eager --strategy dynamic
    python scripts/go_fast_compiles.py --backend aot_eager --strategy static

``dynamic`` is what go_fast serves; ``static`` is one graph per shape (torch.compile
dynamic=False) with the recompile limit raised, for comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from engine.go_fast import CompileSettings, GoFast, configure_compiler, shape_label, transformer_inputs
from engine.inputs import ASPECT_RATIOS, MEGAPIXELS, size_for
from engine.modules import SVDQLinear, W4A16Linear


def set_lora(transformer, rank: int | None) -> None:
    """Give every quantized layer a random LoRA of ``rank`` (None: remove them)."""
    g = torch.Generator().manual_seed(rank or 0)
    for m in transformer.modules():
        if isinstance(m, SVDQLinear | W4A16Linear):
            m.clear_loras()
            if rank:
                down = torch.randn(rank, m.in_features, generator=g) * 0.01
                m.add_lora("probe", down, torch.randn(m.out_features, rank, generator=g) * 0.01)


def combos() -> list[tuple[int, int, int]]:
    return [(*size_for(ar, mp), n) for mp in MEGAPIXELS for ar in ASPECT_RATIOS for n in range(1, 5)]


def run(transformer, settings: CompileSettings, lora_ranks: tuple[int, ...]) -> dict:
    configure_compiler(settings)
    fast = GoFast(transformer, settings)
    order = [(1024, 1024, 1)] + [c for c in combos() if c != (1024, 1024, 1)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rank in (None, *lora_ranks):
            set_lora(transformer, rank)
            for w, h, n in order:
                with fast.track(shape_label(w, h, n, transformer)):
                    fast.compiled(**transformer_inputs(transformer, w, h, n))
    set_lora(transformer, None)
    return {
        "backend": settings.backend,
        "dynamic": settings.dynamic,
        "calls": len(order) * (1 + len(lora_ranks)),
        "graphs": fast.graphs,
        "compile_seconds": [round(r.seconds, 2) for r in fast.records],
        "compiled_for": [r.shape for r in fast.records],
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="aot_eager", help="aot_eager | inductor | eager")
    p.add_argument("--strategy", choices=["dynamic", "static"], default="dynamic")
    p.add_argument("--lora-ranks", default="16,64", help="LoRA ranks to try after the base model")
    p.add_argument("--model-dir", type=Path, help="tiny model folder (made in a temp dir if absent)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from engine.flux import load_transformer
    from engine.tiny_model import CHECKPOINT_NAME, make_tiny_model

    model_dir = args.model_dir
    if model_dir is None or not (model_dir / CHECKPOINT_NAME).exists():
        import tempfile

        model_dir = make_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-")) / "model")
    transformer = load_transformer(model_dir / CHECKPOINT_NAME)
    for param in transformer.parameters():  # as FluxGenerator does on a CPU
        param.data = param.data.float()
    settings = CompileSettings(
        backend=args.backend, mode=None, dynamic=args.strategy == "dynamic", recompile_limit=256
    )
    ranks = tuple(int(r) for r in args.lora_ranks.split(",") if r)
    print(json.dumps(run(transformer, settings, ranks), indent=1))


if __name__ == "__main__":
    main()
