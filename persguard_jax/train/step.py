"""The step factory: any pure loss becomes one jitted, donated, sharded training step.

``make_train_step(loss_fn, optimizer, ...)`` returns ``step(state, frozen, batch) -> (state, metrics)``:

- ``loss_fn(params, batch, rng) -> (loss, aux)`` sees the full parameters: the trainable ones from the state
  merged with ``frozen`` (which is only read, never differentiated).
- Mixed precision: with ``compute_dtype`` (e.g. bfloat16) the parameters are cast before the loss; the state
  keeps float32 master weights and the cast's transpose brings float32 gradients back. Casting before use also
  halves the bytes FSDP all-gathers.
- Gradient accumulation: the batch is cut into ``grad_accum`` micro-batches scanned with ``jax.lax.scan``
  (one optimizer update, the activation memory of one micro-batch).
- The optimizer is any optax ``GradientTransformation`` (a PGD sign step with projection, an ascent step) or an
  ``OptimizerConfig`` (clipping, AdamW, schedule: ``optim.make_optimizer``). The learning rate of each update is
  logged as ``learning_rate``: the config's schedule, or ``lr_schedule`` given with a transform.
- EMA of the trainable parameters when the state has one.
- Rematerialisation is a property of the modules (``models.remat``): set it before splitting the model.

Data parallelism, two ways (``StepConfig.data_parallel``):

- FSDP / tensor sharding (any trainable or frozen leaf split over the mesh): one program over the global batch,
  partitioned by GSPMD, which inserts the all-gathers and reduce-scatters (or all-reduces) itself.
- Replicated parameters, the batch split over mesh axes (pure data parallelism; the default CPU mesh): the
  gradient is computed per device under ``jax.shard_map`` over the batch axes, and ONE ``psum`` of the raveled
  gradient vector sums it. (GSPMD would all-reduce each parameter's gradient where it is produced: one tuple
  all-reduce of ~250 arrays for the tiny DreamBooth step, which XLA:CPU runs at ~0.1-0.15 ms per array.)
  Inside, the parameters are ``pcast`` to device-varying, so autodiff keeps each device's gradient local, and
  the loss runs on the device's share of the batch within ``losses.sharded_batch``: its batch-wide sums
  (``losses.batch_sum``, under ``weighted_mean``, ``masked``, ``prior_preservation``) are ``psum``-ed over the
  batch axes in the forward pass, so every device sees the *global* loss (and scalar metrics), and its
  example-shaped draws (``losses.batch_draw``: noise, timesteps) are the global batch's rows, so each example
  gets the same noise on any device count. The gradient of the global loss with respect to one device's copy of
  the parameters is that device's contribution (the transpose of ``psum`` passes each device its cotangent
  unchanged); their ``psum`` is the full gradient. Not a ``pmean`` of local losses: a mean over the instance
  examples divides by the global instance count, which no single device holds. Losses stay pure
  ``(params, batch, rng) -> (loss, aux)`` functions that know nothing of devices; only the ``losses`` batch
  helpers do. A loss or metric reduced over the local share alone (a plain ``jnp.mean``) is still
  device-varying: tracing finds it, and the step falls back to GSPMD with a warning that names it. Gradient
  accumulation scans micro-batches inside the ``shard_map`` (each device's share of micro-batch ``i`` is local,
  see ``_micro_batches``); the optimizer, EMA and metrics run after it on replicated values.

The returned function is ``jax.jit`` with in/out shardings and ``donate_argnums=0``; ``step.lower(state,
frozen, batch).compile()`` compiles ahead of time (and ``.memory_analysis()`` reports its memory).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persguard_jax.config import Section
from persguard_jax.losses import scalar_metrics, sharded_batch
from persguard_jax.models.attention import Implementation
from persguard_jax.models.functional import cast_floating, merge
from persguard_jax.train.optim import Optimizer, resolve_optimizer
from persguard_jax.train.state import TrainState


@dataclass(frozen=True)
class StepConfig(Section):
    """How one step computes: compute dtype, gradient accumulation, EMA decay, PRNG implementation, and how a
    data-parallel gradient is reduced."""
    SECTION = "step"
    BOUNDS = {"grad_accum": "[1, inf)", "ema_decay": "[0, 1)"}
    # None: the parameters' dtype; "bfloat16": bf16 compute, fp32 master weights
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    grad_accum: int = 1
    ema_decay: float | None = None     # used when the state carries an EMA
    # PRNG implementation of state.rng (None: jax's default)
    rng_impl: Literal["threefry2x32", "rbg", "unsafe_rbg"] | None = None
    # "auto": with replicated parameters, per-device gradients under shard_map and one psum of the flat gradient
    # vector (module docstring); "gspmd": always one program partitioned by GSPMD
    data_parallel: Literal["auto", "gspmd"] = "auto"
    # the attention kernel of every model the workflow loads (models.attention): "auto" = einsum on CPU, cuDNN flash
    # on GPU, Pallas flash on TPU, each falling back to XLA's where it cannot take the shapes
    attention: Implementation = "auto"


def _micro_batches(batch: Any, n: int) -> Any:
    """``(B, ...) -> (n, B/n, ...)``, example ``i`` going to micro-batch ``i % n``: the reshape keeps the leading
    (sharded) dimension whole, so each device's share of every micro-batch is already local."""
    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
        return jnp.moveaxis(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 1, 0)
    return jax.tree.map(one, batch)


def loss_and_grads(loss_fn: Callable, params: Any, frozen: Any, batch: Any, rng: jax.Array,
                   cfg: StepConfig) -> tuple[jax.Array, dict, Any]:
    """(mean loss, mean scalar metrics, mean gradients w.r.t. ``params``) over ``cfg.grad_accum`` micro-batches."""
    dtype = jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype else None

    def objective(p, b, key):
        full = merge(cast_floating(p, dtype), cast_floating(frozen, dtype))
        loss, aux = loss_fn(full, b, key)
        return loss.astype(jnp.float32), scalar_metrics(aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if cfg.grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, metrics, grads

    micro = _micro_batches(batch, cfg.grad_accum)

    def body(carry, xs):
        i, b = xs
        (loss, metrics), grads = grad_fn(params, b, jax.random.fold_in(rng, i))
        acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return acc, None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(_zeros, (shapes[0][0], shapes[0][1], shapes[1]))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(cfg.grad_accum), micro))
    return jax.tree.map(lambda x: x / cfg.grad_accum, total)


def _varying_axes(x: Any) -> frozenset[str]:
    """The mesh axes over which ``x`` (a traced value or a ShapeDtypeStruct) differs between devices inside
    ``shard_map`` (empty outside it)."""
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:  # jax 0.10: the varying axes live on the manual-axis type
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return frozenset(vma or ())


def _zeros(shape: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros of ``shape``'s type, device-varying like it (a scan carry must keep its type)."""
    z = jnp.zeros(shape.shape, shape.dtype)
    axes = _varying_axes(shape)
    return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


class DataParallel(NamedTuple):
    """Where the per-device gradient runs: ``mesh``, the mesh ``axes`` the batch is split over (in order) and the
    batch's ``PartitionSpec`` tree."""
    mesh: Mesh
    axes: tuple[str, ...]
    batch_specs: Any


def data_parallel_plan(param_shardings: Any, frozen_shardings: Any, batch_shardings: Any) -> DataParallel | None:
    """A ``DataParallel`` when every trainable and frozen leaf is fully replicated and every batch leaf is split
    on its leading dimension only, over the same mesh axes (more than one device); None otherwise (GSPMD)."""
    if param_shardings is None or frozen_shardings is None or batch_shardings is None:
        return None
    params = jax.tree.leaves(param_shardings) + jax.tree.leaves(frozen_shardings)
    batch = jax.tree.leaves(batch_shardings)
    if not batch or not all(isinstance(s, NamedSharding) for s in params + batch):
        return None
    mesh = batch[0].mesh
    if any(s.mesh != mesh for s in params + batch) or not all(s.is_fully_replicated for s in params):
        return None
    leading = {s.spec[0] if len(s.spec) else None for s in batch}
    if len(leading) != 1 or any(any(d is not None for d in s.spec[1:]) for s in batch):
        return None
    lead = leading.pop()
    axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
    if math.prod(mesh.shape[a] for a in axes) <= 1:
        return None
    return DataParallel(mesh, axes, jax.tree.map(lambda s: s.spec, batch_shardings))


class LocalReductionError(ValueError):
    """A loss (or scalar metric) that would differ between devices when each computes it on its share."""


def per_device_loss_and_grads(loss_fn: Callable, params: Any, frozen: Any, batch: Any, rng: jax.Array,
                              cfg: StepConfig, plan: DataParallel) -> tuple[jax.Array, dict, Any]:
    """``loss_and_grads`` on a batch split over ``plan.axes``, parameters replicated: each device differentiates
    the global loss with respect to its own copy of the parameters on its share of the batch, and one ``psum`` of
    the raveled gradients adds the contributions (module docstring)."""
    axes = plan.axes
    count = math.prod(plan.mesh.shape[a] for a in axes)

    def local(params, frozen, batch, rng):
        params = jax.tree.map(lambda p: jax.lax.pcast(p, axes, to="varying"), params)
        with sharded_batch(axes, count):
            loss, metrics, grads = loss_and_grads(loss_fn, params, frozen, batch, rng, cfg)
        for name, value in {"loss": loss, **metrics}.items():
            if _varying_axes(value) & set(axes):
                raise LocalReductionError(
                    f"the loss's {name!r} is reduced over one device's share of the batch only (or computed from "
                    f"the parameters alone): reduce over the batch with losses.batch_sum / batch_mean / "
                    f"weighted_mean to get per-device gradients with one all-reduce")
        flat, unravel = ravel_pytree(grads)
        return loss, metrics, unravel(jax.lax.psum(flat, axes))

    return jax.shard_map(local, mesh=plan.mesh, in_specs=(P(), P(), plan.batch_specs, P()),
                         out_specs=P())(params, frozen, batch, rng)


def train_step(state: TrainState, frozen: Any, batch: Any, *, loss_fn: Callable,
               optimizer: optax.GradientTransformation, cfg: StepConfig,
               lr_schedule: Callable | None = None, plan: DataParallel | None = None) -> tuple[TrainState, dict]:
    """One update (unjitted; ``make_train_step`` jits it). The step's randomness is ``fold_in(rng, step)``: a
    resumed run draws the same noise as an uninterrupted one. With a ``plan`` the gradient is computed per
    device (``per_device_loss_and_grads``), or, when the loss turns out to reduce over a device's share only
    (``LocalReductionError`` while tracing), by GSPMD with a warning."""
    key = jax.random.wrap_key_data(state.rng, impl=cfg.rng_impl) if cfg.rng_impl else jax.random.wrap_key_data(state.rng)
    key = jax.random.fold_in(key, state.step)
    if plan is not None:
        try:
            loss, metrics, grads = per_device_loss_and_grads(loss_fn, state.params, frozen, batch, key, cfg, plan)
        except LocalReductionError as e:
            warnings.warn(f"{e}; this step's gradient is partitioned by GSPMD instead (one all-reduce per "
                          f"parameter)", stacklevel=2)
            plan = None
    if plan is None:
        loss, metrics, grads = loss_and_grads(loss_fn, state.params, frozen, batch, key, cfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        decay = cfg.ema_decay if cfg.ema_decay is not None else 0.999
        ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state.step)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, ema=ema)
    return new, metrics


def make_train_step(loss_fn: Callable, optimizer: Optimizer, *,
                    state_shardings: TrainState | None = None, frozen_shardings: Any = None,
                    batch_shardings: Any = None, cfg: StepConfig = StepConfig(),
                    lr_schedule: optax.ScalarOrSchedule | None = None, donate: bool = True) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``, jitted with the given shardings (None: let jit infer
    them from the arguments) and the state donated (its buffers are reused for the new state).

    ``optimizer``: an optax transform, or an ``OptimizerConfig`` (made with ``make_optimizer``, so the state must
    come from the same config). ``lr_schedule`` (a schedule or a constant, with a transform only) is evaluated at
    ``state.step`` and logged as ``learning_rate``; a config logs its own schedule.

    With all three shardings given, replicated parameters and a split batch (``data_parallel_plan``), and
    ``cfg.data_parallel == "auto"``, the gradient is computed per device with one all-reduce (module
    docstring); otherwise GSPMD partitions the whole step."""
    optimizer, lr_schedule = resolve_optimizer(optimizer, lr_schedule)
    plan = None
    if cfg.data_parallel == "auto" and state_shardings is not None:
        plan = data_parallel_plan(state_shardings.params, frozen_shardings, batch_shardings)

    def step(state, frozen, batch):
        return train_step(state, frozen, batch, loss_fn=loss_fn, optimizer=optimizer, cfg=cfg,
                          lr_schedule=lr_schedule, plan=plan)

    kwargs = {}
    if state_shardings is not None:
        kwargs["in_shardings"] = (state_shardings, frozen_shardings, batch_shardings)
        kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs)
