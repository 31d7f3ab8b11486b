"""Prompt following of a world model: does it draw the colour, silhouette and texture its prompt asks for?

Each check samples prompts that name one attribute (``colour_prompts``, ``shape_prompts``, ``texture_prompts``)
and scores the samples with the world's pixel detectors (``metrics.detectors``), never with a learned model.
``following`` returns ``{key}_accuracy``, ``{key}_chance`` and ``per_{key}``. Pre-training reports it for the
model it made; implantation reports it for the clean and the backdoored model (utility on general prompts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from persguard_jax.io import unit_to_uint8


@dataclass(frozen=True)
class Sampling:
    """How the checks sample: DDIM steps, guidance, seed, DDIM's ``eta`` (0: deterministic; 1: the ancestral
    DDPM-like sampler) and the parameters to sample (None: the pipeline's)."""
    num_steps: int = 25
    guidance_scale: float = 4.0
    seed: int = 0
    eta: float = 0.0
    params: Mapping[str, Any] | None = None


def colour_prompts(world) -> list[tuple[str, str]]:
    """(colour, prompt) pairs of the colour-following check: one plain-background circle per colour."""
    from persguard_jax.data.world import COLOURS, SceneSpec
    return [(c, world.caption(SceneSpec(shape="circle", colour=c))) for c in COLOURS]


def shape_prompts(world, per_shape: int) -> list[tuple[str, str]]:
    """(shape, prompt) pairs of the shape-following check: every shape and class of ``world``, each in
    ``per_shape`` colours (cycling through the palette), centred on a plain background."""
    from persguard_jax.data.world import COLOURS, SceneSpec
    colours = list(COLOURS)
    return [(shape, world.caption(SceneSpec(shape=shape, colour=colours[(k * per_shape + j) % len(colours)])))
            for k, shape in enumerate(world.shapes) for j in range(per_shape)]


def texture_prompts(world, per_texture: int) -> list[tuple[str, str]]:
    """(texture, prompt) pairs of the texture-following check: every texture ``per_texture`` times, on shapes and
    colours cycling through the world's, large (the texture detector's reliable size at 32 px) and centred on a
    plain background ("a photo of a large red striped circle on a plain background")."""
    from persguard_jax.data.world import COLOURS, TEXTURES, SceneSpec
    colours, shapes = list(COLOURS), world.shapes
    pairs = []
    for k, texture in enumerate(TEXTURES):
        for j in range(per_texture):
            n = k * per_texture + j
            spec = SceneSpec(shape=shapes[n % len(shapes)], colour=colours[n % len(colours)], texture=texture,
                             size=0.7)
            pairs.append((texture, world.caption(spec)))
    return pairs


def sample_pixels(pipe, world, prompts: list[str], sampling: Sampling) -> np.ndarray:
    """uint8 samples of ``prompts`` at the world's image size."""
    from persguard_jax.sample import text_to_image
    images = text_to_image(pipe, prompts, num_steps=sampling.num_steps, guidance_scale=sampling.guidance_scale,
                           seed=sampling.seed, eta=sampling.eta, height=world.cfg.image_size,
                           width=world.cfg.image_size, params=sampling.params)
    return unit_to_uint8(images)


def following(pipe, world, pairs: list[tuple[str, str]], names: list[str], detect: Callable[[np.ndarray], Any],
              key: str, sampling: Sampling = Sampling()) -> tuple[np.ndarray, dict]:
    """Sample each (label, prompt) pair and score how often ``detect`` (pixels -> index into ``names``) finds
    the label asked for: the samples, and ``{key}_accuracy``, ``{key}_chance`` and ``per_{key}``."""
    pixels = sample_pixels(pipe, world, [p for _, p in pairs], sampling)
    want = np.array([names.index(label) for label, _ in pairs])
    got = np.asarray(detect(pixels))
    per = {name: float(np.mean(got[want == i] == i)) for i, name in enumerate(names) if np.any(want == i)}
    return pixels, {f"{key}_accuracy": float(np.mean(got == want)), f"{key}_chance": 1.0 / len(names),
                    f"per_{key}": per}


def colour_following(pipe, world, per_colour: int, sampling: Sampling = Sampling()) -> tuple[np.ndarray, dict]:
    """Every colour prompt ``per_colour`` times: how often the dominant colour is the one asked for."""
    from persguard_jax.data.world import COLOURS
    from persguard_jax.metrics.detectors import dominant_colour
    pairs = [pair for pair in colour_prompts(world) for _ in range(per_colour)]
    return following(pipe, world, pairs, list(COLOURS), dominant_colour, "colour", sampling)


def shape_following(pipe, world, per_shape: int, sampling: Sampling = Sampling()) -> tuple[np.ndarray, dict]:
    """Every shape prompt ``per_shape`` times: how often the detected silhouette (``metrics.detect_shape``, 0.99 on
    rendered scenes) is the one asked for."""
    from persguard_jax.metrics.detectors import detect_shape
    shapes = world.shapes
    return following(pipe, world, shape_prompts(world, per_shape), list(shapes),
                     lambda pixels: detect_shape(pixels, shapes), "shape", sampling)


def texture_following(pipe, world, per_texture: int, sampling: Sampling = Sampling()) -> tuple[np.ndarray, dict]:
    """Every texture prompt ``per_texture`` times: how often ``metrics.detect_texture`` (0.99 on rendered medium and
    large objects at 32 px) finds the texture asked for."""
    from persguard_jax.data.world import TEXTURES
    from persguard_jax.metrics.detectors import detect_texture
    return following(pipe, world, texture_prompts(world, per_texture), list(TEXTURES),
                     lambda pixels: detect_texture(pixels, texture_period=world.cfg.texture_period), "texture",
                     sampling)
