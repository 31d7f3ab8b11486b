"""Fast random initialisation for the small models of tests, demos and the synthetic world.

``nnx`` initialisers run as jax ops, and XLA:CPU compiles each random sampler for each parameter shape: building
the tiny pipeline that way took ~30-50 s on 2 cores, nearly all of it compilation. Here the model is built
abstractly (no arrays) and filled from a seeded numpy generator with the same distributions the layers declare:
kernels LeCun-normal (variance 1/fan_in), embeddings N(0, 0.02^2), norm scales 1, biases 0, CLIP's logit scale its
configured value. Deterministic across processes and platforms.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from persguard_jax.models.functional import flatten


def _value(name: str, shape: tuple[int, ...], rng: np.random.Generator, config) -> np.ndarray:
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":
        fan_in = math.prod(shape[:-1]) or 1
        return rng.standard_normal(shape) / math.sqrt(fan_in)
    if leaf == "scale":
        return np.ones(shape)
    if leaf == "bias":
        return np.zeros(shape)
    if leaf == "logit_scale":
        return np.full(shape, getattr(config, "logit_scale_init_value", math.log(1 / 0.07)))
    return 0.02 * rng.standard_normal(shape)  # embedding tables, class embeddings


def random_init(model_cls: type, config, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Module:
    """``model_cls(config)`` with random parameters drawn by numpy (see module docstring)."""
    from persguard_jax.models.pretrained import abstract_model
    model = abstract_model(model_cls, config, dtype=dtype, param_dtype=param_dtype)
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    names = flatten(state.to_pure_dict())
    values = {name: _value(name, tuple(x.shape), rng, config).astype(x.dtype) for name, x in sorted(names.items())}

    def fill(tree, prefix=""):
        return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else jnp.asarray(values[f"{prefix}{k}"])
                for k, v in tree.items()}

    nnx.replace_by_pure_dict(state, fill(state.to_pure_dict()))
    nnx.update(model, state)
    return model
