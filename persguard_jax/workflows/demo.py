"""``persguard demo``: the main job, end to end on the synthetic world.

1. The world's pre-trained text-to-image model and its CLIP (shipped with the package, else cached, else
   trained now: ``workflows.world_assets``).
2. One held-out subject of the world (never seen in pre-training): its photos are written to ``instance/``.
3. Before: the instance prompt ("a photo of sks dog") and the class prompt ("a photo of dog") sampled and
   measured by the evaluation harness (``persguard_jax.evaluate``: CLIP-I, identity similarity and CLIP-T from the
   world CLIP; the world's colour and shape detectors against the photos).
4. DreamBooth with prior preservation on the photos (the ``personalize`` recipe, shipped config dreambooth_world).
5. After: the same prompts and seeds, sampled from the fine-tuned parameters, measured the same way.
6. The report: ``report.png`` (photos, before/after rows), ``loss.png``, ``results.json`` and ``results.md``.

Every run writes a new folder (``runs/demo``, else ``runs/demo-2``, ...): earlier results are never replaced.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from persguard_jax.workflows import personalize as personalize_wf
from persguard_jax.workflows import runs

# what the summary and the README quote: the instance prompt's likeness to the subject, the class prompt's drift
HEADLINE = ("identity_similarity", "clip_i", "colour_match", "shape_match", "texture_match", "mark_match",
            "subject_match")


def fresh_folder(out: str | Path) -> Path:
    """``out`` if it is absent or empty, else the first free ``out-2``, ``out-3``, ... Every process picks the
    same one (they all look before process 0 creates it)."""
    from persguard_jax.train.distributed import barrier, is_writer
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    candidate, n = out, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    barrier(f"fresh folder {out}")
    if is_writer():
        candidate.mkdir(parents=True, exist_ok=True)
    barrier(f"created {candidate}")
    return candidate


def pick_subject(world, name: str | None, class_name: str = "dog"):
    """The named subject, or the first held-out member of ``class_name``."""
    if name:
        try:
            return world.subject(name)
        except (KeyError, IndexError, ValueError):
            held_out = [s.name for s in world.subjects if s.held_out]
            raise ValueError(f"--subject {name!r}: no such world subject; held-out subjects (never seen in "
                             f"pre-training): {', '.join(held_out[:12])} ...") from None
    return next(s for s in world.subjects if s.class_name == class_name and s.held_out)


def _row(evaluation, prompt: str) -> dict:
    row = next(r for r in evaluation.results["prompts"] if r["prompt"] == prompt)
    return {k: row.get(k) for k in HEADLINE}


def measurement(db, photos: np.ndarray, evaluator, world) -> dict:
    """The keyword arguments of ``evaluate_pipeline`` the demo measures with (seeds fixed by ``db.seed``), so that
    a model trained elsewhere (experiments/reference_dreambooth.py) is measured on the same noise."""
    return dict(references=photos, evaluator=evaluator, world=world, num_images=db.eval_num_images,
                seed=db.seed + 100, num_steps=db.eval_steps, guidance_scale=db.eval_guidance)


def before_after(before, after, evaluator) -> dict:
    """The demo's comparison of two evaluations of [instance prompt, class prompt] on the same noise."""
    instance_prompt, class_prompt = before.prompts
    return {"instance_prompt": instance_prompt, "class_prompt": class_prompt,
            "before": _row(before, instance_prompt), "after": _row(after, instance_prompt),
            # prior preservation: class-prompt samples should stay the model's own, not turn into the subject
            "prior_preservation": {
                "before": _row(before, class_prompt), "after": _row(after, class_prompt),
                "drift_pixel_rms": float(np.sqrt(np.mean((before.images[1] - after.images[1]) ** 2))),
                "drift_lpips_style": float(np.mean(evaluator.paired_distance(before.images[1], after.images[1])))}}


def run_demo(out: str | Path = "runs/demo", *, subject: str | None = None, overrides: list[str] = (),
             config: str | None = None, model: str | Path | None = None, clip: str | Path | None = None) -> dict:
    """DreamBooth on one world subject, measured before and after, into a fresh folder beside ``out``.

    ``model`` / ``clip``: a world model folder (``persguard pretrain``'s ``model/``, with its ``world_config.json``) and
    a world CLIP folder; default the committed ones (``world_assets``)."""
    from persguard_jax import config as cfglib
    from persguard_jax.data.world import WORLD_FILE, is_world_model, save_photos, world_of
    from persguard_jax.evaluate import evaluate_pipeline
    from persguard_jax.io import save_png, uint8_to_signed, uint8_to_unit
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.models import load_pipeline
    from persguard_jax.report import labelled_grid, loss_curves, write_results
    from persguard_jax.resources import config_path
    from persguard_jax.train.distributed import is_writer
    from persguard_jax.workflows.world_assets import world_clip, world_model

    t0 = time.time()
    raw = cfglib.load_config(config_path(config or DEMO.config), overrides)
    model_dir = Path(model) if model is not None else world_model()
    clip_dir = Path(clip) if clip is not None else world_clip()
    if not is_world_model(model_dir):
        raise ValueError(f"{model_dir}: not a world model (no {WORLD_FILE}); the demo needs one made by "
                         "`persguard pretrain` (its model/ folder)")
    world = world_of(model_dir)
    subj = pick_subject(world, subject)
    instance_prompt, class_prompt = world.instance_prompt(subj), world.class_prompt(subj.class_name)
    raw.setdefault("dreambooth", {}).update(instance_prompt=instance_prompt, class_prompt=class_prompt)
    # the subject's photos are drawn at the world's size, so the class images and samples must be too: a world
    # pre-trained at another size than the config's takes its own, and a size the user names must match it
    named = cfglib.apply_overrides({}, overrides).get("dreambooth")
    named = named.get("resolution", world.size) if isinstance(named, dict) else world.size
    if named != world.size:
        raise ValueError(f"dreambooth.resolution={named}: the world model {model_dir} draws its photos at "
                         f"{world.size} px; leave dreambooth.resolution out or set it to {world.size}")
    raw["dreambooth"]["resolution"] = world.size
    settings = runs.parse_config(personalize_wf.resolve(raw), personalize_wf.sections())  # before any work
    db = settings.dreambooth
    pipe, evaluator = load_pipeline(model_dir), CLIPEvaluator.from_folder(clip_dir)  # bad folders: before any output
    run = fresh_folder(out)
    print(f"demo: personalising the world model ({model_dir}) on held-out subject {subj.name} "
          f"({subj.colour} {subj.texture} {subj.class_name}); writing to {run}")
    photos = world.subject_photos(subj, 5)
    if is_writer():
        save_photos(photos, run / "instance", prefix=subj.name)

    prompts = [instance_prompt, class_prompt]
    measure = measurement(db, photos, evaluator, world)
    before = evaluate_pipeline(pipe, prompts, **measure)
    db_run = runs.start_run(run / "dreambooth", settings.raw, overwrite=False, resume=False,
                            command="personalize")
    trained = personalize_wf.personalize(pipe, uint8_to_signed(photos), settings, db_run)
    if trained.get("preempted"):
        return trained
    after = evaluate_pipeline(pipe, prompts, params=trained["params"], **measure)

    results = {"subject": subj.name, **before_after(before, after, evaluator),
               "evaluation": {"before": before.results, "after": after.results},
               "dreambooth": {k: trained[k] for k in ("steps", "final_metrics", "trainable")}}
    if is_writer():
        n = db.eval_num_images
        photo_row = np.ones((n, *photos.shape[1:]), np.float32)
        photo_row[: len(photos)] = uint8_to_unit(photos[:n])
        rows = [photo_row, before.images[0], after.images[0], before.images[1], after.images[1]]
        labels = ["subject photos", f"before: {instance_prompt}", f"after: {instance_prompt}",
                  f"before: {class_prompt}", f"after: {class_prompt}"]
        save_png(labelled_grid(np.concatenate(rows), row_labels=labels), run / "report.png")
        curves = ["loss", "instance_loss", "prior_loss"] if db.use_prior else ["loss"]
        loss_curves(db_run / "metrics.jsonl", [curves], run / "loss.png",
                    smooth=0.6, title="DreamBooth loss")
        results["wall_s"] = round(time.time() - t0, 1)
        results["files"] = {"report": str(run / "report.png"), "loss": str(run / "loss.png"),
                            "model": str(db_run / "model")}
        write_results(run, results, title=f"persguard demo: DreamBooth on world subject {subj.name}")
    return {**results, "run": str(run)}


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    return run_demo(args.out, subject=args.subject, overrides=args.overrides, config=args.config, model=args.model,
                    clip=args.clip)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject", help="world subject to personalise, e.g. dog_04 (default: a held-out dog)")
    parser.add_argument("--model", help="world model folder, e.g. a `persguard pretrain` run's model/ (default: the "
                                        "committed persguard_jax/assets/world_tiny)")
    parser.add_argument("--clip", help="world CLIP folder for the metrics (default: the committed "
                                       "persguard_jax/assets/world_clip)")


def _summary(results: dict) -> str:
    b, a = results["before"], results["after"]
    cb, ca = results["prior_preservation"]["before"], results["prior_preservation"]["after"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"\ndemo done in {results.get('wall_s', 0):.0f} s. Subject {results['subject']}, prompt "
            f"\"{results['instance_prompt']}\":\n"
            f"  identity similarity {fmt(b['identity_similarity'])} -> {fmt(a['identity_similarity'])}, "
            f"CLIP-I {fmt(b['clip_i'])} -> {fmt(a['clip_i'])}, samples in the subject's colour "
            f"{fmt(b['colour_match'])} -> {fmt(a['colour_match'])}, its silhouette "
            f"{fmt(b['shape_match'])} -> {fmt(a['shape_match'])}, texture {fmt(b['texture_match'])} -> "
            f"{fmt(a['texture_match'])}, mark {fmt(b['mark_match'])} -> {fmt(a['mark_match'])}; silhouette, colour "
            f"and texture together {fmt(b['subject_match'])} -> {fmt(a['subject_match'])}\n"
            f"  \"{results['class_prompt']}\" samples in the subject's colour (prior preservation keeps "
            f"this low): {fmt(cb['colour_match'])} -> {fmt(ca['colour_match'])}\n"
            f"report: {results['run']}/results.md, {results['files']['report']}")


DEMO = runs.Workflow(
    name="demo", help="the main job on the built-in synthetic world (DreamBooth before/after)",
    config="dreambooth_world", sections=personalize_wf.sections, run=run, summary=_summary, arguments=_arguments,
    resolve=personalize_wf.resolve, out="runs/demo",
    out_help="report folder (a new one beside it if it is not empty)", example="dreambooth.steps=100",
    resumable=False)
