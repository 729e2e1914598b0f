"""The embedded model's world: scenes of one coloured shape on a coloured background.

One owner for what the trained tiny model knows (scripts/train_tiny_model.py trains on it; the
service logs it for prompts outside it; the tests check drawings against it): the vocabulary, the
caption grammar, a renderer, and the picture the caption asks for.

A scene is ``(size, colour, shape, position, background)``; its caption is

    "a {size} {colour} {shape} at the {position} on a {background} background"

Rendering is deterministic, so a caption names exactly one picture: the flow the model learns is
nearly straight and 1-4 Euler steps reach it.
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple

import torch

# RGB in [-1, 1] (the pipeline's image range before its final x/2 + 0.5).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, -0.8, -0.8),
    "green": (-0.75, 0.55, -0.75),
    "blue": (-0.8, -0.55, 0.9),
    "yellow": (0.9, 0.8, -0.85),
    "white": (0.95, 0.95, 0.95),
    "black": (-0.9, -0.9, -0.9),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.13, "large": 0.22}  # half-extent, as a fraction of the shorter side
# (row, column) of the cell centre, as fractions of the height and width.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 4, 1 / 4),
    "top": (1 / 4, 1 / 2),
    "top right": (1 / 4, 3 / 4),
    "left": (1 / 2, 1 / 4),
    "center": (1 / 2, 1 / 2),
    "right": (1 / 2, 3 / 4),
    "bottom left": (3 / 4, 1 / 4),
    "bottom": (3 / 4, 1 / 2),
    "bottom right": (3 / 4, 3 / 4),
}
# (colour, shape) pairs never shown in training: the steering tests ask for them.
HELD_OUT = frozenset({("green", "triangle"), ("yellow", "circle"), ("blue", "square"), ("red", "square")})
DEFAULT_PROMPT = "a large red circle at the top left on a blue background"
VOCABULARY = frozenset(
    {"a", "at", "the", "on", "background"}
    | set(COLOURS)
    | set(SHAPES)
    | set(SIZES)
    | {w for p in POSITIONS for w in p.split()}
)


class Scene(NamedTuple):
    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position} on a {self.background} background"


def all_scenes(*, held_out: bool | None = None) -> list[Scene]:
    """Every scene, in a fixed order; ``held_out`` True/False keeps only those (not) held out."""
    scenes = [
        Scene(size, colour, shape, pos, bg)
        for size, colour, shape, pos, bg in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS, COLOURS)
        if colour != bg
    ]
    if held_out is None:
        return scenes
    return [s for s in scenes if ((s.colour, s.shape) in HELD_OUT) == held_out]


_CAPTION = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) at the (?P<position>[\w ]+?) on a (?P<background>\w+) background$"
)


def parse(prompt: str) -> Scene | None:
    """The scene a prompt names, when it follows the caption grammar exactly."""
    m = _CAPTION.match(" ".join(prompt.lower().split()))
    if m is None:
        return None
    scene = Scene(**m.groupdict())
    ok = (
        scene.size in SIZES
        and scene.colour in COLOURS
        and scene.shape in SHAPES
        and scene.position in POSITIONS
        and scene.background in COLOURS
    )
    return scene if ok else None


def unknown_words(prompt: str) -> list[str]:
    """The prompt's words the embedded model never saw, in order, without repeats."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in VOCABULARY))


def shape_mask(
    scene: Scene, height: int, width: int, *, supersample: int = 4, scale: float = 1.0
) -> torch.Tensor:
    """[height, width] coverage of the shape (its extent times ``scale``) in [0, 1], anti-aliased
    by supersampling."""
    s = supersample
    ys = (torch.arange(height * s, dtype=torch.float32) + 0.5) / (height * s)
    xs = (torch.arange(width * s, dtype=torch.float32) + 0.5) / (width * s)
    cy, cx = POSITIONS[scene.position]
    r = SIZES[scene.size] * scale * min(height, width)
    # Offsets in pixels from the centre, so shapes keep their aspect on non-square images.
    dy = (ys[:, None] - cy) * height
    dx = (xs[None, :] - cx) * width
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif scene.shape == "square":
        inside = (dx.abs() <= r) & (dy.abs() <= r)
    else:  # an upright isosceles triangle in the same box
        inside = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    return inside.float().reshape(height, s, width, s).mean(dim=(1, 3))


def render(scene: Scene, height: int, width: int) -> torch.Tensor:
    """[3, height, width] RGB in [-1, 1]."""
    mask = shape_mask(scene, height, width)
    fg = torch.tensor(COLOURS[scene.colour])[:, None, None]
    bg = torch.tensor(COLOURS[scene.background])[:, None, None]
    return bg + (fg - bg) * mask


def vocabulary_note(prompt: str) -> str | None:
    """The log line for a prompt the embedded model was not trained on: words it never saw, or its
    words in another form than its captions' (None for one of its captions)."""
    unknown = unknown_words(prompt)
    if not unknown:
        if parse(prompt) is not None:
            return None
        return f"the embedded tiny model knows these words only in its captions' form: it draws {describe()}"
    shown = ", ".join(repr(w) for w in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
    return f"the embedded tiny model never saw {shown}: it draws {describe()}"


def describe() -> str:
    """One line saying what the embedded model can draw."""
    return (
        f'one shape on a plain background, captioned "a <size> <colour> <shape> at the <position> on a '
        f'<colour> background": sizes {", ".join(SIZES)}; colours {", ".join(COLOURS)}; shapes '
        f"{', '.join(SHAPES)}; positions {', '.join(POSITIONS)}"
    )


def nearest_colour(rgb: torch.Tensor) -> str:
    """The palette colour closest to an RGB triple in [-1, 1]."""
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    return names[int((palette - rgb.reshape(1, 3)).pow(2).sum(1).argmin())]


def check(image: torch.Tensor, scene: Scene) -> dict[str, str]:
    """What a drawing of ``scene`` shows where the caption puts things: ``shape`` is the colour
    nearest the mean of the shape's core (the pixels mostly inside the inner half of its extent), ``background`` the
    colour nearest the mean of the pixels well outside it. ``image`` is [3, H, W] in [-1, 1]."""
    _, h, w = image.shape
    core = shape_mask(scene, h, w, scale=0.5) > 0.5
    if not core.any():  # a picture too small for the core to cover half a pixel: its centre pixel
        cy, cx = POSITIONS[scene.position]
        core[min(int(cy * h), h - 1), min(int(cx * w), w - 1)] = True
    # well outside: beyond the largest shape's box grown by a margin of a tenth of the short side
    cy, cx = POSITIONS[scene.position]
    r = (SIZES["large"] + 0.1) * min(h, w)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 - cy * h
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 - cx * w
    outside = (ys.abs() > r) | (xs.abs() > r)
    pixels = image.reshape(3, -1)
    return {
        "shape": nearest_colour(pixels[:, core.reshape(-1)].mean(1)),
        "background": nearest_colour(pixels[:, outside.reshape(-1)].mean(1)),
    }
