"""``personalize``: DreamBooth with prior preservation on the engine, the recipe ``persguard personalize`` runs and
other workflows simulate the attacker with (the demo; implantation's check, on the clean and the backdoored model).

``config`` is a parsed personalisation config: its ``dreambooth``, ``optimizer``, ``loss``, ``step``, ``mesh``,
``loop``, ``lora`` and ``cdl`` sections (contrastive decoupling learning's prompt and sampling policy,
``dreambooth.cdl``), as ``recipe_sections`` parses them from a mapping ``resolve_recipe`` completed
(``workflows.personalize.parse_config`` does both).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.dreambooth.cdl import CDLConfig
from persguard_jax.dreambooth.config import DreamBoothConfig


def _optimizer(d: dict):
    from persguard_jax.train import OptimizerConfig
    return OptimizerConfig.from_dict(d)


def _loss(d: dict) -> dict:
    """The ``loss`` section: checked now (unknown keys fail before any work), kept as a mapping because the
    prediction type and the latent scale come from the model at run time."""
    from persguard_jax.losses import LossConfig
    LossConfig.from_dict(d)
    return dict(d)


def _lora(d: dict):
    from persguard_jax.lora import LoRAConfig
    return LoRAConfig.from_dict(d) if d else None  # absent or null: no LoRA


def recipe_sections() -> dict[str, Callable[[dict], Any]]:
    """The config sections of a personalisation run and their parsers (imports the engine: call when running)."""
    from persguard_jax.sharding import MeshConfig
    from persguard_jax.train import LoopConfig, StepConfig
    return {"dreambooth": DreamBoothConfig.from_dict, "optimizer": _optimizer, "step": StepConfig.from_dict,
            "loss": _loss, "mesh": MeshConfig.from_dict, "loop": LoopConfig.from_dict, "lora": _lora,
            "cdl": CDLConfig.from_dict}


def training_prompts(config: Any) -> DreamBoothConfig:
    """The ``dreambooth`` section with the prompts the photos and class images are trained under: the config's
    own, or contrastive decoupling learning's (``cdl.enabled``)."""
    db, cdl = config.dreambooth, config.get("cdl")
    if cdl is None or not cdl.enabled:
        return db
    return dataclasses.replace(db, instance_prompt=cdl.instance_prompt(db.instance_prompt),
                               class_prompt=cdl.class_prompt(db.class_prompt))


def sampling_policy(config: Any, prompts: Sequence[str]) -> tuple[list[str], str, float]:
    """(prompts, negative prompt, guidance scale) a personalised model is sampled with: the recipe's, or CDL's
    ("..., without <phrase> noisy pattern" against its quality negative prompt)."""
    db, cdl = config.dreambooth, config.get("cdl")
    if cdl is None or not cdl.enabled:
        return list(prompts), db.eval_negative_prompt, db.eval_guidance
    return ([cdl.sampling_prompt(p) for p in prompts], cdl.negative_prompt,
            cdl.guidance_scale(db.eval_guidance))


def resolve_recipe(raw: dict) -> dict:
    """The loop runs ``dreambooth.steps``; the learning-rate schedule spans them unless the config says otherwise."""
    raw = dict(raw)
    steps = DreamBoothConfig.from_dict(cfglib.section(raw, "dreambooth")).steps
    raw["loop"] = {**cfglib.section(raw, "loop"), "num_steps": steps}
    raw["optimizer"] = {"total_steps": steps, **cfglib.section(raw, "optimizer")}
    return raw


def personalize(pipe, instance_images: np.ndarray, config: Any, out: str | Path, *,
                class_dir: str | Path | None = None) -> dict:
    """DreamBooth on ``pipe`` with the photos ``instance_images`` (float32 in [-1, 1] at the config's resolution,
    as ``data.images.load_folder`` reads them) into the run folder ``out`` (already prepared:
    ``workflows.runs.start_run``). Returns the results with the trained ``params`` (process 0 also writes the
    results, the model, samples and class images); ``{"preempted": True, ...}`` when SIGTERM stopped it."""
    import jax

    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.dreambooth import dreambooth_source, ensure_class_images
    from persguard_jax.models import functional as F
    from persguard_jax.models.remat import set_remat
    from persguard_jax.report import image_grid, save_png, write_results
    from persguard_jax.sample import text_to_image
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.train import fit
    from persguard_jax.train.distributed import is_writer, to_host
    from persguard_jax.trainable import split_trainable, trainable_mode

    db: DreamBoothConfig = config.dreambooth
    out = Path(out)
    t0 = time.time()
    class_images = None
    if db.use_prior:
        folder = Path(class_dir or db.class_dir or out / "class_images")
        class_images = ensure_class_images(pipe, folder, db)
    set_remat(pipe.unet, db.remat)
    set_remat(pipe.text_encoder, db.remat)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    set_remat(pipe.unet, "none")  # the graph is captured in ``model``; the pipeline samples without remat
    set_remat(pipe.text_encoder, "none")
    split = split_trainable(params, logical, trainable_mode(db.train_text_encoder, config.lora), lora=config.lora,
                            rng=jax.random.key(db.seed))
    print(f"encoding {len(instance_images)} instance" + (f" and {len(class_images)} class" if db.use_prior else "")
          + " images with the VAE (cached for all steps)")
    # prompts are encoded once unless the text encoder trains (LoRA adapters on it included)
    source, map_fn = dreambooth_source(pipe, instance_images, class_images, training_prompts(config),
                                       text_trains=split.trains("text_encoder"))
    scheduler_cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
    loss_cfg = losses.pipeline_loss_config(pipe, config.loss)
    loss_fn = split.loss(losses.bind(losses.dreambooth_loss, model=model, schedule=make_schedule(scheduler_cfg),
                                     cfg=loss_cfg, prior_weight=db.prior_weight if db.use_prior else 0.0))
    result, frozen = fit(loss_fn, split.params, split.frozen, train_logical=split.params_logical,
                         frozen_logical=split.frozen_logical, source=source, global_batch=db.batch_size,
                         workdir=out, optimizer=config.optimizer, loop=config.loop, step=config.step,
                         mesh_cfg=config.mesh, seed=db.seed, map_fn=map_fn)
    if result.preempted:
        return {"preempted": True, "step": result.step}

    final = split.full_params(to_host(result.state.params), to_host(frozen))
    trained_on = training_prompts(config)
    results = {"steps": result.step, "resumed_from": result.resumed_from, "final_metrics": result.last_metrics,
               "instance_prompt": trained_on.instance_prompt, "class_prompt": trained_on.class_prompt,
               "instance_images": len(instance_images),
               "class_images": 0 if class_images is None else len(class_images), "trainable": split.mode,
               "model": str(out / "model"), "samples": str(out / "samples.png")}
    if is_writer():
        from persguard_jax.models import save_pipeline
        save_pipeline(pipe.with_params(final), out / "model", overwrite=True)
        prompts, negative, guidance = sampling_policy(config, list(db.eval_prompts) or [db.instance_prompt,
                                                                                         db.class_prompt])
        results["sampling"] = {"prompts": prompts, "negative_prompt": negative, "guidance_scale": guidance}
        images = text_to_image(pipe, [p for p in prompts for _ in range(db.eval_num_images)],
                               negative, num_steps=db.eval_steps, guidance_scale=guidance,
                               seed=db.seed, height=db.resolution, width=db.resolution, params=final)
        save_png(image_grid(images, ncols=db.eval_num_images), out / "samples.png")
        results["wall_s"] = round(time.time() - t0, 1)
        # the run owns ``out`` (start_run checked it): a resumed run's results replace the earlier ones
        write_results(out, results, title="DreamBooth personalisation", overwrite=True)
    return {**results, "params": final}


def check_resolution(pipe, resolution: int) -> None:
    """``dreambooth.resolution`` must be a size the model's VAE can encode (before any class image is drawn)."""
    from persguard_jax.sample import latent_shape
    try:
        latent_shape(pipe, resolution, resolution)
    except ValueError as e:
        raise ValueError(f"dreambooth.resolution: {e}") from None
