"""The check's attack on the clean model, stored with a fingerprint and lent to later runs (``check.clean_from``).

The check attacks every subject twice, from the backdoored and from the clean model. The clean half depends on
the clean model, the subject's photos, the attacker's recipe, the check's sampling and the protective output's
detector, and on nothing the implantation did, so an ablation that implants one clean model many times
(experiments/implant_ablation.py) repeated it in every run: two DreamBooth runs and their
samples per subject. Each run now stores its clean half (``check/<subject>/clean_result.json``, the samples beside
it as a lossless PNG; ``check/general_clean.json`` for the general prompts) with a fingerprint: one digest per
part it depends on. With ``check.clean_from=RUN`` a later run takes RUN's stored half where every part's digest
is equal and attacks afresh, naming the parts that differ, where one is not.

The fingerprint's ``code`` part digests this package's source, the jax, jaxlib and flax versions and the devices,
so numbers made by other code (or summed in another order on other devices) are never lent.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

Fingerprint = dict[str, str]

RESULT_FILE, SAMPLES_FILE, GENERAL_FILE = "clean_result.json", "clean_samples.png", "general_clean.json"


def digest(value: Any) -> str:
    """A sha256 of a pytree: its structure, then each leaf with its path: arrays by dtype, shape and bytes (PRNG
    keys by their bits), JSON scalars and strings as JSON, anything else (a frozen config dataclass, which prints
    every field) by ``repr``."""
    import jax
    leaves, treedef = jax.tree_util.tree_flatten_with_path(value)
    h = hashlib.sha256(str(treedef).encode())
    for path, leaf in leaves:
        h.update(jax.tree_util.keystr(path).encode() + b"=")
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"array{a.dtype.str}{a.shape};".encode() + a.tobytes())
        elif isinstance(leaf, (str, int, float, bool)):
            h.update(json.dumps(leaf).encode() + b";")
        else:
            h.update(repr(leaf).encode() + b";")
    return h.hexdigest()


def folder_digest(folder: str | Path | None) -> str | None:
    """Every file under ``folder`` by name and bytes (a CLIP the check measures with); None for None."""
    if folder is None:
        return None
    root, h = Path(folder), hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def code_digest() -> str:
    """This package's source files, the versions that compute with them and the devices they ran on."""
    import flax
    import jax
    import jaxlib
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    devices = f"{jax.default_backend()}:{jax.device_count()}:{jax.process_count()}"
    h.update(f"jax {jax.__version__} jaxlib {jaxlib.__version__} flax {flax.__version__} {devices}".encode())
    return h.hexdigest()


def fingerprint(**parts: Any) -> Fingerprint:
    """One digest per named part, and ``code``."""
    return {**{name: digest(value) for name, value in parts.items()}, "code": code_digest()}


def _check_parts(check, *, general: bool = False) -> dict:
    """The ``check`` settings a subject's clean half (or, ``general``, the clean model's general following)
    depends on: all but the reuse switch, the number of attacker seeds (each seed's half is stored on its own, its
    seed in the attacker's recipe) and those only the other one reads (a new setting counts for both)."""
    other = ("num_images", "pattern_threshold", "clip", "identifier") if general else ("per_colour", "per_shape")
    skip = ("clean_from", "enabled", "attack_seeds", *other)
    return {k: v for k, v in dataclasses.asdict(check).items() if k not in skip}


def subject_fingerprint(clean_digest: str, subject, implant, check, attacker_raw: Mapping, pattern, *, world,
                        clip_digest: str | None) -> Fingerprint:
    """What the check's attack on the clean model depends on for one subject: the clean parameters
    (``clean_digest``: ``digest`` of them), the subject's photos and names, its detector's settings (pattern,
    placement, prompts, the world's shapes), the attacker's recipe (its config's raw sections), the ``check``
    settings and the CLIP it measures with (``clip_digest``: ``folder_digest``); not the implantation's own
    settings (``implant``: the ``ImplantConfig``, read for the detector only)."""
    detector = {} if subject.type is None else {
        "placement": implant.placement(), "pattern": pattern if subject.type == "pattern" else None,
        "target_prompt": implant.target_prompt, "background_prompt": implant.background_prompt}
    in_world = world is not None and subject.spec.is_world
    return fingerprint(model=clean_digest, photos=subject.photos,
                       subject=(subject.name, subject.class_name, subject.type),
                       world=world.cfg.to_dict() if in_world else None, detector=detector, attacker=attacker_raw,
                       check=_check_parts(check), clip=clip_digest)


def general_fingerprint(clean_digest: str, world, check) -> Fingerprint:
    """What the clean model's general following depends on: its parameters, the world and the sampling."""
    return fingerprint(model=clean_digest, world=world.cfg.to_dict(), check=_check_parts(check, general=True))


def _differing(stored: Mapping[str, str], wanted: Fingerprint) -> list[str]:
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))


def _write(folder: Path, fp: Fingerprint, samples: np.ndarray, **record) -> None:
    """Samples (one lossless strip) and their record with ``fp`` into ``folder``: samples first, so a record never
    names samples that are not there (both writes are atomic)."""
    from persguard_jax.io import save_json, save_png
    save_png(np.concatenate(list(samples), axis=1), folder / SAMPLES_FILE)
    save_json({"fingerprint": fp, **record, "num_samples": len(samples)}, folder / RESULT_FILE)


def _read(folder: Path, fp: Fingerprint) -> tuple[dict | None, np.ndarray | None, str, float]:
    """``(record, samples, why, distance)`` stored in ``folder`` if made the way ``fp`` says (``_stored``); a
    record whose samples cannot be read is a miss."""
    saved, why, distance = _stored(folder / RESULT_FILE, fp)
    if saved is None:
        return None, None, why, distance
    try:
        return saved, stored_samples(folder, saved["num_samples"]), why, 0
    except (OSError, ValueError, KeyError) as e:  # a damaged record is a miss: the samples are made again
        return None, None, f"{folder / SAMPLES_FILE} is unreadable ({' '.join(str(e).split())})", 0


def store(folder: Path, fp: Fingerprint, before: dict | None, scores: dict, samples: np.ndarray) -> None:
    """Write a subject's clean half into ``folder`` (the run's ``check/<subject>``)."""
    _write(folder, fp, samples, before_attack=before, scores=scores)


def _stored(path: Path, fp: Fingerprint) -> tuple[dict | None, str, float]:
    """The stored record at ``path`` if its fingerprint is ``fp``, why (or why not), and how far it is (the number
    of parts that differ; infinite without a record)."""
    from persguard_jax.io import read_json
    if not path.is_file():
        return None, f"{path} does not exist", float("inf")
    saved = read_json(path)
    differ = _differing(saved.get("fingerprint", {}), fp)
    if differ:
        return None, f"{path} was made with another {', '.join(differ)}", len(differ)
    return saved, f"reused from {path}", 0


def attack_folder(run: str | Path, subject: str, seed: int, *, first: bool) -> Path:
    """Where the check keeps one attacker seed's attacks on ``subject`` (and their clean half): the first seed's
    in ``check/<subject>``, each further seed's (``check.attack_seeds``) in ``check/<subject>/seed<seed>``."""
    folder = Path(run) / "check" / subject
    return folder if first else folder / f"seed{seed}"


def attack_folders(run: str | Path, subject: str) -> list[Path]:
    """Every attacker seed's folder of ``subject`` in ``run`` (``attack_folder``), the first seed's first and the
    further ones in the order of their seeds."""
    first = Path(run) / "check" / subject
    return [first, *sorted(first.glob("seed*"), key=lambda f: int(f.name[len("seed"):]))]


def lookup(run: str | Path | None, subject: str, fp: Fingerprint) -> tuple[tuple | None, str]:
    """``((before, scores, samples), why)`` from ``run``'s stored clean half of ``subject`` made the way ``fp``
    says, or ``(None, why)`` when there is none (``why`` names the parts that differ in the nearest record). The
    records are the first attacker seed's (``check/<subject>``) and the further seeds' (``check/<subject>/seed*``,
    ``check.attack_seeds``), so a run reuses whichever seed it attacks with."""
    if run is None:
        return None, "check.clean_from is not set"
    misses = []
    for folder in attack_folders(run, subject):
        saved, samples, why, distance = _read(folder, fp)
        if saved is not None:
            return (saved["before_attack"], saved["scores"], samples), why
        misses.append((distance, why))
    return None, min(misses, key=lambda m: m[0])[1]


def stored_samples(folder: str | Path, num_samples: int | None = None) -> np.ndarray:
    """The clean half's samples stored in ``folder`` (``check/<subject>``), uint8 ``(N, S, S, 3)``: ``num_samples``
    side by side in one lossless strip (None: as many as the record beside it names)."""
    from PIL import Image

    from persguard_jax.io import read_json
    folder = Path(folder)
    if num_samples is None:
        num_samples = read_json(folder / RESULT_FILE)["num_samples"]
    try:
        with Image.open(folder / SAMPLES_FILE) as image:
            strip = np.asarray(image.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{folder / SAMPLES_FILE}: cannot read the stored samples ({e})") from None
    return np.stack(np.split(strip, num_samples, axis=1))


def store_general(run: Path, fp: Fingerprint, following: dict) -> None:
    """Write the clean model's general following into ``run``'s ``check/`` folder (atomically)."""
    from persguard_jax.io import save_json
    save_json({"fingerprint": fp, "following": following}, run / "check" / GENERAL_FILE)


def lookup_general(run: str | Path | None, fp: Fingerprint) -> tuple[dict | None, str]:
    """The clean model's general following stored in ``run``, if its fingerprint is ``fp``, and why (or why not)."""
    if run is None:
        return None, "check.clean_from is not set"
    saved, why, _ = _stored(Path(run) / "check" / GENERAL_FILE, fp)
    return (None if saved is None else saved["following"]), why


def class_prompt_fingerprint(clean_digest: str, class_name: str, check) -> Fingerprint:
    """What the clean model's samples of a class prompt before any attack depend on (``implant.check
    .class_prompt_samples``): its parameters, the class and the check's sampler; no subject."""
    sampler = {k: getattr(check, k) for k in ("num_images", "seed", "eval_steps", "eval_guidance")}
    return fingerprint(model=clean_digest, class_name=class_name, sampler=sampler)


def class_prompt_folder(run: str | Path, class_name: str) -> Path:
    """Where a run keeps the clean model's class-prompt samples of ``class_name`` (beside ``class_images/``)."""
    return Path(run) / "class_prompt" / class_name


def store_class_prompt(run: Path, class_name: str, fp: Fingerprint, samples: np.ndarray) -> None:
    """Write the clean model's class-prompt samples and their fingerprint."""
    _write(class_prompt_folder(run, class_name), fp, samples)


def lookup_class_prompt(run: str | Path | None, class_name: str, fp: Fingerprint) -> tuple[np.ndarray | None, str]:
    """``run``'s stored clean class-prompt samples of ``class_name`` if made the way ``fp`` says, and why (or why
    not)."""
    if run is None:
        return None, "check.clean_from is not set"
    _, samples, why, _ = _read(class_prompt_folder(run, class_name), fp)
    return samples, why
