"""Procedural toy scenes for the toy backbone, the demo and tests: one coloured shape on a grey background.

A scene is 96x96 px (a 3x3 token grid for the toy Qwen3-VL after 2x2 merging, so the five positions line up with
tokens), drawn from 6 colours x 5 shapes x 5 positions = 150 combinations with small jitter (position, size,
rotation, colours). Every scene has an explicit caption ("a red triangle in the top left") and a knowledge caption
that names colour and shape only through facts the backbone learns from text ("the shape with three corners and the
colour of blood in the top left"), a KARR-Bench-style query in miniature.

Everything is a pure function of a seed, so anyone can regenerate the same images. The evaluation split is fixed:
``heldout_scenes()`` draws one scene per combination from ``HELDOUT_SEED``, a stream no training code uses
(training streams start at ``TRAIN_SEED``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import product

from PIL import Image, ImageDraw

SIZE = 96
HELDOUT_SEED = 1_000_003
TRAIN_SEED = 0

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Shape centres in pixels: the four quadrants and the middle of a 96 px canvas.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (24, 24),
    "top right": (72, 24),
    "bottom left": (24, 72),
    "bottom right": (72, 72),
    "centre": (48, 48),
}

# The facts the backbone learns from text-only lines; knowledge captions use only the right-hand sides.
COLOUR_FACTS: dict[str, str] = {
    "red": "the colour of blood",
    "green": "the colour of grass",
    "blue": "the colour of the sky",
    "yellow": "the colour of a banana",
    "white": "the colour of snow",
    "black": "the colour of coal",
}
SHAPE_FACTS: dict[str, str] = {
    "circle": "the shape with no corners",
    "square": "the shape with four equal sides",
    "triangle": "the shape with three corners",
    "star": "the shape with five points",
    "cross": "the shape with two crossing bars",
}


@dataclass(frozen=True)
class Scene:
    """One drawn scene and its two descriptions."""

    colour: str
    shape: str
    position: str
    image: Image.Image

    @property
    def combination(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.position

    @property
    def caption(self) -> str:
        return explicit_caption(self.colour, self.shape, self.position)

    @property
    def knowledge_caption(self) -> str:
        return knowledge_caption(self.colour, self.shape, self.position)


def combinations() -> list[tuple[str, str, str]]:
    """All 150 (colour, shape, position) combinations in a fixed order."""
    return list(product(COLOURS, SHAPES, POSITIONS))


def explicit_caption(colour: str, shape: str, position: str) -> str:
    """What the backbone says about a scene: ``"a red triangle in the top left"``."""
    return f"a {colour} {shape} in the {position}"


def knowledge_caption(colour: str, shape: str, position: str) -> str:
    """The same scene described through facts only: ``"the shape with three corners and the colour of blood in the
    top left"``."""
    return f"{SHAPE_FACTS[shape]} and {COLOUR_FACTS[colour]} in the {position}"


def fact_lines() -> list[str]:
    """Text-only knowledge, both directions (``"a triangle is the shape with three corners"`` and back)."""
    lines = []
    for shape, fact in SHAPE_FACTS.items():
        lines += [f"a {shape} is {fact}", f"{fact} is a {shape}"]
    for colour, fact in COLOUR_FACTS.items():
        lines += [f"{colour} is {fact}", f"{fact} is {colour}"]
    return lines


def vocabulary() -> list[str]:
    """Every word the toy texts use (captions, knowledge captions, facts, the rewrite instruction), sorted."""
    words: set[str] = {"describe"}
    for colour, shape, position in combinations():
        words.update(explicit_caption(colour, shape, position).split())
        words.update(knowledge_caption(colour, shape, position).split())
    for line in fact_lines():
        words.update(line.split())
    return sorted(words)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _polygon(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(rotation + i * step), cy + r * math.sin(rotation + i * step))
            for i, r in enumerate(radii)]


def draw_scene(colour: str, shape: str, position: str, rng: random.Random) -> Image.Image:
    """Draw one scene; ``rng`` decides the jitter (background shade, offset, size, rotation, colour)."""
    grey = rng.randint(105, 150)
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    x0, y0 = POSITIONS[position]
    cx, cy = x0 + rng.uniform(-4, 4), y0 + rng.uniform(-4, 4)
    r = rng.uniform(12.5, 16)  # half-size: shapes are 25-32 px wide, about 2x2 patches of 16 px
    fill = _jitter(COLOURS[colour], rng, 12)
    tilt = rng.uniform(-0.2, 0.2)  # small rotation (radians) so shapes are not pixel-identical
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.3] * 4, math.pi / 4 + tilt), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, [r * 1.2] * 3, -math.pi / 2 + tilt), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.25, r * 0.5] * 5, -math.pi / 2 + tilt), fill=fill)
    elif shape == "cross":
        bar = r * 0.38
        for angle in (tilt, tilt + math.pi / 2):
            c, s = math.cos(angle), math.sin(angle)
            corners = [(-r, -bar), (r, -bar), (r, bar), (-r, bar)]
            draw.polygon([(cx + u * c - v * s, cy + u * s + v * c) for u, v in corners], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    return image


def random_scene(rng: random.Random) -> Scene:
    """A scene with a uniformly random combination."""
    colour, shape, position = rng.choice(combinations())
    return Scene(colour, shape, position, draw_scene(colour, shape, position, rng))


def scene_for(combination: tuple[str, str, str], rng: random.Random) -> Scene:
    """A fresh drawing of a given combination."""
    return Scene(*combination, draw_scene(*combination, rng))


def heldout_scenes(seed: int = HELDOUT_SEED) -> list[Scene]:
    """The fixed evaluation split: one fresh scene per combination (150), so every caption names one image."""
    rng = random.Random(seed)
    return [scene_for(c, rng) for c in combinations()]
