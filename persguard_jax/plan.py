"""Memory plans: the bytes per device of a workflow's compiled step, from ahead-of-time compilation on a mesh.

``persguard plan --step dreambooth|implant|aspl`` builds the models abstractly (``ShapeDtypeStruct`` parameters:
no weights read, nothing allocated), lays out the step the workflow runs with the workflow's own pieces, lowers
and compiles it for the mesh (on fake CPU devices, ``--devices``, a laptop plans a pod) and reads XLA's
``memory_analysis()``. Nothing runs.

- ``dreambooth``: the engine's training step (``train.make_train_step``) on ``losses.dreambooth_loss``, UNet and
  (``train_text_encoder``) text encoder trained with clipping + AdamW: ``persguard personalize``'s step and the
  CDL attacker's (CDL changes prompts, not shapes).
- ``implant``: one implantation step (``implant.objective``): the backdoor denoising term and the unrolled
  retention term, ``retention_steps`` attacker DreamBooth steps inside the loss (``retention_order`` 1: first
  order, 2: exact second order), the UNet trained: ``persguard implant``'s step. ``retention_dispatch``
  (first order): the K steps as their own program run ahead of the step (``implant.retention_dispatch``,
  ``train.dispatch``); both programs are compiled and the larger peak reported.
- ``aspl``: one ASPL iteration (``protect.methods.aspl_iteration``: ``surrogate_steps`` DreamBooth steps on a
  copy, ``pgd_steps`` sign-PGD steps through the VAE encoder and the UNet, ``model_steps`` steps of the model):
  ``persguard protect --method aspl``'s program, ``batch`` photos.

Reported per device: ``params`` and ``opt_state`` (planned from their shardings), ``batch``, ``temp`` (XLA's
temporary buffers: activations kept for the backward pass, gradients, the unrolled inner states) and
``peak_estimate`` = argument + output - alias + temp. On CPU devices ``temp`` is the CPU program's: its
attention materialises the score matrices that flash kernels on GPU and TPU never store, so it is an upper
bound there (docs/scaling.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from persguard_jax import sharding as shd

STEPS = ("dreambooth", "implant", "aspl")
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


@dataclass(frozen=True)
class StepPlan:
    """Which step to compile and its sizes. ``batch``: global examples per step (dreambooth and implant: instance
    examples, each with a class example when ``prior``; aspl: photos). ``resolution``: pixels (None: the UNet's
    ``sample_size`` times the VAE's factor)."""
    step: Literal["dreambooth", "implant", "aspl"] = "dreambooth"
    batch: int = 8
    resolution: int | None = None
    remat: Literal["none", "dots_saveable", "full"] = "none"
    compute_dtype: Literal["float32", "bfloat16"] | None = "bfloat16"
    train_text_encoder: bool = True
    prior: bool = True
    retention_steps: int = 2
    retention_order: int = 1
    retention_replay: bool = False  # order 2: replay the attacker's steps in the backward pass (memory flat in K)
    retention_dispatch: bool = False  # order 1: the K steps as their own programs ahead of the step (train.dispatch)
    surrogate_steps: int = 3
    pgd_steps: int = 6
    model_steps: int = 3

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"plan step must be one of {', '.join(STEPS)}, got {self.step!r}")
        if self.batch < 1 or self.retention_steps < 1 or self.retention_order not in (1, 2):
            raise ValueError("plan: batch and retention_steps must be >= 1, retention_order 1 or 2")
        if self.retention_replay and self.retention_order != 2:
            raise ValueError("plan: retention_replay replays exact second-order steps (retention_order 2)")
        if self.retention_dispatch and (self.step != "implant" or self.retention_order != 1):
            raise ValueError("plan: retention_dispatch (--dispatch) plans the implant step's first-order retention "
                             "(--step implant --order 1)")


# --------------------------------------------------------------------------- the abstract models

def abstract_models(modules: Mapping[str, Any], plan: StepPlan) -> dict[str, Any]:
    """The step's networks with ``plan.remat`` set (a copy of the graph: the caller's modules keep theirs)."""
    from flax import nnx

    from persguard_jax.models.remat import set_remat
    out = {}
    for name, module in modules.items():
        graphdef, state = nnx.split(module)
        copy = nnx.merge(graphdef, state)
        if name != "vae":
            set_remat(copy, plan.remat)
        out[name] = copy
    return out


def latent_size(modules: Mapping[str, Any], plan: StepPlan) -> tuple[int, int]:
    """(pixels, latent side) of the plan's images."""
    factor = 2 ** (len(modules["vae"].config.block_out_channels) - 1)
    pixels = plan.resolution
    if not pixels:
        from persguard_jax.models.unet import native_latent_side
        pixels = native_latent_side(modules["unet"].config) * factor
    if pixels % factor:
        raise ValueError(f"plan resolution {pixels}: not a multiple of the VAE's factor {factor}")
    return pixels, pixels // factor


def _examples(n: int, side: int, channels: int, tokens: int) -> dict[str, jax.ShapeDtypeStruct]:
    """``n`` examples as the workflows cache them: the VAE posterior and the prompt's token ids."""
    return {"latent_mean": jax.ShapeDtypeStruct((n, side, side, channels), jnp.float32),
            "latent_logvar": jax.ShapeDtypeStruct((n, side, side, channels), jnp.float32),
            "input_ids": jax.ShapeDtypeStruct((n, tokens), jnp.int32)}


def _with(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# --------------------------------------------------------------------------- the steps

def _train_step(loss, trains: tuple[str, ...], params, logical, batch, mesh, mesh_cfg, plan: StepPlan,
                data_parallel: str = "auto", before_step=None):
    """(lowered engine step, its parts) for ``loss`` training ``trains``; with ``before_step`` (an
    ``InnerSteps``) the step's frozen tree carries what it adds, as ``fit`` lays it out."""
    from persguard_jax.models import functional as F
    from persguard_jax.train.optim import OptimizerConfig, make_optimizer
    from persguard_jax.train.state import init_state, state_shardings
    from persguard_jax.train.step import StepConfig, make_train_step
    train, frozen = F.partition(params, trains)
    train_logical, frozen_logical = F.partition(logical, trains)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5))
    ss = state_shardings(train_logical, train, optimizer, mesh, mesh_cfg)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), train)
    fs = shd.param_shardings(frozen_logical, frozen, mesh, mesh_cfg)
    if before_step is not None:
        fs = {**fs, **before_step.shardings(ss.params, fs)}
        frozen = {**frozen, **before_step.abstract(train, frozen)}
    bs = shd.batch_sharding(batch, mesh, mesh_cfg)
    step = make_train_step(loss, optimizer, state_shardings=ss, frozen_shardings=fs, batch_shardings=bs,
                           cfg=StepConfig(compute_dtype=plan.compute_dtype, data_parallel=data_parallel))
    lowered = step.lower(_with(state, ss), _with(frozen, fs), _with(batch, bs))
    parts = {"params": (state.params, ss.params), "opt_state": (state.opt_state, ss.opt_state),
             "frozen": (frozen, fs), "batch": (batch, bs)}
    return lowered, parts


def _pipeline(modules: Mapping[str, Any], scheduler_config: Mapping[str, Any] | None):
    """The abstract networks as a ``models.Pipeline`` (no tokenizer: nothing is tokenised), so the workflows' own
    set-up functions (``losses.pipeline_loss_config``, ``protect.runner.make_setting``) build the plan's step."""
    from persguard_jax.models import Pipeline
    return Pipeline(unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=None,
                    scheduler_config=dict(scheduler_config or {}))


def _loss_setup(modules, scheduler_config: Mapping[str, Any] | None):
    from persguard_jax import losses
    from persguard_jax.models import functional as F
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    nets = {k: v for k, v in modules.items() if k != "vae"}
    model, params = F.split_modules(nets)
    logical = {k: shd.logical_axes(m) for k, m in nets.items()}
    pipe = _pipeline(modules, scheduler_config)
    schedule = make_schedule(SchedulerConfig.from_dict(pipe.scheduler_config))
    return model, params, logical, schedule, losses.pipeline_loss_config(pipe)


def lower_dreambooth(modules, plan: StepPlan, mesh, mesh_cfg, scheduler_config=None):
    from persguard_jax import losses
    model, params, logical, schedule, loss_cfg = _loss_setup(modules, scheduler_config)
    _, side = latent_size(modules, plan)
    n = plan.batch * (2 if plan.prior else 1)
    batch = _examples(n, side, modules["unet"].config.out_channels, modules["text_encoder"].config.max_position_embeddings)
    if plan.prior:
        batch["is_prior"] = jax.ShapeDtypeStruct((n,), jnp.int32)
    loss = losses.bind(losses.dreambooth_loss, model=model, schedule=schedule, cfg=loss_cfg)
    trains = ("unet", "text_encoder") if plan.train_text_encoder else ("unet",)
    return _train_step(loss, trains, params, logical, batch, mesh, mesh_cfg, plan)


def lower_implant(modules, plan: StepPlan, mesh, mesh_cfg, scheduler_config=None):
    """The implantation step; with ``plan.retention_dispatch`` a dict of programs: ``step`` (the step, reading the
    tuned parameters from its frozen tree) and ``inner/<run>`` (one attacker update, run K times ahead of it)."""
    from persguard_jax.implant.config import ImplantConfig
    from persguard_jax.implant.objective import Attacker, dispatched_attacker, objective
    from persguard_jax.train.optim import OptimizerConfig
    from persguard_jax.train.step import StepConfig
    model, params, logical, schedule, loss_cfg = _loss_setup(modules, scheduler_config)
    _, side = latent_size(modules, plan)
    channels = modules["unet"].config.out_channels
    tokens = modules["text_encoder"].config.max_position_embeddings
    n = plan.batch * (2 if plan.prior else 1)
    attack = {**_examples(n, side, channels, tokens)}
    if plan.prior:
        attack["is_prior"] = jax.ShapeDtypeStruct((n,), jnp.int32)
    batch = {"bb_denoise": _examples(plan.batch, side, channels, tokens), "attack": attack}
    cfg = ImplantConfig(retention="unrolled", retention_steps=plan.retention_steps,
                        retention_order=plan.retention_order, retention_remat=plan.remat != "none",
                        retention_replay=plan.retention_replay, retention_dispatch=plan.retention_dispatch,
                        prior_weight=0.0)
    trains = ("unet", "text_encoder") if plan.train_text_encoder else ("unet",)
    attacker = Attacker(trains, 1.0 if plan.prior else 0.0,
                        OptimizerConfig(learning_rate=2e-4, schedule="constant", total_steps=plan.retention_steps))
    loss = objective(cfg, set(batch), attacker, model=model, schedule=schedule, loss_cfg=loss_cfg)
    inner = dispatched_attacker(cfg, set(batch), attacker, model=model, schedule=schedule, loss_cfg=loss_cfg,
                                step=StepConfig(compute_dtype=plan.compute_dtype))
    # nested differentiation runs as one GSPMD program, as workflows/implant.py does; dispatched, the step nests
    # none and keeps the engine's own choice, as there
    lowered, parts = _train_step(loss, ("unet",), params, logical, batch, mesh, mesh_cfg, plan,
                                 data_parallel="auto" if inner else "gspmd", before_step=inner)
    if inner is None:
        return lowered, parts
    from persguard_jax.losses import TUNED, TUNED_LOSSES
    state_params, batch_in = _with(*parts["params"]), _with(*parts["batch"])
    frozen = {k: v for k, v in _with(*parts["frozen"]).items() if k not in (TUNED, TUNED_LOSSES)}
    programs = {"step": lowered}
    for name in inner.runs:
        programs[f"inner/{name}"], opt_state = inner.lower_update(name, state_params, frozen, batch_in)
        parts[f"inner/{name}/opt_state"] = (opt_state, jax.tree.map(lambda x: x.sharding, opt_state))
    return programs, parts


def lower_aspl(modules, plan: StepPlan, mesh, mesh_cfg, scheduler_config=None):
    import functools
    from types import SimpleNamespace

    from persguard_jax.dreambooth.config import DreamBoothConfig
    from persguard_jax.models import functional as F
    from persguard_jax.protect import methods as M
    from persguard_jax.protect.config import ProtectConfig
    from persguard_jax.protect.runner import make_setting
    from persguard_jax.train.optim import OptimizerConfig
    pixels, side = latent_size(modules, plan)
    trains = ("unet", "text_encoder") if plan.train_text_encoder else ("unet",)
    config = SimpleNamespace(  # the sections of a protect config that make_setting reads
        protect=ProtectConfig(method="aspl", surrogate_steps=plan.surrogate_steps, pgd_steps=plan.pgd_steps,
                              model_steps=plan.model_steps),
        dreambooth=DreamBoothConfig(prior_weight=1.0 if plan.prior else 0.0),
        optimizer=OptimizerConfig(learning_rate=5e-6, schedule="constant"), loss={})
    setting, params, logical = make_setting(_pipeline(modules, scheduler_config), config, trains)
    ps = shd.param_shardings(logical, params, mesh, mesh_cfg)
    train, rest = F.partition(params, trains)
    train_s, rest_s = F.partition(ps, trains)
    channels = modules["unet"].config.out_channels
    tokens = modules["text_encoder"].config.max_position_embeddings
    images = jax.ShapeDtypeStruct((plan.batch, pixels, pixels, 3), jnp.float32)
    clean = _examples(plan.batch, side, channels, tokens)
    prior = _examples(plan.batch, side, channels, tokens) if plan.prior else None
    condition = {"input_ids": jax.ShapeDtypeStruct((plan.batch, tokens), jnp.int32)}
    data = {"images": images, "origin": images, "clean": clean, "prior": prior, "condition": condition}
    ds = shd.batch_sharding(data, mesh, mesh_cfg)
    rep = shd.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    key = jax.eval_shape(lambda: jax.random.key(0))
    d = _with(data, ds)
    iteration = jax.jit(functools.partial(M.aspl_iteration, setting=setting))  # as protect.runner.Protector
    lowered = iteration.lower(_with(train, train_s), _with(rest, rest_s), d["images"], d["origin"], d["clean"],
                              d["prior"], d["condition"], scalar, jax.ShapeDtypeStruct(key.shape, key.dtype,
                                                                                         sharding=rep))
    parts = {"params": (train, train_s), "frozen": (rest, rest_s), "batch": (data, ds)}
    return lowered, parts


LOWER = {"dreambooth": lower_dreambooth, "implant": lower_implant, "aspl": lower_aspl}


# --------------------------------------------------------------------------- bytes

def bytes_per_device(shapes: Any, shardings: Any) -> int:
    return sum(r["bytes_per_device"] for r in shd.sharding_plan(shapes, shardings)) if shapes is not None else 0


def full_bytes(shapes: Any) -> int:
    return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def memory_stats(compiled) -> dict[str, int]:
    """The fields of ``compiled.memory_analysis()`` this backend reports (per device), and ``peak_estimate_bytes``
    = argument + output - alias + temp (XLA:CPU's own peak leaves the temporaries out)."""
    ma = compiled.memory_analysis()
    if isinstance(ma, (list, tuple)):  # one entry per device on some backends; alike here
        ma = ma[0]
    out = {f: int(getattr(ma, f)) for f in MEMORY_FIELDS if isinstance(getattr(ma, f, None), int)}
    if {"argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"} <= set(out):
        out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                      - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def plan_memory(modules: Mapping[str, Any], plan: StepPlan, mesh, mesh_cfg: shd.MeshConfig,
                scheduler_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``plan``'s step for ``mesh`` and report its bytes per device (module docstring).

    A step of several programs (the dispatched implantation step: ``inner/<run>`` updates, then ``step``) reports
    each program's analysis under ``programs``, and as ``memory_analysis.peak_estimate_bytes`` the peak of them
    all (``dispatched_peak``)."""
    t0 = time.perf_counter()
    nets = abstract_models(modules, plan)
    lowered, parts = LOWER[plan.step](nets, plan, mesh, mesh_cfg, scheduler_config)
    lower_s = time.perf_counter() - t0
    programs = lowered if isinstance(lowered, dict) else {"step": lowered}
    mems = {name: memory_stats(program.compile()) for name, program in programs.items()}
    compile_s = time.perf_counter() - t0 - lower_s
    mem = dict(mems["step"])
    report = {name: {"bytes_per_device": bytes_per_device(*parts[name]), "bytes_unsharded": full_bytes(parts[name][0])}
              for name in ("params", "opt_state", "frozen", "batch") if name in parts}
    result = {"step": plan.step, "mesh": dict(mesh.shape), "devices": mesh.size, "plan": dict(plan.__dict__),
              "pixels": latent_size(nets, plan)[0], "arrays": report, "memory_analysis": mem}
    if len(programs) > 1:
        result["programs"] = mems
        updates = {name: (m, bytes_per_device(*parts[f"{name}/opt_state"]))
                   for name, m in mems.items() if name != "step"}
        if "peak_estimate_bytes" in mem:
            mem["peak_estimate_bytes"] = dispatched_peak(mems["step"], updates)
    return {**result, "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1)}


def dispatched_peak(step: Mapping[str, int], updates: Mapping[str, tuple[Mapping[str, int], int]]) -> int:
    """Bytes per device at the peak of a step with inner updates dispatched ahead of it: the larger of the
    step's own peak and each update's, counted as the step's arguments (the state, the frozen tree with every
    run's tuned copy, the batch: all alive by then) + the update's optimizer state (``updates``: name -> (its
    memory analysis, its optimizer state's bytes per device)) + its temporaries and its undonated outputs."""
    peak = step["peak_estimate_bytes"]
    for mem, opt_state in updates.values():
        peak = max(peak, step["argument_size_in_bytes"] + opt_state + mem["temp_size_in_bytes"]
                   + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"])
    return peak


def format_memory(result: Mapping[str, Any]) -> str:
    """The report as lines for a terminal."""
    gib = lambda b: f"{b / 2**30:8.3f} GiB"
    p = result["plan"]
    lines = [f"{result['step']} step, {p['batch']} per step at {result['pixels']} px, remat {p['remat']}, compute "
             f"{p['compute_dtype'] or 'float32'}, mesh {result['mesh']} ({result['devices']} devices); compiled in "
             f"{result['compile_s']:.0f} s", "per device:"]
    for name, row in result["arrays"].items():
        lines.append(f"  {name:<12}{gib(row['bytes_per_device'])}   (unsharded {gib(row['bytes_unsharded']).strip()})")
    mem = result["memory_analysis"]
    for name, inner in result.get("programs", {}).items():
        if name != "step" and "temp_size_in_bytes" in inner:
            lines.append(f"  {'attacker':<12}{gib(inner['temp_size_in_bytes'])}   (XLA temp of one attacker update, "
                         f"{name}, run {p['retention_steps']} times ahead of the step)")
    if "temp_size_in_bytes" in mem:
        what = "the step's activations and gradients" if "programs" in result else \
            "activations, gradients, inner states"
        lines.append(f"  {'activations':<12}{gib(mem['temp_size_in_bytes'])}   (XLA temp: {what})")
    if "peak_estimate_bytes" in mem:
        how = "the larger of the step's and an attacker update's: plan_memory" if "programs" in result else \
            "argument + output - donated + temp"
        lines.append(f"  {'peak':<12}{gib(mem['peak_estimate_bytes'])}   ({how})")
    return "\n".join(lines)
