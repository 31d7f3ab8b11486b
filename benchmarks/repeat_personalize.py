"""Several DreamBooth runs in one process (the implant check's attackers, an experiment's subject loop): the time
of each run, with ``fit``'s step cache (``train.step_cache``: a later run of the same recipe reuses the jitted
step) and without it (the cache cleared before each run: the step traced, lowered and compiled again).

Model: the world model (``persguard_jax/assets/world_tiny``), its recipe (``configs/dreambooth_world.yaml``) at
``--steps`` steps, a different held-out subject and seed per run, sampling cut to 2 images of 5 steps. The class
images are drawn once before the timed runs, so every run does the same work. JAX's persistent compilation cache
is off unless ``--persistent-cache DIR`` (the commands turn it on: runtime.py), which shortens the uncached runs to
tracing, lowering and reading the executable back.

Run::

    .venv/bin/python benchmarks/repeat_personalize.py --json
    .venv/bin/python benchmarks/repeat_personalize.py --json --persistent-cache /tmp/jcc

``later_without_s`` / ``later_with_s``: the mean of the runs after the first of each mode; the first run of the
cached mode is the one that builds the step. Which mode runs first: ``--order``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, load_avg_1min, versions

SUBJECTS = ("dog_00", "cat_00", "dog_04", "bird_00", "person_00", "cat_04")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per mode (at most 6 subjects)")
    p.add_argument("--steps", type=int, default=20, help="DreamBooth steps per run")
    p.add_argument("--order", choices=("without-first", "with-first"), default="without-first")
    p.add_argument("--persistent-cache", default=None, help="a folder for JAX's persistent compilation cache")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 1 <= args.runs <= len(SUBJECTS):
        raise SystemExit(f"--runs must be 1..{len(SUBJECTS)}")
    import jax
    if args.persistent_cache:
        jax.config.update("jax_compilation_cache_dir", args.persistent_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import yaml

    import persguard_jax
    from persguard_jax.data.world import world_of
    from persguard_jax.dreambooth.recipe import personalize
    from persguard_jax.io import uint8_to_signed
    from persguard_jax.models import load_pipeline
    from persguard_jax.train.step_cache import clear_step_cache
    from persguard_jax.workflows import personalize as P
    from persguard_jax.workflows import runs

    root = Path(persguard_jax.__file__).parent
    model = root / "assets" / "world_tiny"
    pipe, world = load_pipeline(model), world_of(model)
    work = Path(tempfile.mkdtemp(prefix="repeat_personalize_"))

    def one_run(i: int, name: str, tag: str) -> float:
        subject = world.subject(name)
        raw = yaml.safe_load((root / "configs" / "dreambooth_world.yaml").read_text())
        raw["dreambooth"].update(steps=args.steps, seed=i, eval_num_images=2, eval_steps=5,
                                 instance_prompt=f"a photo of sks {subject.class_name}",
                                 class_prompt=f"a photo of {subject.class_name}")
        raw["loop"].update(progress=False, tensorboard=False)
        config = P.parse_config(raw)
        out = runs.start_run(work / tag / name, config.raw, overwrite=False, resume=False, command="personalize")
        photos = uint8_to_signed(world.subject_photos(subject, 4))
        t = time.perf_counter()
        personalize(pipe, photos, config, out, class_dir=work / f"class_{subject.class_name}")
        return time.perf_counter() - t

    # the recipe's progress lines go to stderr, so that stdout is the JSON alone
    with contextlib.redirect_stdout(sys.stderr):
        times = _timed_runs(args, one_run, clear_step_cache, work)
    later = {m: round(sum(t[1:]) / max(len(t) - 1, 1), 2) for m, t in times.items()}
    result = {"benchmark": "repeat_personalize", "runs": args.runs, "steps": args.steps,
              "persistent_cache": bool(args.persistent_cache), "order": args.order,
              "without_s": times["without"], "with_s": times["with"],
              "later_without_s": later["without"], "later_with_s": later["with"],
              "saved_per_later_run_s": round(later["without"] - later["with"], 2),
              "device": device_info(), "load_avg_1min": load_avg_1min(), "versions": versions()}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


def _timed_runs(args, one_run, clear_step_cache, work: Path) -> dict[str, list[float]]:
    try:
        for name in SUBJECTS[:args.runs]:  # the class images, drawn once (untimed), and the sampler compiled
            one_run(0, name, "warmup")
        clear_step_cache()
        modes = ("without", "with") if args.order == "without-first" else ("with", "without")
        times: dict[str, list[float]] = {}
        for mode in modes:
            clear_step_cache()
            times[mode] = []
            for i, name in enumerate(SUBJECTS[:args.runs]):
                if mode == "without":
                    clear_step_cache()
                times[mode].append(round(one_run(i + 1, name, mode), 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return times


if __name__ == "__main__":
    main()
