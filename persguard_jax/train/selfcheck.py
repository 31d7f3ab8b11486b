"""A small end-to-end run of the engine, as a command: mesh, sharded state, step, loop, checkpoints.

It fine-tunes a micro text-to-image model (random init, one UNet level, a 1-layer text encoder) with the
denoising loss on a fixed random data set, and writes the final trainable parameters to
``<workdir>/final_params.npz``. Tests use it to check resuming after ``kill -9``, preemption and multi-process
runs against an uninterrupted single-process run; users can run it to check an installation or a cluster::

    python -m persguard_jax.train.selfcheck --workdir /tmp/engine --steps 20 --data 2
    # two processes on one machine (each with its own devices):
    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m ... &
    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python -m ...
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--devices", type=int, default=None, help="CPU devices per process (default: one per core)")
    p.add_argument("--data", type=int, default=-1, help="mesh data axis (-1: the rest)")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="global batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sync-checkpoints", action="store_true", help="save synchronously")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rng-impl", default=None, help="PRNG implementation (threefry2x32, rbg, unsafe_rbg)")
    return p.parse_args(argv)


def micro_modules(seed: int = 0):
    """A one-level UNet and a one-layer CLIP text encoder (compiles in seconds on a CPU)."""
    from persguard_jax.models import clip, unet
    from persguard_jax.models.init import random_init
    ucfg = unet.UNetConfig(sample_size=8, block_out_channels=(16,), layers_per_block=1, norm_num_groups=4,
                           down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                           attention_head_dim=4, cross_attention_dim=16)
    tcfg = clip.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, projection_dim=16,
                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                               bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return {"unet": random_init(unet.UNet2DConditionModel, ucfg, seed=seed),
            "text_encoder": random_init(clip.CLIPTextModel, tcfg, seed=seed + 1)}


def micro_data(n: int = 32, seed: int = 0) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"latents": rng.normal(size=(n, 8, 8, 4)).astype(np.float32),
            "input_ids": rng.integers(2, 64, size=(n, 8)).astype(np.int32)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from persguard_jax import sharding as shd
    shd.request_cpu_devices(args.devices)
    from persguard_jax.train import distributed
    distributed.initialize()

    import jax
    import numpy as np
    from persguard_jax import losses
    from persguard_jax.data.batches import ArraySource, StepBatches, batch_iterator
    from persguard_jax.models import functional as F
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.train import (LoopConfig, OptimizerConfig, StepConfig, create_state, make_optimizer,
                                     make_train_step, train)

    mesh_cfg = shd.MeshConfig(data=args.data, fsdp=args.fsdp, tensor=args.tensor, min_shard_size=64)
    mesh = shd.make_mesh(mesh_cfg)
    modules = micro_modules()
    logical = {name: shd.logical_axes(m) for name, m in modules.items()}
    model, params = F.split_modules(modules)
    trainable = ["unet", "text_encoder"] if args.train_text_encoder else ["unet"]
    params, frozen = F.partition(params, trainable)
    logical_train, logical_frozen = F.partition(logical, trainable)

    opt_cfg = OptimizerConfig(learning_rate=args.lr, total_steps=args.steps, warmup_steps=2, schedule="cosine")
    optimizer = make_optimizer(opt_cfg)
    state, state_sh = create_state(params, logical_train, optimizer, mesh, mesh_cfg, seed=0, ema=args.ema,
                                   rng_impl=args.rng_impl)
    frozen_sh = shd.param_shardings(logical_frozen, frozen, mesh, mesh_cfg)
    frozen = jax.device_put(frozen, frozen_sh)

    loss = losses.bind(losses.denoising_loss, model=model, schedule=make_schedule(SchedulerConfig()),
                       cfg=losses.LossConfig())
    batches = StepBatches(ArraySource(micro_data()), global_batch=args.batch, num_steps=args.steps, seed=0)
    local = batches[0]
    batch_sh = shd.local_batch_sharding(local, mesh, mesh_cfg)
    step = make_train_step(loss, opt_cfg, state_shardings=state_sh, frozen_shardings=frozen_sh,  # logs its lr
                           batch_shardings=batch_sh, cfg=StepConfig(grad_accum=args.grad_accum, ema_decay=0.9, rng_impl=args.rng_impl))
    loop_cfg = LoopConfig(num_steps=args.steps, log_every=1, checkpoint_every=args.checkpoint_every,
                          async_checkpoint=not args.sync_checkpoints, tensorboard=False,
                          progress=not args.no_progress)
    result = train(step, state, frozen, batch_iterator(batches), workdir=args.workdir, cfg=loop_cfg, mesh=mesh,
                   mesh_cfg=mesh_cfg, state_shardings=state_sh)
    if result.preempted:
        return 0
    final = F.flatten(distributed.to_host(result.state.params))
    if distributed.is_writer():
        out = Path(args.workdir) / "final_params.npz"
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, **final)
        os.replace(tmp, out)
        print(f"final loss {result.last_metrics.get('loss'):.6f}; resumed from {result.resumed_from}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
