"""DreamBooth's data: photos and class images -> cached VAE posteriors and prompt conditioning -> examples.

- ``ensure_class_images``: the class-image cache, sampled from the model once with the class prompt (image ``i``
  from seed offset ``i``, so an interrupted generation resumes where it stopped and the set does not depend on
  the batch size or the number of processes: process ``p`` of ``n`` samples every ``n``-th batch).
- ``encode_latents``: the VAE posterior (mean, log-variance) of every image, computed once; the loss draws a
  latent from it each step (``losses.clean_latents``).
- ``prompt_conditioning``: token ids (the text encoder trains) or the text encoder's output (it is frozen).
- ``dreambooth_source``: with prior preservation, a ``PairSource`` of (instance, class) pairs and the map that
  lays a batch of pairs out as examples with ``is_prior``; without it, the instance examples alone.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from persguard_jax.dreambooth.config import DreamBoothConfig

Examples = dict[str, np.ndarray]


def ensure_class_images(pipe, folder: str | Path, cfg: DreamBoothConfig, *, params: Mapping[str, Any] | None = None,
                        progress: bool = True) -> np.ndarray:
    """Top ``folder`` up to ``cfg.num_class_images`` PNGs sampled with ``cfg.class_prompt`` and return the first
    ``num_class_images`` images of the folder (float32 in [-1, 1], ``cfg.resolution`` square, as ``load_folder``). Every file is written
    atomically by the process that sampled it; all processes then read the complete folder."""
    from tqdm.auto import tqdm

    from persguard_jax.data.images import IMAGE_SUFFIXES, load_folder
    from persguard_jax.io import save_png, unit_to_uint8
    from persguard_jax.sample import text_to_image
    from persguard_jax.train.distributed import barrier

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    offsets = list(range(have, cfg.num_class_images, cfg.class_batch_size))
    mine = offsets[jax.process_index()::jax.process_count()]
    with tqdm(total=sum(min(cfg.class_batch_size, cfg.num_class_images - o) for o in mine), desc="class images",
              unit="img", disable=not progress or not mine) as bar:
        for offset in mine:
            n = min(cfg.class_batch_size, cfg.num_class_images - offset)
            images = text_to_image(pipe, [cfg.class_prompt] * n, cfg.class_negative_prompt,
                                   num_steps=cfg.class_sample_steps, guidance_scale=cfg.class_guidance,
                                   seed=cfg.seed + 1, seed_offset=offset, height=cfg.resolution,
                                   width=cfg.resolution, progress=False, params=params)
            for j, image in enumerate(images):
                save_png(unit_to_uint8(image), folder / f"class_{offset + j:05d}.png")  # atomic: never a half file
            bar.update(n)
    barrier(f"class images {folder}")
    return load_folder(folder, cfg.resolution)[: cfg.num_class_images]


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x)


def encode_latents(vae: nnx.Module, images: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """VAE posterior (mean, logvar) of images in [-1, 1], ``batch`` at a time (the last chunk padded: one
    compiled shape per run; the program is cached per VAE graph, so later calls on the same model reuse it)."""
    graphdef, state = nnx.split(vae)
    state = state.to_pure_dict()
    batch = max(1, min(batch, len(images)))
    means, logvars = [], []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch].astype(np.float32)
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
        m, lv = _encode(graphdef, state, chunk)
        means.append(np.asarray(m, np.float32)[:n])
        logvars.append(np.asarray(lv, np.float32)[:n])
    return np.concatenate(means), np.concatenate(logvars)


def prompt_conditioning(pipe, prompt: str, n: int, *, embed: bool) -> Examples:
    """``n`` copies of the prompt's token ids (``input_ids``: the text encoder runs, and trains, in the loss),
    or, with ``embed``, of its text-encoder output (``context``: computed once for a frozen encoder)."""
    if embed:
        from persguard_jax.sample import encode_text
        return {"context": np.repeat(np.asarray(encode_text(pipe, [prompt]), np.float32), n, 0)}
    return {"input_ids": np.repeat(np.asarray(pipe.tokenizer([prompt]), np.int32), n, 0)}


def image_examples(pipe, images: np.ndarray, prompt: str, *, embed_prompt: bool) -> Examples:
    """One example per image (float32 in [-1, 1], as ``data.images.load_folder`` reads them): its cached VAE
    posterior and the prompt's conditioning."""
    mean, logvar = encode_latents(pipe.vae, images)
    return {"latent_mean": mean, "latent_logvar": logvar,
            **prompt_conditioning(pipe, prompt, len(mean), embed=embed_prompt)}


class PairSource:
    """Item ``i``: instance example ``i mod n_instance`` and class example ``i mod n_class`` stacked as
    ``(2, ...)``: one DreamBooth pair (``losses.pairs_to_examples`` lays a batch of them out as examples)."""

    def __init__(self, instance: Examples, prior: Examples):
        if set(instance) != set(prior):
            raise ValueError(f"instance and class examples differ in keys: {sorted(instance)} vs {sorted(prior)}")
        self.instance, self.prior = instance, prior
        self.n_instance = len(next(iter(instance.values())))
        self.n_prior = len(next(iter(prior.values())))

    def __len__(self) -> int:
        return max(self.n_instance, self.n_prior)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: np.stack([self.instance[k][i % self.n_instance], self.prior[k][i % self.n_prior]])
                for k in self.instance}


def dreambooth_source(pipe, instance_images: np.ndarray, class_images: np.ndarray | None,
                      cfg: DreamBoothConfig, *, text_trains: bool | None = None
                      ) -> tuple[Any, Callable[[dict], dict] | None]:
    """(source, map_fn) for ``train.fit``: pairs and their layout with prior preservation (``class_images``
    given and ``cfg.prior_weight > 0``), else the instance examples alone (no UNet pass is spent on a
    duplicate). ``text_trains``: whether the text encoder has trained parameters (default
    ``cfg.train_text_encoder``; LoRA adapters on it count); only when it has none are the prompts encoded once."""
    from persguard_jax.data.batches import ArraySource
    from persguard_jax.losses import pairs_to_examples
    embed = not (cfg.train_text_encoder if text_trains is None else text_trains)
    instance = image_examples(pipe, instance_images, cfg.instance_prompt, embed_prompt=embed)
    if class_images is None or not cfg.use_prior:
        return ArraySource(instance), None
    prior = image_examples(pipe, class_images, cfg.class_prompt, embed_prompt=embed)
    return PairSource(instance, prior), pairs_to_examples
