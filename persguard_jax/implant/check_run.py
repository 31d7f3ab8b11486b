"""The implantation check's run: the white-box attacker on every subject from the backdoored and the clean model,
each protected subject's class prompt before the attack, general following, ``report.png``.

``implant.check`` reads one model's samples (detectors, identity, following); this module decides what is
attacked, at which seeds and into which folders, what is lent by an earlier run (``check.clean_from``,
``implant.clean_reuse``) and what every process does. The attacker itself comes from the command as an
``Attacks`` (its config and its resumable DreamBooth run): run folders are the workflow layer's, so this
library piece is handed them rather than importing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPORT_COLUMNS = 16  # samples shown per row of report.png (32 made a 4,400 px wide sheet)


@dataclass(frozen=True)
class Attacks:
    """The check's attacker, as the command runs it: ``config(class_name, seed)`` its personalisation config
    (``.raw``, ``.dreambooth.seed``), and ``train(pipe, subject, config,
    run_dir, *, class_dir)`` its DreamBooth into its own resumable run folder, returning ``{"params": ...}`` or
    ``{"preempted": True}`` when SIGTERM stopped it."""
    config: Callable[[str, int], Any]
    train: Callable[..., dict]


def check_clip(check, world) -> Path | None:
    """The CLIP folder the check measures with: ``check.clip``, else for a world model the world CLIP made earlier
    (committed or cached; ``persguard train-clip`` makes it); None for photo folders without ``check.clip``."""
    from persguard_jax.metrics import metrics_clip_folder
    return metrics_clip_folder(check.clip, key="check.clip (or check.enabled=false)", world_default=world is not None)


def run(pipe, clean: dict, backdoored: dict, subjects, targets_of: dict[str, np.ndarray], pattern, world, config,
        attacks: Attacks, out: Path) -> dict:
    """The attacker on each subject from both models (``clean`` and ``backdoored`` parameters; ``config`` the
    run's, with its ``check``, ``implant`` and ``dreambooth`` sections) into ``out/check``: ``{"subjects": {name:
    readings}, "general": ..., "attack_seeds": [...]}``, or ``{"check": "preempted"}`` when SIGTERM stopped an
    attack; ``report.png`` in ``out``."""
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
    report["attack_identifier"] = check.identifier
    if check.identifier not in cfg.identifiers:
        print(f"check: the attacker's identifier '{check.identifier}' is none the implantation trained under "
              f"({', '.join(cfg.identifiers)})")
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
                attacker = attacks.config(s.class_name, seed)
                class_dir = _attacker_class_images(s.class_name, out, folder / which, check)
                got = _attack_once(pipe, s, params, which, detector, attacker, folder, class_dir,
                                   measure_before=k == 0, before=before, clean_digest=clean_digest,
                                   clip_digest=clip_digest, pattern=pattern, world=world, evaluator=evaluator,
                                   config=config, attacks=attacks)
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
        following = as_process_zero(following, why)
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
        samples = as_process_zero(samples, why)
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
                 world, evaluator, config, attacks: Attacks):
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
        got = as_process_zero(got, why)
        if check.clean_from is not None:
            print(f"check: the attack on {s.name} (attacker seed {attacker.dreambooth.seed}) from the clean model: "
                  + (why if got is not None else f"attacked afresh ({why})"))
    if got is None:
        got = _attacked(pipe, s, params, which, detector, check=check, evaluator=evaluator, world=world,
                        attacker=attacker, run_dir=folder / which, class_dir=class_dir, measure_before=measure_before,
                        train=attacks.train)
        if got is None:
            return None
        if not measure_before:
            got = (before, *got[1:])
    if which == "clean" and is_writer():  # this run lends it on, reused or not
        clean_reuse.store(folder, fp, *got)
    return got


def as_process_zero(stored, why: str):
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
              class_dir: Path, train: Callable[..., dict], measure_before: bool = True):
    """``(before, scores, samples)`` of the attacker on subject ``s`` from ``params`` (``which`` model): the
    trigger's rate before anyone fine-tunes (protected subjects with ``measure_before``; else None), then the
    attack and its samples' scores. None when SIGTERM stopped the attack."""
    from persguard_jax.implant.check import measure_subject
    from persguard_jax.implant.data import instance_prompt
    prompt, in_world = instance_prompt(s.class_name, check.identifier), world if s.spec.is_world else None
    before = None
    if detector is not None and measure_before:  # does the trigger fire at all before anyone fine-tunes?
        before, _ = measure_subject(pipe, s, params, detector, check=check, evaluator=evaluator, world=in_world,
                                    prompt=prompt)
    print(f"check: the attacker (seed {attacker.dreambooth.seed}) on {s.name} ({s.type or 'unprotected'}) from the "
          f"{which} model")
    trained = train(pipe.with_params(params), s, attacker, run_dir, class_dir=class_dir)
    if trained.get("preempted"):
        return None
    scores, samples = measure_subject(pipe, s, trained["params"], detector, check=check, evaluator=evaluator,
                                      world=in_world, prompt=prompt)
    return before, scores, samples
