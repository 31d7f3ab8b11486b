"""ASPL (Anti-DreamBooth's released recipe) on the synthetic world: the project's compiled iteration against a PyTorch
implementation of the same recipe, same model, same run.

Model: ``persguard_jax/assets/world_tiny`` (32 px, 8x8x4 latents, v-prediction), fp32. Photos: ``--photos`` of a
world subject (default 5 of ``dog_00``), class images: ``--class-images`` world class photos of its class. One ASPL
iteration = a copy of the model takes ``surrogate_steps`` DreamBooth steps on the clean photos (1 instance + 1 class
image per step, prior weight 1, UNet and text encoder trained, AdamW with the world recipe's lr 2e-4, global-norm
clipping 1.0, a fresh optimizer per call), ``pgd_steps`` sign-PGD steps on all photos at once against the copy (VAE
encode -> noise -> UNet, loss = the v-prediction MSE; step 1/255, budget 11/255 in [0, 1] units), then the model
itself takes ``model_steps`` DreamBooth steps on the perturbed photos. Defaults: 3 + 6 + 3, as released.

JAX (``jax_iteration_s``): ``protect.methods.aspl_iteration``, jitted once (``jax_compile_s`` is the first call),
then timed per iteration (each waits for its result): the whole iteration is one compiled program, no host round
trip per step. PyTorch (``torch_iteration_s``): the released ``attacks/aspl.py`` loop (``copy.deepcopy`` of UNet and
text encoder, ``train_one_epoch``, ``pgd_attack``) re-written for a CPU in fp32 with the world model loaded by
diffusers/transformers from the same folder, ``torch.set_num_threads(--threads)`` (1 by default: the issue's note
that its threads collapse when cores are shared; ``--threads 2`` for the cores here). ``ratio`` = torch / jax per
iteration (> 1: JAX faster; the goal is >= 3). ``*_per_photo_s``: a full run of ``--full-iterations`` (50)
iterations divided by the photos, compile included for JAX. ``--compile-cache DIR``: JAX's persistent compilation
cache as ``persguard`` commands use it by default; run twice with the same folder, the second ``jax_compile_s`` is
what every later protection of the same model and photo count pays.

Run::

    .venv/bin/python benchmarks/aspl.py --json                 # ~3 minutes
    .venv/bin/python benchmarks/aspl.py --json --threads 2
    .venv/bin/python benchmarks/aspl.py --json --compile-cache /tmp/aspl_cache   # twice: cold, then warm
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

from common import cpu_times, device_info, load_avg_1min, steal_pct, versions

WORLD = "persguard_jax/assets/world_tiny"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default=WORLD)
    p.add_argument("--subject", default="dog_00")
    p.add_argument("--photos", type=int, default=5)
    p.add_argument("--class-images", type=int, default=50)
    p.add_argument("--iterations", type=int, default=8, help="timed iterations per framework")
    p.add_argument("--full-iterations", type=int, default=50, help="the recipe's length, for seconds per photo")
    p.add_argument("--surrogate-steps", type=int, default=3)
    p.add_argument("--pgd-steps", type=int, default=6)
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--per-device", choices=("auto", "always", "never"), default="always",
                   help="protect.per_device (always: photos and DreamBooth pairs split over the devices; never: every "
                        "device computes the whole batch; auto: the command's default, one device on the CPU)")
    p.add_argument("--devices", type=int, help="XLA CPU devices (default: one per core, as every persguard command "
                                                "asks; 1 = the whole iteration on one device)")
    p.add_argument("--compile-cache", help="JAX's persistent compilation cache folder, as the CLI uses one (a "
                                           "second run with the same folder shows the warm compile)")
    return p.parse_args(argv)


def world_data(args):
    """(photos, class images) uint8 of the subject and its class, and the class name."""
    from persguard_jax.data.world import world_of
    world = world_of(args.model)
    subject = world.subject(args.subject)
    photos = world.subject_photos(subject, args.photos)
    classes = world.class_photos(subject.class_name, args.class_images)
    return photos, classes, subject.class_name


def bench_jax(args, photos, class_images, class_name):
    import argparse as ap

    import jax

    from persguard_jax.dreambooth.data import encode_latents, prompt_conditioning
    from persguard_jax.io import uint8_to_signed
    from persguard_jax.models import functional as F
    from persguard_jax.models import load_pipeline
    from persguard_jax.protect.methods import split_axes
    from persguard_jax.protect.runner import Protector
    from persguard_jax.workflows.protect import WORKFLOW
    overrides = (f"protect.class_name={class_name}", f"protect.pgd_steps={args.pgd_steps}",
                 f"protect.surrogate_steps={args.surrogate_steps}", f"protect.model_steps={args.model_steps}",
                 f"protect.per_device={args.per_device}")
    config = WORKFLOW.load(ap.Namespace(config=None, overrides=overrides, method="aspl"))
    pipe = load_pipeline(args.model)
    protector = Protector(pipe, config)  # what `persguard protect` compiles (its mesh: protect.per_device)
    put = protector.put
    x = uint8_to_signed(photos)
    cond = prompt_conditioning(pipe, config.dreambooth.instance_prompt, len(x), embed=False)
    mean, logvar = encode_latents(pipe.vae, x)
    c_mean, c_logvar = encode_latents(pipe.vae, uint8_to_signed(class_images))
    clean = put({"latent_mean": mean, "latent_logvar": logvar, **cond})
    prior = put({"latent_mean": c_mean, "latent_logvar": c_logvar,
                 **prompt_conditioning(pipe, config.dreambooth.class_prompt, len(c_mean), embed=False)})
    cond = put(cond)
    train, rest = F.partition(protector.params, protector.setting.trains)
    step = protector.iteration
    rng = jax.random.key(0)
    images = origin = put(x)
    t0 = time.perf_counter()
    out = step(train, rest, images, origin, clean, prior, cond, 0, rng)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    train, images = out[0], out[1]
    times = []
    for i in range(1, args.iterations + 1):
        t0 = time.perf_counter()
        out = step(train, rest, images, origin, clean, prior, cond, i, rng)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        train, images = out[0], out[1]
    return {"jax_devices": int(protector.mesh.devices.size), "jax_visible_devices": jax.device_count(),
            "jax_split_over": list(split_axes(protector.setting)),
            "jax_compile_s": round(compile_s, 2), "jax_iteration_s": statistics.median(times),
            "jax_linf": float(np.abs(np.asarray(images) - x).max() * 127.5)}


def bench_torch(args, photos, class_images, class_name):
    import torch
    import torch.nn.functional as Fn
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from persguard_jax.models import load_pipeline
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(f"{args.model}/unet")
    text = CLIPTextModel.from_pretrained(f"{args.model}/text_encoder")
    vae = AutoencoderKL.from_pretrained(f"{args.model}/vae").requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(f"{args.model}/scheduler")
    tok = load_pipeline(args.model).tokenizer  # the world's own tokenizer (token ids are what both models read)
    ids_inst = torch.tensor(np.asarray(tok([f"a photo of sks {class_name}"])), dtype=torch.long)
    ids_cls = torch.tensor(np.asarray(tok([f"a photo of {class_name}"])), dtype=torch.long)
    to_t = lambda a: torch.tensor(a.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)  # noqa: E731
    clean, classes = to_t(photos), to_t(class_images)
    sf = vae.config.scaling_factor

    def target_of(latents, noise, t):
        return sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise

    def train_one_epoch(models, data, steps):
        unet_c, text_c = copy.deepcopy(models[0]), copy.deepcopy(models[1])
        params = list(unet_c.parameters()) + list(text_c.parameters())
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        for step in range(steps):
            pix = torch.stack([data[step % len(data)], classes[step % len(classes)]])
            latents = vae.encode(pix).latent_dist.sample() * sf
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (2,))
            ctx = text_c(torch.cat([ids_inst, ids_cls]))[0]
            pred = unet_c(sched.add_noise(latents, noise, t), t, ctx).sample
            target = target_of(latents, noise, t)
            loss = Fn.mse_loss(pred[:1], target[:1]) + Fn.mse_loss(pred[1:], target[1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
        return [unet_c, text_c]

    def pgd_attack(models, x, orig, steps, alpha=2.0 / 255, eps=22.0 / 255):
        unet_c, text_c = models
        ids = ids_inst.repeat(len(x), 1)
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            latents = vae.encode(x).latent_dist.sample() * sf
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x),))
            pred = unet_c(sched.add_noise(latents, noise, t), t, text_c(ids)[0]).sample
            loss = Fn.mse_loss(pred, target_of(latents, noise, t))
            unet_c.zero_grad()
            text_c.zero_grad()
            loss.backward()
            x = x + alpha * x.grad.sign()
            x = torch.clamp(orig + torch.clamp(x - orig, -eps, eps), -1, 1).detach()
        return x

    f = [unet, text]
    perturbed = clean.clone()
    times = []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        f_sur = train_one_epoch(f, clean, args.surrogate_steps)
        perturbed = pgd_attack(f_sur, perturbed, clean, args.pgd_steps)
        f = train_one_epoch(f, perturbed, args.model_steps)
        times.append(time.perf_counter() - t0)
    return {"torch_iteration_s": statistics.median(times), "torch_threads": args.threads,
            "torch_linf": float((perturbed - clean).abs().max() * 127.5)}


def main(argv=None):
    args = parse_args(argv)
    from persguard_jax.sharding import request_cpu_devices
    request_cpu_devices(args.devices)  # before jax starts its CPU backend
    if args.compile_cache:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = args.compile_cache
        from persguard_jax.runtime import setup_process
        setup_process(compile_cache=True)
    photos, class_images, class_name = world_data(args)
    before, load = cpu_times(), load_avg_1min()
    result = {"benchmark": "aspl", "model": args.model, "subject": args.subject, "photos": args.photos,
              "steps_per_iteration": [args.surrogate_steps, args.pgd_steps, args.model_steps],
              "iterations_timed": args.iterations}
    result.update(bench_jax(args, photos, class_images, class_name))
    if not args.skip_torch:
        result.update(bench_torch(args, photos, class_images, class_name))
        result["ratio"] = round(result["torch_iteration_s"] / result["jax_iteration_s"], 2)
        result["torch_per_photo_s"] = round(result["torch_iteration_s"] * args.full_iterations / args.photos, 2)
    result["jax_per_photo_s"] = round((result["jax_compile_s"] + result["jax_iteration_s"] * args.full_iterations)
                                      / args.photos, 2)
    result["jax_per_photo_s_no_compile"] = round(result["jax_iteration_s"] * args.full_iterations / args.photos, 2)
    result.update(load_avg_1min=load, cpu_steal_pct=steal_pct(before, cpu_times()), device=device_info(),
                  versions=versions())
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
