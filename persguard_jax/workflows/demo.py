"""``persguard demo``: the main job, end to end on the synthetic world.

1. The world's pre-trained text-to-image model and its CLIP (shipped in ``persguard_jax/assets/``, else cached, else
   trained now: ``workflows.world_assets``).
2. One held-out subject of the world (never seen in pre-training): its photos are written to ``instance/``.
3. Samples before: the instance prompt ("a photo of sks dog") and the class prompt ("a photo of dog").
4. DreamBooth with prior preservation on the photos (``persguard personalize``, shipped config dreambooth_world).
5. The same prompts and seeds after; metrics from the world CLIP (CLIP-I and identity similarity to the photos,
   CLIP-T to the subject's description) and a direct pixel check (how many samples have the subject's colour).
6. The report: ``report.png`` (photos, before/after rows), ``loss.png``, ``results.json`` and ``results.md``.

Every run writes a new folder (``runs/demo``, else ``runs/demo-2``, ...): earlier results are never replaced.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from persguard_jax import resources

DEFAULT_CONFIG = resources.config_path("dreambooth_world")


def fresh_folder(out: str | Path) -> Path:
    """``out`` if it is absent or empty, else the first free ``out-2``, ``out-3``, ..."""
    out = Path(out)
    candidate, n = out, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def pick_subject(world, name: str | None, class_name: str = "dog"):
    """The named subject, or the first held-out member of ``class_name``."""
    if name:
        return world.subject(name)
    return next(s for s in world.subjects if s.class_name == class_name and s.held_out)


def _samples(pipe, prompts: list[str], n: int, cfg) -> np.ndarray:
    from persguard_jax.sample import text_to_image
    images = text_to_image(pipe, [p for p in prompts for _ in range(n)], num_steps=cfg.eval_steps,
                           guidance_scale=cfg.eval_guidance, seed=cfg.seed + 100, progress=False)
    return np.clip(np.asarray(images, np.float32), 0.0, 1.0)


def subject_metrics(evaluator, world, subject, instance_samples: np.ndarray, photos: np.ndarray) -> dict:
    """How much the identifier-prompt samples look like the subject."""
    from persguard_jax.data.world import COLOURS, SceneSpec, dominant_colour
    description = world.caption(SceneSpec(shape=subject.class_name, colour=subject.colour, texture=subject.texture))
    scores = evaluator.evaluate(instance_samples, prompts=description, references=photos / 255.0)
    pixels = (instance_samples * 255).round().astype(np.uint8)
    colour_match = float(np.mean(dominant_colour(pixels, background="any") == list(COLOURS).index(subject.colour)))
    return {"clip_i": scores["clip_i"], "identity_similarity": scores["identity_similarity"],
            "clip_t_subject": scores["clip_t"], "subject_colour_match": colour_match}


def run_demo(out: str | Path = "runs/demo", *, subject: str | None = None, overrides: list[str] = ()) -> dict:
    from persguard_jax import config as cfglib
    from persguard_jax.data.world import save_photos
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.models import load_pipeline
    from persguard_jax.report import labelled_grid, loss_curves, save_png, write_results
    from persguard_jax.workflows.personalize import DreamBoothConfig, personalize
    from persguard_jax.workflows.pretrain import world_of
    from persguard_jax.workflows.world_assets import world_clip, world_model

    t0 = time.time()
    raw = cfglib.load_config(DEFAULT_CONFIG, overrides)
    model_dir, clip_dir = world_model(), world_clip()
    world = world_of(model_dir)
    subj = pick_subject(world, subject)
    run = fresh_folder(out)
    print(f"demo: personalising the world model ({model_dir}) on held-out subject {subj.name} "
          f"({subj.colour} {subj.texture} {subj.class_name}); writing to {run}")
    instance_prompt, class_prompt = world.instance_prompt(subj), world.class_prompt(subj.class_name)
    raw.setdefault("dreambooth", {}).update(instance_prompt=instance_prompt, class_prompt=class_prompt)
    db = DreamBoothConfig.from_dict(raw["dreambooth"])
    photos = world.subject_photos(subj, 5)
    save_photos(photos, run / "instance", prefix=subj.name)

    prompts = [instance_prompt, class_prompt]
    n = db.eval_num_images
    before = _samples(load_pipeline(model_dir), prompts, n, db)
    personalize(model_dir, run / "instance", run / "dreambooth", raw)
    after = _samples(load_pipeline(run / "dreambooth" / "model"), prompts, n, db)

    evaluator = CLIPEvaluator.from_folder(clip_dir)
    results = {"subject": subj.name, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
               "before": subject_metrics(evaluator, world, subj, before[:n], photos),
               "after": subject_metrics(evaluator, world, subj, after[:n], photos)}
    # prior preservation: class-prompt samples should stay the model's own, not turn into the subject
    results["class_prompt_drift_lpips_style"] = float(np.mean(evaluator.paired_distance(before[n:], after[n:])))
    results["class_prompt_drift_pixel_rms"] = float(np.sqrt(np.mean((before[n:] - after[n:]) ** 2)))
    results["class_prompt_subject_colour_match"] = {
        "before": subject_metrics(evaluator, world, subj, before[n:], photos)["subject_colour_match"],
        "after": subject_metrics(evaluator, world, subj, after[n:], photos)["subject_colour_match"]}

    photo_row = np.zeros((n, *photos.shape[1:]), np.float32) + 1.0
    photo_row[: len(photos)] = photos[:n] / 255.0
    rows = [photo_row, before[:n], after[:n], before[n:], after[n:]]
    labels = ["subject photos", f"before: {instance_prompt}", f"after: {instance_prompt}",
              f"before: {class_prompt}", f"after: {class_prompt}"]
    save_png(labelled_grid(np.concatenate(rows), row_labels=labels), run / "report.png")
    loss_curves(run / "dreambooth" / "metrics.jsonl", [["loss", "instance_loss", "prior_loss"]], run / "loss.png",
                smooth=0.6, title="DreamBooth loss")
    results["wall_s"] = round(time.time() - t0, 1)
    results["files"] = {"report": str(run / "report.png"), "loss": str(run / "loss.png"),
                        "model": str(run / "dreambooth" / "model")}
    write_results(run, results, title=f"persguard demo: DreamBooth on world subject {subj.name}")
    return {**results, "run": str(run)}
