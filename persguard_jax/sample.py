"""Model-agnostic sampling loops and classifier-free guidance.

Only callables cross this boundary: ``denoise(x_t, t) -> model_output`` with ``x_t`` (B, h, w, c) and ``t``
(B,) int32. The UNet, its parameters and the text conditioning are whatever the callable closes over.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .schedulers import SAMPLERS, Schedule, ddim_step, dpmpp_2m_init, dpmpp_2m_step, next_timesteps

Denoise = Callable[..., jax.Array]  # denoise(x_t, t, *args) -> model output


def sample_latents(denoise: Denoise, x_T, schedule: Schedule, timesteps, *, sampler: str = "ddim",
                   prediction_type: str = "epsilon", eta: float = 0.0, rng: jax.Array | None = None,
                   progress: bool = False, prev_timesteps=None, args: tuple = ()) -> jax.Array:
    """Run ``sampler`` from ``x_T`` (already scaled noise; init sigma is 1 for these schedules) down the given
    descending ``timesteps`` and return the x_0 estimate (float32).

    Each step goes from ``timesteps[i]`` to ``prev_timesteps[i]``, by default the next timestep and -1 (the
    noise-free end) last; ``schedulers.diffusers_ddim_prev_timesteps`` reproduces diffusers' DDIM targets
    where they differ. With ``eta > 0`` (DDIM only) step ``i`` adds
    ``jax.random.normal(jax.random.fold_in(rng, i), x_T.shape, float32)`` scaled by DDIM's sigma.

    ``progress=False`` runs every step in one ``lax.scan`` inside one ``jit``. ``progress=True`` runs a Python
    loop with a tqdm bar over one jitted step function, traced once and reused every step (the step index and
    timesteps are array arguments, so nothing about them triggers a recompilation).

    ``denoise`` is called as ``denoise(x_t, t, *args)``. Pass model parameters and text contexts in ``args``:
    they are then arguments of the compiled loop, not constants baked into it (constants make SD-size
    compiles slow and recompile for every new prompt).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not supported; allowed: {', '.join(SAMPLERS)}")
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)
    if stochastic and sampler != "ddim":
        raise ValueError(f"eta={eta} applies to the ddim sampler only; dpmpp_2m is deterministic")
    if stochastic and rng is None:
        raise ValueError("eta != 0 needs `rng` (a jax.random key) for the per-step noise")

    ts = np.asarray(timesteps, dtype=np.int64)
    prev = next_timesteps(ts) if prev_timesteps is None else np.asarray(prev_timesteps, dtype=np.int64)
    if ts.ndim != 1 or ts.shape != prev.shape or len(ts) == 0:
        raise ValueError(f"timesteps {ts.shape} and prev_timesteps {prev.shape} must be equal-length, non-empty 1-D")
    xs = (ts.astype(np.int32), prev.astype(np.int32), np.arange(len(ts), dtype=np.int32))

    x_T = jnp.asarray(x_T, jnp.float32)
    key = rng if rng is not None else jax.random.key(0)  # unused unless stochastic; keeps the signature fixed
    solver_state: Any = dpmpp_2m_init(x_T) if sampler == "dpmpp_2m" else None
    config = (denoise, sampler, prediction_type, eta, stochastic, progress)
    try:  # one compiled sampler per (denoise, settings): later calls with new prompts or weights reuse it
        runner = _runner(*config)
    except TypeError:  # an unhashable eta (an array): build it uncached
        runner = _runner.__wrapped__(*config)
    if not progress:
        return runner(x_T, solver_state, schedule, key, xs, tuple(args))

    from tqdm.auto import tqdm

    carry = (x_T, solver_state)
    with tqdm(range(len(ts)), desc=f"{sampler} sampling", leave=False) as steps:  # closed on error too
        for i in steps:
            carry, _ = runner(carry, tuple(a[i] for a in xs), schedule, key, tuple(args))  # int32 scalars: same trace
    return carry[0]


@functools.lru_cache(maxsize=16)  # small: a user's denoise closure may hold arrays
def _runner(denoise: Denoise, sampler: str, prediction_type: str, eta, stochastic: bool, progress: bool):
    """The jitted sampler loop (``progress=False``: all steps in one scan) or one jitted step."""
    def step(carry, step_in, schedule, key, args):
        x, state = carry
        t, t_prev, i = step_in
        out = denoise(x, jnp.full((x.shape[0],), t, jnp.int32), *args)
        if sampler == "ddim":
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32) if stochastic else None
            x = ddim_step(schedule, out, t, t_prev, x, prediction_type=prediction_type, eta=eta, noise=noise)
        else:
            x, state = dpmpp_2m_step(schedule, out, t, t_prev, x, state, prediction_type=prediction_type)
        return (x, state), None

    if progress:
        return jax.jit(step)

    @jax.jit
    def run(x, state, schedule, key, xs, args):
        (x, _), _ = jax.lax.scan(lambda c, s: step(c, s, schedule, key, args), (x, state), xs)
        return x
    return run


def guided(unet_apply: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], cond_context, uncond_context,
           guidance_scale) -> Denoise:
    """Classifier-free guidance (Ho & Salimans 2022) in diffusers' form, ``out_u + g (out_c - out_u)``.

    One batched UNet call per step: the unconditional and conditional halves are stacked along the batch
    (uncond first, as diffusers does). Contexts with batch 1 are broadcast to the latents' batch. With a
    Python ``guidance_scale == 1`` the formula reduces to the conditional output, so the uncond half is skipped.
    """
    skip_uncond = isinstance(guidance_scale, (int, float)) and guidance_scale == 1

    def with_batch(ctx, batch):
        ctx = jnp.asarray(ctx)
        return jnp.broadcast_to(ctx, (batch,) + ctx.shape[1:])

    def denoise(x, t):
        batch = x.shape[0]
        cond = with_batch(cond_context, batch)
        if skip_uncond:
            return unet_apply(x, t, cond)
        uncond = with_batch(uncond_context, batch)
        out = unet_apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([uncond, cond]))
        out_u, out_c = out[:batch], out[batch:]
        return out_u + guidance_scale * (out_c - out_u)

    return denoise


# --------------------------------------------------------------------------- text -> image with a pipeline

def initial_latents(seed: int, num_images: int, shape: tuple[int, int, int], *, offset: int = 0) -> jax.Array:
    """Image ``offset + i`` always starts from ``normal(fold_in(key(seed), offset + i))``, whatever the batch
    size: a grid made in chunks equals one made at once."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(offset, offset + num_images))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def latent_shape(pipe, height: int | None, width: int | None) -> tuple[int, int, int]:
    from persguard_jax.models.unet import native_latent_size
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if not (height and width):
        native_h, native_w = native_latent_size(pipe.unet.config)
        height, width = height or native_h * factor, width or native_w * factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor} (the VAE's downsampling), "
                         f"got {height}x{width}")
    return height // factor, width // factor, pipe.unet.config.in_channels


def _network(pipe, name: str, params: Mapping[str, Any] | None):
    """(graph definition, parameters) of one of the pipeline's networks: ``params[name]`` when given (a pure
    dict, e.g. a fine-tuned tree), else the module's own weights as a pure dict. Jitted callers take the graph definition as a
    static argument, so new parameters of the same graph reuse the compiled program."""
    graphdef, state = nnx.split(getattr(pipe, name))
    if params is not None and name in params:
        return graphdef, params[name]
    return graphdef, state.to_pure_dict()  # the same pytree type as a given tree: one compiled program for both


def encode_text(pipe, texts, *, params: Mapping[str, Any] | None = None) -> jax.Array:
    """CLIP last hidden states ``(B, 77, D)`` for a list of prompts (``params["text_encoder"]`` instead of the
    pipeline's own weights when given)."""
    graphdef, state = _network(pipe, "text_encoder", params)
    return _apply(graphdef, state, jnp.asarray(pipe.tokenizer(texts)))


@functools.lru_cache(maxsize=32)
def _pipeline_denoise(unet_def, skip_uncond: bool, image_conditioned: bool = False) -> Denoise:
    """The guided UNet call of a pipeline, one object per UNet graph (so ``_runner`` caches its compilation);
    the guidance scale is an argument, so a new scale does not recompile either. ``image_conditioned``: the SD x4
    upscaler's call, which also takes ``(low_res, noise_level)``: the noised low-resolution image beside the
    latent (on channels) and its noise level as the UNet's class label."""
    def denoise(x, t, unet_state, cond, uncond, guidance_scale, *image):
        unet = nnx.merge(unet_def, unet_state)

        def apply(x, t, ctx):
            kw = {}
            if image_conditioned:  # under guidance x holds [uncond; cond]: the image repeats to match
                low_res, noise_level = image
                x = jnp.concatenate([x, jnp.concatenate([low_res] * (x.shape[0] // low_res.shape[0]))], axis=-1)
                kw["class_labels"] = jnp.full((x.shape[0],), noise_level, jnp.int32)
            return unet(x.astype(unet.dtype), t, ctx, **kw).astype(jnp.float32)
        return guided(apply, cond, uncond, 1 if skip_uncond else guidance_scale)(x, t)
    return denoise


def pipeline_denoise(pipe, cond_context, uncond_context, guidance_scale, *,
                     params: Mapping[str, Any] | None = None, image: tuple | None = None) -> tuple[Denoise, tuple]:
    """The pipeline's UNet under classifier-free guidance as ``sample_latents``' ``(denoise, args)``.

    The weights, contexts and scale travel in ``args`` and ``denoise`` is one object per UNet graph, so every
    sampling loop built from it (text -> image, SDEdit from a noised image latent, the x4 upscaler with ``image``
    = ``(noised low-resolution image, noise level)``) compiles once per graph and shape, whatever the prompts,
    scale or weights (``params["unet"]`` instead of the pipeline's own when given)."""
    unet_def, unet_state = _network(pipe, "unet", params)
    skip_uncond = isinstance(guidance_scale, (int, float)) and guidance_scale == 1
    args = (unet_state, cond_context, uncond_context, jnp.float32(guidance_scale))
    if image is None:
        return _pipeline_denoise(unet_def, skip_uncond), args
    low_res, noise_level = image
    return _pipeline_denoise(unet_def, skip_uncond, True), args + (jnp.asarray(low_res), jnp.int32(noise_level))


@jax.jit(static_argnums=0)
def _apply(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


@jax.jit(static_argnums=0)
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)


def text_to_image(pipe, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None, *,
                  num_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, sampler: str = "ddim",
                  eta: float = 0.0, height: int | None = None, width: int | None = None,
                  latents: jax.Array | None = None, seed_offset: int = 0, progress: bool = True,
                  output_type: str = "images", params: Mapping[str, Any] | None = None) -> np.ndarray:
    """Images ``(N, H, W, 3)`` in [0, 1] for ``prompts``, as diffusers' ``StableDiffusionPipeline`` makes them.

    ``params`` (a pure-dict tree with any of ``unet`` / ``vae`` / ``text_encoder``, e.g. what a fine-tuning run
    returns) replaces the pipeline's own weights for this call; nothing is written into ``pipe``. The programs
    are compiled once per graph and shape: sampling another parameter tree of the same model compiles nothing.

    Classifier-free guidance runs against ``negative_prompts`` (the empty prompt when None). The sampler
    timesteps and DDIM targets follow diffusers for the pipeline's ``scheduler_config``; ``latents`` (NHWC,
    unit variance) replaces the seeded initial noise. ``output_type="latents"`` returns the final latents
    (NHWC, in the UNet's scaled latent space) instead of decoded images.
    """
    if output_type not in ("images", "latents"):
        raise ValueError(f"output_type must be 'images' or 'latents', got {output_type!r}")
    from persguard_jax.schedulers import (SchedulerConfig, diffusers_ddim_prev_timesteps, make_schedule,
                                          sampling_timesteps)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts or ""] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
    schedule = make_schedule(cfg)
    ts = sampling_timesteps(cfg, num_steps, sampler)
    prev = diffusers_ddim_prev_timesteps(cfg, ts) if sampler == "ddim" else None
    if latents is None:
        latents = initial_latents(seed, len(prompts), latent_shape(pipe, height, width), offset=seed_offset)

    cond, uncond = encode_text(pipe, prompts, params=params), encode_text(pipe, negative_prompts, params=params)
    denoise, args = pipeline_denoise(pipe, cond, uncond, guidance_scale, params=params)
    z = sample_latents(denoise, latents, schedule, ts, sampler=sampler, prediction_type=cfg.prediction_type,
                       eta=eta, rng=jax.random.key(seed) if eta else None, progress=progress,
                       prev_timesteps=prev, args=args)
    if output_type == "latents":
        return np.asarray(z, np.float32)
    vae_cfg = pipe.vae.config
    return decode_latents(pipe, z / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0), params=params)


def decode_latents(pipe, latents: jax.Array | np.ndarray, *, params: Mapping[str, Any] | None = None,
                   batch: int | None = None) -> np.ndarray:
    """Images ``(N, H, W, 3)`` in [0, 1] from the VAE's own (unscaled) latents ``(N, h, w, C)``, e.g. the posterior
    means of ``dreambooth.encode_latents``; ``batch`` at a time (None: all at once)."""
    vae_def, vae_state = _network(pipe, "vae", params)
    latents = jnp.asarray(latents)
    step = batch or max(1, len(latents))
    images = [_decode(vae_def, vae_state, latents[i:i + step].astype(pipe.vae.dtype))
              for i in range(0, len(latents), step)]
    return np.asarray(jnp.clip(jnp.concatenate(images).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0))
