"""DiffShortcut's diagnosis of protective perturbations as shortcut learning (numpy in, Python floats out).

The paper's evidence that a protection works by shortcut: a perturbed photo sits further from its prompt in CLIP
space than the clean photo (and than uniform noise of the same l_inf size), a zero-shot probe calls it "noise"
more often, and a model DreamBooth-trained on perturbed photos draws the noise when prompted with the identifier
alone. ``clip_shift`` and ``noise_probe`` measure the first two with any CLIP; ``high_frequency_energy`` is a
model-free reading of "this sample is noise" (a tiny world CLIP may not know the words "noise pattern").
"""
from __future__ import annotations

import numpy as np


def uniform_noise_like(clean: np.ndarray, perturbed: np.ndarray, seed: int = 0) -> np.ndarray:
    """Uniform random noise added to ``clean`` uint8 photos, each photo's amplitude the l_inf size of its
    protective perturbation (``perturbed - clean``), clipped to [0, 255] and rounded: the control that should do
    no harm."""
    clean16, pert16 = clean.astype(np.int16), perturbed.astype(np.int16)
    radius = np.abs(pert16 - clean16).reshape(len(clean), -1).max(1)[:, None, None, None]
    noise = np.random.default_rng(seed).uniform(-1.0, 1.0, clean.shape) * radius
    return np.clip(np.round(clean16 + noise), 0, 255).astype(np.uint8)


def clip_shift(evaluator, sets: dict[str, np.ndarray], clean: np.ndarray, prompt: str) -> dict[str, dict]:
    """For each named set of uint8 photos: the mean cosine similarity to ``prompt`` and to the clean photo it
    came from (pairwise), and the mean CLIP-space distance (1 - cosine) to both."""
    text = np.asarray(evaluator.text_features([prompt]))[0]
    ref = np.asarray(evaluator.image_features(clean.astype(np.float32) / 255.0))
    out = {}
    for name, images in sets.items():
        feats = np.asarray(evaluator.image_features(images.astype(np.float32) / 255.0))
        to_prompt = feats @ text
        to_clean = np.sum(feats * ref, axis=1)
        out[name] = {"similarity_to_prompt": float(to_prompt.mean()), "distance_to_prompt": float(1 - to_prompt.mean()),
                     "similarity_to_clean": float(to_clean.mean()), "distance_to_clean": float(1 - to_clean.mean())}
    return out


def noise_probe(evaluator, images: np.ndarray, class_prompt: str, noise_prompt: str = "noise pattern") -> float:
    """The fraction of uint8 ``images`` a zero-shot CLIP probe calls ``noise_prompt`` rather than ``class_prompt``."""
    feats = np.asarray(evaluator.image_features(images.astype(np.float32) / 255.0))
    text = np.asarray(evaluator.text_features([class_prompt, noise_prompt]))
    return float(np.mean((feats @ text.T).argmax(1) == 1))


def high_frequency_energy(images: np.ndarray) -> float:
    """Mean squared response of the discrete Laplacian over uint8 images, in [0, 1] units (edges extended): what
    fine noise patterns add and smooth drawings lack."""
    x = images.astype(np.float64) / 255.0
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    lap = 4 * x - p[:, :-2, 1:-1] - p[:, 2:, 1:-1] - p[:, 1:-1, :-2] - p[:, 1:-1, 2:]
    return float(np.mean(lap ** 2))
