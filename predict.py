"""Cog predictor: FLUX.1-schnell with SVDQuant W4A4, Replicate's flux-schnell inputs.

Thin by design: inputs are declared here, the work is in engine/service.py. The engine is
imported in setup(), not at module level, so that Cog's schema tools (cog 0.16's, which imports
this file) can load it without torch installed.

predict() is async and cog.yaml gives the server two slots (concurrency.max), while every
prediction runs on one thread through engine.serial.SerialRunner, one at a time, in order:
coglet frees a slot only after it has answered, so with one slot a client that sends its next
request at once could be refused with 409 (docs/architecture.md, "Back-to-back requests").
"""

import logging
import os

from cog import BasePredictor, Input, Path

# The API's choices and descriptions, as literals. `cog build` (Cog 0.23) never imports this file:
# it parses it with tree-sitter and keeps only what it can read statically: choices as a list
# literal or a module-level name bound to one, bounds (ge/le/max_length) as number literals
# written in the Input() call (no max_length here: coglet's 422 would echo the whole value; the
# engine checks lengths and says field, length and limit), defaults and descriptions as plain literals or such names. Any
# other form stops the build (choices) or is dropped without a word. engine/inputs.py owns every
# value; tests/test_cog_static_schema.py parses this file by Cog's rules and checks each literal
# against it and the resulting schema against .cog/openapi_schema.json.
ASPECT_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
MEGAPIXELS = ["1", "0.25"]
OUTPUT_FORMATS = ["webp", "jpg", "png"]
PROMPT = "Prompt for the generated image (at most 10,000 characters)"
SEED = "Random seed for reproducible generation; leave blank for a random one (it is logged). Any integer; it is taken mod 2^32."
GO_FAST = "Run the compiled transformer (torch.compile) on a GPU; results stay deterministic for a given seed. No effect on CPU."
LORA_WEIGHTS = "LoRA to apply: a .safetensors or .tar URL, a Hugging Face URL or 'owner/repo[/file]', a civitai model or download URL, or a data: URL; diffusers, kohya, ComfyUI or XLabs format. At most 8,192 characters (a data: URL: up to the download cap). Empty: none."


class Predictor(BasePredictor):
    def setup(self) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
        )
        # Idle OpenMP workers sleep instead of spinning. libgomp reads this when torch loads (just
        # below); with one long-lived prediction thread its spinning worker took the CPU share the
        # thread itself needed on a busy 2-core machine (predictions 3-10x slower, measured).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from cog import CancelationException  # not at module level: cog 0.16's schema tool lacks it

        from engine.serial import SerialRunner
        from engine.service import FluxService

        # One thread for setup and every prediction; a cancel raises coglet's exception in it.
        self.gpu = SerialRunner(cancel_exception=CancelationException, name="gpu")
        self.service = self.gpu.call(FluxService.setup)
        # Signal handlers can only be installed from the main thread, which this is: output
        # folders are removed when coglet stops the worker with SIGTERM.
        self.service.outputs.remove_on_sigterm()
        self.admitted = max(1, int(os.environ.get("COG_MAX_CONCURRENCY", "1")))  # predictions at once
        if self.admitted < 2:
            logging.getLogger(__name__).warning(
                "COG_MAX_CONCURRENCY is below 2: a request sent right after another's answer "
                "can be refused with 409 (cog.yaml sets concurrency.max: 2; scripts/serve.sh passes it)"
            )

    async def predict(
        self,
        prompt: str = Input(description=PROMPT),
        aspect_ratio: str = Input(
            description="Aspect ratio of the output image", choices=ASPECT_RATIOS, default="1:1"
        ),
        num_outputs: int = Input(description="Number of images to generate", ge=1, le=4, default=1),
        num_inference_steps: int = Input(
            description="Number of denoising steps; 4 is recommended, fewer is faster and rougher",
            ge=1,
            le=4,
            default=4,
        ),
        seed: int | None = Input(description=SEED, default=None),
        output_format: str = Input(
            description="Format of the output images", choices=OUTPUT_FORMATS, default="webp"
        ),
        output_quality: int = Input(
            description="Quality when saving webp or jpg, 0 to 100; ignored for png", ge=0, le=100, default=80
        ),
        disable_safety_checker: bool = Input(
            description="Disable the safety checker for generated images", default=False
        ),
        go_fast: bool = Input(description=GO_FAST, default=True),
        megapixels: str = Input(
            description="Approximate number of megapixels of the output", choices=MEGAPIXELS, default="1"
        ),
        lora_weights: str | None = Input(description=LORA_WEIGHTS, default=None),
        lora_scale: float = Input(description="How strongly the LoRA applies", ge=-1, le=3, default=1.0),
        extra_lora: str | None = Input(
            description="A second LoRA, applied together with lora_weights (same forms and limits). Empty: none.",
            default=None,
        ),
        extra_lora_scale: float = Input(
            description="How strongly the extra LoRA applies", ge=-1, le=3, default=1.0
        ),
    ) -> list[Path]:
        from engine import coglet_folders

        coglet_folders.prune(keep=self.admitted)  # coglet 0.23.1 never removes a prediction's folder
        if self.gpu.busy():
            logging.getLogger(__name__).info("waiting for the GPU: another prediction is running")
        paths = await self.gpu.run(
            self.service.predict,
            prompt=prompt,
            aspect_ratio=aspect_ratio,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            go_fast=go_fast,
            megapixels=megapixels,
            lora_weights=lora_weights,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
        )
        return [Path(p) for p in paths]
