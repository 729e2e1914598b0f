"""The input domain of Replicate's flux-schnell: aspect ratios, megapixels, sizes, seeds.

Pure Python (no torch), so that predict.py can import the choices when Cog's schema tool
loads it without the engine's dependencies.
"""

from __future__ import annotations

SIZE_MULTIPLE = 16  # VAE factor 8 x the transformer's 2x2 latent packing
MIN_SIDE, MAX_SIDE = 128, 2048

# Width x height at 1 megapixel, as Replicate's flux-schnell serves them.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
MEGAPIXELS = ("1", "0.25")
MAX_SEED = 2**32 - 1  # seeds are 32-bit, as on Replicate; image i of a batch uses seed + i


def round_size(width: int, height: int) -> tuple[int, int]:
    """Round to the nearest multiple of 16; a side outside [128, 2048] is an error naming it."""
    out = []
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise ValueError(f"{name}={value} is outside the supported range [{MIN_SIDE}, {MAX_SIDE}]")
        out.append(max(MIN_SIDE, SIZE_MULTIPLE * round(value / SIZE_MULTIPLE)))
    return out[0], out[1]


def size_for(aspect_ratio: str, megapixels: str = "1") -> tuple[int, int]:
    """``(width, height)`` for an aspect ratio at 1 or 0.25 megapixels (half each side)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}; got {aspect_ratio!r}")
    if megapixels not in MEGAPIXELS:
        raise ValueError(f"megapixels must be one of {', '.join(MEGAPIXELS)}; got {megapixels!r}")
    w, h = ASPECT_RATIOS[aspect_ratio]
    if megapixels == "0.25":
        w, h = w // 2, h // 2
    return round_size(w, h)
