"""NNX modules as (static graph, pure-dict parameters): the form losses and the training step work with.

``split_modules({"unet": unet, "text_encoder": te})`` returns a ``Modules`` (the graph definitions: static,
hashable, closed over by jitted functions) and ``params``, a nested dict of plain arrays keyed like the
modules' attributes (``params["unet"]["down_blocks"][0]["resnets"][1]["conv1"]["kernel"]``). Inside a loss,
``model.bind(params, "unet")`` rebuilds the module from whatever arrays it is given (tracers, bf16 casts,
sharded arrays). Plain dicts, not ``nnx.State``, cross the jit boundary: unwrapping ~600 nnx Variables per
call cost ~8 ms of Python per step on the tiny UNet (docs/benchmarks.md).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

Params = dict[str, Any]


@dataclass(frozen=True)
class Modules:
    """Graph definitions of named modules; ``bind`` merges them with parameters."""
    graphdefs: tuple[tuple[str, Any], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.graphdefs)

    def graphdef(self, name: str):
        for n, g in self.graphdefs:
            if n == name:
                return g
        raise KeyError(f"no module {name!r}; have {list(self.names)}")

    def bind(self, params: Mapping[str, Any], name: str) -> nnx.Module:
        if name not in params:
            raise KeyError(f"parameters for {name!r} missing; have {sorted(params)}")
        return nnx.merge(self.graphdef(name), params[name])

    def __contains__(self, name: str) -> bool:
        return name in self.names


def split_modules(modules: Mapping[str, nnx.Module]) -> tuple[Modules, Params]:
    """(Modules, params) from named NNX modules. Only ``nnx.Param`` state is supported (our ports have no other)."""
    graphdefs, params = [], {}
    for name, module in modules.items():
        graphdef, state, rest = nnx.split(module, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"{name}: has non-parameter state ({type(module).__name__}); not supported here")
        graphdefs.append((name, graphdef))
        params[name] = state.to_pure_dict()
    return Modules(tuple(graphdefs)), params


def update_modules(modules: Mapping[str, nnx.Module], params: Params) -> None:
    """Write ``params`` back into the NNX modules (e.g. to save a trained model with ``save_pipeline``)."""
    for name, tree in params.items():
        state = nnx.state(modules[name], nnx.Param)
        nnx.replace_by_pure_dict(state, tree)
        nnx.update(modules[name], state)


# --------------------------------------------------------------------------- parameter paths and selection

def path_str(path) -> str:
    """``unet/down_blocks/0/attentions/0/proj_in/kernel`` for a jax key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten(tree: Params) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _compile(patterns: str | Iterable[str]) -> Callable[[str], bool]:
    """A predicate on parameter paths. A pattern is a path prefix (``unet``, ``text_encoder/text_model``), a glob
    (``unet/*/attentions/*``) or, prefixed with ``re:``, a regular expression searched in the path."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    tests = []
    for p in pats:
        if p.startswith("re:"):
            rx = re.compile(p[3:])
            tests.append(lambda s, rx=rx: rx.search(s) is not None)
        elif any(c in p for c in "*?["):
            tests.append(lambda s, p=p: fnmatch.fnmatchcase(s, p) or fnmatch.fnmatchcase(s, p + "/*"))
        else:
            prefix = p.rstrip("/")
            tests.append(lambda s, prefix=prefix: s == prefix or s.startswith(prefix + "/"))
    return lambda s: any(t(s) for t in tests)


def partition(params: Params, trainable: str | Iterable[str]) -> tuple[Params, Params]:
    """Split ``params`` into (trainable, frozen) nested dicts by path patterns (see ``_compile``).

    Frozen parameters are passed to the step as a separate argument and never differentiated. Raises if the
    patterns select nothing, so a typo cannot silently freeze the whole model.
    """
    selected = _compile(trainable)

    def pick(tree, prefix, want):
        out = {}
        for k, v in tree.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                sub = pick(v, path, want)
                if sub:
                    out[k] = sub
            elif selected(path) == want:
                out[k] = v
        return out

    train, frozen = pick(params, "", True), pick(params, "", False)
    if not train:
        roots = sorted(params)
        raise ValueError(f"trainable patterns {trainable!r} select no parameter; top-level names: {roots}")
    return train, frozen


def merge(*trees: Params) -> Params:
    """Deep union of disjoint nested dicts (the inverse of ``partition``)."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            elif k in out:
                raise ValueError(f"parameter {k!r} is in more than one tree")
            else:
                out[k] = v
    return out


def cast_floating(tree: Any, dtype) -> Any:
    """Floating-point leaves cast to ``dtype`` (its transpose casts gradients back: fp32 master weights)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
