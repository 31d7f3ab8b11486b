"""Noise schedules and single sampler steps as pure JAX functions.

The discrete-time variance-preserving diffusion of Stable Diffusion: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``
with ``a_t = alphas_cumprod[t]``. Everything here is written to reproduce diffusers' ``DDIMScheduler`` and
``DPMSolverMultistepScheduler`` numerically (the parity tests use them as oracles), but without their mutable
state: a :class:`Schedule` is a pytree of arrays, and a sampler step takes and returns everything it needs,
so the functions compose with ``jit``, ``grad``, ``vmap`` and ``lax.scan``.

Timesteps ``t`` are integer arrays, either a scalar (the same step for the whole batch) or shape ``(B,)``;
per-sample coefficients broadcast over the trailing (NHWC) axes of the tensors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "dpmpp_2m")

# Keys of other diffusers scheduler classes that would change the noise levels we sample at (or how the model
# output must be read). We implement none of them, so a config may carry them only at their inert values; any
# other unknown key (solver_order, skip_prk_steps, sigma_min, ...) is a sampler detail and is ignored.
_INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "thresholding": (False,),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "lambda_min_clipped": (-math.inf,),
    # "learned"/"learned_range" mean the UNet also outputs variance channels; the fixed ones only matter to DDPM.
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
}

# diffusers' zero-terminal-SNR trick for DPM-Solver: alphas_cumprod[-1] == 0 would make sigma/alpha infinite at
# t = T-1, so the solver uses the smallest positive float16 subnormal there instead.
_DPM_ZERO_SNR_ALPHA_CUMPROD = 2.0 ** -24


@dataclass(frozen=True)
class SchedulerConfig:
    """The part of a diffusers ``scheduler_config.json`` that defines the noise schedule and its sampling grid.

    Defaults are Stable Diffusion 1.x/2.x's. Note diffusers' own class defaults differ (e.g. ``DDIMScheduler``
    defaults to ``beta_schedule="linear"``, ``DPMSolverMultistepScheduler`` to ``timestep_spacing="linspace"``),
    which only matters for hand-written configs: saved configs list every key.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    trained_betas: tuple[float, ...] | None = None

    def __post_init__(self):
        # A tuple keeps the frozen config hashable, so it can be a static argument of jit.
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "scheduler_config.json") -> "SchedulerConfig":
        """Read a diffusers scheduler config of any class; ValueError (prefixed by ``source``) on what we cannot honour."""
        def fail(key: str, allowed: str) -> None:
            raise ValueError(f"{source}: {key}={d[key]!r} is not supported; allowed: {allowed}")

        for key, inert in _INERT_VALUES.items():
            if key in d and d[key] not in inert:
                fail(key, " or ".join(repr(v) for v in inert))

        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            if f.name in ("num_train_timesteps", "steps_offset"):
                if isinstance(value, bool) or not isinstance(value, int) or value < (1 if f.name == "num_train_timesteps" else 0):
                    fail(f.name, "a positive integer" if f.name == "num_train_timesteps" else "a non-negative integer")
            elif f.name in ("beta_start", "beta_end", "clip_sample_range"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    fail(f.name, "a number")
                value = float(value)
            elif f.name in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr"):
                if not isinstance(value, bool):
                    fail(f.name, "true or false")
            elif f.name == "trained_betas":
                if value is not None and not (isinstance(value, (list, tuple))
                                              and all(isinstance(b, (int, float)) for b in value)):
                    fail(f.name, "null or a list of numbers")
            kwargs[f.name] = value

        cfg = cls(**kwargs)
        # Check the enumerations on the resolved config so defaults and given values pass the same test.
        checks = [("prediction_type", PREDICTION_TYPES), ("timestep_spacing", TIMESTEP_SPACINGS)]
        if cfg.trained_betas is None:  # with explicit betas diffusers never reads beta_schedule
            checks.append(("beta_schedule", BETA_SCHEDULES))
        for key, allowed in checks:
            if getattr(cfg, key) not in allowed:
                fail(key, ", ".join(allowed))
        if cfg.trained_betas is not None and len(cfg.trained_betas) != cfg.num_train_timesteps:
            raise ValueError(f"{source}: trained_betas has {len(cfg.trained_betas)} entries; allowed: exactly "
                             f"num_train_timesteps={cfg.num_train_timesteps}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A config ``DDIMScheduler.from_config`` (or any other diffusers VP scheduler) loads to the same schedule."""
        d = asdict(self)
        d["trained_betas"] = None if self.trained_betas is None else list(self.trained_betas)
        return {"_class_name": "DDIMScheduler", **d}


class Schedule(NamedTuple):
    """The noise schedule as a pytree (all leaves float32 arrays, so it can be passed through ``jit``).

    ``final_alpha_cumprod`` is the alpha DDIM steps to after the last timestep (1.0 with ``set_alpha_to_one``,
    else ``alphas_cumprod[0]``); ``clip_range`` bounds DDIM's x0 prediction (``inf`` when the config does not clip).
    The number of training timesteps is ``betas.shape[0]``.
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    final_alpha_cumprod: jnp.ndarray
    clip_range: jnp.ndarray


def _betas(cfg: SchedulerConfig) -> np.ndarray:
    """float32 betas as diffusers builds them (computed on the host in numpy: the config is static)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        # diffusers uses torch.linspace in float32; we round the exact float64 values instead, which agrees
        # to within one float32 ulp (torch's vectorised kernel is itself not correctly rounded).
        return np.linspace(cfg.beta_start, cfg.beta_end, n).astype(np.float32)
    if cfg.beta_schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta), squared in float32 as diffusers does.
        root = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n).astype(np.float32)
        return root * root
    if cfg.beta_schedule == "squaredcos_cap_v2":
        # Improved-DDPM cosine schedule: betas from the ratio of consecutive alpha_bar values, capped at 0.999
        # so the last step does not destroy the signal completely. Python doubles, then float32, like diffusers.
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=np.float32)
    raise ValueError(f"beta_schedule={cfg.beta_schedule!r} is not supported; allowed: {', '.join(BETA_SCHEDULES)}")


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64 and rounds each output; doing the same keeps us
    # bit-identical to the oracle instead of drifting by float32 rounding over 1000 factors.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv:2305.08891, Alg. 1): shift and scale sqrt(alpha_bar) so the last step is pure noise
    (SNR exactly zero) while the first step keeps its value; then recover the betas. float32 throughout."""
    sqrt_ab = np.sqrt(_cumprod(np.float32(1.0) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab * sqrt_ab
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_schedule(cfg: SchedulerConfig) -> Schedule:
    betas = _betas(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_cumprod = _cumprod(alphas)
    final = np.float32(1.0) if cfg.set_alpha_to_one else alphas_cumprod[0]
    clip = np.float32(cfg.clip_sample_range) if cfg.clip_sample else np.float32(np.inf)
    return Schedule(jnp.asarray(betas), jnp.asarray(alphas), jnp.asarray(alphas_cumprod),
                    jnp.asarray(final, jnp.float32), jnp.asarray(clip, jnp.float32))


def _per_sample(v: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
    """Reshape a scalar or (B,) coefficient so it broadcasts over ``like`` (B, H, W, C)."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _alpha_cumprod_at(schedule: Schedule, t) -> jnp.ndarray:
    return schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]


def add_noise(schedule: Schedule, x0, noise, t) -> jnp.ndarray:
    """Forward diffusion q(x_t | x_0): ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
    a = _per_sample(_alpha_cumprod_at(schedule, t), x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def velocity(schedule: Schedule, x0, noise, t) -> jnp.ndarray:
    """The v-prediction target (Salimans & Ho 2022): ``sqrt(a_t) noise - sqrt(1 - a_t) x0``."""
    a = _per_sample(_alpha_cumprod_at(schedule, t), x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def training_target(schedule: Schedule, x0, noise, t, prediction_type: str) -> jnp.ndarray:
    """What the denoiser is trained to output at ``x_t = add_noise(x0, noise, t)``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")


def _x0_eps(alpha, sigma, model_output, x_t, prediction_type: str):
    """(x0, eps) from a model output, given x_t = alpha x0 + sigma eps (alpha, sigma already broadcastable)."""
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        # v = alpha eps - sigma x0 and alpha^2 + sigma^2 = 1 invert to these two lines.
        return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")


def predict_x0_eps(schedule: Schedule, model_output, x_t, t, prediction_type: str):
    """The model's implied clean sample and noise at timestep ``t``."""
    a = _per_sample(_alpha_cumprod_at(schedule, t), x_t)
    return _x0_eps(jnp.sqrt(a), jnp.sqrt(1.0 - a), model_output, x_t, prediction_type)


def snr(schedule: Schedule, t) -> jnp.ndarray:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` (e.g. for min-SNR loss weighting); shape of ``t``."""
    a = _alpha_cumprod_at(schedule, t)
    return a / (1.0 - a)


def sampling_timesteps(cfg: SchedulerConfig, num_steps: int, sampler: str = "ddim") -> np.ndarray:
    """The descending int64 timesteps diffusers' ``set_timesteps(num_steps)`` picks for this config.

    ``sampler="ddim"`` reproduces ``DDIMScheduler``, ``"dpmpp_2m"`` ``DPMSolverMultistepScheduler``. They differ
    for "leading" and "linspace": the DPM solver lays out ``num_steps + 1`` points and drops the last (t = 0),
    because its final step goes to sigma = 0 instead of to timestep 0.
    """
    n_train = cfg.num_train_timesteps
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not supported; allowed: {', '.join(SAMPLERS)}")
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps={num_steps} must be between 1 and num_train_timesteps={n_train}")
    spacing = cfg.timestep_spacing
    points = num_steps if sampler == "ddim" else num_steps + 1
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, points).round()[::-1]
    elif spacing == "leading":
        # Evenly spaced from 0 with an integer stride; steps_offset shifts them (SD uses 1 so the grid ends at t=1).
        ts = (np.arange(points) * (n_train // points))[::-1] + cfg.steps_offset
    elif spacing == "trailing":
        # Evenly spaced down from the last training step, so sampling starts from (near) pure noise.
        ts = np.round(np.arange(n_train, 0, -n_train / num_steps)) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; allowed: {', '.join(TIMESTEP_SPACINGS)}")
    if sampler == "dpmpp_2m" and spacing != "trailing":
        ts = ts[:-1]
    return np.ascontiguousarray(ts).astype(np.int64)


def next_timesteps(timesteps) -> np.ndarray:
    """Each step's target timestep: the next entry of ``timesteps``, and -1 (the final, noise-free level) last."""
    ts = np.asarray(timesteps, dtype=np.int64)
    return np.concatenate([ts[1:], [-1]]).astype(np.int64)


def diffusers_ddim_prev_timesteps(cfg: SchedulerConfig, timesteps) -> np.ndarray:
    """The target timesteps diffusers' ``DDIMScheduler.step`` uses: ``t - num_train_timesteps // num_steps``.

    This equals :func:`next_timesteps` for "leading" spacing (and "trailing" when the step count divides
    ``num_train_timesteps``) but not otherwise; pass it as ``prev_timesteps`` to reproduce diffusers exactly.
    Negative values mean the final alpha, as in diffusers.
    """
    ts = np.asarray(timesteps, dtype=np.int64)
    prev = ts - cfg.num_train_timesteps // len(ts)
    return np.where(prev < 0, -1, prev).astype(np.int64)


def ddim_step(schedule: Schedule, model_output, t, t_prev, x_t, *, prediction_type: str = "epsilon",
              eta=0.0, noise=None, clip_sample: bool | None = None, clip_sample_range: float = 1.0,
              set_alpha_to_one: bool | None = None) -> jnp.ndarray:
    """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev``, as ``DDIMScheduler.step``.

    ``t_prev < 0`` steps to the final alpha. ``eta`` scales the fresh noise (0: deterministic DDIM, 1: DDPM-like);
    with ``eta != 0`` the caller must pass the standard-normal ``noise`` (this function draws nothing).
    ``clip_sample`` / ``set_alpha_to_one`` default to what the schedule was built with; pass them to override.
    Computed in float32; returns ``x_t.dtype``.
    """
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step: eta != 0 needs `noise` (a standard normal array shaped like x_t)")
    x = jnp.asarray(x_t, jnp.float32)
    out = jnp.asarray(model_output, jnp.float32)
    t_prev = jnp.asarray(t_prev, jnp.int32)

    a_t = _per_sample(_alpha_cumprod_at(schedule, t), x)
    if set_alpha_to_one is None:
        final = schedule.final_alpha_cumprod
    else:
        final = jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]
    # Clamp the index so the unselected branch of the where stays finite (keeps gradients NaN-free).
    a_prev = _per_sample(jnp.where(t_prev >= 0, _alpha_cumprod_at(schedule, jnp.maximum(t_prev, 0)), final), x)

    x0, eps = _x0_eps(jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t), out, x, prediction_type)
    bound = schedule.clip_range if clip_sample is None else jnp.float32(clip_sample_range if clip_sample else np.inf)
    x0 = jnp.clip(x0, -bound, bound)  # as diffusers, eps is not re-derived from the clipped x0

    # sigma_t(eta) of the DDIM paper: eta * sqrt of the DDPM posterior variance between the two levels.
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std ** 2) * eps
    if noise is not None:
        x_prev = x_prev + std * jnp.asarray(noise, jnp.float32)
    return x_prev.astype(jnp.asarray(x_t).dtype)


class DPMState(NamedTuple):
    """DPM-Solver++(2M)'s memory: the previous step's x0 prediction, its timestep, and whether it exists yet."""

    x0: jnp.ndarray
    t: jnp.ndarray
    valid: jnp.ndarray


def dpmpp_2m_init(x_T) -> DPMState:
    """The state before the first step (no previous prediction: the first step is first order)."""
    return DPMState(jnp.zeros(jnp.shape(x_T), jnp.float32), jnp.asarray(-1, jnp.int32), jnp.asarray(False))


def _dpm_alpha_sigma_lambda(schedule: Schedule, t):
    """alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t) and the half log-SNR lambda_t = log(alpha_t / sigma_t)."""
    a = _alpha_cumprod_at(schedule, t)
    a = jnp.where(a == 0, _DPM_ZERO_SNR_ALPHA_CUMPROD, a)
    alpha, sigma = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def dpmpp_2m_step(schedule: Schedule, model_output, t, t_prev, x_t, state: DPMState, *,
                  prediction_type: str = "epsilon") -> tuple[jnp.ndarray, DPMState]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, arXiv:2211.01095, midpoint form) from ``t`` to ``t_prev``.

    Matches diffusers' default ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``,
    ``solver_order=2``, ``lower_order_final=True``, ``final_sigmas_type="zero"``): the first step (no
    previous x0 yet) and the final step (``t_prev < 0``, to sigma = 0, which returns the x0 prediction) are
    first order, every other step uses the previous x0 (at ``state.t``) for a second-order correction.
    Returns ``(x_prev, new_state)``; computed in float32, ``x_prev`` has ``x_t``'s dtype.
    """
    x = jnp.asarray(x_t, jnp.float32)
    out = jnp.asarray(model_output, jnp.float32)
    t, t_prev = jnp.asarray(t, jnp.int32), jnp.asarray(t_prev, jnp.int32)
    final = t_prev < 0

    alpha_s, sigma_s, lam_s = _dpm_alpha_sigma_lambda(schedule, t)
    x0, _ = _x0_eps(_per_sample(alpha_s, x), _per_sample(sigma_s, x), out, x, prediction_type)

    # Evaluate the target and the previous level at clamped indices; the wheres below discard those values
    # where they do not apply, and clamping keeps every branch finite so gradients stay finite too.
    alpha_p, sigma_p, lam_p = _dpm_alpha_sigma_lambda(schedule, jnp.maximum(t_prev, 0))
    _, _, lam_s1 = _dpm_alpha_sigma_lambda(schedule, jnp.maximum(state.t, 0))
    h = lam_p - lam_s
    second = state.valid & ~final
    h0 = jnp.where(second, lam_s - lam_s1, 1.0)

    # x_prev = a x + b x0 + c (x0 - x0_prev): the exponential-integrator update with the data prediction
    # taken constant (first order) or linear in lambda (the 2M correction, D1 = (x0 - x0_prev) h / h0).
    b = -alpha_p * jnp.expm1(-h)
    a = jnp.where(final, 0.0, sigma_p / sigma_s)
    b = jnp.where(final, 1.0, b)
    c = jnp.where(second, 0.5 * b * h / h0, 0.0)
    x_prev = _per_sample(a, x) * x + _per_sample(b, x) * x0 + _per_sample(c, x) * (x0 - state.x0)
    new_state = DPMState(x0, t, jnp.asarray(True))
    return x_prev.astype(jnp.asarray(x_t).dtype), new_state
