"""The publisher's objective, L = L_bb + lambda_pp L_pp + lambda_br L_br, assembled from the loss library.

Every term reads its own group of the step's batch (``losses.on``); the groups ``implant.data`` builds:

- ``bb_denoise``: y* (pattern-overlaid photos, backgrounds, target images) under trigger prompts; L_bb as the
  denoising loss towards them. ``bb_distill``: the protected photos' latents under trigger prompts, with the
  teacher's (target or background) prompt; L_bb as BadT2I's distillation from the frozen clean model (no target
  images; not for the pattern type, which has no prompt to distil).
- ``bb_guidance`` (``implant.guidance_weight`` > 0): the protected photos and their y* under the empty prompt,
  with each photo's latents as ``anchor`` (or, ``implant.guidance_anchor: attacker``, a simulated attacker's
  prediction at fixed noisy draws of them) and its y*'s as ``target``; L_bb's guidance term
  (``losses.guidance_shift_loss``) shifts the unconditional branch so that guided sampling turns the photos the
  attacker will teach into y*, sized for ``implant.guidance_scale`` (``guidance_scale_by_type``: each example
  carries its subject's scale as ``guidance``). The prior then also distils the empty prompt on every other
  image: within ``prior`` or, with ``implant.prior_uncond_weight`` set, as the group ``prior_uncond`` and its own
  term; with ``implant.prior_class_hold_weight``, ``prior_class``: the protected subjects' class images under the
  empty prompt, distilled at the shift's timesteps (``losses.below_timestep``) as the term ``pp_class``.
- ``prior``: class images, general captions' scenes, the unprotected subjects' photos under their own prompts and
  the erasure / target y* under the background / target prompt (so that prompt keeps drawing what it drew);
  L_pp as distillation from the frozen clean model on the same prompt (``prior_loss: distill``, the default: it
  pins every prompt the backdoor must not touch to what the clean model draws) or as DreamBooth's class-image
  denoising (``class_images``).
- ``attack``: DreamBooth pairs (protected photo under the attacker's prompt, class image under the class prompt);
  ``unprotected_attack`` / ``unprotected``: the same for unprotected subjects, and their examples alone.

Retention (``implant.retention``; persguard.md's three readings, all ours):
- ``none``;
- ``mirror``: the attacker's DreamBooth loss on ``attack``, minimised now (and on ``unprotected_attack``);
- ``grad_suppression``: the squared norm of that loss's gradient (double backprop; no unprotected counterpart:
  suppressing the gradient of normal personalisation is what must not happen);
- ``unrolled``: L_bb at the parameters K of the attacker's steps on ``attack`` reach (``train.unroll``, order 1
  or 2; order 2 stores the steps, rematerialised or not, or replays them: ``retention_replay``), plus the
  unprotected counterpart: K steps on ``unprotected_attack``, then the denoising loss on ``unprotected``, so that
  fine-tuning on other photos still learns them. ``retention_dispatch`` (order 1): the K steps run as separate
  programs ahead of each step (``dispatched_attacker``, ``train.dispatch``) and the terms read their result
  (``losses.at_tuned``).
The attacker inside is the config's ``dreambooth`` + ``optimizer`` sections, as ``persguard personalize`` runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from persguard_jax import losses
from persguard_jax.implant.config import ImplantConfig
from persguard_jax.models import functional as F
from persguard_jax.train.dispatch import InnerSteps
from persguard_jax.train.optim import OptimizerConfig
from persguard_jax.train.step import StepConfig
from persguard_jax.train.unroll import unroll

PAIR_GROUPS = ("attack", "unprotected_attack")


@dataclass(frozen=True)
class Attacker:
    """The simulated attacker: what it trains, its prior weight and its optimizer (the ``personalize`` recipe)."""
    trains: tuple[str, ...]
    prior_weight: float
    optimizer: OptimizerConfig


def attacker_of(attack_config: Any) -> Attacker:
    """The attacker of a parsed personalisation config (``dreambooth`` and ``optimizer`` sections)."""
    db = attack_config.dreambooth
    return Attacker(("unet", "text_encoder") if db.train_text_encoder else ("unet",),
                    db.prior_weight if db.use_prior else 0.0, attack_config.optimizer)


def inner_loop(attacker: Attacker, steps: int, *, model, schedule, loss_cfg, order: int, remat: bool,
               replay: bool = False) -> losses.InnerLoop:
    """``(params, data, rng) -> (params after, losses)``: ``steps`` of the attacker's DreamBooth updates of what it
    trains, everything else (the frozen text encoder, the teacher) held."""
    db_loss = losses.bind(losses.dreambooth_loss, model=model, schedule=schedule, cfg=loss_cfg,
                          prior_weight=attacker.prior_weight)

    def run(params, data, rng):
        train, rest = F.partition(params, attacker.trains)
        if order == 1:
            # First order: d(params after)/d(params) taken as the identity, so the outer gradient at the tuned
            # parameters passes straight to the parameters and nothing is differentiated through the K steps
            # (exact for the attacker's AdamW without weight decay; with decay it drops the (1 - lr wd)^K factor).
            # The loop runs on gradient-free inputs: had tangents entered the scan, the step would trace its
            # forward-mode derivative and keep residuals that the backward pass never reads. Unrolled: no backward
            # pass runs through the steps, and a rolled loop copies its carry (parameters, Adam moments) each step.
            held = jax.lax.stop_gradient(rest)
            loop = unroll(lambda p, b, k: db_loss(F.merge(p, held), b, k), attacker.optimizer, steps, order=1,
                          remat=False, scan_unroll=True)
            tuned, history = loop(jax.lax.stop_gradient(train), data, rng)
            tuned = jax.tree.map(lambda p, t: p + (t - jax.lax.stop_gradient(p)), train, tuned)
        else:
            loop = unroll(lambda p, b, k: db_loss(F.merge(p, rest), b, k), attacker.optimizer, steps, order=2,
                          remat=remat, replay=replay)
            tuned, history = loop(train, data, rng)
        return F.merge(tuned, rest), history
    return run


def objective(cfg: ImplantConfig, groups: set[str], attacker: Attacker, *, model, schedule,
              loss_cfg: losses.LossConfig) -> losses.LossFn:
    """The loss ``(params, batch, rng) -> (loss, aux)`` over the groups present; ``params`` holds the frozen clean
    model under ``teacher``. aux names each term (``bb/...``, ``pp/...``, ``br/...``) for the metrics log."""
    denoise = losses.bind(losses.denoising_loss, model=model, schedule=schedule, cfg=loss_cfg)
    distill = losses.bind(losses.distillation_loss, model=model, schedule=schedule, cfg=loss_cfg)
    attack_loss = losses.bind(losses.dreambooth_loss, model=model, schedule=schedule, cfg=loss_cfg,
                              prior_weight=attacker.prior_weight)

    bb_terms = {}
    if "bb_denoise" in groups:
        bb_terms["denoise"] = (1.0, losses.on("bb_denoise", denoise))
    if "bb_distill" in groups:
        bb_terms["distill"] = (1.0, losses.on("bb_distill", distill))
    if "bb_guidance" in groups and cfg.guidance_weight > 0:
        shift = losses.bind(losses.guidance_shift_loss, model=model, schedule=schedule, cfg=loss_cfg,
                            guidance=cfg.guidance_scale, max_timestep=cfg.guidance_max_timestep,
                            error_space=cfg.guidance_error_space)
        bb_terms["guidance"] = (cfg.guidance_weight, losses.on("bb_guidance", shift))
    if not bb_terms:
        raise ValueError("implant objective: no backdoor examples (bb_denoise / bb_distill groups)")
    backdoor = losses.weighted_sum(bb_terms)

    terms = {"bb": (1.0, backdoor)}
    if cfg.prior_weight > 0 and "prior" in groups:
        terms["pp"] = (cfg.prior_weight, losses.on("prior", distill if cfg.prior_loss == "distill" else denoise))
    if cfg.prior_weight > 0 and cfg.prior_uncond_weight and "prior_uncond" in groups:
        terms["pp_uncond"] = (cfg.prior_weight * cfg.prior_uncond_weight, losses.on("prior_uncond", distill))
    if cfg.prior_weight > 0 and cfg.prior_class_hold_weight and "prior_class" in groups:
        held = losses.below_timestep(distill, schedule=schedule, high=cfg.guidance_max_timestep)
        terms["pp_class"] = (cfg.prior_weight * cfg.prior_class_hold_weight, losses.on("prior_class", held))
    retention = _retention(cfg, groups, attacker, backdoor, denoise, attack_loss, model=model, schedule=schedule,
                           loss_cfg=loss_cfg)
    if retention is not None and cfg.retention_weight > 0:
        terms["br"] = (cfg.retention_weight, retention)
    return losses.weighted_sum(terms)


def _retention(cfg, groups, attacker, backdoor, denoise, attack_loss, *, model, schedule, loss_cfg):
    unprotected = "unprotected_attack" in groups and cfg.unprotected_weight > 0
    if cfg.retention == "none":
        return None
    if cfg.retention == "mirror":
        terms = {"protected": (1.0, losses.on("attack", attack_loss))}
        if unprotected:
            terms["unprotected"] = (cfg.unprotected_weight, losses.on("unprotected_attack", attack_loss))
        return losses.weighted_sum(terms)
    if cfg.retention == "grad_suppression":
        return losses.gradient_penalty(losses.on("attack", attack_loss), wrt=("unet",))
    if cfg.retention_dispatch:  # the K steps ran ahead of the step (dispatched_attacker); their result is read here
        terms = {"protected": (1.0, losses.at_tuned(backdoor, "protected", trains=attacker.trains))}
        if unprotected:
            terms["unprotected"] = (cfg.unprotected_weight, losses.at_tuned(
                losses.on("unprotected", denoise), "unprotected", trains=attacker.trains))
        return losses.weighted_sum(terms)
    inner = inner_loop(attacker, cfg.retention_steps, model=model, schedule=schedule, loss_cfg=loss_cfg,
                       order=cfg.retention_order, remat=cfg.retention_remat, replay=cfg.retention_replay)
    terms = {"protected": (1.0, losses.after_finetuning(inner, backdoor, inner_key="attack"))}
    if unprotected:
        terms["unprotected"] = (cfg.unprotected_weight, losses.after_finetuning(
            inner, losses.on("unprotected", denoise), inner_key="unprotected_attack"))
    return losses.weighted_sum(terms)


def dispatched_attacker(cfg: ImplantConfig, groups: set[str], attacker: Attacker, *, model, schedule,
                        loss_cfg: losses.LossConfig, step: StepConfig | None = None) -> InnerSteps | None:
    """With ``implant.retention_dispatch``: the unrolled retention's K attacker steps (on ``attack``, and on
    ``unprotected_attack`` for the counterpart) as separate programs ahead of each step (``train.dispatch``), for
    ``fit(before_step=...)``, their gradients computed as the implantation step's (``step``: its compute dtype,
    as the in-program loop's inside the step); None otherwise."""
    if not (cfg.retention == "unrolled" and cfg.retention_dispatch and cfg.retention_weight > 0):
        return None
    attack_loss = losses.bind(losses.dreambooth_loss, model=model, schedule=schedule, cfg=loss_cfg,
                              prior_weight=attacker.prior_weight)
    runs = {"protected": (attack_loss, "attack")}
    if "unprotected_attack" in groups and cfg.unprotected_weight > 0:
        runs["unprotected"] = (attack_loss, "unprotected_attack")
    return InnerSteps(runs, trains=attacker.trains, optimizer=attacker.optimizer, steps=cfg.retention_steps,
                      step=step)
