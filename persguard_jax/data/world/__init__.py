"""The synthetic world: small captioned RGB scenes of shapes and "subjects", drawn with numpy from a seed.

It stands in for photos and their captions where Stable Diffusion weights cannot be had: a tiny text-to-image
model is pre-trained on it in minutes on a CPU, a tiny CLIP is trained on it, and the DreamBooth / backdoor /
protection workflows run on its subjects. Three modules, one job each:

- ``scenes``: the vocabulary (colours, shapes, textures, backgrounds), ``SceneSpec``, the signed-distance
  renderer, captions and ``parse_caption``: pure functions of a spec.
- ``subjects``: ``WorldConfig``, ``Subject`` and ``World``: the seeded draws (scenes, subjects, the held-out
  split, photos), the prompts and the tokenizer.
- ``sources``: the world as data: ``WorldSource`` (grain), ``render_dataset``, ``save_photos``, and ``world_of``
  (the world a pre-trained world model folder was trained on). ``tfds`` (not
  imported here: it needs tensorflow-datasets) writes the same items as a tensorflow-datasets dataset.

Judging pictures of the world (the colour and shape detectors) is measurement, so it lives in
``persguard_jax.metrics.detectors``. Importing this package pulls in neither jax nor tensorflow.
"""
from persguard_jax.data.world.scenes import (ALL_SHAPES, BACKGROUNDS, CLASSES, COLOURS, MARK_POSITIONS, SHAPES,
                                             TEXTURES, SceneSpec, parse_caption)
from persguard_jax.data.world.sources import (WORLD_FILE, WorldSource, is_world_model, render_dataset, save_photos,
                                              world_of)
from persguard_jax.data.world.subjects import SPLITS, Subject, World, WorldConfig

__all__ = ["ALL_SHAPES", "BACKGROUNDS", "CLASSES", "COLOURS", "MARK_POSITIONS", "SHAPES", "SPLITS", "TEXTURES",
           "SceneSpec", "Subject", "WORLD_FILE", "World", "WorldConfig", "WorldSource", "is_world_model",
           "parse_caption", "render_dataset", "save_photos", "world_of"]
