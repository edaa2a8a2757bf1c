"""Generate docs/configuration.md from the config dataclasses themselves.

The reference cannot drift from the code: each key's type and default come from the
dataclass, and its description from the comment written beside the field (on the same line,
or on the comment lines directly above it). A test compares the committed file with this
output. Regenerate with:

    python -m scaletrain.config_docs > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any, Literal, Union, get_args, get_origin

from scaletrain.config import RootConfig


def field_comments(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to the comment beside or above its declaration.

    Inherited fields take their comments from the base class that declares them, so a
    subclass that only changes defaults keeps the descriptions.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update({k: v for k, v in _own_field_comments(klass).items() if v or k not in out})
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            # "---- objective ----" banners head a group of fields; they describe none.
            comments[tok.start[0]] = "" if text.startswith("---") else text
    lines = source.splitlines()
    out: dict[str, str] = {}
    class_node = ast.parse(source).body[0]
    for node in getattr(class_node, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts: list[str] = []
        line = node.lineno - 1  # comment lines directly above
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            parts.insert(0, comments.get(line, ""))
            line -= 1
        for line_no in range(node.lineno, (node.end_lineno or node.lineno) + 1):
            if line_no in comments and not lines[line_no - 1].strip().startswith("#"):
                parts.append(comments[line_no])
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a!r}`" for a in get_args(tp))
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return " or ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = ", ".join(type_name(a) for a in args) if args else "any"
        return f"list[{inner}]"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "*required*"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`".replace("|", "\\|")


def _section(cls: type, key: str, title: str) -> list[str]:
    doc = inspect.getdoc(cls) or ""
    lines = [f"## `{key}`{title}", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    nested: list[tuple[type, str]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{key}.{f.name}"))
        desc = comments.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{key}.{f.name}` | {type_name(tp)} | {default_text(f)} | {desc} |")
    lines.append("")
    for sub, sub_key in nested:
        lines += _section(sub, sub_key, "")
    return lines


def generate() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m scaletrain.config_docs`; a test",
        "keeps it in sync. Every key can be set in a YAML preset or on the command line as a",
        "dotted override (`train.lr=1e-4`). Presets compose with `base: [other.yaml, ...]`.",
        "An unknown key or a bad value stops the run with a message naming the key.",
        "",
    ]
    hints = typing.get_type_hints(RootConfig)
    top = [f for f in dataclasses.fields(RootConfig) if not _is_section(hints[f.name])]
    lines += ["## Top level", "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
    comments = field_comments(RootConfig)
    for f in top:
        lines.append(
            f"| `{f.name}` | {type_name(hints[f.name])} | {default_text(f)} | "
            f"{comments.get(f.name, '')} |"
        )
    lines.append("")
    for f in dataclasses.fields(RootConfig):
        tp = hints[f.name]
        if not _is_section(tp):
            continue
        members = [a for a in get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        for cls in members:
            tag = _tag(cls)
            title = f" (with `{f.name}.{tag[0]}: {tag[1]}`)" if tag and len(members) > 1 else ""
            lines += _section(cls, f.name, title)
    return "\n".join(lines).rstrip() + "\n"


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or any(dataclasses.is_dataclass(a) for a in get_args(tp))


def _tag(cls: type) -> tuple[str, str] | None:
    for name, tp in typing.get_type_hints(cls).items():
        if get_origin(tp) is Literal and len(get_args(tp)) == 1:
            return name, get_args(tp)[0]
    return None


if __name__ == "__main__":  # pragma: no cover
    print(generate(), end="")
