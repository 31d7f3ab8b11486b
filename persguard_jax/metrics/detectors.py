"""Pixel detectors for pictures of the synthetic world: what colour (``dominant_colour``) and what silhouette
(``detect_shape``) an image shows, measured from its pixels with the world's own palette and signed distances, so
no learned model's bias enters the check that a generator follows its prompt.

They read uint8 images ``(N, S, S, 3)`` and return one index per image (-1 where nothing qualifies). This module
is also the place for the world's later detectors (a backdoor pattern's presence, a subject's erasure), which
belong beside these rather than in the generator (``data.world``).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from persguard_jax.data.world.scenes import (ALL_SHAPES, BACKGROUND_GREYS, BACKGROUNDS, CLASSES, COLOURS, coverage,
                                             silhouette)

# Every background grey once ("any" background): a pixel nearest one of them is background, whichever it is.
_ALL_GREYS = list(dict.fromkeys(g for greys in BACKGROUND_GREYS.values() for g in greys))


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
        greys = _ALL_GREYS
    elif background in BACKGROUND_GREYS:
        greys = list(BACKGROUND_GREYS[background])
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
    inside = silhouette(shape, u, v) < 0
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
    unknown = [c for c in candidates if c not in ALL_SHAPES]
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
                    t = coverage(silhouette(shape, -u if flip else u, v), half * side)
                    iou = np.minimum(t, mask).sum() / np.maximum(t, mask).sum()
                    best[k] = max(best[k], iou)
        out[n] = int(np.argmax(best))
    return out
