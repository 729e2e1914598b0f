"""The Stable Diffusion safety checker, as Replicate's FLUX models run it, when its weights exist."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


class SafetyChecker:
    """CLIP image embeddings compared against concept embeddings; flags per image."""

    def __init__(self, checker, processor, device: torch.device) -> None:
        self.checker, self.processor, self.device = checker, processor, device

    @classmethod
    def load(
        cls, model_dir: str | Path, device: torch.device, dtype: torch.dtype | None = None
    ) -> SafetyChecker | None:
        """Load from ``model_dir/safety_checker`` and ``model_dir/feature_extractor``; None if absent.

        ``dtype`` defaults to float16 on a GPU (as Replicate's FLUX models run it: half the
        memory and time of fp32, same verdicts) and float32 on a CPU, where fp16 math is slow.
        """
        model_dir = Path(model_dir)
        if (
            not (model_dir / "safety_checker" / "config.json").exists()
            or not (model_dir / "feature_extractor" / "preprocessor_config.json").exists()
        ):
            logger.info("safety checker not loaded: no weights under %s/safety_checker", model_dir)
            return None
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        checker = StableDiffusionSafetyChecker.from_pretrained(model_dir / "safety_checker", dtype=dtype)
        checker = checker.to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(model_dir / "feature_extractor")
        logger.info("safety checker loaded from %s (%s)", model_dir / "safety_checker", dtype)
        return cls(checker, processor, device)

    @torch.inference_mode()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """One verdict per image: True when it is flagged as possibly NSFW."""
        clip_input = self.processor(images=images, return_tensors="pt").pixel_values
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
        _, nsfw = self.checker(images=arrays, clip_input=clip_input.to(self.device, self.checker.dtype))
        return [bool(x) for x in nsfw]


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU (what Replicate's FLUX models run), float32 on a CPU (fp16 math is slow there)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
