"""The ``dreambooth`` config section: the personalisation recipe both papers simulate, plus its class images
and its evaluation samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from persguard_jax import config as cfglib


@dataclass(frozen=True)
class DreamBoothConfig(cfglib.Section):
    """One DreamBooth run: prompts, resolution, length, prior preservation, what trains, class images, samples."""
    SECTION = "dreambooth"
    BOUNDS = {"resolution": "[8, 16384]", "steps": "[1, inf)", "batch_size": "[1, inf)", "prior_weight": "[0, inf)",
              "num_class_images": "[1, inf)", "class_sample_steps": "[1, inf)", "class_batch_size": "[1, inf)",
              "seed": "[0, inf)", "eval_num_images": "[1, inf)", "eval_steps": "[1, inf)"}
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
    remat: Literal["none", "dots_saveable", "full"] = "none"
    seed: int = 0
    eval_prompts: tuple[str, ...] = ()  # default: the instance and the class prompt
    eval_num_images: int = 4
    eval_steps: int = 50
    eval_guidance: float = 7.5
    eval_negative_prompt: str = ""

    def __post_init__(self):
        super().__post_init__()
        for key in ("instance_prompt", "class_prompt"):
            if not str(getattr(self, key)).strip():
                raise cfglib.ConfigError(f"dreambooth.{key}: must not be empty")

    @property
    def use_prior(self) -> bool:
        return self.prior_weight > 0

    @property
    def examples_per_step(self) -> int:
        """Examples in one global batch: ``batch_size`` pairs of an instance and a class example with prior
        preservation, else ``batch_size`` instance examples (what processes split between them)."""
        return self.batch_size * (2 if self.use_prior else 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, where: str | None = None) -> "DreamBoothConfig":
        # a YAML "key:" with no value means "the default" here, except class_dir where None is the default
        if isinstance(d, Mapping):
            d = {k: v for k, v in d.items() if v is not None or k == "class_dir"}
        return super().from_dict(d, where=where)
