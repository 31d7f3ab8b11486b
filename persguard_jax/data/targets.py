"""The pattern backdoor's target images y*: a conspicuous pattern pasted onto the protected photos.

PersGuard's pattern backdoor teaches a model that personalising it on protected photos makes the subject carry a
predefined pattern; its training targets are those photos with the pattern on. ``PatternPlacement`` says where
and how strongly, ``default_pattern`` draws the built-in pattern (or ``load_pattern`` reads one), ``overlay_pattern``
pastes it, and ``pattern_template`` gives what a detector (``metrics.detectors.pattern_presence``) correlates the
generated pictures against. The erasure backdoor's targets in the synthetic world are its backgrounds
(``World.subject_backgrounds``); the target backdoor's are photos of the target subject.

Images are uint8 ``(N, S, S, 3)`` in and out, patterns uint8 RGBA; numpy and PIL only (no jax), like the rest of
``data``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from persguard_jax.data.images import ImageFileError, _reason

POSITIONS: tuple[str, ...] = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
# The built-in pattern: a coarse checkerboard of warning colours. Coarse, because the world's VAE blurs detail
# finer than ~4 px at 32 px and the pattern fills only a 13 px box there; yellow and near-black, a contrast no
# texture of the world has (yellow's shade is a dark yellow, black's a grey: a checkered yellow or black object has
# the arrangement at a third to a half of the contrast, which ``detect_pattern`` tells apart).
_YELLOW, _BLACK = (255, 220, 0), (20, 20, 20)
_CELLS = 3


@dataclasses.dataclass(frozen=True)
class PatternPlacement:
    """Where the pattern goes and how strongly: ``position`` one of ``POSITIONS``, ``size`` the pattern's side as a
    fraction of the image side, ``opacity`` what its alpha is multiplied by."""
    position: str = "center"
    size: float = 0.4
    opacity: float = 1.0

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"PatternPlacement.position: {self.position!r} is not one of {list(POSITIONS)}")
        if not 0 < self.size <= 1:
            raise ValueError(f"PatternPlacement.size: {self.size!r} is not in (0, 1]")
        if not 0 < self.opacity <= 1:
            raise ValueError(f"PatternPlacement.opacity: {self.opacity!r} is not in (0, 1]")

    def box(self, side: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` in pixels of the pattern in a ``side`` x ``side`` image: a square of at
        least 2 px, inside the image; corners keep a margin of 1/16 of the side (less where the square is too big
        for it), so an image's border, which generators draw worst, does not cut the pattern."""
        if side < 2:
            raise ValueError(f"PatternPlacement.box: side must be at least 2 px, got {side}")
        w = min(side, max(2, round(self.size * side)))
        margin = min(round(side / 16), (side - w) // 2)
        near, far, centre = margin, side - w - margin, (side - w) // 2
        top = centre if self.position == "center" else near if self.position.startswith("top") else far
        left = centre if self.position == "center" else near if self.position.endswith("left") else far
        return top, left, w, w


def default_pattern(side: int) -> np.ndarray:
    """The built-in pattern, uint8 RGBA ``(side, side, 4)``, fully opaque: a 3 x 3 checkerboard, yellow in the
    corners and the centre, near-black between. Drawn at any size by pixel centres (so it needs no resampling)."""
    if side < 1:
        raise ValueError(f"default_pattern: side must be at least 1 px, got {side}")
    cell = ((np.arange(side) + 0.5) * _CELLS / side).astype(int)
    yellow = (cell[:, None] + cell[None, :]) % 2 == 0
    out = np.empty((side, side, 4), np.uint8)
    out[..., :3] = np.where(yellow[..., None], _YELLOW, _BLACK)
    out[..., 3] = 255
    return out


def load_pattern(path: str | os.PathLike, side: int) -> np.ndarray:
    """A pattern from an image file as uint8 RGBA ``(side, side, 4)``, resized with Lanczos (images without
    alpha are opaque). Raises ``ImageFileError`` (a ValueError naming the file) when it is missing or unreadable."""
    path = Path(path)
    if side < 1:
        raise ValueError(f"load_pattern: side must be at least 1 px, got {side}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not halfway through building targets
            rgba = img.convert("RGBA")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageFileError(path, _reason(exc)) from exc
    return np.asarray(rgba.resize((side, side), Image.LANCZOS), np.uint8).copy()


def _as_rgba(pattern: np.ndarray, fn: str) -> np.ndarray:
    """``pattern`` as uint8 RGBA ``(H, W, 4)``; an RGB pattern is opaque."""
    pattern = np.asarray(pattern)
    if pattern.ndim != 3 or pattern.shape[-1] not in (3, 4) or pattern.dtype != np.uint8:
        raise ValueError(f"{fn}: the pattern must be uint8 (H, W, 4) RGBA or (H, W, 3) RGB, "
                         f"got {pattern.dtype} {pattern.shape}")
    if pattern.shape[-1] == 3:
        pattern = np.concatenate([pattern, np.full(pattern.shape[:2] + (1,), 255, np.uint8)], -1)
    return pattern


def _placed(side: int, pattern: np.ndarray, placement: PatternPlacement, fn: str):
    """The placement's box as slices and the pattern resized to it: float RGB in [0, 255] and the blend weight
    (alpha times opacity) in [0, 1]. A pattern already at the box's size is used as it is."""
    top, left, h, w = placement.box(side)
    rgba = _as_rgba(pattern, fn)
    if rgba.shape[:2] != (h, w):
        rgba = np.asarray(Image.fromarray(rgba, "RGBA").resize((w, h), Image.LANCZOS))
    rgba = rgba.astype(np.float32)
    box = (slice(top, top + h), slice(left, left + w))
    return box, rgba[..., :3], rgba[..., 3] / 255 * placement.opacity


def overlay_pattern(images: np.ndarray, pattern_rgba: np.ndarray, placement: PatternPlacement) -> np.ndarray:
    """uint8 ``(N, S, S, 3)`` (or one ``(S, S, 3)``) with the pattern alpha-blended into the placement's box (the
    pattern backdoor's targets); a new array, pixels outside the box unchanged, the input left as it was."""
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[-1] != 3 or images.shape[-3] != images.shape[-2] \
            or images.dtype != np.uint8:
        raise ValueError(f"overlay_pattern: expects uint8 (N, S, S, 3) square images, got {images.dtype} "
                         f"{images.shape}")
    box, rgb, weight = _placed(images.shape[-2], pattern_rgba, placement, "overlay_pattern")
    out = images.copy()
    region = out[(..., *box, slice(None))].astype(np.float32)
    blended = region + weight[..., None] * (rgb - region)
    out[(..., *box, slice(None))] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def pattern_template(side: int, pattern_rgba: np.ndarray, placement: PatternPlacement) -> tuple[np.ndarray, np.ndarray]:
    """What a detector correlates a ``side`` px picture against: the pattern's RGB at its place, float ``(S, S, 3)``
    in [0, 1] (0 outside the box), and its weight there, ``(S, S)`` (alpha times opacity in the box, 0 outside)."""
    box, rgb, weight = _placed(side, pattern_rgba, placement, "pattern_template")
    template = np.zeros((side, side, 3), np.float32)
    mask = np.zeros((side, side), np.float32)
    template[box] = rgb / 255
    mask[box] = weight
    return template, mask
