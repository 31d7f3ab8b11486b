"""The "personalise with recipe R, then measure" harness that every workflow reports through.

``evaluate_pipeline`` samples a pipeline on each prompt with fixed seeds and ``measure``s the samples:

- with a ``CLIPEvaluator``: CLIP-T to the prompt, and with reference photos CLIP-I, identity similarity and a
  Fréchet distance of CLIP features (``CLIPEvaluator.evaluate``);
- with a ``World`` (the synthetic world's model): its pixel detectors. Each ``LabelDetector`` reads one caption
  fact (colour, shape, texture) off the pixels and reports how often the samples show the references' value of it
  (``colour_match``: the most common value over the reference photos, for a world subject its colour and class)
  and, when the prompt names a value in the world's vocabulary, how often they show that one
  (``colour_follows``); ``MarkDetector`` reports how often samples carry the references' mark (``mark_match``), and
  ``AllOf`` how often one sample shows the references' silhouette, colour and texture together
  (``subject_match``).
  A detector is anything with ``reference`` and ``score`` methods (``Detector``), so a
  pattern or erasure detector is one more entry of ``detectors``.

Every row has the same keys (None where a metric does not apply: no references, a prompt naming no colour), and
``mean`` averages each over the prompts where it applies. ``write_evaluation`` writes ``results.json``,
``results.md`` (one row per prompt, then the mean) and ``grid.png`` (references, then one row per prompt).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from persguard_jax.data.world import COLOURS, TEXTURES, World, parse_caption
from persguard_jax.io import uint8_to_unit, unit_to_uint8
from persguard_jax.metrics.detectors import detect_mark, detect_shape, detect_texture, dominant_colour

if TYPE_CHECKING:  # heavy (jax, flax): imported by the caller that builds them
    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.models.pretrained import Pipeline


@dataclass(frozen=True)
class Evaluation:
    """``images[k, j]``: sample ``j`` of ``prompts[k]``, float32 ``(P, N, H, W, 3)`` in [0, 1]; ``results`` as
    ``measure`` returns them plus the sampling ``settings``."""
    prompts: tuple[str, ...]
    images: np.ndarray
    results: dict[str, Any]


# --------------------------------------------------------------------------- images

def unit_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """uint8 images -> float32 in [0, 1]; float images are checked to be in [0, 1] already."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what}: expected (N, H, W, 3) RGB images, got shape {images.shape}")
    if images.dtype == np.uint8:
        return uint8_to_unit(images)
    images = images.astype(np.float32)
    if images.size and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        # data.images.load_folder returns [-1, 1]: a silent shift would skew every similarity
        raise ValueError(f"{what}: float images must be in [0, 1], got [{images.min():.3g}, {images.max():.3g}] "
                         f"(for load_folder's [-1, 1] pass (x + 1) / 2)")
    return np.clip(images, 0.0, 1.0)




# --------------------------------------------------------------------------- detectors

class Detector(Protocol):
    """A pixel-level check on the samples of a world model.

    ``reference`` summarises the reference photos once (a dict merged into ``results["references"]``, shared by
    all detectors); ``score`` measures one prompt's samples against that summary and the prompt, always with the
    same keys (so the table's columns do not depend on the first prompt), None where a metric does not apply.
    Both get uint8 pixels."""

    def reference(self, world: World, pixels: np.ndarray) -> dict[str, Any]: ...

    def score(self, world: World, pixels: np.ndarray, reference: dict[str, Any],
              prompt: str) -> dict[str, float | None]: ...


def _most_common(labels: Sequence[str | None]) -> str | None:
    """The most common label (ties: the first seen); None when no image got one."""
    counts = Counter(label for label in labels if label is not None)
    return counts.most_common(1)[0][0] if counts else None


@dataclass(frozen=True)
class LabelDetector:
    """One caption fact (a ``parse_caption`` key) read off each image by ``labels(world, pixels)``, which
    returns a name from ``vocabulary(world)`` or None per image."""
    fact: str
    labels: Callable[[World, np.ndarray], list[str | None]]
    vocabulary: Callable[[World], Sequence[str]]

    def reference(self, world: World, pixels: np.ndarray) -> dict[str, Any]:
        return {self.fact: _most_common(self.labels(world, pixels))}

    def score(self, world: World, pixels: np.ndarray, reference: dict[str, Any],
              prompt: str) -> dict[str, float | None]:
        got = self.labels(world, pixels)
        rate = lambda want: None if want is None else float(np.mean([g == want for g in got]))
        named = parse_caption(prompt).get(self.fact)
        if named not in self.vocabulary(world):  # a word the world cannot draw is not a request we can check
            named = None
        return {f"{self.fact}_match": rate(reference.get(self.fact)), f"{self.fact}_follows": rate(named)}


def _colour_labels(world: World, pixels: np.ndarray) -> list[str | None]:
    names = list(COLOURS)
    # "any": references and samples may sit on any of the world's backgrounds
    return [names[i] if i >= 0 else None for i in dominant_colour(pixels, background="any")]


def _shape_labels(world: World, pixels: np.ndarray) -> list[str | None]:
    shapes = world.shapes
    return [shapes[i] if i >= 0 else None for i in detect_shape(pixels, shapes, background="any")]


def _texture_labels(world: World, pixels: np.ndarray) -> list[str | None]:
    found = detect_texture(pixels, background="any", texture_period=world.cfg.texture_period)
    return [TEXTURES[i] if i >= 0 else None for i in found]


@dataclass(frozen=True)
class MarkDetector:
    """A subject's mark (a small square of another palette colour, never named in captions): ``reference`` finds
    the colour marked on most reference photos (``detect_mark`` over every colour), ``score`` the fraction of
    samples that carry a mark of that colour (``mark_match``; None without a marked reference)."""

    def reference(self, world: World, pixels: np.ndarray) -> dict[str, Any]:
        found = {c: float(np.mean(detect_mark(pixels, c, background="any"))) for c in COLOURS}
        colour, share = max(found.items(), key=lambda kv: kv[1])
        return {"mark": colour if share >= 0.5 else None}

    def score(self, world: World, pixels: np.ndarray, reference: dict[str, Any],
              prompt: str) -> dict[str, float | None]:
        mark = reference.get("mark")
        return {"mark_match": None if mark is None else float(np.mean(detect_mark(pixels, mark, background="any")))}


@dataclass(frozen=True)
class AllOf:
    """Samples showing every part's reference value at once (``{name}_match``; None where a part has no
    reference): a sample in the subject's colour and the class's silhouette but not its texture is not the
    subject, and the parts' separate rates cannot say how many samples get all of them."""
    name: str
    parts: tuple[LabelDetector, ...]

    def reference(self, world: World, pixels: np.ndarray) -> dict[str, Any]:
        return {k: v for part in self.parts for k, v in part.reference(world, pixels).items()}

    def score(self, world: World, pixels: np.ndarray, reference: dict[str, Any],
              prompt: str) -> dict[str, float | None]:
        wants = [reference.get(part.fact) for part in self.parts]
        if any(want is None for want in wants):
            return {f"{self.name}_match": None}
        hits = np.ones(len(pixels), bool)
        for part, want in zip(self.parts, wants):
            hits &= np.array([label == want for label in part.labels(world, pixels)])
        return {f"{self.name}_match": float(np.mean(hits))}


_COLOUR = LabelDetector("colour", _colour_labels, lambda world: tuple(COLOURS))
_SHAPE = LabelDetector("shape", _shape_labels, lambda world: world.shapes)
_TEXTURE = LabelDetector("texture", _texture_labels, lambda world: TEXTURES)
# ``subject_match``: the references' silhouette, colour and texture in one sample (a world subject but its mark)
WORLD_DETECTORS: tuple[Detector, ...] = (_COLOUR, _SHAPE, _TEXTURE, MarkDetector(),
                                         AllOf("subject", (_SHAPE, _COLOUR, _TEXTURE)))


# --------------------------------------------------------------------------- measuring

def _rectangular(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every key seen (first-seen order), None where it did not apply."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def _means(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each metric averaged over the prompts it applies to."""
    out = {}
    for key in rows[0]:
        if key != "prompt":
            values = [row[key] for row in rows if row[key] is not None]
            out[key] = float(np.mean(values)) if values else None
    return out


def measure(prompts: Sequence[str], images: Sequence[np.ndarray], *, references: np.ndarray | None = None,
            evaluator: CLIPEvaluator | None = None, world: World | None = None,
            detectors: Sequence[Detector] = WORLD_DETECTORS) -> dict[str, Any]:
    """Metrics of samples already made: ``images[k]`` ``(N, H, W, 3)`` in [0, 1] are ``prompts[k]``'s.

    Returns ``{"prompts": [row per prompt], "mean": {...}, "references": {...}}``; a row is ``{"prompt": ...,
    metric: value or None}``. CLIP metrics need ``evaluator`` (a ``CLIPEvaluator``), detector metrics ``world``.
    """
    if len(prompts) != len(images) or not prompts:
        raise ValueError(f"measure: {len(prompts)} prompts for {len(images)} image sets (need as many, >= 1)")
    refs = None if references is None else unit_images(references, "references")
    facts: dict[str, Any] = {}
    if world is not None and refs is not None:
        for detector in detectors:
            facts.update(detector.reference(world, unit_to_uint8(refs)))
    rows = []
    for prompt, samples in zip(prompts, images):
        samples = unit_images(samples, f"samples of {prompt!r}")
        row: dict[str, Any] = {"prompt": prompt}
        if evaluator is not None:
            row.update(evaluator.evaluate(samples, prompts=prompt, references=refs))
            row.pop("lpips_style", None)  # it pairs sample j with photo j, which are unrelated images here
        if world is not None:
            for detector in detectors:
                row.update(detector.score(world, unit_to_uint8(samples), facts, prompt))
        rows.append(row)
    rows = _rectangular(rows)
    results: dict[str, Any] = {"prompts": rows, "mean": _means(rows)}
    if refs is not None:
        results["references"] = {"count": len(refs), **facts}
    return results


def sample_prompt(pipe: Pipeline, prompt: str, negative_prompt: str, num_images: int, *, seed: int, num_steps: int,
                  guidance_scale: float, batch_size: int = 16, params: Mapping[str, Any] | None = None) -> np.ndarray:
    """``num_images`` samples of ``prompt`` in [0, 1], ``(N, H, W, 3)``, as ``evaluate_pipeline`` draws them (image
    ``j`` from ``sample.initial_latents(seed, ...)``'s ``j``-th noise, whatever ``batch_size``)."""
    from persguard_jax.sample import text_to_image
    chunks = [text_to_image(pipe, [prompt] * min(batch_size, num_images - start), negative_prompt,
                            num_steps=num_steps, guidance_scale=guidance_scale, seed=seed, seed_offset=start,
                            progress=False, params=params)
              for start in range(0, num_images, batch_size)]
    return np.clip(np.concatenate(chunks).astype(np.float32), 0.0, 1.0)


def evaluate_pipeline(pipe: Pipeline, prompts: str | Sequence[str], *, references: np.ndarray | None = None,
                      evaluator: CLIPEvaluator | None = None, world: World | None = None, num_images: int = 4,
                      seed: int = 0, num_steps: int = 25, guidance_scale: float = 7.5, negative_prompt: str = "",
                      batch_size: int = 16, detectors: Sequence[Detector] = WORLD_DETECTORS,
                      params: Mapping[str, Any] | None = None) -> Evaluation:
    """Sample ``num_images`` per prompt (DDIM, ``num_steps``, classifier-free guidance against
    ``negative_prompt``) and ``measure`` them against ``references`` (uint8, or floats in [0, 1]).

    Seeds: image ``j`` of every prompt starts from the same noise, ``sample.initial_latents(seed, ...)``'s
    ``j``-th, whatever the other prompts, their order or ``batch_size``. So a call repeats exactly, and prompts
    (or two models: before and after personalisation) are compared on the same starting noise. ``params`` (a
    pure-dict tree, e.g. what ``personalize`` returns) is sampled instead of the pipeline's own weights, with
    the same compiled programs.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or num_images < 1:
        raise ValueError(f"evaluate_pipeline: need >= 1 prompt and num_images >= 1, got {len(prompts)}, {num_images}")
    images = np.stack([sample_prompt(pipe, p, negative_prompt, num_images, seed=seed, num_steps=num_steps,
                                     guidance_scale=guidance_scale, batch_size=batch_size, params=params)
                       for p in prompts])
    results = measure(prompts, images, references=references, evaluator=evaluator, world=world, detectors=detectors)
    results["settings"] = {"num_images": num_images, "seed": seed, "num_steps": num_steps, "sampler": "ddim",
                           "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
    return Evaluation(tuple(prompts), images, results)


# --------------------------------------------------------------------------- reports

def _cell(value: Any) -> str:
    text = "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def evaluation_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per prompt, then the mean over prompts."""
    keys = [k for k in results["prompts"][0] if k != "prompt"]
    lines = ["| prompt | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for row in results["prompts"]:
        lines.append(f"| {_cell(row['prompt'])} | " + " | ".join(_cell(row[k]) for k in keys) + " |")
    lines.append("| **mean** | " + " | ".join(_cell(results["mean"].get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _markdown(results: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", "Numbers as stored in `results.json` beside this file (4 significant digits here); "
             "— where a metric does not apply.", "", evaluation_table(results), ""]
    for section in ("references", "settings"):
        if results.get(section):
            lines += [f"## {section}", "", *[f"- {k}: {_cell(v)}" for k, v in results[section].items()], ""]
    return "\n".join(lines)


def _fit(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Images resized (bicubic) to ``height x width`` for display beside the samples."""
    if images.shape[1:3] == (height, width):
        return images
    from PIL import Image
    return uint8_to_unit(np.stack([np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))
                                   for img in unit_to_uint8(images)]))


def evaluation_grid(evaluation: Evaluation, references: np.ndarray | None = None) -> np.ndarray:
    """uint8 sheet: a row of references (the first ``N``, padded white), then one row per prompt, labelled."""
    from persguard_jax.report import labelled_grid
    n, h, w = evaluation.images.shape[1:4]
    rows, labels = [], []
    if references is not None:
        refs = _fit(unit_images(references, "references")[:n], h, w)
        rows.append(np.concatenate([refs, np.ones((n - len(refs), h, w, 3), np.float32)]))
        labels.append("references")
    rows += list(evaluation.images)
    labels += list(evaluation.prompts)
    return labelled_grid(np.concatenate(rows), row_labels=labels)


def write_evaluation(out_dir: str | Path, evaluation: Evaluation, *, title: str,
                     references: np.ndarray | None = None, overwrite: bool = False) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``grid.png`` in ``out_dir`` (created if absent).

    As ``report.write_results``: an existing file among the three is never replaced unless ``overwrite``, and all
    three are checked before any is written."""
    from persguard_jax.report import save_png, write_results
    out = Path(out_dir)
    paths = {"results": out / "results.json", "markdown": out / "results.md", "grid": out / "grid.png"}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: already exists (pass overwrite=True to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    save_png(evaluation_grid(evaluation, references), paths["grid"], overwrite=overwrite)
    write_results(out, evaluation.results, title=title, overwrite=overwrite,
                  markdown=_markdown(evaluation.results, title))
    return paths
