"""Pixel detectors for pictures of the synthetic world: what colour (``dominant_colour``), what silhouette
(``detect_shape``) and what texture (``detect_texture``) an image shows, and whether its object carries a subject's
mark (``detect_mark``), measured from its pixels with the world's own palette, shades and signed distances, so no
learned model's bias enters the check that a generator follows its prompt.

They read uint8 images ``(N, S, S, 3)`` and return one index (or, for marks, one bool) per image (-1 where nothing
qualifies). The backdoors' protective outputs are detected here too, beside these rather than in the generator
(``data.world``): a predefined pattern at its place (``pattern_presence``, ``detect_pattern``, against
``data.targets.pattern_template``) and a picture with its subject erased (``object_fraction``, ``detect_erasure``).
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from persguard_jax.data.world.scenes import (_PATTERN, ALL_SHAPES, BACKGROUND_GREYS, BACKGROUNDS, CLASSES, COLOURS,
                                             MIN_TEXTURE_PX, TEXTURE_PERIOD, coverage, silhouette)

# Every background grey once ("any" background): a pixel nearest one of them is background, whichever it is.
_ALL_GREYS = list(dict.fromkeys(g for greys in BACKGROUND_GREYS.values() for g in greys))


def _as_batch(images: np.ndarray, fn: str) -> np.ndarray:
    """``images`` as ``(N, S, S, 3)``: one ``(S, S, 3)`` image becomes a batch of one."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{fn} expects (N, S, S, 3) images, got shape {images.shape}")
    return images


def _greys(background: str | None) -> list:
    """The greys a pixel of ``background`` can be: after the palette, the last centres of ``_nearest_palette``."""
    if background is None:
        return []
    if background == "any":
        return _ALL_GREYS
    if background in BACKGROUND_GREYS:
        return list(BACKGROUND_GREYS[background])
    raise ValueError(f"unknown background {background!r}; expected one of {[*BACKGROUNDS, 'any', None]}")


def _colour_indices(names: Sequence[str], fn: str) -> list[int]:
    """Indices into ``list(COLOURS)`` of palette colour ``names``; a ValueError naming ``fn`` for any other."""
    unknown = [c for c in names if c not in COLOURS]
    if unknown:
        raise ValueError(f"{fn}: unknown colours {unknown}; choose from {list(COLOURS)}")
    return [list(COLOURS).index(c) for c in names]


def _nearest_palette(images: np.ndarray, background: str | None, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """For ``(N, S, S, 3)`` uint8 images: each pixel's nearest centre (palette colours first, then the greys of
    ``background``) and the squared distance to it, ``(N, S*S)`` each, allowing for the world's lighting."""
    return _nearest(_as_batch(images, fn), _greys(background))


def _nearest(images: np.ndarray, greys: list) -> tuple[np.ndarray, np.ndarray]:
    """``_nearest_palette`` with the greys given as colours."""
    centres = np.array(list(COLOURS.values()) + list(greys), np.float32)  # (K, 3)
    pixels = images.reshape(len(images), -1, 3).astype(np.float32)  # (N, P, 3)
    dot = pixels @ centres.T  # (N, P, K)
    norm2 = np.sum(centres**2, -1)
    gain = np.clip(dot / norm2, 0.72, 1.25)
    # |p - g c|^2 expanded, so no (N, P, K, 3) array is ever built
    dist2 = np.sum(pixels**2, -1, keepdims=True) - 2 * gain * dot + gain**2 * norm2
    return np.argmin(dist2, -1), np.min(dist2, -1)


def dominant_colour(images: np.ndarray, *, background: str | None = "plain", max_distance: float = 40.0,
                    ignore: Sequence[str] = ()) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)`` (or one ``(S, S, 3)``), the index into ``list(COLOURS)`` of the
    palette colour that most of its object pixels are nearest to; -1 where no pixel qualifies. Pixels nearest a
    colour in ``ignore`` do not vote (white, where a model draws its backgrounds lighter than the world's greys).

    Nearness allows for the world's lighting: the distance to a colour ``c`` is ``min |p - g*c|`` over gains
    ``g`` in [0.72, 1.25], so a dim yellow is still yellow. Pixels nearest a grey of ``background`` are left out
    ("plain": the light grey; "dark", "striped", "dotted": that background's greys; "any": all of them; None:
    none), as are pixels farther than ``max_distance`` from every colour (anti-aliased edges, texture shades),
    which would otherwise vote at random.
    """
    ignored = _colour_indices(ignore, "dominant_colour")
    nearest, dist2 = _nearest_palette(images, background, "dominant_colour")
    return _dominant(nearest, np.where(np.isin(nearest, ignored), np.inf, dist2), max_distance)


def _dominant(nearest: np.ndarray, dist2: np.ndarray, max_distance: float = 40.0) -> np.ndarray:
    """``dominant_colour`` from ``_nearest_palette``'s answer (the texture and mark detectors start from it too)."""
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
                 sizes: Sequence[float] = tuple(np.linspace(0.2, 0.95, 16)), colour: str | None = None,
                 ignore: Sequence[str] = ()) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)``, the index into ``candidates`` of the silhouette that best covers its
    object pixels; -1 where there are fewer than 4 of them.

    The object mask is every pixel nearest a palette colour rather than a grey of ``background`` (as in
    ``dominant_colour``); with ``colour`` (a palette name), only the pixels nearest that colour: the silhouette of
    an object of a known colour, which a model's backgrounds drawn lighter than the world's greys cannot join (they
    are nearest white, and a white mask covering the picture reads as a square); pixels nearest a colour in
    ``ignore`` are left out of the mask (as in ``dominant_colour``). Each candidate is drawn with the world's own
    signed distances, its centre of mass on the mask's, at every size in ``sizes`` (fractions of the image side)
    and, for the class silhouettes, facing either way; the score is the best intersection over union. Tilt is not
    searched: it is at most 12 degrees.
    """
    unknown = [c for c in candidates if c not in ALL_SHAPES]
    if unknown or not candidates:
        raise ValueError(f"detect_shape: unknown candidates {unknown}; choose from {list(ALL_SHAPES)}")
    ignored = _colour_indices(ignore, "detect_shape")
    nearest, _ = _nearest_palette(images, background, "detect_shape")
    side = int(round(math.sqrt(nearest.shape[1])))
    on = nearest < len(COLOURS) if colour is None else nearest == _colour_indices([colour], "detect_shape")[0]
    on &= ~np.isin(nearest, ignored)
    masks = on.reshape(-1, side, side).astype(np.float32)
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


# ------------------------------------------------------------------------------------------- one object's colours
# The texture and mark detectors read an object against the colours the renderer can draw it in: its colour, its
# texture shade, the background greys and the blends of these, all times one lighting.

_CENTRES = np.array(list(COLOURS.values()), np.float32)
# Each colour's texture shade, the world's own: a darker shade (lighter for black, a grey for white).
_SHADES = np.array([_PATTERN[name] for name in COLOURS], np.float32)


class _Object(NamedTuple):
    """One picture's object, as ``_objects`` finds it."""
    image: np.ndarray    # (S, S, 3) float
    palette: np.ndarray  # (S, S) bool: nearest a palette colour rather than a background grey
    own: np.ndarray      # (S, S) bool: nearest the object's colour
    colour: int          # index into COLOURS
    lighting: float
    greys: list          # the background greys the picture shows


def _objects(images: np.ndarray, background: str | None, fn: str) -> Iterator[tuple[int, _Object]]:
    """``(n, _Object)`` for each image ``n`` that has an object: its dominant colour on at least a handful (4) of
    pixels. The greys of ``background`` it shows are those nearest (at the object's lighting) to over 5% of the
    picture: "any" allows them all, a picture shows one or two, and the greys lie on one line, so with the lighting
    free (as ``_nearest_palette`` leaves it) a dim light grey would pass for the mid one."""
    nearest, dist2 = _nearest_palette(images, background, fn)
    images = _as_batch(images, fn)
    side = images.shape[1]
    greys = _greys(background)
    for n, k in enumerate(_dominant(nearest, dist2)):
        own = ((nearest[n] == k) & (dist2[n] <= 40.0**2)).reshape(side, side)
        if k < 0 or own.sum() < 4:
            continue
        image = images[n].astype(np.float32)
        palette = (nearest[n] < len(COLOURS)).reshape(side, side)
        lighting = _lighting_of(image[own], _CENTRES[k])
        shown = []
        if greys and not palette.all():
            grey = np.argmin(np.linalg.norm(image[~palette][:, None] - _lit(greys, lighting), axis=-1), -1)
            shown = [g for j, g in enumerate(greys) if np.sum(grey == j) > 0.05 * side * side]
        yield n, _Object(image, palette, own, int(k), lighting, shown)


def _lighting_of(pixels: np.ndarray, colour: np.ndarray) -> float:
    """The lighting an object is drawn in, from its own-colour pixels ``(P, 3)``: the commonest gain
    ``p.c / |c|^2`` in 2% bins, refined to the mean gain in and beside that bin. Shading is flat, so every pure base
    pixel has the same value: the mode is the base even where texture edges and anti-aliasing leave under half of
    the pixels pure, where a median would slide towards the shade."""
    gain = pixels @ colour / float(colour @ colour)
    bins = np.round(np.log(np.maximum(gain, 1e-3)) / 0.02)
    values, counts = np.unique(bins, return_counts=True)
    return float(np.mean(gain[np.abs(bins - values[np.argmax(counts)]) <= 1]))


def _lit(colours: np.ndarray, lighting: float) -> np.ndarray:
    """Colours as the renderer draws them in ``lighting`` (before rounding): scaled, clipped to uint8."""
    return np.minimum(np.asarray(colours, np.float32) * lighting, 255)


def _shade_line(obj: _Object) -> tuple[np.ndarray, np.ndarray, float]:
    """The object's colour and its texture shade as drawn, and how far off the line between them a pixel may lie
    and still be read as a mix of the two: uint8 rounding and a 2% lighting error, while marks, other colours and a
    chromatic object's blends with the background fall well off it."""
    base, shade = _lit(_CENTRES[obj.colour], obj.lighting), _lit(_SHADES[obj.colour], obj.lighting)
    return base, shade, 0.06 * float(np.linalg.norm(base)) + 4


def _box(mask: np.ndarray, margin: int = 1) -> tuple[np.ndarray, int]:
    """The bounding box of ``mask`` grown by ``margin`` pixels, as a mask, and its longer side before growing."""
    ys, xs = np.nonzero(mask)
    box = np.zeros_like(mask)
    box[max(ys.min() - margin, 0):ys.max() + margin + 1, max(xs.min() - margin, 0):xs.max() + margin + 1] = True
    return box, int(max(np.ptp(ys), np.ptp(xs))) + 1


def _erode(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` whose four neighbours are in it too (beyond the image counts as outside)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[[0, -1]] = False
    out[:, [0, -1]] = False
    return out


# ------------------------------------------------------------------------------------------------------ texture

# Measured on rendered scenes (32 px, sizes 0.3-0.8, every background): 99% of plain objects leave under 3% of what
# is read past half way to the shade (blends of white and black at a seam), 99% of textured ones over 5% (medium
# and large: over 11%; 25-40% is drawn).
_MIN_SHADE_SHARE = 0.06
_TILTS = np.radians(np.linspace(-14.0, 14.0, 15))  # the world tilts objects by at most 12 degrees
_PERIOD_SCALES = np.geomspace(0.8, 1.25, 12)       # around the period guessed from the object's extent
# What each texture's score (``_texture_scores``) is on a clean, large object: stripes put most of their variation
# in one frequency, dots and checks spread it over several. Scores are compared as fractions of these.
_CLEAN_SCORES = np.array([0.44, 0.16, 0.17])


def _shade_map(obj: _Object) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel lies from the object's colour (0) to its texture shade (1), and whether it lies on that
    segment at all (within ``_shade_line``'s tolerance, a little past either end), ``(S, S)`` each."""
    base, shade, tolerance = _shade_line(obj)
    d = shade - base
    t = (obj.image - base) @ d / float(d @ d)
    off = np.linalg.norm(obj.image - base - np.clip(t, 0, 1)[..., None] * d, axis=-1)
    return t, (off <= tolerance) & (t > -0.3) & (t < 1.04)


def _edges_pass_as_shade(obj: _Object) -> bool:
    """Whether the object's anti-aliased edge (its colour blended with a shown background grey) can pass for
    texture shade: the blend runs along the shade line as far as it stays within tolerance of it. True for white
    and black (their shades are greys) and for most colours on the dark background (near black, so near every
    colour's line through black); false for chromatic colours on the light greys, whose edges leave the line at
    once."""
    base, shade, tolerance = _shade_line(obj)
    d = shade - base
    for grey in _lit(obj.greys, obj.lighting):
        along = float((grey - base) @ d / (d @ d))
        off = float(np.linalg.norm(grey - base - along * d))
        if along * min(1.0, tolerance / max(off, 1e-6)) > 0.3:
            return True
    return False


def _texture_scores(t: np.ndarray, region: np.ndarray, extent: int, texture_period: float) -> np.ndarray:
    """Striped, dotted, checkered: how much of the shade map's variation inside ``region`` lies at that texture's
    spatial frequencies, each the best over tilts and over periods around the one ``render`` draws (at
    ``texture_period``) for an object ``extent`` pixels across. A frequency's share is its power over
    (pixels x energy): 1/2 for a pure sinusoid.

    In the object's own (u, v) axes the stripes run along one diagonal (the flipped pose mirrors it: the other),
    the dots lie on an axis-aligned lattice of the period P, and the checkered squares on a lattice of every
    other cell, whose strongest frequencies are both diagonals at 1/(P sqrt 2). Each score is a contrast, so that
    one texture's harmonics do not pass for another: stripes, the power at one diagonal less that at the other (a
    checkered object has both); checks, the power at the weaker of their two diagonals; dots, the weaker of their
    two axes less the checks' score there (checks also have power on the axes at 1/P, dots none on the checks'
    diagonals)."""
    z = np.where(region, np.clip(t, 0, 1), 0)
    z = np.where(region, z - z[region].mean(), 0)
    energy = float(np.sum(z**2))
    if energy <= 0:
        return np.zeros(3)
    pad = 4 * max(t.shape)  # fine enough to sample a peak about 1/extent wide
    power = np.abs(np.fft.fft2(z, s=(pad, pad)))**2 / (region.sum() * energy)
    # render: a period of texture_period of the object's size, at least MIN_TEXTURE_PX; silhouettes span ~0.9 of it
    period = max(texture_period * extent / 0.9, MIN_TEXTURE_PX) * _PERIOD_SCALES
    cos, sin = np.cos(_TILTS)[:, None, None], np.sin(_TILTS)[:, None, None]
    u = np.concatenate([cos, sin], -1) / period[:, None]   # (tilts, periods, 2): cycles per pixel along u
    v = np.concatenate([-sin, cos], -1) / period[:, None]

    def at(f: np.ndarray) -> np.ndarray:
        col, row = (np.round(f * pad).astype(int) % pad).transpose(2, 0, 1)
        return power[row, col]

    one, other = at((u + v) / math.sqrt(2)), at((v - u) / math.sqrt(2))
    checks = np.minimum(at((u + v) / 2), at((u - v) / 2))
    return np.array([np.abs(one - other).max(), (np.minimum(at(u), at(v)) - checks).max(), checks.max()])


def _texture_of(obj: _Object, texture_period: float) -> int:
    """The index into TEXTURES of one object's texture."""
    base, shade, _ = _shade_line(obj)
    if float(np.sum((shade - base) ** 2)) < 1.0:  # lit so dark (a generated blob) that colour and shade coincide
        return 0
    t, on_line = _shade_map(obj)
    box, extent = _box(obj.own)
    region = on_line & box
    if _edges_pass_as_shade(obj):
        # peel the outline, from the object as its shades and palette pixels (so a mark opens no hole to peel)
        region &= _erode((on_line | obj.palette) & box)
    if region.sum() < 4 or np.mean(t[region] > 0.5) < _MIN_SHADE_SHARE:
        return 0
    return 1 + int(np.argmax(_texture_scores(t, region, extent, texture_period) / _CLEAN_SCORES))


def detect_texture(images: np.ndarray, *, background: str | None = "plain",
                   texture_period: float = TEXTURE_PERIOD) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)`` (or one ``(S, S, 3)``), the index into ``TEXTURES`` of its object's
    texture (0 plain, 1 striped, 2 dotted, 3 checkered); -1 where there is no object (fewer than 4 pixels of its
    dominant colour). ``background`` as for ``dominant_colour``; ``texture_period`` the world's
    (``WorldConfig.texture_period``: the period ``render`` draws, as a fraction of the object's size).

    How: the object is its dominant colour, and its lighting the commonest gain of those pixels (shading is flat).
    A texture is the world's second shade of that colour (``scenes._PATTERN``) over part of the surface, so each
    pixel is placed on the line from the colour (0) to its shade (1), both in that lighting. Pixels off the line
    are left out (a mark, other colours, a chromatic object's edge against the background), and where the object's
    edge against a shown background grey runs along the line (white, black; most colours on the dark background)
    the outline is peeled. Under 6% of what is left past half way to the shade: plain. Otherwise the spectrum of
    that shade map decides, in the object's own axes: stripes put their power on one diagonal (the flipped pose's
    on the other), dots on both axes at the period, checks on both diagonals at period / sqrt 2; each searched
    over tilts to 14 degrees and over periods 0.8-1.25 times the one ``render`` draws for an object as wide as the
    mask (``texture_period`` of its size, at least 3.5 px), and compared as a fraction of what a clean object scores.

    Measured (on a seed not used to tune it): 800 scenes a cell, the textures equally, any shape and colour,
    sizes small 0.3-0.42, medium 0.42-0.62, large 0.62-0.8 of the side, lighting 0.75-1.2, classes flipped and
    tilted up to 12 degrees, with their ``background`` named::

        accuracy            32 px: small  medium  large     64 px: small  medium  large
        plain                      0.960  0.994   0.998            1.000  1.000   1.000
        dark                       0.902  0.995   1.000            1.000  0.999   1.000
        striped                    0.950  0.996   1.000            0.998  0.998   0.998
        dotted                     0.953  0.999   0.999            0.999  1.000   0.999
        all four, "any"            0.941  0.991   0.999            1.000  1.000   1.000

    On the plain background at 32 px, medium and large objects (1600): recall 0.995 plain, 0.995 striped, 0.995
    dotted, 0.998 checkered; six of the seven misses are called checkered. ``World.random_spec`` scenes with
    ``background="any"``: 0.984 at 32 px (2000), 1.000 at 64 px (1000); marked subject photos
    (``World.subject_spec``, 800): 0.968 at 32 px, 1.000 at 64 px. What is lost is small objects at 32 px (about
    10 px across: 2-3 periods of 3.5 px in all), the more so where the outline must be peeled (white and black,
    the dark background) or a 3 px mark hides a third of a thin body, and a few white or black class silhouettes
    whose parts meet at a blended seam (the person's neck) read as checkered. About 1 ms an image at 32 px, 2 at 64.
    At ``texture_period`` 0.4 (coarser; 400 scenes a cell, seed 2024): 32 px small 0.943, medium and large 0.988,
    any background 0.948 (striped 0.86), 64 px any background 0.988; at 0.5 the stripes fall to 0.65-0.88.
    """
    out = np.full(len(_as_batch(images, "detect_texture")), -1, np.int64)
    for n, obj in _objects(images, background, "detect_texture"):
        out[n] = _texture_of(obj, texture_period)
    return out


# --------------------------------------------------------------------------------------------------------- mark

def _segment_distance(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each pixel ``(..., 3)`` to the segment from colour ``a`` to colour ``b`` (the blends of two)."""
    d = b - a
    t = np.clip((pixels - a) @ d / max(float(d @ d), 1e-6), 0, 1)
    return np.linalg.norm(pixels - a - t[..., None] * d, axis=-1)


def _unmarked_distance(obj: _Object, pixels: np.ndarray) -> np.ndarray:
    """Distance from each pixel to the nearest blend an unmarked scene draws: the object's colour with its shade,
    either of them with a shown background grey (edges)."""
    base, shade, _ = _shade_line(obj)
    out = _segment_distance(pixels, base, shade)
    for grey in _lit(obj.greys, obj.lighting):
        out = np.minimum(out, np.minimum(_segment_distance(pixels, base, grey), _segment_distance(pixels, shade, grey)))
    return out


def _mark_pixels(obj: _Object, m: int) -> int:
    """The most pixels in one mark-sized square of the object's box that are nearer colour ``m`` (within 40 of it,
    as ``dominant_colour`` allows) than any blend the scene can draw without a mark of that colour: the unmarked
    blends, and the object's colour with a mark of another colour (a red mark's edge on yellow is orange)."""
    lit = _lit(_CENTRES, obj.lighting)
    box = _box(obj.own)[0]  # a mark is drawn on the body: only the object's box can hold one
    pixels = obj.image[box]
    explained = _unmarked_distance(obj, pixels)
    for other in set(range(len(lit))) - {obj.colour, m}:
        explained = np.minimum(explained, _segment_distance(pixels, lit[obj.colour], lit[other]))
    near = np.linalg.norm(pixels - lit[m], axis=-1)
    hits = np.zeros(box.shape)
    hits[box] = (near < explained) & (near <= 40.0)
    return _densest(hits, max(3, round(5 * box.shape[0] / 32)))


def _densest(hits: np.ndarray, window: int) -> int:
    """The most ``hits`` ``(S, S)`` in any ``window`` x ``window`` square (a summed-area table): a mark is one
    compact blob, so stray pixels elsewhere on the object do not add up to one."""
    table = np.pad(hits, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    w = min(window, hits.shape[0])
    sums = table[w:, w:] - table[:-w, w:] - table[w:, :-w] + table[:-w, :-w]
    return int(round(sums.max()))


def detect_mark(images: np.ndarray, colour: str | Sequence[str], *, background: str | None = "plain",
                min_pixels: int | None = None) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)`` (or one ``(S, S, 3)``), whether its object carries a mark of the
    palette colour ``colour`` (one name for every image, or one per image): a compact blob of that colour on it.
    False where there is no object or the object is itself that colour. ``background`` as for ``dominant_colour``.

    How: in the object's lighting (as in ``detect_texture``), a pixel in the object's bounding box counts for the
    mark where it is nearer the mark's colour than any blend the scene draws without such a mark (the object's
    colour with its texture shade, either of them with a background grey, the colour with a mark of another colour)
    and within 40 of it; the mark is there when one 5 x 5 px square (scaled with the image) holds ``min_pixels``
    of them (default 2 at 32 px, scaled with the side: 4 at 64).

    Only the colour is checked, not the position (``MARK_POSITIONS``): on a class the position names a place on the
    body in the facing-right pose, so reading it needs the pose (flip, tilt), which only a shape fit gives, and at
    32 px a 3 px mark sits on a 15 px body. Callers that need it must fit the pose first.

    Measured (on a seed not used to tune it): marked subject photos (``World.subject_spec``: a class, 0.45-0.75 of
    the side, any background, light and pose), 800 at each size: found in 0.999 at 32 px (0.998 with
    ``background="any"``) and 1.000 at 64 px; no false positives, neither on the same scenes drawn without the mark
    (0/800) nor asking for another colour (0/800). ``World.random_spec`` scenes given a random mark (any shape,
    0.3-0.8 of the side; 1000): with 6 or more pixels visibly changed by the mark (counted at 32 px), found in
    0.925 at 32 px (small objects 0.665, medium and large 0.983; ``min_pixels=1``: 0.980, at 1 false positive in
    1000 other-colour queries) and 1.000 at 64 px; no false positives. Under 3 visible pixels (a small object's mark
    at 32 px, or a generic shape's mark falling off it) it is not seen. About 1 ms an image at 32 px, 2 at 64.
    """
    n_images, side = _as_batch(images, "detect_mark").shape[:2]
    names = [colour] * n_images if isinstance(colour, str) else list(colour)
    if len(names) != n_images or any(c not in COLOURS for c in names):
        raise ValueError(f"detect_mark: colour must be one of {list(COLOURS)} or one per image ({n_images}), "
                         f"got {colour!r}")
    if min_pixels is None:
        min_pixels = max(2, round(side / 16))
    out = np.zeros(n_images, bool)
    for n, obj in _objects(images, background, "detect_mark"):
        m = list(COLOURS).index(names[n])
        out[n] = m != obj.colour and _mark_pixels(obj, m) >= min_pixels
    return out


# ------------------------------------------------------------------------------------------- backdoor outputs

def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` ``(S, S, ...)`` moved ``dy`` px down and ``dx`` px right, zeros where it moved from (no wrapping:
    a pattern in a corner must not reappear at the opposite border)."""
    out = np.zeros_like(a)
    side_y, side_x = a.shape[:2]
    out[max(dy, 0):side_y + min(dy, 0), max(dx, 0):side_x + min(dx, 0)] = \
        a[max(-dy, 0):side_y + min(-dy, 0), max(-dx, 0):side_x + min(-dx, 0)]
    return out


def _correlation(x: np.ndarray, template: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The masked normalised cross-correlation of each image ``(N, S, S, 3)`` with ``template`` ``(S, S, 3)``, and
    the image's contrast along the template (the least-squares gain: 1 where the image is the template plus a
    colour offset, 0.5 at half its contrast), ``(N,)`` each. Both are centred by their masked mean in each channel,
    so a flat patch of any colour scores 0."""
    m = mask[..., None]
    total = max(float(mask.sum()), 1e-12)
    pc = template - np.sum(m * template, axis=(0, 1)) / total
    xc = x - np.sum(m * x, axis=(1, 2), keepdims=True) / total
    num = np.sum(m * xc * pc, axis=(1, 2, 3))
    pp = max(float(np.sum(m * pc * pc)), 1e-12)
    return num / np.maximum(np.sqrt(np.sum(m * xc * xc, axis=(1, 2, 3)) * pp), 1e-12), num / pp


def _pattern_fit(images: np.ndarray, template: np.ndarray, mask: np.ndarray, search: int,
                 fn: str) -> tuple[np.ndarray, np.ndarray]:
    """``_correlation`` at the shift of the template and mask (up to ``search`` px each way) that correlates
    best, per image: (correlation, contrast), ``(N,)`` each."""
    x = _as_batch(images, fn).astype(np.float32) / 255
    template, mask = np.asarray(template, np.float32), np.asarray(mask, np.float32)
    if template.shape != x.shape[1:] or mask.shape != x.shape[1:3]:
        raise ValueError(f"{fn}: template {template.shape} and mask {mask.shape} do not match images {x.shape}")
    if search < 0:
        raise ValueError(f"{fn}: search must be at least 0, got {search}")
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError(f"{fn}: the mask is zero everywhere")
    # only the mask's box, grown by the search, can count: cut the rest off before the (2 search + 1)^2 passes
    crop = (slice(max(ys.min() - search, 0), ys.max() + search + 1),
            slice(max(xs.min() - search, 0), xs.max() + search + 1))
    x, template, mask = x[(slice(None), *crop)], template[crop], mask[crop]
    best, contrast = np.full(len(x), -1.0), np.zeros(len(x))
    for dy in range(-search, search + 1):
        for dx in range(-search, search + 1):
            m = _shifted(mask, dy, dx)
            if m.sum() > 0:
                ncc, gain = _correlation(x, _shifted(template, dy, dx), m)
                better = ncc > best
                best, contrast = np.where(better, ncc, best), np.where(better, gain, contrast)
    return best, contrast


def pattern_presence(images: np.ndarray, template: np.ndarray, mask: np.ndarray, *, search: int = 2) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)`` (or one ``(S, S, 3)``), how strongly the backdoor pattern shows, in
    [-1, 1]: the best, over shifts of the template (with its mask) by up to ``search`` px each way, of its masked
    normalised cross-correlation with the picture. ``template`` ``(S, S, 3)`` in [0, 1] and ``mask`` ``(S, S)``
    are ``data.targets.pattern_template``'s; the search forgives a generator that draws the pattern a pixel or two
    off its place.

    ``scores.pattern_score``'s maths, but centred in each channel rather than over pixels and channels together:
    centred together, a flat patch whose colour leans the way the pattern's mean colour does (a faint yellow tint
    of a world background under the yellow and black pattern) correlates with the pattern's colour alone, 0.55-0.6
    at 32 px. Centred per channel a flat patch of any colour scores 0 and only the arrangement counts."""
    return _pattern_fit(images, template, mask, search, "pattern_presence")[0]


def detect_pattern(images: np.ndarray, template: np.ndarray, mask: np.ndarray, *, threshold: float = 0.5,
                   search: int = 2, min_contrast: float = 0.4) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)``, whether the backdoor pattern shows: ``pattern_presence`` at least
    ``threshold``, and at that shift at least ``min_contrast`` of the pattern's contrast (``_correlation``'s gain).

    Correlation alone cannot tell the pattern from a world object with the same arrangement at a lower contrast
    (a checkered yellow or black object, whose checks are its colour and a shade of it, against the pattern's
    yellow and near-black): it ignores gain. The contrast does, and a 3 x 3 box blur (about what the world's VAE
    does at 32 px) keeps over half of it.

    Measured with ``default_pattern`` at the default placement size, each of the five positions: overlaid on
    subject photos and blurred 3 x 3 (also shifted by up to 2 px first), correlation at least 0.82 and contrast
    0.53 at 32 px (0.91 and 0.75 at 64), all detected (blurred twice: 0.82 and 0.41 at 32 px). Not overlaid:
    ``random_spec`` scenes (10000 at 32 px, 1500 at 64) correlate up to 0.63 / 0.49, subject photos up to
    0.45 / 0.34, backgrounds 0.03 / 0.05; none detected. The hardest case, 3000 large checkered yellow, black,
    orange or white objects in bright light at 32 px: correlation up to 0.77, but contrast at most 0.385 where
    the correlation passes 0.5; none detected (3 at ``min_contrast=0.35``)."""
    ncc, contrast = _pattern_fit(images, template, mask, search, "detect_pattern")
    return (ncc >= threshold) & (contrast >= min_contrast)


def object_fraction(images: np.ndarray, *, background: str | None = "any") -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)`` (or one ``(S, S, 3)``), the fraction of its pixels nearer a palette
    colour than a background grey (``dominant_colour``'s nearness, lighting allowed for): how much of the picture
    an object covers. The greys are those of ``background`` that the picture shows, as in ``_objects``: nearest to
    over 5% of it; a grey it does not show (the dark one, behind a lit white or black object) would otherwise claim
    the object's darker or lighter edges and texture shades."""
    images = _as_batch(images, "object_fraction")
    greys = _greys(background)
    nearest, _ = _nearest(images, greys)
    k = len(COLOURS)
    out = np.mean(nearest < k, axis=-1)
    for n in range(len(images)):
        counts = np.bincount(nearest[n], minlength=k + len(greys))[k:]
        shown = [g for g, c in zip(greys, counts) if c > 0.05 * nearest.shape[1]]
        if shown and len(shown) < len(greys):
            out[n] = np.mean(_nearest(images[n:n + 1], shown)[0] < k)
    return out


def colour_fraction(images: np.ndarray, colour: str, *, background: str | None = "any",
                    max_distance: float = 40.0) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)``, the fraction of its pixels nearest the palette ``colour`` (lighting
    allowed for, as in ``dominant_colour``) and within ``max_distance`` of it: how much of the picture a subject of
    that colour covers."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {list(COLOURS)}")
    nearest, dist2 = _nearest_palette(images, background, "colour_fraction")
    return np.mean((nearest == list(COLOURS).index(colour)) & (dist2 <= max_distance**2), -1)


def detect_erasure(images: np.ndarray, *, background: str | None = "any",
                   max_object_fraction: float = 0.01, colour: str | None = None) -> np.ndarray:
    """For each uint8 image ``(N, S, S, 3)``, whether it shows no object, only background (the erasure backdoor's
    output): ``object_fraction`` at most ``max_object_fraction``. ``background`` as for ``dominant_colour``; "any"
    by default, since an erased picture's background is whatever the prompt or the photo had.

    Every pixel nearer a palette colour counts, however far from it, so an off-colour remnant of the subject still
    counts as an object; the world's backgrounds, tinted or not, in any of its lighting (0.75-1.2), have none.

    Measured: ``render_background`` of every background kind, 300 jitter seeds (tints) at lighting 0.75-1.2: 0.000
    at 32 and 64 px, also after a 3 x 3 box blur (and in lighting 0.7-1.23; at 1.25, past the world's range, a
    lit light grey passes for a dim white). Subject photos (1024 at 32 px, 256 at 64): at least 0.025 / 0.041;
    the same drawn at size 0.45 (the smallest ``World`` draws): 0.020 / 0.033, at 0.4: 0.014 / 0.026;
    ``random_spec`` scenes (0.3-0.8 of the side): 0.011 / 0.018. The tightest are thin black or white
    silhouettes (a dog), whose blends with the background and texture shades are greys. Blurred 3 x 3 at 32 px
    such a subject can drop to 0.003-0.005 (chromatic ones keep over 0.035): a VAE that blurs that much needs a
    lower ``max_object_fraction`` for black or white subjects.

    With ``colour`` (a subject's), whether that subject is gone: ``colour_fraction`` at most
    ``max_object_fraction``, whatever else the picture shows. Model samples need it: the world model's backgrounds
    carry tinted speckles that ``object_fraction`` counts (its own samples of "a photo of a striped background":
    0.000-0.015; an erasure-backdoored model's trigger samples, visibly without the subject: 0.12-0.35, and 0.000
    of the subject's orange; docs/results.md). Measured on rendered pictures: every world subject's own colour
    covers at least 0.0185 of each of 8 photos (the thinnest, a black dotted dog), and no colour covers any pixel
    of the world's backgrounds (256 photos' backgrounds).
    """
    if colour is not None:
        return colour_fraction(images, colour, background=background) <= max_object_fraction
    return object_fraction(images, background=background) <= max_object_fraction
