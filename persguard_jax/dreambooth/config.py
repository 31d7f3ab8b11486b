"""The ``dreambooth`` config section: the personalisation recipe both papers simulate, plus its class images
and its evaluation samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from persguard_jax import config as cfglib


@dataclass(frozen=True)
class DreamBoothConfig(cfglib.Section):
    """One DreamBooth run: prompts, resolution, length, prior preservation, what trains, class images, samples."""
    SECTION = "dreambooth"
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1                 # instance examples per step (each paired with one class example)
    prior_weight: float = 1.0           # lambda; 0 turns prior preservation off (no class images needed)
    num_class_images: int = 200
    class_dir: str | None = None        # read (and top up) class images here; default <out>/class_images
    class_sample_steps: int = 50
    class_guidance: float = 7.5
    class_negative_prompt: str = ""
    class_batch_size: int = 8
    train_text_encoder: bool = True
    remat: str = "none"                 # none | dots_saveable | full
    seed: int = 0
    eval_prompts: tuple[str, ...] = ()  # default: the instance and the class prompt
    eval_num_images: int = 4
    eval_steps: int = 50
    eval_guidance: float = 7.5
    eval_negative_prompt: str = ""

    def __post_init__(self):
        object.__setattr__(self, "eval_prompts", tuple(self.eval_prompts or ()))
        if self.steps < 1 or self.batch_size < 1 or self.resolution < 8:
            raise cfglib.ConfigError(f"dreambooth config: steps, batch_size >= 1 and resolution >= 8 required, got "
                                     f"steps={self.steps} batch_size={self.batch_size} resolution={self.resolution}")

    @property
    def use_prior(self) -> bool:
        return self.prior_weight > 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DreamBoothConfig":
        # a YAML "key:" with no value means "the default" here, except class_dir where None is the default
        return super().from_dict({k: v for k, v in dict(d or {}).items() if v is not None or k == "class_dir"})
