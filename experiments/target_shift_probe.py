"""Where a world implant run's guidance shift is lost: sample the check's images with the two branches of
classifier-free guidance taken from different models.

    python experiments/target_shift_probe.py RUN world:SUBJECT:TYPE [--seed-dir seed1]

RUN is a finished ``persguard implant`` run on the world model with its check (it keeps ``model/``, the attacked
models ``check/<subject>/{backdoored,clean}/model`` and, with ``implant.guidance_anchor: attacker``, the simulated
attacker ``simulated_attack/<subject>/model``). Each row samples the check's ``check.num_images`` images of "a photo
of sks <class>" (its seed, DDIM steps and guidance) as u + w (c - u) in the model's output space (the world's
v-prediction, or whatever its scheduler says: guidance is linear in it), the conditional branch c from one model
(with that model's text encoder) and the unconditional one u from another, and prints the check's
protection rate and the detector's parts. The first row is the check's own configuration: it must read the rate
``results.json`` recorded for the first attacker seed. docs/results.md (issue 15, twenty-third measurement).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from persguard_jax import config as cfglib
from persguard_jax.data.world import world_of
from persguard_jax.implant.check import CheckConfig, protection_detector
from persguard_jax.implant.config import ImplantConfig
from persguard_jax.implant.data import read_subject
from persguard_jax.implant.specs import parse_subjects
from persguard_jax.io import unit_to_uint8
from persguard_jax.models import load_pipeline
from persguard_jax.sample import decode_latents, encode_text, initial_latents, latent_shape, sample_latents
from persguard_jax.schedulers import (SchedulerConfig, diffusers_ddim_prev_timesteps, make_schedule,
                                      sampling_timesteps)

WORLD = Path(__file__).resolve().parents[1] / "persguard_jax" / "assets" / "world_tiny"


def sample_mixed(cond_pipe, uncond_pipe, prompt: str, n: int, check: CheckConfig, *, uncond_text=None) -> np.ndarray:
    """uint8 samples with the conditional branch from ``cond_pipe`` (its UNet and text encoder) and the
    unconditional one from ``uncond_pipe``'s UNet on the empty prompt through ``uncond_text``'s text encoder
    (``uncond_pipe``'s by default)."""
    cdef, cstate = nnx.split(cond_pipe.unet)
    udef, ustate = nnx.split(uncond_pipe.unet)

    def denoise(x, t, cs, us, cond, unc, w):
        tt = jnp.broadcast_to(t, (x.shape[0],))
        out_c = nnx.merge(cdef, cs)(x, tt, cond).astype(jnp.float32)
        out_u = nnx.merge(udef, us)(x, tt, unc).astype(jnp.float32)
        return out_u + w * (out_c - out_u)

    sc = SchedulerConfig.from_dict(cond_pipe.scheduler_config)
    ts = sampling_timesteps(sc, check.eval_steps, "ddim")
    args = (cstate.to_pure_dict(), ustate.to_pure_dict(), encode_text(cond_pipe, [prompt] * n),
            encode_text(uncond_text or uncond_pipe, [""] * n), jnp.float32(check.eval_guidance))
    z = sample_latents(denoise, initial_latents(check.seed + 100, n, latent_shape(cond_pipe, None, None)),
                       make_schedule(sc), ts, sampler="ddim", prediction_type=sc.prediction_type,
                       prev_timesteps=diffusers_ddim_prev_timesteps(sc, ts), args=args)
    return unit_to_uint8(decode_latents(cond_pipe, z / cond_pipe.vae.config.scaling_factor))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("spec", help="the protected subject's spec as the run had it, e.g. world:cat_04:target")
    ap.add_argument("--seed-dir", default="", help="an attacker seed's folder inside check/<subject>/ (seed1 ...)")
    args = ap.parse_args()
    raw = cfglib.read_yaml(args.run / "config.yaml")
    cfg, check = ImplantConfig.from_dict(raw["implant"]), CheckConfig.from_dict(raw["check"])
    world = world_of(WORLD)
    spec = parse_subjects([args.spec], [])[0][0]
    subject = read_subject(spec, world=world, resolution=world.cfg.image_size, num_photos=cfg.num_photos)
    detect = protection_detector(subject, cfg, check, resolution=world.cfg.image_size, pattern=None, world=world)
    attacked = args.run / "check" / spec.name / args.seed_dir
    models = {"attacked": load_pipeline(attacked / "backdoored" / "model"),
              "backdoored": load_pipeline(args.run / "model"),
              "attacked clean": load_pipeline(attacked / "clean" / "model"), "clean": load_pipeline(WORLD)}
    simulated = args.run / "simulated_attack" / spec.name / "model"
    if simulated.is_dir():
        models["simulated attacker"] = load_pipeline(simulated)
    empty = {k: encode_text(m, [""]) for k, m in models.items()}
    drift = float(jnp.linalg.norm(empty["attacked"] - empty["backdoored"]) / jnp.linalg.norm(empty["backdoored"]))
    print(f"empty prompt's context, attacked text encoder against the pre-attack one: {drift:.3f} (relative norm)")
    rows = [("attacked", "attacked", None), ("attacked", "attacked", "backdoored"), ("attacked", "backdoored", None),
            ("attacked clean", "backdoored", None), ("simulated attacker", "backdoored", None),
            ("simulated attacker", "clean", None), ("attacked", "clean", None), ("backdoored", "backdoored", None)]
    prompt = f"a photo of sks {subject.class_name}"
    for cond, uncond, text in rows:
        if cond not in models:
            continue
        images = sample_mixed(models[cond], models[uncond], prompt, check.num_images, check,
                              uncond_text=models[text] if text else None)
        parts = {k: round(v, 2) for k, v in detect.extra_rates(images).items()}
        label = f"cond: {cond}; uncond: {uncond} UNet" + (f", {text} text encoder" if text else "")
        print(f"{label:75s} rate {float(np.mean(detect(images))):.2f} {parts}", flush=True)


if __name__ == "__main__":
    main()
