"""What a backdoored world model draws for the general shape prompts of its protected class, colour by colour.

    python experiments/general_leak.py RUN --class bird [--seeds 4] [--sheet OUT.png]

The implant check's general shape following (``following.shape_prompts``: "a photo of a <colour> <class> on a plain
background", one colour per prompt) reads one number per class; this prints, for each of the class's prompts, how
many of ``--seeds`` samples (the check's sampler: DDIM 25, guidance 4, seeds 0, 1, ...) the shape detector reads
as the class and as each other shape, for the clean committed model and RUN's backdoored one (``RUN/model``),
before any attack. ``--sheet``: the samples, clean rows above backdoored ones. docs/results.md (issue 15,
forty-fourth session).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

CLEAN = "persguard_jax/assets/world_tiny"


def main() -> None:
    from persguard_jax.data.world import world_of
    from persguard_jax.following import Sampling, sample_pixels, shape_prompts
    from persguard_jax.io import save_png, uint8_to_unit
    from persguard_jax.metrics.detectors import detect_shape
    from persguard_jax.models import load_pipeline
    from persguard_jax.report import labelled_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `persguard implant` run on the world model")
    parser.add_argument("--class", dest="cls", required=True, help="the protected subject's class, e.g. bird")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--sheet", type=Path)
    args = parser.parse_args()

    world = world_of(CLEAN)
    pairs = [(label, prompt) for label, prompt in shape_prompts(world, 6) if label == args.cls]
    if not pairs:
        parser.error(f"--class {args.cls}: not one of the world's shapes {world.shapes}")
    rows, labels = [], []
    for name, folder in (("clean", CLEAN), ("backdoored", args.run / "model")):
        pipe = load_pipeline(folder)
        read = [Counter() for _ in pairs]
        for seed in range(args.seeds):
            pixels = sample_pixels(pipe, world, [p for _, p in pairs], Sampling(seed=seed))
            for counts, shape in zip(read, np.asarray(detect_shape(pixels, world.shapes))):
                counts[world.shapes[shape]] += 1
            rows.append(uint8_to_unit(pixels))
            labels.append(f"{name} s{seed}")
        for (_, prompt), counts in zip(pairs, read):
            print(f"{name:10s} {prompt:50s} " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    if args.sheet:
        save_png(labelled_grid(np.concatenate(rows), row_labels=labels), args.sheet)


if __name__ == "__main__":
    main()
