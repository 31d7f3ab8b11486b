"""YAML configs with ``key=value`` overrides from the command line.

A config is a YAML mapping; ``load_config(path, ["optimizer.learning_rate=1e-6", "lora.rank=8"])`` returns the
nested dict with the overrides applied (values parsed as YAML, so ``true``, ``1e-6``, ``[a, b]`` and ``null``
work). Unknown top-level keys are caught by the dataclasses each section is read into (``from_dict``).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-6`` (no dot) as a string; learning rates are written that way, so floats follow the
    YAML 1.2 / JSON number syntax here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class Section:
    """Mixin for the frozen dataclasses config sections are read into: ``from_dict`` refuses unknown keys
    (a typo must not be silently ignored), ``to_dict`` gives the mapping back. ``SECTION`` names it in errors."""
    SECTION = "config"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None):
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{cls.SECTION} config: unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(config: dict, overrides: Iterable[str], *, source: str = "command line") -> dict:
    """A copy of ``config`` with each ``a.b.c=value`` set (intermediate mappings are created)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = config
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: cannot set {key}: {part} is a {type(child).__name__}, not a mapping")
            node = child
        node[parts[-1]] = value
    return config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    return apply_overrides(read_yaml(path), overrides)


def section(config: dict, name: str) -> dict:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {value!r}")
    return value


def dumps(config: Mapping[str, Any]) -> str:
    """YAML text of a config, keys in their given order."""
    return yaml.safe_dump(dict(config), sort_keys=False)


def dump(config: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(dumps(config), encoding="utf-8")
