"""``persguard personalize``: DreamBooth with prior preservation on the engine, the simulated attacker.

Reads a diffusers pipeline folder and a folder of instance photos, generates (or reads) class images for prior
preservation, caches VAE latents (mean/logvar, sampled each step) and, when the text encoder is frozen, the
prompt embeddings, then trains with ``dreambooth_loss`` through the engine's step and loop. Writes into ``out``:
``checkpoints/`` (Orbax, resumable), ``metrics.jsonl``, ``class_images/`` (the cache, unless ``class_dir`` names
another folder), ``model/`` (the personalised pipeline, diffusers layout), ``samples.png`` (eval prompts),
``config.yaml`` (the resolved config) and ``results.json``.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from persguard_jax import config as cfglib
from persguard_jax import resources
from persguard_jax.workflows.runs import check_sections, start_run

DEFAULT_CONFIG = resources.config_path("dreambooth_sd15")


@dataclass(frozen=True)
class DreamBoothConfig(cfglib.Section):
    SECTION = "dreambooth"
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1                 # instance examples per step (each paired with one class example)
    prior_weight: float = 1.0           # lambda; 0 turns prior preservation off (no class images needed)
    num_class_images: int = 200
    class_dir: str | None = None        # read (and top up) class images here; default <out>/class_images
    class_sample_steps: int = 50
    class_guidance: float = 7.5
    class_negative_prompt: str = ""
    class_batch_size: int = 8
    train_text_encoder: bool = True
    remat: str = "none"                 # none | dots_saveable | full
    seed: int = 0
    eval_prompts: tuple[str, ...] = ()  # default: the instance and the class prompt
    eval_num_images: int = 4
    eval_steps: int = 50
    eval_guidance: float = 7.5
    eval_negative_prompt: str = ""

    def __post_init__(self):
        object.__setattr__(self, "eval_prompts", tuple(self.eval_prompts or ()))
        if self.steps < 1 or self.batch_size < 1 or self.resolution < 8:
            raise cfglib.ConfigError(f"dreambooth config: steps, batch_size >= 1 and resolution >= 8 required, got "
                                     f"steps={self.steps} batch_size={self.batch_size} resolution={self.resolution}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DreamBoothConfig":
        # a YAML "key:" with no value means "the default" here, except class_dir where None is the default
        return super().from_dict({k: v for k, v in dict(d or {}).items() if v is not None or k == "class_dir"})


@dataclass
class Settings:
    """Every section of a personalisation config, parsed."""
    dreambooth: DreamBoothConfig
    optimizer: Any
    step: Any
    loss: dict
    mesh: Any
    loop: Any
    lora: Any = None
    raw: dict = field(default_factory=dict)


def parse_config(raw: dict) -> Settings:
    from persguard_jax.lora import LoRAConfig
    from persguard_jax.sharding import MeshConfig
    from persguard_jax.train import LoopConfig, OptimizerConfig, StepConfig
    check_sections(raw, {"dreambooth", "optimizer", "step", "loss", "mesh", "loop", "lora"})
    db = DreamBoothConfig.from_dict(cfglib.section(raw, "dreambooth"))
    loop = dict(cfglib.section(raw, "loop"))
    loop["num_steps"] = db.steps
    opt = dict(cfglib.section(raw, "optimizer"))
    opt.setdefault("total_steps", db.steps)
    lora = raw.get("lora")
    return Settings(dreambooth=db, optimizer=OptimizerConfig.from_dict(opt),
                    step=StepConfig.from_dict(cfglib.section(raw, "step")), loss=dict(cfglib.section(raw, "loss")),
                    mesh=MeshConfig.from_dict(cfglib.section(raw, "mesh")), loop=LoopConfig.from_dict(loop),
                    lora=LoRAConfig.from_dict(lora) if lora else None, raw=raw)


# --------------------------------------------------------------------------- class images

def ensure_class_images(pipe, folder: Path, cfg: DreamBoothConfig) -> None:
    """Top ``folder`` up to ``num_class_images`` PNGs sampled from the model with the class prompt. Image ``i``
    always comes from seed offset ``i``: an interrupted generation resumes where it stopped."""
    from tqdm.auto import tqdm

    from persguard_jax.data.images import IMAGE_SUFFIXES
    from persguard_jax.report import save_png
    from persguard_jax.sample import text_to_image
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = cfg.num_class_images - len(have)
    if missing <= 0:
        return
    start = len(have)
    bar = tqdm(total=missing, desc="class images", unit="img")
    for offset in range(start, cfg.num_class_images, cfg.class_batch_size):
        n = min(cfg.class_batch_size, cfg.num_class_images - offset)
        images = text_to_image(pipe, [cfg.class_prompt] * n, cfg.class_negative_prompt,
                               num_steps=cfg.class_sample_steps, guidance_scale=cfg.class_guidance,
                               seed=cfg.seed + 1, seed_offset=offset, height=cfg.resolution, width=cfg.resolution,
                               progress=False)
        for j, image in enumerate(images):
            pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
            save_png(pixels, folder / f"class_{offset + j:05d}.png")  # atomic: a crash leaves no half file
        bar.update(n)
    bar.close()


# --------------------------------------------------------------------------- caching

@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x)


def encode_latents(pipe, images: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """VAE posterior (mean, logvar) of images in [-1, 1], computed once; a draw is taken every step. The jitted
    encoder is cached per VAE graph, so later calls on the same model (class images, a second run) reuse it."""
    graphdef, state = nnx.split(pipe.vae)
    batch = max(1, min(batch, len(images)))
    means, logvars = [], []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch].astype(np.float32)
        n = len(chunk)
        if n < batch:  # pad the last chunk: one compiled shape for the whole run
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
        m, lv = _encode(graphdef, state, chunk)
        means.append(np.asarray(m, np.float32)[:n])
        logvars.append(np.asarray(lv, np.float32)[:n])
    return np.concatenate(means), np.concatenate(logvars)


class PairSource:
    """Item ``i``: instance example ``i mod n_inst`` and class example ``i mod n_class`` stacked as ``(2, ...)``
    (the class half repeats the instance one when prior preservation is off)."""

    def __init__(self, instance: Mapping[str, np.ndarray], prior: Mapping[str, np.ndarray] | None):
        self.instance, self.prior = instance, prior
        self.n_inst = len(next(iter(instance.values())))
        self.n_prior = len(next(iter(prior.values()))) if prior else 0

    def __len__(self) -> int:
        return max(self.n_inst, self.n_prior)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        inst = {k: v[i % self.n_inst] for k, v in self.instance.items()}
        other = {k: v[i % self.n_prior] for k, v in self.prior.items()} if self.prior else inst
        return {k: np.stack([inst[k], other[k]]) for k in inst}


# --------------------------------------------------------------------------- the run

def personalize(model_dir: str | Path, instance_dir: str | Path, out: str | Path, raw_config: dict, *,
                overwrite: bool = False, resume: bool = False) -> dict:
    """Run DreamBooth; returns the results dict (also written to ``out/results.json``)."""
    import jax

    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.data.images import load_folder
    from persguard_jax.models import load_pipeline, save_pipeline
    from persguard_jax.models import functional as F
    from persguard_jax.models.remat import set_remat
    from persguard_jax.report import image_grid, save_png, write_results
    from persguard_jax.sample import encode_text, text_to_image
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.train import fit
    from persguard_jax.workflows.dreambooth import dreambooth_loss, pairs_to_examples

    settings = parse_config(raw_config)
    db = settings.dreambooth
    out = Path(out)
    t0 = time.time()
    # read every input before anything is written: bad photos fail here, naming them all
    instance_images = load_folder(instance_dir, db.resolution)
    pipe = load_pipeline(model_dir)
    start_run(out, settings.raw, overwrite=overwrite, resume=resume)

    use_prior = db.prior_weight > 0
    if use_prior:
        class_dir = Path(db.class_dir) if db.class_dir else out / "class_images"
        ensure_class_images(pipe, class_dir, db)
        class_images = load_folder(class_dir, db.resolution)[: db.num_class_images]

    print(f"encoding {len(instance_images)} instance" + (f" and {len(class_images)} class" if use_prior else "")
          + " images with the VAE (cached for all steps)")
    inst_mean, inst_logvar = encode_latents(pipe, instance_images)
    instance = {"latent_mean": inst_mean, "latent_logvar": inst_logvar}
    prior = None
    if use_prior:
        cls_mean, cls_logvar = encode_latents(pipe, class_images)
        prior = {"latent_mean": cls_mean, "latent_logvar": cls_logvar}
    if db.train_text_encoder:
        instance["input_ids"] = np.repeat(pipe.tokenizer([db.instance_prompt]), len(inst_mean), 0)
        if prior:
            prior["input_ids"] = np.repeat(pipe.tokenizer([db.class_prompt]), len(prior["latent_mean"]), 0)
    else:  # frozen text encoder: the two prompt embeddings are computed once
        instance["context"] = np.repeat(np.asarray(encode_text(pipe, [db.instance_prompt])), len(inst_mean), 0)
        if prior:
            prior["context"] = np.repeat(np.asarray(encode_text(pipe, [db.class_prompt])),
                                         len(prior["latent_mean"]), 0)

    # model -> params; what trains
    set_remat(pipe.unet, db.remat)
    set_remat(pipe.text_encoder, db.remat)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    trainable = ["unet", "text_encoder"] if db.train_text_encoder else ["unet"]
    scheduler_cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
    loss_cfg = losses.LossConfig.from_dict({"prediction_type": scheduler_cfg.prediction_type,
                                            "scaling_factor": pipe.vae.config.scaling_factor, **settings.loss})
    loss_kw = dict(model=model, schedule=make_schedule(scheduler_cfg), cfg=loss_cfg,
                   prior_weight=db.prior_weight if use_prior else 0.0)
    if settings.lora is not None:
        from persguard_jax import lora as loralib
        lora_params = loralib.init_lora(params, settings.lora, jax.random.key(db.seed))
        # distinct top-level names: the step merges the trainable and the frozen tree before calling the loss
        train_params, frozen = {"lora": lora_params}, {"base": params}
        train_logical = {"lora": loralib.lora_logical_axes(logical, lora_params)}
        frozen_logical = {"base": logical}

        def loss_fn(p, batch, rng):
            return dreambooth_loss(loralib.apply_lora(p["base"], p["lora"], settings.lora), batch, rng, **loss_kw)
    else:
        train_params, frozen = F.partition(params, trainable)
        train_logical, frozen_logical = F.partition(logical, trainable)

        def loss_fn(p, batch, rng):
            return dreambooth_loss(p, batch, rng, **loss_kw)

    result, frozen = fit(loss_fn, train_params, frozen, train_logical=train_logical, frozen_logical=frozen_logical,
                         source=PairSource(instance, prior), global_batch=db.batch_size, workdir=out,
                         optimizer=settings.optimizer, loop=settings.loop, step=settings.step,
                         mesh_cfg=settings.mesh, seed=db.seed, map_fn=pairs_to_examples)
    if result.preempted:
        return {"preempted": True, "step": result.step}

    # write the personalised weights back into the modules, export, sample
    trained = jax.device_get(result.state.params)
    if settings.lora is not None:
        from persguard_jax import lora as loralib
        final = loralib.apply_lora(jax.device_get(frozen["base"]), trained["lora"], settings.lora)
    else:
        final = F.merge(trained, jax.device_get(frozen))
    set_remat(pipe.unet, "none")
    set_remat(pipe.text_encoder, "none")
    F.update_modules(modules, final)
    model_out = save_pipeline(pipe, out / "model", overwrite=True)
    prompts = list(db.eval_prompts) or [db.instance_prompt, db.class_prompt]
    images = text_to_image(pipe, [p for p in prompts for _ in range(db.eval_num_images)], db.eval_negative_prompt,
                           num_steps=db.eval_steps, guidance_scale=db.eval_guidance, seed=db.seed,
                           height=db.resolution, width=db.resolution)
    save_png(image_grid(images, ncols=db.eval_num_images), out / "samples.png")
    results = {"steps": result.step, "resumed_from": result.resumed_from, "final_metrics": result.last_metrics,
               "instance_images": len(instance_images), "class_images": len(class_images) if use_prior else 0,
               "trainable": "lora" if settings.lora is not None else trainable,
               "model": str(model_out), "samples": str(out / "samples.png"), "wall_s": round(time.time() - t0, 1)}
    # the run owns ``out`` (start_run checked it): a resumed run's results replace the earlier ones
    write_results(out, results, title="DreamBooth personalisation", overwrite=True)
    return results

