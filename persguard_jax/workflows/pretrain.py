"""``persguard pretrain``: the synthetic world's text-to-image model, trained from scratch on a CPU in minutes.

Stable Diffusion's recipe at toy scale, every stage on the engine (``train.fit``: sharded step, Orbax
checkpoints, metrics, resumable):

1. ``vae``: a tiny AutoencoderKL on world images (``losses.vae_loss``: reconstruction + a small KL).
2. latents: the training images encoded once (posterior mean and log-variance); the latent scale is fitted as
   SD's was: ``scaling_factor = 1 / std(latents)``.
3. ``unet``: UNet and CLIP text encoder trained together from scratch on the cached latents with the world's
   captions, a fraction of them dropped to the empty prompt so classifier-free guidance works.
4. export: a diffusers pipeline folder (``model/``), ``samples.png`` (one row per colour), ``shape_samples.png``
   (one row per shape), ``texture_samples.png`` (one row per texture), ``results.json`` / ``results.md`` with the
   VAE's reconstruction PSNR on held-out scenes and how often the samples follow the prompt's colour
   (``metrics.dominant_colour``), shape (``metrics.detect_shape``, per shape and class) and texture
   (``metrics.detect_texture``), and ``config.yaml``.

The output folder is the run's: ``vae/`` and ``unet/`` hold the stage checkpoints and metrics (an interrupted
run resumes with ``--resume``), ``model/`` the result.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.io import uint8_to_signed, uint8_to_unit
from persguard_jax.workflows import runs
# A stage's optimizer defaults (the same ``optimizer`` keys as every workflow's ``optimizer`` section; its
# ``total_steps`` is the stage's ``steps``): from-scratch training wants a larger, decaying rate than fine-tuning.
STAGE_OPTIMIZER = {"learning_rate": 1e-3, "schedule": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0}


@dataclass(frozen=True)
class StageConfig(cfglib.Section):
    """One training stage: its length, batch and ``optimizer`` (an ``OptimizerConfig`` mapping)."""
    BOUNDS = {"steps": "[1, inf)", "batch_size": "[1, inf)"}
    steps: int = 500
    batch_size: int = 32
    optimizer: Any = None

    def __post_init__(self):
        super().__post_init__()
        from persguard_jax.train import OptimizerConfig
        if not isinstance(self.optimizer, OptimizerConfig):
            given = self.optimizer if self.optimizer is not None else {}
            if not isinstance(given, Mapping):
                raise cfglib.ConfigError(f"{self.SECTION}.optimizer: must be a mapping, got {given!r}")
            object.__setattr__(self, "optimizer", OptimizerConfig.from_dict(
                {**STAGE_OPTIMIZER, "total_steps": max(self.steps, 1), **given}, where=f"{self.SECTION}.optimizer"))


@dataclass(frozen=True)
class VAEStageConfig(StageConfig):
    SECTION = "pretrain.vae"
    BOUNDS = {**StageConfig.BOUNDS, "kl_weight": "[0, inf)", "edge_weight": "[0, inf)"}
    kl_weight: float = 1e-4
    edge_weight: float = 0.0   # losses.vae_loss's high-pass term (finite differences' squared error)


@dataclass(frozen=True)
class DecoderStageConfig(VAEStageConfig):
    """The VAE's decoder alone, after the VAE stage, with its encoder frozen: the latents (and so the UNet's
    training data and ``scaling_factor``) stay what the VAE stage made, the decoder learns to draw them sharper
    (run o's decoder: 27.4 -> 31.0 dB with the high-pass term; docs/benchmarks.md). ``steps: 0``: no stage.
    ``kl_weight`` changes only the logged loss here: the KL term depends on the frozen encoder alone."""
    SECTION = "pretrain.decoder"
    BOUNDS = {**VAEStageConfig.BOUNDS, "steps": "[0, inf)"}
    steps: int = 0


@dataclass(frozen=True)
class UNetStageConfig(StageConfig):
    SECTION = "pretrain.unet"
    BOUNDS = {**StageConfig.BOUNDS, "caption_dropout": "[0, 1)", "min_snr_gamma": "(0, inf)", "ema_decay": "[0, 1)"}
    caption_dropout: float = 0.1     # fraction of captions replaced by "" (the unconditional model for CFG)
    min_snr_gamma: float | None = 5.0  # Min-SNR-gamma loss weights (Hang et al. 2023): ~3x faster convergence
    ema_decay: float | None = None   # keep an exponential moving average of the weights and export it


@dataclass(frozen=True)
class PretrainConfig(cfglib.Section):
    """The ``pretrain`` section: the training set, the evaluation, and the two stages."""
    SECTION = "pretrain"
    BOUNDS = {"seed": "[0, inf)", "dataset_size": "[1, inf)", "class_fraction": "[0, 1]", "simple_fraction": "[0, 1]",
              "vocab_size": "[8, inf)", "eval_steps": "[1, inf)", "eval_per_colour": "[1, inf)",
              "eval_per_shape": "[1, inf)", "eval_per_texture": "[1, inf)",
              "eval_vae_scenes": "[1, inf)"}
    seed: int = 0
    dataset_size: int = 20000        # world images rendered once and reused by both stages
    class_fraction: float = 0.3      # photos of (non-held-out) class members, for the class prompts
    simple_fraction: float = 0.0     # one centred object, canonical caption (``World.simple_spec``)
    vocab_size: int = 512
    eval_steps: int = 25             # DDIM steps of the evaluation samples
    eval_guidance: float = 4.0
    eval_per_colour: int = 4         # samples per colour prompt (the colour-following check)
    eval_per_shape: int = 4          # samples per shape prompt, in as many colours (the shape-following check)
    eval_per_texture: int = 8        # samples per texture prompt, on shapes and colours in turn (texture following)
    eval_vae_scenes: int = 256       # held-out scenes the VAE's reconstruction PSNR is measured on
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    unet: UNetStageConfig = field(default_factory=UNetStageConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, where: str | None = None) -> "PretrainConfig":
        if not isinstance(d, (Mapping, type(None))):
            raise cfglib.ConfigError(f"pretrain: must be a mapping, got {d!r}")
        d = dict(d or {})
        stages = {name: stage.from_dict(d.pop(name, None)) for name, stage in
                  (("vae", VAEStageConfig), ("decoder", DecoderStageConfig), ("unet", UNetStageConfig))}
        return dataclasses.replace(super().from_dict(d, where=where), **stages)


def model_configs(models: Mapping[str, Any], vocab_size: int, image_size: int) -> dict:
    """The ``models`` section as the three modules' configs (the tokenizer's vocabulary, the world's image size,
    the text width and the latent channels filled in); an error names the section and key."""
    from persguard_jax.models import clip, unet, vae
    missing = {"unet", "vae", "text_encoder"} - set(models)
    if missing:
        raise cfglib.ConfigError(f"models: needs unet, vae and text_encoder; missing {sorted(missing)}")
    for name in ("unet", "vae", "text_encoder"):
        if not isinstance(models[name], Mapping):
            raise cfglib.ConfigError(f"models.{name}: must be a mapping, got {models[name]!r}")
    cfglib.check_known(models["text_encoder"], clip.CLIPTextConfig, "models.text_encoder")  # its reader ignores them
    text = clip.CLIPTextConfig.from_dict({**models["text_encoder"], "vocab_size": vocab_size},
                                         source="models.text_encoder")
    autoencoder = vae.VAEConfig.from_dict({**models["vae"], "sample_size": image_size}, source="models.vae")
    # the UNet denoises the VAE's latents: its input and output channels are the latent channels
    channels = autoencoder.latent_channels
    for key in ("in_channels", "out_channels"):
        if models["unet"].get(key, channels) != channels:
            raise cfglib.ConfigError(f"models.unet.{key}: must equal models.vae.latent_channels ({channels}), got "
                                     f"{models['unet'][key]!r} (leave it out: it is filled in)")
    return {"text_encoder": text,
            "unet": unet.UNetConfig.from_dict({**models["unet"], "cross_attention_dim": text.hidden_size,
                                               "in_channels": channels, "out_channels": channels},
                                              source="models.unet"),
            "vae": autoencoder}


def _scheduler(d: dict) -> None:
    from persguard_jax.schedulers import SchedulerConfig
    SchedulerConfig.from_dict(d, source="scheduler")


def sections() -> dict[str, runs.SectionParser]:
    """The config sections of world pre-training and their parsers."""
    from persguard_jax.data.world import WorldConfig
    from persguard_jax.sharding import MeshConfig
    from persguard_jax.train import StepConfig
    return {"world": WorldConfig.from_dict, "pretrain": PretrainConfig.from_dict,
            "models": runs.checked(lambda d: model_configs(d, vocab_size=512, image_size=32)),
            "scheduler": runs.checked(_scheduler), "step": StepConfig.from_dict, "mesh": MeshConfig.from_dict,
            "loop": runs.small_run_loop}


def parse_config(raw: dict) -> runs.Config:
    return runs.parse_config(raw, sections())


# --------------------------------------------------------------------------- pieces

def build_pipeline(settings: runs.Config, tokenizer) -> Any:
    """Randomly initialised modules of the configured sizes (numpy init: seconds, not minutes, on a CPU)."""
    from persguard_jax.models import clip, unet, vae
    from persguard_jax.models.init import random_init
    from persguard_jax.models.pretrained import Pipeline
    from persguard_jax.schedulers import SchedulerConfig
    seed = settings.pretrain.seed
    configs = model_configs(settings.models, tokenizer.vocab_size, settings.world.image_size)
    return Pipeline(unet=random_init(unet.UNet2DConditionModel, configs["unet"], seed=seed),
                    vae=random_init(vae.AutoencoderKL, configs["vae"], seed=seed + 1),
                    text_encoder=random_init(clip.CLIPTextModel, configs["text_encoder"], seed=seed + 2),
                    tokenizer=tokenizer, scheduler_config=SchedulerConfig.from_dict(settings.scheduler).to_dict())


def training_set(world, cfg: PretrainConfig) -> tuple[np.ndarray, list[str]]:
    """The scenes every stage trains on (uint8 images, captions): ``cfg.dataset_size`` of ``render_dataset``'s
    training split, deterministic in the world's seed, so a stage re-run apart (``experiments/world_decoder.py``)
    sees the same ones."""
    from persguard_jax.data.world import render_dataset
    return render_dataset(world, cfg.dataset_size, class_fraction=cfg.class_fraction,
                          simple_fraction=cfg.simple_fraction)


def _to_signed_range(batch: dict) -> dict:
    return {"images": uint8_to_signed(batch["images"])}


# the VAE's parts that make the latent space; the decoder stage leaves them frozen
ENCODER_PARTS = ("encoder", "quant_conv")


def train_vae(pipe, images: np.ndarray, settings: runs.Config, workdir: Path, *, decoder_only: bool = False):
    """The VAE stage (``pretrain.vae``), or with ``decoder_only`` the decoder stage (``pretrain.decoder``: the
    parts outside ``ENCODER_PARTS`` trained, those frozen), on ``losses.vae_loss``; ``pipe.vae`` updated in place."""
    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.data.batches import ArraySource
    from persguard_jax.models import functional as F
    from persguard_jax.train import distributed, fit
    stage = settings.pretrain.decoder if decoder_only else settings.pretrain.vae
    model, params = F.split_modules({"vae": pipe.vae})
    logical = {"vae": shd.logical_axes(pipe.vae)}
    frozen_parts = ENCODER_PARTS if decoder_only else ()

    def part(tree: dict, frozen: bool) -> dict:
        kept = {k: v for k, v in tree["vae"].items() if (k in frozen_parts) == frozen}
        return {"vae": kept} if kept else {}

    loss_fn = losses.bind(losses.vae_loss, model=model, kl_weight=stage.kl_weight,
                           edge_weight=stage.edge_weight)
    result, _ = fit(loss_fn, part(params, False), part(params, True), train_logical=part(logical, False),
                    frozen_logical=part(logical, True), source=ArraySource({"images": images}),
                    global_batch=stage.batch_size, workdir=workdir, optimizer=stage.optimizer,
                    loop=runs.loop_config(settings.loop, stage.steps), step=settings.step,
                    mesh_cfg=settings.mesh, seed=settings.pretrain.seed, map_fn=_to_signed_range)
    F.update_modules({"vae": pipe.vae}, distributed.to_host(result.state.params))
    return result


def encode_dataset(pipe, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    from persguard_jax.dreambooth import encode_latents
    return encode_latents(pipe.vae, uint8_to_signed(images), batch=batch)


def train_unet(pipe, latents: tuple[np.ndarray, np.ndarray], input_ids: np.ndarray, settings: runs.Config,
               workdir: Path):
    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.data.batches import ArraySource
    from persguard_jax.models import functional as F
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.train import distributed, fit
    stage = settings.pretrain.unet
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    model, params = F.split_modules(modules)
    scheduler_cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
    loss_cfg = losses.LossConfig(prediction_type=scheduler_cfg.prediction_type, min_snr_gamma=stage.min_snr_gamma,
                                 scaling_factor=pipe.vae.config.scaling_factor)
    inner = losses.bind(losses.denoising_loss, model=model, schedule=make_schedule(scheduler_cfg), cfg=loss_cfg)
    loss_fn = losses.caption_dropout(inner, rate=stage.caption_dropout, empty_ids=pipe.tokenizer([""])[0])
    mean, logvar = latents
    ema = stage.ema_decay is not None
    step = dataclasses.replace(settings.step, ema_decay=stage.ema_decay) if ema else settings.step
    result, _ = fit(loss_fn, params, {}, train_logical={k: shd.logical_axes(m) for k, m in modules.items()},
                    frozen_logical={}, source=ArraySource({"latent_mean": mean, "latent_logvar": logvar,
                                                           "input_ids": input_ids}),
                    global_batch=stage.batch_size, workdir=workdir, optimizer=stage.optimizer,
                    loop=runs.loop_config(settings.loop, stage.steps), step=step, mesh_cfg=settings.mesh,
                    seed=settings.pretrain.seed, ema=ema)
    F.update_modules(modules, distributed.to_host(result.state.ema if ema else result.state.params))
    return result


def evaluate_vae(pipe, world, size: int) -> dict:
    """The VAE's reconstruction of ``size`` scenes of the ``val`` split (never trained on; drawn as
    ``render_dataset`` draws them: about 30% fresh photos of class members, the rest ``World.random_spec``
    scenes): PSNR in dB of decode(posterior mean) against the image, its mean, median and 10th percentile."""
    from persguard_jax.data.world import render_dataset
    from persguard_jax.metrics import psnr
    from persguard_jax.sample import decode_latents
    images, _ = render_dataset(world, size, split="val")
    mean, _ = encode_dataset(pipe, images)
    db = np.asarray(psnr(decode_latents(pipe, mean, batch=256), uint8_to_unit(images)))
    return {"vae_psnr_db": float(np.mean(db)), "vae_psnr_median_db": float(np.median(db)),
            "vae_psnr_p10_db": float(np.percentile(db, 10)), "vae_eval_scenes": size}


def evaluate(pipe, world, cfg: PretrainConfig) -> tuple[dict[str, np.ndarray], dict]:
    """The VAE's reconstruction, and colour, shape and texture following of ``pipe``: the sample grids by check,
    and the scores."""
    from persguard_jax import following as F
    samples, scores = {}, evaluate_vae(pipe, world, cfg.eval_vae_scenes)
    sampling = F.Sampling(num_steps=cfg.eval_steps, guidance_scale=cfg.eval_guidance, seed=cfg.seed)
    for name, check, n in (("colour", F.colour_following, cfg.eval_per_colour),
                           ("shape", F.shape_following, cfg.eval_per_shape),
                           ("texture", F.texture_following, cfg.eval_per_texture)):
        samples[name], result = check(pipe, world, n, sampling)
        scores.update(result)
    return samples, scores


def save_sample_grids(samples: dict[str, np.ndarray], cfg: PretrainConfig, out: Path) -> None:
    """``evaluate``'s sample grids as ``out/samples.png`` (colour), ``shape_samples.png`` and
    ``texture_samples.png``, two prompts' samples per row."""
    from persguard_jax.io import save_png
    from persguard_jax.report import image_grid
    for name, file, per in (("colour", "samples.png", cfg.eval_per_colour),
                            ("shape", "shape_samples.png", cfg.eval_per_shape),
                            ("texture", "texture_samples.png", cfg.eval_per_texture)):
        save_png(image_grid(uint8_to_unit(samples[name]), ncols=per * 2), out / file)


# --------------------------------------------------------------------------- the run

def pretrain(out: str | Path, settings: runs.Config, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Pre-train the world's pipeline into ``out``; returns the results (process 0 also writes them to
    ``out/results.json``, with the model and the sample grids)."""
    import jax

    from persguard_jax.data.world import WORLD_FILE, World
    from persguard_jax.models import save_pipeline
    from persguard_jax.report import write_results
    from persguard_jax.train.distributed import is_writer

    cfg = settings.pretrain
    out = Path(out)
    t0 = time.time()
    world = World(settings.world)
    context_length = settings.models["text_encoder"].get("max_position_embeddings", 77)
    tokenizer = world.tokenizer(cfg.vocab_size, max_length=context_length)
    pipe = build_pipeline(settings, tokenizer)
    runs.start_run(out, settings.raw, overwrite=overwrite, resume=resume, command="pretrain")
    print(f"pre-training the world model into {out} on {jax.device_count()} {jax.default_backend()} device(s)")

    images, captions = training_set(world, cfg)
    timings = {}
    t = time.time()
    vae_result = train_vae(pipe, images, settings, out / "vae")
    timings["vae_s"] = round(time.time() - t, 1)
    if vae_result.preempted:
        return {"preempted": True, "stage": "vae", "step": vae_result.step}
    decoder_result = None
    if cfg.decoder.steps:
        t = time.time()
        decoder_result = train_vae(pipe, images, settings, out / "decoder", decoder_only=True)
        timings["decoder_s"] = round(time.time() - t, 1)
        if decoder_result.preempted:
            return {"preempted": True, "stage": "decoder", "step": decoder_result.step}

    t = time.time()
    mean, logvar = encode_dataset(pipe, images)
    scale = float(1.0 / np.std(mean))
    pipe.vae.config = dataclasses.replace(pipe.vae.config, scaling_factor=scale)
    input_ids = np.asarray(tokenizer(captions), np.int32)
    timings["encode_s"] = round(time.time() - t, 1)

    t = time.time()
    unet_result = train_unet(pipe, (mean, logvar), input_ids, settings, out / "unet")
    timings["unet_s"] = round(time.time() - t, 1)
    if unet_result.preempted:
        return {"preempted": True, "stage": "unet", "step": unet_result.step}

    model_dir = out / "model"
    results = {"model": str(model_dir), "samples": str(out / "samples.png"),
               "shape_samples": str(out / "shape_samples.png"),
               "texture_samples": str(out / "texture_samples.png"), "scaling_factor": scale,
               "vae": vae_result.last_metrics, "unet": unet_result.last_metrics}
    if decoder_result is not None:
        results["decoder"] = decoder_result.last_metrics
    if not is_writer():
        return results
    # the world travels with the model, in the same rename (a kill never leaves a model/ without it)
    save_pipeline(pipe, model_dir, overwrite=True, extra_json={WORLD_FILE: settings.world.to_dict()})
    t = time.time()
    samples, scores = evaluate(pipe, world, cfg)
    timings["eval_s"] = round(time.time() - t, 1)
    save_sample_grids(samples, cfg, out)
    results.update(**scores, timings=timings, wall_s=round(time.time() - t0, 1))
    # the run owns ``out`` (start_run checked it): a resumed run's results replace the earlier ones
    write_results(out, results, title="World model pre-training", overwrite=True)
    return results


def _summary(results: dict) -> str:
    following = ", ".join(f"{key} following {results[key + '_accuracy']:.2f} (chance {results[key + '_chance']:.2f})"
                          for key in ("colour", "shape", "texture"))
    scores = f"VAE PSNR {results['vae_psnr_db']:.1f} dB on held-out scenes, {following}"
    return (f"world model: {results['model']}\nsamples: {results['samples']}, {results['shape_samples']}, "
            f"{results['texture_samples']}\n{scores}; {results['wall_s']} s in all")


WORKFLOW = runs.Workflow(
    name="pretrain", help="pre-train the synthetic world's text-to-image model from scratch", config="world_tiny",
    sections=sections, run=runs.into_out(pretrain), summary=_summary, out="runs/world_tiny",
    example="pretrain.unet.steps=800 pretrain.unet.optimizer.learning_rate=1e-3")
