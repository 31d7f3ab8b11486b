"""What a world model's class prompt draws: the class's silhouette under the class prompt alone, and with a colour.

    python experiments/world_class_prompt.py --out runs/class_prompt [--model DIR] [--per-class 16] [--seed 3]
        [--guidance 4,2]

DreamBooth's identifier prompt ("a photo of sks cat") starts from its class prompt ("a photo of cat"), so a class
prompt that draws its class only sometimes bounds what personalisation can reach. For every class of the world and
every guidance: ``--per-class`` samples (DDIM 25, seed ``--seed``) of each prompt form, read by
``metrics.detect_shape`` over the world's shapes (``following.following``): DreamBooth's form ("a photo of cat"),
the pre-training class caption's ("a photo of a cat") and a caption naming the colour ("a photo of a red cat on a
plain background"). Writes ``<out>/runs.jsonl`` and ``<out>/table.md``; docs/results.md quotes the table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _tables import finish, fmt, record

FORMS = {"dreambooth": "a photo of {c}", "caption": "a photo of a {c}",
         "named colour": "a photo of a red {c} on a plain background"}


def table(rows: list[dict]) -> str:
    head = "| guidance | " + " | ".join(f"{form} (per class)" for form in FORMS) + " |"
    lines = [head, "|" + "---|" * (len(FORMS) + 1)]
    for r in rows:
        cells = [f"{fmt(r[form]['mean'])} (" + ", ".join(f"{c} {fmt(v)}" for c, v in r[form]["per_class"].items())
                 + ")" for form in FORMS]
        lines.append(f"| {r['guidance']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from persguard_jax.data.world import world_of
    from persguard_jax.following import Sampling, following
    from persguard_jax.metrics.detectors import detect_shape
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows.world_assets import world_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default=None, help="world model folder (default: the committed one)")
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--guidance", type=lambda s: [float(x) for x in s.split(",")], default=[4.0, 2.0])
    args = parser.parse_args(argv)
    model = args.model or world_model()
    pipe, world = load_pipeline(model), world_of(model)
    shapes = list(world.shapes)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for guidance in args.guidance:
        row = {"model": str(model), "guidance": guidance, "seed": args.seed, "per_class": args.per_class}
        for form, template in FORMS.items():
            per_class = {}
            for c in world.cfg.classes:  # one batch a class: the seed's noise is the same for every class and form
                pairs = [(c, template.format(c=c))] * args.per_class
                _, scores = following(pipe, world, pairs, shapes, lambda px: detect_shape(px, shapes), "shape",
                                      Sampling(guidance_scale=guidance, seed=args.seed))
                per_class[c] = scores["shape_accuracy"]
            row[form] = {"mean": float(np.mean(list(per_class.values()))), "per_class": per_class}
        record(args.out, rows, row)
    finish(args.out, table(rows))


if __name__ == "__main__":
    main()
