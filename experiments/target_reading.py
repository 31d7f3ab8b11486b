"""Re-read finished world implant runs' target subjects with the check's current target detector, beside the
reading the check used before the fortieth session.

    python experiments/target_reading.py RUN [RUN ...] [--sheets DIR] [--general]

For every target subject of each RUN (a finished ``persguard implant`` on the world model; its check keeps each
attacked model), and every unprotected one (how often the target fires on it), every attacker seed's backdoored
model is sampled again exactly as the check samples it (its ``check`` section: ``num_images`` of "a photo of
<identifier> <class>", seed ``check.seed + 100``, ``eval_steps`` DDIM steps, ``eval_guidance``), and two readings
are printed per seed and pooled: ``plain``, the one before (every pixel nearest a palette colour rather than the
plain grey is the object; its silhouette the target's and its dominant colour the target's), and ``now``,
``implant.check.ProtectionDetector`` (the target's colour drawn in its silhouette, backgrounds read as any grey).
The run's own recorded rate is printed beside them: ``plain`` repeats it for runs made before the fortieth session
(a check on the resampling), ``now`` for later ones. ``--sheets``: one PNG per model, the 32 samples with the
``now`` reading's misses framed red, to judge by eye. ``--general``: also each RUN's backdoored model's general
shape following (the check's shape prompts and sampling), read as the check reads it (every non-plain-grey pixel)
and by the prompt colour's own silhouette, with the samples' border median (where their backgrounds sit).
docs/results.md (issue 15, fortieth session).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from persguard_jax.config import read_yaml
from persguard_jax.data.world import COLOURS, parse_caption, world_of
from persguard_jax.evaluate import evaluate_pipeline
from persguard_jax.implant.check import CheckConfig, ProtectionDetector
from persguard_jax.implant.clean_reuse import attack_folders
from persguard_jax.io import save_png, unit_to_uint8
from persguard_jax.metrics import detectors as D
from persguard_jax.models import load_pipeline
from persguard_jax.report import image_grid


def plain_reading(images: np.ndarray, shapes: list[str], target_prompt: str) -> np.ndarray:
    """The target reading before the fortieth session: silhouette and dominant colour of every non-plain-grey
    pixel."""
    want = parse_caption(target_prompt)
    return ((D.detect_shape(images, shapes) == shapes.index(want["shape"]))
            & (D.dominant_colour(images) == list(COLOURS).index(want["colour"])))


def sheet(images: np.ndarray, hits: np.ndarray, path: Path) -> None:
    """The samples in rows of 8 (``report.image_grid``), each framed (2 px) red where the reading misses, grey where
    it hits, three times enlarged."""
    framed = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    border = np.ones(framed.shape[1:3], bool)
    border[2:-2, 2:-2] = False
    framed[:, border] = np.where(hits[:, None, None], (90, 90, 90), (230, 30, 30))
    grid = image_grid(framed.astype(np.float32) / 255.0, ncols=8, pad=0)
    save_png(np.kron(grid, np.ones((3, 3, 1), np.uint8)), path)


def read_run(run: Path, sheets: Path | None) -> None:
    cfg, results = read_yaml(run / "config.yaml"), json.loads((run / "results.json").read_text())
    check, target_prompt = CheckConfig.from_dict(cfg["check"]), cfg["implant"]["target_prompt"]
    if not any(row.get("type") == "target" for row in results["subjects"].values()):
        return
    for name, row in results["subjects"].items():
        if row.get("type") not in ("target", "unprotected"):
            continue
        pooled, what = {"plain": [], "now": []}, "target" if row["type"] == "target" else "fires on the unprotected"
        for k, folder in enumerate(attack_folders(run, name)):
            model = folder / "backdoored" / "model"
            pipe = load_pipeline(model)
            world = world_of(model)
            detector = ProtectionDetector("target", world=world, colour=world.subject(name).colour,
                                          target_prompt=target_prompt)
            ev = evaluate_pipeline(pipe, [f"a photo of {check.identifier} {row['class']}"],
                                   num_images=check.num_images, seed=check.seed + 100, num_steps=check.eval_steps,
                                   guidance_scale=check.eval_guidance, detectors=())
            images = unit_to_uint8(ev.images[0])
            plain, now = plain_reading(images, list(world.shapes), target_prompt), detector(images)
            pooled["plain"].append(plain)
            pooled["now"].append(now)
            seed = str(cfg["dreambooth"]["seed"] + k)
            recorded = ""
            if row["type"] == "target":  # the unprotected subjects' false fires are recorded pooled only
                scores = row["backdoored"].get("per_attack_seed", {}).get(seed, row["backdoored"])
                recorded = f" (recorded {scores['protection_rate']:.2f})"
            print(f"{run.name} {name} ({what}) attack {k}: plain {plain.mean():.2f}{recorded} now {now.mean():.2f}",
                  flush=True)
            if sheets is not None:
                sheet(images, now, sheets / f"{run.name}_{name}_a{k}.png")
        recorded = row["backdoored"].get("false_fire_rate", {}).get("target") if row["type"] != "target" else None
        print(f"{run.name} {name} ({what}) pooled: plain {np.concatenate(pooled['plain']).mean():.2f}"
              + ("" if recorded is None else f" (recorded {recorded:.2f})")
              + f" now {np.concatenate(pooled['now']).mean():.2f}", flush=True)


def read_general(run: Path) -> None:
    """The backdoored model's general shape following (``following.shape_following``, the check's prompts and
    sampling) read as the check reads it and by the prompt colour's own silhouette, and its samples' border
    median."""
    from persguard_jax.following import shape_following, shape_prompts
    model = run / "model"
    pipe, world = load_pipeline(model), world_of(model)
    per_shape = CheckConfig.from_dict(read_yaml(run / "config.yaml")["check"]).per_shape
    images, scores = shape_following(pipe, world, per_shape)
    shapes, pairs = list(world.shapes), shape_prompts(world, per_shape)
    drawn = np.mean([D.detect_shape(x, shapes, background="any", colour=parse_caption(prompt)["colour"])[0]
                     == shapes.index(shape) for x, (shape, prompt) in zip(images, pairs)])
    border = np.concatenate([images[:, :2].reshape(len(images), -1, 3), images[:, -2:].reshape(len(images), -1, 3)], 1)
    print(f"{run.name} general shape: check's reading {scores['shape_accuracy']:.2f}, the prompt colour's "
          f"silhouette {drawn:.2f}; border median {np.round(np.median(border, 1).mean(0)).astype(int).tolist()}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sheets", type=Path, help="folder for one PNG per attacked model")
    parser.add_argument("--general", action="store_true", help="also the backdoored model's general shape following")
    args = parser.parse_args()
    if args.sheets is not None:
        args.sheets.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        read_run(run, args.sheets)
        if args.general:
            read_general(run)


if __name__ == "__main__":
    main()
