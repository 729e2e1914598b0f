"""The safety checker as Replicate's FLUX models run it (replicate/cog-flux, predict.py), when
its weights exist: the Stable Diffusion safety checker flags images, and an image it flags is
dropped only if a second opinion, Falconsai's ViT NSFW classifier (Falconsai/nsfw_image_detection),
does not call it "normal" (or fails). Without the classifier's weights the first opinion alone
decides, and setup says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.safety_input import check_processor, pixel_values

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = "nsfw_classifier"  # Falconsai/nsfw_image_detection, under the model folder
SAFE_LABEL = "normal"  # the classifier's labels: "normal", "nsfw"
# What Replicate's flux models say when every image of a prediction was dropped (cog-flux).
ALL_FLAGGED = "All generated images contained NSFW content. Try running it again with a different prompt."


class NSFWClassifier:
    """The second opinion: a ViT image classifier; an image is safe when its top label is "normal"."""

    def __init__(self, model, processor, device: torch.device) -> None:
        self.model, self.processor, self.device = model, processor, device

    @classmethod
    def load(
        cls, path: str | Path, device: torch.device, dtype: torch.dtype | None = None
    ) -> NSFWClassifier | None:
        """Load from ``path`` (config.json, model.safetensors, preprocessor_config.json); None if absent.

        Replicate runs it on the CPU in float32; here it sits beside the first checker (the GPU,
        float16 by default: 0.17 GB), since it only ever runs on images that checker flagged.
        """
        path = Path(path)
        if not (path / "config.json").exists() or not (path / "preprocessor_config.json").exists():
            return None
        from transformers import AutoModelForImageClassification, ViTImageProcessor

        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        model = AutoModelForImageClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        labels = {str(v).lower() for v in model.config.id2label.values()}
        if SAFE_LABEL not in labels:
            raise ValueError(f"{path}: the NSFW classifier's labels {sorted(labels)} have no {SAFE_LABEL!r}")
        processor = ViTImageProcessor.from_pretrained(path)
        check_processor(processor, str(path / "preprocessor_config.json"))
        logger.info("NSFW classifier loaded from %s (%s)", path, dtype)
        return cls(model, processor, device)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> NSFWClassifier:
        """The same classifier on another device (the small memory mode keeps it on the CPU in
        float32, where Replicate runs it: it only sees images the first checker flagged)."""
        return NSFWClassifier(self.model.to(device, dtype), self.processor, torch.device(device))

    @torch.inference_mode()
    def safe(self, images: torch.Tensor | list[Image.Image]) -> list[bool]:
        """One verdict per image (``[B, H, W, 3]`` uint8, any device, or PIL images): True when the
        top label is "normal". The input is prepared where the images are (engine.safety_input);
        only the 224x224 result moves to the classifier (the CPU, in the small memory mode)."""
        pixels = pixel_values(as_pixels(images, self.device), self.processor)
        logits = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).logits
        labels = self.model.config.id2label
        return [str(labels[int(i)]).lower() == SAFE_LABEL for i in logits.argmax(-1).tolist()]


class SafetyChecker:
    """CLIP image embeddings compared against concept embeddings; flags per image, each flag
    confirmed by the NSFW classifier when it is loaded."""

    def __init__(
        self, checker, processor, device: torch.device, classifier: NSFWClassifier | None = None
    ) -> None:
        self.checker, self.processor, self.device = checker, processor, device
        self.classifier = classifier

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
        check_processor(processor, str(model_dir / "feature_extractor" / "preprocessor_config.json"))
        logger.info("safety checker loaded from %s (%s)", model_dir / "safety_checker", dtype)
        classifier = NSFWClassifier.load(model_dir / CLASSIFIER_DIR, device, dtype)
        if classifier is None:
            logger.warning(
                "NSFW classifier not loaded (no weights under %s/%s): the safety checker's flags "
                "alone drop images, more often than Replicate's flux-schnell does",
                model_dir,
                CLASSIFIER_DIR,
            )
        return cls(checker, processor, device, classifier)

    @torch.inference_mode()
    def flags(self, images: torch.Tensor | list[Image.Image]) -> list[bool]:
        """One verdict per image: True when it is to be dropped as possibly NSFW.

        ``images``: ``[B, H, W, 3]`` uint8 (as ``FluxGenerator.generate_pixels`` leaves them on the
        GPU), or PIL images; the checker's input is prepared on the device (engine.safety_input).
        As Replicate's flux models: the safety checker flags; each flagged image goes to the
        classifier, and stays flagged unless the classifier calls it "normal"; if the classifier
        fails, it stays flagged.
        """
        images = as_pixels(images, self.device)
        clip_input = pixel_values(images, self.processor).to(self.device, self.checker.dtype)
        # The checker blacks out flagged entries of ``images`` and returns them; only its flags
        # are read here, so it gets placeholders (it used to get a float32 host copy per image).
        placeholders = [np.zeros(0, dtype=np.float32) for _ in range(len(images))]
        _, nsfw = self.checker(images=placeholders, clip_input=clip_input)
        flags = [bool(x) for x in nsfw]
        flagged = [i for i, f in enumerate(flags) if f]
        if self.classifier is None or not flagged:
            return flags
        try:
            safe = self.classifier.safe(images[flagged])  # [F, H, W, 3], where the images are
        except Exception:  # a failing second opinion confirms the first, as Replicate's does
            logger.exception("the NSFW classifier failed; the safety checker's flags stand")
            return flags
        for i, ok in zip(flagged, safe, strict=True):
            flags[i] = not ok
        return flags


def as_pixels(images: torch.Tensor | list[Image.Image], device: torch.device) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8: a tensor as it is (wherever it is), PIL images stacked onto ``device``."""
    if isinstance(images, torch.Tensor):
        return images
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images: one size per call, got {sorted({a.shape[1::-1] for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).to(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU (what Replicate's FLUX models run), float32 on a CPU (fp16 math is slow there)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
