"""The subjects of an implantation, as ``persguard implant`` names them on its command line.

    protected:    PHOTOS_DIR:CLASS:TYPE    or  world:SUBJECT:TYPE     (TYPE: pattern | erasure | target)
    unprotected:  PHOTOS_DIR:CLASS         or  world:SUBJECT

``world`` as the first field means the synthetic world the model was pre-trained on (a folder literally named
``world`` is written ``./world``). Fields are split from the right, so a folder path may itself contain ``:``.
Parsing checks the form only; whether the folder holds readable photos, or the world has that subject, is checked
when the inputs are read (``implant.data``), still before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TYPES = ("pattern", "erasure", "target")
WORLD = "world"


class SpecError(ValueError):
    """A subject spec that cannot be read: one line naming the spec."""


@dataclass(frozen=True)
class SubjectSpec:
    """One subject: its photos (a folder, or a world subject), its class and, when protected, its backdoor type."""
    spec: str                   # as written on the command line
    name: str                   # how reports name it: the world subject, or the folder's name
    class_name: str | None      # None for a world subject until the world says (``with_class``)
    type: str | None = None     # None: unprotected
    folder: Path | None = None  # None: a world subject

    @property
    def is_world(self) -> bool:
        return self.folder is None

    @property
    def protected(self) -> bool:
        return self.type is not None

    def with_class(self, class_name: str) -> "SubjectSpec":
        return SubjectSpec(self.spec, self.name, class_name, self.type, self.folder)


def _fields(spec: str, n: int, form: str) -> list[str]:
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"subject spec {spec!r}: empty; expected {form}")
    head, *tail = spec.split(":", 1)
    if head == WORLD:  # world:SUBJECT[:TYPE]: exactly n fields, none with a colon
        fields = spec.split(":")
    else:
        fields = spec.rsplit(":", n - 1)
    if len(fields) != n or any(not f.strip() for f in fields):
        raise SpecError(f"subject spec {spec!r}: expected {form}")
    return [f.strip() for f in fields]


def _subject(spec: str, fields: list[str], type_: str | None) -> SubjectSpec:
    if fields[0] == WORLD:
        return SubjectSpec(spec, fields[1], None, type_)
    folder, class_name = Path(fields[0]), fields[1]
    if not folder.exists():
        raise SpecError(f"subject spec {spec!r}: no folder {folder}")
    if not folder.is_dir():
        raise SpecError(f"subject spec {spec!r}: {folder} is not a folder")
    return SubjectSpec(spec, folder.resolve().name, class_name, type_, folder)


def parse_protected(spec: str) -> SubjectSpec:
    """``PHOTOS_DIR:CLASS:TYPE`` or ``world:SUBJECT:TYPE``."""
    form = "PHOTOS_DIR:CLASS:TYPE or world:SUBJECT:TYPE, TYPE one of " + ", ".join(TYPES)
    if isinstance(spec, str) and spec.startswith(WORLD + ":") and spec.count(":") == 1:
        raise SpecError(f"--protect {spec!r}: no backdoor type; expected {form}")
    fields = _fields(spec, 3, form)
    if fields[-1] not in TYPES:
        raise SpecError(f"--protect {spec!r}: unknown backdoor type {fields[-1]!r}; expected one of {', '.join(TYPES)}")
    return _subject(spec, fields[:2], fields[-1])


def parse_unprotected(spec: str) -> SubjectSpec:
    """``PHOTOS_DIR:CLASS`` or ``world:SUBJECT``."""
    form = "PHOTOS_DIR:CLASS or world:SUBJECT"
    if isinstance(spec, str) and spec.rsplit(":", 1)[-1] in TYPES and spec.count(":") >= 2:
        raise SpecError(f"--unprotected {spec!r}: an unprotected subject has no backdoor type; expected {form}")
    return _subject(spec, _fields(spec, 2, form), None)


def parse_subjects(protected: list[str], unprotected: list[str] | None = None
                   ) -> tuple[list[SubjectSpec], list[SubjectSpec]]:
    """Every spec parsed; at least one protected subject; no subject named twice."""
    if not protected:
        raise SpecError("--protect: at least one protected subject is needed")
    prot = [parse_protected(s) for s in protected]
    unprot = [parse_unprotected(s) for s in unprotected or []]
    seen: dict[str, str] = {}
    for s in prot + unprot:
        key = f"{WORLD}:{s.name}" if s.is_world else str(s.folder.resolve())
        if key in seen:
            raise SpecError(f"subject spec {s.spec!r}: the same subject as {seen[key]!r}")
        seen[key] = s.spec
    names = [s.name for s in prot + unprot]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"subject specs: two subjects named {dup[0]!r} (folders with the same name); rename one")
    return prot, unprot
