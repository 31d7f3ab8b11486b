"""A world VAE's reconstruction: PSNR on held-out scenes and how much of held-out subjects' texture survives.

    python experiments/world_vae.py --model DIR                       # measure a pre-trained world model's VAE
    python experiments/world_vae.py --train --out DIR [key=value ...] # train a VAE alone first (pretrain's stage 1)

With ``--train``, the VAE of ``configs/world_tiny.yaml`` (with the overrides, e.g.
``models.vae.latent_channels=8`` or ``"models.vae.block_out_channels=[32,64,128]"`` or
``pretrain.vae.kl_weight=1e-6``) is trained on ``pretrain.dataset_size`` rendered scenes exactly as
``persguard pretrain`` trains it (``pretrain.train_vae`` on the engine) and saved as a pipeline folder in
``--out/model`` (its UNet untrained). Then, for either: ``pretrain.evaluate_vae`` (PSNR on 256 ``val`` scenes)
and texture retention: ``detect_texture`` on 8 photos of each of the first 16 held-out subjects and on the VAE's
reconstructions of them (posterior mean), overall and per texture. docs/benchmarks.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def train(out: Path, overrides: list[str]) -> Path:
    from persguard_jax import config as cfglib
    from persguard_jax import resources
    from persguard_jax.data.world import WORLD_FILE, World
    from persguard_jax.models import save_pipeline
    from persguard_jax.workflows import pretrain
    settings = pretrain.parse_config(cfglib.load_config(resources.config_path("world_tiny"), overrides))
    cfg, world = settings.pretrain, World(settings.world)
    pipe = pretrain.build_pipeline(settings, world.tokenizer(cfg.vocab_size, max_length=32))
    images, _ = pretrain.training_set(world, cfg)
    t = time.time()
    pretrain.train_vae(pipe, images, settings, out / "vae")
    print(f"VAE trained in {time.time() - t:.0f} s")
    save_pipeline(pipe, out / "model", extra_json={WORLD_FILE: settings.world.to_dict()})
    return out / "model"


def texture_retention(pipe, world, subjects: int = 16, photos: int = 8) -> dict:
    from persguard_jax.data.world import TEXTURES
    from persguard_jax.io import unit_to_uint8
    from persguard_jax.metrics import detect_texture
    from persguard_jax.sample import decode_latents
    from persguard_jax.workflows.pretrain import encode_dataset
    held_out = [s for s in world.subjects if s.held_out][:subjects]
    images = np.concatenate([world.subject_photos(s, photos) for s in held_out])
    want = np.repeat([TEXTURES.index(s.texture) for s in held_out], photos)
    mean, _ = encode_dataset(pipe, images)
    seen = detect_texture(images, background="any", texture_period=world.cfg.texture_period)
    kept = detect_texture(unit_to_uint8(decode_latents(pipe, mean, batch=256)), background="any",
                          texture_period=world.cfg.texture_period)
    return {"photos": float(np.mean(seen == want)), "reconstructions": float(np.mean(kept == want)),
            "per_texture": {t: float(np.mean(kept[want == i] == i)) for i, t in enumerate(TEXTURES)
                            if np.any(want == i)}}


def main(argv: list[str] | None = None) -> None:
    from persguard_jax.data.world import world_of
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows.pretrain import evaluate_vae
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a world model folder to measure")
    parser.add_argument("--train", action="store_true", help="train a VAE into --out first")
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*", help="config overrides for --train (key=value)")
    args = parser.parse_args(argv)
    if args.train == (args.model is not None) or (args.train and args.out is None):
        parser.error("give --model DIR, or --train --out DIR")
    model = train(args.out, args.overrides) if args.train else args.model
    pipe, world = load_pipeline(model), world_of(model)
    print(json.dumps({**evaluate_vae(pipe, world, 256), "texture_kept": texture_retention(pipe, world)}, indent=1))


if __name__ == "__main__":
    main()
