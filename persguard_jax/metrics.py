"""Evaluation metrics: pure, jitted functions on features and images, and a CLIP evaluator that makes the features.

Two layers, so the same numbers come out of the tiny CLIP trained on the synthetic world and of real OpenAI CLIP
weights read from disk:

- Array functions (no model): ``cosine_matrix``, ``clip_i``, ``clip_t``, ``identity_similarity``,
  ``frechet_distance``, ``pattern_score``, ``feature_distance``. Batched, ``jax.jit``-able, float32 or wider.
- ``CLIPEvaluator``: a ``CLIPModel``, its tokenizer and its preprocessing constants, with jitted batched
  ``image_features`` / ``text_features`` / ``hidden_features`` and ``evaluate`` (all metrics in one dict).
  ``models.pretrained.load_clip`` reads a transformers CLIP folder (``config.json``, ``model.safetensors``, tokenizer files,
  ``preprocessor_config.json``) with the same machinery as the Stable Diffusion folders (models/pretrained.py).

Similarities are plain cosines in [-1, 1] (DreamBooth's CLIP-I / CLIP-T convention), not CLIPScore's
``2.5 * max(cos, 0)``. Matmuls run at ``Precision.HIGHEST``: GPUs otherwise use TF32 for float32 products, and the
Fréchet distance subtracts large, nearly equal traces.
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

from persguard_jax.models import clip
from persguard_jax.models.pretrained import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageNorm, load_clip
from persguard_jax.models.tokenizer import CLIPTokenizer

_HI = jax.lax.Precision.HIGHEST
_EPS = 1e-12


# --------------------------------------------------------------------------- features -> scores

def _float(x) -> jax.Array:
    """At least float32: bf16 features from a bf16 model would lose the small differences the metrics measure."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _unit(x: jax.Array, axis: int = -1) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), _EPS)


@jax.jit
def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
    """``(N, D), (M, D) -> (N, M)`` cosine similarities (rows need not be normalised)."""
    return jnp.matmul(_unit(_float(a)), _unit(_float(b)).T, precision=_HI)


@jax.jit
def clip_i(image_feats: jax.Array, ref_feats: jax.Array) -> jax.Array:
    """DreamBooth's CLIP-I: the mean cosine over all (generated, reference) pairs of image embeddings."""
    return jnp.mean(cosine_matrix(image_feats, ref_feats))


@jax.jit
def clip_t(image_feats: jax.Array, text_feats: jax.Array) -> jax.Array:
    """DreamBooth's CLIP-T: the mean cosine of each image embedding with its prompt's text embedding.

    ``text_feats`` is ``(N, D)`` (one prompt per image), or ``(1, D)`` / ``(D,)`` (one prompt for all)."""
    img, txt = _unit(_float(image_feats)), _unit(jnp.atleast_2d(_float(text_feats)))
    return jnp.mean(jnp.sum(img * txt, axis=-1))  # (1, D) broadcasts over the images


@jax.jit
def identity_similarity(feats: jax.Array, ref_feats: jax.Array) -> jax.Array:
    """``(N,)``: the cosine of each embedding with the mean reference embedding (Anti-DreamBooth's ISM).

    The paper embeds faces with ArcFace; any embedding works here (CLIP image features in ``CLIPEvaluator``).
    The references are averaged as given (not unit-normalised first), as ISM does."""
    centre = jnp.mean(_float(ref_feats), axis=0, keepdims=True)
    return cosine_matrix(feats, centre)[:, 0]


def _psd_sqrt(s: jax.Array) -> jax.Array:
    """The symmetric square root of a PSD matrix; round-off negative eigenvalues are clipped to 0."""
    w, v = jnp.linalg.eigh(s)
    return jnp.matmul(v * jnp.sqrt(jnp.clip(w, 0.0)), v.T, precision=_HI)


def _mean_cov(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    mu = jnp.mean(x, axis=0)
    xc = x - mu
    return mu, jnp.matmul(xc.T, xc, precision=_HI) / (x.shape[0] - 1)  # unbiased, as np.cov and FID


@jax.jit
def frechet_distance(feats_a: jax.Array, feats_b: jax.Array) -> jax.Array:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)`` (N, M >= 2).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b)``. ``S_a S_b`` is not symmetric, but it is similar to
    the PSD matrix ``sqrt(S_a) S_b sqrt(S_a)``, whose eigenvalues ``eigh`` finds on any backend (scipy's ``sqrtm``
    runs on the host only): the trace of the root is the sum of their square roots. In float32 the result carries
    round-off of about 1e-6 times the traces; pass float64 features (with ``jax_enable_x64``) for more.
    """
    a, b = _float(feats_a), _float(feats_b)
    mu_a, s_a = _mean_cov(a)
    mu_b, s_b = _mean_cov(b)
    root_a = _psd_sqrt(s_a)
    m = jnp.matmul(jnp.matmul(root_a, s_b, precision=_HI), root_a, precision=_HI)
    eig = jnp.linalg.eigvalsh((m + m.T) / 2)  # symmetrised: round-off makes it slightly asymmetric
    tr_sqrt = jnp.sum(jnp.sqrt(jnp.clip(eig, 0.0)))
    fd = jnp.sum(jnp.square(mu_a - mu_b)) + jnp.trace(s_a) + jnp.trace(s_b) - 2.0 * tr_sqrt
    return jnp.maximum(fd, 0.0)  # >= 0 exactly; identical sets would otherwise give round-off like -2e-5


@jax.jit
def pattern_score(images: jax.Array, pattern: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``(N,)`` in [-1, 1]: how strongly a known pattern shows in each image (normalised cross-correlation).

    ``images`` ``(N, H, W, C)`` and ``pattern`` ``(H, W, C)`` or ``(1, H, W, C)`` are floats in [0, 1]; ``mask``
    ``(H, W)``, ``(H, W, 1)`` or ``(H, W, C)`` weights where the pattern lives (default: everywhere). Both are
    centred by their (masked) mean over pixels and channels, so a brightness offset does not count: 1 is the
    pattern itself (at any contrast), about 0 unrelated content, -1 the inverted pattern. A flat image scores 0.
    """
    x = _float(images)
    if math.prod(jnp.shape(pattern)) != math.prod(x.shape[1:]):
        raise ValueError(f"pattern_score: pattern shape {jnp.shape(pattern)} does not match images {x.shape}")
    p = jnp.broadcast_to(_float(pattern).reshape(x.shape[1:]), x.shape)
    m = jnp.ones(x.shape[1:], x.dtype) if mask is None else _float(mask)
    if m.ndim == 2:
        m = m[..., None]
    m = jnp.broadcast_to(m, x.shape)
    axes = (1, 2, 3)
    total = jnp.maximum(jnp.sum(m, axis=axes, keepdims=True), _EPS)
    xc = x - jnp.sum(m * x, axis=axes, keepdims=True) / total
    pc = p - jnp.sum(m * p, axis=axes, keepdims=True) / total
    num = jnp.sum(m * xc * pc, axis=axes)
    den = jnp.sqrt(jnp.sum(m * xc * xc, axis=axes) * jnp.sum(m * pc * pc, axis=axes))
    return num / jnp.maximum(den, _EPS)


@jax.jit
def feature_distance(feats_a: Sequence[jax.Array], feats_b: Sequence[jax.Array]) -> jax.Array:
    """``(N,)``: an LPIPS-style perceptual distance between paired deep features, without learned weights.

    ``feats_a[l]`` / ``feats_b[l]`` are layer ``l``'s features ``(N, ..., C)``, channels last, any spatial axes
    between (tokens, an ``(h, w)`` grid, or none). Per layer: unit-normalise along channels, square the
    difference, average over spatial positions, sum over channels; then average over layers. LPIPS proper weighs
    the channels with linear heads trained on human judgements (and sums the layers); with no such weights for
    CLIP every channel counts once, so the values are comparable between runs, not to published LPIPS numbers.
    """
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError(f"feature_distance: {len(feats_a)} and {len(feats_b)} layers (need the same, at least 1)")
    per_layer = []
    for a, b in zip(feats_a, feats_b):
        if a.shape != b.shape:
            raise ValueError(f"feature_distance: layer shapes differ, {a.shape} vs {b.shape}")
        a = _float(a).reshape(a.shape[0], -1, a.shape[-1])
        b = _float(b).reshape(b.shape[0], -1, b.shape[-1])
        diff = jnp.square(_unit(a) - _unit(b))
        per_layer.append(jnp.sum(jnp.mean(diff, axis=1), axis=-1))
    return jnp.mean(jnp.stack(per_layer), axis=0)


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
    ``compiler_options`` go to ``jax.jit`` (tests pass ``{"xla_backend_optimization_level": 0}`` to compile the
    tiny model faster).
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
