"""One PersGuard implantation step with unrolled retention against K plain DreamBooth steps, same run.

Model: ``persguard_jax.models.tiny.tiny_pipeline(0)`` (32 px images, 16x16x4 latents, CLIP text encoder 32-d, 2
layers), random weights, or ``--model DIR`` (the world model: ``persguard_jax/assets/world_tiny``); fp32, on one
device (the step's GSPMD path, which nested differentiation needs: workflows/implant.py). Batches: one DreamBooth
pair (instance + class example, token ids, explicit noise and timesteps: ``attack``) and one backdoor example
(``bb_denoise``).

Variants, each the engine's step (``train.make_train_step``, jitted, state donated) over its own state:
- ``dreambooth_k``: K steps of ``losses.dreambooth_loss`` (UNet and text encoder trained, AdamW, clipping): what
  the attacker runs; the time of all K steps.
- ``implant_none``: one step of L_bb alone (``retention: none``): the backdoor term's own cost.
- ``implant_o1``: one step of the implantation objective (``implant.objective``: L_bb on ``bb_denoise`` +
  ``retention: unrolled``, K inner attacker steps on ``attack``, L_bb after them), first-order; the UNet trained,
  the attacker training UNet and text encoder inside.
- ``implant_o1_dispatched``: the same objective with ``implant.retention_dispatch``: the K inner steps run as
  separate programs ahead of the step (``train.dispatch.InnerSteps``), the step reads the tuned parameters
  (``losses.at_tuned``); what is timed is the inner steps and the step together.
- ``implant_o2`` / ``implant_o2_remat`` / ``implant_o2_replay``: the same, exact second order: the steps stored
  (their activations too, or only their carry with rematerialisation), or replayed from the inputs in the backward
  pass (``unroll(..., replay=True)``: only the inputs kept, K (K - 1) / 2 extra gradients).
``ratio_o1`` = implant_o1 / dreambooth_k (the target is <= 1.2: an unrolled step should cost about the K steps
it simulates), ``ratio_o1_dispatched`` likewise; ``floor_o1`` = (dreambooth_k + 2 implant_none) / dreambooth_k,
the work it cannot skip (the K steps and L_bb's gradient before and after them). Memory:
``memory.<variant>.K<k>`` is the compiled step's ``memory_analysis()`` (``temp_size_in_bytes``: activations and
residuals kept for the backward pass) for K = 2, 4, 8 (``--memory-only`` skips the timing).

Run::

    .venv/bin/python benchmarks/implant_step.py --json               # K = 2, first order: a few minutes
    .venv/bin/python benchmarks/implant_step.py --json --k 8 --model persguard_jax/assets/world_tiny
    .venv/bin/python benchmarks/implant_step.py --json --k 16 --model persguard_jax/assets/world_tiny --o1 dispatched
    .venv/bin/python benchmarks/implant_step.py --json --k 4 --second-order --memory-k 2,4,8   # long on a CPU
    .venv/bin/python benchmarks/implant_step.py --json --memory-only --memory-k 2,4,8

The second-order steps compile for over ten minutes on XLA:CPU (2 cores), so they and the memory comparison are
opt-in; on an accelerator they are the point of the benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_timing_args, device_info, interleaved, load_avg_1min, versions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_args(p)
    p.add_argument("--model", default=None, help="a pipeline folder (e.g. persguard_jax/assets/world_tiny), or "
                                                 "'micro' (micro_pipeline); default the random tiny pipeline")
    p.add_argument("--k", type=int, default=2, help="inner attacker steps of the timed unrolled variants")
    p.add_argument("--second-order", action="store_true",
                   help="also time implant_o2, implant_o2_remat and implant_o2_replay (XLA:CPU compiles them for "
                       "many minutes)")
    p.add_argument("--memory-k", default="", help="K values of the compiled-memory comparison, e.g. 2,4,8 (each "
                                                  "compiles four steps; slow on a CPU)")
    p.add_argument("--memory-only", action="store_true", help="only the compiled-memory comparison, no timing")
    p.add_argument("--o1", choices=("both", "in_program", "dispatched"), default="both",
                   help="which first-order variants to time (the in-program one compiles for many minutes at K = 16)")
    return p.parse_args(argv)


def micro_pipeline():
    """The tiny pipeline cut to one UNet level of 16 channels and a one-layer text encoder: the second-order steps
    compile in minutes on a CPU, for the memory comparison."""
    import dataclasses

    from persguard_jax.models import clip, unet
    from persguard_jax.models.init import random_init
    from persguard_jax.models.tiny import tiny_pipeline, tiny_text_config, tiny_unet_config
    pipe = tiny_pipeline(0)
    ucfg = dataclasses.replace(tiny_unet_config(16), block_out_channels=(16,), norm_num_groups=4,
                               down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    tcfg = dataclasses.replace(tiny_text_config(pipe.tokenizer.vocab_size), hidden_size=16, intermediate_size=32,
                               projection_dim=16, num_hidden_layers=1, num_attention_heads=2)
    return dataclasses.replace(pipe, unet=random_init(unet.UNet2DConditionModel, ucfg, seed=0),
                               text_encoder=random_init(clip.CLIPTextModel, tcfg, seed=2))


def batches(pipe, n: int, seed: int = 0):
    """``n`` step batches: ``attack`` (one DreamBooth pair in example layout) and ``bb_denoise`` (one example)."""
    import numpy as np

    from persguard_jax.losses import pairs_to_examples
    rng = np.random.default_rng(seed)
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    ids = np.stack([pipe.tokenizer(["a photo of sks person"])[0], pipe.tokenizer(["a photo of person"])[0]])
    out = []
    for _ in range(n):
        pair = {"latents": rng.standard_normal((1, 2, s, s, c)).astype(np.float32),
                "noise": rng.standard_normal((1, 2, s, s, c)).astype(np.float32),
                "timesteps": rng.integers(0, 1000, (1, 2)).astype(np.int32), "input_ids": ids[None].astype(np.int32)}
        bb = {"latents": rng.standard_normal((1, s, s, c)).astype(np.float32),
              "input_ids": ids[:1].astype(np.int32)}
        out.append({"attack": pairs_to_examples(pair), "bb_denoise": bb})
    return out


class Runner:
    """The engine's step for ``loss_fn`` over ``trainable`` of the tiny pipeline; ``__call__(batch)`` runs one
    step and returns the loss (so it has finished)."""

    def __init__(self, pipe, loss_fn, trainable, example_batch, *, repeat: int = 1, before_step=None):
        import jax

        from persguard_jax import sharding as shd
        from persguard_jax.models import functional as F
        from persguard_jax.train import OptimizerConfig, StepConfig, create_state, make_train_step
        from persguard_jax.train.optim import resolve_optimizer
        modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        logical = {k: shd.logical_axes(m) for k, m in modules.items()}
        _, params = F.split_modules(modules)
        train, frozen = F.partition(params, trainable)
        train_logical, frozen_logical = F.partition(logical, trainable)
        mesh_cfg = shd.MeshConfig(data=1)
        self.mesh = shd.make_mesh(mesh_cfg, devices=jax.devices()[:1])
        opt, _ = resolve_optimizer(OptimizerConfig(learning_rate=1e-4, schedule="constant", weight_decay=0.0,
                                                   total_steps=10**6))
        self.state, state_sh = create_state(train, train_logical, opt, self.mesh, mesh_cfg)
        frozen_sh = shd.param_shardings(frozen_logical, frozen, self.mesh, mesh_cfg)
        self.frozen = jax.device_put(frozen, frozen_sh)
        self.batch_sh = shd.batch_sharding(example_batch, self.mesh, mesh_cfg)
        if before_step is not None:
            frozen_sh = {**frozen_sh, **before_step.shardings(state_sh.params, frozen_sh)}
        self.step = make_train_step(loss_fn, opt, state_shardings=state_sh, frozen_shardings=frozen_sh,
                                    batch_shardings=self.batch_sh, cfg=StepConfig(data_parallel="gspmd"))
        if before_step is not None:
            from persguard_jax.train.dispatch import with_inner_steps
            self.step = with_inner_steps(self.step, before_step)
        self.repeat = repeat

    def __call__(self, batch) -> float:
        import jax
        batch = jax.device_put(batch, self.batch_sh)
        for _ in range(self.repeat):
            self.state, metrics = self.step(self.state, self.frozen, batch)
        return float(metrics["loss"])

    def memory(self, batch) -> dict:
        import jax
        compiled = self.step.lower(self.state, self.frozen, jax.device_put(batch, self.batch_sh)).compile()
        ma = compiled.memory_analysis()
        return {k: int(getattr(ma, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                  "output_size_in_bytes") if hasattr(ma, k)}


# the unrolled variants: name -> (order, remat, replay)
UNROLLED = {"o1": (1, True, False), "o2": (2, False, False), "o2_remat": (2, True, False),
            "o2_replay": (2, False, True)}


def implant_loss(model, schedule, loss_cfg, k: int, order: int, remat: bool, retention: str = "unrolled",
                 replay: bool = False, dispatch: bool = False):
    """(the implantation objective, its dispatched inner steps or None)."""
    from persguard_jax.implant.config import ImplantConfig
    from persguard_jax.implant.objective import Attacker, dispatched_attacker, objective
    from persguard_jax.train import OptimizerConfig
    cfg = ImplantConfig(retention=retention, retention_steps=k, retention_order=order, retention_remat=remat,
                        retention_replay=replay, retention_dispatch=dispatch, prior_weight=0.0)
    attacker = Attacker(("unet", "text_encoder"), 1.0, OptimizerConfig(learning_rate=2e-4, schedule="constant",
                                                                       weight_decay=0.0, total_steps=k))
    groups = {"bb_denoise", "attack"}
    kw = dict(model=model, schedule=schedule, loss_cfg=loss_cfg)
    return objective(cfg, groups, attacker, **kw), dispatched_attacker(cfg, groups, attacker, **kw)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from persguard_jax import losses
    from persguard_jax.models import functional as F
    from persguard_jax.models.tiny import tiny_pipeline
    from persguard_jax.schedulers import SchedulerConfig, make_schedule

    if args.model == "micro":
        pipe = micro_pipeline()
    elif args.model:
        from persguard_jax.models import load_pipeline
        pipe = load_pipeline(args.model)
    else:
        pipe = tiny_pipeline(0)
    model, _ = F.split_modules({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    schedule = make_schedule(SchedulerConfig.from_dict(pipe.scheduler_config))
    loss_cfg = losses.LossConfig(scaling_factor=pipe.vae.config.scaling_factor)
    data = batches(pipe, 4)
    db_loss = losses.on("attack", losses.bind(losses.dreambooth_loss, model=model, schedule=schedule, cfg=loss_cfg))
    load = load_avg_1min()
    t0 = time.time()
    def implant(k, name):
        order, remat, replay = UNROLLED[name]
        return Runner(pipe, implant_loss(model, schedule, loss_cfg, k, order, remat, replay=replay)[0], ("unet",),
                      data[0])

    def dispatched(k):
        loss_fn, inner = implant_loss(model, schedule, loss_cfg, k, 1, False, dispatch=True)
        return Runner(pipe, loss_fn, ("unet",), data[0], before_step=inner)

    medians = {}
    if not args.memory_only:
        variants = {"dreambooth_k": Runner(pipe, db_loss, ("unet", "text_encoder"), data[0], repeat=args.k),
                    "implant_none": Runner(pipe, implant_loss(model, schedule, loss_cfg, args.k, 1, False, "none")[0],
                                           ("unet",), data[0]),
                    **{f"implant_{n}": implant(args.k, n) for n in UNROLLED
                       if args.second_order or (n == "o1" and args.o1 != "dispatched")}}
        if args.o1 != "in_program":
            variants["implant_o1_dispatched"] = dispatched(args.k)
        print(f"timing {list(variants)} (K={args.k})", file=sys.stderr, flush=True)
        medians, _, _ = interleaved(variants, {n: data for n in variants}, rounds=args.rounds, block=args.block,
                                    warmup=args.warmup)
    memory = {}
    for k in [int(x) for x in args.memory_k.split(",") if x.strip()]:
        for name in UNROLLED:
            t1 = time.time()
            memory[f"implant_{name}.K{k}"] = implant(k, name).memory(data[0])
            print(f"memory implant_{name} K={k}: {memory[f'implant_{name}.K{k}']} ({time.time() - t1:.0f} s to "
                  "compile)", file=sys.stderr, flush=True)
    ratios = {}
    if medians:
        ratios = {**{f"ratio_{v[8:]}": medians[v] / medians["dreambooth_k"] for v in medians
                     if v.startswith("implant_o1")},
                  # the work an unrolled step cannot skip: the K steps plus L_bb's gradient at two points
                  "floor_o1": (medians["dreambooth_k"] + 2 * medians["implant_none"]) / medians["dreambooth_k"],
                  **{f"ratio_{v[8:]}": medians[v] / medians["dreambooth_k"] for v in medians
                     if v.startswith("implant_o2")}}
    result = {"benchmark": "implant_step", "model": args.model or "tiny_pipeline(0)", "k": args.k, "step_s": medians,
              **ratios, "memory": memory, "load_avg_1min": load, "wall_s": round(time.time() - t0, 1),
              "device": device_info(), "versions": versions(("jax", "jaxlib", "flax", "optax"))}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
