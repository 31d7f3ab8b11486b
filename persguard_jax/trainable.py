"""What trains: the one place that splits a model's parameters for fine-tuning.

Every fine-tuning recipe of the library (``persguard personalize``, the simulated attacker inside PersGuard's
retention loss, the CDL attacker) trains one of three things:

- ``unet``: the full UNet, everything else frozen;
- ``unet+text_encoder``: the UNet and the CLIP text encoder (DreamBooth's default in both papers);
- ``lora``: LoRA adapters on the layers a ``LoRAConfig`` names, the whole base model frozen.

``split_trainable`` returns a ``Trainable``: the trainable tree and the frozen tree (disjoint: the step, and
``train.unroll``, hand the loss their ``functional.merge``), their logical axes (for the shardings), ``loss``,
which wraps a loss on the full parameters into one on that merged tree (the identity for full fine-tuning,
``lora.with_lora`` for LoRA), and ``full_params``, which turns trained parameters back into the model's own
tree (LoRA merged into the kernels): what an export writes and a sampler reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax

from persguard_jax import lora as loralib
from persguard_jax.models import functional as F

Params = dict[str, Any]
LossFn = Callable[..., tuple[jax.Array, dict]]
MODES = ("unet", "unet+text_encoder", "lora")


def trainable_mode(train_text_encoder: bool, lora: loralib.LoRAConfig | None) -> str:
    """The mode a DreamBooth-style config asks for (LoRA wins: its targets say which networks adapt)."""
    if lora is not None:
        return "lora"
    return "unet+text_encoder" if train_text_encoder else "unet"


@dataclass(frozen=True)
class Trainable:
    """A model's parameters split for training (see the module docstring). Not a pytree: a container."""
    mode: str
    params: Params             # what the optimizer updates
    frozen: Params             # read by the loss, never differentiated
    params_logical: Params     # logical axes of each tree (``sharding.param_shardings``)
    frozen_logical: Params
    lora: loralib.LoRAConfig | None = None

    def trains(self, network: str) -> bool:
        """Whether any parameter of ``network`` (``"text_encoder"``...) is trained, LoRA adapters included."""
        return network in self.params

    def loss(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn`` (on the model's full parameters) as a loss on ``merge(trainable, frozen)``."""
        return loralib.with_lora(loss_fn, self.lora) if self.lora is not None else loss_fn

    def closed_loss(self, loss_fn: LossFn, frozen: Params | None = None) -> LossFn:
        """A loss of the trainable tree alone, the frozen tree closed over: what ``train.unroll`` takes."""
        wrapped, frozen = self.loss(loss_fn), self.frozen if frozen is None else frozen
        return lambda params, batch, rng: wrapped(F.merge(params, frozen), batch, rng)

    def full_params(self, params: Params, frozen: Params | None = None) -> Params:
        """The model's own parameter tree after training: ``params`` merged with ``frozen`` (default: this
        split's), LoRA adapters folded into their kernels. Works on host or device arrays, inside or outside jit."""
        frozen = self.frozen if frozen is None else frozen
        if self.lora is None:
            return F.merge(params, frozen)
        return loralib.merge_lora_into(frozen, params, self.lora)


def split_trainable(params: Params, logical: Params, mode: str = "unet", *,
                    lora: loralib.LoRAConfig | None = None, rng: jax.Array | None = None) -> Trainable:
    """Split ``params`` (``{"unet": ..., "text_encoder": ..., ...}``, with ``logical`` its logical axes) for
    ``mode``. LoRA needs ``lora`` (which layers, rank, init) and ``rng`` (the adapters' init: ``B = 0``, so the
    model is unchanged at step 0)."""
    if mode not in MODES:
        raise ValueError(f"trainable mode must be one of {MODES}, got {mode!r}")
    if mode == "lora":
        if lora is None or rng is None:
            raise ValueError("trainable mode 'lora' needs a LoRAConfig and an rng for the adapters' init")
        adapters = loralib.init_lora(params, lora, rng)
        return Trainable(mode, adapters, params, loralib.lora_logical_axes(logical, adapters), logical, lora)
    names: Sequence[str] = mode.split("+")
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"trainable mode {mode!r}: no parameters for {missing}; have {sorted(params)}")
    train, frozen = F.partition(params, names)
    train_logical, frozen_logical = F.partition(logical, names)
    return Trainable(mode, train, frozen, train_logical, frozen_logical)
