"""The world as data: ``WorldSource`` (a grain random-access source of captioned scenes), ``render_dataset`` (a
source rendered once into arrays) and ``save_photos`` (a subject's photos as an instance folder of PNGs)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from persguard_jax.data.world.scenes import SceneSpec, class_caption
from persguard_jax.data.world.subjects import Subject, World, pick


class WorldSource:
    """A grain random-access source of ``size`` captioned scenes (picklable, stateless).

    Item ``i``: ``{"image": uint8 (S, S, 3), "caption": str, "shape": int32, "colour": int32}``. About
    ``class_fraction`` of the items are photos of non-held-out class members, captioned with class forms
    ("a photo of a dog", "a photo of dog": on the plain background; or the full caption, which never names the
    mark); about ``simple_fraction`` are ``world.simple_spec(i, split)`` (one centred object on the plain
    background, plain or textured, the canonical caption); the rest are ``world.random_spec(i, split)``. Held-out
    subjects never appear.
    """

    def __init__(self, world: World, size: int, *, split: str = "train", class_fraction: float = 0.3,
                 simple_fraction: float = 0.0):
        if not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"WorldSource size must be a positive integer, got {size!r}")
        for name, value in (("class_fraction", class_fraction), ("simple_fraction", simple_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if class_fraction + simple_fraction > 1.0:
            raise ValueError(f"class_fraction + simple_fraction must be <= 1, got {class_fraction} + {simple_fraction}")
        World._split_code(split)
        self.world, self.size, self.split = world, int(size), split
        self.class_fraction, self.simple_fraction = float(class_fraction), float(simple_fraction)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"WorldSource({self.world!r}, {self.size}, split={self.split!r}, class_fraction={self.class_fraction}, "
                f"simple_fraction={self.simple_fraction})")

    def describe(self, index: int) -> tuple[SceneSpec, str, Subject | None]:
        """Item ``index`` before rendering: its spec, caption, and the subject photographed (None if generic)."""
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a WorldSource of {self.size} items")
        index %= self.size
        world = self.world
        rng = world._rng("source", world._split_code(self.split), index)
        r = rng.random(4)
        if r[0] < self.class_fraction:
            class_name = pick(world.cfg.classes, r[1])
            spec, member = world.class_spec(class_name, int(r[2] * 2**31))
            form = r[3]
            if form >= 0.4:
                return spec, world.caption(spec), member
            # a caption naming only the class names no background either: the photo is on the plain one, so the
            # class prompt draws class members, not the average of every background behind them (which at
            # guidance 4 came out as multicoloured blobs on stripes)
            spec = dataclasses.replace(spec, background="plain")
            caption = class_caption(class_name) if form < 0.3 else world.class_prompt(class_name)
            return spec, caption, member
        if r[0] < self.class_fraction + self.simple_fraction:
            spec = world.simple_spec(index, self.split)
            return spec, world.caption(spec), None
        spec = world.random_spec(index, self.split)
        return spec, world.caption(spec), None

    def __getitem__(self, index: int) -> dict:
        spec, caption, _ = self.describe(index)
        labels = self.world.labels(spec)
        return {"image": self.world.render(spec), "caption": caption,
                "shape": np.int32(labels["shape"]), "colour": np.int32(labels["colour"])}

def render_dataset(world: World, size: int, *, split: str = "train", class_fraction: float = 0.3,
                   simple_fraction: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """``size`` world images (uint8) and captions (``WorldSource``), rendered once with a progress bar."""
    from tqdm.auto import tqdm  # only here: importing the world stays light
    source = WorldSource(world, size, split=split, class_fraction=class_fraction, simple_fraction=simple_fraction)
    images = np.empty((size, world.cfg.image_size, world.cfg.image_size, 3), np.uint8)
    captions = []
    with tqdm(range(size), desc="rendering the world", unit="img", mininterval=1.0) as indices:
        for i in indices:
            item = source[i]
            images[i] = item["image"]
            captions.append(item["caption"])
    return images, captions


def save_photos(images: np.ndarray, folder: str | Path, prefix: str = "photo") -> list[Path]:
    """Write ``(N, S, S, 3)`` uint8 images as ``folder/prefix_000.png ...``; refuses (before writing anything)
    if any of those files exists, so a demo never silently replaces someone's photos."""
    from PIL import Image

    from persguard_jax.io import atomic_write
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"save_photos expects (N, S, S, 3) uint8 images, got {images.dtype} {images.shape}")
    folder = Path(folder)
    paths = [folder / f"{prefix}_{i:03d}.png" for i in range(len(images))]
    existing = [p.name for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"{folder}: will not overwrite existing {', '.join(existing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images):
        # atomic (a kill never leaves a cut PNG under its name); exclusive: fail rather than overwrite a file
        # that appeared meanwhile
        atomic_write(path, lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"), exclusive=True)
    return paths


# The world a model was trained on travels with it: ``persguard pretrain`` writes its ``WorldConfig`` beside the
# diffusers files (diffusers ignores extra files in the folder).
WORLD_FILE = "world_config.json"


def is_world_model(model_dir: str | Path) -> bool:
    return (Path(model_dir) / WORLD_FILE).is_file()


def world_of(model_dir: str | Path) -> World:
    """The ``World`` a pre-trained world model was trained on (its ``world_config.json``; the default world if
    the folder has none)."""
    from persguard_jax.data.world.subjects import WorldConfig
    from persguard_jax.io import read_json
    from persguard_jax.config import ConfigError
    path = Path(model_dir) / WORLD_FILE
    if not path.is_file():
        return World(WorldConfig())
    values = read_json(path, error=ConfigError)  # an unreadable file is named by read_json
    try:
        return World(WorldConfig.from_dict(values))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
