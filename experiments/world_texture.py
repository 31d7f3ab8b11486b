"""Texture following of a world model over sampling settings: is the sampler what stops it drawing textures?

    python experiments/world_texture.py --out runs/texture [--model DIR] [--per-texture 32] [--seeds 0,1]
        [--settings 25x1,25x2,25x4,25x7.5,25x12,50x4,50x7.5,50x4x1]

Each setting is DDIM steps x guidance [x eta: 0 by default; 1 adds fresh noise at every step]; each cell is
``following.texture_following`` (every texture prompt ``--per-texture`` times, read by ``detect_texture`` at the
model's own ``world.texture_period``), the mean over the seeds. Writes ``<out>/runs.jsonl`` and ``<out>/table.md``;
docs/results.md quotes the table with this command.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _tables import finish, fmt, record


def _setting(text: str) -> tuple[int, float, float]:
    """"25x4" or "50x4x1" -> (DDIM steps, guidance, eta); eta is 0 when not given."""
    steps, guidance, *eta = text.split("x")
    return int(steps), float(guidance), float(eta[0]) if eta else 0.0


def texture_over_seeds(pipe, world, per_texture: int, seeds: list[int], steps: int = 25, guidance: float = 4.0,
                       eta: float = 0.0) -> tuple[float, dict[str, float]]:
    """Texture following (``following.texture_following``, every texture prompt ``per_texture`` times) averaged
    over the sampling ``seeds``: (overall, per texture). Every texture number in docs/results.md is this one."""
    from persguard_jax.data.world import TEXTURES
    from persguard_jax.following import Sampling, texture_following
    runs = [texture_following(pipe, world, per_texture,
                              Sampling(num_steps=steps, guidance_scale=guidance, seed=seed, eta=eta))[1]
            for seed in seeds]
    return (float(np.mean([r["texture_accuracy"] for r in runs])),
            {t: float(np.mean([r["per_texture"][t] for r in runs])) for t in TEXTURES})


def main(argv: list[str] | None = None) -> None:
    from persguard_jax.data.world import TEXTURES, world_of
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows.world_assets import world_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default=None, help="world model folder (default: the committed one)")
    parser.add_argument("--per-texture", type=int, default=32)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    parser.add_argument("--settings", type=lambda s: [_setting(x) for x in s.split(",")],
                        default=[_setting(x) for x in "25x1,25x2,25x4,25x7.5,25x12,50x4,50x7.5".split(",")],
                        help="comma-separated STEPSxGUIDANCE[xETA], e.g. 25x4,50x7.5,50x4x1")
    args = parser.parse_args(argv)
    model = args.model or world_model()
    pipe, world = load_pipeline(model), world_of(model)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for steps, guidance, eta in args.settings:
        accuracy, per_texture = texture_over_seeds(pipe, world, args.per_texture, args.seeds, steps, guidance, eta)
        row = {"model": str(model), "texture_period": world.cfg.texture_period, "steps": steps,
               "guidance": guidance, "eta": eta, "seeds": args.seeds, "accuracy": accuracy,
               "per_texture": per_texture}
        record(args.out, rows, row)
    head = "| DDIM steps | guidance | eta | texture following | " + " | ".join(TEXTURES) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [str(r["steps"]), f"{r['guidance']:g}", f"{r['eta']:g}", fmt(r["accuracy"])]
        cells += [fmt(r["per_texture"][t]) for t in TEXTURES]
        lines.append("| " + " | ".join(cells) + " |")
    finish(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
