"""Test helpers for FLUX-level comparisons: a float pipeline, real transformer inputs, outputs."""

import torch
from diffusers import FluxPipeline


def float_pipe(model_dir) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_step_inputs(
    pipe: FluxPipeline, prompt: str, *, seed: int = 0, steps: int = 1, size: int = 256
) -> dict:
    """The transformer's keyword inputs at the first denoising step of a real prompt."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs) if not seen else None, with_kwargs=True
    )
    try:
        pipe(
            prompt,
            width=size,
            height=size,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        hook.remove()
    return {**seen[0], "return_dict": False}


def velocity(transformer, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def params_to_float(model):
    """Checkpoints keep the 16-bit remainder in its stored dtype; CPU tests run it in fp32."""
    for p in model.parameters():
        p.data = p.data.float()
    return model
