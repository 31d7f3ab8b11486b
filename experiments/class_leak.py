"""Where a backdoor leaks into its class prompt: which branch carries it, and which class samples it takes.

    python experiments/class_leak.py --class bird --clean persguard_jax/assets/world_tiny \
        --models runs/RUN/model [runs/RUN2/model ...] [--num 48] [--seed 5]

For the clean model and each backdoored one (world models), ``--num`` samples on one noise seed of:
"a photo of <class>" at guidance 1 (the conditional branch alone), the same at guidance 4 (the implant check's),
and "" (the unconditional branch); a sample counts as leaked where ``metrics.object_fraction`` (plain background)
is over 0.15, which flags an erasure's garish backgrounds (and a few large objects: read the clean model's row
as the floor). Then, on twice ``--num`` noises, the clean model's sample at each noise by its dominant colour
against whether each backdoored model's is leaked: which of the class's look-alikes the shift trips.
Prints the rows of docs/results.md's twenty-sixth measurement; writes nothing.
"""
from __future__ import annotations

import argparse
import functools
from collections import Counter

import numpy as np


@functools.cache
def _pipeline(folder: str):
    from persguard_jax.models import load_pipeline
    return load_pipeline(folder)


def _samples(folder: str, prompt: str, n: int, *, guidance: float, seed: int) -> np.ndarray:
    from persguard_jax.evaluate import sample_prompt
    from persguard_jax.io import unit_to_uint8
    return unit_to_uint8(sample_prompt(_pipeline(folder), prompt, "", n, seed=seed, num_steps=25,
                                       guidance_scale=guidance))


def _leaked(images: np.ndarray) -> np.ndarray:
    from persguard_jax.metrics.detectors import object_fraction
    return object_fraction(images, background="plain") > 0.15


def main(argv: list[str] | None = None) -> None:
    from persguard_jax.data.world import COLOURS
    from persguard_jax.metrics.detectors import dominant_colour
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--class", dest="class_name", required=True, help="the protected subject's class")
    parser.add_argument("--clean", required=True, help="the clean world model folder")
    parser.add_argument("--models", nargs="+", required=True, help="backdoored model folders (a run's model/)")
    parser.add_argument("--num", type=int, default=48)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    prompt = f"a photo of {args.class_name}"
    print(f"leaked samples of {args.num}: '{prompt}' at guidance 1 | at guidance 4 | '' (guidance 1)")
    for folder in [args.clean, *args.models]:
        counts = [int(_leaked(_samples(folder, p, args.num, guidance=w, seed=args.seed)).sum())
                  for p, w in ((prompt, 1.0), (prompt, 4.0), ("", 1.0))]
        print(f"  {folder}: " + " | ".join(map(str, counts)), flush=True)
    n, names = 2 * args.num, list(COLOURS)
    clean = _samples(args.clean, prompt, n, guidance=4.0, seed=args.seed + 2)
    colours = [names[k] if k >= 0 else "none" for k in dominant_colour(clean)]
    by = Counter(colours)
    print(f"'{prompt}' at guidance 4 on {n} noises: the clean model's colour there, leaked / drawn in that colour")
    for folder in args.models:
        leak = _leaked(_samples(folder, prompt, n, guidance=4.0, seed=args.seed + 2))
        hit = Counter(c for c, bad in zip(colours, leak) if bad)
        print(f"  {folder}: {int(leak.sum())} of {n}: "
              + ", ".join(f"{c} {hit[c]}/{by[c]}" for c in sorted(by, key=lambda c: -by[c])), flush=True)


if __name__ == "__main__":
    main()
