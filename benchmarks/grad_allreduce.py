"""The per-device training step's gradient all-reduce: one psum of the raveled gradient (the engine's) against one
psum of the gradient tree, compile time and step time, same run.

The step is the engine's own (``make_train_step`` with ``dreambooth_loss``, UNet and text encoder trained, AdamW
with clipping), on a ``MeshConfig(data=-1)`` mesh over 2 CPU devices, parameters replicated, so it takes the
per-device path (train/step.py). The tree variant is the same step with ``train.step.ravel_pytree`` replaced by
an identity (the tree is psum-ed whole, one variadic all-reduce), so nothing else differs. ``--model micro``: the
engine's micro model, batch 8 (5 instance + 3 prior); a pipeline folder: its UNet and text encoder, one
DreamBooth pair. Compile = ``lower`` + ``compile``; step = median of ``--steps`` calls after one warm-up.

    python benchmarks/grad_allreduce.py --json [--model micro|persguard_jax/assets/world_tiny] [--steps 60]

Why the flat psum compiles slower (docs/benchmarks.md): XLA:CPU compiles one kernel per distinct fused
computation, and the unravel's per-leaf slice offsets make every optimizer fusion distinct. To count them, add
``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_module_re=jit_step`` and count ``DIR/*jit_step.obj-file.*``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"


def build(model_name: str):
    import numpy as np
    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.models import functional as F
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.train import OptimizerConfig, make_optimizer
    from persguard_jax.train.selfcheck import micro_data, micro_modules

    if model_name == "micro":
        modules = micro_modules(0)
        batch = {k: v[:8] for k, v in micro_data(16, 3).items()}
        batch["is_prior"] = np.array([0, 0, 0, 0, 0, 1, 1, 1], np.int32)
    else:
        from persguard_jax.models import load_pipeline
        pipe = load_pipeline(model_name)
        modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        side = pipe.unet.config.sample_size
        rng = np.random.default_rng(0)
        batch = {"latents": rng.normal(size=(2, side, side, pipe.unet.config.in_channels)).astype(np.float32),
                 "input_ids": rng.integers(2, 60, size=(2, pipe.text_encoder.config.max_position_embeddings)
                                           ).astype(np.int32),
                 "is_prior": np.array([0, 1], np.int32)}
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    cfg = shd.MeshConfig(data=-1)
    mesh = shd.make_mesh(cfg)
    trains = ["unet", "text_encoder"]
    train_p, frozen = F.partition(params, trains)
    train_l, frozen_l = F.partition(logical, trains)
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, max_grad_norm=1.0))
    loss = losses.bind(losses.dreambooth_loss, model=model, schedule=make_schedule(SchedulerConfig()),
                       cfg=losses.LossConfig(), prior_weight=1.0)
    return loss, opt, (train_p, train_l, frozen, frozen_l, batch), mesh, cfg


def measure(variant: str, model_name: str, steps: int) -> dict:
    import jax
    from persguard_jax import sharding as shd
    from persguard_jax.train import create_state, make_train_step
    from persguard_jax.train import step as step_module

    original = step_module.ravel_pytree
    if variant == "tree":
        step_module.ravel_pytree = lambda tree: (tree, lambda x: x)
    try:
        loss, opt, (train_p, train_l, frozen, frozen_l, batch), mesh, cfg = build(model_name)
        state, ss = create_state(train_p, train_l, opt, mesh, cfg)
        fs = shd.param_shardings(frozen_l, frozen, mesh, cfg)
        bs = shd.batch_sharding(batch, mesh, cfg)
        step = make_train_step(loss, opt, state_shardings=ss, frozen_shardings=fs, batch_shardings=bs)
        frozen, batch = jax.device_put(frozen, fs), jax.device_put(batch, bs)
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
    finally:
        step_module.ravel_pytree = original
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return {"compile_s": round(compile_s, 2), "step_s": statistics.median(times), "loss": float(metrics["loss"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default="micro", help="'micro' or a pipeline folder")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    from common import device_info, load_avg_1min, versions
    result = {"benchmark": "per-device step: flat psum (engine) vs tree psum", "model": args.model,
              "devices": 2, "steps_timed": args.steps}
    for variant in ("flat", "tree"):
        for k, v in measure(variant, args.model, args.steps).items():
            result[f"{variant}_{k}"] = v
    result.update(load_avg_1min=load_avg_1min(), device=device_info(), versions=versions(("jax", "jaxlib")))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
