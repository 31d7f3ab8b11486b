"""The SD 1.5 UNet training step at 512 px: JAX (the engine's step) against PyTorch diffusers in the same run.

Step: epsilon-prediction MSE at random timesteps (SD's scaled_linear DDPM schedule) on 64x64x4 latents with a
77x768 text context, global-norm clipping 1.0 + AdamW (lr 1e-5, weight decay 1e-2), random weights, no downloads.
Both sides compute in bf16 with fp32 master weights:

- JAX (``jax_*``): ``train.make_train_step`` on ``losses.denoising_loss`` with ``StepConfig(compute_dtype=
  "bfloat16")``, the state donated, the batch split over every local device (mesh data=-1; ``--fsdp N`` shards
  the parameters and AdamW state over N of them), attention by ``--attention`` (``auto``: cuDNN flash on GPU,
  Pallas flash on TPU, ``models.attention``), ``--remat`` on the UNet blocks.
- PyTorch (``torch_*``): ``diffusers.UNet2DConditionModel`` with the same config, SDPA attention (diffusers'
  default processor), ``torch.autocast(bfloat16)`` over fp32 weights, ``clip_grad_norm_`` + ``AdamW(fused=True)``;
  ``--torch-compile`` wraps the UNet in ``torch.compile``. One device (``cuda:0``).

Each framework runs in its own child process, one after the other (``--only jax|torch`` runs one in this
process): JAX preallocates 75% of a GPU's memory and keeps its pool, so a PyTorch step in the same process would
get the rest, and each side's peak memory is read alone.

Reported: seconds per step (median of ``--steps`` after ``--warmup``), samples per second, ``ratio`` = torch step
/ JAX step (> 1: JAX faster), MFU = samples/s x FLOPs per sample / peak FLOP/s of the devices used (2.41 TFLOP
per sample forward + backward for SD 1.5 at 64x64 latents, the issue's figure; ``xla_flops_per_sample`` is XLA's
own count of the compiled step, for other sizes), peak device memory (JAX: ``peak_bytes_in_use``, PyTorch:
``max_memory_allocated``), compile seconds.

On a CPU it is a smoke test: the tiny UNet (``--arch tiny``) at 8x8 latents, batch 2, fp32 compute; MFU is not
reported (no peak figure for a CPU). Run::

    .venv/bin/python benchmarks/sd15_train_step.py --json                      # GPU/TPU: SD 1.5, 512 px, batch 8
    .venv/bin/python benchmarks/sd15_train_step.py --json --batch 16 --remat dots_saveable --torch-compile
    .venv/bin/python benchmarks/sd15_train_step.py --json --arch tiny           # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_info, versions

SD15_TFLOP_PER_SAMPLE = 2.41  # forward + backward, 64x64x4 latents, 77x768 context (the figure)
# dense bf16 peak TFLOP/s per device, from the vendors' data sheets (H100/H200 SXM, A100 SXM, TPU chips)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
                    "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v4": 275.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}
LR, WEIGHT_DECAY, CLIP = 1e-5, 1e-2, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--arch", choices=("sd15", "tiny"), help="default: sd15 on an accelerator, tiny on a CPU")
    p.add_argument("--latent", type=int, help="latent side (default 64 = 512 px; 8 on a CPU)")
    p.add_argument("--batch", type=int, help="global batch (default 8; 2 on a CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fsdp", type=int, default=1, help="shard parameters and AdamW state over this many devices")
    p.add_argument("--remat", choices=("none", "dots_saveable", "full"), default="none")
    p.add_argument("--attention", default="auto", help="models.attention implementation (auto, xla, cudnn, ...)")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), help="default bf16 (fp32 on a CPU)")
    p.add_argument("--torch-compile", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (default: from the device kind)")
    p.add_argument("--only", choices=("jax", "torch"), help="run one framework in this process (default: each in "
                                                           "a child process, then both reported)")
    return p.parse_args(argv)


def defaults(args):
    """Fill the sizes left unset from the backend (importing JAX, which on a GPU takes its memory: a child whose
    sizes are all given, the PyTorch one, never does)."""
    if None in (args.arch, args.latent, args.batch, args.compute_dtype):
        import jax
        cpu = jax.default_backend() == "cpu"
        args.arch = args.arch or ("tiny" if cpu else "sd15")
        args.latent = args.latent or (8 if cpu else 64)
        args.batch = args.batch or (2 if cpu else 8)
        args.compute_dtype = args.compute_dtype or ("float32" if cpu else "bfloat16")
    return args


def unet_config(arch: str):
    from persguard_jax.models.tiny import tiny_unet_config
    from persguard_jax.models.unet import unet_config_sd15
    return unet_config_sd15() if arch == "sd15" else tiny_unet_config()


def peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)


def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds per step, seconds of the first call)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


# --------------------------------------------------------------------------- JAX

def bench_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from persguard_jax import losses, schedulers
    from persguard_jax import sharding as shd
    from persguard_jax.models import functional as F
    from persguard_jax.models.attention import set_attention
    from persguard_jax.models.init import random_init
    from persguard_jax.models.remat import set_remat
    from persguard_jax.models.unet import UNet2DConditionModel
    from persguard_jax.train import OptimizerConfig, StepConfig, create_state, make_train_step
    from persguard_jax.train.optim import resolve_optimizer

    cfg = unet_config(args.arch)
    unet = random_init(UNet2DConditionModel, cfg, seed=0)
    set_remat(unet, args.remat)
    set_attention(unet, args.attention)
    logical = {"unet": shd.logical_axes(unet)}
    model, params = F.split_modules({"unet": unet})
    del unet
    mesh_cfg = shd.MeshConfig(data=-1, fsdp=args.fsdp)
    mesh = shd.make_mesh(mesh_cfg)
    opt, _ = resolve_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant", weight_decay=WEIGHT_DECAY,
                                               max_grad_norm=CLIP, total_steps=10**6))
    state, state_sh = create_state(params, logical, opt, mesh, mesh_cfg)
    del params
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((args.batch, args.latent, args.latent, cfg.in_channels), np.float32),
             "context": rng.standard_normal((args.batch, 77, cfg.cross_attention_dim), np.float32)}
    batch_sh = shd.batch_sharding(batch, mesh, mesh_cfg)
    batch = jax.device_put(batch, batch_sh)
    loss = losses.bind(losses.denoising_loss, model=model,
                       schedule=schedulers.make_schedule(schedulers.SchedulerConfig()), cfg=losses.LossConfig())
    compute = None if args.compute_dtype == "float32" else args.compute_dtype
    step = make_train_step(loss, opt, state_shardings=state_sh, frozen_shardings={}, batch_shardings=batch_sh,
                           cfg=StepConfig(compute_dtype=compute))
    t0 = time.perf_counter()
    compiled = step.lower(state, {}, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], {}, batch)
        jax.block_until_ready(metrics["loss"])

    step_s, _ = timed(run, args.steps, args.warmup)
    devices = mesh.devices.size
    stats = [d.memory_stats() or {} for d in mesh.devices.flat]
    peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) or None
    return {"jax_step_s": step_s, "jax_compile_s": round(compile_s, 1), "jax_devices": devices,
            "jax_peak_bytes_per_device": peak, "xla_flops_per_sample": flops * devices / args.batch if flops else None,
            "jax_device_kind": mesh.devices.flat[0].device_kind, "_device": mesh.devices.flat[0]}


# --------------------------------------------------------------------------- PyTorch

def bench_torch(args) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = unet_config(args.arch).to_dict()  # the diffusers config.json keys; "_class_name" and the like dropped
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).to(device).train()
    if args.remat != "none":
        unet.enable_gradient_checkpointing()
    model = torch.compile(unet) if args.torch_compile else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(args.batch, unet.config.in_channels, args.latent, args.latent, device=device)
    context = torch.randn(args.batch, 77, unet.config.cross_attention_dim, device=device)
    bf16 = args.compute_dtype == "bfloat16"

    def run():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        else:
            loss.item()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s, first_s = timed(run, args.steps, args.warmup)
    return {"torch_step_s": step_s, "torch_first_step_s": round(first_s, 1),
            "torch_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch_compile": args.torch_compile}


def run_child(framework: str, argv: list[str]) -> dict:
    """``--only framework`` in a fresh Python process (the device's memory its own); its JSON line."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--json", "--only", framework]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sd15_train_step: the {framework} step failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    """This process's part: the JAX step (``--only jax``, with the sizes it resolved) or the PyTorch step."""
    defaults(args)
    if args.only == "torch":
        print("PyTorch step...", file=sys.stderr, flush=True)
        return bench_torch(args)
    import jax
    print(f"JAX step: {args.arch} UNet, batch {args.batch}, {args.latent}x{args.latent} latents...", file=sys.stderr,
          flush=True)
    res = bench_jax(args)
    device = res.pop("_device")
    res["peak_tflops_per_device"] = peak_tflops(args, device) if jax.default_backend() != "cpu" else None
    return {"arch": args.arch, "latent": args.latent, "batch": args.batch, "compute_dtype": args.compute_dtype,
            "backend": jax.default_backend(), **res}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.only:
        out = measure(args)
        print(json.dumps(out))
        return out
    # this process never imports JAX: the JAX child resolves the sizes, the PyTorch child is given them
    parent = [a for a in argv if a != "--json"]
    res = run_child("jax", parent)
    args.arch, args.latent, args.batch, args.compute_dtype = (res.pop(k) for k in ("arch", "latent", "batch",
                                                                                   "compute_dtype"))
    out = {"benchmark": "sd15_train_step", "arch": args.arch, "latent": [args.latent, args.latent, 4],
           "context": [77, 768 if args.arch == "sd15" else 32], "batch": args.batch, "compute_dtype": args.compute_dtype,
           "remat": args.remat, "attention": args.attention, "fsdp": args.fsdp, "backend": res.pop("backend")}
    out.update(res)
    out["jax_samples_per_s"] = args.batch / out["jax_step_s"]
    sd15_full = args.arch == "sd15" and args.latent == 64
    flops = SD15_TFLOP_PER_SAMPLE * 1e12 if sd15_full else out["xla_flops_per_sample"]
    peak = out["peak_tflops_per_device"]
    out["flops_per_sample"] = flops
    out["jax_mfu"] = (out["jax_samples_per_s"] * flops / (peak * 1e12 * out["jax_devices"])) if peak and flops else None
    if not args.skip_torch:
        sizes = ["--arch", args.arch, "--latent", str(args.latent), "--batch", str(args.batch), "--compute-dtype",
                 args.compute_dtype]
        out.update(run_child("torch", parent + sizes))
        out["torch_samples_per_s"] = args.batch / out["torch_step_s"]
        out["torch_mfu"] = (out["torch_samples_per_s"] * flops / (peak * 1e12)) if peak and flops else None
        out["ratio"] = out["torch_step_s"] / out["jax_step_s"]
        out["ratio_per_device"] = out["ratio"] / out["jax_devices"]  # torch runs on one device
    out.update(device=device_info(), versions=versions())
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
