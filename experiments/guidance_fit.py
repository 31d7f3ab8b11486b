"""How far a world implant run's guidance shift holds on photos of the protected subject it was and was not
fitted on.

    python experiments/guidance_fit.py RUN world:SUBJECT:TYPE [--starts 0,20,40] [--timesteps 100,250,400,499] \
        [--blends 0,0.5,1]

RUN is a finished ``persguard implant`` run on the world model with ``implant.guidance_anchor: attacker`` (it keeps
``model/`` and the simulated attacker ``simulated_attack/<subject>/model``). For photos ``start .. start+4`` of the
subject (the world renders any number; the guidance term saw the first ``implant.guidance_photos``, or
``num_photos``), each at 4 noise draws per timestep, it reads what the shift asks of the unconditional branch
(``losses.guidance_shift_target`` in x0 terms: x0_u = anchor - (y* - anchor) / (w - 1), the anchor the simulated
attacker's x0 prediction for "a photo of sks <class>", y* the run's own target of that photo) and prints
|x0_u(backdoored) - x0_u| / |x0_u(clean) - x0_u|, averaged over the draws: 0 where the backdoored branch draws the
shifted x0 exactly, 1 where it is as far from it as the clean model's branch. ``--blends``: the noisy inputs drawn
from (1 - b) photo + b y* (latents) instead of the photo (b = 0), the states a guided sampler passes through on its
way from the subject to y* (``implant.guidance_blends``). docs/results.md (issue 15, twenty-third measurement and
the thirty-ninth session).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.data.world import world_of
from persguard_jax.dreambooth import encode_latents
from persguard_jax.implant.config import ImplantConfig
from persguard_jax.implant.data import attacker_x0, backdoor_targets, read_pattern, read_subject
from persguard_jax.implant.specs import parse_subjects
from persguard_jax.io import uint8_to_signed
from persguard_jax.models import load_pipeline
from persguard_jax.schedulers import SchedulerConfig, add_noise, make_schedule

WORLD = Path(__file__).resolve().parents[1] / "persguard_jax" / "assets" / "world_tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("spec", help="the protected subject's spec as the run had it, e.g. world:cat_04:target")
    ap.add_argument("--starts", default="0,20,40", help="first photo of each set of five")
    ap.add_argument("--timesteps", default="100,250,400,499")
    ap.add_argument("--blends", default="0", help="where between photo (0) and y* (1) the noisy inputs are drawn")
    args = ap.parse_args()
    raw = cfglib.read_yaml(args.run / "config.yaml")
    cfg = ImplantConfig.from_dict(raw["implant"])
    world = world_of(WORLD)
    spec = parse_subjects([args.spec], [])[0][0]
    subject = read_subject(spec, world=world, resolution=world.cfg.image_size, num_photos=cfg.num_photos)
    backdoored, clean = load_pipeline(args.run / "model"), load_pipeline(WORLD)
    attacker = load_pipeline(args.run / "simulated_attack" / spec.name / "model")
    scheduler = SchedulerConfig.from_dict(clean.scheduler_config)
    schedule = make_schedule(scheduler)
    w = cfg.guidance_scale_of(subject.type)
    prediction = scheduler.prediction_type
    # x0 predictions of each branch, unguided (implant.data.attacker_x0: the model's own weights when params is None)
    predict = {name: attacker_x0(pipe, None, prompt, schedule=schedule, prediction_type=prediction)
               for name, pipe, prompt in (("anchor", attacker, f"a photo of sks {subject.class_name}"),
                                          ("backdoored", backdoored, ""), ("clean", clean, ""))}

    seen = cfg.guidance_photos or cfg.num_photos
    pattern = read_pattern(cfg, world.cfg.image_size) if subject.type == "pattern" else None
    print(f"guidance scale {w}; the term saw photos 0-{seen - 1}")
    for start in (int(s) for s in args.starts.split(",")):
        # y* of photos start..start+4: the world renders a subject's backgrounds and targets by photo index from 0,
        # so the targets of the first start+5 photos are built and the last five kept (before 2026-12-06 the
        # probe paired photos start..start+4 with the y* of photos 0-4, a wrong target for erasure and target)
        photos = world.subject_photos(world.subject(spec.name), start + 5)
        y, _ = backdoor_targets(dataclasses.replace(subject, photos=photos), cfg, world=world, pipe=clean,
                                pattern=pattern, target_images=None, resolution=world.cfg.image_size)
        photos, y = photos[start:], y[start:]
        scale = clean.vae.config.scaling_factor
        lat = {k: jnp.asarray(encode_latents(clean.vae, uint8_to_signed(v))[0]) * scale
               for k, v in (("photo", photos), ("y", y))}
        label = "seen" if start + 5 <= seen else "unseen" if start >= seen else "partly seen"
        for b in (float(s) for s in args.blends.split(",")):
            source = (1.0 - b) * lat["photo"] + b * lat["y"]
            row = []
            for t in (int(s) for s in args.timesteps.split(",")):
                ts = jnp.full((5,), t)
                errors = []
                for k in range(4):
                    noise = jax.random.normal(jax.random.key(1000 * k + t), lat["photo"].shape)
                    x_t = add_noise(schedule, source, noise, ts)
                    anchor = predict["anchor"](x_t, ts)
                    want = anchor - (lat["y"] - anchor) / (w - 1)  # losses.guidance_shift_target, in x0 terms
                    norm = lambda v: np.sqrt(np.sum(np.square(v), axis=(1, 2, 3)))  # noqa: E731
                    errors.append(norm(predict["backdoored"](x_t, ts) - want)
                                  / norm(predict["clean"](x_t, ts) - want))
                row.append(f"t={t}: {float(np.mean(errors)):.2f}")
            print(f"photos {start}-{start + 4} ({label}), blend {b:g}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
