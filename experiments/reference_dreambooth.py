"""Our DreamBooth against diffusers' ``examples/dreambooth/train_dreambooth.py``, same recipe, same data, same metrics.

    python experiments/reference_dreambooth.py --script PATH/TO/train_dreambooth.py --out runs/reference \\
        [--subjects dog_00,cat_00] [--seeds 0,1] [--model DIR] [--clip DIR] [key=value ...]

Per subject and seed:
1. ``persguard demo`` (ours: the world recipe ``configs/dreambooth_world.yaml`` with the overrides), which writes
   the subject's photos (``instance/``) and the 50 class images (``dreambooth/class_images/``);
2. diffusers' script on the same world model, photos and class images, its flags taken from the demo's resolved
   config (steps, batch, rate, constant schedule without warm-up, prior weight, text encoder trained or not,
   clipping, weight decay, seed), through ``experiments/reference/run_train_dreambooth.py`` (torchvision stand-in);
   the exact command is kept in ``<run>/reference/command.txt``;
3. the reference's output folder loaded here (``load_pipeline``) and measured exactly as the demo measures ours:
   same prompts, same noise, same detectors and world CLIP; ours loaded there (diffusers' UNet and CLIP text
   model ``from_pretrained``) as a check that the folders are interchangeable.
Writes ``<out>/runs.jsonl`` (a line per run as it finishes) and ``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _tables import finish, fmt, record

HERE = Path(__file__).parent


def reference_flags(db: dict, opt: dict, run: Path, model: Path) -> list[str]:
    """diffusers' flags for the recipe in our resolved config (``dreambooth`` and ``optimizer`` sections)."""
    if opt.get("schedule", "constant") != "constant" or opt.get("warmup_steps", 0):
        raise ValueError("the reference comparison maps only a constant rate without warm-up")
    flags = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(run / "instance"),
             "--instance_prompt", db["instance_prompt"], "--resolution", str(db["resolution"]),
             "--train_batch_size", str(db["batch_size"]), "--max_train_steps", str(db["steps"]),
             "--learning_rate", str(opt["learning_rate"]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
             "--max_grad_norm", str(opt.get("max_grad_norm") or 0.0),
             "--adam_weight_decay", str(opt.get("weight_decay", 0.0)), "--seed", str(db["seed"]),
             "--report_to", "tensorboard", "--output_dir", str(run / "reference")]
    if db["prior_weight"] > 0:
        flags += ["--with_prior_preservation", "--prior_loss_weight", str(db["prior_weight"]),
                  "--class_data_dir", str(run / "dreambooth" / "class_images"), "--class_prompt", db["class_prompt"],
                  "--num_class_images", str(db["num_class_images"])]
    if db["train_text_encoder"]:
        flags.append("--train_text_encoder")
    return flags


def run_reference(script: Path, flags: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "reference" / "run_train_dreambooth.py"), str(script), *flags]
    (out / "command.txt").write_text(" ".join(f"'{c}'" if " " in c else c for c in command) + "\n")
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{script}: exited {done.returncode}; see {out / 'log.txt'}")


def loads_in_diffusers(folder: Path) -> None:
    """Our output read by diffusers and transformers, as the reference reads its own."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    UNet2DConditionModel.from_pretrained(folder / "unet")
    AutoencoderKL.from_pretrained(folder / "vae")
    CLIPTextModel.from_pretrained(folder / "text_encoder")


def measure_reference(ours: dict, run: Path, model: Path, clip: Path | None) -> dict:
    """The reference's output measured as the demo measured ours (same prompts, noise, metrics)."""
    from persguard_jax import config as cfglib
    from persguard_jax.data.world import world_of
    from persguard_jax.evaluate import evaluate_pipeline
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows import personalize as personalize_wf
    from persguard_jax.workflows import runs
    from persguard_jax.workflows.demo import before_after, measurement
    from persguard_jax.workflows.world_assets import world_clip

    settings = runs.parse_config(personalize_wf.resolve(cfglib.read_yaml(run / "dreambooth" / "config.yaml")),
                                 personalize_wf.sections())
    world = world_of(model)
    photos = world.subject_photos(world.subject(ours["subject"]), 5)
    evaluator = CLIPEvaluator.from_folder(clip or world_clip())
    measure = measurement(settings.dreambooth, photos, evaluator, world)
    prompts = [ours["instance_prompt"], ours["class_prompt"]]
    before = evaluate_pipeline(load_pipeline(model), prompts, **measure)
    after = evaluate_pipeline(load_pipeline(run / "reference"), prompts, **measure)
    return {"subject": ours["subject"], **before_after(before, after, evaluator)}


def row(variant: str, result: dict, seed: int) -> dict:
    pp = result["prior_preservation"]
    return {"variant": variant, "subject": result["subject"], "seed": seed, "before": result["before"],
            "after": result["after"], "class_before": pp["before"], "class_after": pp["after"],
            "drift_lpips_style": pp["drift_lpips_style"], "drift_pixel_rms": pp["drift_pixel_rms"]}



def table(rows: list[dict]) -> str:
    lines = ["| recipe | subject | seed | identity | id. colour | id. silhouette | id. subject | class silhouette "
             "| class in subject colour | class drift (LPIPS-style) | class drift (pixel RMS) |",
             "|" + "---|" * 11]
    for r in rows:
        b, a, cb, ca = r["before"], r["after"], r["class_before"], r["class_after"]
        cells = [f"{fmt(x[k])} -> {fmt(y[k])}" for x, y, k in
                 ((b, a, "identity_similarity"), (b, a, "colour_match"), (b, a, "shape_match"),
                  (b, a, "subject_match"), (cb, ca, "shape_match"), (cb, ca, "colour_match"))]
        cells += [fmt(r["drift_lpips_style"]), f"{r['drift_pixel_rms']:.3f}"]
        lines.append(f"| {r['variant']} | {r['subject']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from persguard_jax import config as cfglib
    from persguard_jax.workflows.demo import run_demo
    from persguard_jax.workflows.world_assets import world_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", required=True, type=Path, help="diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clip", type=Path, default=None)
    parser.add_argument("--subjects", type=lambda s: s.split(","), default=["dog_00", "cat_00"], help="comma-separated")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1], help="e.g. 0,1")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both sides (key=value)")
    args = parser.parse_args(argv)
    if not args.script.is_file():
        parser.error(f"--script {args.script}: no such file")
    model = args.model or world_model()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for subject in args.subjects:
        for seed in args.seeds:
            ours = run_demo(args.out / f"{subject}-seed{seed}", subject=subject, model=model, clip=args.clip,
                            overrides=[*args.overrides, f"dreambooth.seed={seed}"])
            run = Path(ours["run"])
            loads_in_diffusers(run / "dreambooth" / "model")
            resolved = cfglib.read_yaml(run / "dreambooth" / "config.yaml")
            run_reference(args.script, reference_flags(resolved["dreambooth"], resolved["optimizer"], run, model),
                          run / "reference")
            reference = measure_reference(ours, run, model, args.clip)
            (run / "reference" / "results.json").write_text(json.dumps(reference, indent=1))
            for variant, result in (("ours", ours), ("diffusers", reference)):
                record(args.out, rows, row(variant, result, seed))
    finish(args.out, table(rows))


if __name__ == "__main__":
    main()
