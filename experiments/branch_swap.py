"""Which guidance branch an attack moves away from a world target backdoor: sample each attacked model of a finished
implant run with its conditional branch and the unconditional branch of another model.

    python experiments/branch_swap.py RUN [RUN ...] [--drift] [--clean DIR]

For each target subject of each RUN (a finished ``persguard implant`` on the world model; its check keeps every
attacked model), and each attacker seed, the check's samples of "a photo of <identifier> <class>" (its seed, DDIM
steps and guidance) are drawn several ways, from the same noise:

- ``attacked``: both branches from the attacked model (what the check reads; its recorded rate beside it);
- ``uncond before``: the attacked model's conditional branch, the unconditional branch (UNet and text encoder) of
  the backdoored model before the attack: the rate if the attack left the planted shift where it was;
- ``uncond UNet before`` and ``uncond text before``: the unconditional branch with one of its two parts from before
  the attack (the UNet, or the text encoder's empty prompt), the other attacked: which part the drift is in;
- ``cond clean-attacked``: the conditional branch of the attacker run from the clean model at the same seed, the
  unconditional branch of the attacked backdoored model: the rate if the attacker's conditional branch were the
  clean model's attacker's;
- ``both``: the clean model's attacker's conditional branch, the backdoored model's unconditional branch before the
  attack: what the shift was fitted for (``implant.guidance_anchor: attacker`` anchors it on a simulated attacker of
  the clean model, at its own seed).

Each reading is the check's own (``implant.check.ProtectionDetector``). ``--drift``: how far the attack moves the
unconditional branch, in x0 (the UNet's scaled latents, L2 norm per draw), at 160 noisy draws of the subject's
photos below timestep 500 (the shift's timesteps): the planted shift (backdoored minus clean model, before any
attack), the drift of the backdoored model under its first attacker and of the clean model (``--clean``, the world
model by default) under the same attacker seed, the cosine between the two drifts, and what is left of the
backdoored drift after the clean one is taken off (whether a publisher could foresee it from a clean-model attack).
docs/results.md (issue 15, forty-first session).
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persguard_jax import losses
from persguard_jax.config import read_yaml
from persguard_jax.data.world import world_of
from persguard_jax.implant.check import CheckConfig, ProtectionDetector
from persguard_jax.implant.clean_reuse import attack_folders
from persguard_jax.implant.data import Encoder, attacker_x0
from persguard_jax.io import unit_to_uint8
from persguard_jax.models import load_pipeline
from persguard_jax.sample import decode_latents, encode_text, initial_latents, latent_shape, sample_latents
from persguard_jax.schedulers import (SchedulerConfig, diffusers_ddim_prev_timesteps, make_schedule,
                                      sampling_timesteps)


@functools.lru_cache(maxsize=None)
def two_model_denoise(unet_def):
    """Guidance with each branch from its own UNet weights: ``out_u + w (out_c - out_u)``."""
    def denoise(x, t, state_c, state_u, cond, uncond, w):
        def apply(state, ctx):
            unet = nnx.merge(unet_def, state)
            return unet(x, t, jnp.broadcast_to(ctx, (x.shape[0],) + ctx.shape[1:])).astype(jnp.float32)
        out_u = apply(state_u, uncond)
        return out_u + w * (apply(state_c, cond) - out_u)
    return denoise


def sample_two(cond_pipe, uncond_pipe, prompt: str, check: CheckConfig, uncond_text_pipe=None) -> np.ndarray:
    """``check.num_images`` uint8 samples of ``prompt``, the conditional branch from ``cond_pipe`` and the
    unconditional one (the empty prompt) from ``uncond_pipe`` (its empty prompt encoded by ``uncond_text_pipe``'s
    text encoder when given), from the check's noise, steps and guidance."""
    cfg = SchedulerConfig.from_dict(cond_pipe.scheduler_config)
    ts = sampling_timesteps(cfg, check.eval_steps, "ddim")
    unet_def, state_c = nnx.split(cond_pipe.unet)
    state_u = nnx.split(uncond_pipe.unet)[1]
    latents = initial_latents(check.seed + 100, check.num_images, latent_shape(cond_pipe, None, None))
    args = (state_c.to_pure_dict(), state_u.to_pure_dict(), encode_text(cond_pipe, [prompt]),
            encode_text(uncond_text_pipe or uncond_pipe, [""]), jnp.float32(check.eval_guidance))
    z = sample_latents(two_model_denoise(unet_def), latents, make_schedule(cfg), ts,
                       prediction_type=cfg.prediction_type, prev_timesteps=diffusers_ddim_prev_timesteps(cfg, ts),
                       args=args)
    vae = cond_pipe.vae.config
    return unit_to_uint8(decode_latents(cond_pipe, z / vae.scaling_factor + (vae.shift_factor or 0.0)))


def read_run(run: Path) -> None:
    cfg, results = read_yaml(run / "config.yaml"), json.loads((run / "results.json").read_text())
    check = CheckConfig.from_dict(cfg["check"])
    before, world = load_pipeline(run / "model"), world_of(run / "model")
    for name, row in results["subjects"].items():
        if row.get("type") != "target":
            continue
        detector = ProtectionDetector("target", world=world, colour=world.subject(name).colour,
                                      target_prompt=cfg["implant"]["target_prompt"])
        prompt = f"a photo of {check.identifier} {row['class']}"
        for k, folder in enumerate(attack_folders(run, name)):
            attacked = load_pipeline(folder / "backdoored" / "model")
            seed = str(cfg["dreambooth"]["seed"] + k)
            recorded = row["backdoored"].get("per_attack_seed", {}).get(seed, row["backdoored"])["protection_rate"]
            rates = {"attacked": detector(sample_two(attacked, attacked, prompt, check)).mean(),
                     "uncond before": detector(sample_two(attacked, before, prompt, check)).mean(),
                     "uncond UNet before": detector(sample_two(attacked, before, prompt, check, attacked)).mean(),
                     "uncond text before": detector(sample_two(attacked, attacked, prompt, check, before)).mean()}
            clean = folder / "clean" / "model"
            if clean.is_dir():
                clean = load_pipeline(clean)
                rates["cond clean-attacked"] = detector(sample_two(clean, attacked, prompt, check)).mean()
                rates["both"] = detector(sample_two(clean, before, prompt, check)).mean()
            print(f"{run.name} {name} attack {k} (recorded {recorded:.2f}): "
                  + ", ".join(f"{key} {v:.2f}" for key, v in rates.items()), flush=True)


def drift(run: Path, clean_dir: Path) -> None:
    """``--drift`` for each target subject of ``run`` (its first attacker seed)."""
    clean = load_pipeline(clean_dir)
    cfg = SchedulerConfig.from_dict(clean.scheduler_config)
    schedule = make_schedule(cfg)
    results = json.loads((run / "results.json").read_text())
    for name, row in results["subjects"].items():
        if row.get("type") != "target" or not (run / "check" / name / "clean" / "model").is_dir():
            continue
        folders = {"bd": run / "model", "bd_att": run / "check" / name / "backdoored" / "model",
                   "clean_att": run / "check" / name / "clean" / "model"}
        pipes = {"clean": clean, **{k: load_pipeline(v) for k, v in folders.items()}}
        lat = Encoder(clean, ids=False).images(world_of(run / "model").subject_photos(name, 5))
        src = np.repeat(np.arange(5), 32)
        batch = {k: lat[k][src] for k in ("latent_mean", "latent_logvar")}
        k_t, k_z = jax.random.split(jax.random.key(0))
        batch["timesteps"] = losses.sample_timesteps(k_t, len(src), schedule, 500)
        _, _, t, x_t = losses.noised_latents(batch, k_z, schedule, losses.LossConfig())
        u = {}
        for key, pipe in pipes.items():
            params = {n: nnx.split(getattr(pipe, n))[1].to_pure_dict() for n in ("unet", "text_encoder")}
            u[key] = attacker_x0(clean, params, "", schedule=schedule, prediction_type=cfg.prediction_type)(
                x_t, t).reshape(len(src), -1)
        shift, d_bd, d_clean = u["bd"] - u["clean"], u["bd_att"] - u["bd"], u["clean_att"] - u["clean"]
        norm = functools.partial(np.linalg.norm, axis=1)
        cos = np.sum(d_bd * d_clean, 1) / (norm(d_bd) * norm(d_clean))
        print(f"{run.name} {name} drift: planted shift {norm(shift).mean():.2f}, backdoored drift "
              f"{norm(d_bd).mean():.2f}, clean drift {norm(d_clean).mean():.2f}, cosine (median) "
              f"{np.median(cos):.2f}, left after taking the clean drift off {norm(d_bd - d_clean).mean():.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--drift", action="store_true", help="only the unconditional branch's drift under attack")
    parser.add_argument("--clean", type=Path, default=Path("persguard_jax/assets/world_tiny"))
    args = parser.parse_args()
    for run in args.runs:
        drift(run, args.clean) if args.drift else read_run(run)


if __name__ == "__main__":
    main()
