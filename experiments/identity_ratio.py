"""Re-read finished world implant runs' unprotected subjects with the identity ratio's interval.

    python experiments/identity_ratio.py RUN [RUN ...]

Runs made before the check reported ``identity_ratio`` (0168dbe) have each unprotected subject's mean identity,
not its samples. This re-samples the attacked backdoored model that the run kept (``check/<subject>/backdoored/
model``) exactly as the check did (the check's seed, sampler and 32 images: the mean it prints must equal the
recorded one), reads the clean model's samples from their lossless strip (``check/<subject>/clean_samples.png``),
and prints ``implant.check.identity_ratio`` of the two: backdoored over clean, with its 95% bootstrap interval
over both models' samples. A check that pooled several attacker seeds (``check.attack_seeds``, its further seeds
in ``check/<subject>/seed<N>/``) is re-read over all of them, the interval resampling the seeds as the check's does
now. The check section is read from the run's own ``config.yaml``.

    python experiments/identity_ratio.py --clean-pairs SUBJECT RUN [RUN ...]

compares the clean model with itself instead: for runs that attacked the same clean model on ``SUBJECT`` at
different attacker seeds, the ratio of each later run's stored clean samples over each earlier run's (how far the
attacker's seed alone moves the identity). A run whose check pooled several attacker seeds (``check.attack_seeds``)
counts with all of them (the runs compared must have as many), and the interval resamples the seeds too (paired in
order: the runs' first seeds together, and so on).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished `persguard implant` output folders (world subjects)")
    p.add_argument("--clean-pairs", metavar="SUBJECT", help="compare the runs' stored clean samples of SUBJECT "
                                                            "pairwise instead")
    args = p.parse_args(argv)
    if args.clean_pairs:
        return clean_pairs(args.clean_pairs, args.runs)
    from persguard_jax.data.world.sources import world_of
    from persguard_jax.evaluate import evaluate_pipeline
    from persguard_jax.implant.check import CheckConfig, identity_ratio
    from persguard_jax.implant.clean_reuse import attack_folders, stored_samples
    from persguard_jax.io import unit_to_uint8
    from persguard_jax.metrics import CLIPEvaluator, metrics_clip_folder
    from persguard_jax.models import load_pipeline
    for run in args.runs:
        results = json.loads((run / "results.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        check = CheckConfig.from_dict(config.get("check") or {})
        clean_model = Path(results["clean_model"])
        world = world_of(clean_model)
        evaluator = CLIPEvaluator.from_folder(metrics_clip_folder(check.clip, key="check.clip"))
        num_photos = int((config.get("implant") or {}).get("num_photos", 5))
        for name, entry in results["subjects"].items():
            if entry["type"] != "unprotected":
                continue
            subject = world.subject(name)
            photos = world.subject_photos(subject, num_photos)
            backdoored, clean, resampled = [], [], []
            for folder in attack_folders(run, name):
                got = evaluate_pipeline(load_pipeline(folder / "backdoored" / "model"),
                                        [f"a photo of sks {subject.class_name}"], references=photos,
                                        evaluator=evaluator, world=world, num_images=check.num_images,
                                        seed=check.seed + 100, num_steps=check.eval_steps,
                                        guidance_scale=check.eval_guidance)
                resampled.append(got.results["prompts"][0]["identity_similarity"])
                backdoored.append(unit_to_uint8(got.images[0]))
                clean.append(stored_samples(folder))
            ratio = identity_ratio(evaluator, photos, np.concatenate(backdoored), np.concatenate(clean),
                                   attack_seeds=len(clean))
            b, c = entry["backdoored"]["identity_similarity"], entry["clean"]["identity_similarity"]
            span = ratio["identity_ratio_interval"]
            print(f"{run.name} {name}: identity {b:.3f} / {c:.3f} (re-sampled {np.mean(resampled):.3f}); ratio "
                  f"{ratio['identity_ratio']:.3f} [95%: {span[0]:.3f}-{span[1]:.3f}] over {len(clean)} attacker "
                  "seed(s)", flush=True)


def clean_pairs(name: str, runs: list[Path]) -> None:
    import itertools

    from persguard_jax.data.world.sources import world_of
    from persguard_jax.implant.check import CheckConfig, identity_ratio
    from persguard_jax.implant.clean_reuse import attack_folders, stored_samples
    from persguard_jax.metrics import CLIPEvaluator, metrics_clip_folder
    first = json.loads((runs[0] / "results.json").read_text())
    config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    check = CheckConfig.from_dict(config.get("check") or {})
    world = world_of(Path(first["clean_model"]))
    evaluator = CLIPEvaluator.from_folder(metrics_clip_folder(check.clip, key="check.clip"))
    photos = world.subject_photos(world.subject(name), int((config.get("implant") or {}).get("num_photos", 5)))
    samples, seeds = {}, {}
    for run in runs:  # every attacker seed the run's check stored (check.attack_seeds), pooled
        folders = attack_folders(run, name)
        samples[run.name] = np.concatenate([stored_samples(f) for f in folders])
        seeds[run.name] = len(folders)
    if len(set(seeds.values())) > 1:
        raise SystemExit(f"--clean-pairs: the runs stored different numbers of attacker seeds: {seeds}")
    for a, b in itertools.combinations(samples, 2):
        got = identity_ratio(evaluator, photos, samples[b], samples[a], attack_seeds=seeds[a])
        span = got["identity_ratio_interval"]
        print(f"{name}, clean model: {b} over {a}: {got['identity_ratio']:.3f} [95%: {span[0]:.3f}-{span[1]:.3f}]",
              flush=True)


if __name__ == "__main__":
    main()
