"""Files and pixels: atomic writes, JSON and JSONL, PNGs, and image uint8 <-> float. The bottom of the package.

Imports only the standard library, numpy and PIL (never another persguard_jax module), so every layer above (data,
models, engine, workflows, reports) can share these without pulling in jax or each other.

Writes go through a temporary file in the target folder and a rename, so a crash leaves the old file or the new
one, never half of either. Image arrays come in two float conventions: ``unit`` in [0, 1] (samples, reports, CLIP
inputs) and ``signed`` in [-1, 1] (what the VAE encodes); uint8 -> float -> uint8 is exact in both.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- files


def check_creatable(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output ``path`` that cannot be created: its nearest existing ancestor must be
    a writable folder (the folders in between are created when it is written)."""
    path = Path(path).absolute()
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None:
        return
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{path}: cannot be created, {parent} is not writable")
    try:  # os.access says yes to root on /proc and /sys and read-only mounts: try it
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".persguard-check."))
    except OSError as e:
        raise PermissionError(f"{path}: cannot be created in {parent} ({e.strerror or e})") from None


@functools.cache
def process_umask() -> int:
    """The process's umask, read once (reading it means setting it, which no other thread should see twice)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, exclusive: bool = False) -> None:
    """``write(tmp)`` fills a temporary file in ``path``'s folder, which then replaces ``path`` in one rename.
    The file gets the mode an ordinary ``open(path, "w")`` would give it (``mkstemp``'s own 0600 would hide a
    run's results from the rest of a group sharing them).

    If ``write`` raises, the temporary file is removed and ``path`` is left as it was. ``exclusive``: raise
    ``FileExistsError`` rather than replace an existing ``path`` (a hard link, which fails if it exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> Any:
    """The JSON value in ``path``. A missing file or invalid JSON raises ``error`` with a one-line message naming
    the file (callers pass their own type, e.g. ``WeightsError`` for a model folder's config)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not valid JSON (not UTF-8 text)") from None


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON with sorted keys (stable diffs), atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def read_jsonl(path: str | os.PathLike, *, unique: str | None = None) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped).

    With ``unique``, one record per value of that key, the last one written, sorted by it: a log that a resumed
    run appended to again (``unique="step"``) reads as one run."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not a JSON record ({e.msg}, column {e.colno})") from None
    if unique is None:
        return records
    by_key = {rec[unique]: rec for rec in records}
    return [by_key[k] for k in sorted(by_key)]


# --------------------------------------------------------------------------- pixels


def _float(images: Any) -> np.ndarray:
    """At least float32, and float64 stays float64: bf16/f16 samples would round the scaled values wrongly."""
    x = np.asarray(images)
    return x.astype(np.promote_types(x.dtype, np.float32), copy=False)


def unit_to_uint8(images: Any) -> np.ndarray:
    """Floats in [0, 1] (clipped) -> uint8 [0, 255], rounded to nearest."""
    return (np.clip(_float(images), 0.0, 1.0) * 255).round().astype(np.uint8)


def uint8_to_unit(images: Any) -> np.ndarray:
    """uint8 [0, 255] -> float32 in [0, 1]."""
    return np.asarray(images, np.float32) / 255.0


def signed_to_uint8(images: Any) -> np.ndarray:
    """Floats in [-1, 1] -> uint8 [0, 255]: the exact inverse of ``uint8_to_signed``, then clipped."""
    return np.clip(np.round((_float(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def uint8_to_signed(images: Any) -> np.ndarray:
    """uint8 [0, 255] -> float32 in [-1, 1] (the VAE's input scale)."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def save_png(array: np.ndarray, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write a uint8 ``(H, W, 3)`` or ``(H, W, 1)`` image atomically (a crash never leaves a truncated PNG).

    ``overwrite=False`` raises ``FileExistsError`` naming ``path`` if it exists. It defaults to True (unlike the
    report writers) because the workflows rewrite their sample sheets on every run into the same folder."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    img = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
