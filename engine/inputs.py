"""The input domain of the API, in one place: every bound, choice and default, and its checks.

Replicate's flux-schnell inputs (aspect ratios, megapixels, sizes, counts, formats), its LoRA
models' inputs (lora_scale, extra_lora_scale), the prompt cap, the defaults and the seed mapping.
engine.service checks with the functions below. predict.py restates these values as literals,
since `cog build` reads it without importing it (only literals survive its static parse); a test
(tests/test_cog_static_schema.py) parses predict.py as cog does and asserts every literal equals
the value here. Pure Python (no torch).
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
NUM_OUTPUTS = (1, 4)
NUM_INFERENCE_STEPS = (1, 4)
DEFAULT_STEPS = 4
# Every optional input's default (None: absent, or a random seed), as predict.py and
# FluxService.predict declare them.
DEFAULTS: dict[str, object] = {
    "aspect_ratio": "1:1",
    "num_outputs": 1,
    "num_inference_steps": DEFAULT_STEPS,
    "seed": None,
    "output_format": "webp",
    "output_quality": 80,
    "disable_safety_checker": False,
    "go_fast": True,
    "megapixels": "1",
    "lora_weights": None,
    "lora_scale": 1.0,
    "extra_lora": None,
    "extra_lora_scale": 1.0,
}
OUTPUT_FORMATS = ("webp", "jpg", "png")
OUTPUT_QUALITY = (0, 100)
LORA_SCALE = (-1.0, 3.0)  # lora_scale and extra_lora_scale, as on Replicate's flux LoRA models
# The text encoders read at most a few hundred tokens (T5: 512 at most, about 2,000 characters
# of English); 10,000 characters leave room for any real prompt while a 1 MB one is refused
# before any work (tokenizing it took 16-35 s and about 400 MB).
MAX_PROMPT_CHARS = 10_000
# A LoRA source other than a data: URL (a URL, a hub reference): real ones are a few hundred
# characters (a presigned URL about 2,000); 8,192 is the request-line bound most servers keep.
# data: URLs are bounded by the LoRA download cap instead (engine.lora.store, in bytes).
MAX_LORA_SOURCE_CHARS = 8192
# Both bounds are checked here, not by Cog's schema (no ``max_length`` in predict.py): coglet
# 0.23.1's 422 for a schema violation echoes the whole value (docs/architecture.md, "coglet
# 0.23.1 bugs"), while these errors give the field, the length and the limit only.
# Seeds: any integer is accepted, as on Replicate, and mapped onto 32 bits by ``seed mod 2^32``
# (0..2^32-1 unchanged, -1 -> 2^32-1). Image i of a batch uses the mapped seed + i.
SEED_MODULUS = 2**32
MAX_SEED = SEED_MODULUS - 1


def as_int(name: str, value: object) -> int:
    """An integer input; a float with no fractional part counts (JSON's 7.0 is the integer 7,
    and Cog's schema lets it through)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def in_range(name: str, value: object, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return value


def int_in_range(name: str, value: object, bounds: tuple[int, int]) -> int:
    return int(in_range(name, as_int(name, value), bounds))


def one_of(name: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_length(name: str, value: object, limit: int, why: str = "") -> str:
    """A string of at most ``limit`` characters; the error names the field, the length and the
    limit, never the value (which may be megabytes long, or hold what should not be echoed)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value):,} characters; the limit is {limit:,}{why}")
    return value


def check_prompt(prompt: object) -> str:
    return check_length(
        "prompt", prompt, MAX_PROMPT_CHARS, " (the text encoders read only the first few hundred tokens)"
    )


def check_lora_source(name: str, value: object) -> str | None:
    """A ``lora_weights``/``extra_lora`` value: None, a data: URL (bounded in bytes by the LoRA
    store's download cap), or anything else of at most MAX_LORA_SOURCE_CHARS characters."""
    if value is None:
        return None
    if isinstance(value, str) and value.lstrip().startswith("data:"):
        return value
    return check_length(
        name, value, MAX_LORA_SOURCE_CHARS, " (a data: URL is bounded by the download cap instead)"
    )


def seed_from(value: object) -> int:
    """Any integer seed -> ``value mod 2^32`` (the range Replicate's seeds live in)."""
    return as_int("seed", value) % SEED_MODULUS


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
    one_of("aspect_ratio", aspect_ratio, list(ASPECT_RATIOS))
    one_of("megapixels", megapixels, MEGAPIXELS)
    w, h = ASPECT_RATIOS[aspect_ratio]
    if megapixels == "0.25":
        w, h = w // 2, h // 2
    return round_size(w, h)


def served_sizes() -> list[tuple[int, int]]:
    """Every ``(width, height)`` a request can ask for (aspect ratio x megapixels: 22)."""
    return sorted({size_for(ar, mp) for mp in MEGAPIXELS for ar in ASPECT_RATIOS})
