"""Typed, eagerly validated configuration built from plain dataclasses and YAML.

Every component declares its own config dataclass beside its code; the root config
(`scaletrain.config.RootConfig`) only composes them. This module holds the machinery:

* ``from_dict(cls, data, path)`` builds a dataclass from a nested dict, checking every key
  and value against the field types, and names the dotted key in any error.
* ``load_yaml(path)`` reads a YAML file, first merging the files it lists under ``base:``
  (relative to itself), so presets compose (a train preset names a model and a data preset).
* ``apply_overrides(dict, ["train.lr=1e-4", ...])`` sets dotted keys; values are parsed as
  YAML scalars (``1e-4`` -> float, ``true`` -> bool, ``[1,2]`` -> list).
* A field whose type is a Union of dataclasses is a tagged union: the dataclasses declare a
  ``Literal`` field of the same name (the *tag*, e.g. ``arch``) and the value of that key
  picks the class. This keeps ``model.depth=24`` flat instead of ``model.mmdit.depth=24``.

Validation of ranges and cross-field rules belongs in each dataclass's ``__post_init__``,
raising :class:`ConfigError` through :func:`require`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from scaletrain.core.files import atomic_write


class ConfigError(ValueError):
    """A configuration key or value is wrong. The message names the dotted key."""


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error line never prints a huge value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def require(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError for ``key`` unless ``condition`` holds (used in __post_init__)."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------- YAML files

# A real config has a few hundred values; a "billion laughs" document (aliases of aliases)
# stands for ~1e9 of them in a few lines, and every dict copy then materialises them.
MAX_YAML_VALUES = 100_000


class YAMLSyntaxError(ConfigError):
    """Text that is not YAML at all (an override value is then taken as a plain string)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing duplicate keys (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)} (first at line {first[key] + 1})",
                    key_node.start_mark)
            first.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _StrictLoader.construct_mapping)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once its aliases are expanded (memoised per node,
    so this costs one visit per distinct node however large the expansion)."""
    if id(node) in memo:
        return memo[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return size


def _at(where: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"{where}:{mark.line + 1}" if mark is not None else where


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML document safely: no duplicate keys, no alias expansion past
    MAX_YAML_VALUES values. Errors are ConfigErrors naming ``where`` (a file, an override)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {})
        except RecursionError:
            raise ConfigError(f"{where}: nested too deeply to be a config") from None
        if size > MAX_YAML_VALUES:
            raise ConfigError(
                f"{where}: expands to {size:,} values through YAML aliases (more than "
                f"{MAX_YAML_VALUES:,}): refused")
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"{_at(where, exc)}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YAMLSyntaxError(f"{_at(where, exc)}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, merging the files listed under ``base:`` underneath it."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"base: circular include: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def deep_merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """Return ``low`` updated by ``high``; nested mappings merge, everything else replaces."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a","b","c"], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {show(text)}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {show(text)}: empty component in key {show(key)}")
    try:
        value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
    except YAMLSyntaxError:
        value = raw  # not YAML: the literal text
    # YAML reads 1e-4 as a string (it wants 1.0e-4); users write 1e-4.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted override set."""
    out = deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {show(text)}: {show(part)} is a value, not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- typing


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = get_args(tp)
        inner = _describe(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _tag_field(classes: list[type]) -> str | None:
    """The Literal field name shared by every dataclass of a tagged union."""
    names = None
    for cls in classes:
        hints = typing.get_type_hints(cls)
        tags = {n for n, t in hints.items() if get_origin(t) is Literal and len(get_args(t)) == 1}
        names = tags if names is None else names & tags
    return next(iter(sorted(names))) if names else None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null; expected {_describe(tp)}")
        dataclass_args = [a for a in args if dataclasses.is_dataclass(a)]
        if dataclass_args and isinstance(value, dict) and len(dataclass_args) > 1:
            return _convert_tagged(dataclass_args, value, key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: got {show(value)}; expected {_describe(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: got {show(value)}; allowed: " + ", ".join(repr(a) for a in allowed)
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({tp.__name__}), got {show(value)}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(args) != len(value):
                    raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
                items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
            else:
                inner = args[0] if args else Any
                items = [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        raise ConfigError(f"{key}: got {show(value)}; expected {_describe(tp)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {show(value)}; expected a mapping")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {show(value)}; expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: got {show(value)}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {show(value)}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {show(value)}; expected a string")
        return value
    return value


def _convert_tagged(classes: list[type], value: dict[str, Any], key: str) -> Any:
    tag = _tag_field(classes)
    if tag is None:  # pragma: no cover - a programming error in a config declaration
        raise TypeError(f"{key}: union of dataclasses without a shared Literal tag field")
    choices = {get_args(typing.get_type_hints(c)[tag])[0]: c for c in classes}
    if tag not in value:
        raise ConfigError(f"{key}.{tag}: missing; allowed: " + ", ".join(map(repr, choices)))
    if value[tag] not in choices:
        raise ConfigError(
            f"{key}.{tag}: got {show(value[tag])}; allowed: " + ", ".join(map(repr, choices))
        )
    return from_dict(choices[value[tag]], value, key)


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys here: {allowed}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, prefix + name)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and (
            f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ names keys relative to its own section; make them absolute.
        msg = str(exc)
        raise ConfigError(msg if not prefix or msg.startswith(prefix) else prefix + msg) from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write a resolved config into ``directory`` (atomically) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write(directory / name, dump_yaml(cfg))
