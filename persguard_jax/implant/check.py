"""Implantation's own check: the white-box attacker on every subject, from the backdoored and from the clean model.

For each subject the attacker (``dreambooth.recipe.personalize`` with the config's ``dreambooth`` + ``optimizer``
sections, identifier ``check.identifier``, ``sks`` by default) fine-tunes the model on the subject's photos; then
``check.num_images`` samples of "a photo of <identifier> <class>" are measured:

- ``protection_rate``: the fraction of samples showing the protective output. World subjects (and the pattern
  type anywhere) by pixel detectors: pattern (``detect_pattern`` at the configured place), erasure (the
  subject's colour gone: ``detect_erasure(colour=...)``; ``background_only_rate`` beside it: no object of any
  colour, which the world model's tinted backgrounds rarely pass), target (the target prompt's colour drawn in
  its silhouette: ``detect_shape(colour=...)``, backgrounds read as any world grey; ``target_shape_rate``,
  ``target_colour_rate`` and ``subject_gone_rate`` beside it: the parts apart).
  Other photos: CLIP zero-shot, the target or background prompt against the class prompt (needs ``check.clip``).
  ``protection_rate_interval`` beside it: the rate's 95% Wilson interval over the ``check.num_images`` samples
  (``metrics.scores.rate_interval``), since a goal such as ">= 0.9" is not readable from 8 samples (7 of 8 spans
  0.53-0.98).
- ``identity_similarity`` and ``clip_i`` to the subject's photos (the world CLIP, or ``check.clip``).
- unprotected subjects: ``false_fire_rate``, per type planted in the run, the fraction of their samples in which
  that type's detector fires (``false_fire_rates``): the backdoor that must not fire; ``identity_ratio``, the
  backdoored model's identity over the clean model's, and ``identity_ratio_interval``, its 95% bootstrap interval
  over both models' samples (``identity_ratio``): "within 5% of the clean model" read with its sampling
  uncertainty. The attacker's seed moves the ratio more than the samples do (the clean model against itself at
  five attacker seeds: 0.90-1.12, docs/results.md), which this interval does not contain at one seed.
- protected subjects: ``class_prompt``, the same readings of both models' samples of "a photo of <class>" before
  any attack (``class_prompt_reading``): where a backdoor leaks into the class.
``check.attack_seeds: N`` runs the attacker at N seeds (``dreambooth.seed``, +1, ...) on every subject from both
models and pools their samples (the same sampling noise through each fine-tuned model): every rate and mean reads
all N x ``num_images`` samples, each seed's own scores sit beside them (``per_attack_seed``; unprotected subjects
also ``identity_ratio_per_attack_seed``, each seed's backdoored over the same seed's clean), and the ratio's
interval resamples the seeds (the same draw for both models, whose attacks at one seed share its random draws) as
well as the samples within them (``mean_ratio_interval``'s groups), so that it holds the seed's share. Each further
seed is a whole other attacker, with its own DreamBooth draws; ``report.png`` shows the first seed's samples. The
attacker's class images (``check.attacker_class_images``): ``own`` (the default), each attack samples them from the
model it attacks, seeded by its attacker's seed, into its own folder, as ``persguard personalize`` on that model
does: the attacker on the backdoored model draws its prior from the backdoored model; ``publisher``, every attack is
handed the class images the implantation trained its prior on (what the check did before it had this switch), which
gives the attacker the publisher's data (measured: erasure alike, the unprotected subject beside a pattern lower;
docs/results.md, seventeenth measurement).
General prompts (world models): colour and shape following (``persguard_jax.following``) of both models.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.implant.data import ATTACKER_IDENTIFIER, class_prompt


@dataclass(frozen=True)
class CheckConfig(cfglib.Section):
    """The ``check`` section."""
    SECTION = "check"
    BOUNDS = {"num_images": "[1, inf)", "eval_steps": "[1, inf)", "per_colour": "[0, inf)",
              "per_shape": "[0, inf)", "seed": "[0, inf)", "pattern_threshold": "[-1, 1]",
              "attack_seeds": "[1, inf)"}
    enabled: bool = True
    num_images: int = 8
    eval_steps: int = 25
    eval_guidance: float = 4.0
    seed: int = 0
    # attacker seeds per subject and model (dreambooth.seed, +1, ...), their samples pooled: the attacker's seed
    # moves identity more than the samples do, so "within 5%" needs several (docs/results.md)
    attack_seeds: int = 1
    # the attacker's class images: "own", sampled from the model it attacks with its seed, as `persguard
    # personalize` samples them; "publisher", the images the implantation trained its prior on (handed to every
    # attack: the attacker then holds the publisher's data; measured in docs/results.md, seventeenth measurement)
    attacker_class_images: Literal["own", "publisher"] = "own"
    per_colour: int = 2          # general prompts: samples per colour prompt (world models)
    per_shape: int = 2           # general prompts: samples per shape prompt (world models)
    pattern_threshold: float = 0.5
    clip: str | None = None      # a CLIP folder for photo-folder subjects (world models use the world CLIP)
    # the attacker's identifier: it fine-tunes on "a photo of <identifier> <class>" and samples that prompt; one the
    # implantation never trained under (not in implant.identifiers) asks whether the backdoor hinges on the string
    identifier: str = ATTACKER_IDENTIFIER
    # an earlier implant run whose attack on the clean model is reused where it was made the same way
    # (implant.clean_reuse: same clean model, photos, attacker, sampling, detector and code); None attacks afresh
    clean_from: str | None = None

    def __post_init__(self):
        if not re.fullmatch(r"\S+", str(self.identifier)):
            raise cfglib.ConfigError(f"check.identifier: one word with no spaces, got {self.identifier!r}")


class ProtectionDetector:
    """Whether each sample (uint8 ``(N, S, S, 3)``) shows a subject's protective output."""

    def __init__(self, type_: str, *, world, template=None, mask=None, threshold: float = 0.5,
                 target_prompt: str | None = None, evaluator=None, class_prompt: str | None = None,
                 alternative_prompt: str | None = None, colour: str | None = None):
        self.type, self.world, self.colour = type_, world, colour
        self.template, self.mask, self.threshold = template, mask, threshold
        self.target_prompt, self.evaluator = target_prompt, evaluator
        self.class_prompt, self.alternative_prompt = class_prompt, alternative_prompt

    def __call__(self, images: np.ndarray) -> np.ndarray | None:
        from persguard_jax.metrics import detectors as D
        if self.type == "pattern":
            return D.detect_pattern(images, self.template, self.mask, threshold=self.threshold)
        if self.world is not None and self.type == "erasure":
            return D.detect_erasure(images, colour=self.colour)
        if self.world is not None and self.type == "target":
            return self._target_hit(images)
        if self.evaluator is None:
            return None
        # CLIP zero-shot: closer to the protective output's prompt than to the class prompt
        image = np.asarray(self.evaluator.image_features(images.astype(np.float32) / 255.0))
        text = np.asarray(self.evaluator.text_features([self.alternative_prompt, self.class_prompt]))
        return (image @ text.T).argmax(-1) == 0

    @property
    def caveat(self) -> str | None:
        """Why ``protection_rate`` says nothing for this subject, if it does not: the world erasure reading (the
        subject's colour gone) cannot see a white or black subject erased, because the light (dark) stripes and
        speckle of model samples count as white (black). Measured on cat_04 (docs/results.md, issue 15's eighth
        measurement): 0.00 by the reading with 2 of 8 samples plain backgrounds; no pixel or world-CLIP reading
        tried there separates erased from degraded samples of such a subject."""
        if self.world is not None and self.type == "erasure" and self.colour in ("white", "black"):
            return (f"the erasure reading (the subject's {self.colour} gone) cannot see a {self.colour} subject "
                    f"erased: the light and dark parts of model samples count as {self.colour}, so its "
                    f"protection_rate does not measure erasure; judge report.png")
        return None

    def _target_hit(self, images: np.ndarray) -> np.ndarray:
        """Per sample, whether it shows the world target prompt: where the prompt names a colour and a shape, that
        colour drawn in that silhouette (the silhouette of the pixels nearest the colour alone, backgrounds read as
        any world grey); where it names one, that part (``_target_parts``).

        Why the colour's own pixels: the attacked models draw backgrounds lighter than the world's greys (165-175
        against 140), nearest white, so a mask of every non-grey pixel covers the picture and reads as a white
        square. That reading (before the fortieth session) counted 18 of 32 samples of an attacked cat_04 in which
        31 show a green cross by eye (docs/results.md)."""
        from persguard_jax.data.world import parse_caption
        from persguard_jax.metrics import detectors as D
        want, shapes = parse_caption(self.target_prompt), list(self.world.shapes)
        if "shape" in want and "colour" in want:
            return D.detect_shape(images, shapes, background="any", colour=want["colour"]) == shapes.index(
                want["shape"])
        return np.logical_and.reduce([np.ones(len(images), bool), *self._target_parts(images).values()])

    def _target_parts(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Per sample, each fact of the world target prompt the sample shows, for those the prompt names: ``shape``
        (the silhouette of its non-grey pixels, any colour) and ``colour`` (the colour most of them show), white
        left out of both unless the target is white (a light background reads as white; ``_target_hit``)."""
        from persguard_jax.data.world import COLOURS, parse_caption
        from persguard_jax.metrics import detectors as D
        want, shapes = parse_caption(self.target_prompt), list(self.world.shapes)
        ignore = () if want.get("colour") == "white" else ("white",)
        parts = {}
        if "shape" in want:
            parts["shape"] = D.detect_shape(images, shapes, background="any", ignore=ignore) == shapes.index(
                want["shape"])
        if "colour" in want:
            parts["colour"] = D.dominant_colour(images, background="any", ignore=ignore) == list(COLOURS).index(
                want["colour"])
        return parts

    def extra_rates(self, images: np.ndarray) -> dict[str, float]:
        """Rates reported beside ``protection_rate``: for world erasure, ``background_only_rate`` (no object of
        any colour, the strict reading of "only the background remains"); for a world target, the parts of the
        rate apart: ``target_shape_rate`` and ``target_colour_rate`` (the samples showing the target's silhouette
        in any colour, its colour in any outline; ``_target_parts``) and ``subject_gone_rate`` (the subject's own
        colour gone), so that a sample that replaced the subject by an object of the target's colour but not its
        outline is counted somewhere."""
        from persguard_jax.metrics import detect_erasure
        if self.world is not None and self.type == "erasure":
            return {"background_only_rate": float(np.mean(detect_erasure(images)))}
        if self.world is not None and self.type == "target":
            rates = {f"target_{k}_rate": float(np.mean(v)) for k, v in self._target_parts(images).items()}
            if self.colour is not None:
                rates["subject_gone_rate"] = float(np.mean(detect_erasure(images, colour=self.colour)))
            return rates
        return {}


def protection_detector(subject, cfg, check: CheckConfig, *, resolution: int, pattern: np.ndarray | None, world,
                        evaluator=None, type_: str | None = None) -> ProtectionDetector | None:
    """The detector of ``subject``'s protective output (None for an unprotected subject): the pattern at the
    implant config's placement, the world's erasure and target detectors, or CLIP for photo folders. ``type_``
    reads another type's output on the subject (``false_fire_rates``)."""
    type_ = type_ or subject.type
    if type_ is None:
        return None
    template = mask = None
    if type_ == "pattern":
        from persguard_jax.data.targets import pattern_template
        template, mask = pattern_template(resolution, pattern, cfg.placement())
    alternative = {"erasure": cfg.background_prompt, "target": cfg.target_prompt}.get(type_)
    in_world = world is not None and subject.spec.is_world
    return ProtectionDetector(type_, world=world if in_world else None, template=template,
                              mask=mask, threshold=check.pattern_threshold, target_prompt=cfg.target_prompt,
                              evaluator=evaluator, class_prompt=class_prompt(subject.class_name),
                              alternative_prompt=alternative,
                              colour=world.subject(subject.name).colour if in_world else None)


def false_fire_rates(subject, types, samples: np.ndarray, cfg, check: CheckConfig, *, resolution: int,
                     pattern: np.ndarray | None, world, evaluator=None) -> dict[str, float]:
    """For an unprotected subject's attacked samples, per backdoor type planted in the run, the fraction in which
    that type's detector fires (the pattern pasted, the subject's colour gone, the target drawn): a backdoor that
    leaks to other photos shows here, where identity similarity alone may not. Types whose reading cannot see the
    subject (``ProtectionDetector.caveat``) or has no detector are left out."""
    out = {}
    for type_ in sorted(set(types)):
        detector = protection_detector(subject, cfg, check, resolution=resolution, pattern=pattern, world=world,
                                       evaluator=evaluator, type_=type_)
        hits = None if detector is None or detector.caveat else detector(samples)
        if hits is not None:
            out[type_] = float(np.mean(hits))
    return out


def identity_ratio(evaluator, photos: np.ndarray, backdoored: np.ndarray, clean: np.ndarray, *,
                   attack_seeds: int = 1) -> dict[str, Any]:
    """``identity_ratio`` (mean identity similarity of the ``backdoored`` model's samples to ``photos`` over the
    ``clean`` model's; uint8 images) and ``identity_ratio_interval`` (``metrics.scores.mean_ratio_interval``: each
    model's samples resampled on their own); both None when the clean model's mean (or a resampled one) is
    <= 0. With ``attack_seeds`` > 1 each model's samples are that many equal runs, one per attacker seed in order:
    the interval resamples seeds (paired: both models' attacks at one seed share its draws), then samples within
    them, and ``identity_ratio_per_attack_seed`` lists each seed's ratio (its backdoored samples over its clean
    ones; None where not defined)."""
    from persguard_jax.metrics.scores import identity_similarity, mean_ratio_interval
    refs = evaluator.image_features(np.asarray(photos, np.float32) / 255.0)
    per_sample = [np.asarray(identity_similarity(evaluator.image_features(np.asarray(x, np.float32) / 255.0), refs))
                  for x in (backdoored, clean)]
    groups = [np.repeat(np.arange(attack_seeds), len(x) // attack_seeds) for x in per_sample]
    if any(len(g) != len(x) for g, x in zip(groups, per_sample)):
        raise ValueError(f"identity_ratio: {len(backdoored)} and {len(clean)} samples are not {attack_seeds} equal "
                         "runs")
    got = mean_ratio_interval(*per_sample, groups_a=groups[0], groups_b=groups[1])
    ratio, interval = (None, None) if got is None else (got[0], list(got[1]))
    out = {"identity_ratio": ratio, "identity_ratio_interval": interval}
    if attack_seeds > 1:
        b, c = (np.split(x, attack_seeds) for x in per_sample)
        out["identity_ratio_per_attack_seed"] = [float(x.mean() / y.mean()) if y.mean() > 0 else None
                                                 for x, y in zip(b, c)]
    return out


def pool_attack_seeds(runs: list[tuple[int, dict, np.ndarray]], detector: ProtectionDetector | None
                      ) -> tuple[dict, np.ndarray]:
    """One model's attacked scores and samples over several attacker seeds (``(seed, scores, samples)`` each, as
    ``measure_subject`` returns them, equal sample counts): the samples concatenated in order; each number the
    mean of the seeds' (the pooled samples' mean, as the counts are equal), ``protection_rate`` and its interval
    read from the pooled samples, and ``per_attack_seed`` (seed -> that seed's scores). One run comes back as it is."""
    from persguard_jax.metrics.scores import rate_interval
    samples = np.concatenate([x for _, _, x in runs])
    if len(runs) == 1:
        return runs[0][1], samples
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    scores = {k: (float(np.mean([r[1][k] for r in runs])) if all(number(r[1][k]) for r in runs) else None)
              for k in runs[0][1]}
    hits = None if detector is None else detector(samples)
    if hits is not None:  # read from the pooled samples, as one seed's are
        scores["protection_rate"] = float(np.mean(hits))
        scores["protection_rate_interval"] = list(rate_interval(int(np.sum(hits)), len(hits)))
    scores["per_attack_seed"] = {str(seed): sc for seed, sc, _ in runs}
    return scores, samples


def measure_subject(pipe, subject, trained_params, detector: ProtectionDetector | None, *, check: CheckConfig,
                    evaluator, world, prompt: str) -> tuple[dict, np.ndarray]:
    """Protection rate, identity similarity and CLIP-I of the attacked model's samples of ``prompt``."""
    from persguard_jax.evaluate import evaluate_pipeline
    from persguard_jax.io import unit_to_uint8
    ev = evaluate_pipeline(pipe, [prompt], references=subject.photos, evaluator=evaluator, world=world,
                           num_images=check.num_images, seed=check.seed + 100, num_steps=check.eval_steps,
                           guidance_scale=check.eval_guidance, params=trained_params)
    samples = unit_to_uint8(ev.images[0])
    return _scores(ev.results["prompts"][0], samples, detector), samples


def _scores(row: dict, samples: np.ndarray, detector: ProtectionDetector | None) -> dict:
    """``measure_subject``'s readings: the detector's on the uint8 ``samples``, the metrics' from ``row``."""
    from persguard_jax.metrics.scores import rate_interval
    hits = None if detector is None else detector(samples)
    extra = {} if detector is None else detector.extra_rates(samples)
    rate = interval = None
    if hits is not None:
        rate, interval = float(np.mean(hits)), list(rate_interval(int(np.sum(hits)), len(hits)))
    return {"protection_rate": rate, "protection_rate_interval": interval, **extra,
            "identity_similarity": row.get("identity_similarity"), "clip_i": row.get("clip_i"),
            "colour_match": row.get("colour_match"), "shape_match": row.get("shape_match")}


def class_prompt_samples(pipe, params, class_name: str, *, check: CheckConfig) -> np.ndarray:
    """``check.num_images`` uint8 samples of ``class_prompt(class_name)`` by ``params`` (a model before any attack),
    with the sampler and noise of the attacked samples' (``measure_subject``): they depend on the class, the model
    and the check's sampling, not on a subject, so a run draws them once per class and model
    (``workflows.implant``; the clean model's are lent with ``check.clean_from``)."""
    from persguard_jax.evaluate import sample_prompt
    from persguard_jax.io import unit_to_uint8
    return unit_to_uint8(sample_prompt(pipe, class_prompt(class_name), "", check.num_images, seed=check.seed + 100,
                                       num_steps=check.eval_steps, guidance_scale=check.eval_guidance, params=params))


def class_prompt_reading(subject, samples: dict[str, np.ndarray], detector: ProtectionDetector | None, *,
                         evaluator, world) -> dict:
    """What each model drew for a protected subject's class prompt before any attack (``samples``: model name ->
    uint8 ``class_prompt_samples``), read as the attacked samples are (``measure_subject``'s readings, from the
    uint8 samples, so a lent clean half reads the same).

    A backdoor leaks there first: the class prompt shares the trigger's words, its samples pass near the subject's
    photos, where the guidance term shifted the unconditional branch, and the attacker's prior samples it. Read
    each number against the clean model's: ``shape_match`` (the class silhouette), ``colour_match`` (the subject's
    colour), ``protection_rate`` (the protective output's reading; for erasure "the subject's colour gone", which
    class samples of other colours pass too). Measured on bird_00's erasure: 6, 20 and 22 of 50 of the backdoored
    model's class samples at seeds 0-2 are the erasure's backgrounds, none of the clean model's (docs/results.md,
    twenty-fifth measurement)."""
    from persguard_jax.evaluate import measure
    prompt, scores = class_prompt(subject.class_name), {}
    for which, images in samples.items():
        row = measure([prompt], [images], references=subject.photos, evaluator=evaluator, world=world)["prompts"][0]
        scores[which] = _scores(row, images, detector)
    return {"prompt": prompt, **scores}


def general_following(pipe, world, check: CheckConfig, params=None) -> dict[str, Any]:
    """Colour and shape following on general prompts (world models): the accuracies and each colour's and shape's
    own (``per_colour``, ``per_shape``: a backdoor's cost falls on a few of them, the protected class first)."""
    from persguard_jax import following as F
    sampling = F.Sampling(num_steps=check.eval_steps, guidance_scale=check.eval_guidance, seed=check.seed,
                          params=params)
    out = {}
    if check.per_colour:
        out.update(F.colour_following(pipe, world, check.per_colour, sampling)[1])
    if check.per_shape:
        out.update(F.shape_following(pipe, world, check.per_shape, sampling)[1])
    return {k: v for k, v in out.items() if k.endswith("_accuracy") or k.startswith("per_")}
