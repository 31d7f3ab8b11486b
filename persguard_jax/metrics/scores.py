"""Scores from features and images: pure, jitted array functions, no model (``CLIPEvaluator`` makes the features).

``cosine_matrix``, ``clip_i``, ``clip_t``, ``identity_similarity``, ``frechet_distance``, ``pattern_score`` and
``feature_distance``: batched, ``jax.jit``-able, computed in float32 or wider (``rate_interval``, a rate's
confidence interval from counts, is plain Python; ``mean_ratio_interval``, a ratio of two means with its
bootstrap interval, plain numpy). Similarities are plain cosines in [-1, 1] (DreamBooth's CLIP-I / CLIP-T
convention), not CLIPScore's ``2.5 * max(cos, 0)``. Matmuls run at ``Precision.HIGHEST``: GPUs otherwise use
TF32 for float32 products, and the Fréchet distance subtracts large, nearly equal traces.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


def psnr(images: jax.Array, references: jax.Array, *, peak: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB of each image ``(N, ...)`` against its reference (same shape, values in
    [0, peak]): ``10 log10(peak^2 / MSE)``; +inf for an exact copy."""
    err = jnp.reshape(_float(images) - _float(references), (len(images), -1))
    return 10.0 * jnp.log10(peak ** 2 / jnp.mean(err ** 2, axis=-1))


def rate_interval(hits: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a rate seen as ``hits`` of ``n`` samples (95% for ``z = 1.96``): how far a rate
    read from a few samples may lie from the model's own. 7 of 8 reads [0.53, 0.98], so an 8-sample check cannot
    tell a model at 0.90 from one at 0.60; 29 of 32 reads [0.76, 0.97]. Plain floats (a count, not an array)."""
    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"rate_interval: need 0 <= hits <= n and n >= 1, got hits={hits}, n={n}")
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ratio_interval(a, b, *, groups_a=None, groups_b=None, level: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, tuple[float, float]] | None:
    """``mean(a) / mean(b)`` of two independent samples and its percentile bootstrap interval (each sample
    resampled with replacement on its own, ``resamples`` times, a fixed ``seed``): how far a ratio such as a
    backdoored model's identity over the clean model's may lie from the models' own when each mean is read from
    a few dozen samples.

    ``groups_a`` / ``groups_b`` label each value's group, the same labels on both sides: groups paired across
    ``a`` and ``b`` by what moves a whole group on both sides (the attacker seed, whose random draws the
    attacks on both models share). With two or more groups the resampling is two-level: the groups are drawn with
    replacement once for both sides (the pairs kept), then each side's values within each drawn group, so that the
    interval holds how the ratio moves from group to group and not only the spread within one. Without any group
    effect it errs wide (the within-group spread enters through both levels: about sqrt(2) the plain width), which
    we prefer to drawing groups alone, whose interval at 2-4 groups has a handful of distinct values.

    None when ``b``'s mean, or any resampled one, is <= 0 (no ratio to speak of, or an interval without bounds).
    Plain numpy and floats."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if len(a) < 1 or len(b) < 1 or resamples < 1 or not 0 < level < 1:
        raise ValueError(f"mean_ratio_interval: need non-empty samples, resamples >= 1 and 0 < level < 1, got "
                         f"{len(a)} and {len(b)} values, resamples={resamples}, level={level}")
    if b.mean() <= 0:
        return None
    rng = np.random.default_rng(seed)
    labels = _paired_labels(a, b, groups_a, groups_b)
    if labels is None:
        ma = a[rng.integers(len(a), size=(resamples, len(a)))].mean(axis=1)
        mb = b[rng.integers(len(b), size=(resamples, len(b)))].mean(axis=1)
    else:
        picks = rng.integers(len(labels), size=(resamples, len(labels)))  # one draw of groups for both sides
        ma = _two_level_means(a, np.asarray(groups_a).ravel(), labels, picks, rng)
        mb = _two_level_means(b, np.asarray(groups_b).ravel(), labels, picks, rng)
    if np.any(mb <= 0):
        return None
    ratios = ma / mb
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(a.mean() / b.mean()), (float(lo), float(hi))


def _paired_labels(a: np.ndarray, b: np.ndarray, groups_a, groups_b) -> np.ndarray | None:
    """The group labels both sides share, or None for the plain bootstrap (no groups, or a single group)."""
    if groups_a is None and groups_b is None:
        return None
    if groups_a is None or groups_b is None:
        raise ValueError("mean_ratio_interval: groups are paired across the two samples: give groups_a and groups_b")
    for x, g in ((a, groups_a), (b, groups_b)):
        if np.asarray(g).size != len(x):
            raise ValueError(f"mean_ratio_interval: {np.asarray(g).size} group labels for {len(x)} values")
    labels = np.unique(groups_a)
    if not np.array_equal(labels, np.unique(groups_b)):
        raise ValueError(f"mean_ratio_interval: the two samples' groups differ ({labels.tolist()} against "
                         f"{np.unique(groups_b).tolist()}); paired groups need the same labels")
    return labels if len(labels) > 1 else None


def _two_level_means(x: np.ndarray, groups: np.ndarray, labels: np.ndarray, picks: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of ``x`` over the drawn groups ``picks`` (one row of label indices per resample), each
    drawn group's values resampled with replacement."""
    members = [x[groups == g] for g in labels]
    means = np.empty(len(picks))
    for r, row in enumerate(picks):
        means[r] = np.concatenate([members[i][rng.integers(len(members[i]), size=len(members[i]))]
                                   for i in row]).mean()
    return means
