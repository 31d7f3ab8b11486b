"""Purifiers: image -> image transforms that try to wash a protective perturbation out of photos before an attacker
fine-tunes on them (DiffShortcut's first stage, and the baselines it compares with; ../shared/papers/diffshortcut.md).

A purifier takes and returns float32 images ``(N, H, W, 3)`` in [0, 1] of one size, and keeps that size. Each is a
small frozen dataclass holding its parameters; the same class is the config section of ``persguard purify``
(``SECTION``, ``BOUNDS``: a bad value fails when the config is parsed) and is called as ``purifier(images, pipe=...)``
(``pipe``, a ``models.Pipeline``, only for the ones that ``needs_model``). ``PURIFIERS`` is the table by name:

- ``jpeg``: PIL's JPEG round trip in memory at ``quality`` (75, DiffShortcut's setting);
- ``blur``: PIL's ``GaussianBlur`` reproduced exactly in JAX (``gaussian_blur``), ``radius`` scaled with the image;
- ``tv``: total-variation denoising (Chambolle's dual projection, ``tv_denoise``);
- ``sdedit``: latent DiffPure / SDEdit with the model at hand (noise the VAE latent to ``t_star``, denoise with
  DDIM and classifier-free guidance); ``sdedit_empty``: the same with the empty prompt;
- ``sr``: downscale by ``factor`` and upscale back (PIL bicubic, or an SD x4-upscaler pipeline, ``sr.model``).

``parse_chain("jpeg,sdedit", sections)`` gives the purifiers in order, ``purify`` runs a chain and times each
purifier per image, ``purification_scores`` measures what a chain changed (l_inf, l_2, PSNR and the project's
LPIPS-style CLIP feature distance).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from persguard_jax.config import Section
from persguard_jax.io import uint8_to_unit, unit_to_uint8

# DiffShortcut's latent DiffPure prompt (its code); "{class}" is replaced by the ``class_name`` key
DIFFSHORTCUT_PROMPT = "a photo of a {class}, clear, high resolution, high quality, noise-free"
# DiffShortcut's code blurs with PIL radius 5 on its 512 px photos; ``Blur`` keeps that ratio at other sizes
REFERENCE_BLUR_RADIUS, REFERENCE_SIDE = 5.0, 512


class Purifier(Section):
    """What every purifier is: a frozen dataclass of its parameters (``Section``: its config section) with a
    ``NAME`` in ``PURIFIERS``, called as ``purifier(images, pipe=None) -> images``. ``check`` refuses, before any
    work, inputs it cannot take (image size, model); ``needs_model``: it runs a diffusion pipeline (``pipe``)."""
    NAME: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False

    def check(self, height: int, width: int, pipe: Any = None) -> None:
        """Raise ValueError naming the purifier if it cannot purify ``height`` x ``width`` images (with ``pipe``)."""

    def __call__(self, images: Any, *, pipe: Any = None) -> np.ndarray:
        raise NotImplementedError


def _as_images(images: Any) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"purifiers take RGB images (N, H, W, 3) in [0, 1], got shape {x.shape}")
    return x


def _pil_each(images: np.ndarray, fn) -> np.ndarray:
    """``fn`` (PIL RGB image -> PIL RGB image) on each image, through uint8 as PIL works."""
    return uint8_to_unit(np.stack([np.asarray(fn(Image.fromarray(u))) for u in unit_to_uint8(images)]))


# --------------------------------------------------------------------------- JPEG

def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """Encode ``image`` as JPEG at ``quality`` in memory (PIL's defaults otherwise: 4:2:0 chroma subsampling) and
    decode it again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


@dataclass(frozen=True)
class JPEG(Purifier):
    """JPEG compression at ``quality``: block quantisation drops the high frequencies a small perturbation lives
    in. PIL is the reference codec, so this is exactly PIL's round trip of the uint8 image."""
    NAME: ClassVar[str] = "jpeg"
    SECTION: ClassVar[str] = "jpeg"
    BOUNDS: ClassVar[Mapping[str, str]] = {"quality": "[1, 95]"}  # PIL: above 95 only grows the file
    quality: int = 75

    def __call__(self, images: Any, *, pipe: Any = None) -> np.ndarray:
        return _pil_each(_as_images(images), lambda im: jpeg_round_trip(im, self.quality))


# --------------------------------------------------------------------------- Gaussian blur, as PIL computes it
# PIL's GaussianBlur(radius) (its "radius" is the Gaussian's standard deviation) runs 3 passes of an "extended box"
# filter along x, then 3 along y, edges extended: a box of 2l + 1 pixels plus the next pixel on each side at a
# fractional weight a, with l + a chosen so the 3 passes have the Gaussian's variance (Gwosdek et al., "Theoretical
# foundations of Gaussian convolution by extended box filtering", SSVM 2011, eqs. 7, 11, 14). It works on uint8
# with 24-bit fixed-point weights and rounds after every pass; reproducing that arithmetic (float32 radius,
# truncated weights, round-half-up) makes the result equal PIL's, where float passes differ by up to 3 grey levels
# at small radii (the per-pass rounding then dominates).

def pil_box_radius(sigma: float, passes: int = 3) -> np.float32:
    """The fractional box radius ``l + a`` whose ``passes`` passes have variance ``sigma**2``, in PIL's float32."""
    f = np.float32
    var = f(sigma) * f(sigma) / f(passes)
    length = f(np.sqrt(12.0 * np.float64(var) + 1.0))  # box length with the wanted variance (eq. 7)
    l = f(np.floor((np.float64(length) - 1.0) / 2.0))  # its integer radius (eq. 11)
    a = (f(2) * l + f(1)) * (l * (l + f(1)) - f(3) * var) / (f(6) * (var - (l + f(1)) * (l + f(1))))  # eq. 14
    return l + a


def _fixed_point_weights(radius: np.float32) -> tuple[int, int, int]:
    """(l, weight of the 2l + 1 inner pixels, weight of the two outer ones), in units of 2**-24 as PIL has them."""
    l = int(radius)
    inner = int(np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1)))  # truncated, as PIL's cast
    outer = ((1 << 24) - (2 * l + 1) * inner) // 2
    return l, inner, outer


def _box_sums(x: jax.Array, l: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """For each pixel along ``axis``: the sum of the 2l + 1 pixels centred on it and the sum of the two next
    ones, the image's edge pixels repeated beyond it (prefix sums: the cost does not grow with the radius)."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (l + 1, l + 1)
    padded = jnp.pad(x, pad, mode="edge")
    prefix = jnp.cumsum(padded, axis=axis, dtype=x.dtype)
    inner = (jax.lax.slice_in_dim(prefix, 2 * l + 1, 2 * l + 1 + n, axis=axis)
             - jax.lax.slice_in_dim(prefix, 0, n, axis=axis))
    outer = (jax.lax.slice_in_dim(padded, 0, n, axis=axis)
             + jax.lax.slice_in_dim(padded, 2 * l + 2, 2 * l + 2 + n, axis=axis))
    return inner, outer


@functools.partial(jax.jit, static_argnames=("l", "passes"))
def _pil_blur(pixels: jax.Array, inner_w: jax.Array, outer_w: jax.Array, *, l: int, passes: int) -> jax.Array:
    """PIL's passes on uint8 values held in uint32: ``(inner * w + outer * w' + 2**23) >> 24`` (round half up),
    which stays below 2**32 because the weights of one pass sum to at most 2**24."""
    for axis in (2, 1):  # all passes along x (width), then along y, as PIL does
        for _ in range(passes):
            inner, outer = _box_sums(pixels, l, axis)
            pixels = (inner * inner_w + outer * outer_w + jnp.uint32(1 << 23)) >> 24
    return pixels


@functools.partial(jax.jit, static_argnames=("l", "passes"))
def _float_blur(x: jax.Array, a: jax.Array, *, l: int, passes: int) -> jax.Array:
    for axis in (2, 1):
        for _ in range(passes):
            inner, outer = _box_sums(x, l, axis)
            x = (inner + a * outer) / (2 * l + 1 + 2 * a)
    return x


def gaussian_blur(images: Any, radius: float, *, passes: int = 3, exact: bool = True) -> jax.Array:
    """PIL's ``ImageFilter.GaussianBlur(radius)`` of images ``(N, H, W, C)`` in [0, 1] (``radius``: the Gaussian's
    standard deviation in pixels, as PIL names it).

    ``exact=True`` quantises to uint8 and repeats PIL's integer arithmetic: the result equals PIL's. ``exact=False``
    runs the same filter in float32 without rounding: differentiable (an adaptive attack can take gradients
    through it), within about 3 grey levels of PIL."""
    if not radius > 0:
        raise ValueError(f"blur radius must be > 0, got {radius}")
    box = pil_box_radius(radius, passes)
    if exact:
        l, inner_w, outer_w = _fixed_point_weights(box)
        pixels = jnp.asarray(unit_to_uint8(np.asarray(images)), jnp.uint32)
        out = _pil_blur(pixels, jnp.uint32(inner_w), jnp.uint32(outer_w), l=l, passes=passes)
        return out.astype(jnp.float32) / 255.0
    l = int(box)
    return _float_blur(jnp.asarray(images, jnp.float32), jnp.float32(box - l), l=l, passes=passes)


@dataclass(frozen=True)
class Blur(Purifier):
    """Gaussian blur, PIL's (``gaussian_blur``). ``radius`` (PIL's: the standard deviation, in pixels); None scales
    DiffShortcut's radius 5 at 512 px to the images (5 * short side / 512: 0.31 px on the world's 32 px images), so
    the same config means the same blur relative to the photo at any resolution."""
    NAME: ClassVar[str] = "blur"
    SECTION: ClassVar[str] = "blur"
    BOUNDS: ClassVar[Mapping[str, str]] = {"radius": "(0, inf)"}
    radius: float | None = None

    def radius_for(self, height: int, width: int) -> float:
        if self.radius is not None:
            return self.radius
        return REFERENCE_BLUR_RADIUS * min(height, width) / REFERENCE_SIDE

    def __call__(self, images: Any, *, pipe: Any = None) -> np.ndarray:
        x = _as_images(images)
        return np.asarray(gaussian_blur(x, self.radius_for(*x.shape[1:3])), np.float32)


# --------------------------------------------------------------------------- total variation

def _gradient(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Forward differences along y and x, zero past the last row / column (the image does not continue)."""
    dy = jnp.concatenate([x[:, 1:] - x[:, :-1], jnp.zeros_like(x[:, :1])], axis=1)
    dx = jnp.concatenate([x[:, :, 1:] - x[:, :, :-1], jnp.zeros_like(x[:, :, :1])], axis=2)
    return dy, dx


def _divergence(py: jax.Array, px: jax.Array) -> jax.Array:
    """Minus the adjoint of ``_gradient``: backward differences, for fields whose last row (``py``) / column
    (``px``) is zero, as Chambolle's iterates are (their gradient is zero there)."""
    return (py - jnp.pad(py[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
            + px - jnp.pad(px[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0))))


def total_variation(x: jax.Array) -> jax.Array:
    """``(N,)`` isotropic total variation, each channel on its own: the sum of the gradient magnitudes."""
    dy, dx = _gradient(jnp.asarray(x, jnp.float32))
    return jnp.sum(jnp.sqrt(dy * dy + dx * dx), axis=(1, 2, 3))


def tv_objective(x: jax.Array, y: jax.Array, weight: float) -> jax.Array:
    """``(N,)`` the ROF energy ``tv_denoise`` minimises: ``0.5 * ||x - y||^2 + weight * TV(x)``."""
    fit = 0.5 * jnp.sum(jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)), axis=(1, 2, 3))
    return fit + weight * total_variation(x)


@functools.partial(jax.jit, static_argnames=("steps",))
def tv_denoise(images: jax.Array, weight: float, *, steps: int, step_size: float = 0.25) -> jax.Array:
    """Rudin-Osher-Fatemi denoising, ``argmin_x 0.5 ||x - y||^2 + weight TV(x)`` per image, each channel on its
    own, by Chambolle's projection on the dual ("An algorithm for total variation minimization and applications",
    2004): ``p <- (p + tau g) / (1 + tau |g|)`` with ``g = grad(div p - y / weight)``, then ``x = y - weight div p``.
    The dual iteration needs no smoothing of |grad x| (TV's kink at 0 is what keeps edges). Chambolle proves
    convergence for ``step_size`` (tau) <= 1/8 and observes it up to 1/4, the value usually run."""
    y = jnp.asarray(images, jnp.float32)

    def step(p, _):
        py, px = p
        gy, gx = _gradient(_divergence(py, px) - y / weight)
        scale = 1.0 + step_size * jnp.sqrt(gy * gy + gx * gx)
        return ((py + step_size * gy) / scale, (px + step_size * gx) / scale), None

    zeros = jnp.zeros_like(y)
    (py, px), _ = jax.lax.scan(step, (zeros, zeros), None, length=steps)
    return jnp.clip(y - weight * _divergence(py, px), 0.0, 1.0)


@dataclass(frozen=True)
class TV(Purifier):
    """Total-variation minimisation (``tv_denoise``): flattens the small oscillations a perturbation adds while
    keeping edges. ``weight`` trades faithfulness (low) for smoothing (high), in [0, 1] pixel units."""
    NAME: ClassVar[str] = "tv"
    SECTION: ClassVar[str] = "tv"
    BOUNDS: ClassVar[Mapping[str, str]] = {"weight": "(0, inf)", "steps": "[1, inf)", "step_size": "(0, 0.25]"}
    weight: float = 0.05
    steps: int = 50
    step_size: float = 0.25

    def __call__(self, images: Any, *, pipe: Any = None) -> np.ndarray:
        out = tv_denoise(_as_images(images), jnp.float32(self.weight), steps=self.steps,
                         step_size=jnp.float32(self.step_size))
        return np.asarray(out, np.float32)


# --------------------------------------------------------------------------- SDEdit (latent DiffPure)

def model_multiple(pipe) -> int:
    """The image sides a pipeline can encode and denoise are multiples of this: the VAE's downsampling times the
    UNet's."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def check_model_size(name: str, pipe, height: int, width: int) -> None:
    """Refuse images the model cannot take, naming the purifier (before any work)."""
    multiple = model_multiple(pipe)
    if height % multiple or width % multiple:
        raise ValueError(f"{name}: the images are {width}x{height}, and this model takes sides that are multiples "
                         f"of {multiple} (its VAE and UNet downsampling); resize or crop them first")


@dataclass(frozen=True)
class SDEdit(Purifier):
    """Latent DiffPure / SDEdit (Meng et al. 2022) with the model at hand, as DiffShortcut runs it as a baseline:
    VAE-encode (the posterior mean), noise the latent to timestep ``t_star`` (of 1000) with one fixed draw from
    ``seed`` (the same for every image, so an image's result does not depend on the others in its batch), denoise
    with DDIM under classifier-free guidance on ``prompt`` against ``negative_prompt``, decode. The noise drowns
    the perturbation's latent shift; the denoiser fills it back in from what the model knows.

    ``steps`` lays out a DDIM schedule over all timesteps as ``persguard sample --steps`` would; the ones at or
    below ``t_star`` run, from the largest of them (also where the latent is noised to). ``prompt`` may hold
    "{class}", replaced by ``class_name``."""
    NAME: ClassVar[str] = "sdedit"
    SECTION: ClassVar[str] = "sdedit"
    BOUNDS: ClassVar[Mapping[str, str]] = {"t_star": "[1, inf)", "guidance": "[0, inf)", "steps": "[1, inf)",
                                           "seed": "[0, inf)"}
    needs_model: ClassVar[bool] = True
    t_star: int = 300
    prompt: str = DIFFSHORTCUT_PROMPT
    class_name: str = "person"
    negative_prompt: str = ""
    guidance: float = 7.5
    steps: int = 50
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if "{class}" in self.prompt and not str(self.class_name).strip():
            raise ValueError(f"sdedit.class_name: must not be empty (sdedit.prompt {self.prompt!r} uses {{class}})")

    @property
    def text(self) -> str:
        return self.prompt.replace("{class}", self.class_name)

    def timesteps(self, scheduler_config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The DDIM timesteps this runs (descending, the first is where the latent is noised to) and their
        targets, as diffusers' DDIM steps them."""
        from persguard_jax.schedulers import SchedulerConfig, diffusers_ddim_prev_timesteps, sampling_timesteps
        cfg = SchedulerConfig.from_dict(scheduler_config)
        for key, value, top in (("t_star", self.t_star, cfg.num_train_timesteps - 1),
                                ("steps", self.steps, cfg.num_train_timesteps)):
            if value > top:
                raise ValueError(f"sdedit.{key}={value}: at most {top} for this model "
                                 f"({cfg.num_train_timesteps} training timesteps)")
        ts = sampling_timesteps(cfg, self.steps, "ddim")
        prev = diffusers_ddim_prev_timesteps(cfg, ts)
        keep = ts <= self.t_star
        if not keep.any():
            raise ValueError(f"sdedit.t_star={self.t_star} is below every timestep of the {self.steps}-step DDIM "
                             f"schedule (the smallest is {ts.min()}); raise sdedit.t_star or sdedit.steps")
        return ts[keep], prev[keep]

    def check(self, height: int, width: int, pipe: Any = None) -> None:
        if pipe is None:
            raise ValueError(f"{self.NAME}: needs a diffusion pipeline (pipe=models.load_pipeline(folder))")
        check_model_size(self.NAME, pipe, height, width)
        self.timesteps(pipe.scheduler_config)

    def __call__(self, images: Any, *, pipe: Any = None) -> np.ndarray:
        from persguard_jax.dreambooth.data import encode_latents
        from persguard_jax.sample import decode_latents, encode_text, pipeline_denoise, sample_latents
        from persguard_jax.schedulers import SchedulerConfig, add_noise, make_schedule
        x = _as_images(images)
        self.check(*x.shape[1:3], pipe)
        ts, prev = self.timesteps(pipe.scheduler_config)
        cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
        schedule = make_schedule(cfg)
        vae = pipe.vae.config
        shift = vae.shift_factor or 0.0
        mean, _ = encode_latents(pipe.vae, x * 2.0 - 1.0, batch=len(x))
        z0 = (jnp.asarray(mean) - shift) * vae.scaling_factor
        noise = jax.random.normal(jax.random.key(self.seed), z0.shape[1:], jnp.float32)
        z_t = add_noise(schedule, z0, jnp.broadcast_to(noise, z0.shape), jnp.full((len(x),), ts[0], jnp.int32))
        cond, uncond = encode_text(pipe, [self.text]), encode_text(pipe, [self.negative_prompt])
        denoise, args = pipeline_denoise(pipe, cond, uncond, self.guidance)
        z = sample_latents(denoise, z_t, schedule, ts, prev_timesteps=prev, prediction_type=cfg.prediction_type,
                           args=args)
        return decode_latents(pipe, z / vae.scaling_factor + shift)


@dataclass(frozen=True)
class SDEditEmpty(SDEdit):
    """``sdedit`` with the empty prompt (DiffShortcut's second latent DiffPure variant): reads the ``sdedit``
    section, then prompts with "" (guidance then changes nothing, so it runs unguided, one UNet call a step)."""
    NAME: ClassVar[str] = "sdedit_empty"

    def __post_init__(self):
        super().__post_init__()
        for key, value in (("prompt", ""), ("negative_prompt", ""), ("guidance", 1.0)):
            object.__setattr__(self, key, value)


# --------------------------------------------------------------------------- super-resolution

RESAMPLING = {"bicubic": Image.BICUBIC, "area": Image.BOX}


@dataclass(frozen=True)
class SuperResolution(Purifier):
    """Super-resolution purification: downscale by ``factor`` (``resample``: PIL's bicubic, antialiased, or
    ``area`` averaging), then upscale back to the input size. Downscaling averages a pixel-level perturbation
    away; the upscaler redraws the detail.

    ``model`` null: the upscale is PIL bicubic. ``model``: a pipeline folder in the SD x4 upscaler's layout
    (``persguard_jax.upscale``), as DiffShortcut runs it (512 -> 128 -> 512, prompt "A photo of a person"),
    with diffusers' defaults for ``steps``, ``guidance`` and ``noise_level``; ``factor`` must then equal the
    upscaler's own factor (4). One fixed draw from ``seed`` serves every image, as ``sdedit``'s does."""
    NAME: ClassVar[str] = "sr"
    SECTION: ClassVar[str] = "sr"
    BOUNDS: ClassVar[Mapping[str, str]] = {"factor": "[2, inf)", "steps": "[1, inf)", "guidance": "[0, inf)",
                                           "noise_level": "[0, inf)", "seed": "[0, inf)"}
    factor: int = 4
    resample: Literal["bicubic", "area"] = "bicubic"
    model: str | None = None
    prompt: str = "A photo of a person"
    negative_prompt: str = ""
    steps: int = 75
    guidance: float = 9.0
    noise_level: int = 20
    seed: int = 0

    def _upscaler(self):
        from persguard_jax.upscale import load_upscaler
        try:
            return load_upscaler(str(self.model))
        except ValueError as e:  # WeightsError included: a missing or broken folder
            raise ValueError(f"sr.model: {e}") from None

    def check(self, height: int, width: int, pipe: Any = None) -> None:
        if self.model is None:
            return
        from persguard_jax.upscale import max_noise_level
        upscaler = self._upscaler()
        scale = 2 ** (len(upscaler.vae.config.block_out_channels) - 1)
        if self.factor != scale:
            raise ValueError(f"sr.factor={self.factor}: the upscaler at {self.model} upscales {scale}x; "
                             f"set sr.factor={scale}")
        if height % scale or width % scale:
            raise ValueError(f"sr: {height}x{width} images are not multiples of the upscaler's factor {scale}")
        if self.noise_level > max_noise_level(upscaler):
            raise ValueError(f"sr.noise_level={self.noise_level}: the upscaler at {self.model} takes at most "
                             f"{max_noise_level(upscaler)}")

    def __call__(self, images: Any, *, pipe: Any = None) -> np.ndarray:
        x = _as_images(images)
        h, w = x.shape[1:3]
        self.check(h, w)
        small = (max(1, round(w / self.factor)), max(1, round(h / self.factor)))
        low_res = _pil_each(x, lambda im: im.resize(small, RESAMPLING[self.resample]))
        if self.model is None:
            return _pil_each(low_res, lambda im: im.resize((w, h), Image.BICUBIC))
        from persguard_jax.upscale import upscale, upscale_noise
        upscaler = self._upscaler()
        latents, noise = upscale_noise(self.seed, 1, low_res.shape[1:3], upscaler.vae.config.latent_channels)
        n = len(x)
        return upscale(upscaler, low_res, self.prompt, self.negative_prompt, num_steps=self.steps,
                       guidance_scale=self.guidance, noise_level=self.noise_level,
                       latents=jnp.broadcast_to(latents, (n, *latents.shape[1:])),
                       image_noise=jnp.broadcast_to(noise, (n, *noise.shape[1:])))


# --------------------------------------------------------------------------- the table, chains, runs

PURIFIERS: dict[str, type[Purifier]] = {cls.NAME: cls for cls in (JPEG, Blur, TV, SDEdit, SDEditEmpty, SuperResolution)}
# the config sections holding their parameters (sdedit_empty reads sdedit's)
SECTIONS: dict[str, type[Purifier]] = {cls.SECTION: cls for cls in (JPEG, Blur, TV, SDEdit, SuperResolution)}


def parse_chain(text: str, sections: Mapping[str, Any] | None = None) -> list[Purifier]:
    """``"jpeg,sdedit"`` -> the purifiers in the order they run, each built from its config section in
    ``sections`` (a parsed section or a mapping; absent: the defaults). An unknown name raises one line listing
    the known ones."""
    names = [name.strip() for name in str(text).split(",")]
    known = ", ".join(PURIFIERS)
    if not all(names):
        raise ValueError(f"purifier chain {text!r} has an empty name; give names separated by commas, known: {known}")
    chain = []
    for name in names:
        if name not in PURIFIERS:
            raise ValueError(f"unknown purifier {name!r}; known: {known}")
        cls = PURIFIERS[name]
        given = (sections or {}).get(cls.SECTION)
        chain.append(cls.from_dict(given.to_dict() if isinstance(given, Section) else given))
    return chain


def chain_keys(chain: Sequence[Purifier]) -> list[str]:
    """One key per purifier of a chain for its timings: its name, numbered when it repeats (``jpeg``, ``jpeg_2``)."""
    keys, seen = [], {}
    for purifier in chain:
        seen[purifier.NAME] = seen.get(purifier.NAME, 0) + 1
        keys.append(purifier.NAME if seen[purifier.NAME] == 1 else f"{purifier.NAME}_{seen[purifier.NAME]}")
    return keys


@dataclass(frozen=True)
class Purified:
    """A chain's output: ``images`` ``(N, H, W, 3)`` in [0, 1] and, per purifier (``chain_keys``), the seconds
    each image took (``(N,)``; a batch's time shared by its images; the first batch includes compilation)."""
    images: np.ndarray
    seconds: dict[str, np.ndarray]


def purify(images: Any, chain: Sequence[Purifier], *, pipe: Any = None, batch_size: int = 1) -> Purified:
    """Run ``chain`` over ``images`` ``batch_size`` at a time, timing each purifier on each batch."""
    x = _as_images(images)
    for purifier in chain:
        purifier.check(*x.shape[1:3], pipe)
    keys = chain_keys(chain)
    seconds = {key: np.zeros(len(x)) for key in keys}
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = x[start: start + batch_size]
        for key, purifier in zip(keys, chain):
            t0 = time.perf_counter()
            batch = np.asarray(purifier(batch, pipe=pipe), np.float32)  # np.asarray waits for the device
            seconds[key][start: start + len(batch)] = (time.perf_counter() - t0) / len(batch)
        outputs.append(batch)
    return Purified(np.concatenate(outputs), seconds)


def purification_scores(inputs: Any, outputs: Any, *, evaluator: Any = None) -> dict[str, np.ndarray]:
    """``(N,)`` arrays of what purification changed, each output against its input (both in [0, 1]): ``linf`` and
    ``l2`` (norms of the difference over all pixels and channels, [0, 1] units), ``psnr`` (dB, inf for an
    unchanged image) and, with a ``metrics.CLIPEvaluator``, ``lpips_style``: the project's LPIPS-style distance
    (``metrics.feature_distance`` of CLIP vision-layer features; DiffShortcut reports LPIPS here, lower = more
    faithful; values comparable between runs with one CLIP, not to published LPIPS)."""
    from persguard_jax.metrics import psnr
    a, b = _as_images(inputs), _as_images(outputs)
    if a.shape != b.shape:
        raise ValueError(f"purification_scores: inputs {a.shape} and outputs {b.shape} differ in shape")
    diff = (b - a).reshape(len(a), -1)
    scores = {"linf": np.abs(diff).max(axis=1), "l2": np.sqrt(np.square(diff).sum(axis=1)),
              "psnr": np.asarray(psnr(b, a))}
    if evaluator is not None:
        scores["lpips_style"] = np.asarray(evaluator.paired_distance(a, b))
    return scores


def describe(chain: Sequence[Purifier]) -> dict[str, dict]:
    """Each purifier's parameters as run, by ``chain_keys`` (what a results file records)."""
    return {key: dataclasses.asdict(p) | ({"prompt": p.text} if isinstance(p, SDEdit) else {})
            for key, p in zip(chain_keys(chain), chain)}
