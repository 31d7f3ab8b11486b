"""Read and write diffusers / transformers folders: one model folder, or a whole Stable Diffusion pipeline.

A model folder is ``config.json`` + safetensors weights (single file, sharded with an ``.index.json``, or an
``fp16`` variant). A pipeline folder has ``model_index.json`` and ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/`` subfolders. Models are built abstractly (``nnx.eval_shape``) and filled from
the file, so loading SD-size weights never initialises random ones first.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from persguard_jax.io import check_creatable, process_umask, save_json
from persguard_jax.models import clip, functional, unet, vae
from persguard_jax.models.convert import (WeightsError, find_weight_files, load_state_dict, read_json,
                                          read_tensors, rename_keys, save_safetensors, state_dict)
from persguard_jax.models.tokenizer import CLIPTokenizer

# The constants of OpenAI's CLIP image processor (every openai/clip-vit-* preprocessor_config.json).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"


@dataclass(frozen=True)
class ModelKind:
    """What it takes to read one folder type: config class, module class, file names and key fix-ups."""
    name: str
    config_cls: type
    model_cls: type
    weights: str
    renames: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    prepare: Callable[[dict], dict] = lambda t: t


# UNet checkpoints all use diffusers' current key names: no renames, nothing to ignore
UNET = ModelKind("unet", unet.UNetConfig, unet.UNet2DConditionModel, DIFFUSERS_WEIGHTS)
VAE = ModelKind("vae", vae.VAEConfig, vae.AutoencoderKL, DIFFUSERS_WEIGHTS, vae.LEGACY_RENAMES, vae.IGNORE_KEYS)
# SD text encoders are CLIPTextModel; a CLIPTextModelWithProjection folder loads too, projection unused.
TEXT = ModelKind("text_encoder", clip.CLIPTextConfig, clip.CLIPTextModel, TRANSFORMERS_WEIGHTS,
                 clip.LEGACY_RENAMES, [*clip.IGNORE_KEYS, r"^text_projection\."], clip.add_text_model_prefix)


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` when a model is built only for its shapes (weights come from a file).

    Every stream returns one fixed key and nothing is counted: ``nnx.Rngs`` increments a counter per draw,
    and under ``eval_shape`` each increment makes JAX walk the whole trace so far (flax 0.12 / jax 0.10),
    which made building the SD 1.5 UNet abstractly take ~9 s instead of ~1.4 s.
    """

    def __init__(self):
        self._key = jax.random.key(0)

    def __call__(self) -> jax.Array:
        return self._key

    def __getattr__(self, name: str):
        return self.__call__


def abstract_model(model_cls: type, config, **kw) -> nnx.Module:
    """``model_cls(config, **kw)`` with ``ShapeDtypeStruct`` parameters: no memory, no random init."""
    return nnx.eval_shape(lambda: model_cls(config, rngs=_ShapeOnlyRngs(), **kw))


def load_model(kind: ModelKind, folder: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
               variant: str | None = None) -> nnx.Module:
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: {kind.name} folder not found")
    config_path = folder / "config.json"
    config = kind.config_cls.from_dict(read_json(config_path), source=str(config_path))
    files = find_weight_files(folder, [kind.weights], variant)
    tensors, origin = read_tensors(files)
    tensors = kind.prepare(rename_keys(tensors, kind.renames))
    model = abstract_model(kind.model_cls, config, dtype=dtype, param_dtype=param_dtype)
    source = files[0] if len(files) == 1 else folder
    return load_state_dict(model, tensors, source=source, origin=origin, ignore=kind.ignore)


def save_model(model: nnx.Module, folder: str | Path, weights: str, *, dtype=None) -> None:
    """Write ``config.json`` and ``<weights>.safetensors`` (PyTorch layout) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_json(model.config.to_dict(), folder / "config.json")
    save_safetensors(state_dict(model, dtype=dtype), folder / f"{weights}.safetensors")


def load_unet(folder: str | Path, **kw) -> unet.UNet2DConditionModel:
    """``unet(latents_nhwc, timesteps, context) -> prediction`` (NHWC) from a diffusers ``unet/`` folder."""
    return load_model(UNET, folder, **kw)


def load_vae(folder: str | Path, **kw) -> vae.AutoencoderKL:
    """``vae.encode(images in [-1, 1]) -> (mean, logvar)``, ``vae.decode(z)`` from a diffusers ``vae/`` folder."""
    return load_model(VAE, folder, **kw)


def load_text_encoder(folder: str | Path, **kw) -> clip.CLIPTextModel:
    """``te(input_ids) -> last hidden state (B, L, D)`` from a transformers CLIP text folder."""
    return load_model(TEXT, folder, **kw)


# --------------------------------------------------------------------------- pipelines

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass
class Pipeline:
    """The parts of a Stable Diffusion pipeline this library uses (no safety checker, no feature extractor)."""
    unet: unet.UNet2DConditionModel
    vae: vae.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    model_index: dict[str, Any] = field(default_factory=lambda: dict(MODEL_INDEX))
    # an SD x4-upscaler pipeline's second scheduler (``low_res_scheduler/``): the DDPM schedule that noises the
    # low-resolution image the UNet is conditioned on (``persguard_jax.upscale``); None for text-to-image pipelines
    low_res_scheduler_config: dict[str, Any] | None = None

    MODULES = ("unet", "vae", "text_encoder")

    def split(self) -> tuple["functional.Modules", dict[str, Any]]:
        """(graph definitions, pure-dict parameters) of the three networks: the form samplers and losses take."""
        return functional.split_modules({name: getattr(self, name) for name in self.MODULES})

    def with_params(self, params: dict[str, Any]) -> "Pipeline":
        """A new pipeline whose networks carry ``params`` (any subset of unet / vae / text_encoder; the rest are
        shared with this one). Nothing is written into ``self``: a fine-tuned parameter tree is exported or
        sampled without touching the base model."""
        unknown = set(params) - set(self.MODULES)
        if unknown:
            raise KeyError(f"with_params: unknown networks {sorted(unknown)}; a pipeline has {list(self.MODULES)}")
        replaced = {name: nnx.merge(nnx.graphdef(getattr(self, name)), tree) for name, tree in params.items()}
        return dataclasses.replace(self, **replaced)


def load_pipeline(folder: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                  variant: str | None = None, attention: str = "auto") -> Pipeline:
    """The networks, tokenizer and scheduler configs of a diffusers pipeline folder; ``attention`` is the
    implementation every attention layer runs (``models.attention.IMPLEMENTATIONS``)."""
    from persguard_jax.models.attention import check_implementation, set_attention
    check_implementation(attention)
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(f"{index_path}: file not found; a pipeline folder needs model_index.json and unet/, "
                           f"vae/, text_encoder/, tokenizer/, scheduler/ (the diffusers layout)")
    index = read_json(index_path)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise WeightsError(f"{folder / part}: missing pipeline subfolder {part}/")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    low_res_path = folder / "low_res_scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path)
    from persguard_jax.schedulers import SchedulerConfig
    SchedulerConfig.from_dict(scheduler_config, source=str(scheduler_path))  # a bad value fails now, with its path
    kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
    pipe = Pipeline(
        unet=load_unet(folder / "unet", **kw),
        vae=load_vae(folder / "vae", **kw),
        text_encoder=load_text_encoder(folder / "text_encoder", **kw),
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=scheduler_config,
        model_index=index,
        low_res_scheduler_config=read_json(low_res_path) if low_res_path.is_file() else None,
    )
    for name in Pipeline.MODULES:
        set_attention(getattr(pipe, name), attention)
    return pipe


def check_pipeline_output(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """What ``save_pipeline`` checks before writing: ``out_dir`` is new, empty, or (with ``overwrite``) a pipeline
    folder (its ``model_index.json``), and can be created. A separate step so that every process of a multi-host
    run can check before process 0 alone writes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists and is not empty (pass overwrite=True / --overwrite)")
        if not (out_dir / "model_index.json").is_file():
            raise FileExistsError(f"{out_dir}: not a pipeline folder (no model_index.json); overwriting replaces "
                                  f"only a pipeline, so pick a new folder")
    if not out_dir.exists():
        check_creatable(out_dir)
    return out_dir


def _remove_stale_saves(out_dir: Path) -> None:
    """Delete the folders an earlier ``save_pipeline`` into ``out_dir`` left when killed part-way (a whole model
    each): its ``mkdtemp`` folders (``.<name>.`` and 8 characters) and ``.<name>.old``, nothing else."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.([a-z0-9_]{{8}}|old)")
    for stale in out_dir.parent.iterdir():
        if pattern.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def save_pipeline(pipe: Pipeline, out_dir: str | Path, *, dtype=None, overwrite: bool = False,
                  extra_json: dict[str, Any] | None = None) -> Path:
    """Write ``pipe`` in the diffusers layout (safetensors), loadable by ``StableDiffusionPipeline``.

    The folder is assembled beside ``out_dir`` and moved into place at the end, so a crash never leaves a
    half-written pipeline, and an existing non-empty ``out_dir`` is only replaced with ``overwrite=True``, and
    only if it holds a pipeline (its ``model_index.json``): overwriting never deletes a folder of other files.
    """
    out_dir = check_pipeline_output(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_saves(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    os.chmod(tmp, 0o777 & ~process_umask())  # the mode mkdir gives: mkdtemp's 0700 would hide the model from a group
    try:
        index = {k: v for k, v in pipe.model_index.items() if not k.startswith("_")}
        class_name = pipe.model_index.get("_class_name", MODEL_INDEX["_class_name"])
        text_to_image = class_name == MODEL_INDEX["_class_name"]
        for optional in ("safety_checker", "feature_extractor", "image_encoder", "watermarker"):
            if optional in index or (text_to_image and optional in MODEL_INDEX):
                index[optional] = [None, None]  # not carried: diffusers then loads without them
        if text_to_image or "requires_safety_checker" in index:
            index["requires_safety_checker"] = False
        save_json({"_class_name": class_name, **index}, tmp / "model_index.json")
        save_model(pipe.unet, tmp / "unet", DIFFUSERS_WEIGHTS, dtype=dtype)
        save_model(pipe.vae, tmp / "vae", DIFFUSERS_WEIGHTS, dtype=dtype)
        save_model(pipe.text_encoder, tmp / "text_encoder", TRANSFORMERS_WEIGHTS, dtype=dtype)
        pipe.tokenizer.save(tmp / "tokenizer")
        save_json(pipe.scheduler_config, tmp / "scheduler" / "scheduler_config.json")
        if pipe.low_res_scheduler_config is not None:
            save_json(pipe.low_res_scheduler_config, tmp / "low_res_scheduler" / "scheduler_config.json")
        for name, value in (extra_json or {}).items():  # e.g. world_config.json: part of the one rename
            save_json(value, tmp / name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)  # left by an earlier crash between the two renames
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


# --------------------------------------------------------------------------- CLIP folders

CLIP = ModelKind("clip", clip.CLIPConfig, clip.CLIPModel, TRANSFORMERS_WEIGHTS, clip.LEGACY_RENAMES, clip.IGNORE_KEYS)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageNorm:
    """The per-channel mean and std a CLIP was trained with (its ``preprocessor_config.json``)."""
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageNorm":
        """Read ``image_mean`` / ``image_std``; a folder without the file gets OpenAI's constants."""
        path = Path(folder) / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls()
        cfg = read_json(path)
        norm = cls(tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD)))
        if len(norm.mean) != 3 or len(norm.std) != 3 or min(norm.std) <= 0:
            raise WeightsError(f"{path}: image_mean/image_std need 3 values each, std > 0 (got {norm})")
        if cfg.get("do_rescale") is False or not math.isclose(cfg.get("rescale_factor", 1 / 255), 1 / 255):
            # our images are already in [0, 1]: anything but the standard 1/255 rescale would change the inputs
            raise WeightsError(f"{path}: only the standard do_rescale=true, rescale_factor=1/255 is supported")
        return norm


def load_clip(folder: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[
        clip.CLIPModel, CLIPTokenizer, ImageNorm]:
    """A transformers ``CLIPModel`` folder (e.g. openai/clip-vit-large-patch14 saved with safetensors) ->
    model, tokenizer (files in the folder itself or in ``tokenizer/``) and normalisation constants."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: CLIP folder not found (put a transformers CLIPModel folder there: "
                           f"config.json, model.safetensors, vocab.json, merges.txt, preprocessor_config.json)")
    if (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        raise WeightsError(f"{folder}: a diffusion pipeline folder (model_index.json), not a CLIP folder (a "
                           f"transformers CLIPModel: config.json, model.safetensors, vocab.json, merges.txt)")
    model = load_model(CLIP, folder, dtype=dtype, param_dtype=param_dtype)
    tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    return model, CLIPTokenizer.from_folder(tok_dir), ImageNorm.from_folder(folder)


def save_clip(model: clip.CLIPModel, tokenizer: CLIPTokenizer, folder: str | Path,
              norm: ImageNorm = ImageNorm()) -> Path:
    """Write a folder ``load_clip`` and transformers' ``CLIPModel`` / ``CLIPProcessor`` both read."""
    folder = Path(folder)
    tensors = state_dict(model)
    # config.json last: it is what marks the folder as a CLIP (resources.world_asset, load_clip), so a kill
    # part-way leaves no folder that passes for a complete one
    save_safetensors(tensors, folder / f"{TRANSFORMERS_WEIGHTS}.safetensors")
    tokenizer.save(folder)
    size = model.config.vision_config.image_size
    save_json({"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
               "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(norm.mean),
               "image_std": list(norm.std), "do_convert_rgb": True}, folder / PREPROCESSOR_CONFIG)
    save_json(model.config.to_dict(), folder / "config.json")
    return folder
