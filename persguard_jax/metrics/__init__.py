"""Evaluation metrics, in three modules:

- ``scores``: pure, jitted array functions on features and images (no model): ``cosine_matrix``, ``clip_i``,
  ``clip_t``, ``identity_similarity``, ``frechet_distance``, ``pattern_score``, ``feature_distance``, ``psnr``;
  ``rate_interval`` and ``mean_ratio_interval`` (intervals, plain Python and numpy).
- ``clip_evaluator``: ``CLIPEvaluator`` (a CLIP model that makes the features, and ``evaluate``: every score in
  one dict) and ``preprocess`` (CLIP's image preprocessing), for the world's tiny CLIP and real OpenAI weights alike.
- ``detectors``: the synthetic world's pixel detectors, ``dominant_colour``, ``detect_shape``, ``detect_texture``
  and ``detect_mark``, and the backdoor outputs' ``pattern_presence``, ``detect_pattern``, ``object_fraction``,
  ``colour_fraction`` and ``detect_erasure`` (numpy only).
"""
from persguard_jax.metrics.clip_evaluator import CLIPEvaluator, metrics_clip_folder, preprocess
from persguard_jax.metrics.detectors import (colour_fraction, detect_erasure, detect_mark, detect_pattern,
                                             detect_shape, detect_texture, dominant_colour, object_fraction,
                                             pattern_presence)
from persguard_jax.metrics.scores import (clip_i, clip_t, cosine_matrix, feature_distance, frechet_distance,
                                          identity_similarity, mean_ratio_interval, pattern_score, psnr,
                                          rate_interval)
# imported by the single-module metrics.py these replace; kept so ``metrics.OPENAI_CLIP_MEAN`` etc. still resolve
from persguard_jax.models.pretrained import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageNorm, load_clip

__all__ = ["CLIPEvaluator", "ImageNorm", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_i", "clip_t", "cosine_matrix",
           "colour_fraction", "detect_erasure", "detect_mark", "detect_pattern", "detect_shape", "detect_texture",
           "dominant_colour", "feature_distance", "frechet_distance", "identity_similarity", "load_clip",
           "mean_ratio_interval", "metrics_clip_folder", "object_fraction", "pattern_presence", "pattern_score",
           "preprocess", "psnr", "rate_interval"]
