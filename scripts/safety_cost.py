"""Modelled cost of the safety check's second opinion (Falconsai's ViT NSFW classifier) on an A40.

Nothing here runs on a GPU: the FLOPs are counted by torch's FlopCounterMode on the models'
architectures built on the meta device (no weights), the preprocessing is timed on this CPU
(process time), and the GPU time is modelled from the A40's datasheet peaks
(scripts/kernel_model.py) with the stated assumptions. Usage: python scripts/safety_cost.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from perfmodel.devices import A40
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

MATH_FRACTION = 0.30  # of the fp16 tensor peak: GEMMs of 197 (x batch) rows, eager, no fusion
LAUNCH_US = 8.0  # CPU cost of one eager op launch (PyTorch eager + HF modules)


def count(model: torch.nn.Module, **inputs: torch.Tensor) -> tuple[int, int, int]:
    """(FLOPs, launches, parameters) of one forward on the meta device."""
    ops = 0

    def hook(*_: object) -> None:
        nonlocal ops
        ops += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    # A leaf module is about one kernel; attention's matmuls/softmax and the residual adds are
    # not modules: about 6 more per layer.
    layers = getattr(model.config, "num_hidden_layers", 0)
    return fc.get_total_flops(), ops + 6 * layers, sum(p.numel() for p in model.parameters())


def preprocess_ms(processor, size: int = 1024, repeat: int = 7) -> float:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    processor(images=[img], return_tensors="pt")
    times = []
    for _ in range(repeat):
        t = time.process_time()
        processor(images=[img], return_tensors="pt")
        times.append(time.process_time() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, ViTConfig, ViTForImageClassification, ViTImageProcessor

    with torch.device("meta"):
        vit = ViTForImageClassification(ViTConfig(num_labels=2)).eval()  # vit-base-patch16-224
        clip = CLIPConfig(
            vision_config={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
            },
            projection_dim=768,
        )
        sd = StableDiffusionSafetyChecker(clip).eval()  # CompVis' checker: CLIP ViT-L/14
    pixels = torch.empty(1, 3, 224, 224, device="meta")
    rows = []
    for name, model, inputs in (
        ("Falconsai ViT-B/16 (second opinion)", vit, {"pixel_values": pixels}),
        ("SD safety checker, CLIP ViT-L/14 tower", sd.vision_model, {"pixel_values": pixels}),
    ):
        flops, launches, params = count(model, **inputs)
        math_ms = flops / (MATH_FRACTION * A40["bf16_tflops"]) * 1e3
        weights_ms = 2 * params / A40["dram_bps"] * 1e3  # fp16 weights read once per call
        launch_ms = launches * LAUNCH_US / 1e3
        gpu_ms = max(math_ms, weights_ms) + launch_ms
        rows.append((name, params / 1e6, flops / 1e9, math_ms, weights_ms, launch_ms, gpu_ms))
    pre = preprocess_ms(ViTImageProcessor())
    print(
        f"A40 model: fp16 tensor peak {A40['bf16_tflops'] / 1e12:.1f} TFLOPS at {MATH_FRACTION:.0%}, "
        f"{A40['dram_bps'] / 1e9:.0f} GB/s, {LAUNCH_US:g} us per eager launch; one 224x224 image"
    )
    print("| model | params (M) | GFLOP | math ms | weights ms | launches ms | modelled GPU ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} |")
    print(f"ViT preprocessing of a 1024x1024 image on this CPU: {pre:.1f} ms (process time, median)")


if __name__ == "__main__":
    main()
