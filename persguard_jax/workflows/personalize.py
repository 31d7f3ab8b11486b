"""``persguard personalize``: DreamBooth with prior preservation on the engine, the simulated attacker.

Reads a diffusers pipeline folder and a folder of instance photos, samples (or reads) class images for prior
preservation, caches VAE posteriors and prompts (``persguard_jax.dreambooth``), splits what trains
(``persguard_jax.trainable``: UNet, UNet + text encoder, or LoRA) and trains ``losses.dreambooth_loss`` through
``train.fit``. Writes into ``out``: ``checkpoints/`` (Orbax, resumable), ``metrics.jsonl``, ``class_images/`` (the
cache, unless ``class_dir`` names another folder), ``model/`` (the personalised pipeline, diffusers layout),
``samples.png`` (eval prompts), ``config.yaml`` (the resolved config) and ``results.json``.

The library function ``personalize(pipe, photos, config, out)`` is the recipe other workflows and experiments
call; ``WORKFLOW`` is the command.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.dreambooth import DreamBoothConfig
from persguard_jax.workflows import runs


def _optimizer(d: dict):
    from persguard_jax.train import OptimizerConfig
    return OptimizerConfig.from_dict(d)


def _loss(d: dict) -> dict:
    """The ``loss`` section: checked now (unknown keys fail before any work), kept as a mapping because the
    prediction type and the latent scale come from the model at run time."""
    from persguard_jax.losses import LossConfig
    LossConfig.from_dict(d)
    return dict(d)


def sections() -> dict[str, runs.SectionParser]:
    """The config sections of a personalisation run and their parsers (imports the engine: call when running)."""
    from persguard_jax.lora import LoRAConfig
    from persguard_jax.sharding import MeshConfig
    from persguard_jax.train import LoopConfig, StepConfig
    return {"dreambooth": DreamBoothConfig.from_dict, "optimizer": _optimizer, "step": StepConfig.from_dict,
            "loss": _loss, "mesh": MeshConfig.from_dict, "loop": LoopConfig.from_dict,
            "lora": runs.optional(LoRAConfig.from_dict)}




def resolve(raw: dict, args: argparse.Namespace | None = None) -> dict:
    """Command-line prompts into ``dreambooth``; the loop runs ``dreambooth.steps``; the learning-rate schedule
    spans them unless the config says otherwise."""
    raw = dict(raw)
    db = dict(cfglib.section(raw, "dreambooth"))
    for key in ("instance_prompt", "class_prompt"):
        value = getattr(args, key, None) if args is not None else None
        if value:
            db[key] = value
    raw["dreambooth"] = db
    steps = DreamBoothConfig.from_dict(db).steps
    raw["loop"] = {**cfglib.section(raw, "loop"), "num_steps": steps}
    raw["optimizer"] = {"total_steps": steps, **cfglib.section(raw, "optimizer")}
    return raw


def parse_config(raw: dict) -> runs.Config:
    """A personalisation config (a YAML mapping) resolved and parsed, every section checked."""
    return runs.parse_config(resolve(raw), sections())


def personalize(pipe, instance_images: np.ndarray, config: runs.Config, out: str | Path, *,
                class_dir: str | Path | None = None) -> dict:
    """DreamBooth on ``pipe`` with the photos ``instance_images`` (float32 in [-1, 1] at the config's resolution,
    as ``data.images.load_folder`` reads them) into the
    run folder ``out`` (already prepared: ``runs.start_run``). Returns the results (process 0 also writes them,
    the model, samples and class images); ``{"preempted": True, ...}`` when SIGTERM stopped it."""
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
    source, map_fn = dreambooth_source(pipe, instance_images, class_images, db,
                                       text_trains=split.trains("text_encoder"))
    scheduler_cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
    loss_cfg = losses.LossConfig.from_dict({"prediction_type": scheduler_cfg.prediction_type,
                                            "scaling_factor": pipe.vae.config.scaling_factor, **config.loss})
    loss_fn = split.loss(losses.bind(losses.dreambooth_loss, model=model, schedule=make_schedule(scheduler_cfg),
                                     cfg=loss_cfg, prior_weight=db.prior_weight if db.use_prior else 0.0))
    result, frozen = fit(loss_fn, split.params, split.frozen, train_logical=split.params_logical,
                         frozen_logical=split.frozen_logical, source=source, global_batch=db.batch_size,
                         workdir=out, optimizer=config.optimizer, loop=config.loop, step=config.step,
                         mesh_cfg=config.mesh, seed=db.seed, map_fn=map_fn)
    if result.preempted:
        return {"preempted": True, "step": result.step}

    final = split.full_params(to_host(result.state.params), to_host(frozen))
    results = {"steps": result.step, "resumed_from": result.resumed_from, "final_metrics": result.last_metrics,
               "instance_images": len(instance_images),
               "class_images": 0 if class_images is None else len(class_images), "trainable": split.mode,
               "model": str(out / "model"), "samples": str(out / "samples.png")}
    if is_writer():
        from persguard_jax.models import save_pipeline
        save_pipeline(pipe.with_params(final), out / "model", overwrite=True)
        prompts = list(db.eval_prompts) or [db.instance_prompt, db.class_prompt]
        images = text_to_image(pipe, [p for p in prompts for _ in range(db.eval_num_images)],
                               db.eval_negative_prompt, num_steps=db.eval_steps, guidance_scale=db.eval_guidance,
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


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    """``persguard personalize``: read every input before anything is written, then the recipe."""
    from persguard_jax.data.images import load_folder
    from persguard_jax.models import load_pipeline
    class_dir = config.dreambooth.class_dir
    if class_dir and Path(class_dir).exists() and not Path(class_dir).is_dir():
        raise NotADirectoryError(f"dreambooth.class_dir: {class_dir} is not a folder")
    photos = load_folder(args.instance_dir, config.dreambooth.resolution)  # bad photos fail here, all named
    pipe = load_pipeline(args.model)
    check_resolution(pipe, config.dreambooth.resolution)
    out = runs.start_run(args.out, config.raw, overwrite=args.overwrite, resume=args.resume)
    results = personalize(pipe, photos, config, out)
    results.pop("params", None)
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline folder to personalise")
    parser.add_argument("--instance-dir", required=True, help="folder of the subject's photos (jpg, png, webp)")
    parser.add_argument("--instance-prompt", help='e.g. "a photo of sks person" (default: from the config)')
    parser.add_argument("--class-prompt", help='e.g. "a photo of person" (default: from the config)')


def _summary(results: dict) -> str:
    return (f"personalised model: {results['model']}\nsamples: {results['samples']}\n"
            f"results: {Path(results['model']).parent / 'results.json'} ({results['steps']} steps in "
            f"{results.get('wall_s', '?')} s)")


WORKFLOW = runs.Workflow(
    name="personalize", help="DreamBooth with prior preservation (the simulated attacker)",
    config="dreambooth_sd15", sections=sections, run=run, summary=_summary, arguments=_arguments,
    resolve=resolve, out_help="new folder for checkpoints, the model, samples and results",
    example="dreambooth.steps=400 lora.rank=4")
