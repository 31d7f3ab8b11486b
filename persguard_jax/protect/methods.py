"""The protections as pure, jittable functions: objectives, sign-PGD, the surrogate's DreamBooth steps and one
ASPL iteration. Host-side drivers (progress, sharding, files) are in ``protect.runner``.

All images are ``(N, H, W, 3)`` in [-1, 1]. ``Setting`` carries what every piece closes over (the model's graph
definitions, the noise schedule, the loss config, the attacker's recipe, the protect config); build jitted
functions with ``functools.partial(fn, setting=...)`` so none of it becomes a traced argument.

What the released code does and what is ours (Anti-DreamBooth's ``attacks/aspl.py``, ``fsmg.py``):
- PGD maximises the plain denoising loss of the photos under the instance prompt, through VAE encode (a posterior
  draw) -> noising at a fresh timestep with fresh noise -> UNet, all photos in one batch; the step is
  ``x + alpha sign(grad)``, projected to the l_inf ball around the originals, then clamped to [-1, 1].
- The surrogate's DreamBooth steps start a fresh AdamW each call (``train_one_epoch`` builds its optimizer anew)
  and train on one instance + one class image per step. The released loop restarts its photo index at every call,
  so with 3 steps per call and 5 photos it never trains on photos 4 and 5; here step ``j`` of iteration ``i``
  takes photo ``(i * steps + j) mod N``, so every photo is used.
- The targeted variant subtracts ``target_weight`` times ``losses.target_shift_loss`` (same noise and timesteps).
- MetaCloak's expectation over transformations (``eot``): each PGD step sees the photos blurred with a random
  sigma and flipped at random (one draw per step for the whole batch), differentiably.

Data parallelism (``Setting.mesh``, set by ``runner.Protector`` under ``protect.per_device`` when the weights are
replicated): PGD runs per device on its share of the photos under ``jax.shard_map`` (the gradient of each photo is
its own: no all-reduce but the objective's scalar), the photos padded to a multiple of the devices with zero-weight
copies; each DreamBooth step's pair of examples is split the same way, its gradient summed with one ``psum``
(``train.unroll``'s ``data_parallel``). Every draw is made at the global batch size and sliced
(``losses.batch_draw``; jax's partitionable threefry gives the first rows of a larger draw the values of the
smaller one), so the result does not depend on the device count or the padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persguard_jax import losses
from persguard_jax import sharding as shd
from persguard_jax.models import functional as F
from persguard_jax.protect.config import ProtectConfig
from persguard_jax.train.optim import OptimizerConfig
from persguard_jax.train.pgd import sign_pgd
from persguard_jax.train.step import DataParallel
from persguard_jax.train.unroll import unroll

Examples = Mapping[str, jax.Array]
Objective = Callable[[jax.Array, Examples, jax.Array], tuple[jax.Array, dict]]


@dataclass(frozen=True)
class Setting:
    """What the protections close over: graphs, schedule, loss config, the attacker's recipe, the config."""
    model: F.Modules
    schedule: Any
    loss_cfg: losses.LossConfig
    trains: tuple[str, ...]          # what the surrogate's DreamBooth trains ("unet", maybe "text_encoder")
    prior_weight: float
    optimizer: OptimizerConfig
    cfg: ProtectConfig
    # replicated parameters on this mesh: photos and DreamBooth examples are split over ``batch_axes`` (module
    # docstring); None: one program over the whole batch (GSPMD partitions it where the parameters are sharded)
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ()


def split_axes(setting: Setting, n: int | None = None) -> tuple[str, ...]:
    """The mesh axes a batch of ``n`` examples is split over: the leading ``batch_axes`` whose sizes' product
    divides ``n`` (all of them when ``n`` is None, for a batch padded to fit); () without a mesh."""
    if setting.mesh is None:
        return ()
    axes = shd.dividing_axes(setting.mesh, [a for a in setting.batch_axes if setting.mesh.shape[a] > 1], n)
    return axes if math.prod(setting.mesh.shape[a] for a in axes) > 1 else ()


def _leading(axes: tuple[str, ...], ndim: int) -> P:
    return P(axes if len(axes) > 1 else axes[0], *([None] * (ndim - 1)))


def _replicated(tree: Any, setting: Setting) -> Any:
    """``tree`` constrained to be whole on every device: what goes into and comes out of a per-device region, so
    that GSPMD does not carry the region's split into the ops around it (without them it cut the photos and the
    DreamBooth examples along other axes: 27 all-to-alls in the world model's iteration)."""
    whole = NamedSharding(setting.mesh, P())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, whole), tree)


# --------------------------------------------------------------------------- objective

def gaussian_kernel(size: int, sigma: jax.Array) -> jax.Array:
    """Normalised 1-D Gaussian weights ``(size,)`` (``sigma`` may be traced)."""
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    w = jnp.exp(-0.5 * jnp.square(r / jnp.maximum(sigma, 1e-3)))
    return w / w.sum()


def blur(images: jax.Array, kernel: jax.Array) -> jax.Array:
    """Separable blur of ``(N, H, W, C)`` images by a 1-D kernel, edges extended."""
    pad = (kernel.shape[0] - 1) // 2

    def along(x, axis):
        x = jnp.pad(x, [(pad, pad) if a == axis else (0, 0) for a in range(x.ndim)], mode="edge")
        n = x.shape[axis] - 2 * pad
        return sum(w * jax.lax.slice_in_dim(x, i, i + n, axis=axis) for i, w in enumerate(kernel))

    return along(along(images, 1), 2)


def eot_transform(images: jax.Array, rng: jax.Array, *, kernel: int, max_sigma: float) -> jax.Array:
    """One random draw of MetaCloak's transformations: a Gaussian blur with sigma ~ U(0, max_sigma], then a
    horizontal flip with probability 1/2; differentiable in the images."""
    k_sigma, k_flip = jax.random.split(rng)
    sigma = jax.random.uniform(k_sigma, (), minval=1e-3, maxval=max_sigma)
    out = blur(images, gaussian_kernel(kernel, sigma))
    return jnp.where(jax.random.bernoulli(k_flip), out[:, :, ::-1], out)


def protection_objective(params: Mapping[str, Any], setting: Setting, *, eot: bool | None = None) -> Objective:
    """``(images, batch, rng) -> (value, aux)``, the value a protection maximises: the model's denoising loss on
    the photos (``batch`` holds their conditioning, and ``target_latents`` for the targeted variant), with the
    VAE inside (``losses.through_vae``)."""
    cfg = setting.cfg
    denoise = losses.through_vae(losses.bind(losses.denoising_loss, model=setting.model, schedule=setting.schedule,
                                             cfg=setting.loss_cfg), model=setting.model, cfg=setting.loss_cfg)
    shift = losses.through_vae(losses.bind(losses.target_shift_loss, model=setting.model, schedule=setting.schedule,
                                           cfg=setting.loss_cfg), model=setting.model, cfg=setting.loss_cfg)
    use_eot = cfg.eot if eot is None else eot

    def objective(images, batch, rng):
        k_eot, k = jax.random.split(rng)
        if use_eot:
            images = eot_transform(images, k_eot, kernel=cfg.eot_blur_kernel, max_sigma=cfg.eot_blur_sigma)
        batch = {**batch, "images": images}
        value, aux = denoise(params, {k_: v for k_, v in batch.items() if k_ != "target_latents"}, k)
        aux = {"denoising": value}
        if "target_latents" in batch:  # the same key: the same posterior draw, noise and timesteps
            shifted, _ = shift(params, batch, k)
            value = value - cfg.target_weight * shifted
            aux["target_shift"] = shifted
        return value, aux

    return objective


def encoded_condition(params: Mapping[str, Any], condition: Examples, setting: Setting) -> dict:
    """``condition`` with its ``input_ids`` replaced by the text encoder's output under ``params``: PGD moves only
    the pixels, so the prompt's context is the same at every step and is computed once, not once per step."""
    if "input_ids" not in condition:
        return dict(condition)
    context = setting.model.bind(params, "text_encoder")(condition["input_ids"])
    rest = {k: v for k, v in condition.items() if k != "input_ids"}
    return {**rest, "context": jax.lax.stop_gradient(context)}


def pgd(objective: Objective, images: jax.Array, origin: jax.Array, batch: Examples, rng: jax.Array, *,
        steps: int, setting: Setting) -> tuple[jax.Array, jax.Array]:
    """``steps`` of sign-PGD ascent on ``objective`` from ``images`` (``train.pgd.sign_pgd`` as the optimizer of
    ``train.unroll``; step ``i`` draws from ``fold_in(rng, i)``). Returns the images and the objective before
    each step."""
    cfg = setting.cfg

    def descend(x, b, k):
        value, aux = objective(x, b, k)
        return -value, aux

    def run(images, origin, batch, rng):
        tx = sign_pgd(cfg.alpha, origin, cfg.radius)
        return unroll(descend, tx, steps, order=1, scan_unroll=cfg.unroll)(images, batch, rng)

    axes = split_axes(setting)
    if not axes:
        x, history = run(images, origin, batch, rng)
        return x, -history
    # per device on its share of the photos, padded with zero-weight copies of the last photo (their gradient is
    # zero: they do not move, and they are dropped)
    n, count = images.shape[0], math.prod(setting.mesh.shape[a] for a in axes)
    pad = -n % count

    def padded(a):
        a = jnp.asarray(a)
        return jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]) if pad else a

    weight = jnp.asarray(batch["weight"], jnp.float32) if "weight" in batch else jnp.ones((n,), jnp.float32)
    batch = {**jax.tree.map(padded, dict(batch)), "weight": jnp.concatenate([weight, jnp.zeros((pad,))])}
    images, origin, batch = _replicated((padded(images), padded(origin), batch), setting)

    def local(images, origin, batch, rng):
        with losses.sharded_batch(axes, count):
            return run(images, origin, batch, rng)

    split = lambda a: _leading(axes, jnp.ndim(a))  # noqa: E731
    x, history = jax.shard_map(local, mesh=setting.mesh,
                               in_specs=(split(images), split(origin), jax.tree.map(split, batch), P()),
                               out_specs=(split(images), P()))(images, origin, batch, rng)
    return _replicated(x[:n], setting), -history


# --------------------------------------------------------------------------- the surrogate's DreamBooth steps

def posterior(params: Mapping[str, Any], images: jax.Array, setting: Setting) -> dict[str, jax.Array]:
    """The VAE posterior of images, as ``latent_mean`` / ``latent_logvar`` examples (no gradient to the images:
    the model's fine-tuning steps do not differentiate the pixels)."""
    vae = setting.model.bind(params, "vae")
    mean, logvar = vae.encode(jax.lax.stop_gradient(images).astype(vae.dtype))
    return {"latent_mean": mean.astype(jnp.float32), "latent_logvar": logvar.astype(jnp.float32)}


def dreambooth_steps(train: Any, rest: Any, instance: Examples, prior: Examples | None, offset: jax.Array,
                     rng: jax.Array, *, steps: int, setting: Setting) -> tuple[Any, jax.Array]:
    """``steps`` of the attacker's DreamBooth on ``train`` (a fresh optimizer, as each released call): step ``j``
    trains on instance example ``(offset + j) mod N`` paired with class example ``(offset + j) mod M`` (alone
    without prior preservation). Returns the trained parameters and the loss before each step."""
    if steps == 0:
        return train, jnp.zeros((0,), jnp.float32)
    idx = offset + jnp.arange(steps)

    def pick(examples):
        n = jax.tree.leaves(examples)[0].shape[0]
        return jax.tree.map(lambda a: jnp.asarray(a)[idx % n][:, None], examples)  # (steps, 1, ...): one a step

    data = pick(instance)
    if prior is not None and setting.prior_weight > 0:  # each step's batch: (instance, class), is_prior 0, 1
        data = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 1), data, pick(prior))
        data["is_prior"] = jnp.tile(jnp.asarray([[0, 1]], jnp.int32), (steps, 1))
    db_loss = losses.bind(losses.dreambooth_loss, model=setting.model, schedule=setting.schedule,
                          cfg=setting.loss_cfg, prior_weight=setting.prior_weight)
    axes = split_axes(setting, jax.tree.leaves(data)[0].shape[1])
    parallel = None
    if axes:
        data = _replicated(data, setting)
        parallel = DataParallel(setting.mesh, axes, jax.tree.map(lambda a: _leading(axes, a.ndim - 1), data))

    def loss(p, batch, key):
        return db_loss(F.merge(p, rest), batch, key)

    return unroll(loss, setting.optimizer, steps, order=1, per_step_data=True, scan_unroll=1,
                  data_parallel=parallel)(train, data, rng)


def aspl_iteration(train: Any, rest: Any, images: jax.Array, origin: jax.Array, clean: Examples,
                   prior: Examples | None, condition: Examples, iteration: jax.Array, rng: jax.Array, *,
                   setting: Setting) -> tuple[Any, jax.Array, Any, dict[str, jax.Array]]:
    """One ASPL iteration (Anti-DreamBooth, Alg. 1): a surrogate copy of the model takes ``surrogate_steps`` of
    DreamBooth on the clean photos (``clean``: their posteriors and conditioning), PGD takes ``pgd_steps`` on
    the photos against it, and the model itself takes ``model_steps`` on the perturbed photos. The copy is
    free: ``train`` is an immutable tree. Returns (model, images, surrogate, metrics)."""
    cfg = setting.cfg
    k_sur, k_pgd, k_main = jax.random.split(jax.random.fold_in(rng, iteration), 3)
    surrogate, sur_losses = dreambooth_steps(train, rest, clean, prior, iteration * cfg.surrogate_steps, k_sur,
                                             steps=cfg.surrogate_steps, setting=setting)
    attacked = F.merge(surrogate, rest)
    images, pgd_values = pgd(protection_objective(attacked, setting), images, origin,
                             encoded_condition(attacked, condition, setting), k_pgd, steps=cfg.pgd_steps,
                             setting=setting)
    cond = {k: v for k, v in clean.items() if k not in ("latent_mean", "latent_logvar")}
    perturbed = {**posterior(rest, images, setting), **cond}
    train, main_losses = dreambooth_steps(train, rest, perturbed, prior, iteration * cfg.model_steps, k_main,
                                          steps=cfg.model_steps, setting=setting)
    metrics = {"objective": pgd_values[-1], "surrogate_loss": _last(sur_losses), "model_loss": _last(main_losses)}
    return train, images, surrogate, metrics


def _last(values: jax.Array) -> jax.Array:
    return values[-1] if values.shape[0] else jnp.float32(jnp.nan)


# --------------------------------------------------------------------------- measurement

def denoising_losses(params: Mapping[str, Any], images: jax.Array, condition: Examples, rng: jax.Array, *,
                     setting: Setting) -> jax.Array:
    """Each photo's denoising loss ``(N,)`` under ``params``, averaged over ``cfg.eval_draws`` draws of posterior,
    timestep and noise (the same draws for any images: clean and perturbed photos are compared pairwise)."""
    loss = losses.through_vae(losses.bind(losses.denoising_loss, model=setting.model, schedule=setting.schedule,
                                          cfg=setting.loss_cfg), model=setting.model, cfg=setting.loss_cfg)

    def one(_, i):
        _, aux = loss(params, {**condition, "images": images}, jax.random.fold_in(rng, i))
        return None, aux["per_example"]

    _, per_draw = jax.lax.scan(one, None, jnp.arange(setting.cfg.eval_draws))
    return per_draw.mean(0)
