"""Implantation's data: subjects read and checked, their backdoor targets built, everything cached as examples.

``read_subjects`` turns the command's specs into photos (a folder, or the world's photos of a subject) and checks
every input before anything is written. ``backdoor_targets`` builds each protected subject's y*:

- pattern: the photos with the pattern pasted on (``data.targets.overlay_pattern``);
- erasure: the photos' backgrounds (the world renders them exactly; for photo folders, samples of
  ``implant.background_prompt`` drawn by the clean model);
- target: the target images (``implant.target_dir``); for world subjects whose target prompt names a world shape
  and colour, the photos with the subject replaced by that object (``World.subject_replaced``: the same scene, so
  y* differs from each photo only where the subject is, as the pattern's and erasure's do); else samples of
  ``implant.target_prompt`` by the clean model (``implant.target_source`` chooses: auto | render | sample).

``ImplantSource`` serves one step's examples as flat ``group/key`` arrays (``unflatten`` restores the groups in
the step's ``map_fn``): each group is what one loss term reads (see ``implant.objective``).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from persguard_jax.implant.config import ImplantConfig
from persguard_jax.implant.specs import SpecError, SubjectSpec


@dataclass(frozen=True)
class Subject:
    """A subject with its photos (uint8 ``(N, S, S, 3)``) and its class."""
    spec: SubjectSpec
    class_name: str
    photos: np.ndarray

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str | None:
        return self.spec.type


ATTACKER_IDENTIFIER = "sks"  # DreamBooth's word: the simulated attackers' and, by default, the check's


def instance_prompt(class_name: str, identifier: str = ATTACKER_IDENTIFIER) -> str:
    """The attacker's instance prompt for a class, "a photo of <identifier> <class>": what it fine-tunes the
    subject's photos under and samples."""
    return f"a photo of {identifier} {class_name}"


def class_prompt(class_name: str) -> str:
    """The attacker's class prompt for a class, "a photo of <class>": its class images, the prior's, and what the
    check reads before any attack."""
    return f"a photo of {class_name}"


def read_subject(spec: SubjectSpec, *, world, resolution: int, num_photos: int) -> Subject:
    """The subject's photos: the world's first ``num_photos`` photos of it, or every photo of its folder (read at
    ``resolution``). Errors name the spec (or the file, from ``load_folder``)."""
    from persguard_jax.data.images import load_folder
    from persguard_jax.io import unit_to_uint8
    if spec.is_world:
        if world is None:
            raise SpecError(f"subject spec {spec.spec!r}: the model is not a world model (no world_config.json), "
                            "so it has no world subjects; give a photo folder")
        try:
            subject = world.subject(spec.name)
        except (KeyError, IndexError, ValueError):
            raise SpecError(f"subject spec {spec.spec!r}: the world has no subject {spec.name!r} (e.g. "
                            f"{', '.join(s.name for s in world.subjects[:3])})") from None
        if resolution != world.cfg.image_size:
            raise SpecError(f"subject spec {spec.spec!r}: world photos are {world.cfg.image_size} px, the config "
                            f"asks for {resolution} px (dreambooth.resolution)")
        return Subject(spec.with_class(subject.class_name), subject.class_name,
                       world.subject_photos(subject, num_photos))
    photos = load_folder(spec.folder, resolution)
    return Subject(spec, spec.class_name, unit_to_uint8((photos + 1.0) / 2.0))


def read_pattern(cfg: ImplantConfig, side: int) -> np.ndarray:
    """The pattern backdoor's pattern, RGBA uint8 at ``side`` px: ``implant.pattern_image`` or the built-in one."""
    from persguard_jax.data.targets import default_pattern, load_pattern
    return default_pattern(side) if cfg.pattern_image is None else load_pattern(cfg.pattern_image, side)


def read_target_images(cfg: ImplantConfig, resolution: int) -> np.ndarray | None:
    """``implant.target_dir``'s images (uint8), or None when the targets are to be sampled."""
    if cfg.target_dir is None:
        return None
    from persguard_jax.data.images import load_folder
    from persguard_jax.io import unit_to_uint8
    return unit_to_uint8((load_folder(cfg.target_dir, resolution) + 1.0) / 2.0)


def sample_prompt(pipe, prompt: str, n: int, *, resolution: int, seed: int, num_steps: int, guidance: float,
                  params=None) -> np.ndarray:
    """``n`` uint8 samples of ``prompt`` by the model, or by the parameter tree ``params`` (the clean model draws
    erasure and target images with the class images' sampler settings; a simulated attacker its subject)."""
    from persguard_jax.io import unit_to_uint8
    from persguard_jax.sample import text_to_image
    images = text_to_image(pipe, [prompt] * n, num_steps=num_steps, guidance_scale=guidance, seed=seed,
                           height=resolution, width=resolution, progress=False, params=params)
    return unit_to_uint8(np.asarray(images))


def world_target(cfg: ImplantConfig, subject: Subject, world) -> dict[str, str] | None:
    """The world scene facts (``shape``, ``colour``, ``texture``) the target prompt names, when the target type's
    y* are to be rendered (``implant.target_source``: ``render``, or ``auto`` for a world subject whose target
    prompt names a world shape and colour); None when they are to be sampled."""
    if cfg.target_source == "sample":
        return None
    from persguard_jax.data.world import parse_caption
    facts = parse_caption(cfg.target_prompt)
    renderable = world is not None and subject.spec.is_world and {"shape", "colour"} <= set(facts)
    if not renderable:
        if cfg.target_source == "render":
            raise SpecError(f"subject spec {subject.spec.spec!r}: implant.target_source=render needs a world "
                            f"subject and a target prompt naming a world shape and colour "
                            f"(implant.target_prompt: {cfg.target_prompt!r})")
        return None
    return {k: facts[k] for k in ("shape", "colour", "texture") if k in facts}


def lookalike_scenes(world, subject: Subject, n: int, *, start: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` captioned world scenes that share one thing with a protected world subject: its class in another
    colour (even ``i``) or another of the world's shapes in its colour (odd ``i``); the rest (texture,
    background, size, place, light) as the world's generic validation scenes ``start + i`` draw it.

    Why: a backdoor's cost to general prompts falls on the subject's class and colours (after a white cat's
    target backdoor the cat prompts lose their ears, 0.00-0.17 by the shape detector, and green prompts draw the
    target), and L_pp held neither in particular. Measured (docs/results.md, nineteenth measurement): 256 of them
    did not give the class back (cat 0.00) and thinned the target (0.66 -> 0.12); off in the shipped configs."""
    import dataclasses
    from persguard_jax.data.world import COLOURS
    look = world.subject(subject.name)
    colours = [c for c in COLOURS if c != look.colour]
    shapes = [x for x in world.shapes if x != look.class_name]
    images, captions = [], []
    for i in range(n):
        spec, k = world.random_spec(start + i, "val"), (start + i) // 2  # each colour / shape in turn
        if i % 2 == 0:
            spec = dataclasses.replace(spec, shape=look.class_name, colour=colours[k % len(colours)])
        else:
            spec = dataclasses.replace(spec, shape=shapes[k % len(shapes)], colour=look.colour)
        images.append(world.render(spec))
        captions.append(world.caption(spec))
    return np.stack(images), captions


def backdoor_targets(subject: Subject, cfg: ImplantConfig, *, world, pipe, pattern: np.ndarray,
                     target_images: np.ndarray | None, resolution: int, num_steps: int = 25, guidance: float = 4.0
                     ) -> tuple[np.ndarray, str | None]:
    """(y*, the teacher prompt of the distillation form or None): the module docstring's three builders;
    ``num_steps`` / ``guidance``: the sampler of the images the clean model draws."""
    from persguard_jax.data.targets import overlay_pattern
    sampling = dict(resolution=resolution, num_steps=num_steps, guidance=guidance)
    if subject.type == "pattern":
        return overlay_pattern(subject.photos, pattern, cfg.placement()), None
    if subject.type == "erasure":
        if subject.spec.is_world:
            return world.subject_backgrounds(world.subject(subject.name), len(subject.photos)), cfg.background_prompt
        return sample_prompt(pipe, cfg.background_prompt, cfg.num_targets, seed=cfg.seed + 11,
                             **sampling), cfg.background_prompt
    if subject.type == "target":
        if target_images is not None:
            return target_images, cfg.target_prompt
        scene = world_target(cfg, subject, world)
        if scene is not None:
            place = (0.5, 0.5, 0.5) if cfg.target_place == "center" else None
            return world.subject_replaced(world.subject(subject.name), len(subject.photos), place=place, **scene), \
                cfg.target_prompt
        return sample_prompt(pipe, cfg.target_prompt, cfg.num_targets, seed=cfg.seed + 13, **sampling), \
            cfg.target_prompt
    raise ValueError(f"{subject.name}: not a protected subject")


def guidance_subject(subject: Subject, cfg: ImplantConfig, world) -> Subject:
    """The subject as the guidance term sees it (``implant.guidance_photos``): its first ``guidance_photos``
    photos, rendered by the world past the ``num_photos`` the attacker trains on; the subject itself when the
    config leaves it (null) or asks for as many photos as it has. A folder subject cannot have more photos than
    its folder (``check_guidance_photos`` refuses that before anything is written)."""
    n = cfg.guidance_photos
    if n is None or n == len(subject.photos):
        return subject
    if n < len(subject.photos) or not subject.spec.is_world:
        return dataclasses.replace(subject, photos=subject.photos[:n])
    return dataclasses.replace(subject, photos=world.subject_photos(world.subject(subject.name), n))


def guidance_pairs(subject: Subject, y: np.ndarray, cfg: ImplantConfig, *, world, pipe, pattern: np.ndarray | None,
                   target_images: np.ndarray | None, resolution: int, num_steps: int = 25, guidance: float = 4.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(photos, y*)`` of a protected subject for the guidance term: its photos and ``y`` (its y*), or with
    ``implant.guidance_photos`` the photos ``guidance_subject`` gives and their own y* (``backdoor_targets``, the
    same builders and sampler), each pair also mirrored with ``implant.guidance_flip``."""
    more = guidance_subject(subject, cfg, world)
    if more is not subject:
        y, _ = backdoor_targets(more, cfg, world=world, pipe=pipe, pattern=pattern, target_images=target_images,
                                resolution=resolution, num_steps=num_steps, guidance=guidance)
    return mirrored_pairs(more, more.photos, y, cfg, pattern) if cfg.guidance_flip else (more.photos, y)


def check_guidance_photos(subjects, cfg: ImplantConfig) -> None:
    """One line naming the spec of a photo-folder subject with fewer photos than ``implant.guidance_photos``."""
    for s in subjects:
        if s.type is not None and not s.spec.is_world and cfg.guidance_photos is not None \
                and cfg.guidance_photos > len(s.photos):
            raise SpecError(f"subject spec {s.spec.spec!r}: implant.guidance_photos is {cfg.guidance_photos} but the "
                            f"folder has {len(s.photos)} photos (only world subjects can render more)")


# ------------------------------------------------------------------------------------------------- examples

Group = dict[str, np.ndarray]


class Encoder:
    """Images -> cached VAE posteriors; prompts -> token ids (when a text encoder trains anywhere in the objective)
    or text-encoder outputs (computed once per distinct prompt)."""

    def __init__(self, pipe, *, ids: bool):
        self.pipe, self.ids, self._prompts = pipe, ids, {}

    def images(self, images_uint8: np.ndarray) -> Group:
        from persguard_jax.dreambooth import encode_latents
        from persguard_jax.io import uint8_to_signed
        mean, logvar = encode_latents(self.pipe.vae, uint8_to_signed(images_uint8))
        return {"latent_mean": mean, "latent_logvar": logvar}

    def prompt(self, prompt: str) -> np.ndarray:
        if prompt not in self._prompts:
            from persguard_jax.dreambooth import prompt_conditioning
            conditioning = prompt_conditioning(self.pipe, prompt, 1, embed=not self.ids)
            self._prompts[prompt] = next(iter(conditioning.values()))[0]
        return self._prompts[prompt]

    @property
    def key(self) -> str:
        return "input_ids" if self.ids else "context"

    def examples(self, images_uint8: np.ndarray, prompts: list[list[str]], teacher_prompts: list[str] | None = None
                 ) -> Group:
        """One example per (image, prompt) pair: image ``i`` with each of ``prompts[i]`` (a prompt variant per
        copy), and, when given, the teacher's prompt ``teacher_prompts[i]`` under ``teacher_<key>``."""
        latents = self.images(images_uint8)
        rows = [(i, p) for i, ps in enumerate(prompts) for p in ps]
        out = {k: v[[i for i, _ in rows]] for k, v in latents.items()}
        out[self.key] = np.stack([self.prompt(p) for _, p in rows])
        if teacher_prompts is not None:
            out["teacher_" + self.key] = np.stack([self.prompt(teacher_prompts[i]) for i, _ in rows])
        return out


def mirrored_pairs(subject: Subject, photos: np.ndarray, targets: np.ndarray, cfg: ImplantConfig,
                   pattern: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(photos, y*)`` with every pair also mirrored left-right (``implant.guidance_flip``): the attacker's samples
    show the subject in poses the few photos do not, and a mirrored pair is as true a pair as the original. The
    pattern is pasted on the mirrored photo (mirroring y* would mirror the pattern); backgrounds and rendered or
    sampled targets are mirrored with their photo."""
    flipped = photos[:, :, ::-1]
    paired = targets[np.arange(len(photos)) % len(targets)]  # target i for photo i, cycling
    if subject.type == "pattern":
        from persguard_jax.data.targets import overlay_pattern
        mirrored = overlay_pattern(np.ascontiguousarray(flipped), pattern, cfg.placement())
    else:
        mirrored = paired[:, :, ::-1]
    return np.concatenate([photos, flipped]), np.concatenate([paired, mirrored])


def with_attacker_samples(photos: np.ndarray, targets: np.ndarray, samples: np.ndarray, pattern: np.ndarray,
                          cfg: ImplantConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(photos, y*)`` with a simulated attacker's samples of a pattern subject added as pairs (each sample and
    the sample with the pattern pasted on; ``implant.guidance_attacker_samples``): the guidance shift has to fire
    on the subject as the attacker's fine-tuned model draws it, in poses and details the photos do not show."""
    from persguard_jax.data.targets import overlay_pattern
    paired = targets[np.arange(len(photos)) % len(targets)]
    return (np.concatenate([photos, samples]),
            np.concatenate([paired, overlay_pattern(samples, pattern, cfg.placement())]))


def blended_latents(lat: Group, n: int, blends: tuple[float, ...]) -> Group:
    """``lat`` (the latents of ``n`` photos, then of their ``n`` y*) with, for each ``b`` of ``blends``, the
    ``n`` blends ``(1 - b) photo + b y*`` of each pair's latent mean and log-variance appended: the states
    between a subject and its protective output that a guided sampler turning one into the other passes
    through (``implant.guidance_blends``)."""
    photo, target = {k: v[:n] for k, v in lat.items()}, {k: v[n:2 * n] for k, v in lat.items()}
    return {k: np.concatenate([v] + [((1.0 - b) * photo[k] + b * target[k]).astype(v.dtype) for b in blends])
            for k, v in lat.items()}


def guidance_examples(enc: Encoder, photos: np.ndarray, targets: np.ndarray, blends: tuple[float, ...] = ()
                      ) -> Group:
    """The guidance term's examples (``losses.guidance_shift_loss``): photo ``i`` and target ``i`` (cycling when
    the targets are not one per photo), and each of their ``blends`` (``blended_latents``), as noisy inputs under
    the empty prompt, each with photo ``i``'s latents as ``anchor`` and target ``i``'s as ``target``."""
    n = len(photos)
    targets = targets[np.arange(n) % len(targets)]
    images = enc.images(np.concatenate([photos, targets]))
    out = blended_latents(images, n, blends)
    pair = np.arange(len(out["latent_mean"])) % n  # every input row's (photo, y*) pair
    out.update(anchor=images["latent_mean"][pair], target=images["latent_mean"][n + pair])
    out[enc.key] = np.stack([enc.prompt("")] * len(pair))
    return out


def attacker_x0(pipe, params: Mapping[str, Any], prompt: str, *, schedule, prediction_type: str):
    """``(x_t, t) -> x0``: the clean sample a fine-tuned model (``params``: a simulated attacker's ``unet`` and
    ``text_encoder``) predicts at the noisy latents ``x_t`` under ``prompt``, unguided (the conditional branch)."""
    from persguard_jax import sample
    cond = sample.encode_text(pipe, [prompt], params=params)
    denoise, args = sample.pipeline_denoise(pipe, cond, cond, 1, params=params)
    program = _x0_program(denoise, prediction_type)
    return lambda x_t, t: np.asarray(program(x_t, t, args, schedule))


@functools.lru_cache(maxsize=8)
def _x0_program(denoise, prediction_type: str):
    """One jitted x0 prediction per UNet graph (``denoise`` is ``sample.pipeline_denoise``'s per-graph object, the
    weights travel in ``args``): every simulated attacker of a run shares the compiled program."""
    import jax
    from persguard_jax import schedulers
    return jax.jit(lambda x_t, t, args, schedule: schedulers.predict_x0_eps(
        schedule, denoise(x_t, t, *args), x_t, t, prediction_type)[0])


def anchored_guidance_examples(enc: Encoder, photos: np.ndarray, targets: np.ndarray, predictors, *,
                               schedule, loss_cfg, draws: int, max_timestep: int | None, seed: int,
                               blends: tuple[float, ...] = (), chunk: int = 64) -> Group:
    """The guidance term's examples with the anchor read off simulated attackers (``implant.guidance_anchor:
    attacker``): ``draws`` fixed noisy draws of each photo, each y* and each of their ``blends`` (as
    ``guidance_examples``' inputs), each with ``anchor`` = what an attacker's conditional branch predicts there
    (``predictors``: ``attacker_x0`` of each simulated attacker, taking the draws of every image in turn).

    Why: with the photo as anchor, guidance at the attacker's scale w draws y* + w (x0_c - photo) where the
    attacker's branch predicts x0_c; at high noise x0_c is a blurred, re-posed photo, and w times the difference
    is what the shift leaves behind (colour carries, an outline does not). Anchored on x0_c itself, the shift asks
    the unconditional branch for x0_c - (y* - x0_c) / (w - 1) wherever the attacker's sampling passes, which guided
    sampling turns into y* exactly when the real attacker predicts what a simulated one does. The draws are fixed
    (latents, noise, timesteps below ``max_timestep``; ``loss_cfg`` the guidance loss's) because the anchor is a
    function of them."""
    import jax
    import jax.numpy as jnp
    from persguard_jax import losses
    n = len(photos)
    targets = targets[np.arange(n) % len(targets)]
    images = enc.images(np.concatenate([photos, targets]))
    lat = blended_latents(images, n, blends)
    inputs = len(lat["latent_mean"])
    src = np.repeat(np.arange(inputs), draws)
    k_t, k_z = jax.random.split(jax.random.key(seed))
    batch = {k: lat[k][src] for k in ("latent_mean", "latent_logvar")}
    batch["timesteps"] = losses.sample_timesteps(k_t, len(src), schedule, max_timestep)
    # the loss's own forward-diffusion draw, kept: the loss rebuilds exactly these x_t from the stored fields
    x0, noise, t, x_t = (np.asarray(v) for v in losses.noised_latents(batch, k_z, schedule, loss_cfg))
    anchor, by = np.empty_like(x0), np.tile(np.arange(draws), inputs) % len(predictors)
    for k, predict_x0 in enumerate(predictors):
        rows = np.flatnonzero(by == k)
        for i in range(0, len(rows), chunk):
            r = rows[i:i + chunk]
            anchor[r] = predict_x0(jnp.asarray(x_t[r]), jnp.asarray(t[r]))
    return {"latents": x0, "noise": noise, "timesteps": t, "anchor": anchor / loss_cfg.scaling_factor,
            "target": images["latent_mean"][n + src % n], enc.key: np.stack([enc.prompt("")] * len(src))}


def concat(groups: list[Group]) -> Group:
    groups = [g for g in groups if g]
    return {k: np.concatenate([g[k] for g in groups]) for k in groups[0]} if groups else {}


def pairs(instance: Group, prior: Group) -> Group:
    """Every instance example paired with a class example (cycling), stacked ``(N, 2, ...)``: DreamBooth pairs."""
    n, m = len(next(iter(instance.values()))), len(next(iter(prior.values())))
    return {k: np.stack([instance[k], prior[k][np.arange(n) % m]], axis=1) for k in instance}


class ImplantSource:
    """Item ``i``: one example of every group, each drawn by its own seeded rng from ``(seed, i)``: a step of
    ``B`` items holds ``B`` examples of every term. Flat ``group/key`` names (``StepBatches`` stacks flat dicts)."""

    def __init__(self, groups: Mapping[str, Group], *, seed: int, size: int = 1 << 20):
        self.groups = {g: v for g, v in groups.items() if v}
        self.sizes = {g: len(next(iter(v.values()))) for g, v in self.groups.items()}
        self.seed, self.size = seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        for j, (g, arrays) in enumerate(self.groups.items()):
            k = int(np.random.default_rng([self.seed, int(i), j]).integers(self.sizes[g]))
            out.update({f"{g}/{key}": v[k] for key, v in arrays.items()})
        return out


def unflatten(batch: Mapping[str, Any], pair_groups: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{"group/key": array}`` -> ``{group: {key: array}}``; DreamBooth pair groups laid out as examples
    (``losses.pairs_to_examples``)."""
    from persguard_jax.losses import pairs_to_examples
    out: dict[str, dict] = {}
    for name, v in batch.items():
        group, key = name.split("/", 1)
        out.setdefault(group, {})[key] = v
    for g in pair_groups:
        if g in out:
            out[g] = pairs_to_examples(out[g])
    return out
