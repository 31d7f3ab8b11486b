"""YAML configs with ``key=value`` overrides from the command line.

A config is a YAML mapping; ``load_config(path, ["optimizer.learning_rate=1e-6", "lora.rank=8"])`` returns the
nested dict with the overrides applied (values parsed as YAML, so ``true``, ``1e-6``, ``[a, b]`` and ``null``
work). Unknown top-level keys are caught by the dataclasses each section is read into (``from_dict``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping, Union

import yaml

from persguard_jax.io import atomic_write


# The largest integer a config value may hold: steps, batch sizes and counts become int32 on the devices.
INT_LIMIT = 2**31 - 1


class ConfigError(ValueError):
    """A config that cannot run; the message names the key (``section.key``) and the value."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-6`` (no dot) as a string; learning rates are written that way, so floats follow the
    YAML 1.2 / JSON number syntax here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping whose keys are all different: PyYAML keeps the last of two equal keys silently, so a config
    that sets ``steps`` twice would run with one of them unsaid."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen and key != "<<"  # YAML's merge key may repeat
        except TypeError:  # an unhashable key: construct_mapping reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class Section:
    """Mixin for the frozen dataclasses config sections are read into.

    ``from_dict`` refuses unknown keys (a typo must not be silently ignored) and checks every given value against
    the field's type hint (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``tuple[X, ...]``, ``X | None``;
    lists become tuples, integers floats, NaN and infinities are refused) and against ``BOUNDS``, the allowed
    interval of numeric fields written as text (``"[1, inf)"``, ``"(0, 1]"``), so a bad value fails when the
    config is parsed, before any work, naming ``section.key``. ``to_dict`` gives the mapping back. ``SECTION``
    names the section in errors; ``from_dict(d, where=...)`` names a nested one by its full path."""
    SECTION: ClassVar[str] = "config"
    BOUNDS: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, where: str | None = None):
        return cls(**check_fields(cls, d, where or cls.SECTION))

    def __post_init__(self):
        # built directly in Python, a section is held to the same checks as one read from a config
        # (subclasses with their own __post_init__ call this first)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in check_fields(type(self), values, self.SECTION).items():
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_known(d: Mapping[str, Any], cls: type, where: str) -> None:
    """Refuse keys of ``d`` that are not fields of dataclass ``cls`` (for a section read by a reader that would
    ignore them, e.g. transformers-style configs)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(unknown_message(where, unknown, names, listed=False))


def unknown_message(where: str, unknown: Iterable[Any], known: Iterable[str], *, noun: str = "keys",
                    listed: bool = True) -> str:
    """``"<where>: unknown <noun> [...] (did you mean 'x'?); known: [...]"``: the nearest known name for each
    unknown one that is close enough to be a typo (``difflib``), and the known names when ``listed``."""
    known = sorted(map(str, known))
    unknown = sorted(map(str, unknown))
    guesses = {u: difflib.get_close_matches(u, known, n=1, cutoff=0.6) for u in unknown}
    hint = ", ".join(f"'{g[0]}' for '{u}'" if len(unknown) > 1 else f"'{g[0]}'" for u, g in guesses.items() if g)
    return (f"{where}: unknown {noun} {unknown}" + (f" (did you mean {hint}?)" if hint else "")
            + (f"; known: {known}" if listed else ""))


def check_fields(cls: type, d: Mapping[str, Any] | None, where: str, *, error: type[Exception] | None = None,
                 key_label: str = "{where}.{key}") -> dict:
    """The keyword arguments for dataclass ``cls`` from mapping ``d``: unknown keys refused, each value checked
    and coerced by its field's type hint and ``cls.BOUNDS``; errors (``ConfigError`` or ``error``) name the key as
    ``key_label`` says (``section.key``; a ``config.json`` reader says ``"{where}: {key}"``)."""
    error = error or ConfigError
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise error(f"{where}: must be a mapping of keys to values, got {_shown(d)}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(d) - set(names)
    if unknown:
        raise error(unknown_message(where, unknown, names))
    hints, bounds = _hints(cls), getattr(cls, "BOUNDS", {})
    out = {}
    for key, value in d.items():
        try:
            if key in hints:
                value = _check(value, hints[key])
            if key in bounds and value is not None:
                _check_bounds(value, bounds[key])
        except _Mismatch as e:
            raise error(f"{key_label.format(where=where, key=key)}: {e} (got {_shown(value)})") from None
        out[key] = value
    return out


class _Mismatch(Exception):
    pass


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint (fields whose hint cannot be resolved are not checked)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001: an unresolvable forward reference leaves that class unchecked
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}" if len(args) == 2 and args[1] is Ellipsis else \
            f"a list of {len(args)} values"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", type(None): "null",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def _check(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` wants it, or ``_Mismatch`` saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if origin in (Union, types.UnionType):
        for option in sorted(args, key=lambda a: a is not type(None)):  # None first: null stays null
            try:
                return _check(value, option)
            except _Mismatch:
                continue
        raise _Mismatch(f"expected {_describe(hint)}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch(f"expected {_describe(hint)}")
    if origin is tuple:
        if isinstance(value, str) and args == (str, Ellipsis):
            value = (value,)  # one prompt, one pattern
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"expected {_describe(hint)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch(f"expected {_describe(hint)}")
        return tuple(_check(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch("expected a mapping")
        return value
    if hint is type(None):
        if value is not None:
            raise _Mismatch("expected null")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch("expected true or false")
        return value
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 1e3 steps
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Mismatch("expected an integer")
        if abs(value) > INT_LIMIT:  # step counters and schedules run in int32 on the devices
            raise _Mismatch(f"expected an integer of at most {INT_LIMIT} in size")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Mismatch("expected a number")
        if not math.isfinite(value):
            raise _Mismatch("expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            hint_ = " (quote it)" if isinstance(value, (int, float)) else ""
            raise _Mismatch(f"expected text{hint_}")
        return value
    return value  # other types (nested sections, arrays) are their owner's to check


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")


@functools.cache
def _interval(text: str) -> tuple[float, float, bool, bool]:
    m = _INTERVAL.match(text)
    if not m:
        raise ValueError(f"bad interval {text!r}; write e.g. '[1, inf)' or '(0, 1]'")
    lo, hi = float(m.group(2)), float(m.group(3))
    return lo, hi, m.group(1) == "[", m.group(4) == "]"


def _check_bounds(value: Any, interval: str) -> None:
    if isinstance(value, (tuple, list)):
        for v in value:
            _check_bounds(v, interval)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi, lo_closed, hi_closed = _interval(interval)
    inside = (value > lo or (lo_closed and value == lo)) and (value < hi or (hi_closed and value == hi))
    if not inside:
        if math.isinf(hi):
            raise _Mismatch(f"must be {'>=' if lo_closed else '>'} {lo:g}")
        raise _Mismatch(f"must lie in {interval.strip()}")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid YAML (not UTF-8 text)") from None
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
        if not all(part.strip() for part in parts):
            raise ConfigError(f"{source}: override {item!r}: the key has an empty part; expected section.key=value")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: cannot set {key}: {part} is a {type(child).__name__}, not a mapping")
            node = child
        node[parts[-1]] = value
    return config


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else (a value, a list, null) replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


BASE_KEY = "base"


def read_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its ``base:`` resolved: ``base: dreambooth_sd15`` (a shipped config's name, or a path,
    relative to this file) is read first and this file's keys are merged over it (``merge``), so a layout
    config names only what it changes. Bases may have bases; a cycle is refused."""
    from persguard_jax.resources import config_path
    path = Path(path)
    raw = read_yaml(path)
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY} must name a config (a shipped name or a path), got {base!r}")
    local = path.parent / base
    try:
        base_path = local if local.is_file() else config_path(base)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: {BASE_KEY}: {e}") from None
    chain = _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: {BASE_KEY}: {base} makes a cycle ({' -> '.join(p.name for p in chain)})")
    return merge(read_config(base_path, chain), raw)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    return apply_overrides(read_config(path), overrides)


def section(config: dict, name: str) -> dict:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {value!r}")
    return value


def dumps(config: Mapping[str, Any]) -> str:
    """YAML text of a config, keys in their given order."""
    return yaml.safe_dump(dict(config), sort_keys=False)


def dump(config: Mapping[str, Any], path: str | Path) -> None:
    """Write ``config`` as YAML in one rename (a killed process leaves the old file or the new one)."""
    text = dumps(config)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
