"""Contrastive decoupling learning (DiffShortcut; ../shared/papers/diffshortcut.md): a prompt policy on top of the
DreamBooth step and a sampling policy, not a new trainer.

Training: the instance photos (protected, maybe purified) are captioned "<instance prompt>, <phrase> noisy pattern"
and the clean class images "<class prompt>, without <phrase> noisy pattern" (the released code's strings, phrase
"bhj"), so the noise pattern binds to the phrase and not to the identifier. The class images themselves are still
sampled with the plain class prompt: they are the base model's clean pictures of the class.

Sampling: "<prompt>, without <phrase> noisy pattern", guided against a quality negative prompt,
``eps = (1 + w) eps(prompt) - w eps(negative)``: diffusers' guidance with scale ``1 + w`` (the paper's w = 7.5 is
scale 8.5; diffusers' usual 7.5 is w = 6.5). ``guidance`` None takes the recipe's own sampling strength,
``w = dreambooth.eval_guidance - 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

from persguard_jax import config as cfglib


@dataclass(frozen=True)
class CDLConfig(cfglib.Section):
    """The ``cdl`` section of a personalisation config (off by default)."""
    SECTION = "cdl"
    BOUNDS = {"guidance": "[0, inf)"}
    enabled: bool = False
    phrase: str = "bhj"
    negative_prompt: str = "noisy, lowres, artifact, pattern"
    guidance: float | None = None   # w of eps = (1 + w) eps(prompt) - w eps(negative); None: eval_guidance - 1

    def __post_init__(self):
        super().__post_init__()
        if not self.phrase.strip() or "," in self.phrase:
            raise cfglib.ConfigError(f"cdl.phrase: one word or token string without commas, got {self.phrase!r}")

    @property
    def noise_phrase(self) -> str:
        """The words the noise is meant to bind to: "<phrase> noisy pattern"."""
        return f"{self.phrase} noisy pattern"

    def instance_prompt(self, prompt: str) -> str:
        """What the instance photos are trained under."""
        return f"{prompt}, {self.noise_phrase}"

    def class_prompt(self, prompt: str) -> str:
        """What the clean class images are trained under."""
        return f"{prompt}, without {self.noise_phrase}"

    def sampling_prompt(self, prompt: str) -> str:
        """What the personalised model is sampled with."""
        return f"{prompt}, without {self.noise_phrase}"

    def guidance_scale(self, eval_guidance: float) -> float:
        """diffusers' guidance scale ``1 + w`` of the sampling policy."""
        w = eval_guidance - 1.0 if self.guidance is None else self.guidance
        return 1.0 + w


def cdl_guidance(eps_prompt, eps_negative, w: float):
    """The paper's guided prediction ``(1 + w) eps(prompt) - w eps(negative)``."""
    return (1.0 + w) * eps_prompt - w * eps_negative
