"""Tiny DreamBooth training step: the engine's step (JAX) against a PyTorch diffusers DreamBooth step, one run.

One step = DreamBooth with prior preservation (Ruiz et al., 2023) on ``persguard_jax.models.tiny.tiny_pipeline(0)``
(32 px images, 16x16x4 latents, CLIP text encoder 32-d with 2 layers, 77 tokens), batch 2 = 1 instance example +
1 class example: the text encoder runs on the input ids (instance prompt for example 0, class prompt for example
1), the UNet on the DDPM-noised latents, and the loss is instance MSE + 1.0 x prior MSE against the noise
(epsilon target). Backward through the UNet AND the text encoder (both trained, as in the papers' attacker),
global-norm clipping to 1.0, AdamW lr 5e-6 (wd 1e-2) on both. Latents, noise and timesteps are given
explicitly, so both frameworks see exactly the same batches.

Same weights: ``tiny_pipeline(0)`` is written with ``persguard_jax.models.save_pipeline`` to a temporary folder;
PyTorch loads ``UNet2DConditionModel.from_pretrained(dir/"unet")`` (diffusers) and
``CLIPTextModel.from_pretrained(dir/"text_encoder")`` (transformers), JAX uses the pipeline objects themselves.
The first-step losses (``loss_first_*``) show the two compute the same thing.

JAX (``jax_step_s``, the numerator of ``ratio``): the engine's own step, built as ``persguard personalize``
builds it (workflows/personalize.py): ``split_modules`` of unet + text_encoder, ``partition`` with trainable
``["unet", "text_encoder"]``, ``create_state`` with ``make_optimizer(OptimizerConfig(...))`` (clip_by_global_norm
+ optax.adamw), and ``make_train_step(loss, optimizer, state_shardings=..., frozen_shardings=...,
batch_shardings=..., cfg=StepConfig())`` with ``dreambooth_loss``; the batch (``latents``, ``noise``,
``timesteps``, ``input_ids``, ``is_prior``, laid out by ``pairs_to_examples``) goes through
``sharding.global_batch`` as the training loop does. The mesh is the library's default on a CPU:
``sharding.request_cpu_devices()`` before jax starts (one device per core, 2 here) and ``MeshConfig(data=-1)``,
so the batch is split over 2 devices and the parameters replicated. With replicated parameters the engine
computes the gradient per device under ``jax.shard_map`` and all-reduces it once, as one flat vector
(train/step.py; ``jax_per_device`` says whether the step took that path). ``jax_gspmd_step_s``: the same step
with ``StepConfig(data_parallel="gspmd")``, the engine's path before that change (GSPMD all-reduces each
parameter's gradient). ``jax_1dev_step_s``: the same step on a mesh over ``jax.devices()[:1]``. Each call is the
jitted step itself (the TrainState donated), then ``float(loss)`` waits for it, as the loop's metrics read does.

PyTorch baseline (``torch_step_s``, the denominator of ``ratio``): diffusers' ``train_dreambooth.py`` step in
eager mode: ``text_encoder(input_ids)[0]``, ``noise_scheduler.add_noise`` (``DDPMScheduler`` of the saved
scheduler config), ``unet(...).sample``, ``chunk`` into instance/prior halves, two ``F.mse_loss``,
``backward``, ``clip_grad_norm_`` over both models, ``torch.optim.AdamW(fused=True)`` over both,
``torch.set_num_threads(2)``. ``torch_default_adamw_step_s``: the same with the default (per-tensor foreach)
AdamW. ``--no-extra`` skips that variant and ``jax_gspmd``.

``--breakdown`` adds, for each framework, the step with the text encoder frozen and its output cached (UNet
trained alone, batch carrying ``context``: ``*_unet_only_step_s``; the difference to the full step is the
text encoder's forward + backward + update); ``jax*_flat_params_step_s``: the engine's step with the trainable
parameters passed as ONE flat vector (``ravel_pytree``; the loss unravels it), so the TrainState has 7 leaves
instead of 736; ``jax*_noop_step_s``: a jitted step with the engine step's shardings that returns the donated
TrainState unchanged (the fixed cost of moving its leaves in and out of jit); ``jax_all_reduce_ops`` /
``jax_all_reduce_arrays``: all-reduce ops in the compiled 2-device step and the arrays they reduce.
``--profile DIR`` traces a few steps of each JAX step with ``jax.profiler`` afterwards and adds ms per step of
host dispatch and of ops on each device, by kind (``profile``).

Timing: as benchmarks/unet_step.py: after warm-up, ``--rounds`` rounds each run a block of ``--block`` steps of
every variant in turn; each figure is the median of its ``rounds * block`` single-step times (default 8 x 4).
``ratio`` = jax_step_s / torch_step_s (< 1: JAX faster). ``load_avg_1min`` (before timing) and
``cpu_steal_pct`` (time the hypervisor gave to other guests while timing) flag a busy machine.

Run (from the repository root)::

    .venv/bin/python benchmarks/dreambooth_step.py --json               # one JSON line, ~1.5 minutes
    .venv/bin/python benchmarks/dreambooth_step.py --json --breakdown --profile /tmp/dbprof   # ~4 minutes
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported rather than run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_timing_args, cpu_times, device_info, interleaved, load_avg_1min, steal_pct, versions

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks person", "a photo of person"
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 5e-6, (0.9, 0.999), 1e-8, 1e-2, 1.0
PRIOR_WEIGHT = 1.0
NUM_BATCHES = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_args(p)
    p.add_argument("--no-extra", action="store_true", help="skip the default-AdamW torch and the GSPMD JAX variants")
    p.add_argument("--breakdown", action="store_true",
                   help="also time UNet-only steps (text encoder frozen, cached context) and a no-op JAX step")
    p.add_argument("--profile", metavar="DIR",
                   help="after timing, trace --profile-steps steps of each JAX step with jax.profiler into DIR and "
                        "add a summary (host dispatch, op time per device by kind) to the result")
    p.add_argument("--profile-steps", type=int, default=5)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- shared data

def make_pairs(pipe, n: int, seed: int = 0):
    """``n`` DreamBooth batches of 1 pair, in example layout (``pairs_to_examples``): NHWC latents and noise,
    timesteps, input ids (instance prompt, class prompt), is_prior (0, 1). numpy."""
    import numpy as np
    from persguard_jax.losses import pairs_to_examples
    rng = np.random.default_rng(seed)
    c = pipe.unet.config.in_channels
    s = pipe.unet.config.sample_size
    ids = np.stack([pipe.tokenizer([INSTANCE_PROMPT])[0], pipe.tokenizer([CLASS_PROMPT])[0]])[None]  # (1, 2, 77)
    out = []
    for _ in range(n):
        pairs = {
            "latents": rng.standard_normal((1, 2, s, s, c)).astype(np.float32),
            "noise": rng.standard_normal((1, 2, s, s, c)).astype(np.float32),
            "timesteps": rng.integers(0, 1000, (1, 2)).astype(np.int32),
            "input_ids": ids.astype(np.int32),
        }
        out.append(pairs_to_examples(pairs))
    return out


# --------------------------------------------------------------------------- PyTorch

def load_torch(model_dir: Path, threads: int):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel
    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").train()
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").train()
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    return unet, text_encoder, scheduler


def torch_batches(batches, *, context_of=None):
    """NCHW tensors; with ``context_of`` (a function of input ids) the cached text context instead of the ids."""
    import torch
    out = []
    for b in batches:
        ids = torch.from_numpy(b["input_ids"]).long()
        tb = {"latents": torch.from_numpy(b["latents"].transpose(0, 3, 1, 2).copy()),
              "noise": torch.from_numpy(b["noise"].transpose(0, 3, 1, 2).copy()),
              "timesteps": torch.from_numpy(b["timesteps"]).long()}
        if context_of is None:
            tb["input_ids"] = ids
        else:
            tb["context"] = context_of(ids)
        out.append(tb)
    return out


def make_torch_step(unet, text_encoder, scheduler, *, fused: bool, train_text_encoder: bool = True):
    """diffusers examples/dreambooth/train_dreambooth.py, one step (prior preservation, epsilon target)."""
    import itertools

    import torch
    import torch.nn.functional as F
    unet = copy.deepcopy(unet)
    text_encoder = copy.deepcopy(text_encoder)
    params = list(itertools.chain(unet.parameters(), text_encoder.parameters()) if train_text_encoder
                  else unet.parameters())
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=fused or None)

    def step(batch):
        latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = scheduler.add_noise(latents, noise, t)
        context = text_encoder(batch["input_ids"])[0] if train_text_encoder else batch["context"]
        pred = unet(noisy, t, context).sample
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        prior_loss = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        loss = loss + PRIOR_WEIGHT * prior_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


# --------------------------------------------------------------------------- JAX: the engine's step

class EngineRunner:
    """The step ``persguard personalize`` builds, on ``mesh``; ``__call__(batch)`` runs one step, waits, returns
    the loss. ``trainable=["unet"]`` with batches carrying ``context`` is the frozen-text-encoder path."""

    def __init__(self, pipe, host_params, mesh, mesh_cfg, batches, *, trainable=("unet", "text_encoder"),
                 noop: bool = False, flat: bool = False, data_parallel: str = "auto"):
        import jax
        from persguard_jax import losses
        from persguard_jax import sharding as shd
        from persguard_jax.models import functional as F
        from persguard_jax.schedulers import SchedulerConfig, make_schedule
        from persguard_jax.train import OptimizerConfig, StepConfig, create_state, make_optimizer, make_train_step
        from persguard_jax.train.step import data_parallel_plan
        from persguard_jax.losses import dreambooth_loss

        modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        logical = {k: shd.logical_axes(m) for k, m in modules.items()}
        model, _ = F.split_modules(modules)
        scheduler_cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
        loss_cfg = losses.LossConfig.from_dict({"prediction_type": scheduler_cfg.prediction_type,
                                                "scaling_factor": pipe.vae.config.scaling_factor})
        loss_kw = dict(model=model, schedule=make_schedule(scheduler_cfg), cfg=loss_cfg, prior_weight=PRIOR_WEIGHT)
        # host copies: every runner gets its own device buffers (the state is donated)
        train_params, frozen = F.partition(host_params, list(trainable))
        train_logical, frozen_logical = F.partition(logical, list(trainable))

        def loss_fn(p, batch, rng):
            return dreambooth_loss(p, batch, rng, **loss_kw)

        if flat:  # the trainable parameters as ONE flat vector: one gradient array, one all-reduce, 5 state leaves
            import numpy as np
            from jax.flatten_util import ravel_pytree
            from jax.sharding import PartitionSpec as P
            vec, unravel = ravel_pytree(train_params)
            train_params, train_logical = {"flat": np.asarray(vec)}, {"flat": P(None)}

            def loss_fn(p, batch, rng):
                rest = {k: v for k, v in p.items() if k != "flat"}
                return dreambooth_loss(F.merge(unravel(p["flat"]), rest), batch, rng, **loss_kw)

        optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                                   weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM))
        self.state, state_sh = create_state(train_params, train_logical, optimizer, mesh, mesh_cfg, seed=0)
        frozen_sh = shd.param_shardings(frozen_logical, frozen, mesh, mesh_cfg)
        self.frozen = jax.device_put(frozen, frozen_sh)
        batch_sh = shd.local_batch_sharding(batches[0], mesh, mesh_cfg)
        if noop:
            def noop_step(state, frozen, batch):
                return state, {"loss": batch["timesteps"][0].astype("float32")}
            self.step = jax.jit(noop_step, donate_argnums=(0,), in_shardings=(state_sh, frozen_sh, batch_sh),
                                out_shardings=(state_sh, None))
        else:
            self.step = make_train_step(loss_fn, optimizer, state_shardings=state_sh, frozen_shardings=frozen_sh,
                                        batch_shardings=batch_sh, cfg=StepConfig(data_parallel=data_parallel))
        self.per_device = (not noop and data_parallel == "auto"
                           and data_parallel_plan(state_sh.params, frozen_sh, batch_sh) is not None)
        self.batches = [shd.global_batch(b, mesh, mesh_cfg) for b in batches]
        self.n_leaves = len(jax.tree.leaves(self.state))

    def all_reduces(self) -> tuple[int, int]:
        """(all-reduce ops, arrays they reduce) in the compiled step (compiles it once more). XLA's combiner
        merges the per-parameter gradient all-reduces into tuple all-reduces."""
        text = self.step.lower(self.state, self.frozen, self.batches[0]).compile().as_text()
        ops = operands = 0
        for line in text.splitlines():
            if " all-reduce(" in line or " all-reduce-start(" in line:
                ops += 1
                operands += len(re.findall(r"\b[a-z]+\d*\[", line.split(" all-reduce")[0]))
        return ops, operands

    def __call__(self, batch):
        self.state, metrics = self.step(self.state, self.frozen, batch)
        return float(metrics["loss"])


def _op_kind(hlo_op: str) -> str:
    name = re.sub(r"\.\d+$", "", hlo_op)
    if name.startswith("ynn_fusion"):
        return "ynnpack (convolutions, matmuls)"
    if name in ("dot", "dot_general"):
        return "eigen matmuls"
    if name.startswith("convolution"):
        return "eigen convolutions"
    if "all-reduce" in name:
        return "all-reduce"
    return "other (elementwise fusions, copies, reductions)"


def profile_summary(runner, steps: int, logdir: str) -> dict:
    """Trace ``steps`` steps with ``jax.profiler`` and summarise the trace: ms per step of host dispatch (the
    jitted call until it returns), of ops on each device by kind, and wall."""
    import collections
    import glob
    import gzip

    import jax
    before = set(glob.glob(os.path.join(logdir, "plugins", "profile", "*")))
    with jax.profiler.trace(logdir):
        t0 = time.perf_counter()
        for i in range(steps):
            runner(runner.batches[i % len(runner.batches)])
        wall = (time.perf_counter() - t0) / steps
    run_dir = sorted(set(glob.glob(os.path.join(logdir, "plugins", "profile", "*"))) - before)[-1]
    events = []
    for path in glob.glob(os.path.join(run_dir, "*.trace.json.gz")):
        with gzip.open(path) as f:
            events += json.load(f)["traceEvents"]
    calls = sorted((e["ts"], e["dur"]) for e in events
                   if e.get("ph") == "X" and e.get("name", "").startswith("PjitFunction(step"))
    dispatch, end = 0.0, -1.0
    for ts, dur in calls:  # nested events of one call: count the outermost
        if ts >= end:
            dispatch += dur
            end = ts + dur
    ops = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in events:
        a = e.get("args", {})
        if e.get("ph") == "X" and "hlo_op" in a and a.get("hlo_module", "").startswith("jit_step"):
            ops[f"device {a.get('device_ordinal', '?')}"][_op_kind(a["hlo_op"])] += e["dur"]
    ms = lambda us: round(us / 1000 / steps, 2)
    return {"wall_ms_profiled": round(wall * 1000, 2), "host_dispatch_ms": ms(dispatch),
            "op_ms": {dev: {"total": ms(sum(kinds.values())), **{k: ms(v) for k, v in
                                                                  sorted(kinds.items(), key=lambda kv: -kv[1])}}
                      for dev, kinds in sorted(ops.items())},
            "trace": run_dir}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from persguard_jax import sharding as shd
    shd.request_cpu_devices()  # the library's CPU default, before jax's backend starts: one device per core
    import jax
    import numpy as np
    import torch
    from persguard_jax.models import functional as F
    from persguard_jax.models import save_pipeline
    from persguard_jax.models.tiny import tiny_pipeline

    pipe = tiny_pipeline(0)
    tmp = tempfile.TemporaryDirectory(prefix="dreambooth_bench_")
    model_dir = save_pipeline(pipe, Path(tmp.name) / "tiny")
    unet_pt, te_pt, sched_pt = load_torch(Path(model_dir), args.threads)
    batches = make_pairs(pipe, NUM_BATCHES)
    _, params = F.split_modules({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    host_params = jax.device_get(params)

    mesh_cfg = shd.MeshConfig(data=-1)
    mesh = shd.make_mesh(mesh_cfg)
    mesh_1 = shd.make_mesh(mesh_cfg, devices=jax.devices()[:1])

    variants, data, first_call_s, runners = {}, {}, {}, {}

    def add_jax(name, m, bs=batches, **kw):
        r = EngineRunner(pipe, host_params, m, mesh_cfg, bs, **kw)
        t0 = time.perf_counter()
        jax.block_until_ready(r(r.batches[0]))  # compiles; a training step too, its loss unused
        first_call_s[name] = time.perf_counter() - t0
        # a fresh state, so every variant's first timed (warm-up) step starts from the same weights
        r2 = EngineRunner(pipe, host_params, m, mesh_cfg, bs, **kw)
        r2.step = r.step  # same jitted function: already compiled
        variants[name], data[name], runners[name] = r2, r2.batches, r2

    def add_torch(name, bs, **kw):
        variants[name], data[name] = make_torch_step(unet_pt, te_pt, sched_pt, **kw), bs

    tb = torch_batches(batches)
    add_jax("jax", mesh)
    add_jax("jax_1dev", mesh_1)
    add_torch("torch", tb, fused=True)
    if not args.no_extra:
        add_jax("jax_gspmd", mesh, data_parallel="gspmd")
        add_torch("torch_default_adamw", tb, fused=False)
    all_reduces = None
    if args.breakdown:
        from persguard_jax.sample import encode_text
        ctx = np.asarray(encode_text(pipe, [INSTANCE_PROMPT, CLASS_PROMPT]), np.float32)  # (2, 77, 32)
        ctx_batches = [{**{k: v for k, v in b.items() if k != "input_ids"}, "context": ctx} for b in batches]
        add_jax("jax_unet_only", mesh, ctx_batches, trainable=("unet",))
        add_jax("jax_1dev_unet_only", mesh_1, ctx_batches, trainable=("unet",))

        def context_of(ids):
            with torch.no_grad():
                return te_pt(ids)[0]
        add_torch("torch_unet_only", torch_batches(batches, context_of=context_of), fused=True,
                  train_text_encoder=False)
        add_jax("jax_flat_params", mesh, flat=True)
        add_jax("jax_1dev_flat_params", mesh_1, flat=True)
        add_jax("jax_noop", mesh, noop=True)
        add_jax("jax_1dev_noop", mesh_1, noop=True)
        all_reduces = runners["jax"].all_reduces()

    load_avg = load_avg_1min()
    cpu0 = cpu_times()
    med, _, loss = interleaved(variants, data, rounds=args.rounds, block=args.block, warmup=args.warmup)
    cpu1 = cpu_times()
    profiles = {}
    if args.profile:
        for name in ("jax", "jax_1dev") + (("jax_1dev_unet_only",) if args.breakdown else ()):
            profiles[name] = profile_summary(runners[name], args.profile_steps, os.path.join(args.profile, name))
    tmp.cleanup()

    n_dev = jax.device_count()
    result = {
        "benchmark": "tiny DreamBooth step (text encoder + UNet fwd+bwd, prior preservation, clip + AdamW on both), "
                     "batch 1 instance + 1 class, 16x16x4 latents, 77 tokens",
        "jax_step_s": med["jax"],
        "jax_1dev_step_s": med["jax_1dev"],
        "torch_step_s": med["torch"],
        "jax_steps_per_s": 1.0 / med["jax"],
        "jax_1dev_steps_per_s": 1.0 / med["jax_1dev"],
        "torch_steps_per_s": 1.0 / med["torch"],
        "ratio": med["jax"] / med["torch"],
        "ratio_1dev": med["jax_1dev"] / med["torch"],
        "jax_setup": f"engine step (make_train_step + dreambooth_loss, TrainState donated), default CPU mesh "
                     f"MeshConfig(data=-1) over {n_dev} devices: batch split, params replicated"
                     + (", gradient per device (shard_map) + one psum of the flat gradient"
                        if runners["jax"].per_device else ", GSPMD"),
        "jax_per_device": runners["jax"].per_device,
        "jax_1dev_setup": "the same step on a mesh over jax.devices()[:1]",
        "torch_baseline": f"diffusers UNet2DConditionModel + transformers CLIPTextModel eager, clip_grad_norm_, "
                          f"AdamW(fused=True), {args.threads} threads",
    }
    if "torch_default_adamw" in med:
        result["torch_default_adamw_step_s"] = med["torch_default_adamw"]
    if "jax_gspmd" in med:
        result.update({"jax_gspmd_step_s": med["jax_gspmd"], "ratio_gspmd": med["jax_gspmd"] / med["torch"],
                       "jax_gspmd_setup": "the default-mesh step with StepConfig(data_parallel='gspmd'): the "
                                          "partitioner all-reduces each parameter's gradient"})
    if args.breakdown:
        result.update({
            "jax_unet_only_step_s": med["jax_unet_only"],
            "jax_1dev_unet_only_step_s": med["jax_1dev_unet_only"],
            "torch_unet_only_step_s": med["torch_unet_only"],
            "jax_flat_params_step_s": med["jax_flat_params"],
            "jax_1dev_flat_params_step_s": med["jax_1dev_flat_params"],
            "jax_noop_step_s": med["jax_noop"],
            "jax_1dev_noop_step_s": med["jax_1dev_noop"],
            "jax_all_reduce_ops": all_reduces[0],
            "jax_all_reduce_arrays": all_reduces[1],
        })
    if profiles:
        result["profile"] = profiles
    result.update({
        **{f"jax_first_call_s_{k}": v for k, v in first_call_s.items()},
        **{f"loss_first_{k}": v for k, v in loss.items() if not k.endswith("noop")},
        "loss_first_abs_diff": abs(loss["jax"] - loss["torch"]),
        "param_count": {"unet": sum(p.numel() for p in unet_pt.parameters()),
                        "text_encoder": sum(p.numel() for p in te_pt.parameters())},
        "state_leaves": runners["jax"].n_leaves,
        "steps_timed_per_variant": args.rounds * args.block,
        "load_avg_1min": load_avg,
        "cpu_steal_pct": steal_pct(cpu0, cpu1),
        "jax_backend": jax.default_backend(),
        "jax_devices": n_dev,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "device": device_info(),
        "torch_threads": args.threads,
        "versions": versions(("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers")),
        "config": {"pipeline": "persguard_jax.models.tiny.tiny_pipeline(0)", "batch": "1 instance + 1 class",
                   "latent": [16, 16, 4], "tokens": 77, "text_hidden": 32, "train": ["unet", "text_encoder"],
                   "optimizer": f"clip global norm {MAX_GRAD_NORM} + AdamW lr={LR} wd={WEIGHT_DECAY}",
                   "loss": f"epsilon MSE instance + {PRIOR_WEIGHT} x prior, given timesteps and noise",
                   "dtype": "float32"},
    })
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
