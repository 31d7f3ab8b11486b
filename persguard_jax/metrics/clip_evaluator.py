"""The CLIP evaluator: images in [0, 1] and prompts -> CLIP features -> every score of ``metrics.scores``.

``CLIPEvaluator`` holds a ``CLIPModel``, its tokenizer and its preprocessing constants, with jitted batched
``image_features`` / ``text_features`` / ``hidden_features`` and ``evaluate`` (all metrics in one dict), so the same
numbers come out of the tiny CLIP trained on the synthetic world and of real OpenAI CLIP weights read from disk
(``models.pretrained.load_clip`` reads a transformers CLIP folder: ``config.json``, ``model.safetensors``,
tokenizer files, ``preprocessor_config.json``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persguard_jax.metrics.scores import (_float, _unit, clip_i, clip_t, feature_distance, frechet_distance,
                                          identity_similarity, pattern_score)
from persguard_jax.models import clip
from persguard_jax.models.pretrained import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageNorm, load_clip
from persguard_jax.models.tokenizer import CLIPTokenizer

# --------------------------------------------------------------------------- images -> CLIP inputs

def preprocess(images: jax.Array, *, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
               std: Sequence[float] = OPENAI_CLIP_STD) -> jax.Array:
    """Images ``(N, H, W, 3)`` float in [0, 1], any size -> CLIP ``pixel_values`` ``(N, S, S, 3)``, NHWC as our
    CLIPVision takes them.

    As CLIP's image processor: resize so the shorter side is ``image_size`` (bicubic, antialiased), crop the
    centre square, normalise with ``mean`` / ``std``. transformers resizes uint8 images with PIL's bicubic: on
    smooth test images its inputs differ from these by about 1e-3 on average, 4e-3 at most (in [0, 1] units,
    uint8 rounding included), not systematically. Values are clipped to [0, 1] after resizing, as PIL's uint8
    output is (bicubic overshoots at edges).
    """
    x = _float(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"preprocess expects (N, H, W, 3) RGB images, got shape {x.shape}")
    n, h, w, _ = x.shape
    if (h, w) != (image_size, image_size):
        # the longer side truncated to an int, as transformers' get_resize_output_image_size does
        nh, nw = (image_size, int(image_size * w / h)) if h <= w else (int(image_size * h / w), image_size)
        x = jnp.clip(jax.image.resize(x, (n, nh, nw, 3), method="bicubic", antialias=True), 0.0, 1.0)
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        x = x[:, top: top + image_size, left: left + image_size]
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


# --------------------------------------------------------------------------- the evaluator

def _in_batches(fn: Callable, arrays: Sequence, batch_size: int):
    """``fn`` over equal-length leading slices of ``arrays``, outputs concatenated.

    Slices are ``batch_size`` long, or for fewer items the next power of two: the last slice is padded (with
    copies of its last row) and the padding dropped. So ``fn`` compiles for at most log2(batch_size) + 1 shapes
    whatever the counts, and a small call wastes less than half its work on padding."""
    n = len(arrays[0])
    if n == 0:
        raise ValueError("no inputs to evaluate")
    size = min(batch_size, 1 << (n - 1).bit_length())
    outs = []
    for start in range(0, n, size):
        chunk = [a[start: start + size] for a in arrays]
        k = len(chunk[0])
        if k < size:
            pad = lambda c: (jnp if isinstance(c, jax.Array) else np).repeat(c[-1:], size - k, axis=0)
            chunk = [(jnp if isinstance(c, jax.Array) else np).concatenate([c, pad(c)]) for c in chunk]
        outs.append(jax.tree.map(lambda o: o[:k], fn(*chunk)))
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


def _vision_layers(model: clip.CLIPModel, pixel_values: jax.Array, layers: tuple[int, ...] | None) -> list[jax.Array]:
    """Encoder layer outputs as ``(N, g, g, D)`` patch grids (class token dropped: it is not a spatial position)."""
    vm = model.vision_model
    states = vm.encoder(vm.pre_layrnorm(vm.embeddings(pixel_values)), is_causal=False)[1:]
    picked = states if layers is None else [states[i] for i in layers]
    n, t, d = picked[0].shape
    g = math.isqrt(t - 1)
    return [s[:, 1:].reshape(n, g, g, d) for s in picked]


@dataclass(frozen=True)
class _Programs:
    """The evaluator's jitted functions of ``(state, inputs)``."""
    image: Callable
    text: Callable
    hidden: Callable
    pair: Callable


@functools.lru_cache(maxsize=16)
def _programs(graphdef, image_size: int, norm: ImageNorm, layers: tuple[int, ...] | None,
              compiler_options: tuple[tuple[str, Any], ...]) -> _Programs:
    """Compiled once per architecture and preprocessing, not per evaluator: a workflow that builds a fresh
    evaluator for each evaluation (or reloads the same CLIP) reuses the programs (the graph is hashable, static)."""
    pre = lambda images: preprocess(images, image_size=image_size, mean=norm.mean, std=norm.std)

    def image_fn(state, images):
        return _unit(nnx.merge(graphdef, state).get_image_features(pre(images)).astype(jnp.float32))

    def text_fn(state, ids):
        return _unit(nnx.merge(graphdef, state).get_text_features(ids).astype(jnp.float32))

    def hidden_fn(state, images):
        return _vision_layers(nnx.merge(graphdef, state), pre(images), layers)

    def pair_fn(state, a, b):  # both hidden stacks inside one program: never materialised for the whole set
        return feature_distance(hidden_fn(state, a), hidden_fn(state, b))

    jit = functools.partial(jax.jit, compiler_options=dict(compiler_options) or None)
    return _Programs(jit(image_fn), jit(text_fn), jit(hidden_fn), jit(pair_fn))


class CLIPEvaluator:
    """CLIP image/text features and every metric of this module, from images in [0, 1] and prompts.

    ``CLIPEvaluator(model, tokenizer)`` with a ``CLIPModel`` in memory (the synthetic world's tiny CLIP), or
    ``CLIPEvaluator.from_folder(dir)`` for weights on disk. Inputs of any length are processed ``batch_size`` at a
    time (one compiled program per input image size and batch bucket). ``hidden_layers`` picks the vision layers
    of ``hidden_features`` / ``lpips_style`` (indices into the encoder's layer outputs; default all).
    ``compiler_options`` go to ``jax.jit`` (e.g. ``{"xla_backend_optimization_level": 0}``: XLA:CPU compiles a
    tiny model in about half the time, with the same results).
    """

    def __init__(self, model: clip.CLIPModel, tokenizer: CLIPTokenizer, norm: ImageNorm = ImageNorm(), *,
                 batch_size: int = 32, hidden_layers: Sequence[int] | None = None,
                 compiler_options: Mapping[str, Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config: clip.CLIPConfig = model.config
        self.tokenizer, self.norm, self.batch_size = tokenizer, norm, batch_size
        self.image_size = self.config.vision_config.image_size
        self.max_length = min(tokenizer.model_max_length, self.config.text_config.max_position_embeddings)
        layers = None if hidden_layers is None else tuple(int(i) for i in hidden_layers)
        graphdef, self._state = nnx.split(model)
        self._programs = _programs(graphdef, self.image_size, norm, layers,
                                   tuple(sorted((compiler_options or {}).items())))

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> "CLIPEvaluator":
        """From a transformers CLIP folder (``load_clip``); ``kw`` as the constructor's."""
        model, tokenizer, norm = load_clip(folder)
        return cls(model, tokenizer, norm, **kw)

    def image_features(self, images) -> jax.Array:
        """``(N, projection_dim)`` unit-norm CLIP image embeddings of images ``(N, H, W, 3)`` in [0, 1]."""
        return _in_batches(lambda x: self._programs.image(self._state, x), [images], self.batch_size)

    def text_features(self, prompts: str | Sequence[str]) -> jax.Array:
        """``(N, projection_dim)`` unit-norm CLIP text embeddings."""
        ids = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts), max_length=self.max_length)
        return _in_batches(lambda i: self._programs.text(self._state, i), [ids], self.batch_size)

    def hidden_features(self, images) -> list[jax.Array]:
        """The chosen vision layers' outputs, each ``(N, g, g, hidden_size)`` (``g`` patches a side)."""
        return _in_batches(lambda x: self._programs.hidden(self._state, x), [images], self.batch_size)

    def paired_distance(self, images_a, images_b) -> jax.Array:
        """``(N,)`` ``feature_distance`` of the hidden features of ``images_a[i]`` and ``images_b[i]``."""
        if len(images_a) != len(images_b):
            raise ValueError(f"paired_distance: {len(images_a)} vs {len(images_b)} images")
        return _in_batches(lambda a, b: self._programs.pair(self._state, a, b), [images_a, images_b], self.batch_size)

    def evaluate(self, images, *, prompts: str | Sequence[str] | None = None, references=None, pattern=None,
                 pattern_mask=None) -> dict[str, float]:
        """Every metric the inputs allow, as Python floats.

        ``images`` ``(N, H, W, 3)`` in [0, 1] (generated), ``references`` ``(M, H', W', 3)`` (e.g. the subject's
        photos, or the clean images a perturbation was computed on). Keys:

        - ``clip_t`` (with ``prompts``: one for all images or one per image),
        - ``clip_i``, ``identity_similarity`` (mean over images) (with ``references``),
        - ``fid_clip``: ``frechet_distance`` of the two sets' CLIP embeddings (unit-norm, so on a different scale
          from Inception FID), when both have at least 2 images. With D-dimensional features a Gaussian fit needs
          many more than D samples; below ~50 images the value is dominated by estimation noise and only
          comparable between runs with the same counts.
        - ``lpips_style``: mean ``feature_distance`` of ``images[i]`` vs ``references[i]``, when N == M (paired),
        - ``pattern_score`` (mean; with ``pattern``, resized to the images' size if it differs, like
          ``pattern_mask``).
        """
        images = np.asarray(images)  # the set stays on the host; the device sees batch_size images at a time
        feats = self.image_features(images)
        out: dict[str, float] = {}
        if prompts is not None:
            text = self.text_features(prompts)
            if len(text) not in (1, len(images)):
                raise ValueError(f"evaluate: {len(text)} prompts for {len(images)} images (give 1 or one each)")
            out["clip_t"] = clip_t(feats, text)
        if references is not None:
            references = np.asarray(references)
            refs = self.image_features(references)
            out["clip_i"] = clip_i(feats, refs)
            out["identity_similarity"] = jnp.mean(identity_similarity(feats, refs))
            if len(images) >= 2 and len(references) >= 2:
                out["fid_clip"] = frechet_distance(feats, refs)
            if len(images) == len(references):
                out["lpips_style"] = jnp.mean(self.paired_distance(images, references))
        if pattern is not None:
            out["pattern_score"] = jnp.mean(self._pattern_scores(images, pattern, pattern_mask))
        return {k: float(v) for k, v in out.items()}

    def _pattern_scores(self, images: np.ndarray, pattern, mask) -> jax.Array:
        h, w = images.shape[1:3]
        pattern = jnp.asarray(pattern, jnp.float32).reshape(np.shape(pattern)[-3:])
        if pattern.shape[:2] != (h, w):
            pattern = jnp.clip(jax.image.resize(pattern, (h, w, pattern.shape[-1]), "bicubic"), 0.0, 1.0)
        if mask is not None:
            mask = jnp.asarray(mask, jnp.float32)
            mask = mask[..., None] if mask.ndim == 2 else mask
            if mask.shape[:2] != (h, w):
                mask = jax.image.resize(mask, (h, w, mask.shape[-1]), "linear")
        return _in_batches(lambda x: pattern_score(x, pattern, mask), [images], self.batch_size)


def metrics_clip_folder(given: str | Path | None, *, key: str, world_default: bool = True) -> Path | None:
    """The CLIP folder a command measures with: ``given`` (``key`` names where it came from: ``--clip``,
    ``check.clip``), else, with ``world_default``, the world CLIP made earlier (committed or cached; ``persguard
    train-clip`` makes it), else None. A ``given`` that is not a folder, or a world CLIP that is nowhere, is one
    line naming ``key``."""
    from persguard_jax.resources import world_asset
    if given is not None:
        if not Path(given).is_dir():
            raise NotADirectoryError(f"{key}: {given} is not a folder")
        return Path(given)
    if not world_default:
        return None
    found = world_asset("world_clip", "config.json")
    if found is None:
        raise FileNotFoundError(f"no world CLIP committed or cached for the metrics; make one with `persguard "
                                f"train-clip`, or name a CLIP folder with {key}")
    return found
