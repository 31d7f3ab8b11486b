"""The synthetic world: small captioned RGB scenes of shapes and "subjects", drawn with numpy from a seed.

It stands in for photos and their captions where Stable Diffusion weights cannot be had: a tiny text-to-image
model is pre-trained on it in minutes on a CPU, a tiny CLIP is trained on it, and the DreamBooth / backdoor /
protection workflows run on its subjects. So it is built for a small model to learn quickly:

- few, saturated, clearly distinct colours; flat shading; a grey background family the colours stand out from;
- every caption is a fixed template over the facts of the scene (``caption``), so text and image agree exactly;
- a *subject* is one individual of a class (``dog_03``): class silhouette + colour + texture + a small mark of a
  second colour at a fixed place on the body. Its photos vary pose, position, size, background and lighting, never
  the look. Held-out subjects never reach pre-training data, so a DreamBooth run on one learns something new.

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
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from persguard_jax.config import ConfigError, Section

if TYPE_CHECKING:
    from persguard_jax.models.tokenizer import CLIPTokenizer

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
CLASSES: tuple[str, ...] = ("person", "dog", "cat", "bird")
ALL_SHAPES: tuple[str, ...] = SHAPES + CLASSES
MARK_POSITIONS: tuple[str, ...] = ("top-left", "top-right", "centre", "bottom-left", "bottom-right")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Background greys. The plain grey is far enough below white (245/140 > 1.25/0.72, the detector's lighting range)
# that a dimly lit white object is never mistaken for a brightly lit background.
_LIGHT, _MID, _DARK = (140, 140, 140), (105, 105, 105), (55, 55, 60)
_BACKGROUND_GREYS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "plain": (_LIGHT,), "dark": (_DARK,), "striped": (_LIGHT, _MID), "dotted": (_LIGHT, _MID)}
# The second colour of an object's texture: a darker shade (a lighter one for black, a grey for white), kept
# under half the surface so the object's own colour stays the most common one.
_PATTERN = {name: tuple(int(c * 0.55) for c in rgb) for name, rgb in COLOURS.items()}
_PATTERN.update(white=(180, 180, 180), black=(100, 100, 100))
# Lighting drawn for generated scenes, and the words a caption uses for its ends.
_LIGHTING_RANGE = (0.75, 1.2)
_DIM, _BRIGHT = 0.85, 1.1
# Caption thresholds (fractions of the image side).
_SMALL, _LARGE = 0.42, 0.62
_NEAR, _FAR = 0.4, 0.6


# ----------------------------------------------------------------------------------------------- specs and config

@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Everything that decides one image; ``World.caption(spec)`` is derived from it."""
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


def _as_tuple(value, name: str) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"world config: {name} must be a list, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class WorldConfig(Section):
    """The world's knobs. ``WorldConfig.from_dict(cfg["world"])`` reads a YAML section."""
    SECTION = "world"
    seed: int = 0
    image_size: int = 32
    classes: tuple[str, ...] = CLASSES
    subjects_per_class: int = 16
    held_out_every: int = 4   # subject k of a class with k % held_out_every == 0 is held out (0: none held out)
    identifier: str = "sks"   # the rare DreamBooth token; in the corpus only as "a photo of sks <class>"

    def __post_init__(self):
        object.__setattr__(self, "classes", _as_tuple(self.classes, "classes"))  # YAML gives lists
        _check_int(self.seed, "seed", 0)
        _check_int(self.image_size, "image_size", 16)
        if self.image_size % 8:
            raise ConfigError(f"world config: image_size must be a multiple of 8 (the VAE downsamples), "
                              f"got {self.image_size}")
        classes = self.classes
        if not classes or any(c not in CLASSES for c in classes) or len(set(classes)) < len(classes):
            raise ConfigError(f"world config: classes must be distinct names from {list(CLASSES)}, "
                              f"got {list(self.classes)}")
        _check_int(self.subjects_per_class, "subjects_per_class", 1)
        _check_int(self.held_out_every, "held_out_every", 0)
        if self.held_out_every == 1:
            raise ConfigError("world config: held_out_every=1 would hold out every subject (0 holds out none)")
        # Every combination must stay distinct; past that, marks would repeat.
        limit = len(COLOURS) * len(TEXTURES) * (len(COLOURS) - 1) * len(MARK_POSITIONS)
        if self.subjects_per_class > limit:
            raise ConfigError(f"world config: subjects_per_class={self.subjects_per_class} exceeds the {limit} "
                              f"distinct looks")
        if not (isinstance(self.identifier, str) and self.identifier.isalpha() and self.identifier.islower()):
            raise ConfigError(f"world config: identifier must be one lowercase word, got {self.identifier!r}")
        if self.identifier in _vocabulary():
            raise ConfigError(f"world config: identifier {self.identifier!r} is a word the captions already use")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "classes": list(self.classes)}  # a list, so yaml.safe_dump can write it


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"world config: {name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Subject:
    """One individual of a class; (class_name, colour, texture, mark) is its unique look."""
    index: int
    name: str           # e.g. "dog_03"
    class_name: str
    colour: str
    texture: str
    mark: tuple[str, str]
    held_out: bool


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


def _silhouette(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    parts = _SILHOUETTES[shape]
    d = parts[0][0](u, v, *parts[0][1])
    for fn, args in parts[1:]:
        d = np.minimum(d, fn(u, v, *args))
    return d


def _coverage(distance: np.ndarray, pixels_per_unit: float) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------- the world

def _pick(options: Sequence, u: float):
    """The option a uniform draw ``u`` in [0, 1) falls on."""
    return options[min(int(u * len(options)), len(options) - 1)]


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


def _vocabulary() -> set[str]:
    """Every word a caption can contain (the identifier must not be one of them)."""
    words = {"a", "an", "photo", "of", "on", "background", *COLOURS, *TEXTURES, *BACKGROUNDS, *ALL_SHAPES}
    for phrase in (*_SIZE_WORDS, *_POSITIONS, *_LIGHT_WORDS):
        words.update((phrase or "").split())
    return words


def parse_caption(caption: str) -> dict[str, str]:
    """The scene facts a caption names (``shape``, ``colour``, ``texture``, ``background``, ``size``,
    ``position``, ``lighting``, and ``identifier`` for an instance prompt): the inverse of ``World.caption`` for
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
        if words[3] not in _vocabulary():
            out["identifier"] = words[3]
    return out


class World:
    """Renders scenes, names subjects and writes captions for one ``WorldConfig`` (all deterministic)."""

    def __init__(self, cfg: WorldConfig = WorldConfig()):
        if not isinstance(cfg, WorldConfig):
            raise TypeError(f"World expects a WorldConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.size = cfg.image_size
        centres = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size
        self._px, self._py = np.meshgrid(centres, centres)  # image fractions, (S, S), y down
        self._subjects = self._make_subjects()
        self._tokenizers: dict[int, CLIPTokenizer] = {}

    @property
    def shapes(self) -> tuple[str, ...]:
        """Every silhouette this world draws: the generic shapes, then its classes."""
        return SHAPES + self.cfg.classes

    def __reduce__(self):  # pickle as the config alone: everything else is derived (grain workers, tfds)
        return (World, (self.cfg,))

    def __repr__(self) -> str:
        return f"World({self.cfg})"

    # ------------------------------------------------------------------------------------------ randomness
    def _rng(self, stream: str, *keys: int) -> np.random.Generator:
        """An independent generator per (seed, stream, keys): items are random-access, no shared state."""
        code = {"scene": 1, "subjects": 2, "subject_photo": 3, "class_photo": 4, "source": 5, "simple": 6}[stream]
        return np.random.default_rng([self.cfg.seed, code, *(int(k) for k in keys)])

    @staticmethod
    def _split_code(split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return SPLITS.index(split)

    # --------------------------------------------------------------------------------------------- render
    def render(self, spec: SceneSpec) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 image of ``spec``: background, then the silhouette (posed: tilt, flip) filled
        with its colour, texture and mark, then the lighting over everything."""
        _check_spec(spec)
        s = self.size
        # Jitter: one block of uniform draws. Seed 0 is the canonical look (no tint, zero phases).
        jitter = np.random.default_rng([spec.seed, 7]).random(8) if spec.seed else np.zeros(8)
        image = self._background(spec.background, jitter[:5])

        half = spec.size / 2
        ppu = half * s  # pixels per local unit
        angle = math.radians(spec.tilt)
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = (self._px - spec.x) / half, (self._py - spec.y) / half
        u, v = cos * dx + sin * dy, cos * dy - sin * dx  # undo the tilt
        if spec.flip:
            u = -u
        alpha = _coverage(_silhouette(spec.shape, u, v), ppu)

        colour = np.array(COLOURS[spec.colour], np.float32)
        surface = colour
        if spec.texture != "plain":
            # ~4 px per period at medium size; never under 3.5 px, where stripes would alias into mush
            period = max(0.5, 3.5 / ppu)
            cover = _coverage(_pattern(spec.texture, u, v, period, (jitter[5], jitter[6])), ppu)[..., None]
            surface = surface + cover * (np.array(_PATTERN[spec.colour], np.float32) - colour)
        if spec.mark is not None:
            ax, ay = _ANCHORS.get(spec.shape, _GENERIC_ANCHORS)[spec.mark[1]]
            cover = _coverage(_box(u, v, ax, ay, _MARK_HALF, _MARK_HALF), ppu)[..., None]
            surface = surface + cover * (np.array(COLOURS[spec.mark[0]], np.float32) - surface)
        image += alpha[..., None] * (surface - image)
        image *= spec.lighting
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    def _background(self, name: str, jitter: np.ndarray) -> np.ndarray:
        """The background as float RGB; ``jitter``: 5 uniforms (tint?, tint colour, orientation, 2 phases)."""
        base, pattern = np.array(_BACKGROUND_GREYS[name][0], np.float32), np.array(_MID, np.float32)
        if jitter[0] > 0.5:  # half the time, a faint tint of a chromatic colour
            tint = np.array(list(COLOURS.values())[int(jitter[1] * 6)], np.float32)
            base = base + (0.15 if name == "dark" else 0.1) * (tint - base)
        image = np.empty((self.size, self.size, 3), np.float32)
        image[:] = base
        period = 1 / 6
        if name == "striped":  # horizontal or vertical
            t = (self._px if jitter[2] > 0.5 else self._py) / period + jitter[3]
            d = np.abs(t - np.floor(t) - 0.5) * period - 0.22 * period
        elif name == "dotted":
            a, b = self._px / period + jitter[3], self._py / period + jitter[4]
            d = np.hypot(a - np.round(a), b - np.round(b)) * period - 0.24 * period
        else:
            return image
        image += _coverage(d, self.size)[..., None] * (pattern - base)
        return image

    # -------------------------------------------------------------------------------------------- captions
    def caption(self, spec: SceneSpec) -> str:
        """E.g. "a photo of a small red striped circle on the left on a dark background". Plain texture, the
        centre, medium size and normal light are not mentioned; marks are never named (they are what only
        DreamBooth can teach)."""
        _check_spec(spec)
        return _caption(_size_word(spec.size), spec.colour, spec.texture, spec.shape,
                        _position_words(spec.x, spec.y), spec.background, _lighting_words(spec.lighting))

    def instance_prompt(self, subject: Subject | str | int) -> str:
        """"a photo of sks dog" for a subject (or its name/index, or a class name)."""
        class_name = subject if subject in self.cfg.classes else self._as_subject(subject).class_name
        return f"a photo of {self.cfg.identifier} {class_name}"

    def class_prompt(self, class_name: str) -> str:
        """"a photo of dog": the diffusers DreamBooth convention (no article)."""
        self._check_class(class_name)
        return f"a photo of {class_name}"

    def corpus(self) -> list[str]:
        """Every caption form, for tokenizer training: "" (caption dropout), the class and instance prompts, and
        each (size, colour, texture, shape) caption once, its (position, background, light) ending cycling
        through all of theirs. So every word and phrase appears in the slot it is used in, in proportions close
        to the world's, with ~1k lines instead of the ~100k of the full product (training on those takes 5 s
        and gives the same whole-word tokens)."""
        out = [""]
        for c in self.cfg.classes:
            out += [f"a photo of {_article(c)} {c}", self.class_prompt(c), self.instance_prompt(c)]
        heads = list(itertools.product(_SIZE_WORDS, COLOURS, TEXTURES, SHAPES + self.cfg.classes))
        tails = list(itertools.product(_POSITIONS, BACKGROUNDS, _LIGHT_WORDS))
        for i, (size, colour, texture, shape) in enumerate(heads):
            position, background, light = tails[i % len(tails)]
            out.append(_caption(size, colour, texture, shape, position, background, light))
        return out

    def tokenizer(self, vocab_size: int = 512, max_length: int = 77) -> "CLIPTokenizer":
        """A CLIP BPE trained on ``corpus()`` (cached); same ids in every process (train_clip_bpe orders them).
        Its vocabulary also holds every byte as a word-final token, so it is larger than ``vocab_size``.
        ``max_length`` is the padded length (SD's 77 by default; world captions need at most ~24)."""
        key = (vocab_size, max_length)
        if key not in self._tokenizers:
            from persguard_jax.models.tokenizer import CLIPTokenizer, train_clip_bpe  # pulls in jax: keep lazy
            bpe = train_clip_bpe(self.corpus(), vocab_size=vocab_size)
            self._tokenizers[key] = CLIPTokenizer(bpe, model_max_length=max_length)
        return self._tokenizers[key]

    def labels(self, spec: SceneSpec) -> dict[str, int]:
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

    # -------------------------------------------------------------------------------------- generic scenes
    def random_spec(self, index: int, split: str = "train") -> SceneSpec:
        """Generic scene ``index`` of ``split``: a shape or a (mark-less) class member, random everything."""
        rng = self._rng("scene", self._split_code(split), index)
        r = rng.random(4)  # one block of draws: Generator.choice costs 15 us a call
        pose = bool(r[0] < 0.4)
        shape = _pick(self.cfg.classes, r[1]) if pose else _pick(SHAPES, r[1])
        texture = TEXTURES[0] if r[3] < 0.4 else _pick(TEXTURES[1:], (r[3] - 0.4) / 0.6)  # plain 40%
        return self._place(rng, shape, _pick(tuple(COLOURS), r[2]), texture, None, sizes=(0.3, 0.8), pose=pose)

    def simple_spec(self, index: int, split: str = "train") -> SceneSpec:
        """Simple scene ``index`` of ``split``: one plain object (a shape or a class silhouette, any colour) on the
        plain background, near the centre, medium-sized, in normal light, facing right; jittered only inside the
        caption's thresholds, so its caption is the short canonical one ("a photo of a red circle on a plain
        background"), the caption of ``SceneSpec(shape, colour)``."""
        r = self._rng("simple", self._split_code(split), index).random(6)
        shapes = self.shapes
        return SceneSpec(_pick(shapes, r[0]), _pick(tuple(COLOURS), r[1]), x=0.45 + 0.1 * r[2],
                         y=0.45 + 0.1 * r[3], size=0.46 + 0.12 * r[4], lighting=0.9 + 0.15 * r[5])

    def scene(self, index: int, split: str = "train") -> tuple[np.ndarray, str]:
        spec = self.random_spec(index, split)
        return self.render(spec), self.caption(spec)

    def _place(self, rng: np.random.Generator, shape: str, colour: str, texture: str, mark: tuple[str, str] | None,
               *, sizes: tuple[float, float], pose: bool) -> SceneSpec:
        """Draw the free parts of a scene: background, size, position, lighting, pose, jitter seed."""
        r = [float(t) for t in rng.random(8)]
        backgrounds = BACKGROUNDS[:1] + BACKGROUNDS[2:] if colour == "black" else BACKGROUNDS  # no black on dark
        size = sizes[0] + r[1] * (sizes[1] - sizes[0])
        margin = size / 2 + 0.02
        x, y = (margin + t * (1 - 2 * margin) for t in r[2:4])
        lighting = _LIGHTING_RANGE[0] + r[4] * (_LIGHTING_RANGE[1] - _LIGHTING_RANGE[0])
        flip, tilt = (r[5] < 0.5, 24 * r[6] - 12) if pose else (False, 0.0)
        return SceneSpec(shape, colour, texture, _pick(backgrounds, r[0]), x=x, y=y, size=size, lighting=lighting,
                         mark=mark, seed=1 + int(r[7] * (2**31 - 2)), flip=flip, tilt=tilt)

    # --------------------------------------------------------------------------------------------- subjects
    def _make_subjects(self) -> tuple[Subject, ...]:
        """Per class: distinct (colour, texture) pairs first (most distinguishable), then a mark each; the full
        look (class, colour, texture, mark) is unique by construction."""
        subjects = []
        colours = list(COLOURS)
        for class_name in self.cfg.classes:
            rng = self._rng("subjects", CLASSES.index(class_name))
            looks = list(itertools.product(colours, TEXTURES))
            order = rng.permutation(len(looks))
            seen: set[tuple] = set()
            for k in range(self.cfg.subjects_per_class):
                colour, texture = looks[order[k % len(looks)]]
                while True:
                    mark = (str(rng.choice([c for c in colours if c != colour])), str(rng.choice(MARK_POSITIONS)))
                    if (colour, texture, mark) not in seen:
                        break
                seen.add((colour, texture, mark))
                every = self.cfg.held_out_every
                subjects.append(Subject(index=len(subjects), name=f"{class_name}_{k:02d}", class_name=class_name,
                                        colour=colour, texture=texture, mark=mark,
                                        held_out=bool(every) and k % every == 0))
        return tuple(subjects)

    @property
    def subjects(self) -> tuple[Subject, ...]:
        return self._subjects

    def subject(self, key: int | str) -> Subject:
        """A subject by global index or name ("dog_03")."""
        n = len(self._subjects)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if 0 <= key < n:
                return self._subjects[key]
        elif isinstance(key, str):
            for s in self._subjects:
                if s.name == key:
                    return s
        last = self.cfg.subjects_per_class - 1
        names = ", ".join(f"{c}_00..{c}_{last:02d}" for c in self.cfg.classes)
        raise KeyError(f"unknown subject {key!r}: valid indices are 0..{n - 1}, names {names}")

    def _as_subject(self, subject: Subject | str | int) -> Subject:
        return subject if isinstance(subject, Subject) else self.subject(subject)

    def members(self, class_name: str) -> tuple[Subject, ...]:
        """The subjects of a class that pre-training may see (not held out)."""
        self._check_class(class_name)
        return tuple(s for s in self._subjects if s.class_name == class_name and not s.held_out)

    def _check_class(self, class_name: str) -> None:
        if class_name not in self.cfg.classes:
            raise KeyError(f"unknown class {class_name!r}; this world has {list(self.cfg.classes)}")

    def _photo(self, subject: Subject, rng: np.random.Generator) -> SceneSpec:
        return self._place(rng, subject.class_name, subject.colour, subject.texture, subject.mark,
                           sizes=(0.45, 0.75), pose=True)

    def subject_spec(self, subject: Subject | str | int, index: int) -> SceneSpec:
        """Photo ``index`` of a subject: same look, a fresh pose, place, size, background and light."""
        subject = self._as_subject(subject)
        return self._photo(subject, self._rng("subject_photo", subject.index, index))

    def class_spec(self, class_name: str, index: int) -> tuple[SceneSpec, Subject]:
        """Class photo ``index``: a random non-held-out member in a random photo (and which member)."""
        members = self.members(class_name)
        if not members:
            raise ValueError(f"class {class_name!r} has no subjects that are not held out")
        rng = self._rng("class_photo", CLASSES.index(class_name), index)
        member = _pick(members, rng.random())
        return self._photo(member, rng), member

    def subject_photos(self, subject: Subject | str | int, n: int, *, start: int = 0) -> np.ndarray:
        """``(n, S, S, 3)`` uint8: photos ``start .. start+n-1`` of one subject."""
        subject = self._as_subject(subject)
        return self._render_all([self.subject_spec(subject, i) for i in range(start, start + n)])

    def class_photos(self, class_name: str, n: int, *, start: int = 0) -> np.ndarray:
        """``(n, S, S, 3)`` uint8 photos of non-held-out members of a class (prior preservation, pre-training)."""
        return self._render_all([self.class_spec(class_name, i)[0] for i in range(start, start + n)])

    def _render_all(self, specs: Sequence[SceneSpec]) -> np.ndarray:
        out = np.empty((len(specs), self.size, self.size, 3), np.uint8)
        for i, spec in enumerate(specs):
            out[i] = self.render(spec)
        return out


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


# ------------------------------------------------------------------------------------------------- data source

class WorldSource:
    """A grain random-access source of ``size`` captioned scenes (picklable, stateless).

    Item ``i``: ``{"image": uint8 (S, S, 3), "caption": str, "shape": int32, "colour": int32}``. About
    ``class_fraction`` of the items are photos of non-held-out class members, captioned with class forms
    ("a photo of a dog", "a photo of dog", or the full caption, which never names the mark); about
    ``simple_fraction`` are ``world.simple_spec(i, split)`` (one plain centred object, the canonical caption); the
    rest are ``world.random_spec(i, split)``. Held-out subjects never appear.
    """

    def __init__(self, world: World, size: int, *, split: str = "train", class_fraction: float = 0.3,
                 simple_fraction: float = 0.0):
        if not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"WorldSource size must be a positive integer, got {size!r}")
        for name, value in (("class_fraction", class_fraction), ("simple_fraction", simple_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if class_fraction + simple_fraction > 1.0:
            raise ValueError(f"class_fraction + simple_fraction must be <= 1, got {class_fraction} + {simple_fraction}")
        World._split_code(split)
        self.world, self.size, self.split = world, int(size), split
        self.class_fraction, self.simple_fraction = float(class_fraction), float(simple_fraction)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"WorldSource({self.world!r}, {self.size}, split={self.split!r}, class_fraction={self.class_fraction}, "
                f"simple_fraction={self.simple_fraction})")

    def describe(self, index: int) -> tuple[SceneSpec, str, Subject | None]:
        """Item ``index`` before rendering: its spec, caption, and the subject photographed (None if generic)."""
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a WorldSource of {self.size} items")
        index %= self.size
        world = self.world
        rng = world._rng("source", world._split_code(self.split), index)
        r = rng.random(4)
        if r[0] < self.class_fraction:
            class_name = _pick(world.cfg.classes, r[1])
            spec, member = world.class_spec(class_name, int(r[2] * 2**31))
            form = r[3]
            if form < 0.3:
                caption = f"a photo of {_article(class_name)} {class_name}"
            elif form < 0.4:
                caption = world.class_prompt(class_name)
            else:
                caption = world.caption(spec)
            return spec, caption, member
        if r[0] < self.class_fraction + self.simple_fraction:
            spec = world.simple_spec(index, self.split)
            return spec, world.caption(spec), None
        spec = world.random_spec(index, self.split)
        return spec, world.caption(spec), None

    def __getitem__(self, index: int) -> dict:
        spec, caption, _ = self.describe(index)
        labels = self.world.labels(spec)
        return {"image": self.world.render(spec), "caption": caption,
                "shape": np.int32(labels["shape"]), "colour": np.int32(labels["colour"])}


# --------------------------------------------------------------------------------------------- pixel detector

def _nearest_palette(images: np.ndarray, background: str | None, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """For ``(N, S, S, 3)`` uint8 images: each pixel's nearest centre (palette colours first, then the greys of
    ``background``) and the squared distance to it, ``(N, S*S)`` each, allowing for the world's lighting."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{fn} expects (N, S, S, 3) images, got shape {images.shape}")
    if background is None:
        greys: list = []
    elif background == "any":
        greys = [_LIGHT, _MID, _DARK]
    elif background in _BACKGROUND_GREYS:
        greys = list(_BACKGROUND_GREYS[background])
    else:
        raise ValueError(f"unknown background {background!r}; expected one of {[*BACKGROUNDS, 'any', None]}")
    centres = np.array(list(COLOURS.values()) + greys, np.float32)  # (K, 3)
    pixels = images.reshape(len(images), -1, 3).astype(np.float32)  # (N, P, 3)
    dot = pixels @ centres.T  # (N, P, K)
    norm2 = np.sum(centres**2, -1)
    gain = np.clip(dot / norm2, 0.72, 1.25)
    # |p - g c|^2 expanded, so no (N, P, K, 3) array is ever built
    dist2 = np.sum(pixels**2, -1, keepdims=True) - 2 * gain * dot + gain**2 * norm2
    return np.argmin(dist2, -1), np.min(dist2, -1)


def dominant_colour(images: np.ndarray, *, background: str | None = "plain", max_distance: float = 40.0) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)`` (or one ``(S, S, 3)``), the index into ``list(COLOURS)`` of the
    palette colour that most of its object pixels are nearest to; -1 where no pixel qualifies.

    Nearness allows for the world's lighting: the distance to a colour ``c`` is ``min |p - g*c|`` over gains
    ``g`` in [0.72, 1.25], so a dim yellow is still yellow. Pixels nearest a grey of ``background`` are left out
    ("plain": the light grey; "dark", "striped", "dotted": that background's greys; "any": all of them; None:
    none), as are pixels farther than ``max_distance`` from every colour (anti-aliased edges, texture shades),
    which would otherwise vote at random.
    """
    nearest, dist2 = _nearest_palette(images, background, "dominant_colour")
    ok = (nearest < len(COLOURS)) & (dist2 <= max_distance**2)
    counts = np.stack([np.sum(ok & (nearest == k), -1) for k in range(len(COLOURS))], -1)
    return np.where(counts.max(-1) > 0, np.argmax(counts, -1), -1)


@functools.lru_cache(maxsize=None)
def _silhouette_centroid(shape: str) -> tuple[float, float]:
    """Centre of mass of a silhouette in local units (facing right), from a fine grid."""
    g = (np.arange(256, dtype=np.float64) + 0.5) / 128 - 1.0
    u, v = np.meshgrid(g, g)
    inside = _silhouette(shape, u, v) < 0
    return float(u[inside].mean()), float(v[inside].mean())


def detect_shape(images: np.ndarray, candidates: Sequence[str] = ALL_SHAPES, *, background: str | None = "plain",
                 sizes: Sequence[float] = tuple(np.linspace(0.2, 0.95, 16))) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)``, the index into ``candidates`` of the silhouette that best covers its
    object pixels; -1 where there are fewer than 4 of them.

    The object mask is every pixel nearest a palette colour rather than a grey of ``background`` (as in
    ``dominant_colour``). Each candidate is drawn with the world's own signed distances, its centre of mass on the
    mask's, at every size in ``sizes`` (fractions of the image side) and, for the class silhouettes, facing either
    way; the score is the best intersection over union. Tilt is not searched: it is at most 12 degrees.
    """
    unknown = [c for c in candidates if c not in _SILHOUETTES]
    if unknown or not candidates:
        raise ValueError(f"detect_shape: unknown candidates {unknown}; choose from {list(ALL_SHAPES)}")
    nearest, _ = _nearest_palette(images, background, "detect_shape")
    side = int(round(math.sqrt(nearest.shape[1])))
    masks = (nearest < len(COLOURS)).reshape(-1, side, side).astype(np.float32)
    centres = (np.arange(side, dtype=np.float32) + 0.5) / side
    px, py = np.meshgrid(centres, centres)
    out = np.full(len(masks), -1, np.int64)
    for n, mask in enumerate(masks):
        area = mask.sum()
        if area < 4:
            continue
        mx, my = float((mask * px).sum() / area), float((mask * py).sum() / area)
        best = np.full(len(candidates), -1.0)
        for k, shape in enumerate(candidates):
            cu, cv = _silhouette_centroid(shape)
            for flip in ((False, True) if shape in CLASSES else (False,)):
                for size in sizes:
                    half = size / 2
                    u, v = (px - mx) / half + (-cu if flip else cu), (py - my) / half + cv
                    t = _coverage(_silhouette(shape, -u if flip else u, v), half * side)
                    iou = np.minimum(t, mask).sum() / np.maximum(t, mask).sum()
                    best[k] = max(best[k], iou)
        out[n] = int(np.argmax(best))
    return out


# ------------------------------------------------------------------------------------------------------ files

def save_photos(images: np.ndarray, folder: str | Path, prefix: str = "photo") -> list[Path]:
    """Write ``(N, S, S, 3)`` uint8 images as ``folder/prefix_000.png ...``; refuses (before writing anything)
    if any of those files exists, so a demo never silently replaces someone's photos."""
    from PIL import Image
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"save_photos expects (N, S, S, 3) uint8 images, got {images.dtype} {images.shape}")
    folder = Path(folder)
    paths = [folder / f"{prefix}_{i:03d}.png" for i in range(len(images))]
    existing = [p.name for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"{folder}: will not overwrite existing {', '.join(existing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images):
        with open(path, "xb") as f:  # "x": fail rather than overwrite a file that appeared meanwhile
            Image.fromarray(image).save(f, format="PNG")
    return paths
