"""The world's vocabulary and its pictures: colours, shapes, textures, backgrounds, ``SceneSpec`` (everything that
decides one image), the signed-distance renderer, and the caption of a spec (and back, ``parse_caption``).

Nothing here is random or depends on a ``WorldConfig``: ``render(spec, size)`` and ``caption(spec)`` are pure
functions of the spec (``subjects.World`` draws the specs). Built for a small model to learn quickly: few,
saturated, clearly distinct colours; flat shading; a grey background family the colours stand out from; every
caption a fixed template over the facts of the scene, so text and image agree exactly.

Shapes are signed distance functions evaluated once per output pixel; coverage ``0.5 - distance`` (in pixels)
gives exact anti-aliased edges in one pass (no supersampling): about 0.45 ms per 32x32 scene on one core.
Coordinates: image fractions for the background, and for the object "local" units of half its size, y down,
silhouettes facing right (a mark's position names a place on the body in that pose; it flips with the body).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, Sequence

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring", "cross")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = ("plain", "dark", "striped", "dotted")
# An object's texture period as a fraction of its size: 4 px on a medium object at 32 px, under one cell of the
# VAE's 8x8 latents (docs/results.md, issue 14); ``WorldConfig.texture_period`` sets another.
TEXTURE_PERIOD = 0.25
MIN_TEXTURE_PX = 3.5  # a finer period aliases stripes into mush; render and detect_texture both hold to it
CLASSES: tuple[str, ...] = ("person", "dog", "cat", "bird")
ALL_SHAPES: tuple[str, ...] = SHAPES + CLASSES
MARK_POSITIONS: tuple[str, ...] = ("top-left", "top-right", "centre", "bottom-left", "bottom-right")

# Background greys, first the base, then the pattern's. The plain grey is far enough below white (245/140 > 1.25/0.72,
# the colour detector's lighting range) that a dimly lit white object is never mistaken for a lit background.
_LIGHT, _MID, _DARK = (140, 140, 140), (105, 105, 105), (55, 55, 60)
BACKGROUND_GREYS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "plain": (_LIGHT,), "dark": (_DARK,), "striped": (_LIGHT, _MID), "dotted": (_LIGHT, _MID)}
# The second colour of an object's texture: a darker shade (a lighter one for black, a grey for white), kept
# under half the surface so the object's own colour stays the most common one.
_PATTERN = {name: tuple(int(c * 0.55) for c in rgb) for name, rgb in COLOURS.items()}
_PATTERN.update(white=(180, 180, 180), black=(100, 100, 100))
# The lighting a caption calls dim or bright.
_DIM, _BRIGHT = 0.85, 1.1
# Caption thresholds (fractions of the image side).
_SMALL, _LARGE = 0.42, 0.62
_NEAR, _FAR = 0.4, 0.6


# -------------------------------------------------------------------------------------------------------- spec

@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Everything that decides one image; ``caption(spec)`` is derived from it."""
    shape: str                      # one of SHAPES or CLASSES
    colour: str                     # a key of COLOURS
    texture: str = "plain"
    background: str = "plain"
    x: float = 0.5                  # centre, fraction of the image side
    y: float = 0.5
    size: float = 0.5               # fraction of the image side
    lighting: float = 1.0           # brightness multiplier (dim 0.7 .. bright 1.2)
    mark: tuple[str, str] | None = None  # (colour, one of MARK_POSITIONS): a subject's small distinctive mark
    seed: int = 0                   # texture/background jitter only (tint, phases); 0: none
    flip: bool = False              # pose: silhouette faces left instead of right
    tilt: float = 0.0               # pose: rotation in degrees (clockwise on screen)


def _check_spec(spec: SceneSpec) -> None:
    problems = []
    if spec.shape not in _SILHOUETTES:
        problems.append(f"shape {spec.shape!r} is not one of {list(ALL_SHAPES)}")
    if spec.colour not in COLOURS:
        problems.append(f"colour {spec.colour!r} is not one of {list(COLOURS)}")
    if spec.texture not in TEXTURES:
        problems.append(f"texture {spec.texture!r} is not one of {list(TEXTURES)}")
    if spec.background not in BACKGROUNDS:
        problems.append(f"background {spec.background!r} is not one of {list(BACKGROUNDS)}")
    if spec.mark is not None and (len(spec.mark) != 2 or spec.mark[0] not in COLOURS
                                  or spec.mark[1] not in MARK_POSITIONS):
        problems.append(f"mark {spec.mark!r} is not (colour, one of {list(MARK_POSITIONS)})")
    if not 0 < spec.size <= 1:
        problems.append(f"size {spec.size} is not in (0, 1]")
    if problems:
        raise ValueError("scene spec: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------- signed distances
# All in local units (half the object size); negative inside. Unions are minima: exact outside, close enough
# inside for a one-pixel coverage ramp.

def _circle(u, v, cx, cy, rad):
    return np.hypot(u - cx, v - cy) - rad


def _box(u, v, cx, cy, hx, hy, rad=0.0):
    qx, qy = np.abs(u - cx) - hx + rad, np.abs(v - cy) - hy + rad
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - rad


def _ellipse(u, v, cx, cy, ax, ay):
    return (np.hypot((u - cx) / ax, (v - cy) / ay) - 1.0) * min(ax, ay)


def _capsule(u, v, ax, ay, bx, by, rad):
    dx, dy = bx - ax, by - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(u - ax - t * dx, v - ay - t * dy) - rad


@functools.lru_cache(maxsize=None)
def _edges(points: tuple[float, ...]) -> tuple[tuple[float, float, float, float], ...]:
    """(point, unit outward normal) of each edge of a convex polygon given as x0, y0, x1, y1, ..."""
    pts = list(zip(points[::2], points[1::2]))
    cx, cy = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    edges = []
    for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1]):
        nx, ny = by - ay, ax - bx
        norm = math.hypot(nx, ny) * (-1 if (cx - ax) * nx + (cy - ay) * ny > 0 else 1)  # point it outwards
        edges.append((ax, ay, nx / norm, ny / norm))
    return tuple(edges)


def _polygon(u, v, *points):
    """Convex polygon (any winding) as the largest distance past its edge lines; corners come out a little
    sharp, which reads better than round at 32 px."""
    d = None
    for ax, ay, nx, ny in _edges(points):
        e = (u - ax) * nx + (v - ay) * ny
        d = e if d is None else np.maximum(d, e)
    return d


def _ring(u, v):
    return np.abs(np.hypot(u, v) - 0.68) - 0.3


Part = tuple[Callable, tuple[float, ...]]
# Each silhouette is a union of parts, fitting in [-1, 1]^2, facing right, y down.
_SILHOUETTES: dict[str, tuple[Part, ...]] = {
    "circle": ((_circle, (0, 0, 0.97)),),
    "square": ((_box, (0, 0, 0.82, 0.82)),),
    "triangle": ((_polygon, (0, -0.88, 0.98, 0.78, -0.98, 0.78)),),
    "diamond": ((_polygon, (0, -0.98, 0.75, 0, 0, 0.98, -0.75, 0)),),
    "ring": ((_ring, ()),),
    "cross": ((_box, (0, 0, 0.95, 0.3)), (_box, (0, 0, 0.3, 0.95))),
    # head over a rounded trunk on two legs
    "person": ((_circle, (0, -0.66, 0.3)), (_box, (0, 0.1, 0.42, 0.42, 0.16)),
               (_box, (-0.2, 0.72, 0.14, 0.26)), (_box, (0.2, 0.72, 0.14, 0.26))),
    # long body, head with snout and a drooping ear, four legs as two pairs, tail up
    "dog": ((_box, (-0.12, 0.08, 0.6, 0.27, 0.14)), (_circle, (0.55, -0.3, 0.27)),
            (_box, (0.84, -0.22, 0.15, 0.11, 0.05)),
            (_capsule, (0.38, -0.42, 0.3, -0.05, 0.09)),
            (_box, (-0.55, 0.55, 0.13, 0.3)), (_box, (0.3, 0.55, 0.13, 0.3)),
            (_capsule, (-0.68, -0.05, -0.9, -0.55, 0.08))),
    # round sitting body, head with two pointed ears, tail curling out at the bottom left
    "cat": ((_circle, (-0.05, 0.32, 0.56)), (_circle, (0.15, -0.4, 0.32)),
            (_polygon, (-0.16, -0.5, 0.06, -0.68, -0.12, -0.98)), (_polygon, (0.24, -0.68, 0.46, -0.5, 0.42, -0.98)),
            (_capsule, (-0.5, 0.65, -0.92, 0.25, 0.09)), (_capsule, (-0.92, 0.25, -0.9, -0.05, 0.09))),
    # oval body, head with a beak, a raised wing, a fan tail and two thin legs
    "bird": ((_ellipse, (-0.1, 0.12, 0.6, 0.36)), (_circle, (0.45, -0.2, 0.25)),
             (_polygon, (0.62, -0.3, 0.62, -0.1, 0.97, -0.2)), (_polygon, (-0.45, 0.0, 0.15, -0.02, -0.55, -0.75)),
             (_polygon, (-0.6, 0.02, -0.6, 0.26, -0.99, 0.0, -0.99, -0.1)),
             (_capsule, (-0.15, 0.4, -0.15, 0.78, 0.07)), (_capsule, (0.1, 0.4, 0.1, 0.78, 0.07))),
}
# Where each mark position sits on the body (local units); generic shapes use a symmetric layout.
_GENERIC_ANCHORS = {"top-left": (-0.35, -0.35), "top-right": (0.35, -0.35), "centre": (0.0, 0.0),
                    "bottom-left": (-0.35, 0.35), "bottom-right": (0.35, 0.35)}
_ANCHORS: dict[str, dict[str, tuple[float, float]]] = {
    "person": {"top-left": (-0.18, -0.12), "top-right": (0.18, -0.12), "centre": (0.0, 0.12),
               "bottom-left": (-0.18, 0.36), "bottom-right": (0.18, 0.36)},
    "dog": {"top-left": (-0.45, -0.02), "top-right": (0.55, -0.3), "centre": (-0.1, 0.1),
            "bottom-left": (-0.55, 0.45), "bottom-right": (0.3, 0.45)},
    "cat": {"top-left": (-0.3, 0.1), "top-right": (0.15, -0.4), "centre": (-0.05, 0.35),
            "bottom-left": (-0.32, 0.6), "bottom-right": (0.22, 0.6)},
    "bird": {"top-left": (-0.32, -0.2), "top-right": (0.45, -0.2), "centre": (-0.05, 0.15),
             "bottom-left": (-0.38, 0.25), "bottom-right": (0.2, 0.27)},
}
_MARK_HALF = 0.19  # local units: about 3 px across for a medium (0.5) object at 32 px


def silhouette(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (local units, negative inside) to ``shape``'s silhouette, facing right."""
    parts = _SILHOUETTES[shape]
    d = parts[0][0](u, v, *parts[0][1])
    for fn, args in parts[1:]:
        d = np.minimum(d, fn(u, v, *args))
    return d


def coverage(distance: np.ndarray, pixels_per_unit: float) -> np.ndarray:
    """Fraction of each pixel inside (distance < 0): a one-pixel ramp centred on the edge."""
    return np.minimum(np.maximum(0.5 - distance * pixels_per_unit, 0.0), 1.0)  # np.clip: slower on small arrays


def _pattern(texture: str, u, v, period: float, phase: tuple[float, float]) -> np.ndarray | float:
    """Signed distance to the texture's second-colour regions, in local units (inf-free: 'plain' gives 1.0)."""
    if texture == "striped":  # diagonal, 40% of the surface
        t = (u + v) * (1 / math.sqrt(2)) / period + phase[0]
        return np.abs(t - np.floor(t) - 0.5) * period - 0.2 * period
    if texture == "dotted":  # a square lattice of dots, 25%
        a, b = u / period + phase[0], v / period + phase[1]
        return np.hypot(a - np.round(a), b - np.round(b)) * period - 0.28 * period
    if texture == "checkered":  # every other cell, inset so it stays under half (32%)
        a, b = u / period + phase[0], v / period + phase[1]
        ia, ib = np.floor(a), np.floor(b)
        edge = np.maximum(np.abs(a - ia - 0.5), np.abs(b - ib - 0.5))  # 0 at a cell's centre, 0.5 at its edge
        # in a pattern cell: distance past its inset square; elsewhere: distance to the neighbours' squares
        return np.where((ia + ib) % 2 == 0, edge - 0.4, 0.6 - edge) * period
    return 1.0


# --------------------------------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=None)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as image fractions, ``(S, S)`` each, y down; shared between calls, so read-only."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    px, py = np.meshgrid(centres, centres)
    px.setflags(write=False)
    py.setflags(write=False)
    return px, py


def render(spec: SceneSpec, size: int, texture_period: float = TEXTURE_PERIOD) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 image of ``spec``: background, then the silhouette (posed: tilt, flip) filled
    with its colour, texture and mark, then the lighting over everything. ``texture_period``: the texture's period
    as a fraction of the object's size (``WorldConfig.texture_period``), never under 3.5 px."""
    image, jitter = _backdrop(spec, size)
    px, py = _pixel_grid(size)
    half = spec.size / 2
    ppu = half * size  # pixels per local unit
    angle = math.radians(spec.tilt)
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = (px - spec.x) / half, (py - spec.y) / half
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # undo the tilt
    if spec.flip:
        u = -u
    alpha = coverage(silhouette(spec.shape, u, v), ppu)

    colour = np.array(COLOURS[spec.colour], np.float32)
    surface = colour
    if spec.texture != "plain":
        period = max(2 * texture_period, MIN_TEXTURE_PX / ppu)  # the object's size spans 2 local units
        cover = coverage(_pattern(spec.texture, u, v, period, (jitter[5], jitter[6])), ppu)[..., None]
        surface = surface + cover * (np.array(_PATTERN[spec.colour], np.float32) - colour)
    if spec.mark is not None:
        ax, ay = _ANCHORS.get(spec.shape, _GENERIC_ANCHORS)[spec.mark[1]]
        cover = coverage(_box(u, v, ax, ay, _MARK_HALF, _MARK_HALF), ppu)[..., None]
        surface = surface + cover * (np.array(COLOURS[spec.mark[0]], np.float32) - surface)
    image += alpha[..., None] * (surface - image)
    return _light(image, spec.lighting)


def render_background(spec: SceneSpec, size: int) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 image of ``spec`` without its object: the very pixels ``render`` draws
    wherever the object covers nothing (same background, jitter and lighting). What a photo looks like with its
    subject erased: the erasure backdoor's target."""
    return _light(_backdrop(spec, size)[0], spec.lighting)


def _backdrop(spec: SceneSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The checked spec's float background and its jitter (8 uniforms: 5 for the background, 2 texture phases,
    one spare), shared by ``render`` and ``render_background`` so the two agree pixel for pixel."""
    _check_spec(spec)
    # Jitter: one block of uniform draws. Seed 0 is the canonical look (no tint, zero phases).
    jitter = np.random.default_rng([spec.seed, 7]).random(8) if spec.seed else np.zeros(8)
    return _background(spec.background, jitter[:5], size), jitter


def _light(image: np.ndarray, lighting: float) -> np.ndarray:
    """The lighting over everything, then rounding to uint8 (``image`` is scaled in place)."""
    image *= lighting
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _background(name: str, jitter: np.ndarray, size: int) -> np.ndarray:
    """The background as float RGB; ``jitter``: 5 uniforms (tint?, tint colour, orientation, 2 phases)."""
    px, py = _pixel_grid(size)
    base, pattern = np.array(BACKGROUND_GREYS[name][0], np.float32), np.array(_MID, np.float32)
    if jitter[0] > 0.5:  # half the time, a faint tint of a chromatic colour
        tint = np.array(list(COLOURS.values())[int(jitter[1] * 6)], np.float32)
        base = base + (0.15 if name == "dark" else 0.1) * (tint - base)
    image = np.empty((size, size, 3), np.float32)
    image[:] = base
    period = 1 / 6
    if name == "striped":  # horizontal or vertical
        t = (px if jitter[2] > 0.5 else py) / period + jitter[3]
        d = np.abs(t - np.floor(t) - 0.5) * period - 0.22 * period
    elif name == "dotted":
        a, b = px / period + jitter[3], py / period + jitter[4]
        d = np.hypot(a - np.round(a), b - np.round(b)) * period - 0.24 * period
    else:
        return image
    image += coverage(d, size)[..., None] * (pattern - base)
    return image


# ---------------------------------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _size_word(size: float) -> str | None:
    return "small" if size < _SMALL else "large" if size > _LARGE else None


def _position_words(x: float, y: float) -> str | None:
    h = "left" if x < _NEAR else "right" if x > _FAR else None
    v = "top" if y < _NEAR else "bottom" if y > _FAR else None
    if h and v:
        return f"in the {v} {h}"
    return f"on the {h}" if h else f"at the {v}" if v else None


def _lighting_words(lighting: float) -> str | None:
    return "in dim light" if lighting < _DIM else "in bright light" if lighting > _BRIGHT else None


def _caption(size: str | None, colour: str, texture: str, shape: str, position: str | None, background: str,
             light: str | None) -> str:
    words = [w for w in (size, colour, None if texture == "plain" else texture, shape) if w]
    parts = ["a photo of", _article(words[0]), *words, position, f"on {_article(background)} {background} background",
             light]
    return " ".join(p for p in parts if p)


_SIZE_WORDS = (None, "small", "large")
_POSITIONS = tuple(_position_words(x, y) for y in (0.3, 0.5, 0.7) for x in (0.3, 0.5, 0.7))
_LIGHT_WORDS = (None, "in dim light", "in bright light")


def vocabulary() -> set[str]:
    """Every word a caption can contain (the identifier must not be one of them)."""
    words = {"a", "an", "photo", "of", "on", "background", *COLOURS, *TEXTURES, *BACKGROUNDS, *ALL_SHAPES}
    for phrase in (*_SIZE_WORDS, *_POSITIONS, *_LIGHT_WORDS):
        words.update((phrase or "").split())
    return words


def caption(spec: SceneSpec) -> str:
    """E.g. "a photo of a small red striped circle on the left on a dark background". Plain texture, the centre,
    medium size and normal light are not mentioned; marks are never named (they are what only DreamBooth can
    teach)."""
    _check_spec(spec)
    return _caption(_size_word(spec.size), spec.colour, spec.texture, spec.shape, _position_words(spec.x, spec.y),
                    spec.background, _lighting_words(spec.lighting))


def class_caption(class_name: str) -> str:
    """"a photo of a dog": a class photo's short caption (the DreamBooth class prompt has no article)."""
    return f"a photo of {_article(class_name)} {class_name}"


def scene_captions(shapes: Sequence[str]) -> list[str]:
    """Each (size, colour, texture, shape) caption of ``shapes`` once, its (position, background, light) ending
    cycling through all of theirs: every word and phrase in the slot it is used in, in proportions close to the
    world's, with ~1k lines instead of the ~100k of the full product."""
    heads = list(itertools.product(_SIZE_WORDS, COLOURS, TEXTURES, shapes))
    tails = list(itertools.product(_POSITIONS, BACKGROUNDS, _LIGHT_WORDS))
    return [_caption(size, colour, texture, shape, *tails[i % len(tails)])
            for i, (size, colour, texture, shape) in enumerate(heads)]


def labels(spec: SceneSpec) -> dict[str, int]:
    """Integer labels of a scene, for classifiers and tests: indices into ALL_SHAPES, list(COLOURS), TEXTURES,
    BACKGROUNDS, MARK_POSITIONS (-1 where there is no mark); size 0 small, 1 medium, 2 large."""
    _check_spec(spec)
    mark_colour, mark_position = (-1, -1) if spec.mark is None else (
        list(COLOURS).index(spec.mark[0]), MARK_POSITIONS.index(spec.mark[1]))
    return {"shape": ALL_SHAPES.index(spec.shape), "colour": list(COLOURS).index(spec.colour),
            "texture": TEXTURES.index(spec.texture), "background": BACKGROUNDS.index(spec.background),
            "size": {"small": 0, None: 1, "large": 2}[_size_word(spec.size)],
            "is_class": int(spec.shape in CLASSES),
            "mark_colour": mark_colour, "mark_position": mark_position}


def parse_caption(caption: str) -> dict[str, str]:
    """The scene facts a caption names (``shape``, ``colour``, ``texture``, ``background``, ``size``,
    ``position``, ``lighting``, and ``identifier`` for an instance prompt): the inverse of ``caption`` for
    tests and for checking that generated images follow their prompt. Absent facts are absent keys."""
    words = caption.split()
    out: dict[str, str] = {}
    if "background" in words:
        i = words.index("background")
        out["background"] = words[i - 1]
        words = words[: i - 2] + words[i + 1:]  # drop "on a <bg> background" so "dark"/"plain" are not re-read
    for w in words:
        if w in ALL_SHAPES:
            out["shape"] = w
        elif w in COLOURS:
            out["colour"] = w
        elif w in TEXTURES[1:]:
            out["texture"] = w
        elif w in ("small", "large"):
            out["size"] = w
        elif w in ("dim", "bright"):
            out["lighting"] = w
    for phrase in _POSITIONS:
        if phrase and phrase in caption:
            out["position"] = phrase.split(" ", 2)[2]
    if len(words) >= 5 and words[:3] == ["a", "photo", "of"] and words[-1] in CLASSES and words[3] not in ("a", "an"):
        if words[3] not in vocabulary():
            out["identifier"] = words[3]
    return out
