"""Apply ``persguard pretrain``'s decoder stage to an existing world model: a sharper decoder, the same latents.

    python experiments/world_decoder.py --model persguard_jax/assets/world_tiny --out DIR [key=value ...]

The UNet, and every result built on a world model, live in its VAE encoder's latent space. The decoder stage
(``pretrain.decoder`` of ``configs/world_tiny.yaml``, ``pretrain.train_vae(..., decoder_only=True)``) trains the
decoder alone (``decoder``, ``post_quant_conv``) with the encoder frozen, so the latents, their ``scaling_factor``
and the UNet's training data stay bit-for-bit what they were, on the same ``pretrain.dataset_size`` scenes the
pre-training renders (``pretrain.training_set``). ``persguard pretrain`` runs it after the VAE stage; this script
runs it on a model pre-trained before the stage existed (the committed ``world_tiny`` was made this way: run o +
this script at the shipped config). Overrides change the stage, e.g. ``pretrain.decoder.steps=3000``.

Writes ``--out/model`` (the model with the new decoder, its ``world_config.json`` kept), ``--out/decoder``
(the stage's checkpoints and metrics), ``--out/results.json``: ``pretrain.evaluate``'s scores of the new model (VAE
PSNR, colour, shape and texture following, as ``persguard pretrain`` reports them) with the stage's timing and
metrics, and ``texture_kept`` (``experiments/world_vae.py``: held-out subjects' texture in the VAE's
reconstructions) before and after; and the sample grids ``samples.png``, ``shape_samples.png``,
``texture_samples.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    from world_vae import texture_retention
    from persguard_jax import config as cfglib
    from persguard_jax import resources
    from persguard_jax.data.world import WORLD_FILE, world_of
    from persguard_jax.models import load_pipeline, save_pipeline
    from persguard_jax.workflows import pretrain
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a world model folder (its decoder is tuned)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("overrides", nargs="*", help="overrides of configs/world_tiny.yaml, e.g. "
                        "pretrain.decoder.steps=3000")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out}: exists; give a new folder")
    settings = pretrain.parse_config(cfglib.load_config(resources.config_path("world_tiny"), args.overrides))
    cfg = settings.pretrain
    if not cfg.decoder.steps:
        parser.error("pretrain.decoder.steps is 0: nothing to train")
    pipe, world = load_pipeline(args.model), world_of(args.model)
    before = texture_retention(pipe, world)
    images, _ = pretrain.training_set(world, cfg)
    t = time.time()
    result = pretrain.train_vae(pipe, images, settings, args.out / "decoder", decoder_only=True)
    seconds = round(time.time() - t, 1)
    world_json = json.loads((args.model / WORLD_FILE).read_text())
    save_pipeline(pipe, args.out / "model", extra_json={WORLD_FILE: world_json})
    samples, scores = pretrain.evaluate(pipe, world, cfg)
    pretrain.save_sample_grids(samples, cfg, args.out)
    results = {"model": str(args.out / "model"), "from_model": str(args.model), "overrides": args.overrides,
               **scores, "scaling_factor": pipe.vae.config.scaling_factor, "decoder": result.last_metrics,
               "timings": {"decoder_s": seconds}, "texture_kept": {"before": before,
                                                                   "after": texture_retention(pipe, world)}}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
