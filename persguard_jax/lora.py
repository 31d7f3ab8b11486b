"""LoRA (Hu et al., 2021, arXiv:2106.09685) as a pure transform of the parameter tree, optax-style.

A LoRA adapter is a second nested dict, ``lora``, that mirrors the paths of the targeted Linear layers and holds
two factors per layer::

    lora["unet"]["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]
        == {"lora_A": (in, r), "lora_B": (r, out)}

and ``apply_lora(params, lora, cfg)`` returns ``params`` with every targeted ``kernel`` (``(in, out)``, as our
Linear layers store it) replaced by ``kernel + scale * lora_A @ lora_B``, ``scale = alpha / rank``. Nothing
else changes: the models, the losses and the training step are the same as for full fine-tuning, with
trainable = ``lora`` and frozen = the base ``params``::

    cfg = LoRAConfig(rank=4)
    lora = init_lora(params, cfg, jax.random.key(0))
    loss = with_lora(bind(denoising_loss, model=model, schedule=schedule, cfg=LossConfig()), cfg)
    logical_lora = lora_logical_axes(logical, lora)     # shard it like its kernels
    state, state_sh = create_state(lora, logical_lora, optimizer, mesh, mesh_cfg)
    step = make_train_step(loss, optimizer, ...)        # step(state, frozen=params, batch)

The step hands the loss ``merge(lora, frozen)``: the ``lora_A``/``lora_B`` leaves sit next to the ``kernel``
they adapt, and ``with_lora`` splits them off and applies them (``split_lora`` + ``apply_lora``).

Initialisation (``LoRAConfig.init``): ``B = 0``, so the adapted model equals the base model at step 0 (and
dL/dA = 0 there: only B moves on the first step). ``A`` defaults to PEFT's and Microsoft loralib's
``kaiming_uniform_(a=sqrt(5))`` on the torch weight ``(r, in)``, i.e. U(-1/sqrt(in), 1/sqrt(in)): the first
update of B is ``scale * A^T dL/dW``, so A's scale sets B's effective learning rate, and matching PEFT keeps the
learning rates of the diffusers LoRA scripts (and of published recipes) meaningful here. ``"gaussian"`` is PEFT's
``init_lora_weights="gaussian"`` (N(0, (1/r)^2)), closer to the paper's "random Gaussian" wording.

Cost. The kernel is merged inside the step (a rank-r matmul per layer, negligible), so the backward pass forms
the dense ``dL/dW'`` of each targeted kernel (the same FLOPs as fully fine-tuning those layers) before reducing
it to ``dA = s dW' B^T`` and ``dB = s A^T dW'``; the savings are in what persists: the gradients, the optimizer
state and the checkpoints are those of the LoRA factors only. The frozen base can be stored in bf16: the merged
kernel keeps the kernel's dtype, the sum is formed in float32.

Export: ``merge_lora_into`` gives plain parameters (``trainable.Trainable.full_params`` calls it); save them as a
diffusers-format folder (``save_pipeline(pipe.with_params(params), ...)``) that loads in any PyTorch tool, no LoRA
support needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from persguard_jax.config import ConfigError, Section
from persguard_jax.models import functional as F
from persguard_jax.models.functional import _compile

Params = dict[str, Any]
FACTORS = ("lora_A", "lora_B")


def _attention_targets(prefix: str = "unet") -> tuple[str, ...]:
    return tuple(f"{prefix}/*/{attn}/{proj}" for attn in ("attn1", "attn2")
                 for proj in ("to_q", "to_k", "to_v", "to_out/0"))


# the UNet's self- and cross-attention projections (the default), and the CLIP text encoder's: train both with
# ``LoRAConfig(targets=UNET_ATTENTION + TEXT_ENCODER_ATTENTION)``
UNET_ATTENTION = _attention_targets()
TEXT_ENCODER_ATTENTION = tuple(f"text_encoder/*/self_attn/{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))


@dataclass(frozen=True)
class LoRAConfig(Section):
    """Which Linear layers get an adapter, its rank and scale (hashable: safe to close over in jitted code).

    ``targets`` are matched against the path of each 2-D ``kernel``'s parent module (``unet/down_blocks/0/
    attentions/0/transformer_blocks/0/attn1/to_q``) with ``functional._compile``'s rules: a path prefix, a glob
    (``*`` crosses ``/``) or ``re:`` + a regular expression searched in the path. Kernels that are not 2-D
    (convolutions) are never targeted.
    """
    SECTION = "lora"
    BOUNDS = {"rank": "[1, inf)", "alpha": "(0, inf)"}
    rank: int = 4
    alpha: float | None = None          # None = rank, i.e. scale 1 (the diffusers LoRA scripts' default)
    targets: tuple[str, ...] = UNET_ATTENTION
    # A's initialiser: kaiming_uniform (PEFT's default) | gaussian (std 1/r)
    init: Literal["kaiming_uniform", "gaussian"] = "kaiming_uniform"

    def __post_init__(self):
        super().__post_init__()
        if not self.targets:
            raise ConfigError("lora.targets: must name at least one pattern")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["targets"] = list(self.targets)
        return d


# --------------------------------------------------------------------------- walking nested dicts

def _kernels(tree: Mapping, keys: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(keys of the parent module, kernel) for every ``kernel`` leaf, in sorted path order."""
    for k in sorted(tree, key=str):
        v = tree[k]
        if isinstance(v, Mapping):
            yield from _kernels(v, keys + (k,))
        elif k == "kernel":
            yield keys, v


def _adapters(lora: Mapping, keys: tuple = ()) -> Iterator[tuple[tuple, Mapping]]:
    """(keys of the adapted module, {"lora_A", "lora_B"}) for every adapter in a LoRA tree."""
    if "lora_A" in lora or "lora_B" in lora:
        if set(lora) != set(FACTORS):
            raise ValueError(f"LoRA adapter at {_path(keys)!r} must hold exactly {FACTORS}, has {sorted(lora)}")
        yield keys, lora
        return
    for k in sorted(lora, key=str):
        v = lora[k]
        if not isinstance(v, Mapping):
            raise ValueError(f"unexpected leaf {_path(keys + (k,))!r} in a LoRA tree (only {FACTORS} leaves)")
        yield from _adapters(v, keys + (k,))


def _path(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def _get(tree: Mapping, keys: tuple) -> Any:
    for i, k in enumerate(keys):
        if not isinstance(tree, Mapping) or k not in tree:
            raise KeyError(f"{_path(keys[:i + 1])!r} is not in the parameter tree")
        tree = tree[k]
    return tree


def _set(tree: Mapping, keys: tuple, value: Any) -> dict:
    """A copy of ``tree`` with ``tree[keys...] = value``; only the dicts along ``keys`` are copied."""
    out = dict(tree)
    out[keys[0]] = value if len(keys) == 1 else _set(tree[keys[0]], keys[1:], value)
    return out


def _nest(items: list[tuple[tuple, Any]]) -> Params:
    out: dict = {}
    for keys, value in items:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


# --------------------------------------------------------------------------- the transform

def lora_targets(params: Params, cfg: LoRAConfig) -> list[str]:
    """Paths of the modules ``cfg.targets`` select (parents of 2-D kernels), sorted; raises if none."""
    return [_path(keys) for keys, _ in _select(params, cfg)]


def _select(params: Params, cfg: LoRAConfig) -> list[tuple[tuple, Any]]:
    match = _compile(cfg.targets)
    kernels = list(_kernels(params))
    picked = [(keys, k) for keys, k in kernels if len(k.shape) == 2 and match(_path(keys))]
    if not picked:
        linear = [_path(keys) for keys, k in kernels if len(k.shape) == 2]
        roots = {t.split("/")[0] for t in cfg.targets if not t.startswith("re:")}
        example = next((p for p in linear if "attn" in p and p.split("/")[0] in roots),
                       next((p for p in linear if "attn" in p), linear[0] if linear else None))
        skipped = [_path(keys) for keys, k in kernels if len(k.shape) != 2 and match(_path(keys))]
        raise ValueError(
            f"LoRA targets {list(cfg.targets)} match no 2-D kernel's parent path; a Linear layer's path looks "
            f"like {example!r} (a prefix, a glob where * crosses '/', or 're:<regex>')"
            + (f"; matched only non-Linear kernels (not supported): {skipped[:3]}" if skipped else ""))
    return picked


def init_lora(params: Params, cfg: LoRAConfig, rng: jax.Array, *, dtype=jnp.float32) -> Params:
    """A LoRA tree for the layers of ``params`` that ``cfg.targets`` select: ``lora_A`` ``(in, r)`` drawn by
    ``cfg.init`` (see the module docstring), ``lora_B`` ``(r, out)`` zero, so ``apply_lora`` is the identity at
    init. ``params`` may be arrays or ShapeDtypeStructs. The i-th target in sorted path order (``lora_targets``)
    draws with ``fold_in(rng, i)``."""
    items = []
    for i, (keys, kernel) in enumerate(_select(params, cfg)):
        d_in, d_out = kernel.shape
        key = jax.random.fold_in(rng, i)
        if cfg.init == "kaiming_uniform":
            bound = 1.0 / (d_in ** 0.5)  # kaiming_uniform_(a=sqrt(5)) with fan_in = in: sqrt(6 / ((1 + 5) in))
            a = jax.random.uniform(key, (d_in, cfg.rank), dtype, -bound, bound)
        else:
            a = jax.random.normal(key, (d_in, cfg.rank), dtype) / cfg.rank
        items.append((keys, {"lora_A": a, "lora_B": jnp.zeros((cfg.rank, d_out), dtype)}))
    return _nest(items)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * a @ b`` in float32 at full precision (rank-r: cheap)."""
    acc = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return scale * jnp.matmul(a.astype(acc), b.astype(acc), precision=jax.lax.Precision.HIGHEST)


def apply_lora(params: Params, lora: Params, cfg: LoRAConfig | float) -> Params:
    """``params`` with each adapted ``kernel`` replaced by ``kernel + scale * lora_A @ lora_B`` (same dtype as the
    kernel; the sum is formed in float32 or wider). Pure and jit/grad/vmap-safe; subtrees without adapters are
    shared with ``params``, not copied. ``cfg`` may be a ``LoRAConfig`` or the scale itself."""
    scale = cfg.scale if isinstance(cfg, LoRAConfig) else float(cfg)
    out = params
    for keys, ab in _adapters(lora):
        module = _get(params, keys)
        if not isinstance(module, Mapping) or "kernel" not in module:
            raise KeyError(f"LoRA adapter {_path(keys)!r}: no kernel there in the parameters")
        kernel, a, b = module["kernel"], ab["lora_A"], ab["lora_B"]
        if a.shape[:1] + b.shape[1:] != kernel.shape or a.shape[1] != b.shape[0]:
            raise ValueError(f"LoRA adapter {_path(keys)!r}: lora_A {a.shape} @ lora_B {b.shape} does not fit "
                             f"kernel {kernel.shape}")
        d = delta(a, b, scale)
        merged = (kernel.astype(jnp.promote_types(kernel.dtype, d.dtype)) + d).astype(kernel.dtype)
        out = _set(out, keys + ("kernel",), merged)
    return out


def merge_lora_into(params: Params, lora: Params, cfg: LoRAConfig | float) -> Params:
    """The merged weights ``W + scale * A @ B`` (= ``apply_lora``): what an export writes. Saved as a diffusers
    folder (``save_pipeline(pipe.with_params(...))``), the fine-tuned model loads in any PyTorch tool with no LoRA
    support. Run it outside jit on host or device
    arrays; the result has the base's dtypes."""
    return apply_lora(params, lora, cfg)


def split_lora(tree: Params) -> tuple[Params, Params]:
    """(base, lora) from a tree where ``lora_A``/``lora_B`` leaves sit next to the kernels they adapt (what the
    training step hands the loss: ``merge(lora, frozen)``)."""
    def walk(t):
        base, lo = {}, {}
        for k, v in t.items():
            if isinstance(v, Mapping):
                b, l = walk(v)
                if b:
                    base[k] = b
                if l:
                    lo[k] = l
            elif k in FACTORS:
                lo[k] = v
            else:
                base[k] = v
        return base, lo
    return walk(tree)


def with_lora(loss_fn: Callable, cfg: LoRAConfig | float) -> Callable:
    """A ``(params, batch, rng)`` loss that splits the LoRA factors off ``params`` and evaluates ``loss_fn`` on
    ``apply_lora(base, lora, cfg)``: trainable = the LoRA tree, frozen = the base, the step unchanged."""
    def loss(params, batch, rng):
        base, lora = split_lora(params)
        return loss_fn(apply_lora(base, lora, cfg), batch, rng)
    return loss


def lora_logical_axes(logical: Params, lora: Params) -> Params:
    """Logical ``PartitionSpec``s for a LoRA tree from those of the base (``sharding.logical_axes``): ``lora_A``
    gets ``(kernel's in-axis, None)``, ``lora_B`` ``(None, kernel's out-axis)``, so ``sharding.param_shardings``
    and ``create_state`` shard the factors (and their optimizer state) along with their kernels. The rank axis is
    never split."""
    items = []
    for keys, _ in _adapters(lora):
        spec = tuple(_get(logical, keys + ("kernel",)))
        spec = spec + (None,) * (2 - len(spec))
        items.append((keys, {"lora_A": P(spec[0], None), "lora_B": P(None, spec[1])}))
    return _nest(items)


def count(lora: Params) -> int:
    """Number of LoRA parameters (sum over adapters of ``r * (in + out)``)."""
    return F.count(lora)
