"""A world model that knows CDL's words: the committed world model fine-tuned on scenes captioned with "noisy
pattern", "without noisy pattern" and "lowres", to test why contrastive decoupling learning fails on the world.

    python experiments/noisy_world.py --out runs/noisy_world [--steps 3000] [--scenes 20000] [key=value ...]

docs/results.md (issue 16) found CDL hurting on the world and named a reason: the world's text encoder has never
seen CDL's words ("noisy", "pattern", "without", "lowres"), so "<phrase> noisy pattern" is one more string of
untrained tokens for the noise to bind to. DiffShortcut's CDL leans on a text encoder for which "noisy pattern"
already means noise. This script gives the world that prior and nothing else: it continues the committed model's
UNet + text encoder training (the VAE and tokenizer stay) on freshly rendered world scenes of which

- ``--noisy`` (0.25) carry a perturbation and the caption suffix ", noisy pattern" (or ", noisy", or ", with noisy
  pattern"): a random field at 4, 8, 16 or 32 px upsampled to the image, half of the time as its sign (PGD
  perturbations sit at +-r almost everywhere), with l_inf r uniform in [8, 32] / 255 per image;
- ``--lowres`` (0.05) are downsampled by 2 or 4 and upsampled back, captioned ", lowres";
- ``--without`` (0.1) are clean and captioned ", without noisy pattern";

the rest unchanged (the suffix is added only where the whole caption fits the 32-token context). It writes
``<out>/model`` (a world pipeline: ``experiments/diffshortcut.py --model`` takes it) and ``<out>/results.json`` with
the fine-tuned model's colour, shape and texture following (``persguard pretrain``'s evaluation), so a reader sees
what the fine-tuning cost the world's prompt following, and ``words_hf_energy``: what CDL's words do to samples
before and after (``word_check``). ``key=value`` overrides go to configs/world_tiny.yaml
(e.g. ``pretrain.unet.optimizer.learning_rate=5e-4``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

WORLD = "persguard_jax/assets/world_tiny"
NOISY_SUFFIXES = (", noisy pattern", ", noisy pattern", ", noisy pattern", ", noisy", ", with noisy pattern")
# what the words do to samples, before and after (CDL's own strings among them)
WORD_PROMPTS = ("a photo of dog", "a photo of dog, noisy pattern", "a photo of dog, without noisy pattern",
                "a photo of dog, bhj noisy pattern", "a photo of dog, without bhj noisy pattern")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default=WORLD)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--scenes", type=int, default=20000)
    p.add_argument("--noisy", type=float, default=0.25)
    p.add_argument("--lowres", type=float, default=0.05)
    p.add_argument("--without", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="key=value over configs/world_tiny.yaml")
    return p.parse_args(argv)


def perturbation(rng: np.random.Generator, side: int) -> np.ndarray:
    """One (side, side, 3) float perturbation in [-r, r], r in [8, 32] / 255, on the uint8 scale."""
    from PIL import Image
    res = int(rng.choice([4, 8, 16, 32]))
    field = rng.uniform(-1.0, 1.0, (res, res, 3)).astype(np.float32)
    up = np.stack([np.asarray(Image.fromarray(field[..., c]).resize((side, side), Image.BILINEAR))
                   for c in range(3)], -1)
    up = np.sign(up) if rng.random() < 0.5 else up / max(float(np.abs(up).max()), 1e-6)
    return up * rng.uniform(8.0, 32.0)


def lowres(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    from PIL import Image
    side, factor = image.shape[0], int(rng.choice([2, 4]))
    small = Image.fromarray(image).resize((side // factor, side // factor), Image.BILINEAR)
    return np.asarray(small.resize((side, side), Image.BILINEAR))


def relabel(images: np.ndarray, captions: list[str], tokenizer, args) -> tuple[np.ndarray, list[str], dict]:
    """The dataset with the noisy, lowres and "without" scenes mixed in (in place on a copy)."""
    rng = np.random.default_rng(args.seed)
    images, captions = images.copy(), list(captions)
    counts = {"noisy": 0, "lowres": 0, "without": 0, "too_long": 0}
    limit = tokenizer.model_max_length

    def fits(text: str) -> bool:  # BOS + tokens + EOS inside the context: nothing truncated
        return len(tokenizer.bpe.encode(text, add_special_tokens=False).ids) + 2 <= limit

    for i in range(len(images)):
        u = rng.random()
        if u < args.noisy:
            kind, suffix = "noisy", NOISY_SUFFIXES[rng.integers(len(NOISY_SUFFIXES))]
        elif u < args.noisy + args.lowres:
            kind, suffix = "lowres", ", lowres"
        elif u < args.noisy + args.lowres + args.without:
            kind, suffix = "without", ", without noisy pattern"
        else:
            continue
        if not fits(captions[i] + suffix):
            counts["too_long"] += 1
            continue
        if kind == "noisy":
            images[i] = np.clip(images[i].astype(np.float32) + perturbation(rng, images.shape[1]), 0, 255).round()
        elif kind == "lowres":
            images[i] = lowres(rng, images[i])
        captions[i] += suffix
        counts[kind] += 1
    return images, captions, counts


def word_check(pipe) -> dict[str, float]:
    """High-frequency energy (``metrics.shortcut``) of 8 samples per ``WORD_PROMPTS`` prompt (seed 3, DDIM 25,
    guidance 4): whether "noisy pattern" draws noise and "without" takes it away."""
    from persguard_jax.io import unit_to_uint8
    from persguard_jax.metrics.shortcut import high_frequency_energy
    from persguard_jax.sample import text_to_image
    out = {}
    for prompt in WORD_PROMPTS:
        images = text_to_image(pipe, [prompt] * 8, num_steps=25, guidance_scale=4.0, seed=3, progress=False)
        out[prompt] = round(high_frequency_energy(unit_to_uint8(np.asarray(images))), 5)
    return out


def main(argv=None) -> dict:
    from persguard_jax import config as cfglib
    from persguard_jax import resources
    from persguard_jax.data.world import WORLD_FILE, render_dataset, world_of
    from persguard_jax.models import load_pipeline, save_pipeline
    from persguard_jax.workflows import pretrain as P

    args = parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists; choose a new --out")
    args.out.mkdir(parents=True)
    t0 = time.time()
    settings = P.parse_config(cfglib.load_config(resources.config_path("world_tiny"), [
        f"pretrain.unet.steps={args.steps}", "pretrain.unet.optimizer.learning_rate=5e-4",
        "pretrain.unet.optimizer.warmup_steps=50", *args.overrides]))
    pipe, world = load_pipeline(args.model), world_of(args.model)
    words_before = word_check(pipe)
    images, captions = render_dataset(world, args.scenes, class_fraction=settings.pretrain.class_fraction,
                                      simple_fraction=settings.pretrain.simple_fraction)
    images, captions, counts = relabel(images, captions, pipe.tokenizer, args)
    print("scenes:", counts)
    latents = P.encode_dataset(pipe, images)
    input_ids = np.asarray(pipe.tokenizer(captions), np.int32)
    result = P.train_unet(pipe, latents, input_ids, settings, args.out / "unet")
    save_pipeline(pipe, args.out / "model", overwrite=True, extra_json={WORLD_FILE: world.cfg.to_dict()})
    samples, scores = P.evaluate(pipe, world, settings.pretrain)
    P.save_sample_grids(samples, settings.pretrain, args.out)
    results = {"model": str(args.out / "model"), "base": str(args.model), "steps": args.steps, "scenes": counts,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "words_hf_energy": {"before": words_before, "after": word_check(pipe)},
               "unet": result.last_metrics, **{k: v for k, v in scores.items() if not isinstance(v, np.ndarray)},
               "wall_s": round(time.time() - t0, 1)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(json.dumps({k: results[k] for k in results if k.endswith("_accuracy") or k == "words_hf_energy"}, indent=2))
    return results


if __name__ == "__main__":
    main()
