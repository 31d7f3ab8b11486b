"""PyTorch state dicts (diffusers / transformers safetensors) <-> NNX modules, both ways.

Because the ports name their attributes exactly like the PyTorch modules (layers.py), one generic rule
maps every parameter: the flat NNX path joined by dots is the PyTorch key, with the leaf renamed
(kernel/scale/embedding -> weight) and the array re-laid out (conv OIHW <-> HWIO, linear (O, I) <-> (I, O)).
Model-specific knowledge is limited to key renames for legacy checkpoints and buffers to ignore.

Loading never unpickles: ``.bin``/``.ckpt``/``.pt`` files are refused with a message saying how to convert.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from persguard_jax.config import check_fields
from persguard_jax.io import atomic_write
from persguard_jax.io import read_json as _read_json
from persguard_jax.io import save_json  # noqa: F401  (moved to io; re-exported for callers of models.convert)

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class WeightsError(ValueError):
    """A weights folder or file that cannot be read into a model; the message names file and key."""


# --------------------------------------------------------------------------- file level

def _variant_name(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, _, ext = name.partition(".")
    return f"{stem}.{variant}.{ext}"


def read_json(path: str | Path) -> dict:
    """``io.read_json`` raising ``WeightsError``: a model folder's JSON files are part of its weights, and each
    of them (configs, ``model_index.json``, ``vocab.json``) is a JSON object."""
    value = _read_json(path, error=WeightsError)
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object {{...}}, got {type(value).__name__}")
    return value


def find_weight_files(folder: Path, stems: Iterable[str], variant: str | None = None) -> list[Path]:
    """The safetensors file(s) holding a model's weights in ``folder``.

    Looks for ``<stem>[.<variant>].safetensors`` and the sharded ``<stem>.safetensors.index[.<variant>].json``;
    without a variant the plain file wins and a lone ``fp16`` variant is accepted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory")
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        for stem in stems:
            single = folder / _variant_name(f"{stem}.safetensors", v)
            if single.is_file():
                return [single]
            index = folder / (f"{stem}.safetensors.index.json" if not v else f"{stem}.safetensors.index.{v}.json")
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise WeightsError(f"{index}: no 'weight_map' in the shard index")
                odd = [k for k, f in weight_map.items() if not isinstance(f, str) or not f]
                if odd:
                    raise WeightsError(f"{index}: weight_map[{odd[0]!r}] is {weight_map[odd[0]]!r}, not a shard file "
                                       f"name")
                files = [folder / f for f in dict.fromkeys(weight_map.values())]
                for f in files:
                    if not f.is_file():
                        raise WeightsError(f"{index}: names shard {f.name}, which is missing")
                return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder / pickles[0]}: pickle weights are never loaded (arbitrary code execution). Convert once "
            f"with PyTorch: `from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)` in "
            f"diffusers/transformers, then point persguard at the folder again")
    wanted = ", ".join(_variant_name(f"{s}.safetensors", variants[0]) for s in stems)
    raise WeightsError(f"{folder}: no weights found (expected {wanted} or a sharded .index.json)")


def read_tensors(files: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """All tensors of the given safetensors files, and the file each key came from."""
    tensors, origin = {}, {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types; one line is what users need
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
        tensors.update(part)
        origin.update(dict.fromkeys(part, f))
    return tensors, origin


# --------------------------------------------------------------------------- key and layout rules

def torch_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, LEAF_TO_TORCH.get(leaf, leaf)])


def to_flax_layout(arr: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4 and target_ndim == 2 and arr.shape[2:] == (1, 1):
        arr = arr[:, :, 0, 0]  # 1x1 conv stored where a linear is expected (old VAE attention)
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def to_torch_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def _torch_shape(shape: tuple, leaf: str) -> tuple:
    return to_torch_layout(np.empty(shape, dtype=np.uint8), leaf).shape


def rename_keys(tensors: Mapping[str, np.ndarray], rules: Iterable[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Apply regex ``(pattern, replacement)`` rules to every key (legacy names -> current names)."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in tensors.items():
        for p, r in rules:
            k = p.sub(r, k)
        out[k] = v
    return out


# --------------------------------------------------------------------------- module level

def params_of(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def load_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, source: str | Path,
                    origin: Mapping[str, Path] | None = None, ignore: Iterable[str] = ()) -> nnx.Module:
    """Fill every parameter of ``model`` (possibly abstract, from ``nnx.eval_shape``) from ``tensors``.

    Fails on the first missing key, shape mismatch or unexpected key, naming the file and the key.
    ``ignore`` holds regexes of PyTorch keys that are buffers, not parameters (e.g. ``position_ids``).
    """
    origin = origin or {}
    ignore = [re.compile(p) for p in ignore]
    where = lambda k: origin.get(k, source)
    used = set()
    for path, var in params_of(model):
        key, leaf = torch_key(path), str(path[-1])
        shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
        if key not in tensors:
            raise WeightsError(f"{source}: missing key {key} (expected shape {_torch_shape(shape, leaf)})")
        arr = to_flax_layout(np.asarray(tensors[key]), leaf, len(shape))
        if tuple(arr.shape) != shape:
            raise WeightsError(f"{where(key)}: key {key} has shape {tuple(np.shape(tensors[key]))}, "
                               f"the config expects {_torch_shape(shape, leaf)}")
        if jnp.issubdtype(dtype, jnp.inexact) and not np.issubdtype(arr.dtype, np.inexact):
            raise WeightsError(f"{where(key)}: key {key} holds {arr.dtype} values; a parameter is floating point")
        var.set_value(jnp.asarray(arr, dtype=dtype))
        used.add(key)
    extra = [k for k in tensors if k not in used and not any(p.search(k) for p in ignore)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"{where(extra[0])}: unexpected key {extra[0]}{more}: the weights do not match "
                           f"the config (wrong model type or block configuration?)")
    return model


def state_dict(model: nnx.Module, *, prefix: str = "", dtype=None) -> dict[str, np.ndarray]:
    """The PyTorch-layout state dict of ``model`` (host numpy arrays, contiguous)."""
    out = {}
    for path, var in params_of(model):
        arr = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            arr = arr.astype(dtype)
        # np.array, not ascontiguousarray: the latter turns 0-d arrays (CLIP's logit_scale) into shape (1,)
        out[prefix + torch_key(path)] = np.array(to_torch_layout(arr, str(path[-1])), order="C")
    return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: dict | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=metadata or {"format": "pt"}))


def config_kwargs(cls: type, d: Mapping[str, Any], source: str, class_name: str, port: str, *,
                  ignored: Iterable[str] = (), default_only: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of the config dataclass ``cls`` in a diffusers ``config.json`` dict ``d``: private
    keys (``_class_name``, ``_diffusers_version``) and ``ignored`` ones dropped, each ``default_only`` key checked
    to hold the one value the JAX ``port`` supports, any other key ``cls`` lacks refused, naming ``source``."""
    names = {f.name for f in dataclasses.fields(cls)}
    ignored, default_only = set(ignored), dict(default_only or {})
    kw = {}
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in default_only:
            if value != default_only[key]:
                raise WeightsError(f"{source}: {key}={value!r} is not supported by the JAX {port} "
                                   f"(only {default_only[key]!r})")
            continue
        if key not in names:
            raise WeightsError(f"{source}: unknown {class_name} option {key!r}")
        kw[key] = value
    # every value of the right type and range, or an error naming the file and key (not a traceback at init)
    return check_fields(cls, kw, source, error=WeightsError, key_label="{where}: {key}")
