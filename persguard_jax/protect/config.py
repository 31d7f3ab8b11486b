"""The ``protect`` config section: which protection, its budget, its step size and its schedule.

Budgets and steps are in grey levels of [0, 255] (``budget: 11`` is the papers' r = 11/255); the pixels the
protections work on are in [-1, 1], where a grey level is 2/255. The released recipes, for reference
(Anti-DreamBooth's scripts, ../shared/papers/diffshortcut.md): ASPL 50 iterations of 3 surrogate + 6 PGD + 3 model
steps, PGD step 5e-3 and budget 5e-2 in [-1, 1] units (0.64 and 6.4 grey levels); FSMG 1000 DreamBooth steps then
100 PGD steps; MetaCloak budget 11, step 1.1, blur and flip transformations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from persguard_jax import config as cfglib

METHODS = ("advdm", "fsmg", "aspl")


@dataclass(frozen=True)
class ProtectConfig(cfglib.Section):
    """One protection run (``persguard protect``); the surrogate's DreamBooth recipe is the ``dreambooth`` and
    ``optimizer`` sections, as ``persguard personalize`` runs them."""
    SECTION = "protect"
    BOUNDS = {"budget": "(0, 255]", "step_size": "(0, 255]", "attack_steps": "[1, inf)", "iterations": "[1, inf)",
              "pgd_steps": "[1, inf)", "surrogate_steps": "[0, inf)", "model_steps": "[0, inf)",
              "target_weight": "[0, inf)", "eot_blur_kernel": "[1, inf)", "eot_blur_sigma": "(0, inf)",
              "eval_draws": "[1, inf)", "checkpoint_every": "[1, inf)", "seed": "[0, inf)", "chunk": "[1, inf)"}
    method: Literal["advdm", "fsmg", "aspl"] = "aspl"  # the command's --method
    budget: float = 11.0            # l_inf radius, grey levels of [0, 255]
    step_size: float = 1.0          # sign-PGD step, grey levels
    attack_steps: int = 100         # advdm, fsmg: PGD steps in all
    iterations: int = 50            # aspl: outer iterations
    pgd_steps: int = 6              # aspl: PGD steps per iteration
    surrogate_steps: int = 3        # aspl: DreamBooth steps of the surrogate copy on the clean photos, per iteration
    model_steps: int = 3            # aspl: DreamBooth steps of the main model on the perturbed photos, per iteration
    class_name: str | None = None   # sets the prompts: "a photo of sks <class>" / "a photo of <class>"
    target_image: str | None = None  # the targeted variant: an image whose latents the model is pulled towards
    target_weight: float = 1.0
    eot: bool = False               # MetaCloak's expectation over transformations (blur, flip) in every PGD step
    eot_blur_kernel: int = 7
    eot_blur_sigma: float = 1.0     # the blur's sigma is drawn uniformly from (0, eot_blur_sigma]
    # lay the compiled PGD steps out in a line (train.unroll's scan_unroll): on XLA:CPU the same steps in a rolled loop
    # ran 2.8x slower (docs/benchmarks.md); compilation grows with the steps per loop (pgd_steps, chunk)
    unroll: bool = True
    chunk: int = 10                 # advdm, fsmg: PGD steps per compiled call (one progress tick each)
    # with replicated parameters, split the photos (padded) and each DreamBooth step's examples over the devices
    # (protect.methods). auto: on GPUs and TPUs; on the CPU in one process the protection runs on one device (2
    # devices per ASPL iteration: 0.43 s computing everything each, 0.30 s split, one device 0.29 s; compilation 74,
    # 93 and 66 s; docs/benchmarks.md, ASPL). always: split on the CPU too. never: every device of the mesh computes
    # the whole batch
    per_device: Literal["auto", "always", "never"] = "auto"
    checkpoint_every: int = 10     # ticks (chunks, or ASPL iterations) between checkpoints; the last is always saved
    eval_draws: int = 16            # timestep/noise draws for the surrogate's loss before and after
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.eot_blur_kernel % 2 == 0:
            raise cfglib.ConfigError(f"protect.eot_blur_kernel: must be odd, got {self.eot_blur_kernel}")
        if self.class_name is not None and not str(self.class_name).strip():
            raise cfglib.ConfigError("protect.class_name: must not be empty")

    @property
    def radius(self) -> float:
        """The budget in the [-1, 1] pixel units the protections work in."""
        return 2.0 * self.budget / 255.0

    @property
    def alpha(self) -> float:
        """The PGD step in [-1, 1] pixel units."""
        return 2.0 * self.step_size / 255.0
