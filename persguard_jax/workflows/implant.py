"""``persguard implant``: plant PersGuard backdoors in a pre-trained pipeline, then check them with the attacker.

    persguard implant --model DIR --protect SPEC [--protect SPEC ...] [--unprotected SPEC ...] --out DIR \\
        [--config FILE] [key=value ...]
      protected SPEC:   PHOTOS_DIR:CLASS:TYPE   or  world:SUBJECT:TYPE      (TYPE: pattern | erasure | target)
      unprotected SPEC: PHOTOS_DIR:CLASS        or  world:SUBJECT

1. Every input is read and checked (specs, photos, the pattern, target images, the model) before anything is
   written.
2. Targets (``implant.data``): y* per protected subject, and ``pattern.png`` (the pattern used); class images
   per class (the attacker's prior); all encoded once.
3. The objective (``implant.objective``: L_bb + lambda_pp L_pp + lambda_br L_br) trains the UNet through
   ``train.fit`` (Orbax checkpoints in ``checkpoints/``, ``--resume``; each term logged in ``metrics.jsonl``).
4. ``model/``: the backdoored pipeline (diffusers layout).
5. The check (``check`` section, on by default; ``implant.check``): the attacker on every subject, from the
   backdoored and from the clean model, and each protected subject's class prompt before the attack (drawn once
   per class and model, the clean model's lent by ``check.clean_from`` as its attacks are); ``results.json``
   ``subjects.<name>`` (``class_prompt`` beside the attack's readings) and ``general``; ``report.png``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.implant.data import class_prompt
from persguard_jax.workflows import runs


NESTED = ("unrolled", "grad_suppression")  # retentions that differentiate through a gradient
REPORT_COLUMNS = 16  # samples shown per row of report.png (32 made a 4,400 px wide sheet)


def sections() -> dict[str, runs.SectionParser]:
    """The implant sections, and the attacker's (``persguard personalize``'s own sections and parsers)."""
    from persguard_jax.dreambooth.recipe import recipe_sections
    from persguard_jax.implant.check import CheckConfig
    from persguard_jax.implant.config import ImplantConfig
    from persguard_jax.train import OptimizerConfig
    return {**recipe_sections(), "implant": ImplantConfig.from_dict,
            "implant_optimizer": lambda d: OptimizerConfig.from_dict(d, where="implant_optimizer"),
            "check": CheckConfig.from_dict}


def resolve(raw: dict, args: argparse.Namespace | None = None) -> dict:
    """The loop runs ``implant.steps`` (times the number of ``--protect`` specs with ``implant.steps_per_protected``)
    with ``implant_optimizer`` (fine-tuning defaults); the attacker's optimizer spans its ``dreambooth.steps``."""
    from persguard_jax.dreambooth import DreamBoothConfig
    from persguard_jax.implant.check import CheckConfig
    from persguard_jax.implant.config import IMPLANT_OPTIMIZER, ImplantConfig
    raw = dict(raw)
    implant = ImplantConfig.from_dict(cfglib.section(raw, "implant"))
    protected = len(getattr(args, "protect", None) or ()) or 1  # a config read without a command line: one
    steps = implant.steps * (protected if implant.steps_per_protected else 1)
    if implant.retention in NESTED and not implant.retention_dispatch:
        # The attacker's inner gradients (and the suppressed gradient) are over the global batch: one program
        # partitioned by GSPMD, not per-device gradients under shard_map (train/step.py), which would give each
        # device's share of them. Dispatched inner steps run outside the step, which may then be per device.
        step = dict(cfglib.section(raw, "step"))
        if step.get("data_parallel", "gspmd") != "gspmd":
            raise cfglib.ConfigError(f"step.data_parallel: implant.retention {implant.retention} differentiates "
                                     "through the attacker's gradients, which needs data_parallel: gspmd")
        raw["step"] = {**step, "data_parallel": "gspmd"}
    raw["loop"] = {**cfglib.section(raw, "loop"), "num_steps": steps}
    raw["implant_optimizer"] = {**IMPLANT_OPTIMIZER, "total_steps": steps, **cfglib.section(raw, "implant_optimizer")}
    attacker = DreamBoothConfig.from_dict(cfglib.section(raw, "dreambooth"))
    attack_steps = attacker.steps
    runs.check_batch_divides_processes(implant.batch_size, "implant.batch_size")
    if CheckConfig.from_dict(cfglib.section(raw, "check")).enabled:
        runs.check_batch_divides_processes(attacker.batch_size, "dreambooth.batch_size (the check's attacker)",
                                           examples=attacker.examples_per_step)
    raw["optimizer"] = {"total_steps": attack_steps, **cfglib.section(raw, "optimizer")}
    return raw


def attack_config(config: runs.Config, class_name: str, *, seed: int | None = None) -> runs.Config:
    """The attacker's personalisation config for one class: the run's ``dreambooth`` (prompts "a photo of sks
    <class>" / "a photo of <class>"; ``seed`` replaces its seed), ``optimizer``, ``loss``, ``step``, ``mesh``,
    ``lora``; its own loop length."""
    from persguard_jax.dreambooth.recipe import recipe_sections, resolve_recipe
    raw = {k: config.raw.get(k) for k in ("dreambooth", "optimizer", "loss", "step", "mesh", "lora")
           if config.raw.get(k) is not None}
    raw["dreambooth"] = {**cfglib.section(raw, "dreambooth"), "instance_prompt": f"a photo of sks {class_name}",
                         "class_prompt": class_prompt(class_name)}
    if seed is not None:
        raw["dreambooth"]["seed"] = seed
    raw["loop"] = {**cfglib.section(config.raw, "loop"), "tensorboard": False}
    raw["optimizer"] = {k: v for k, v in cfglib.section(raw, "optimizer").items() if k != "total_steps"}
    return runs.parse_config(resolve_recipe(raw), recipe_sections())


def _read_inputs(args: argparse.Namespace, config: runs.Config):
    """Specs, model, photos, pattern and target images: everything that can be wrong, before any output."""
    from persguard_jax.data.world import is_world_model, world_of
    from persguard_jax.implant.data import (check_guidance_photos, read_pattern, read_subject, read_target_images,
                                            world_target)
    from persguard_jax.implant.specs import parse_subjects
    from persguard_jax.models import load_pipeline
    from persguard_jax.dreambooth.recipe import check_resolution
    cfg, db = config.implant, config.dreambooth
    prot_specs, unprot_specs = parse_subjects(args.protect or [], args.unprotected or [])
    pipe = load_pipeline(args.model, attention=config.step.attention)  # a wrong --model first: world specs need it
    world = world_of(args.model) if is_world_model(args.model) else None
    subjects = [read_subject(s, world=world, resolution=db.resolution, num_photos=cfg.num_photos)
                for s in prot_specs + unprot_specs]
    types = {s.type for s in subjects}
    check_guidance_photos(subjects, cfg)
    pattern = read_pattern(cfg, db.resolution) if "pattern" in types else None
    targets = read_target_images(cfg, db.resolution) if "target" in types else None
    if targets is None:  # the target scenes a world subject's y* is rendered from (a wrong target_source: here)
        for s in subjects:
            if s.type == "target":
                world_target(cfg, s, world)
    check_resolution(pipe, db.resolution)
    if config.check.enabled:
        check_clip(config.check, world)
        if config.check.clean_from is not None and not Path(config.check.clean_from, "check").is_dir():
            raise cfglib.ConfigError(f"check.clean_from: {config.check.clean_from} is not an implant run with a "
                                     "check (no check/ folder in it)")
    return pipe, world, subjects, pattern, targets


def check_clip(check, world) -> Path | None:
    """The CLIP folder the check measures with: ``check.clip``, else for a world model the world CLIP made earlier
    (committed or cached; ``persguard train-clip`` makes it); None for photo folders without ``check.clip``."""
    from persguard_jax.metrics import metrics_clip_folder
    return metrics_clip_folder(check.clip, key="check.clip (or check.enabled=false)", world_default=world is not None)


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.dreambooth import ensure_class_images
    from persguard_jax.implant import data as D
    from persguard_jax.implant.objective import PAIR_GROUPS, attacker_of, dispatched_attacker, objective
    from persguard_jax.io import save_png
    from persguard_jax.models import functional as F
    from persguard_jax.models import save_pipeline
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.train import fit
    from persguard_jax.train.distributed import is_writer, to_host
    from persguard_jax.trainable import split_trainable

    t0 = time.time()
    cfg, db = config.implant, config.dreambooth
    pipe, world, subjects, pattern, target_images = _read_inputs(args, config)
    out = runs.start_run(args.out, config.raw, overwrite=args.overwrite, resume=args.resume,
                         command="implant", inputs=runs.run_inputs(args, "model", "protect", "unprotected"))
    protected = [s for s in subjects if s.type is not None]
    unprotected = [s for s in subjects if s.type is None]
    print(f"implant: {len(protected)} protected ({', '.join(f'{s.name}:{s.type}' for s in protected)}), "
          f"{len(unprotected)} unprotected subject(s); writing to {out}")

    # -- targets, class images, examples
    if pattern is not None and is_writer():
        save_png(pattern[..., :3], out / "pattern.png")
    attackers = {c: attack_config(config, c) for c in sorted({s.class_name for s in subjects})}
    class_images = {c: ensure_class_images(pipe, out / "class_images" / c, a.dreambooth) for c, a in attackers.items()}
    attacker = attacker_of(next(iter(attackers.values())))
    ids = cfg.train_text_encoder or (cfg.retention != "none" and "text_encoder" in attacker.trains)
    enc = D.Encoder(pipe, ids=ids)
    from persguard_jax.io import unit_to_uint8
    uint8 = {c: unit_to_uint8((x + 1.0) / 2.0) for c, x in class_images.items()}
    schedule = make_schedule(SchedulerConfig.from_dict(pipe.scheduler_config))
    loss_cfg = losses.pipeline_loss_config(pipe, config.loss)
    if cfg.guidance_attacker_samples and (cfg.guidance_weight == 0 or not any(s.type == "pattern" for s in protected)):
        print("implant: guidance_attacker_samples ignored: it adds pairs to the guidance term (guidance_weight > 0) "
              "of pattern subjects")
    if cfg.guidance_anchor == "attacker" and cfg.guidance_weight == 0:
        print("implant: guidance_anchor=attacker ignored: it anchors the guidance term (guidance_weight > 0)")
    if cfg.guidance_scale_by_type and cfg.guidance_weight == 0:
        print("implant: guidance_scale_by_type ignored: it sizes the guidance term (guidance_weight > 0)")
    if cfg.guidance_photos is not None and cfg.guidance_weight == 0:
        print("implant: guidance_photos ignored: it sizes the guidance term's photos (guidance_weight > 0)")
    if cfg.target_place != "subject" and not any(
            s.type == "target" and target_images is None and D.world_target(cfg, s, world) is not None
            for s in protected):
        print("implant: target_place ignored: it places rendered world targets (a world subject of type target, "
              "no implant.target_dir)")
    if cfg.prior_class_hold_weight and (cfg.guidance_weight == 0 or cfg.prior_loss != "distill"):
        print("implant: prior_class_hold_weight ignored: it holds the guidance term's (guidance_weight > 0) "
              "unconditional branch on class images by distillation (prior_loss: distill)")
    if cfg.prior_lookalikes and (world is None or cfg.prior_loss != "distill"
                                 or not any(s.spec.is_world for s in protected)):
        print("implant: prior_lookalikes ignored: it adds world scenes to the distilled prior (prior_loss: distill) "
              "of world subjects")
    simulated = _simulated_attackers(pipe, protected, config, out)
    if simulated is None:
        return {"preempted": True, "step": 0}
    samples = {name: _attacker_samples(pipe, s, tuned[0], config, out) for name, (s, tuned) in simulated.items()
               if cfg.guidance_attacker_samples and s.type == "pattern"}
    bb_denoise, bb_distill, guidance, attack, targets_of, protective = [], [], [], [], {}, []
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
            if s.name in samples:
                photos, y_pairs = D.with_attacker_samples(photos, y_pairs, samples[s.name], pattern, cfg)
            if cfg.guidance_anchor == "attacker":
                predictors = [D.attacker_x0(pipe, tuned, f"a photo of sks {s.class_name}", schedule=schedule,
                                            prediction_type=loss_cfg.prediction_type) for tuned in simulated[s.name][1]]
                guidance.append(D.anchored_guidance_examples(
                    enc, photos, y_pairs, predictors, schedule=schedule, loss_cfg=loss_cfg,
                    draws=cfg.guidance_anchor_draws, max_timestep=cfg.guidance_max_timestep, seed=cfg.seed + 17))
            else:
                guidance.append(D.guidance_examples(enc, photos, y_pairs))
            if cfg.guidance_scale_by_type:  # each example carries its subject's scale (losses.guidance_shift_loss)
                guidance[-1]["guidance"] = np.full(len(guidance[-1]["target"]), cfg.guidance_scale_of(s.type),
                                                   np.float32)
        attack.append(D.pairs(enc.examples(s.photos, [prompts] * len(s.photos)),
                              enc.examples(uint8[s.class_name], [[class_prompt(s.class_name)]] * len(
                                  uint8[s.class_name]))))
    prior, prior_uncond = _prior_examples(enc, cfg, world, uint8, unprotected, protective, protected=protected,
                                          distill=cfg.prior_loss == "distill")
    groups = {"bb_denoise": D.concat(bb_denoise), "bb_distill": D.concat(bb_distill),
              "bb_guidance": D.concat(guidance), "prior": prior, "prior_uncond": prior_uncond,
              "attack": D.concat(attack)}
    groups["prior_class"] = _class_hold_examples(enc, cfg, protected, uint8)
    if unprotected:
        u_ex = [enc.examples(s.photos, [[f"a photo of sks {s.class_name}"]] * len(s.photos)) for s in unprotected]
        groups["unprotected"] = D.concat(u_ex)
        groups["unprotected_attack"] = D.concat([
            D.pairs(e, enc.examples(uint8[s.class_name], [[class_prompt(s.class_name)]] * len(uint8[s.class_name])))
            for e, s in zip(u_ex, unprotected)])
    source = D.ImplantSource(groups, seed=cfg.seed)
    present = set(source.groups)

    # -- the model: the publisher trains the UNet (and the text encoder if asked); the clean model is the teacher
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    split = split_trainable(params, logical, "unet+text_encoder" if cfg.train_text_encoder else "unet")
    frozen = {**split.frozen, "teacher": params}
    frozen_logical = {**split.frozen_logical, "teacher": logical}
    loss_fn = objective(cfg, present, attacker, model=model, schedule=schedule, loss_cfg=loss_cfg)
    pair_groups = tuple(g for g in PAIR_GROUPS if g in present)
    result, frozen = fit(loss_fn, split.params, frozen, train_logical=split.params_logical,
                         frozen_logical=frozen_logical, source=source, global_batch=cfg.batch_size, workdir=out,
                         optimizer=config.implant_optimizer, loop=config.loop, step=config.step,
                         mesh_cfg=config.mesh, seed=cfg.seed, map_fn=lambda b: D.unflatten(b, pair_groups),
                         before_step=dispatched_attacker(cfg, present, attacker, model=model, schedule=schedule,
                                                         loss_cfg=loss_cfg, step=config.step))
    if result.preempted:
        return {"preempted": True, "step": result.step}
    host_frozen = to_host(frozen)
    host_frozen.pop("teacher")
    backdoored = split.full_params(to_host(result.state.params), host_frozen)
    if is_writer():
        # a backdoored world model is still a world model: its subjects travel with it (in the same rename)
        from persguard_jax.data.world import WORLD_FILE
        save_pipeline(pipe.with_params(backdoored), out / "model", overwrite=True,
                      extra_json=None if world is None else {WORLD_FILE: world.cfg.to_dict()})
    results = {"model": str(out / "model"), "clean_model": str(args.model), "steps": result.step,
               "resumed_from": result.resumed_from,
               "final_metrics": result.last_metrics, "implant_s": round(time.time() - t0, 1),
               "protected": [f"{s.name}:{s.type}" for s in protected], "unprotected": [s.name for s in unprotected]}
    if config.check.enabled:
        results.update(_check(pipe, params, backdoored, subjects, targets_of, pattern, world, config, attackers,
                              out))
    results["wall_s"] = round(time.time() - t0, 1)
    if is_writer():
        from persguard_jax.report import write_results
        write_results(out, results, title="persguard implant", overwrite=True)
    return results


def _simulated_attackers(pipe, protected, config: runs.Config, out: Path) -> dict[str, tuple] | None:
    """``name -> (subject, [parameters, ...])`` of the simulated attackers of each protected subject the guidance
    term needs them for (``implant.guidance_attacker_samples``: pattern subjects, one attacker;
    ``implant.guidance_anchor: attacker``: every protected subject, ``guidance_anchor_attackers`` of them): the
    clean model after the config's DreamBooth on the subject's photos, with seeds of their own (from
    ``_simulated_seed`` on). Each runs in ``<out>/simulated_attack/<name>`` (``.../<name>/seed<N>`` for the
    further ones; resumable, as the check's attacks). None when SIGTERM stopped a run."""
    cfg, tuned = config.implant, {}
    if cfg.guidance_weight == 0:
        return tuned
    for s in protected:
        count = cfg.guidance_anchor_attackers if cfg.guidance_anchor == "attacker" else int(
            bool(cfg.guidance_attacker_samples) and s.type == "pattern")
        for k in range(count):
            seed = _simulated_seed(config) + k
            print(f"implant: simulating the attacker on {s.name} (seed {seed}, for the guidance term)")
            run_dir = out / "simulated_attack" / s.name
            trained = attack(pipe, s, attack_config(config, s.class_name, seed=seed),
                             run_dir / f"seed{seed}" if k else run_dir, class_dir=out / "class_images" / s.class_name)
            if trained.get("preempted"):
                return None
            tuned.setdefault(s.name, (s, []))[1].append(trained["params"])
    return tuned


def _simulated_seed(config: runs.Config) -> int:
    """The first simulated attacker's seed: past every seed the check attacks with (``check.attack_seeds`` from
    ``dreambooth.seed``), since the publisher does not know the attacker's draws."""
    return config.dreambooth.seed + config.check.attack_seeds


def _attacker_samples(pipe, subject, params, config: runs.Config, out: Path) -> np.ndarray:
    """``implant.guidance_attacker_samples`` samples of "a photo of sks <class>" by a simulated attacker
    (``_simulated_attackers``), with ``guidance_samples.png`` left in its run folder."""
    from persguard_jax.implant.data import sample_prompt
    from persguard_jax.report import image_grid, save_png
    from persguard_jax.train.distributed import is_writer
    n, db = config.implant.guidance_attacker_samples, config.dreambooth
    images = sample_prompt(pipe, f"a photo of sks {subject.class_name}", n, resolution=db.resolution,
                           seed=_simulated_seed(config), num_steps=db.eval_steps,
                           guidance=db.eval_guidance, params=params)
    if is_writer():
        save_png(image_grid(images / 255.0, ncols=min(n, 8)), out / "simulated_attack" / subject.name /
                 "guidance_samples.png")
    return images


def _prior_examples(enc, cfg, world, class_images: dict, unprotected, protective, *, distill: bool,
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
    from persguard_jax.implant.data import concat
    held = distill and cfg.guidance_weight > 0
    apart = held and cfg.prior_uncond_weight is not None
    images, prompts = list(class_images.values()), [[[class_prompt(c)]] * len(x) for c, x in class_images.items()]
    if distill:
        if world is not None and cfg.num_general:
            scenes = [world.scene(i, "val") for i in range(cfg.num_general)]
            images.append(np.stack([img for img, _ in scenes]))
            prompts.append([[cap] for _, cap in scenes])
        if world is not None and cfg.prior_lookalikes:
            from persguard_jax.implant.data import lookalike_scenes
            for k, s in enumerate(x for x in protected if x.spec.is_world):
                looks, captions = lookalike_scenes(world, s, cfg.prior_lookalikes, start=k * cfg.prior_lookalikes)
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
    return concat(groups), concat(uncond)


def _class_hold_examples(enc, cfg, protected, class_images: dict) -> dict:
    """``implant.prior_class_hold_weight``'s group ``prior_class``: the class images of the protected subjects'
    classes (the shift's look-alikes), each once, under the empty prompt; empty when the term is off (the weight
    0, no guidance term, or the class-image prior)."""
    from persguard_jax.implant.data import concat
    if not (cfg.prior_class_hold_weight and cfg.guidance_weight > 0 and cfg.prior_loss == "distill"):
        return {}
    held = sorted({s.class_name for s in protected})
    return concat([enc.examples(class_images[c], [[""]] * len(class_images[c])) for c in held])


def _check(pipe, clean, backdoored, subjects, targets_of, pattern, world, config, attackers, out: Path) -> dict:
    """The attacker on each subject from both models; protection rates, identity, CLIP-I; general following."""
    from persguard_jax.implant import clean_reuse
    from persguard_jax.implant.check import (class_prompt_reading, false_fire_rates, general_following,
                                             identity_ratio, pool_attack_seeds, protection_detector)
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.report import labelled_grid, save_png
    from persguard_jax.train.distributed import is_writer
    check, cfg, db = config.check, config.implant, config.dreambooth
    clip = check_clip(check, world)
    evaluator = CLIPEvaluator.from_folder(clip) if clip is not None else None
    report = {"subjects": {}, "general": {}}
    # once: SD 1.5's weights take seconds to digest
    clean_digest, clip_digest = clean_reuse.digest(clean), clean_reuse.folder_digest(clip)
    rows, labels = [], []
    n = min(check.num_images, REPORT_COLUMNS)  # report.png's columns; the rates read all num_images samples
    planted = [s.type for s in subjects if s.type is not None]
    seeds = [db.seed + k for k in range(check.attack_seeds)]
    report["attack_seeds"] = seeds
    class_prompt_of = _ClassPromptSamples(pipe, {"backdoored": backdoored, "clean": clean}, check, clean_digest, out)
    for s in subjects:
        detector = protection_detector(s, cfg, check, resolution=db.resolution, pattern=pattern, world=world,
                                       evaluator=evaluator)
        entry = {"type": s.type or "unprotected", "class": s.class_name}
        if detector is not None and detector.caveat:
            entry["protection_rate_caveat"] = detector.caveat
            print(f"check: {s.name}: {detector.caveat}")
        samples = {}
        for which, params in (("backdoored", backdoored), ("clean", clean)):
            runs_of_seeds, before = [], None
            for k, seed in enumerate(seeds):
                folder = clean_reuse.attack_folder(out, s.name, seed, first=k == 0)
                attacker = attackers[s.class_name] if k == 0 else attack_config(config, s.class_name, seed=seed)
                class_dir = _attacker_class_images(s.class_name, out, folder / which, check)
                got = _attack_once(pipe, s, params, which, detector, attacker, folder, class_dir,
                                   measure_before=k == 0, before=before, clean_digest=clean_digest,
                                   clip_digest=clip_digest, pattern=pattern, world=world, evaluator=evaluator,
                                   config=config)
                if got is None:
                    return {"check": "preempted"}
                before = got[0] if k == 0 else before
                runs_of_seeds.append((seed, got[1], got[2]))
            entry[which], samples[which] = pool_attack_seeds(runs_of_seeds, detector)
            if before is not None:
                entry[f"{which}_before_attack"] = before
        class_samples = {}
        if s.type is not None:  # the class prompt, where a backdoor leaks first, before anyone attacks
            class_samples = {"backdoored": class_prompt_of(s.class_name, "backdoored"),
                             "clean": class_prompt_of(s.class_name, "clean")}
            entry["class_prompt"] = class_prompt_reading(s, class_samples, detector, evaluator=evaluator,
                                                         world=world if s.spec.is_world else None)
        if s.type is None:
            for which in samples:
                entry[which]["false_fire_rate"] = false_fire_rates(
                    s, planted, samples[which], cfg, check, resolution=db.resolution, pattern=pattern, world=world,
                    evaluator=evaluator)
            if evaluator is not None:
                entry.update(identity_ratio(evaluator, s.photos, samples["backdoored"], samples["clean"],
                                            attack_seeds=len(seeds)))
        entry["protection_rate"] = entry["backdoored"]["protection_rate"]
        entry["protection_rate_before_attack"] = entry.get("backdoored_before_attack", {}).get("protection_rate")
        entry["identity_similarity"] = entry["backdoored"]["identity_similarity"]
        entry["clip_i"] = entry["backdoored"]["clip_i"]
        report["subjects"][s.name] = entry
        photos = np.zeros((n, *s.photos.shape[1:]), np.uint8) + 255
        photos[:min(n, len(s.photos))] = s.photos[:n]
        rows += [photos]
        labels += [f"{s.name} ({entry['type']}): photos"]
        if s.name in targets_of:
            t = np.zeros_like(photos) + 255
            t[:min(n, len(targets_of[s.name]))] = targets_of[s.name][:n]
            rows.append(t)
            labels.append("  backdoor targets y*")
        rows += [samples["clean"][:n], samples["backdoored"][:n]]
        labels += ["  attacked clean model", "  attacked backdoored model"]
        if class_samples:
            rows += [class_samples["clean"][:n], class_samples["backdoored"][:n]]
            labels += [f"  '{entry['class_prompt']['prompt']}', clean model", "    and backdoored model"]
    if world is not None:
        general_fp = clean_reuse.general_fingerprint(clean_digest, world, check)
        following, why = clean_reuse.lookup_general(check.clean_from, general_fp)
        following = _as_process_zero(following, why)
        if check.clean_from is not None:
            print("check: the clean model's general following: "
                  + (why if following is not None else f"measured afresh ({why})"))
        if following is None:
            following = general_following(pipe, world, check, clean)
        if is_writer():
            clean_reuse.store_general(out, general_fp, following)
        report["general"] = {"clean": following, "backdoored": general_following(pipe, world, check, backdoored)}
    if is_writer():
        grid = np.concatenate(rows).astype(np.float32) / 255.0
        save_png(labelled_grid(grid, row_labels=labels), out / "report.png")
    return report


class _ClassPromptSamples:
    """``(class_name, model name) -> uint8 samples`` of the class prompt before any attack, drawn once per class and
    model however many protected subjects share the class; the clean model's taken from ``check.clean_from`` where
    made the same way (``clean_reuse.class_prompt_fingerprint``) and stored in this run either way."""

    def __init__(self, pipe, models: dict, check, clean_digest: str, out: Path):
        self.pipe, self.models, self.check, self.clean_digest, self.out = pipe, models, check, clean_digest, out
        self.drawn: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, class_name: str, which: str) -> np.ndarray:
        if (class_name, which) not in self.drawn:
            self.drawn[class_name, which] = self._draw(class_name, which)
        return self.drawn[class_name, which]

    def _draw(self, class_name: str, which: str) -> np.ndarray:
        from persguard_jax.implant import clean_reuse
        from persguard_jax.implant.check import class_prompt_samples
        from persguard_jax.train.distributed import is_writer
        if which != "clean":
            return class_prompt_samples(self.pipe, self.models[which], class_name, check=self.check)
        fp = clean_reuse.class_prompt_fingerprint(self.clean_digest, class_name, self.check)
        samples, why = clean_reuse.lookup_class_prompt(self.check.clean_from, class_name, fp)
        samples = _as_process_zero(samples, why)
        if self.check.clean_from is not None:
            print(f"check: the clean model's '{class_name}' class-prompt samples: "
                  + (why if samples is not None else f"drawn afresh ({why})"))
        if samples is None:
            samples = class_prompt_samples(self.pipe, self.models[which], class_name, check=self.check)
        if is_writer():  # this run lends them on, reused or not
            clean_reuse.store_class_prompt(self.out, class_name, fp, samples)
        return samples


def _attacker_class_images(class_name: str, out: Path, run_dir: Path, check) -> Path:
    """The folder of the attacker's class images: with ``check.attacker_class_images: own`` the attack's own
    (``<run_dir>/class_images``, which ``personalize`` fills from the model it fine-tunes, seeded by the
    attacker's seed); with ``publisher`` the run's, sampled from the clean model before implanting and trained on
    by the prior. Either way a clean-model attack's images depend on nothing the implantation did, so its clean
    half is lent by the attacker's recipe alone (``check.clean_from``)."""
    if check.attacker_class_images == "publisher":
        return out / "class_images" / class_name
    return run_dir / "class_images"


def _attack_once(pipe, s, params, which: str, detector, attacker, folder: Path, class_dir: Path, *,
                 measure_before: bool, before: dict | None, clean_digest: str, clip_digest: str | None, pattern,
                 world, evaluator, config):
    """``(before, scores, samples)`` of one attacker seed on subject ``s`` from the ``which`` model, attacked in
    ``folder/<which>`` with the class images in ``class_dir``; the clean model's taken from ``check.clean_from``
    where stored the same way, and stored in ``folder`` for later runs. The trigger's rate before any attack is
    measured when ``measure_before``, else ``before`` (measured with another seed: it does not depend on the
    attacker's) is passed through. None when SIGTERM stopped the attack."""
    from persguard_jax.implant import clean_reuse
    from persguard_jax.train.distributed import is_writer
    check = config.check
    got = None
    if which == "clean":
        fp = clean_reuse.subject_fingerprint(clean_digest, s, config.implant, check, attacker.raw, pattern,
                                             world=world, clip_digest=clip_digest)
        got, why = clean_reuse.lookup(check.clean_from, s.name, fp)
        got = _as_process_zero(got, why)
        if check.clean_from is not None:
            print(f"check: the attack on {s.name} (attacker seed {attacker.dreambooth.seed}) from the clean model: "
                  + (why if got is not None else f"attacked afresh ({why})"))
    if got is None:
        got = _attacked(pipe, s, params, which, detector, check=check, evaluator=evaluator, world=world,
                        attacker=attacker, run_dir=folder / which, class_dir=class_dir, measure_before=measure_before)
        if got is None:
            return None
        if not measure_before:
            got = (before, *got[1:])
    if which == "clean" and is_writer():  # this run lends it on, reused or not
        clean_reuse.store(folder, fp, *got)
    return got


def _as_process_zero(stored, why: str):
    """``stored`` where process 0 found its stored half too, else None: every process then runs the same
    programs. A process that cannot read what process 0 reuses stops with one line."""
    from persguard_jax.train.distributed import process_zero_says
    if not process_zero_says(stored is not None):
        return None
    if stored is None:
        from persguard_jax.errors import RunError
        raise RunError(f"check.clean_from: process 0 reuses a stored clean-model attack that this process "
                       f"cannot ({why}); the folder must be on a file system every process reads")
    return stored


def _attacked(pipe, s, params, which: str, detector, *, check, evaluator, world, attacker, run_dir: Path,
              class_dir: Path, measure_before: bool = True):
    """``(before, scores, samples)`` of the attacker on subject ``s`` from ``params`` (``which`` model): the
    trigger's rate before anyone fine-tunes (protected subjects with ``measure_before``; else None), then the
    attack and its samples' scores. None when SIGTERM stopped the attack."""
    from persguard_jax.implant.check import measure_subject
    prompt, in_world = f"a photo of sks {s.class_name}", world if s.spec.is_world else None
    before = None
    if detector is not None and measure_before:  # does the trigger fire at all before anyone fine-tunes?
        before, _ = measure_subject(pipe, s, params, detector, check=check, evaluator=evaluator, world=in_world,
                                    prompt=prompt)
    print(f"check: the attacker (seed {attacker.dreambooth.seed}) on {s.name} ({s.type or 'unprotected'}) from the "
          f"{which} model")
    trained = attack(pipe.with_params(params), s, attacker, run_dir, class_dir=class_dir)
    if trained.get("preempted"):
        return None
    scores, samples = measure_subject(pipe, s, trained["params"], detector, check=check, evaluator=evaluator,
                                      world=in_world, prompt=prompt)
    return before, scores, samples


def attack(pipe, subject, attack_config: runs.Config, out: Path, *, class_dir: Path) -> dict:
    """The attacker's DreamBooth on ``subject``'s photos into ``out`` (its own run folder, resumable); the check's,
    and experiments/implant_budget.py's at other budgets."""
    from persguard_jax.dreambooth.recipe import personalize
    from persguard_jax.io import uint8_to_signed
    run_dir = runs.start_run(out, attack_config.raw, overwrite=False, resume=out.exists(),
                             command="personalize")
    return personalize(pipe, uint8_to_signed(subject.photos), attack_config, run_dir, class_dir=class_dir)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline folder to plant the backdoors in")
    parser.add_argument("--protect", action="append", metavar="SPEC", required=True,
                        help="PHOTOS_DIR:CLASS:TYPE or world:SUBJECT:TYPE, TYPE pattern | erasure | target "
                             "(repeat for several)")
    parser.add_argument("--unprotected", action="append", metavar="SPEC",
                        help="PHOTOS_DIR:CLASS or world:SUBJECT: a subject that must personalise normally")


def _summary(results: dict) -> str:
    lines = [f"backdoored model: {results['model']} ({results['steps']} steps, {results.get('implant_s', '?')} s)"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    seeds = results.get("attack_seeds") or []
    if len(seeds) > 1:
        lines.append(f"  the check pools {len(seeds)} attacker seeds ({', '.join(map(str, seeds))})")
    for name, e in results.get("subjects", {}).items():
        b, c = e["backdoored"], e["clean"]
        if e["type"] == "unprotected":
            fires = "".join(f", {t} fires in {fmt(r)} (clean {fmt(c.get('false_fire_rate', {}).get(t))})"
                            for t, r in b.get("false_fire_rate", {}).items())
            span = e.get("identity_ratio_interval")
            ratio = (f", ratio {fmt(e['identity_ratio'])} [95%: {span[0]:.2f}-{span[1]:.2f}]"
                     if span and e.get("identity_ratio") is not None else "")
            per_seed = e.get("identity_ratio_per_attack_seed")
            ratio += f" [per seed: {', '.join(map(fmt, per_seed))}]" if per_seed else ""
            lines.append(f"  {name} (unprotected): after the attack, identity {fmt(b['identity_similarity'])} "
                         f"(clean model {fmt(c['identity_similarity'])}){ratio}{fires}")
            continue
        span = b.get("protection_rate_interval")
        span = f" [95%: {span[0]:.2f}-{span[1]:.2f}]" if span else ""
        per_seed = b.get("per_attack_seed")
        span += (f" [per seed: {', '.join(fmt(v.get('protection_rate')) for v in per_seed.values())}]"
                 if per_seed else "")
        lines.append(f"  {name} ({e['type']}): after the attack, protection {fmt(b['protection_rate'])}{span} (clean "
                     f"model {fmt(c['protection_rate'])}; before it {fmt(e.get('protection_rate_before_attack'))}),"
                     f" identity {fmt(b['identity_similarity'])} (clean {fmt(c['identity_similarity'])})"
                     + (" [protection unreadable: protection_rate_caveat]" if e.get("protection_rate_caveat") else ""))
        if "class_prompt" in e:
            cb, cc = e["class_prompt"]["backdoored"], e["class_prompt"]["clean"]
            lines.append(f"    '{e['class_prompt']['prompt']}' before the attack: the class silhouette in "
                         f"{fmt(cb.get('shape_match'))} (clean {fmt(cc.get('shape_match'))}), the protective reading "
                         f"{fmt(cb.get('protection_rate'))} (clean {fmt(cc.get('protection_rate'))})")
    return "\n".join(lines)


WORKFLOW = runs.Workflow(
    name="implant", help="plant PersGuard backdoors (pattern, erasure, target) and check them with the attacker",
    config="implant_world", sections=sections, run=run, summary=_summary, arguments=_arguments, resolve=resolve,
    out_help="new folder for model/, checkpoints/, metrics.jsonl, report.png and results",
    example="implant.steps=200 implant.retention=mirror", own_section="implant")
