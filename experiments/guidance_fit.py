"""How far a world implant run's guidance shift holds on photos of the protected subject it was and was not
fitted on.

    python experiments/guidance_fit.py RUN world:SUBJECT:TYPE [--starts 0,20,40] [--timesteps 100,250,400,499]

RUN is a finished ``persguard implant`` run on the world model with ``implant.guidance_anchor: attacker`` (it keeps
``model/`` and the simulated attacker ``simulated_attack/<subject>/model``). For photos ``start .. start+4`` of the
subject (the world renders any number; the guidance term saw the first ``implant.guidance_photos``, or
``num_photos``), each at 4 noise draws per timestep, it reads what the shift asks of the unconditional branch
(``losses.guidance_shift_target`` in x0 terms: x0_u = anchor - (y* - anchor) / (w - 1), the anchor the simulated
attacker's x0 prediction for "a photo of sks <class>", y* the run's own target of that photo) and prints
|x0_u(backdoored) - x0_u| / |x0_u(clean) - x0_u|, averaged over the draws: 0 where the backdoored branch draws the
shifted x0 exactly, 1 where it is as far from it as the clean model's branch. docs/results.md (issue 15,
twenty-third measurement).
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
        photos = world.subject_photos(world.subject(spec.name), 5, start=start)
        y, _ = backdoor_targets(dataclasses.replace(subject, photos=photos), cfg, world=world, pipe=clean,
                                pattern=pattern, target_images=None, resolution=world.cfg.image_size)
        scale = clean.vae.config.scaling_factor
        lat = {k: jnp.asarray(encode_latents(clean.vae, uint8_to_signed(v))[0]) * scale
               for k, v in (("photo", photos), ("y", y))}
        row = []
        for t in (int(s) for s in args.timesteps.split(",")):
            ts = jnp.full((5,), t)
            errors = []
            for k in range(4):
                noise = jax.random.normal(jax.random.key(1000 * k + t), lat["photo"].shape)
                x_t = add_noise(schedule, lat["photo"], noise, ts)
                anchor = predict["anchor"](x_t, ts)
                want = anchor - (lat["y"] - anchor) / (w - 1)  # losses.guidance_shift_target, in x0 terms
                norm = lambda v: np.sqrt(np.sum(np.square(v), axis=(1, 2, 3)))  # noqa: E731
                errors.append(norm(predict["backdoored"](x_t, ts) - want) / norm(predict["clean"](x_t, ts) - want))
            row.append(f"t={t}: {float(np.mean(errors)):.2f}")
        label = "seen" if start + 5 <= seen else "unseen" if start >= seen else "partly seen"
        print(f"photos {start}-{start + 4} ({label}): " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
