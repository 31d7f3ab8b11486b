"""The implantation step's example groups, built once from the subjects before training: L_bb's y* and pairs, the
guidance term's pairs (anchored on simulated attackers where configured), L_pp's distilled prior, and the DreamBooth
pairs retention unrolls the attacker on. Each builder encodes its images once (``data.Encoder``); which loss reads
which group is ``objective.objective``'s business.
"""
from __future__ import annotations

import numpy as np

from persguard_jax.implant import data as D
from persguard_jax.implant.config import ImplantConfig
from persguard_jax.implant.data import class_prompt, instance_prompt


def unused_settings(cfg: ImplantConfig, protected, *, world, target_images) -> list[str]:
    """One line per ``implant`` setting that this run's subjects and switches leave without effect (a setting that
    sizes a term that is off, or a subject type that is absent), for the command to print: a silent no-op would
    read as a measured null result."""
    notes = []
    if cfg.guidance_attacker_samples and (cfg.guidance_weight == 0 or not any(s.type == "pattern" for s in protected)):
        notes.append("guidance_attacker_samples ignored: it adds pairs to the guidance term (guidance_weight > 0) "
                     "of pattern subjects")
    if cfg.guidance_anchor == "attacker" and cfg.guidance_weight == 0:
        notes.append("guidance_anchor=attacker ignored: it anchors the guidance term (guidance_weight > 0)")
    for key in ("guidance_scale_by_type", "guidance_anchor_by_type", "guidance_blends_by_type"):
        if getattr(cfg, key) and cfg.guidance_weight == 0 and any(s.type in getattr(cfg, key) for s in protected):
            notes.append(f"{key} ignored: it shapes the guidance term (guidance_weight > 0)")
    rounds = cfg.rounds_of(s.type for s in protected)
    if cfg.guidance_rounds > rounds:
        notes.append("guidance_rounds ignored: a round renews the guidance term's (guidance_weight > 0) simulated "
                     "attackers (guidance_anchor attacker, or guidance_attacker_samples for pattern subjects)")
    if cfg.guidance_round_teacher != "clean" and rounds == 1:
        notes.append("guidance_round_teacher ignored: it names the teacher of a later round (guidance_rounds > 1, "
                     "with simulated attackers to renew)")
    if cfg.guidance_blends and cfg.guidance_weight == 0:
        notes.append("guidance_blends ignored: it adds noisy inputs to the guidance term (guidance_weight > 0)")
    if cfg.guidance_photos is not None and cfg.guidance_weight == 0:
        notes.append("guidance_photos ignored: it sizes the guidance term's photos (guidance_weight > 0)")
    if cfg.target_place != "subject" and not any(
            s.type == "target" and target_images is None and D.world_target(cfg, s, world) is not None
            for s in protected):
        notes.append("target_place ignored: it places rendered world targets (a world subject of type target, "
                     "no implant.target_dir)")
    if cfg.prior_class_hold_weight and (cfg.guidance_weight == 0 or cfg.prior_loss != "distill"):
        notes.append("prior_class_hold_weight ignored: it holds the guidance term's (guidance_weight > 0) "
                     "unconditional branch on class images by distillation (prior_loss: distill)")
    if cfg.prior_lookalikes and (world is None or cfg.prior_loss != "distill"
                                 or not any(s.spec.is_world for s in protected)):
        notes.append("prior_lookalikes ignored: it adds world scenes to the distilled prior (prior_loss: distill) "
                     "of world subjects")
    return notes


def example_groups(enc: D.Encoder, cfg: ImplantConfig, protected, unprotected, *, class_images: dict[str, np.ndarray],
                   db, world, pipe, pattern: np.ndarray | None, target_images: np.ndarray | None,
                   simulated: dict[str, tuple], attacker_samples: dict[str, np.ndarray], schedule, loss_cfg
                   ) -> tuple[dict[str, D.Group], dict[str, np.ndarray]]:
    """The step's example groups (``objective.objective`` reads them by name) and each protected subject's y*.

    ``class_images``: uint8 class images per class (the attacker's prior); ``db``: the ``dreambooth`` section
    (resolution, and how y* scenes are sampled where they are); ``simulated``: ``name -> (subject, [attacker
    parameters])`` that anchor the guidance term (``implant.guidance_anchor: attacker``); ``attacker_samples``:
    ``name -> uint8 samples`` of a simulated attacker that join the guidance pairs
    (``implant.guidance_attacker_samples``). Groups: ``bb_denoise`` / ``bb_distill`` (L_bb, by ``backdoor_loss``),
    ``bb_guidance``, ``prior``, ``prior_uncond``, ``prior_class``, ``attack`` (the protected subjects' DreamBooth
    pairs for retention) and, with unprotected subjects, ``unprotected`` and ``unprotected_attack``; an empty
    group is dropped by ``data.ImplantSource``."""
    bb_denoise, bb_distill, guidance, attack_pairs, targets_of, protective = [], [], [], [], {}, []
    for s in protected:
        y, teacher_prompt = D.backdoor_targets(s, cfg, world=world, pipe=pipe, pattern=pattern,
                                               target_images=target_images, resolution=db.resolution,
                                               num_steps=db.class_sample_steps, guidance=db.class_guidance)
        targets_of[s.name] = y
        if teacher_prompt is not None:
            protective.append((y, teacher_prompt))
        prompts = cfg.prompts(s.class_name)
        if cfg.backdoor_loss == "distill" and teacher_prompt is not None:
            bb_distill.append(enc.examples(s.photos, [prompts] * len(s.photos), [teacher_prompt] * len(s.photos)))
        else:
            bb_denoise.append(enc.examples(y, [prompts] * len(y)))
        if cfg.guidance_weight > 0:
            photos, y_pairs = D.guidance_pairs(s, y, cfg, world=world, pipe=pipe, pattern=pattern,
                                               target_images=target_images, resolution=db.resolution,
                                               num_steps=db.class_sample_steps, guidance=db.class_guidance)
            if s.name in attacker_samples:
                photos, y_pairs = D.with_attacker_samples(photos, y_pairs, attacker_samples[s.name], pattern, cfg)
            blends = cfg.guidance_blends_of(s.type)
            if cfg.guidance_anchor_of(s.type) == "attacker":
                predictors = [D.attacker_x0(pipe, tuned, instance_prompt(s.class_name), schedule=schedule,
                                            prediction_type=loss_cfg.prediction_type) for tuned in simulated[s.name][1]]
                guidance.append(D.anchored_guidance_examples(
                    enc, photos, y_pairs, predictors, schedule=schedule, loss_cfg=loss_cfg,
                    draws=cfg.guidance_anchor_draws, max_timestep=cfg.guidance_max_timestep, seed=cfg.seed + 17,
                    blends=blends))
            else:
                guidance.append(D.guidance_examples(enc, photos, y_pairs, blends))
            if cfg.guidance_scale_by_type:  # each example carries its subject's scale (losses.guidance_shift_loss)
                guidance[-1]["guidance"] = np.full(len(guidance[-1]["target"]), cfg.guidance_scale_of(s.type),
                                                   np.float32)
        attack_pairs.append(D.pairs(enc.examples(s.photos, [prompts] * len(s.photos)),
                                    _class_examples(enc, class_images, s.class_name)))
    prior, prior_uncond = prior_examples(enc, cfg, world, class_images, unprotected, protective, protected=protected,
                                         distill=cfg.prior_loss == "distill")
    groups = {"bb_denoise": D.concat(bb_denoise), "bb_distill": D.concat(bb_distill),
              "bb_guidance": D.concat(guidance), "prior": prior, "prior_uncond": prior_uncond,
              "attack": D.concat(attack_pairs)}
    groups["prior_class"] = class_hold_examples(enc, cfg, protected, class_images)
    if unprotected:
        u_ex = [enc.examples(s.photos, [[instance_prompt(s.class_name)]] * len(s.photos)) for s in unprotected]
        groups["unprotected"] = D.concat(u_ex)
        groups["unprotected_attack"] = D.concat([D.pairs(e, _class_examples(enc, class_images, s.class_name))
                                                 for e, s in zip(u_ex, unprotected)])
    return groups, targets_of


def _class_examples(enc: D.Encoder, class_images: dict[str, np.ndarray], class_name: str) -> D.Group:
    """The attacker's prior half of a DreamBooth pair: the class's images under its class prompt."""
    return enc.examples(class_images[class_name], [[class_prompt(class_name)]] * len(class_images[class_name]))


def prior_examples(enc, cfg, world, class_images: dict, unprotected, protective, *, distill: bool,
                    protected=()):
    """L_pp's examples ``(prior, prior_uncond)``: class images under their class prompt; with distillation also
    general world captions' scenes (and ``implant.prior_lookalikes`` look-alikes of each protected world subject,
    ``implant.data.lookalike_scenes``), the unprotected subjects' photos under their identifier prompts and the
    protective outputs' own prompts on their y* (``protective``: (images, target or background prompt) pairs;
    L_bb teaches the trigger what the target prompt draws, and without this the target prompt drifts with it: one
    collapsed blob for every seed, measured in docs/results.md). The teacher sees the same prompt: no
    ``teacher_*`` key. With the guidance term (under distill) the empty prompt is held on the same images but the
    protective outputs: in ``prior`` beside their prompts, or in ``prior_uncond`` alone when
    ``implant.prior_uncond_weight`` gives it its own term (else, and at weight 0, that group is empty)."""
    held = distill and cfg.guidance_weight > 0
    apart = held and cfg.prior_uncond_weight is not None
    images, prompts = list(class_images.values()), [[[class_prompt(c)]] * len(x) for c, x in class_images.items()]
    if distill:
        if world is not None and cfg.num_general:
            scenes = [world.scene(i, "val") for i in range(cfg.num_general)]
            images.append(np.stack([img for img, _ in scenes]))
            prompts.append([[cap] for _, cap in scenes])
        if world is not None and cfg.prior_lookalikes:
            for k, s in enumerate(x for x in protected if x.spec.is_world):
                looks, captions = D.lookalike_scenes(world, s, cfg.prior_lookalikes, start=k * cfg.prior_lookalikes)
                images.append(looks)
                prompts.append([[cap] for cap in captions])
        for s in unprotected:
            images.append(s.photos)
            prompts.append([cfg.prompts(s.class_name)] * len(s.photos))
    groups, uncond = [], []
    for x, ps in zip(images, prompts):
        rows = [p + [""] for p in ps] if held else ps
        examples = enc.examples(x, rows)  # each image encoded once, whichever group its rows go to
        if not apart:
            groups.append(examples)
            continue
        empty = np.array([q == "" for r in rows for q in r])
        groups.append({k: v[~empty] for k, v in examples.items()})
        if cfg.prior_uncond_weight:
            uncond.append({k: v[empty] for k, v in examples.items()})
    if distill:
        groups += [enc.examples(y, [[prompt]] * len(y)) for y, prompt in protective]
    return D.concat(groups), D.concat(uncond)


def class_hold_examples(enc, cfg, protected, class_images: dict) -> dict:
    """``implant.prior_class_hold_weight``'s group ``prior_class``: the class images of the protected subjects'
    classes (the shift's look-alikes), each once, under the empty prompt; empty when the term is off (the weight
    0, no guidance term, or the class-image prior)."""
    if not (cfg.prior_class_hold_weight and cfg.guidance_weight > 0 and cfg.prior_loss == "distill"):
        return {}
    held = sorted({s.class_name for s in protected})
    return D.concat([enc.examples(class_images[c], [[""]] * len(class_images[c])) for c in held])
