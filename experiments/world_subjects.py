"""Personalisation on several held-out world subjects: ``persguard demo`` per subject and seed, one table.

    python experiments/world_subjects.py --out runs/subjects [--model DIR] [--clip DIR]
        [--subjects dog_00,cat_00,...] [--seeds 0,1] [key=value ...]

Default subjects: the first held-out member of every class (never seen in pre-training). For each run the
identifier prompt's samples before -> after (silhouette, colour, texture, all three together, mark) and the class
prompt's (its silhouette: the class still drawn; ``subject_match``: samples that became the subject; the
LPIPS-style drift from the base model's samples). Writes ``<out>/runs.jsonl`` (one line per run, appended as each
finishes) and ``<out>/table.md``; docs/results.md quotes the table with this command.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _tables import finish, fmt, record

COLUMNS = ("shape_match", "colour_match", "texture_match", "subject_match", "mark_match")



def row(result: dict, seed: int) -> dict:
    pp = result["prior_preservation"]
    return {"subject": result["subject"], "seed": seed, "before": result["before"], "after": result["after"],
            "class_before": pp["before"], "class_after": pp["after"], "drift_lpips_style": pp["drift_lpips_style"]}


def table(rows: list[dict]) -> str:
    head = ("| subject | seed | " + " | ".join(f"id. {c.removesuffix('_match')}" for c in COLUMNS)
            + " | class silhouette | class = subject | class drift |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b, a, cb, ca = r["before"], r["after"], r["class_before"], r["class_after"]
        cells = [f"{fmt(b[c])} -> {fmt(a[c])}" for c in COLUMNS]
        cells += [f"{fmt(cb['shape_match'])} -> {fmt(ca['shape_match'])}",
                  f"{fmt(cb['subject_match'])} -> {fmt(ca['subject_match'])}", fmt(r["drift_lpips_style"])]
        lines.append(f"| {r['subject']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from persguard_jax.data.world import world_of
    from persguard_jax.workflows.demo import run_demo
    from persguard_jax.workflows.world_assets import world_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--clip", default=None)
    parser.add_argument("--subjects", type=lambda s: s.split(","), default=None, help="comma-separated")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0], help="e.g. 0,1")
    parser.add_argument("overrides", nargs="*", help="demo config overrides (key=value)")
    args = parser.parse_args(argv)
    world = world_of(args.model or world_model())
    subjects = args.subjects or [next(s for s in world.subjects if s.class_name == c and s.held_out).name
                                 for c in world.cfg.classes]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for subject in subjects:
        for seed in args.seeds:
            result = run_demo(args.out / f"{subject}-seed{seed}", subject=subject, model=args.model, clip=args.clip,
                              overrides=[*args.overrides, f"dreambooth.seed={seed}"])
            record(args.out, rows, row(result, seed))
    finish(args.out, table(rows))


if __name__ == "__main__":
    main()
