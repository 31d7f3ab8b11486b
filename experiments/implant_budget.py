"""Attack budget of planted backdoors: the protection rate after the attacker's DreamBooth of each length and rate.

    python experiments/implant_budget.py --run runs/ablation/none --out runs/budget/none \\
        [--steps 0,25,50,100,200] [--lrs 2e-4] [--guidance 4] [--clean]

``--run`` is a finished ``persguard implant`` run (its ``config.yaml``, ``model/``, ``results.json``, class
images). For each protected subject and each (steps, learning rate) the attacker of the run's config (the
``dreambooth`` + ``optimizer`` sections, ``sks`` identifier; only ``dreambooth.steps`` and
``optimizer.learning_rate`` changed) fine-tunes the backdoored model on the subject's photos, and the run's own
detector and sampler measure "a photo of sks <class>": protection rate and identity similarity. Steps 0 is the
backdoored model as published. ``--guidance`` samples each attacked model at several classifier-free guidance
scales (the attacker chooses it; the check's ``eval_guidance`` by default). ``--clean`` measures the clean model
(the run's ``--model``) the same way, the floor each rate is read against. World runs only: the subjects are
rebuilt from their names. Writes ``<out>/<subject>/<model>_s<steps>_lr<lr>/`` (the attacks),
``<out>/runs.jsonl`` (a line per measurement as it ends) and ``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from _tables import finish, fmt, record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="a finished persguard implant run folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", default="0,25,50,100,200", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--lrs", default=None, type=lambda s: [float(x) for x in s.split(",")],
                   help="attacker learning rates (default: the run's optimizer.learning_rate)")
    p.add_argument("--guidance", default=None, type=lambda s: [float(x) for x in s.split(",")],
                   help="sampling guidance scales (default: the run's check.eval_guidance)")
    p.add_argument("--clean", action="store_true", help="also attack the clean model (the run's --model)")
    return p.parse_args(argv)


def table(rows: list[dict]) -> str:
    lines = ["| subject (type) | model | attacker lr | steps | guidance | protection rate | identity similarity |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['subject']} ({r['type']}) | {r['model']} | {r['lr']:g} | {r['steps']} | "
                     f"{r['guidance']:g} | {fmt(r['protection_rate'])} | {fmt(r['identity_similarity'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    from persguard_jax import config as cfglib
    from persguard_jax.data.world import is_world_model, world_of
    from persguard_jax.implant.check import measure_subject, protection_detector
    from persguard_jax.implant.check_run import check_clip
    from persguard_jax.implant.data import read_pattern, read_subject
    from persguard_jax.implant.specs import parse_subjects
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows import implant as W
    from persguard_jax.workflows import runs

    raw = cfglib.read_yaml(args.run / runs.RUN_FILE)
    config = runs.parse_config(raw, W.sections())
    results = json.loads((args.run / "results.json").read_text())
    clean_dir = Path(results.get("clean_model") or "")
    models = {"backdoored": args.run / "model"}
    if args.clean:
        from persguard_jax.workflows.world_assets import world_model
        models["clean"] = clean_dir if clean_dir.is_dir() else world_model()
    if not is_world_model(models["backdoored"]):
        raise SystemExit(f"{models['backdoored']}: not a world model (no world_config.json); implant_budget.py "
                         "rebuilds world subjects only")
    world = world_of(models["backdoored"])
    cfg, db, check = config.implant, config.dreambooth, config.check
    specs, _ = parse_subjects([f"world:{p}" for p in results["protected"]], [])
    subjects = [read_subject(s, world=world, resolution=db.resolution, num_photos=cfg.num_photos) for s in specs]
    pattern = read_pattern(cfg, db.resolution) if any(s.type == "pattern" for s in subjects) else None
    clip = check_clip(check, world)
    evaluator = CLIPEvaluator.from_folder(clip) if clip is not None else None
    lrs = args.lrs or [config.optimizer.learning_rate]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for which, model_dir in models.items():
        pipe = load_pipeline(model_dir)
        for s in subjects:
            detector = protection_detector(s, cfg, check, resolution=db.resolution, pattern=pattern, world=world,
                                           evaluator=evaluator)
            for lr in lrs:
                for steps in args.steps:
                    params = None
                    if steps:
                        attack_raw = {**raw, "dreambooth": {**raw["dreambooth"], "steps": steps},
                                      "optimizer": {**raw["optimizer"], "learning_rate": lr}}
                        attacker = W.attack_config(runs.Config(attack_raw, {}), s.class_name)
                        trained = W.attack(pipe, s, attacker, args.out / s.name / f"{which}_s{steps}_lr{lr:g}",
                                           class_dir=args.run / "class_images" / s.class_name)
                        params = trained["params"]
                    for g in args.guidance or [check.eval_guidance]:
                        scores, _ = measure_subject(pipe, s, params, detector, check=replace(check, eval_guidance=g),
                                                    evaluator=evaluator, world=world,
                                                    prompt=f"a photo of sks {s.class_name}")
                        record(args.out, rows, {"subject": s.name, "type": s.type, "model": which, "lr": lr,
                                                "steps": steps, "guidance": g, **scores})
    finish(args.out, table(rows))


if __name__ == "__main__":
    main()
