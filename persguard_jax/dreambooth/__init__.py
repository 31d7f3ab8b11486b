"""DreamBooth (Ruiz et al., 2023), the simulated attacker, as library pieces below the workflows: its config
section, its data (photos and class images -> cached VAE posteriors and prompts -> instance/class pairs) and
``finetune``, the attacker as a differentiable inner loop; ``cdl``, DiffShortcut's contrastive decoupling
learning (a prompt and sampling policy on the same recipe). The loss lives in the loss library
(``losses.dreambooth_loss``); ``persguard personalize`` runs it on the engine."""
from persguard_jax.dreambooth.cdl import CDLConfig, cdl_guidance
from persguard_jax.dreambooth.config import DreamBoothConfig
from persguard_jax.dreambooth.data import (PairSource, dreambooth_source, encode_latents, ensure_class_images,
                                           prompt_conditioning)
from persguard_jax.dreambooth.finetune import finetune

__all__ = ["CDLConfig", "DreamBoothConfig", "cdl_guidance", "PairSource", "dreambooth_source", "encode_latents", "ensure_class_images", "finetune",
           "prompt_conditioning"]
