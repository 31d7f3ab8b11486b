"""Reports: image grids (PNG) now; loss curves and result tables join as the workflows land."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from persguard_jax.models.convert import atomic_write


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``(N, H, W, 3)`` images in [0, 1] into one uint8 ``(rows*H, cols*W, 3)`` array, white gaps."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"image_grid expects (N, H, W, 3) images, got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c), 255, np.uint8)
    pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, ncols)
        grid[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = img
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 image atomically (a crash never leaves a truncated PNG)."""
    path = Path(path)
    img = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
