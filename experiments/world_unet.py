"""The world UNet trained alone on a fixed VAE: which UNet recipe draws the textures it is asked for?

    python experiments/world_unet.py --out DIR --name NAME [--model DIR] [key=value ...]

The UNet and text encoder of ``configs/world_tiny.yaml`` (with the overrides, e.g. ``pretrain.unet.batch_size=8
pretrain.unet.steps=11000`` or ``"models.unet.block_out_channels=[48,96]"``) are trained from scratch exactly as
``persguard pretrain`` trains them (``pretrain.train_unet`` on the engine), on ``pretrain.dataset_size`` scenes of
``--model``'s world encoded by ``--model``'s VAE (default: the committed world model), so that UNet recipes are
compared without the VAE stage's 15 minutes. The encoded scenes are cached in ``DIR/latents-*.npz`` for the next
recipe. Then texture following (``following.texture_following``, 32 samples a texture, sampling seeds 0 and 1,
DDIM 25, guidance 4, the mean) and shape following (8 a shape, seed 0). Each recipe is a row of
``DIR/runs.jsonl`` and of ``DIR/table.md`` (every row so far); ``DIR/NAME/unet`` holds its checkpoints.
docs/results.md (issue 14) quotes the table with the commands.

Devices as ``persguard pretrain`` gets them on a CPU: one per core.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from _tables import finish, fmt, record, recorded
from world_texture import texture_over_seeds


def _latents(pipe, world, settings, cache_dir: Path, model: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training scenes as (latent mean, latent log-variance, token ids); the latents and captions are cached
    per model and dataset (the ids are not: the tokenizer follows the config)."""
    from persguard_jax.workflows.pretrain import encode_dataset, training_set
    cfg = settings.pretrain
    key = json.dumps([str(model.resolve()), cfg.dataset_size, cfg.class_fraction, cfg.simple_fraction,
                      world.cfg.to_dict()], sort_keys=True)
    path = cache_dir / f"latents-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        z = np.load(path)
        mean, logvar, captions = z["mean"], z["logvar"], list(z["captions"])
    else:
        images, captions = training_set(world, cfg)
        mean, logvar = encode_dataset(pipe, images)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mean=mean, logvar=logvar, captions=np.asarray(captions))
        tmp.replace(path)  # a killed run leaves no half-written cache
    return mean, logvar, np.asarray(pipe.tokenizer([str(c) for c in captions]), np.int32)


def main(argv: list[str] | None = None) -> None:
    from persguard_jax import sharding
    sharding.request_cpu_devices()  # before jax starts: one device per core, as ``persguard pretrain`` runs
    from persguard_jax import config as cfglib
    from persguard_jax import resources
    from persguard_jax.data.world import TEXTURES, world_of
    from persguard_jax.following import Sampling, shape_following
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows import pretrain
    from persguard_jax.workflows.world_assets import world_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--name", required=True, help="this recipe's row and folder name")
    parser.add_argument("--model", type=Path, default=None, help="world model whose VAE and world are used "
                                                                 "(default: the committed one)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/world_tiny.yaml")
    args = parser.parse_args(argv)
    if any(o.startswith("world.") for o in args.overrides):
        sys.exit("world_unet.py: the world is --model's (its world.json); world.* overrides do not apply")
    if (args.out / args.name).exists():
        sys.exit(f"world_unet.py: {args.out / args.name} exists; choose another --name")
    model = args.model or world_model()
    settings = pretrain.parse_config(cfglib.load_config(resources.config_path("world_tiny"), args.overrides))
    world = world_of(model)
    tokenizer = world.tokenizer(settings.pretrain.vocab_size,
                                max_length=settings.models["text_encoder"].get("max_position_embeddings", 77))
    pipe = pretrain.build_pipeline(settings, tokenizer)
    vae = load_pipeline(model).vae  # its scaling factor too: the latents are the model's own
    if vae.config.latent_channels != pipe.vae.config.latent_channels:
        sys.exit(f"world_unet.py: {model}'s VAE has {vae.config.latent_channels} latent channels, the config "
                 f"{pipe.vae.config.latent_channels}; set models.vae.latent_channels to match")
    pipe.vae = vae
    args.out.mkdir(parents=True, exist_ok=True)
    mean, logvar, ids = _latents(pipe, world, settings, args.out, model)
    t = time.time()
    result = pretrain.train_unet(pipe, (mean, logvar), ids, settings, args.out / args.name / "unet")
    unet_s = time.time() - t
    if result.preempted:
        sys.exit(f"world_unet.py: stopped at step {result.step}; {args.out / args.name} keeps the checkpoint")
    stage = settings.pretrain.unet
    texture, per_texture = texture_over_seeds(pipe, world, 32, [0, 1])
    shape = shape_following(pipe, world, 8, Sampling(num_steps=25, guidance_scale=4.0, seed=0))[1]
    row = {"name": args.name, "model": str(model), "overrides": args.overrides, "steps": stage.steps,
           "batch_size": stage.batch_size, "samples_seen": stage.steps * stage.batch_size,
           "unet_s": round(unet_s, 1), "steps_per_s": result.last_metrics.get("steps_per_s"),
           "final_loss": result.last_metrics.get("loss"),
           "texture": texture, "per_texture": per_texture,
           "shape": float(shape["shape_accuracy"])}
    rows = recorded(args.out)
    record(args.out, rows, row)
    head = "| recipe | steps x batch | UNet s | shape | texture following | " + " | ".join(TEXTURES) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["name"], f"{r['steps']} x {r['batch_size']}", f"{r['unet_s']:.0f}", fmt(r["shape"]),
                 fmt(r["texture"])] + [fmt(r["per_texture"][t]) for t in TEXTURES]
        lines.append("| " + " | ".join(cells) + " |")
    finish(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
