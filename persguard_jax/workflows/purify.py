"""``persguard purify``: run a chain of purifiers over a folder of (protected) photos.

    persguard purify --images DIR --purifier jpeg,sdedit [--model DIR] --out DIR [--config FILE] [key=value ...]

Every input is checked before anything is written: the config (one section per purifier, ``purifiers.SECTIONS``),
the chain's names, ``--out`` against ``--images`` (never equal, neither inside the other: the photos are only
read), every image (all readable, one size; ``data.images.load_folder_as_is``: no resizing), the model when a
purifier needs one (``sdedit``) and the CLIP of the LPIPS-style distance. Then ``--out`` gets one lossless PNG per
input, same size, named after it (``photo.jpg`` -> ``photo.png``), ``config.yaml`` (what ran) and
``results.json`` / ``results.md``: per image and in the mean, the LPIPS-style distance of the output to its
input, the l_inf and l_2 change, PSNR, and the seconds each purifier took per image.

A purification is one pass, not a training run: nothing to resume (``resumable=False``). ``--overwrite`` replaces
an earlier purify output folder, never a folder a run did not write (``runs.check_output``).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.workflows import runs


@dataclass(frozen=True)
class PurifyConfig(cfglib.Section):
    """The ``purify`` section: the chain (``--purifier`` sets it), the batch size and the faithfulness metric."""
    SECTION: ClassVar[str] = "purify"
    BOUNDS: ClassVar[Mapping[str, str]] = {"batch_size": "[1, inf)"}
    chain: str = "jpeg"
    batch_size: int = 1
    lpips: bool = True
    clip: str | None = None


def sections() -> dict[str, runs.SectionParser]:
    """``purify`` and one section per purifier (``purifiers.SECTIONS``: jpeg, blur, tv, sdedit, sr)."""
    from persguard_jax.purifiers import SECTIONS
    return {"purify": PurifyConfig.from_dict, **{name: cls.from_dict for name, cls in SECTIONS.items()}}


def resolve(raw: dict, args: argparse.Namespace | None = None) -> dict:
    """``--purifier`` into ``purify.chain``, so ``config.yaml`` and ``--print-config`` say what runs."""
    raw = dict(raw)
    chain = getattr(args, "purifier", None) if args is not None else None
    if chain is not None:
        raw["purify"] = {**cfglib.section(raw, "purify"), "chain": chain}
    return raw


def check_out(out: str | Path, *, overwrite: bool, inputs=()) -> None:
    """``runs.check_output``'s rules for a command with no ``--resume``."""
    runs.check_output(out, overwrite=overwrite, resume=False, sections=sections(), inputs=inputs,
                      command="purify", resumable=False)


def lpips_clip(cfg: PurifyConfig) -> Path | None:
    """The CLIP folder of the LPIPS-style distance: ``purify.clip``, else the world CLIP made earlier (committed
    or cached); None when ``purify.lpips`` is off."""
    from persguard_jax.metrics import metrics_clip_folder
    if not cfg.lpips:
        return None
    return metrics_clip_folder(cfg.clip, key="purify.clip (or purify.lpips=false)")


def _read_inputs(args: argparse.Namespace, config: runs.Config):
    """The chain, the photos, the model and the CLIP: everything that can be wrong, before any output."""
    from persguard_jax.data.images import load_folder_as_is, output_names
    from persguard_jax.purifiers import parse_chain
    chain = parse_chain(config.purify.chain, {name: config.get(name) for name in sections()})
    needs = list(dict.fromkeys(p.NAME for p in chain if p.needs_model))
    if needs and not args.model:
        raise ValueError(f"--purifier {', '.join(needs)} needs --model DIR (a diffusers pipeline folder)")
    if args.model and not needs:  # it would be neither read nor checked
        raise ValueError(f"--model {args.model}: no purifier of --purifier {config.purify.chain} reads a model; "
                         f"drop --model")
    runs.check_apart(args.out, args.images, "--images")
    check_out(args.out, overwrite=args.overwrite, inputs=runs.input_paths(args, config.raw))
    paths, photos = load_folder_as_is(args.images)
    names = output_names(paths)
    pipe = None
    if needs:
        from persguard_jax.models import load_pipeline
        pipe = load_pipeline(args.model)
    for purifier in chain:
        purifier.check(*photos.shape[1:3], pipe)
    clip = lpips_clip(config.purify)
    return chain, paths, names, photos, pipe, clip


def _per_image(names: list[str], scores: dict[str, np.ndarray], seconds: dict[str, np.ndarray]) -> dict:
    return {name: {**{k: float(v[i]) for k, v in scores.items()},
                   "seconds": {k: float(v[i]) for k, v in seconds.items()}}
            for i, name in enumerate(names)}


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    """``persguard purify``: check every input, purify, write the PNGs and the results."""
    from persguard_jax.io import save_png, uint8_to_unit, unit_to_uint8
    from persguard_jax.purifiers import describe, purification_scores, purify
    from persguard_jax.report import write_results
    from persguard_jax.train.distributed import is_writer

    t0 = time.time()
    chain, paths, names, photos, pipe, clip = _read_inputs(args, config)
    evaluator = None
    if clip is not None:
        from persguard_jax.metrics import CLIPEvaluator
        evaluator = CLIPEvaluator.from_folder(clip)
    out = runs.start_run(args.out, config.raw, overwrite=args.overwrite, resume=False, command="purify")
    print(f"purify: {len(paths)} images ({photos.shape[2]}x{photos.shape[1]}) through {config.purify.chain}; "
          f"writing to {out}")
    inputs = uint8_to_unit(photos)
    purified = purify(inputs, chain, pipe=pipe, batch_size=config.purify.batch_size)
    written = unit_to_uint8(purified.images)  # what the PNGs hold is what is measured
    scores = purification_scores(inputs, uint8_to_unit(written), evaluator=evaluator)
    seconds = {**purified.seconds, "total": sum(purified.seconds.values())}
    results = {"images_dir": str(args.images), "out": str(out), "chain": config.purify.chain,
               "num_images": len(paths), "size": [int(photos.shape[2]), int(photos.shape[1])],
               "purifiers": describe(chain), "clip": str(clip) if clip else None,
               "mean": {**{k: float(np.mean(v)) for k, v in scores.items()},
                        "seconds": {k: float(np.mean(v)) for k, v in seconds.items()}},
               "images": _per_image(names, scores, seconds),
               "note": "seconds include the first batch's compilation; l_inf and l_2 in [0, 1] pixel units"}
    if is_writer():
        for name, image in zip(names, written):
            save_png(image, out / name)
        results["wall_s"] = round(time.time() - t0, 1)
        write_results(out, results, title=f"persguard purify: {config.purify.chain}")
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of photos to purify (jpg, png, webp; one size; "
                                                        "only read)")
    parser.add_argument("--purifier", required=True, help="comma-separated chain run in order, e.g. jpeg,sdedit "
                                                          "(jpeg, blur, tv, sdedit, sdedit_empty, sr)")
    parser.add_argument("--model", help="diffusers pipeline folder, for sdedit / sdedit_empty")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier purify output folder")


def _summary(results: dict) -> str:
    mean = results["mean"]
    lpips = f"LPIPS-style {mean['lpips_style']:.4f}, " if "lpips_style" in mean else ""
    return (f"purified {results['num_images']} images with {results['chain']}: {lpips}PSNR {mean['psnr']:.2f} dB, "
            f"l_inf {mean['linf'] * 255:.1f}/255, {mean['seconds']['total']:.3f} s per image\n"
            f"results: {Path(results['out']) / 'results.md'}")


WORKFLOW = runs.Workflow(
    name="purify", help="purify photos with a chain of purifiers (JPEG, blur, TV, SDEdit, super-resolution)",
    config="purify", sections=sections, run=run, summary=_summary, arguments=_arguments, resolve=resolve,
    out_help="new folder for the purified PNGs (the inputs' names and sizes) and results", example="jpeg.quality=50",
    resumable=False)
