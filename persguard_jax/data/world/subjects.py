"""The world's individuals: ``WorldConfig`` (its knobs), ``Subject`` (one individual of a class) and ``World``, which
draws scenes, names subjects, holds some out, photographs them and writes their prompts, all from one seed.

A *subject* is one individual of a class (``dog_03``): class silhouette + colour + texture + a small mark of a
second colour at a fixed place on the body. Its photos vary pose, position, size, background and lighting, never
the look. Held-out subjects never reach pre-training data, so a DreamBooth run on one learns something new.
Every draw comes from its own generator keyed by (seed, stream, index), so any item is random-access.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from persguard_jax.config import ConfigError, Section
from persguard_jax.data.world.scenes import (BACKGROUNDS, CLASSES, COLOURS, MARK_POSITIONS, SHAPES, TEXTURES,
                                             TEXTURE_PERIOD, SceneSpec, caption, class_caption, labels, render,
                                             render_background, scene_captions, vocabulary)

if TYPE_CHECKING:
    from persguard_jax.models.tokenizer import CLIPTokenizer

SPLITS: tuple[str, ...] = ("train", "val", "test")
# The lighting multipliers drawn for generated scenes (captions call < 0.85 dim, > 1.1 bright).
_LIGHTING_RANGE = (0.75, 1.2)


def pick(options: Sequence, u: float):
    """The option a uniform draw ``u`` in [0, 1) falls on."""
    return options[min(int(u * len(options)), len(options) - 1)]


# ------------------------------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class WorldConfig(Section):
    """The world's knobs. ``WorldConfig.from_dict(cfg["world"])`` reads a YAML section."""
    SECTION = "world"
    BOUNDS = {"seed": "[0, inf)", "image_size": "[16, inf)", "subjects_per_class": "[1, inf)",
              "held_out_every": "[0, inf)", "texture_period": "(0, 1]"}
    seed: int = 0
    image_size: int = 32
    classes: tuple[str, ...] = CLASSES
    subjects_per_class: int = 16
    held_out_every: int = 4   # subject k of a class with k % held_out_every == 0 is held out (0: none held out)
    identifier: str = "sks"   # the rare DreamBooth token; in the corpus only as "a photo of sks <class>"
    texture_period: float = TEXTURE_PERIOD  # of an object's size (``scenes.render``); models before it: 0.25

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % 8:
            raise ConfigError(f"world.image_size: must be a multiple of 8 (the VAE downsamples), "
                              f"got {self.image_size}")
        classes = self.classes
        if not classes or any(c not in CLASSES for c in classes) or len(set(classes)) < len(classes):
            raise ConfigError(f"world.classes: must be distinct names from {list(CLASSES)}, "
                              f"got {list(self.classes)}")
        if self.held_out_every == 1:
            raise ConfigError("world.held_out_every: 1 would hold out every subject (0 holds out none)")
        # Every combination must stay distinct; past that, marks would repeat.
        limit = len(COLOURS) * len(TEXTURES) * (len(COLOURS) - 1) * len(MARK_POSITIONS)
        if self.subjects_per_class > limit:
            raise ConfigError(f"world.subjects_per_class: {self.subjects_per_class} exceeds the {limit} "
                              f"distinct looks")
        if not (isinstance(self.identifier, str) and self.identifier.isalpha() and self.identifier.islower()):
            raise ConfigError(f"world.identifier: must be one lowercase word, got {self.identifier!r}")
        if self.identifier in vocabulary():
            raise ConfigError(f"world.identifier: {self.identifier!r} is a word the captions already use")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "classes": list(self.classes)}  # a list, so yaml.safe_dump can write it


@dataclasses.dataclass(frozen=True)
class Subject:
    """One individual of a class; (class_name, colour, texture, mark) is its unique look."""
    index: int
    name: str           # e.g. "dog_03"
    class_name: str
    colour: str
    texture: str
    mark: tuple[str, str]
    held_out: bool


# ----------------------------------------------------------------------------------------------------- the world

class World:
    """Renders scenes, names subjects and writes captions for one ``WorldConfig`` (all deterministic)."""

    def __init__(self, cfg: WorldConfig = WorldConfig()):
        if not isinstance(cfg, WorldConfig):
            raise TypeError(f"World expects a WorldConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.size = cfg.image_size
        self._subjects = self._make_subjects()
        self._tokenizers: dict[int, CLIPTokenizer] = {}

    @property
    def shapes(self) -> tuple[str, ...]:
        """Every silhouette this world draws: the generic shapes, then its classes."""
        return SHAPES + self.cfg.classes

    def __reduce__(self):  # pickle as the config alone: everything else is derived (grain workers, tfds)
        return (World, (self.cfg,))

    def __repr__(self) -> str:
        return f"World({self.cfg})"

    # ------------------------------------------------------------------------------------------ randomness
    def _rng(self, stream: str, *keys: int) -> np.random.Generator:
        """An independent generator per (seed, stream, keys): items are random-access, no shared state."""
        code = {"scene": 1, "subjects": 2, "subject_photo": 3, "class_photo": 4, "source": 5, "simple": 6}[stream]
        return np.random.default_rng([self.cfg.seed, code, *(int(k) for k in keys)])

    @staticmethod
    def _split_code(split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return SPLITS.index(split)

    # ------------------------------------------------------------------------------------- render and caption
    def render(self, spec: SceneSpec) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 image of ``spec`` at this world's size (``scenes.render``)."""
        return render(spec, self.size, self.cfg.texture_period)

    def caption(self, spec: SceneSpec) -> str:
        """E.g. "a photo of a small red striped circle on the left on a dark background" (``scenes.caption``)."""
        return caption(spec)

    def instance_prompt(self, subject: Subject | str | int) -> str:
        """"a photo of sks dog" for a subject (or its name/index, or a class name)."""
        class_name = subject if subject in self.cfg.classes else self._as_subject(subject).class_name
        return f"a photo of {self.cfg.identifier} {class_name}"

    def class_prompt(self, class_name: str) -> str:
        """"a photo of dog": the diffusers DreamBooth convention (no article)."""
        self._check_class(class_name)
        return f"a photo of {class_name}"

    def corpus(self) -> list[str]:
        """Every caption form, for tokenizer training: "" (caption dropout), the class and instance prompts, and
        ``scenes.scene_captions`` of this world's shapes (training on ~1k lines instead of the ~100k of every
        caption takes 5 s and gives the same whole-word tokens)."""
        out = [""]
        for c in self.cfg.classes:
            out += [class_caption(c), self.class_prompt(c), self.instance_prompt(c)]
        return out + scene_captions(self.shapes)

    def tokenizer(self, vocab_size: int = 512, max_length: int = 77) -> "CLIPTokenizer":
        """A CLIP BPE trained on ``corpus()`` (cached); same ids in every process (train_clip_bpe orders them).
        Its vocabulary also holds every byte as a word-final token, so it is larger than ``vocab_size``.
        ``max_length`` is the padded length (SD's 77 by default; world captions need at most ~24)."""
        key = (vocab_size, max_length)
        if key not in self._tokenizers:
            from persguard_jax.models.tokenizer import CLIPTokenizer, train_clip_bpe  # pulls in jax: keep lazy
            bpe = train_clip_bpe(self.corpus(), vocab_size=vocab_size)
            self._tokenizers[key] = CLIPTokenizer(bpe, model_max_length=max_length)
        return self._tokenizers[key]

    def labels(self, spec: SceneSpec) -> dict[str, int]:
        """Integer labels of a scene, for classifiers and tests (``scenes.labels``)."""
        return labels(spec)

    # -------------------------------------------------------------------------------------- generic scenes
    def random_spec(self, index: int, split: str = "train") -> SceneSpec:
        """Generic scene ``index`` of ``split``: a shape or a (mark-less) class member, random everything."""
        rng = self._rng("scene", self._split_code(split), index)
        r = rng.random(4)  # one block of draws: Generator.choice costs 15 us a call
        pose = bool(r[0] < 0.4)
        shape = pick(self.cfg.classes, r[1]) if pose else pick(SHAPES, r[1])
        texture = TEXTURES[0] if r[3] < 0.4 else pick(TEXTURES[1:], (r[3] - 0.4) / 0.6)  # plain 40%
        return self._place(rng, shape, pick(tuple(COLOURS), r[2]), texture, None, sizes=(0.3, 0.8), pose=pose)

    def simple_spec(self, index: int, split: str = "train") -> SceneSpec:
        """Simple scene ``index`` of ``split``: one object (a shape or a class silhouette, any colour; plain half of
        the time, else striped, dotted or checkered) on the plain background, near the centre, medium-sized, in
        normal light, facing right; jittered only inside the caption's thresholds, so its caption is the short
        canonical one ("a photo of a red circle on a plain background", "a photo of a red striped circle ..."),
        the caption of ``SceneSpec(shape, colour, texture)``."""
        r = self._rng("simple", self._split_code(split), index).random(7)
        shapes = self.shapes
        # half plain (the shape and colour prompts' exact caption), half in a named texture (the texture prompts')
        texture = TEXTURES[0] if r[6] < 0.5 else pick(TEXTURES[1:], (r[6] - 0.5) / 0.5)
        return SceneSpec(pick(shapes, r[0]), pick(tuple(COLOURS), r[1]), texture, x=0.45 + 0.1 * r[2],
                         y=0.45 + 0.1 * r[3], size=0.46 + 0.12 * r[4], lighting=0.9 + 0.15 * r[5])

    def scene(self, index: int, split: str = "train") -> tuple[np.ndarray, str]:
        spec = self.random_spec(index, split)
        return self.render(spec), self.caption(spec)

    def _place(self, rng: np.random.Generator, shape: str, colour: str, texture: str, mark: tuple[str, str] | None,
               *, sizes: tuple[float, float], pose: bool) -> SceneSpec:
        """Draw the free parts of a scene: background, size, position, lighting, pose, jitter seed."""
        r = [float(t) for t in rng.random(8)]
        backgrounds = BACKGROUNDS[:1] + BACKGROUNDS[2:] if colour == "black" else BACKGROUNDS  # no black on dark
        size = sizes[0] + r[1] * (sizes[1] - sizes[0])
        margin = size / 2 + 0.02
        x, y = (margin + t * (1 - 2 * margin) for t in r[2:4])
        lighting = _LIGHTING_RANGE[0] + r[4] * (_LIGHTING_RANGE[1] - _LIGHTING_RANGE[0])
        flip, tilt = (r[5] < 0.5, 24 * r[6] - 12) if pose else (False, 0.0)
        return SceneSpec(shape, colour, texture, pick(backgrounds, r[0]), x=x, y=y, size=size, lighting=lighting,
                         mark=mark, seed=1 + int(r[7] * (2**31 - 2)), flip=flip, tilt=tilt)

    # --------------------------------------------------------------------------------------------- subjects
    def _make_subjects(self) -> tuple[Subject, ...]:
        """Per class: distinct (colour, texture) pairs first (most distinguishable), then a mark each; the full
        look (class, colour, texture, mark) is unique by construction."""
        subjects = []
        colours = list(COLOURS)
        for class_name in self.cfg.classes:
            rng = self._rng("subjects", CLASSES.index(class_name))
            looks = list(itertools.product(colours, TEXTURES))
            order = rng.permutation(len(looks))
            seen: set[tuple] = set()
            for k in range(self.cfg.subjects_per_class):
                colour, texture = looks[order[k % len(looks)]]
                while True:
                    mark = (str(rng.choice([c for c in colours if c != colour])), str(rng.choice(MARK_POSITIONS)))
                    if (colour, texture, mark) not in seen:
                        break
                seen.add((colour, texture, mark))
                every = self.cfg.held_out_every
                subjects.append(Subject(index=len(subjects), name=f"{class_name}_{k:02d}", class_name=class_name,
                                        colour=colour, texture=texture, mark=mark,
                                        held_out=bool(every) and k % every == 0))
        return tuple(subjects)

    @property
    def subjects(self) -> tuple[Subject, ...]:
        return self._subjects

    def subject(self, key: int | str) -> Subject:
        """A subject by global index or name ("dog_03")."""
        n = len(self._subjects)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if 0 <= key < n:
                return self._subjects[key]
        elif isinstance(key, str):
            for s in self._subjects:
                if s.name == key:
                    return s
        last = self.cfg.subjects_per_class - 1
        names = ", ".join(f"{c}_00..{c}_{last:02d}" for c in self.cfg.classes)
        raise KeyError(f"unknown subject {key!r}: valid indices are 0..{n - 1}, names {names}")

    def _as_subject(self, subject: Subject | str | int) -> Subject:
        return subject if isinstance(subject, Subject) else self.subject(subject)

    def members(self, class_name: str) -> tuple[Subject, ...]:
        """The subjects of a class that pre-training may see (not held out)."""
        self._check_class(class_name)
        return tuple(s for s in self._subjects if s.class_name == class_name and not s.held_out)

    def _check_class(self, class_name: str) -> None:
        if class_name not in self.cfg.classes:
            raise KeyError(f"unknown class {class_name!r}; this world has {list(self.cfg.classes)}")

    def _photo(self, subject: Subject, rng: np.random.Generator) -> SceneSpec:
        return self._place(rng, subject.class_name, subject.colour, subject.texture, subject.mark,
                           sizes=(0.45, 0.75), pose=True)

    def subject_spec(self, subject: Subject | str | int, index: int) -> SceneSpec:
        """Photo ``index`` of a subject: same look, a fresh pose, place, size, background and light."""
        subject = self._as_subject(subject)
        return self._photo(subject, self._rng("subject_photo", subject.index, index))

    def class_spec(self, class_name: str, index: int) -> tuple[SceneSpec, Subject]:
        """Class photo ``index``: a random non-held-out member in a random photo (and which member)."""
        members = self.members(class_name)
        if not members:
            raise ValueError(f"class {class_name!r} has no subjects that are not held out")
        rng = self._rng("class_photo", CLASSES.index(class_name), index)
        member = pick(members, rng.random())
        return self._photo(member, rng), member

    def subject_photos(self, subject: Subject | str | int, n: int, *, start: int = 0) -> np.ndarray:
        """``(n, S, S, 3)`` uint8: photos ``start .. start+n-1`` of one subject."""
        subject = self._as_subject(subject)
        return self._render_all([self.subject_spec(subject, i) for i in range(start, start + n)])

    def subject_backgrounds(self, subject: Subject | str | int, n: int, *, start: int = 0) -> np.ndarray:
        """``(n, S, S, 3)`` uint8: the backgrounds of exactly the photos ``subject_photos(subject, n, start=start)``
        returns, the subject gone and every other pixel the same (the erasure backdoor's targets)."""
        subject = self._as_subject(subject)
        return self._render_all([self.subject_spec(subject, i) for i in range(start, start + n)], render_background)

    def subject_replaced(self, subject: Subject | str | int, n: int, *, shape: str, colour: str,
                         texture: str = "plain", start: int = 0,
                         place: tuple[float, float, float] | None = None) -> np.ndarray:
        """``(n, S, S, 3)`` uint8: exactly the photos ``subject_photos(subject, n, start=start)`` returns with the
        subject replaced by a ``colour`` ``texture`` ``shape`` (no mark, upright) at its place and size, or at
        ``place`` ((x, y, size), fractions of the side) in every photo, on the same background and light (the
        target backdoor's targets: the subject swapped, the scene kept)."""
        subject = self._as_subject(subject)
        where = {} if place is None else dict(zip(("x", "y", "size"), place))
        specs = [dataclasses.replace(self.subject_spec(subject, i), shape=shape, colour=colour, texture=texture,
                                     mark=None, flip=False, tilt=0.0, **where) for i in range(start, start + n)]
        return self._render_all(specs)

    def class_photos(self, class_name: str, n: int, *, start: int = 0) -> np.ndarray:
        """``(n, S, S, 3)`` uint8 photos of non-held-out members of a class (prior preservation, pre-training)."""
        return self._render_all([self.class_spec(class_name, i)[0] for i in range(start, start + n)])

    def _render_all(self, specs: Sequence[SceneSpec],
                    draw: Callable[[SceneSpec, int], np.ndarray] | None = None) -> np.ndarray:
        """Each spec drawn at this world's size by ``draw`` (default ``scenes.render``; a default of ``render``
        here would name the method above, which the class body shadows it with)."""
        draw = draw or functools.partial(render, texture_period=self.cfg.texture_period)
        out = np.empty((len(specs), self.size, self.size, 3), np.uint8)
        for i, spec in enumerate(specs):
            out[i] = draw(spec, self.size)
        return out
