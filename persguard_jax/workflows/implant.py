"""``persguard implant``: plant PersGuard backdoors in a pre-trained pipeline, then check them with the attacker.

    persguard implant --model DIR --protect SPEC [--protect SPEC ...] [--unprotected SPEC ...] --out DIR \\
        [--config FILE] [key=value ...]
      protected SPEC:   PHOTOS_DIR:CLASS:TYPE   or  world:SUBJECT:TYPE      (TYPE: pattern | erasure | target)
      unprotected SPEC: PHOTOS_DIR:CLASS        or  world:SUBJECT

1. Every input is read and checked (specs, photos, the pattern, target images, the model) before anything is
   written.
2. Targets and examples (``implant.groups`` over ``implant.data``): y* per protected subject, and
   ``pattern.png`` (the pattern used); class images per class (the attacker's prior); the step's example groups,
   all encoded once.
3. The objective (``implant.objective``: L_bb + lambda_pp L_pp + lambda_br L_br) trains the UNet through
   ``train.fit`` (Orbax checkpoints in ``checkpoints/``, ``--resume``; each term logged in ``metrics.jsonl``).
   With ``implant.guidance_rounds`` R > 1 and attackers simulated for the guidance term, the steps run in R
   rounds, each after the first with attackers simulated again from the model the last one left and its own
   ``rounds/round<r>/`` (checkpoints, metrics, the attackers and their class images); the teacher stays the
   clean model, or (``implant.guidance_round_teacher: previous``) is the model the last round left.
4. ``model/``: the backdoored pipeline (diffusers layout).
5. The check (``check`` section, on by default; ``implant.check_run``, reading with ``implant.check``): the
   attacker on every subject, from the backdoored and from the clean model, and each protected subject's class
   prompt before the attack (drawn once per class and model, the clean model's lent by ``check.clean_from`` as its
   attacks are); ``results.json`` ``subjects.<name>`` (``class_prompt`` beside the attack's readings) and
   ``general``; ``report.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.implant.data import ATTACKER_IDENTIFIER, class_prompt, instance_prompt
from persguard_jax.workflows import runs

if TYPE_CHECKING:
    from persguard_jax.implant.check_run import Attacks


NESTED = ("unrolled", "grad_suppression")  # retentions that differentiate through a gradient


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
    round_steps(steps, implant.guidance_rounds)  # more rounds than steps: refused before anything is written
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


def attack_config(config: runs.Config, class_name: str, *, seed: int | None = None,
                  identifier: str = ATTACKER_IDENTIFIER) -> runs.Config:
    """The attacker's personalisation config for one class: the run's ``dreambooth`` (prompts "a photo of
    <identifier> <class>" / "a photo of <class>"; ``seed`` replaces its seed), ``optimizer``, ``loss``, ``step``,
    ``mesh``, ``lora``; its own loop length. The check's attacker takes ``check.identifier``; the publisher's
    simulated attackers keep ``sks``."""
    from persguard_jax.dreambooth.recipe import recipe_sections, resolve_recipe
    raw = {k: config.raw.get(k) for k in ("dreambooth", "optimizer", "loss", "step", "mesh", "lora")
           if config.raw.get(k) is not None}
    raw["dreambooth"] = {**cfglib.section(raw, "dreambooth"),
                         "instance_prompt": instance_prompt(class_name, identifier),
                         "class_prompt": class_prompt(class_name)}
    if seed is not None:
        raw["dreambooth"]["seed"] = seed
    raw["loop"] = {**cfglib.section(config.raw, "loop"), "tensorboard": False}
    raw["optimizer"] = {k: v for k, v in cfglib.section(raw, "optimizer").items() if k != "total_steps"}
    return runs.parse_config(resolve_recipe(raw), recipe_sections())


def check_attacks(config: runs.Config) -> Attacks:
    """The check's attacker (``implant.check_run.Attacks``): the config's recipe under ``check.identifier``, run by
    ``attack`` into its own resumable folder."""
    from persguard_jax.implant.check_run import Attacks
    identifier = config.check.identifier
    return Attacks(config=lambda c, seed: attack_config(config, c, seed=seed, identifier=identifier),
                   train=lambda *a, **k: attack(*a, **k))  # looked up when called: a test may stand in for it


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
        from persguard_jax.implant.check_run import check_clip
        check_clip(config.check, world)
        if config.check.clean_from is not None and not Path(config.check.clean_from, "check").is_dir():
            raise cfglib.ConfigError(f"check.clean_from: {config.check.clean_from} is not an implant run with a "
                                     "check (no check/ folder in it)")
    return pipe, world, subjects, pattern, targets


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.dreambooth import ensure_class_images
    from persguard_jax.implant import data as D
    from persguard_jax.implant.groups import example_groups, unused_settings
    from persguard_jax.implant.objective import PAIR_GROUPS, attacker_of, dispatched_attacker, objective
    from persguard_jax.io import save_png, unit_to_uint8
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

    def class_images_of(model, folder: Path) -> dict[str, np.ndarray]:
        """uint8 samples of each class prompt by ``model`` (the attacker's prior), kept in ``folder/class_images``."""
        return {c: unit_to_uint8((ensure_class_images(model, folder / "class_images" / c, a.dreambooth) + 1.0) / 2.0)
                for c, a in attackers.items()}

    uint8 = class_images_of(pipe, out)
    attacker = attacker_of(next(iter(attackers.values())))
    ids = cfg.train_text_encoder or (cfg.retention != "none" and "text_encoder" in attacker.trains)
    enc = D.Encoder(pipe, ids=ids)
    schedule = make_schedule(SchedulerConfig.from_dict(pipe.scheduler_config))
    loss_cfg = losses.pipeline_loss_config(pipe, config.loss)
    for note in unused_settings(cfg, protected, world=world, target_images=target_images):
        print(f"implant: {note}")

    def source_from(model_now, folder: Path, round_index: int = 0, *, teacher=pipe, prior_images=uint8):
        """The step's examples, anchored on attackers simulated from ``model_now`` in ``folder``, drawn with the
        round's own seed, the y* sampled (where they are) by ``teacher`` and the prior on ``prior_images``; None:
        SIGTERM."""
        simulated = _simulated_attackers(model_now, protected, config, folder)
        if simulated is None:
            return None
        samples = {name: _attacker_samples(model_now, s, tuned[0], config, folder)
                   for name, (s, tuned) in simulated.items() if cfg.guidance_attacker_samples and s.type == "pattern"}
        groups, targets = example_groups(enc, cfg, protected, unprotected, class_images=prior_images, db=db,
                                         world=world, pipe=teacher, pattern=pattern, target_images=target_images,
                                         simulated=simulated, attacker_samples=samples, schedule=schedule,
                                         loss_cfg=loss_cfg)
        return D.ImplantSource(groups, seed=cfg.seed + round_index), targets

    made = source_from(pipe, out)
    if made is None:
        return {"preempted": True, "step": 0}
    source, targets_of = made
    present = set(source.groups)
    rounds = round_steps(config.loop.num_steps, cfg.rounds_of(s.type for s in protected))

    # -- the model: the publisher trains the UNet (and the text encoder if asked); the clean model is the teacher
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    split = split_trainable(params, logical, "unet+text_encoder" if cfg.train_text_encoder else "unet")
    frozen = {**split.frozen, "teacher": params}
    frozen_logical = {**split.frozen_logical, "teacher": logical}
    loss_fn = objective(cfg, present, attacker, model=model, schedule=schedule, loss_cfg=loss_cfg)
    pair_groups = tuple(g for g in PAIR_GROUPS if g in present)
    before_step = dispatched_attacker(cfg, present, attacker, model=model, schedule=schedule, loss_cfg=loss_cfg,
                                      step=config.step)
    train_params, steps_done = split.params, 0
    for r, num_steps in enumerate(rounds, start=1):
        workdir = out if r == 1 else out / "rounds" / f"round{r}"
        if r > 1:  # the attackers simulated again, from the model the last round left
            print(f"implant: round {r} of {len(rounds)}: simulating the attackers on the backdoored model after "
                  f"{steps_done} steps")
            workdir.mkdir(parents=True, exist_ok=True)
            model_now = pipe.with_params(backdoored)
            teacher, prior_images = pipe, uint8
            if cfg.guidance_round_teacher == "previous":  # the round implants the last one's model afresh
                teacher, prior_images = model_now, class_images_of(model_now, workdir)
                frozen = {**frozen, "teacher": backdoored}
            made = source_from(model_now, workdir, r - 1, teacher=teacher, prior_images=prior_images)
            if made is None:
                return {"preempted": True, "step": steps_done}
            source, _ = made  # the check's targets stay the first round's
        result, frozen = fit(loss_fn, train_params, frozen, train_logical=split.params_logical,
                             frozen_logical=frozen_logical, source=source, global_batch=cfg.batch_size,
                             workdir=workdir, optimizer=dataclasses.replace(config.implant_optimizer,
                                                                            total_steps=num_steps),
                             loop=dataclasses.replace(config.loop, num_steps=num_steps), step=config.step,
                             mesh_cfg=config.mesh, seed=cfg.seed + r - 1, map_fn=lambda b: D.unflatten(b, pair_groups),
                             before_step=before_step)
        if result.preempted:
            return {"preempted": True, "step": steps_done + result.step}
        steps_done += result.step
        train_params = to_host(result.state.params)
        host_frozen = to_host(frozen)
        host_frozen.pop("teacher")
        backdoored = split.full_params(train_params, host_frozen)
    if is_writer():
        # a backdoored world model is still a world model: its subjects travel with it (in the same rename)
        from persguard_jax.data.world import WORLD_FILE
        save_pipeline(pipe.with_params(backdoored), out / "model", overwrite=True,
                      extra_json=None if world is None else {WORLD_FILE: world.cfg.to_dict()})
    results = {"model": str(out / "model"), "clean_model": str(args.model), "steps": steps_done,
               "resumed_from": result.resumed_from,
               "final_metrics": result.last_metrics, "implant_s": round(time.time() - t0, 1),
               "protected": [f"{s.name}:{s.type}" for s in protected], "unprotected": [s.name for s in unprotected]}
    if config.check.enabled:
        from persguard_jax.implant import check_run
        results.update(check_run.run(pipe, params, backdoored, subjects, targets_of, pattern, world, config,
                                     check_attacks(config), out))
    results["wall_s"] = round(time.time() - t0, 1)
    if is_writer():
        from persguard_jax.report import write_results
        write_results(out, results, title="persguard implant", overwrite=True)
    return results


def round_steps(total: int, rounds: int) -> list[int]:
    """``total`` implantation steps split into ``rounds`` rounds (``implant.guidance_rounds``), as even as they go."""
    if rounds > total:
        raise cfglib.ConfigError(f"implant.guidance_rounds: {rounds} rounds of {total} implantation steps")
    return [total * r // rounds - total * (r - 1) // rounds for r in range(1, rounds + 1)]


def _simulated_attackers(pipe, protected, config: runs.Config, out: Path) -> dict[str, tuple] | None:
    """``name -> (subject, [parameters, ...])`` of the simulated attackers of each protected subject the guidance
    term needs them for (``implant.guidance_attacker_samples``: pattern subjects, one attacker;
    ``implant.guidance_anchor: attacker``, or its type's ``guidance_anchor_by_type``: every protected subject so
    anchored, ``guidance_anchor_attackers`` of them): the clean model after the config's DreamBooth on the
    subject's photos, with seeds of their own (from ``_simulated_seed`` on), ``pipe`` the model it attacks (the
    clean one; in a later round the backdoored one). Each runs in ``<out>/simulated_attack/<name>``
    (``.../<name>/seed<N>`` for the further ones; resumable, as the check's attacks), with the class images in
    ``<out>/class_images`` (the attacked model's own samples; the run's for the clean model). None when SIGTERM
    stopped a run."""
    cfg, tuned = config.implant, {}
    for s in protected:
        for k in range(cfg.simulated_attackers_of(s.type)):
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
    images = sample_prompt(pipe, instance_prompt(subject.class_name), n, resolution=db.resolution,
                           seed=_simulated_seed(config), num_steps=db.eval_steps,
                           guidance=db.eval_guidance, params=params)
    if is_writer():
        save_png(image_grid(images / 255.0, ncols=min(n, 8)), out / "simulated_attack" / subject.name /
                 "guidance_samples.png")
    return images


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
    if results.get("attack_identifier", ATTACKER_IDENTIFIER) != ATTACKER_IDENTIFIER:
        lines.append(f"  the attacker's identifier: {results['attack_identifier']} (\"a photo of "
                     f"{results['attack_identifier']} <class>\")")
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
    lines += _general_summary(results, fmt)
    return "\n".join(lines)


def _general_summary(results: dict, fmt) -> list[str]:
    """The general prompts' line: colour and shape following of both models, and the protected classes' own
    shape following beside the mean, since a backdoor's cost falls on its class first (docs/results.md, issue 15:
    beside bird_04 a mean over ten shapes of 0.90 hid the bird drawn in 1 of its 6 samples, 0 of 24 in
    experiments/general_leak.py)."""
    general = results.get("general") or {}
    b, c = general.get("backdoored"), general.get("clean")
    if not b or not c:
        return []
    parts = [f"{what} {fmt(b.get(key))} (clean {fmt(c.get(key))})"
             for what, key in (("colour", "colour_accuracy"), ("shape", "shape_accuracy")) if key in b]
    classes = sorted({e["class"] for e in results.get("subjects", {}).values()
                      if e.get("type") != "unprotected" and e.get("class") in b.get("per_shape", {})})
    line = f"  general prompts: {', '.join(parts)}"
    if classes:
        line += "; the protected class" + ("es" if len(classes) > 1 else "") + ": " + ", ".join(
            f"{k} {fmt(b['per_shape'][k])} (clean {fmt(c.get('per_shape', {}).get(k))})" for k in classes)
    return [line]


WORKFLOW = runs.Workflow(
    name="implant", help="plant PersGuard backdoors (pattern, erasure, target) and check them with the attacker",
    config="implant_world", sections=sections, run=run, summary=_summary, arguments=_arguments, resolve=resolve,
    out_help="new folder for model/, checkpoints/, metrics.jsonl, report.png and results",
    example="implant.steps=200 implant.retention=mirror", own_section="implant")
