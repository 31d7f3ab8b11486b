"""Protective perturbations (AdvDM, Anti-DreamBooth's FSMG and ASPL, MetaCloak's transformations) as library pieces
below the workflows: the ``protect`` config section (``config``), the pure jittable pieces (``methods``: the pixel
objective, sign-PGD through ``train.unroll``, the surrogate's DreamBooth steps, one ASPL iteration) and the driver
that runs them on the mesh with progress and checkpoints (``runner.protect``). ``persguard protect`` is the command
(workflows/protect.py); the DiffShortcut experiment attacks what it writes."""
from persguard_jax.protect.config import METHODS, ProtectConfig

__all__ = ["METHODS", "ProtectConfig"]
