"""``persguard diagnose``: DiffShortcut's investigation of a protection as shortcut learning, on one subject.

    persguard diagnose --model DIR --clean DIR --perturbed DIR [--clip DIR] --out DIR [--config FILE] [key=value ...]

1. Reads the clean photos and their protected versions (paired by file stem, ``persguard protect``'s naming) and
   makes the control: uniform random noise of each photo's l_inf size (``metrics.shortcut.uniform_noise_like``).
2. CLIP-space shift: each set's similarity to the class prompt and to the clean photos; the zero-shot probe
   ("a photo of <class>" against "noise pattern") on each set.
3. DreamBooth (the config's recipe) on the perturbed photos into ``<out>/dreambooth``; then samples of "a photo of
   sks", "a photo of sks <class>" and "noise pattern" from the base and the trained model (same seeds), each with
   the probe's noise rate and its high-frequency energy: how much the identifier alone carries the noise. With
   ``cdl.enabled`` the DreamBooth is contrastive decoupling learning's, and the samples add its instance prompt
   ("..., <phrase> noisy pattern"), its sampling prompt ("..., without <phrase> noisy pattern") and the phrase
   alone, all sampled as the others are (the recipe's guidance, not CDL's negative prompt, so that only the
   prompt differs): ``cdl_decoupling`` says whether the phrase took the noise off the identifier.
4. ``results.json`` / ``results.md`` (the table) and ``sheet.png`` (clean, perturbed, the perturbation x8, the
   noise control, then the samples, base and trained, row by row).
The default CLIP of a world model is the world CLIP; other models need ``--clip``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from persguard_jax import config as cfglib
from persguard_jax.workflows import runs


@dataclass(frozen=True)
class DiagnoseConfig(cfglib.Section):
    """The ``diagnose`` section."""
    SECTION = "diagnose"
    BOUNDS = {"num_images": "[1, inf)", "seed": "[0, inf)"}
    class_name: str = "person"        # the prompts: "a photo of <class>", "a photo of sks <class>"
    noise_prompt: str = "noise pattern"
    num_images: int = 8               # samples per prompt and model
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for key in ("class_name", "noise_prompt"):
            if not str(getattr(self, key)).strip():
                raise cfglib.ConfigError(f"diagnose.{key}: must not be empty")


def sections() -> dict[str, runs.SectionParser]:
    from persguard_jax.dreambooth.recipe import recipe_sections
    return {**recipe_sections(), "diagnose": DiagnoseConfig.from_dict}


def resolve(raw: dict, args: argparse.Namespace | None = None) -> dict:
    """The DreamBooth prompts come from ``diagnose.class_name``; the loop spans ``dreambooth.steps``."""
    from persguard_jax.dreambooth.recipe import resolve_recipe
    raw = dict(raw)
    c = DiagnoseConfig.from_dict(cfglib.section(raw, "diagnose")).class_name
    raw["dreambooth"] = {**cfglib.section(raw, "dreambooth"), "instance_prompt": f"a photo of sks {c}",
                         "class_prompt": f"a photo of {c}"}
    from persguard_jax.dreambooth import DreamBoothConfig
    parsed = DreamBoothConfig.from_dict(raw["dreambooth"])
    runs.check_batch_divides_processes(parsed.batch_size, "dreambooth.batch_size", examples=parsed.examples_per_step)
    return resolve_recipe(raw)


def _paired(clean_dir: str, perturbed_dir: str, resolution: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, clean uint8, perturbed uint8): every clean photo with the perturbed photo of the same stem."""
    from PIL import Image

    from persguard_jax.data.images import load_folder, scan_folder
    from persguard_jax.io import signed_to_uint8
    if Path(clean_dir).resolve() == Path(perturbed_dir).resolve():
        raise ValueError(f"--perturbed {perturbed_dir}: is --clean; give the protected photos' folder")
    clean_paths, pert_paths = scan_folder(clean_dir, resolution), scan_folder(perturbed_dir, resolution)
    pert_by_stem = {p.stem: i for i, p in enumerate(pert_paths)}
    missing = [p.name for p in clean_paths if p.stem not in pert_by_stem]
    if missing:
        raise ValueError(f"{perturbed_dir}: no perturbed version of {missing[0]} (photos are paired by name; "
                         f"{len(missing)} of {len(clean_paths)} unpaired)")
    clean = signed_to_uint8(load_folder(clean_dir, resolution))
    perturbed = signed_to_uint8(load_folder(perturbed_dir, resolution))
    perturbed = perturbed[[pert_by_stem[p.stem] for p in clean_paths]]
    for p in clean_paths:  # a protection is written at the clean photo's size or at dreambooth.resolution
        q = pert_paths[pert_by_stem[p.stem]]
        with Image.open(p) as a, Image.open(q) as b:
            if b.size != a.size and b.size != (resolution, resolution):
                raise ValueError(f"{q}: {b.size[0]}x{b.size[1]}, but its clean photo {p.name} is "
                                 f"{a.size[0]}x{a.size[1]} and dreambooth.resolution {resolution}: not its "
                                 f"protected version")
    return [p.stem for p in clean_paths], clean, perturbed


def _clip_folder(args: argparse.Namespace, model: Path) -> Path:
    from persguard_jax.data.world import is_world_model
    from persguard_jax.metrics import metrics_clip_folder
    if not args.clip and not is_world_model(model):
        raise ValueError(f"{model}: not a world model, so there is no default CLIP; pass --clip with a CLIP folder")
    return metrics_clip_folder(args.clip, key="--clip")


def run(args: argparse.Namespace, config: runs.Config) -> dict:
    from persguard_jax.dreambooth.recipe import check_resolution, personalize
    from persguard_jax.io import uint8_to_signed
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.metrics import shortcut as S
    from persguard_jax.models import load_pipeline
    from persguard_jax.train.distributed import is_writer

    diag, db = config.diagnose, config.dreambooth
    names, clean, perturbed = _paired(args.clean, args.perturbed, db.resolution)
    clip_dir = _clip_folder(args, Path(args.model))
    pipe = load_pipeline(args.model, attention=config.step.attention)
    check_resolution(pipe, db.resolution)
    evaluator = CLIPEvaluator.from_folder(clip_dir)
    out = runs.start_run(args.out, config.raw, overwrite=args.overwrite, resume=args.resume,
                         command="diagnose", inputs=runs.run_inputs(args, "model", "clean", "perturbed", "clip"))
    noise = S.uniform_noise_like(clean, perturbed, seed=diag.seed)
    class_prompt = f"a photo of {diag.class_name}"
    sets = {"clean": clean, "perturbed": perturbed, "uniform_noise": noise}
    results = {"photos": names, "clip": str(clip_dir), "class_prompt": class_prompt,
               "linf": int(np.abs(perturbed.astype(int) - clean.astype(int)).max()),
               "clip_shift": S.clip_shift(evaluator, sets, clean, class_prompt),
               "noise_probe": {k: S.noise_probe(evaluator, v, class_prompt, diag.noise_prompt) for k, v in sets.items()},
               "high_frequency_energy": {k: S.high_frequency_energy(v) for k, v in sets.items()}}

    folder = out / "dreambooth"
    runs.start_run(folder, config.raw, overwrite=False, resume=folder.exists(), command="personalize")
    trained = personalize(pipe, uint8_to_signed(perturbed), config, folder,
                          class_dir=Path(db.class_dir or out / "class_images"))
    if trained.get("preempted"):
        return {"preempted": True, "step": trained["step"], "stage": "dreambooth"}
    cdl = config.get("cdl")
    cdl_prompts = []
    if cdl is not None and cdl.enabled:  # where CDL's phrase puts the noise: with it, without it, it alone
        cdl_prompts = [cdl.instance_prompt(db.instance_prompt), cdl.sampling_prompt(db.instance_prompt),
                       cdl.noise_phrase]
    prompts = list(dict.fromkeys(["a photo of sks", db.instance_prompt, diag.noise_prompt,
                                  *cdl_prompts]))  # each once, should a configured prompt repeat another
    samples, rows = {}, {}
    for which, params in (("base", None), ("trained", trained["params"])):
        for prompt in prompts:
            images = _samples(pipe, prompt, diag, db, params)
            samples[(which, prompt)] = images
            rows.setdefault(prompt, {})[which] = {
                "noise_probe": S.noise_probe(evaluator, images, class_prompt, diag.noise_prompt),
                "high_frequency_energy": S.high_frequency_energy(images)}
    results["samples"] = rows
    sks = rows["a photo of sks"]
    base_hf = max(sks["base"]["high_frequency_energy"], 1e-12)
    results["identifier_carries_noise"] = {
        "high_frequency_ratio": sks["trained"]["high_frequency_energy"] / base_hf,
        "noise_probe_change": sks["trained"]["noise_probe"] - sks["base"]["noise_probe"]}
    if cdl_prompts:
        results["cdl_decoupling"] = _decoupling(rows, cdl_prompts)
    results["dreambooth"] = str(folder)
    if is_writer():
        from persguard_jax.report import write_results
        _sheet(out / "sheet.png", clean, perturbed, noise, samples, prompts, diag.num_images)
        write_results(out, results, title="persguard diagnose: protective perturbation as a shortcut", overwrite=True)
    return results


def _decoupling(rows: dict, prompts: list[str]) -> dict:
    """Whether contrastive decoupling learning moved the noise onto its phrase, from the trained model's samples
    of its instance prompt (``with``), its sampling prompt (``without``) and the phrase alone: decoupled, the
    ``with`` samples carry more high-frequency energy than the ``without`` ones (``with_over_without`` > 1) and the
    phrase alone draws noise the base model's samples of it do not (``phrase_over_base`` > 1)."""
    with_, without, phrase = (rows[p] for p in prompts)
    hf = lambda row, which="trained": row[which]["high_frequency_energy"]  # noqa: E731
    return {"with_phrase_high_frequency": hf(with_), "without_phrase_high_frequency": hf(without),
            "with_over_without": hf(with_) / max(hf(without), 1e-12),
            "phrase_over_base": hf(phrase) / max(hf(phrase, "base"), 1e-12)}


def _samples(pipe, prompt: str, diag: DiagnoseConfig, db, params) -> np.ndarray:
    from persguard_jax.io import unit_to_uint8
    from persguard_jax.sample import text_to_image
    images = text_to_image(pipe, [prompt] * diag.num_images, db.eval_negative_prompt, num_steps=db.eval_steps,
                           guidance_scale=db.eval_guidance, seed=diag.seed, height=db.resolution,
                           width=db.resolution, params=params, progress=False)
    return unit_to_uint8(images)


def _sheet(path: Path, clean, perturbed, noise, samples: dict, prompts: list[str], n: int) -> None:
    from persguard_jax.report import labelled_grid, save_png

    def row(images: np.ndarray) -> np.ndarray:
        padded = np.full((n, *images.shape[1:]), 255, np.uint8)
        padded[:min(n, len(images))] = images[:n]
        return padded

    amplified = np.clip(128 + 8 * (perturbed.astype(int) - clean.astype(int)), 0, 255).astype(np.uint8)
    rows = [row(clean), row(perturbed), row(amplified), row(noise)]
    labels = ["clean photos", "perturbed", "perturbation x8", "uniform noise, same l_inf"]
    for prompt in prompts:
        for which in ("base", "trained"):
            rows.append(row(samples[(which, prompt)]))
            labels.append(f'"{prompt}": {"base model" if which == "base" else "after DreamBooth on perturbed"}')
    grid = np.concatenate(rows).astype(np.float32) / 255.0
    save_png(labelled_grid(grid, row_labels=labels), path)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline folder (the base model)")
    parser.add_argument("--clean", required=True, help="folder of the clean photos")
    parser.add_argument("--perturbed", required=True, help="folder of their protected versions (same file stems)")
    parser.add_argument("--clip", help="CLIP folder for the probes (default for a world model: the world CLIP)")


def _summary(results: dict) -> str:
    probe, sks = results["noise_probe"], results["identifier_carries_noise"]
    lines = [f"noise probe: clean {probe['clean']:.2f}, perturbed {probe['perturbed']:.2f}, uniform noise "
             f"{probe['uniform_noise']:.2f}; after DreamBooth on the perturbed photos, 'a photo of sks' samples carry "
             f"{sks['high_frequency_ratio']:.2f}x the base model's high-frequency energy"]
    if "cdl_decoupling" in results:
        lines.append(f"CDL: samples with its phrase carry {results['cdl_decoupling']['with_over_without']:.2f}x the "
                     "high-frequency energy of samples without it (above 1: the phrase took the noise)")
    lines.append(f"wrote {Path(results['dreambooth']).parent / 'results.md'} and sheet.png")
    return "\n".join(lines)


WORKFLOW = runs.Workflow(
    name="diagnose", help="the shortcut diagnosis of a protection: CLIP shift, noise probe, identifier samples",
    config="diagnose_world", sections=sections, run=run, summary=_summary, arguments=_arguments, resolve=resolve,
    out_help="new folder for results, sheet.png and the DreamBooth run", example="diagnose.class_name=dog")
