"""``persguard personalize``: DreamBooth with prior preservation on the engine, the simulated attacker.

Reads a diffusers pipeline folder and a folder of instance photos, samples (or reads) class images for prior
preservation, caches VAE posteriors and prompts (``persguard_jax.dreambooth``), splits what trains
(``persguard_jax.trainable``: UNet, UNet + text encoder, or LoRA) and trains ``losses.dreambooth_loss`` through
``train.fit``. Writes into ``out``: ``checkpoints/`` (Orbax, resumable), ``metrics.jsonl``, ``class_images/`` (the
cache, unless ``class_dir`` names another folder), ``model/`` (the personalised pipeline, diffusers layout),
``samples.png`` (eval prompts), ``config.yaml`` (the resolved config) and ``results.json``.

The recipe itself, ``personalize(pipe, photos, config, out)``, lives in ``persguard_jax.dreambooth.recipe`` (other
workflows run it too: the demo, implantation's check); ``WORKFLOW`` is the command.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from persguard_jax import config as cfglib
from persguard_jax.dreambooth.config import DreamBoothConfig
from persguard_jax.dreambooth.recipe import check_resolution, personalize, recipe_sections, resolve_recipe
from persguard_jax.workflows import runs


def sections() -> dict[str, runs.SectionParser]:
    """The config sections of a personalisation run and their parsers (``dreambooth.recipe.recipe_sections``)."""
    return recipe_sections()


def resolve(raw: dict, args: argparse.Namespace | None = None) -> dict:
    """Command-line prompts into ``dreambooth``; the loop runs ``dreambooth.steps``; the learning-rate schedule
    spans them unless the config says otherwise."""
    raw = dict(raw)
    db = dict(cfglib.section(raw, "dreambooth"))
    for key in ("instance_prompt", "class_prompt"):
        value = getattr(args, key, None) if args is not None else None
        if value:
            db[key] = value
    raw["dreambooth"] = db
    parsed = DreamBoothConfig.from_dict(db)
    runs.check_batch_divides_processes(parsed.batch_size, "dreambooth.batch_size", examples=parsed.examples_per_step)
    return resolve_recipe(raw)


def parse_config(raw: dict) -> runs.Config:
    """A personalisation config (a YAML mapping) resolved and parsed, every section checked."""
    return runs.parse_config(resolve(raw), sections())


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    """``persguard personalize``: read every input before anything is written, then the recipe."""
    from persguard_jax.data.images import load_folder
    from persguard_jax.models import load_pipeline
    class_dir = config.dreambooth.class_dir
    if class_dir and Path(class_dir).exists() and not Path(class_dir).is_dir():
        raise NotADirectoryError(f"dreambooth.class_dir: {class_dir} is not a folder")
    photos = load_folder(args.instance_dir, config.dreambooth.resolution)  # bad photos fail here, all named
    pipe = load_pipeline(args.model, attention=config.step.attention)
    check_resolution(pipe, config.dreambooth.resolution)
    out = runs.start_run(args.out, config.raw, overwrite=args.overwrite, resume=args.resume,
                         command="personalize", inputs=runs.run_inputs(args, "model", "instance_dir"))
    results = personalize(pipe, photos, config, out)
    results.pop("params", None)
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline folder to personalise")
    parser.add_argument("--instance-dir", required=True, help="folder of the subject's photos (jpg, png, webp)")
    parser.add_argument("--instance-prompt", type=runs.prompt_argument,
                        help='e.g. "a photo of sks person" (default: from the config)')
    parser.add_argument("--class-prompt", type=runs.prompt_argument,
                        help='e.g. "a photo of person" (default: from the config)')


def _summary(results: dict) -> str:
    return (f"personalised model: {results['model']}\nsamples: {results['samples']}\n"
            f"results: {Path(results['model']).parent / 'results.json'} ({results['steps']} steps in "
            f"{results.get('wall_s', '?')} s)")


WORKFLOW = runs.Workflow(
    name="personalize", help="DreamBooth with prior preservation (the simulated attacker)",
    config="dreambooth_sd15", sections=sections, run=run, summary=_summary, arguments=_arguments,
    resolve=resolve, out_help="new folder for checkpoints, the model, samples and results",
    example="dreambooth.steps=400 lora.rank=4")
