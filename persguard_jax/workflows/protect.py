"""``persguard protect``: protective perturbations on a folder of photos (AdvDM, FSMG, ASPL), the protections the
DiffShortcut defence is measured against.

    persguard protect --model DIR --images DIR --method advdm|fsmg|aspl --out DIR [--config FILE] [key=value ...]

1. The photos (every image of ``--images``, at ``dreambooth.resolution``), the target image and the model are read
   and checked before anything is written; ``--images`` is only read.
2. Class images for the surrogate's prior preservation (FSMG, ASPL), sampled once into ``<out>/class_images``.
3. FSMG: the surrogate, ``persguard personalize``'s recipe on the clean photos, in ``<out>/surrogate``.
4. The protection (``protect.runner``): compiled PGD chunks or ASPL iterations, checkpointed in
   ``<out>/checkpoints`` (``--resume`` continues).
5. ``<out>/<photo name>.png`` (lossless, 8-bit) for every photo, and ``results.json`` / ``results.md``: l_inf (grey
   levels), l_2 and PSNR of each perturbation, the surrogate's denoising loss on the clean and the protected photos;
   ``metrics.jsonl``: the objective per PGD chunk or ASPL iteration (and ASPL's surrogate and model losses).
Protected photos are the only images at the top of ``--out``, so ``persguard personalize --instance-dir OUT`` trains
on them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.workflows import runs


def sections() -> dict[str, runs.SectionParser]:
    """The surrogate's recipe (``persguard personalize``'s sections) and ``protect``."""
    from persguard_jax.dreambooth.recipe import recipe_sections
    from persguard_jax.protect.config import ProtectConfig
    recipe = {k: v for k, v in recipe_sections().items() if k != "cdl"}  # the surrogate is the plain attacker
    return {**recipe, "protect": ProtectConfig.from_dict}


def resolve(raw: dict, args: argparse.Namespace | None = None) -> dict:
    """``--method`` into ``protect.method``; ``protect.class_name`` into the surrogate's prompts; the recipe's loop
    and schedule span ``dreambooth.steps`` (FSMG's surrogate)."""
    from persguard_jax.dreambooth.recipe import resolve_recipe
    raw = dict(raw)
    protect = dict(cfglib.section(raw, "protect"))
    if args is not None and getattr(args, "method", None):
        protect["method"] = args.method
    raw["protect"] = protect
    class_name = protect.get("class_name")
    if class_name:
        raw["dreambooth"] = {**cfglib.section(raw, "dreambooth"), "instance_prompt": f"a photo of sks {class_name}",
                             "class_prompt": f"a photo of {class_name}"}
    return resolve_recipe(raw)


def _read_photos(folder: str, resolution: int) -> tuple[list[str], np.ndarray]:
    """The photos' output names (``data.images.output_names``) and the photos, every file checked. Photos of
    another size are centre-cropped and resized to ``resolution`` (the perturbation is computed there), and the
    command says so: the protected PNGs are at that size, not the inputs'."""
    from PIL import Image

    from persguard_jax.data.images import load_folder, output_names, scan_folder
    from persguard_jax.train.distributed import is_writer
    paths = scan_folder(folder, resolution)
    photos = load_folder(folder, resolution)
    resized = []
    for path in paths:
        with Image.open(path) as image:
            if image.size != (resolution, resolution):
                resized.append(f"{path.name} {image.size[0]}x{image.size[1]}")
    if resized and is_writer():
        more = f" and {len(resized) - 3} more" if len(resized) > 3 else ""
        print(f"protect: {len(resized)} photo(s) centre-cropped and resized to {resolution}x{resolution} "
              f"(dreambooth.resolution), so protected at that size: {', '.join(resized[:3])}{more}")
    return output_names(paths), photos


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    from persguard_jax.dreambooth import ensure_class_images
    from persguard_jax.dreambooth.recipe import check_resolution
    from persguard_jax.models import load_pipeline
    from persguard_jax.protect.runner import protect
    from persguard_jax.train.distributed import is_writer

    t0 = time.time()
    cfg, db = config.protect, config.dreambooth
    runs.check_apart(args.out, args.images, "--images")
    names, photos = _read_photos(args.images, db.resolution)
    if cfg.target_image:
        from persguard_jax.data.images import load_image
        load_image(cfg.target_image, db.resolution)  # a bad target fails here, named
    pipe = load_pipeline(args.model, attention=config.step.attention)
    check_resolution(pipe, db.resolution)
    out = runs.start_run(args.out, config.raw, overwrite=args.overwrite, resume=args.resume,
                         command="protect", inputs=runs.run_inputs(args, "model", "images", "method"))
    print(f"protect: {cfg.method} on {len(photos)} photos of {args.images}, budget {cfg.budget:g}/255, prompt "
          f"{db.instance_prompt!r}; writing to {out}")

    class_images = None
    if cfg.method in ("fsmg", "aspl") and db.use_prior:
        class_images = ensure_class_images(pipe, Path(db.class_dir or out / "class_images"), db)
    surrogate = None
    if cfg.method == "fsmg":
        from persguard_jax.dreambooth.recipe import personalize
        folder = out / "surrogate"
        runs.start_run(folder, config.raw, overwrite=False, resume=folder.exists(), command="personalize")
        print(f"protect: FSMG's surrogate, {db.steps} DreamBooth steps on the clean photos, in {folder}")
        trained = personalize(pipe, photos, config, folder, class_dir=Path(db.class_dir or out / "class_images"))
        if trained.get("preempted"):
            return {"preempted": True, "step": trained["step"], "stage": "surrogate"}
        surrogate = trained["params"]

    protected, results = protect(pipe, photos, config, out, class_images=class_images, surrogate=surrogate)
    history = results.pop("history")
    results.update(_perturbation_sizes(names, photos, protected))
    results.update(images=str(args.images), model=str(args.model), out=str(out),
                   wall_s=round(time.time() - t0, 1))
    if is_writer():
        from persguard_jax.io import atomic_write, save_png, signed_to_uint8
        from persguard_jax.report import write_results
        for name, image in zip(names, signed_to_uint8(protected)):
            save_png(image, out / name)
        lines = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))
        write_results(out, results, title=f"persguard protect ({cfg.method})", overwrite=True)
    return results


def _perturbation_sizes(names: list[str], clean: np.ndarray, protected: np.ndarray) -> dict:
    """Per photo and in mean: l_inf in grey levels, l_2 over the image in [0, 1] units, PSNR in dB
    (``purifiers.purification_scores``, what a purifier's change is measured with)."""
    from persguard_jax.purifiers import purification_scores
    s = purification_scores((clean + 1.0) / 2.0, (protected + 1.0) / 2.0)
    linf = np.round(s["linf"] * 255.0, 3)
    per_photo = {n: {"linf": float(a), "l2": round(float(b), 4), "psnr": round(float(c), 2)}
                 for n, a, b, c in zip(names, linf, s["l2"], s["psnr"])}
    return {"per_photo": per_photo, "linf_max": float(linf.max()), "l2_mean": round(float(s["l2"].mean()), 4),
            "psnr_mean": round(float(s["psnr"].mean()), 2)}


def _arguments(parser: argparse.ArgumentParser) -> None:
    from persguard_jax.protect.config import METHODS
    parser.add_argument("--model", required=True, help="diffusers pipeline folder the protection attacks")
    parser.add_argument("--images", required=True, help="folder of the photos to protect (never written)")
    parser.add_argument("--method", required=True, choices=METHODS, help="the protection")


def _summary(results: dict) -> str:
    loss = results["surrogate_loss"]
    return (f"protected {results['photos']} photos with {results['method']} in {results['protect_s']} s "
            f"({results['seconds_per_photo']} s per photo): l_inf {results['linf_max']:g}/255, PSNR "
            f"{results['psnr_mean']:.1f} dB; the surrogate's denoising loss {loss['clean']:.4f} -> "
            f"{loss['protected']:.4f}\nwrote {results['out']}")


WORKFLOW = runs.Workflow(
    name="protect", help="protective perturbations on photos (AdvDM, FSMG, ASPL) against personalisation",
    config="protect_world", sections=sections, run=run, summary=_summary, arguments=_arguments, resolve=resolve,
    out_help="new folder for the protected PNGs, checkpoints/ and results",
    example="protect.budget=16 protect.class_name=dog")
