"""Instance photos from a folder, as float32 RGB arrays in [-1, 1] ready for the VAE encoder.

Every file is fully decoded and size-checked before anything else happens, and all problems in a folder are
reported together in one ``ImageFolderError``: a user fixing a folder of photos should not have to rerun once
per broken file, and a truncated photo must not surface as a crash hours into training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from persguard_jax.io import uint8_to_signed

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# 16-bit greyscale PNGs open in these modes; PIL's own convert("RGB") clips them at 255 instead of scaling.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

T = TypeVar("T")


class ImageFileError(ValueError):
    """One image file that cannot be used; ``reason`` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path}: {reason}")


class ImageFolderError(ValueError):
    """An instance folder that cannot be used: a summary line naming the folder, then one line per bad file."""

    def __init__(self, folder: str | os.PathLike, summary: str, problems: Mapping[str, str] | None = None):
        self.folder, self.problems = Path(folder), dict(problems or {})
        lines = [f"{self.folder}: {summary}"] + [f"  {name}: {why}" for name, why in self.problems.items()]
        super().__init__("\n".join(lines))


def _check_sizes(resolution: int, min_size: int | None) -> int:
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    # A photo much smaller than the training resolution would be mostly interpolation, not detail.
    min_size = resolution // 2 if min_size is None else min_size
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size!r}")
    return int(min_size)


def _reason(exc: BaseException) -> str:
    """A short, user-facing reason for a PIL failure."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (PIL cannot identify its format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({exc})"
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower():
        return f"truncated file ({message})"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"cannot open: {exc.strerror or message}"
    return f"cannot decode: {message}"


def _decode(path: Path, min_size: int) -> Image.Image:
    """Open, fully decode and upright one image; raise ImageFileError on any problem."""
    try:
        with Image.open(path) as img:
            # load() decodes every byte now: PIL is lazy, and a truncated file would otherwise fail much later.
            img.load()
            img = ImageOps.exif_transpose(img)  # phones store portrait shots sideways plus an orientation tag
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageFileError(path, _reason(exc)) from exc
    if min(img.size) < min_size:
        w, h = img.size
        raise ImageFileError(path, f"{w}x{h} is smaller than the minimum {min_size} px side")
    return img


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency becomes white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        img = Image.fromarray((np.asarray(img, np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # White, not black: transparent areas are usually the removed background of a cut-out photo, and a
        # black fill would teach the model dark backdrops (and dark halos along anti-aliased edges).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    try:
        return img.convert("RGB")  # L, P, CMYK, YCbCr, LAB, ...
    except ValueError as exc:
        raise ImageFileError(path, f"unsupported colour mode {img.mode}") from exc


def _resize_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the short side to ``resolution`` and keep the centred square.

    Resizing with a source ``box`` is the same as resize-then-crop, but without rounding the intermediate size,
    so the crop is exactly centred; Lanczos in PIL is antialiased when it shrinks.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((resolution, resolution), Image.LANCZOS, box=(left, top, left + side, top + side))


def load_image(path: str | os.PathLike, resolution: int, *, min_size: int | None = None) -> np.ndarray:
    """One photo as float32 ``(resolution, resolution, 3)`` in [-1, 1].

    EXIF orientation is applied, any colour mode becomes RGB (transparency on white), the short side is
    resized to ``resolution`` and the centre square kept. Raises ``ImageFileError`` for a file that is
    unreadable, truncated, or has a short side below ``min_size`` (default ``resolution // 2``).
    """
    min_size = _check_sizes(resolution, min_size)
    path = Path(path)
    img = _resize_crop(_to_rgb(_decode(path, min_size), path), int(resolution))
    return uint8_to_signed(np.asarray(img))


def _image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files of ``folder`` sorted by name (not recursive); raise if there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(folder, "folder does not exist")
    if not folder.is_dir():
        raise ImageFolderError(folder, "not a directory")
    # Hidden files are skipped: macOS leaves "._photo.jpg" metadata companions that are not photos.
    # A broken symlink stays in, so an image it should have been is reported ("cannot open"), not silently dropped.
    files = [p for p in folder.iterdir()
             if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")]
    images = sorted((p for p in files if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    if not images:
        ignored = len(files)
        raise ImageFolderError(folder, f"no images (accepted suffixes: {', '.join(IMAGE_SUFFIXES)}, any case); "
                                       f"{ignored} other file{'' if ignored == 1 else 's'} ignored")
    return images


def _each_or_report(folder: str | os.PathLike, paths: list[Path], fn: Callable[[Path], T]) -> list[T]:
    """``fn`` on every path; all ImageFileErrors are gathered into one ImageFolderError."""
    results, problems = [], {}
    for path in paths:
        try:
            results.append(fn(path))
        except ImageFileError as exc:
            problems[path.name] = exc.reason
    if problems:
        raise ImageFolderError(folder, f"{len(problems)} of {len(paths)} images cannot be used:", problems)
    return results


def scan_folder(folder: str | os.PathLike, resolution: int, *, min_size: int | None = None) -> list[Path]:
    """The folder's image files in sorted name order, each fully decoded and size-checked.

    Files with other suffixes are ignored. Raises one ``ImageFolderError`` listing every bad file.
    """
    min_size = _check_sizes(resolution, min_size)
    paths = _image_files(folder)
    _each_or_report(folder, paths, lambda p: _decode(p, min_size).close())
    return paths


def load_folder(folder: str | os.PathLike, resolution: int, *, min_size: int | None = None) -> np.ndarray:
    """All photos of ``folder`` as float32 ``(N, resolution, resolution, 3)`` in [-1, 1], in sorted name order.

    One pass: every file is decoded once, and if any is bad nothing is returned and one ``ImageFolderError``
    lists them all.
    """
    _check_sizes(resolution, min_size)
    paths = _image_files(folder)
    arrays = _each_or_report(folder, paths, lambda p: load_image(p, resolution, min_size=min_size))
    return np.stack(arrays)


def output_names(paths: list[Path]) -> list[str]:
    """Each input's output file name, ``stem.png`` (commands that write one image per photo); two inputs that would
    write one file are refused."""
    names = [f"{p.stem}.png" for p in paths]
    seen: dict[str, str] = {}
    for path, name in zip(paths, names):
        if name in seen:
            raise ValueError(f"{seen[name]} and {path.name} would both be written as {name}; rename one")
        seen[name] = path.name
    return names


def load_folder_as_is(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray]:
    """Every image of ``folder`` at its own size: its paths in sorted name order and uint8 ``(N, H, W, 3)`` RGB.

    For commands whose outputs must keep the inputs' pixels and size (``persguard purify``): nothing is resized or
    cropped, only made upright (EXIF) and RGB (transparency on white), as ``load_image`` does. One ``ImageFolderError``
    lists every unreadable file; a folder of mixed sizes is refused too, naming the files off the common size
    (one array holds the folder, and a purifier compiles for one shape).
    """
    paths = _image_files(folder)
    arrays = _each_or_report(folder, paths, lambda p: np.asarray(_to_rgb(_decode(p, 1), p)))
    by_size: dict[tuple[int, int], list[str]] = {}
    for path, array in zip(paths, arrays):
        by_size.setdefault(array.shape[:2], []).append(path.name)
    if len(by_size) > 1:
        common = max(by_size, key=lambda size: len(by_size[size]))
        problems = {name: f"{w}x{h}" for (h, w), names in by_size.items() if (h, w) != common for name in names}
        odd = f"{len(problems)} {'is' if len(problems) == 1 else 'are'} not"
        raise ImageFolderError(folder, f"images differ in size: every image must be {common[1]}x{common[0]} like "
                                       f"the other {len(by_size[common])}, and {odd}:", problems)
    return paths, np.stack(arrays)
