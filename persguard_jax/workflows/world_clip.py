"""``persguard train-clip``: the synthetic world's CLIP, trained contrastively, for the metrics.

The same ``CLIPModel`` port that reads OpenAI's weights, at toy size (32 px images in 4 px patches, two 64-d
layers per tower), trained with ``losses.clip_contrastive_loss`` (symmetric InfoNCE) on world scenes and their
captions through ``train.fit``. Evaluated zero-shot on the held-out ``val`` split: for each image, its true caption
against the same caption with the colour (or the shape) swapped for every other one; ``colour_accuracy`` and
``shape_accuracy`` are how often the true one scores highest. Writes a transformers CLIP folder (``model/``:
config.json, model.safetensors, tokenizer files, preprocessor_config.json) that ``CLIPEvaluator.from_folder``
reads exactly as it reads openai/clip-vit-large-patch14.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.io import uint8_to_unit
from persguard_jax.workflows import runs
# The world's pixel statistics are not ImageNet's; CLIP's own recipe normalises with the training set's.
WORLD_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@dataclass(frozen=True)
class ClipTrainConfig(cfglib.Section):
    SECTION = "clip"
    BOUNDS = {"seed": "[0, inf)", "dataset_size": "[1, inf)", "class_fraction": "[0, 1]", "vocab_size": "[8, inf)",
              "steps": "[1, inf)", "batch_size": "[2, inf)", "eval_size": "[1, inf)"}
    seed: int = 0
    dataset_size: int = 20000
    class_fraction: float = 0.1      # class photos repeat captions ("a photo of a dog"): in-batch false negatives
    vocab_size: int = 512
    steps: int = 600
    batch_size: int = 128
    eval_size: int = 512             # held-out (val) scenes for the zero-shot accuracies


# The contrastive recipe's optimizer (CLIP's: AdamW, warm-up then cosine, weight decay 0.1); the config's
# ``optimizer`` section overrides any key, and its ``total_steps`` is ``clip.steps``.
CLIP_OPTIMIZER = {"learning_rate": 2e-3, "schedule": "cosine", "warmup_steps": 30, "weight_decay": 0.1,
                  "max_grad_norm": 1.0}


def sections() -> dict[str, runs.SectionParser]:
    """The config sections of world-CLIP training and their parsers."""
    from persguard_jax.data.world import WorldConfig
    from persguard_jax.sharding import MeshConfig
    from persguard_jax.train import OptimizerConfig, StepConfig
    return {"world": WorldConfig.from_dict, "clip": ClipTrainConfig.from_dict, "optimizer": OptimizerConfig.from_dict,
            "model": runs.checked(lambda d: clip_config(d, vocab_size=512, image_size=32)), "step": StepConfig.from_dict,
            "mesh": MeshConfig.from_dict, "loop": runs.small_run_loop}


def resolve(raw: dict, args=None) -> dict:
    """The optimizer's defaults and its schedule's length (``clip.steps``) under the config's own keys."""
    raw = dict(raw)
    steps = ClipTrainConfig.from_dict(cfglib.section(raw, "clip")).steps
    raw["optimizer"] = {**CLIP_OPTIMIZER, "total_steps": steps, **cfglib.section(raw, "optimizer")}
    return raw


def parse_config(raw: dict) -> runs.Config:
    return runs.parse_config(resolve(raw), sections())


def clip_config(model: Mapping[str, Any], vocab_size: int, image_size: int):
    """The ``model`` section as a ``CLIPConfig`` (the tokenizer's vocabulary and the world's image size filled in)."""
    from persguard_jax.models import clip
    d = dict(model)
    cfglib.check_known(d, clip.CLIPConfig, "model")  # transformers' reader would ignore unknown keys
    for tower, cls in (("text_config", clip.CLIPTextConfig), ("vision_config", clip.CLIPVisionConfig)):
        if not isinstance(d.get(tower) or {}, Mapping):
            raise cfglib.ConfigError(f"model.{tower}: must be a mapping, got {d[tower]!r}")
        cfglib.check_known(d.get(tower) or {}, cls, f"model.{tower}")
    d["text_config"] = {**(d.get("text_config") or {}), "vocab_size": vocab_size}
    d["vision_config"] = {**(d.get("vision_config") or {}), "image_size": image_size}
    return clip.CLIPConfig.from_dict(d, source="model")


def build_clip(settings: runs.Config, vocab_size: int):
    from persguard_jax.models import clip
    from persguard_jax.models.init import random_init
    cfg = clip_config(settings.model, vocab_size, settings.world.image_size)
    return random_init(clip.CLIPModel, cfg, seed=settings.clip.seed)


def pixel_values(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 world images -> the normalised NHWC floats the world CLIP takes (``WORLD_NORM``)."""
    mean, std = (np.asarray(WORLD_NORM[k], np.float32) for k in ("mean", "std"))
    return (uint8_to_unit(images_uint8) - mean) / std


def zero_shot(evaluator, world, size: int, split: str = "val") -> dict[str, float]:
    """Zero-shot accuracies on ``size`` held-out scenes: the true caption against every colour (shape) swap."""
    from persguard_jax.data.world import ALL_SHAPES, COLOURS, SHAPES
    specs = [world.random_spec(i, split) for i in range(size)]
    images = uint8_to_unit(np.stack([world.render(s) for s in specs]))
    img = np.asarray(evaluator.image_features(images))
    out = {}
    for attr, options in (("colour", list(COLOURS)), ("shape", list(ALL_SHAPES))):
        keep = [i for i, s in enumerate(specs) if attr != "shape" or s.shape in SHAPES + tuple(world.cfg.classes)]
        prompts = [world.caption(dataclasses.replace(specs[i], **{attr: o})) for i in keep for o in options]
        txt = np.asarray(evaluator.text_features(prompts)).reshape(len(keep), len(options), -1)
        scores = np.einsum("nd,nkd->nk", img[keep], txt)
        truth = np.array([options.index(getattr(specs[i], attr)) for i in keep])
        out[f"{attr}_accuracy"] = float(np.mean(scores.argmax(1) == truth))
        out[f"{attr}_chance"] = 1.0 / len(options)
    return out


def train_clip(out: str | Path, settings: runs.Config, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Train the world CLIP into ``out``; returns the results (also in ``out/results.json``)."""

    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.data.batches import ArraySource
    from persguard_jax.data.world import World, render_dataset
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.models import functional as F
    from persguard_jax.models.pretrained import ImageNorm, save_clip
    from persguard_jax.report import write_results
    from persguard_jax.train import fit
    from persguard_jax.train.distributed import is_writer, to_host

    cfg = settings.clip
    out = Path(out)
    t0 = time.time()
    world = World(settings.world)
    tokenizer = world.tokenizer(cfg.vocab_size, max_length=settings.model.get("text_config", {}).get(
        "max_position_embeddings", 77))
    model = build_clip(settings, tokenizer.vocab_size)
    runs.start_run(out, settings.raw, overwrite=overwrite, resume=resume, command="train-clip")

    images, captions = render_dataset(world, cfg.dataset_size, class_fraction=cfg.class_fraction)
    source = ArraySource({"images": images, "input_ids": np.asarray(tokenizer(captions), np.int32)})
    mods, params = F.split_modules({"clip": model})
    loss_fn = losses.bind(losses.clip_contrastive_loss, model=mods)
    loop = runs.loop_config(settings.loop, cfg.steps)
    result, _ = fit(loss_fn, params, {}, train_logical={"clip": shd.logical_axes(model)}, frozen_logical={},
                    source=source, global_batch=cfg.batch_size, workdir=out, optimizer=settings.optimizer, loop=loop,
                    step=settings.step, mesh_cfg=settings.mesh, seed=cfg.seed,
                    map_fn=lambda b: {"pixel_values": pixel_values(b["images"]), "input_ids": b["input_ids"]})
    if result.preempted:
        return {"preempted": True, "step": result.step}
    F.update_modules({"clip": model}, to_host(result.state.params))
    results = {"model": str(out / "model"), "steps": result.step, "final_metrics": result.last_metrics}
    if not is_writer():
        return results
    norm = ImageNorm(**WORLD_NORM)
    save_clip(model, tokenizer, out / "model", norm)
    results.update(zero_shot(CLIPEvaluator(model, tokenizer, norm), world, cfg.eval_size),
                   wall_s=round(time.time() - t0, 1))
    # the run owns ``out`` (start_run checked it): a resumed run's results replace the earlier ones
    write_results(out, results, title="World CLIP training", overwrite=True)
    return results


def _summary(results: dict) -> str:
    return (f"world CLIP: {results['model']}\nzero-shot on held-out scenes: colour "
            f"{results['colour_accuracy']:.2f} (chance {results['colour_chance']:.2f}), shape "
            f"{results['shape_accuracy']:.2f} (chance {results['shape_chance']:.2f}); {results['wall_s']} s")


WORKFLOW = runs.Workflow(
    name="train-clip", help="train the synthetic world's CLIP (for the metrics)", config="world_clip",
    sections=sections, run=runs.into_out(train_clip), summary=_summary, resolve=resolve, out="runs/world_clip",
    example="clip.steps=800 optimizer.learning_rate=1e-3")
