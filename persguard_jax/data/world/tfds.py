"""The synthetic world as a tensorflow-datasets dataset (array_record files), written and read without TensorFlow.

``build_tfds(WorldConfig(), "/data/tfds", sizes={"train": 20000, "val": 1000})`` writes
``/data/tfds/persguard_world/<config>/1.0.0/`` once (later calls find it and do nothing) and returns the builder;
``builder.as_data_source(split="train")`` is then a random-access source for grain whose record ``i`` is
``WorldSource(World(cfg), n, split=...)[i]``, except that the caption comes back as bytes and the labels as Python
ints; ``read_tfds(builder, "train")`` wraps it so the items are exactly ``WorldSource``'s.

Needs ``pip install tensorflow-datasets importlib_resources`` (the ``tfds`` extra). tfds image features encode
through TensorFlow, so images are stored as raw uint8 tensors; they are tiny, so nothing is lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from persguard_jax.data.world import SPLITS, World, WorldConfig, WorldSource

_VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class WorldBuilderConfig(tfds.core.BuilderConfig):
    """What one set of files holds: the world, the split sizes and the class fraction of ``WorldSource``."""
    world: dict = dataclasses.field(default_factory=dict)
    sizes: dict = dataclasses.field(default_factory=dict)
    class_fraction: float = 0.3


def _config_name(world: WorldConfig, sizes: Mapping[str, int], class_fraction: float) -> str:
    """A name that changes with anything that changes the files, so two worlds never share a folder."""
    key = json.dumps({"world": world.to_dict(), "sizes": dict(sizes), "class_fraction": class_fraction},
                     sort_keys=True)
    return f"s{world.image_size}_seed{world.seed}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class PersguardWorld(tfds.core.GeneratorBasedBuilder):
    """Captioned scenes of the persguard synthetic world (see persguard_jax.data.world)."""
    name = "persguard_world"
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        size = int(self.builder_config.world.get("image_size", 32))
        return self.dataset_info_from_configs(
            description="Procedural captioned images (shapes and subjects) of the persguard synthetic world.",
            features=tfds.features.FeaturesDict({
                # raw uint8, not tfds.features.Image: that one needs TensorFlow to encode PNGs
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "caption": tfds.features.Text(),
                "shape": tfds.features.Scalar(dtype=np.int32),
                "colour": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=None,
            disable_shuffling=True,  # record i is WorldSource item i (grain shuffles at read time)
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is generated
        return {split: self._generate_examples(split, n) for split, n in self.builder_config.sizes.items()}

    def _generate_examples(self, split: str, n: int):
        source = WorldSource(World(WorldConfig.from_dict(self.builder_config.world)), n, split=split,
                             class_fraction=self.builder_config.class_fraction)
        for i in range(n):
            yield i, source[i]


def build_tfds(world_cfg: WorldConfig, data_dir: str | Path, sizes: Mapping[str, int] | None = None, *,
               class_fraction: float = 0.3) -> PersguardWorld:
    """Write (unless already there) and return the builder for ``world_cfg`` with ``sizes`` items per split."""
    sizes = dict(sizes or {"train": 1000, "val": 100})
    bad = {k: v for k, v in sizes.items()
           if k not in SPLITS or not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0}
    if bad:
        raise ValueError(f"sizes must map splits {list(SPLITS)} to positive counts, got {bad}")
    sizes = {k: int(v) for k, v in sizes.items()}
    config = WorldBuilderConfig(name=_config_name(world_cfg, sizes, class_fraction), version=_VERSION,
                                description=f"world {world_cfg}, sizes {sizes}",
                                world=world_cfg.to_dict(), sizes=sizes, class_fraction=class_fraction)
    builder = PersguardWorld(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return builder


class TfdsWorldSource:
    """A tfds data source with items typed as ``WorldSource``'s (caption str, labels int32); picklable."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        item = self.source[index]
        caption = item["caption"]
        return {"image": np.asarray(item["image"], np.uint8),
                "caption": caption.decode("utf-8") if isinstance(caption, bytes) else str(caption),
                "shape": np.int32(item["shape"]), "colour": np.int32(item["colour"])}


def read_tfds(builder: PersguardWorld, split: str) -> TfdsWorldSource:
    return TfdsWorldSource(builder.as_data_source(split=split))
