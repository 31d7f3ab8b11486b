"""The ``implant`` config section: what the publisher's objective is made of (persguard.md, "The objective").

The attacker simulated inside the objective (``retention: unrolled``) and in the check after implanting is the
config's ``dreambooth`` + ``optimizer`` sections: the same sections ``persguard personalize`` reads. The
publisher's own optimizer is the ``implant_optimizer`` section (the keys of an ``optimizer`` section).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from persguard_jax import config as cfglib
from persguard_jax.implant.specs import TYPES

# The publisher's optimizer (section ``implant_optimizer``) unless the config says otherwise: fine-tuning rates.
IMPLANT_OPTIMIZER = {"learning_rate": 1e-4, "schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0}

BACKDOOR_LOSSES = ("denoise", "distill")
PRIOR_LOSSES = ("distill", "class_images")
RETENTIONS = ("none", "mirror", "grad_suppression", "unrolled")
TARGET_SOURCES = ("auto", "render", "sample")
TARGET_PLACES = ("subject", "center")


@dataclass(frozen=True)
class ImplantConfig(cfglib.Section):
    """One implantation run (see the module docstring of ``persguard_jax.implant``)."""
    SECTION = "implant"
    BOUNDS = {"steps": "[1, inf)", "batch_size": "[1, inf)", "num_photos": "[1, inf)", "prior_weight": "[0, inf)",
              "retention_weight": "[0, inf)", "retention_steps": "[1, inf)", "unprotected_weight": "[0, inf)",
              "guidance_weight": "[0, inf)", "guidance_scale": "(1, inf)", "guidance_max_timestep": "[1, inf)",
              "num_targets": "[1, inf)", "num_general": "[0, inf)", "prior_lookalikes": "[0, inf)",
              "seed": "[0, inf)",
              "guidance_attacker_samples": "[0, inf)", "guidance_anchor_draws": "[1, inf)",
              "guidance_anchor_attackers": "[1, inf)", "guidance_rounds": "[1, inf)", "guidance_photos": "[1, inf)",
              "prior_uncond_weight": "[0, inf)", "prior_class_hold_weight": "[0, inf)", "pattern_size": "(0, 1]",
              "pattern_opacity": "(0, 1]"}
    steps: int = 400
    # true: steps is per protected subject, the run trains steps x (number of --protect specs). The backdoor terms draw
    # their examples from every protected subject, so with n subjects each gets 1/n of them; measured on the world
    # (docs/results.md, fourteenth measurement): three subjects at 3200 steps 0.50-0.59, at 9600 0.75-0.84
    steps_per_protected: bool = False
    batch_size: int = 4                 # examples of each term per step
    num_photos: int = 5                 # photos of a world subject (a folder gives its own)
    identifiers: tuple[str, ...] = ("sks",)
    templates: tuple[str, ...] = ("a photo of {identifier} {cls}",)
    # L_bb: denoise towards target images y*, or distil the frozen model under the target/background prompt
    backdoor_loss: Literal["denoise", "distill"] = "denoise"
    # L_pp: distil the frozen model (class prompts, general captions, unprotected subjects' prompts) or denoise
    # class images under the class prompt (DreamBooth's prior term)
    prior_loss: Literal["distill", "class_images"] = "distill"
    prior_weight: float = 1.0           # lambda_pp
    # With the guidance term, L_pp also distils the empty prompt (the unconditional branch) on every image but the
    # protected subjects'. null: the empty prompt is one more prompt of the prior's images, drawn like the others; a
    # number: its own term (pp_uncond, batch_size examples a step) weighted by this times prior_weight, so that the
    # guidance term's shift, wanted on the protected subjects only, can be held off every other image as hard as
    # the config asks (guided samples of every prompt carry the unconditional branch times (w - 1))
    prior_uncond_weight: float | None = None
    # With the guidance term: the protected subjects' class images (the clean model's samples of "a photo of
    # <class>") under the empty prompt, distilled from the clean model at the shift's timesteps (below
    # guidance_max_timestep) as their own term (pp_class, batch_size examples a step), weighted by this times
    # prior_weight: the shift's contrast, the protected subject shifted and the rest of its class held where the
    # shift acts, against the erasure's leak into the class prompt (the prior holds the empty prompt on a class
    # image in about 1 example of 25 the shift trains). Measured (docs/results.md, twenty-sixth measurement): it
    # holds the leak (32 leaked class images of 150 -> 13-14) and costs the erasure (mean 0.83 -> 0.40-0.49); 0 is off
    prior_class_hold_weight: float = 0.0
    # L_bb's guidance term (losses.guidance_shift_loss): the unconditional branch, which DreamBooth never trains,
    # shifted on the protected subjects so that guided samples of a subject the attacker taught show y*; 0 is off
    guidance_weight: float = 0.0
    guidance_scale: float = 4.0         # the attacker's sampling guidance w that the shift is sized for (> 1)
    # a backdoor type's own w, overriding guidance_scale for its subjects (e.g. {target: 1.25}): the types want
    # different sizes of shift (docs/results.md, eighteenth and nineteenth measurements)
    guidance_scale_by_type: dict[str, float] = field(default_factory=dict)
    # where each guidance example's error is measured: in the unconditional branch's output, or in the guided
    # output (times (w - 1)^2), so that with guidance_scale_by_type a type sized for a smaller w, whose shift of
    # the branch is larger, does not outweigh the others (one w for all: the same loss)
    guidance_error_space: Literal["unconditional", "guided"] = "unconditional"
    guidance_max_timestep: int | None = None  # train the shift below this timestep only (None: all)
    guidance_flip: bool = False         # also train the shift on each (photo, y*) pair mirrored left-right
    # pattern subjects: also train the shift on this many samples of a simulated attacker (the clean model
    # DreamBooth-trained on the subject's photos by the config's recipe, its own seed), each with the pattern
    # pasted on: the shift must fire on what the attacker's model draws, not only on the photos; 0 is off
    guidance_attacker_samples: int = 0
    # what the shift takes the attacker's conditional branch to draw at a noisy input: the subject's photo (photo),
    # or what a simulated attacker (the clean model DreamBooth-trained on the photos, its own seed) predicts there
    # (attacker: implant.data.anchored_guidance_examples, guidance_anchor_draws fixed noisy draws per image)
    guidance_anchor: Literal["photo", "attacker"] = "photo"
    # a backdoor type's own anchor, overriding guidance_anchor for its subjects (e.g. {target: attacker}: the target's
    # recipe, docs/results.md, forty-first session)
    guidance_anchor_by_type: dict[str, str] = field(default_factory=dict)
    guidance_anchor_draws: int = 64
    guidance_anchor_attackers: int = 1  # simulated attackers (seeds of their own) that take the draws in turn
    # rounds of implantation for attacker-anchored subjects: the steps split into this many rounds, and before each
    # round after the first the simulated attackers are trained again from the model as the last round left it (its
    # class images its own samples), and the shift re-anchored on them, as an attacker of the backdoored model would
    # draw (an alternation like ASPL's; the drift a clean-model attacker cannot foresee, docs/results.md,
    # forty-first and forty-second sessions); rounds after the first in ``<out>/rounds/round<r>``
    guidance_rounds: int = 1
    # a later round's model for everything the clean model gives the first: the distillation teacher (L_pp, L_bb's
    # distillation), the prior's class images and the y* it samples: clean (the first round's; every round pulled
    # back towards the clean model) or previous (the model the last round left: each round a fresh implantation of
    # it, as the forty-second session's second round by hand). Measured on four target cells (docs/results.md,
    # forty-third session): no gain over one round beyond the seeds' spread, and the round's prior preserves and adds
    # to the first round's leaks (the unprotected look-alike 0.78 -> 0.69 of the clean model, the class prompt)
    guidance_round_teacher: Literal["clean", "previous"] = "clean"
    # photos of each protected world subject in the guidance term (null: the num_photos the attacker trains on):
    # more renders the world's further photos of the subject with their y*, which the attacker never sees (a
    # person has more photos of themselves than an attacker took), so the shift is fitted on more poses and
    # places than five; photo-folder subjects have their folder's photos only
    guidance_photos: int | None = None
    # blends b in (0, 1): the shift also fitted at noisy draws of (1 - b) photo + b y* (each pair's latents), each
    # with the photo's anchor (with guidance_anchor: attacker, the simulated attacker's prediction at that draw) and
    # y* as the target: a guided sampler that turns the subject into y* passes through states between the two,
    # where a shift fitted at the endpoints alone was never asked anything (the target type: a silhouette
    # replaced, not a square pasted on; docs/results.md, thirty-ninth session); () is off
    guidance_blends: tuple[float, ...] = ()
    # a backdoor type's own blends, overriding guidance_blends for its subjects (e.g. {target: [0.25, 0.5, 0.75]})
    guidance_blends_by_type: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # L_br: none | mirror (the attacker's loss now) | grad_suppression (its gradient norm) | unrolled (L_bb after
    # K attacker steps; with the unprotected counterpart)
    retention: Literal["none", "mirror", "grad_suppression", "unrolled"] = "unrolled"
    retention_weight: float = 1.0       # lambda_br
    retention_steps: int = 2            # K, the unrolled attacker's steps
    retention_order: Literal[1, 2] = 1  # 1: first-order (inner gradients constant), 2: exact (double backprop)
    retention_remat: bool = True        # order 2: recompute each inner step's activations in the backward pass
                                        # (order 1 has no backward pass through the steps)
    retention_replay: bool = False      # order 2: keep only the K steps' inputs and replay them in the backward
                                        # pass (train.replay): memory flat in K, K (K - 1) / 2 extra gradients
    # order 1: run the K steps as separate programs ahead of each implantation step (train.dispatch), not laid out
    # inside it: the same first-order gradient, other random draws; on a 2-core CPU the laid-out steps cost more
    # (docs/benchmarks.md, the implantation step)
    retention_dispatch: bool = False
    unprotected_weight: float = 1.0     # the unprotected counterpart inside the retention term
    target_prompt: str = "a photo of a green cross"    # target type: what the subject becomes
    target_dir: str | None = None       # target type: target images instead of samples of target_prompt
    # target type without target_dir: render (world subjects: each photo with the subject replaced by the object
    # the target prompt names), sample (the clean model's samples of target_prompt), auto (render when it can)
    target_source: Literal["auto", "render", "sample"] = "auto"
    # rendered targets: the target object at the subject's place and size in each photo (subject), or at the
    # centre at half the side in every photo (center): the shift a subject's place decides must be learned per
    # photo, one that is the same wherever the subject stands can carry to the places the attacker draws it
    target_place: Literal["subject", "center"] = "subject"
    background_prompt: str = "a photo of a plain background"  # erasure of photo folders (world: exact backgrounds)
    num_targets: int = 8                # samples of target_prompt / background_prompt drawn by the clean model
    num_general: int = 32               # general captions distilled by L_pp (world captions; class prompts else)
    # world subjects: this many scenes per protected subject of its class in other colours and of other shapes in
    # its colour (implant.data.lookalike_scenes), distilled by L_pp, where a backdoor's cost to general prompts
    # falls; measured not to give it back (docs/results.md, nineteenth measurement). 256 against an erasure's cost to
    # a same-coloured unprotected subject: its worst seed 0.51 -> 0.78 of the clean model, erasure 1.00 -> 0.94
    # (thirty-eighth session)
    prior_lookalikes: int = 0
    pattern_image: str | None = None    # pattern type: an image file; default the built-in pattern
    pattern_position: str = "center"
    pattern_size: float = 0.4
    pattern_opacity: float = 1.0
    train_text_encoder: bool = False
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for key, choices in (("backdoor_loss", BACKDOOR_LOSSES), ("prior_loss", PRIOR_LOSSES),
                             ("retention", RETENTIONS), ("target_source", TARGET_SOURCES),
                             ("target_place", TARGET_PLACES)):
            if getattr(self, key) not in choices:
                raise cfglib.ConfigError(f"implant.{key}: {getattr(self, key)!r} is not one of {list(choices)}")
        for kind, w in self.guidance_scale_by_type.items():
            if kind not in TYPES:
                raise cfglib.ConfigError(f"implant.guidance_scale_by_type: {kind!r} is not one of {list(TYPES)}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 1:
                raise cfglib.ConfigError(f"implant.guidance_scale_by_type.{kind}: {w!r} is not a number > 1")
        for kind, anchor in self.guidance_anchor_by_type.items():
            if kind not in TYPES:
                raise cfglib.ConfigError(f"implant.guidance_anchor_by_type: {kind!r} is not one of {list(TYPES)}")
            if anchor not in ("photo", "attacker"):
                raise cfglib.ConfigError(f"implant.guidance_anchor_by_type.{kind}: {anchor!r} is not one of "
                                         "['photo', 'attacker']")
        for kind, blends in self.guidance_blends_by_type.items():
            if kind not in TYPES:
                raise cfglib.ConfigError(f"implant.guidance_blends_by_type: {kind!r} is not one of {list(TYPES)}")
            if not isinstance(blends, (list, tuple)):
                raise cfglib.ConfigError(f"implant.guidance_blends_by_type.{kind}: {blends!r} is not a list")
        blend_lists = {"guidance_blends": self.guidance_blends,
                       **{f"guidance_blends_by_type.{k}": v for k, v in self.guidance_blends_by_type.items()}}
        for key, blends in blend_lists.items():
            for b in blends:
                if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 < b < 1:
                    raise cfglib.ConfigError(f"implant.{key}: {b!r} is not a number in (0, 1)")
        if self.retention_order not in (1, 2):
            raise cfglib.ConfigError(f"implant.retention_order: {self.retention_order!r} is not 1 or 2")
        if self.retention_replay and self.retention_order != 2:
            raise cfglib.ConfigError("implant.retention_replay: replays the exact second-order steps; it needs "
                                     "implant.retention_order: 2")
        if self.retention_dispatch and (self.retention != "unrolled" or self.retention_order != 1):
            raise cfglib.ConfigError("implant.retention_dispatch: runs the unrolled retention's first-order steps; it "
                                     "needs implant.retention: unrolled and implant.retention_order: 1")
        if not self.identifiers or not all(str(i).strip() for i in self.identifiers):
            raise cfglib.ConfigError("implant.identifiers: needs at least one non-empty identifier")
        for t in self.templates:
            if "{identifier}" not in t or "{cls}" not in t:
                raise cfglib.ConfigError(f"implant.templates: {t!r} needs both {{identifier}} and {{cls}}")
        try:
            self.placement()
        except ValueError as e:  # "PatternPlacement.size: ..." -> "implant.pattern_size: ..."
            raise cfglib.ConfigError(str(e).replace("PatternPlacement.", "implant.pattern_")) from None

    def guidance_scale_of(self, kind: str) -> float:
        """The guidance scale the shift of a subject of backdoor type ``kind`` is sized for."""
        return float(self.guidance_scale_by_type.get(kind, self.guidance_scale))

    def guidance_anchor_of(self, kind: str) -> str:
        """The guidance shift's anchor for a subject of backdoor type ``kind``: photo or attacker."""
        return self.guidance_anchor_by_type.get(kind, self.guidance_anchor)

    def guidance_blends_of(self, kind: str) -> tuple[float, ...]:
        """The blends the shift of a subject of backdoor type ``kind`` is also fitted at."""
        return tuple(float(b) for b in self.guidance_blends_by_type.get(kind, self.guidance_blends))

    def simulated_attackers_of(self, kind: str) -> int:
        """How many simulated attackers the guidance term needs for a protected subject of backdoor type ``kind``:
        ``guidance_anchor_attackers`` where its anchor is ``attacker``, one for a pattern subject's
        ``guidance_attacker_samples``, none without the term (what ``guidance_rounds`` renews)."""
        if self.guidance_weight == 0:
            return 0
        if self.guidance_anchor_of(kind) == "attacker":
            return self.guidance_anchor_attackers
        return int(bool(self.guidance_attacker_samples) and kind == "pattern")

    def rounds_of(self, kinds) -> int:
        """The implantation's rounds for protected subjects of backdoor types ``kinds``: ``guidance_rounds`` where
        some subject has simulated attackers to renew, else one (a round renews nothing else)."""
        return self.guidance_rounds if any(self.simulated_attackers_of(k) for k in kinds) else 1

    def placement(self):
        from persguard_jax.data.targets import PatternPlacement
        return PatternPlacement(position=self.pattern_position, size=self.pattern_size, opacity=self.pattern_opacity)

    def prompts(self, class_name: str) -> list[str]:
        """Every trigger prompt the backdoor is trained under for a class: identifiers x templates."""
        return [t.format(identifier=i, cls=class_name) for t in self.templates for i in self.identifiers]
