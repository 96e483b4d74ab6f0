"""Readable validation errors: a pydantic error becomes one line that names the key (or the flag), the value given
and what the field accepts, read from the schema itself (choices, type, bounds); a broken YAML file becomes one
line with its line and column.

pydantic reports a value that fits no branch of a union (`channels: int ≥ 1 | 'all'`) as one error per branch,
with the branch's label appended to the location; those collapse into one line that lists every branch."""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from diffit_cli.config.schema import _KINDS, Preset

# error types where the value does not fit the field (`int_parsing`, `literal_error`, `greater_than_equal`, ...):
# the line says what the field accepts
_MISFIT_ENDS = ("_type", "_parsing")
_MISFIT_STARTS = ("literal_error", "greater_than", "less_than", "int_from_float", "finite_number", "too_")
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def explain(err: ValidationError, root: type[BaseModel] = Preset, flags: dict[str, str] | None = None) -> list[str]:
    """One line per bad value of `err` (raised validating `root`); `flags` maps dotted keys to the command-line
    flags that set them (`guidance.channels` → `--cfg-channels`), which the lines then name instead."""
    lines: list[str] = []
    for e in err.errors():
        line = _line(e, root, flags or {})
        if line not in lines:  # the branches of one union give the same line
            lines.append(line)
    return lines


def yaml_problem(e: yaml.YAMLError, source: str) -> str:
    """`source:LINE:COLUMN: not valid YAML (problem; context)` (1-based, as editors count) for a file the YAML
    parser rejected; the context says where an unclosed bracket or quote was opened."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    context, opened = getattr(e, "context", None), getattr(e, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    text = problem or (str(e).splitlines() or [type(e).__name__])[0]
    if context and opened is not None and (mark is None or opened.line != mark.line):
        text += f"; {context} opened at {opened.line + 1}:{opened.column + 1}"
    return f"{where}: not valid YAML ({text})"


def _line(e: dict, root: type[BaseModel], flags: dict[str, str]) -> str:
    loc, kind = tuple(e["loc"]), e["type"]
    keys, field, at_field = _walk(root, loc)
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a list too short: said of the whole list
        keys, field, at_field = _walk(root, loc[:-1])
        kind = "too_short"
    if len(loc) >= 2 and loc[-1] == "[key]":  # a mapping's key (pydantic: mapping, key, "[key]")
        keys, field, _ = _walk(root, loc[:-2])
        mappings = [_strip(b)[0] for b in _branches(field) if get_origin(_strip(b)[0]) is dict]
        key_type = get_args(mappings[0])[0] if mappings else None
        wants = _accepts(key_type) if key_type is not None else None
        return f"{_dotted(keys)}: key {loc[-2]!r}: {wants or _from_context(e)}"
    key = _dotted(keys)
    name = flags.get(key) or key or "(top level)"
    given = e.get("input")
    if kind == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), _fields_at(root, loc[:-1]), n=1)
        return f"{name}: unknown key" + (f" — did you mean {hint[0]!r}?" if hint else "")
    if kind == "missing":
        return f"{name}: required but missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = _unquoted(e["ctx"]["expected_tags"]).split(", ")
        shown = f" = {e['ctx']['tag']!r}:" if kind == "union_tag_invalid" else ": required but missing;"
        return f"{name}.kind{shown} choose {_either(tags)}"
    if kind == "model_type":
        return f"{_named(name, given, None)}: expected a section (key: value lines)"
    if kind.endswith(_MISFIT_ENDS) or kind.startswith(_MISFIT_STARTS):
        wants = _accepts(field) if at_field else None
        return f"{_named(name, given, flags.get(key))}: {wants or _from_context(e)}"
    message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return message if not key else f"{name}: {message}"


def _named(name: str, given: Any, flag: str | None) -> str:
    """`--flag 'value'`, or `key = value` with the value as YAML writes it (null, true)."""
    if flag:
        return f"{flag} {given!r}"
    shown = "null" if given is None else str(given).lower() if isinstance(given, bool) else repr(given)
    return f"{name} = {shown}"


def _walk(root: type[BaseModel], loc: tuple) -> tuple[list[str], Any, bool]:
    """Follow `loc` through the schema: (the key's parts, the annotation reached, whether that is the field of the
    whole location; False where a part could not be followed, e.g. an unknown key, whose parts still name it).
    Model-kind tags (`unet`) are walked but not part of the key; a union branch label (`constrained-int`,
    `literal['all']`) ends the walk at its field."""
    keys: list[str] = []
    node: Any = root
    for i, part in enumerate(loc):
        model = _model(node)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            info = model.model_fields[part]
            node = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            keys.append(part)
        elif isinstance(part, str) and part in _KINDS and _KINDS[part] in _branches(node):
            node = _KINDS[part]
        elif isinstance(part, int) and _items(node, part) is not None:
            node = _items(node, part)
            keys.append(f"[{part}]")
        else:
            if isinstance(part, str) and i == len(loc) - 1 and model is None:
                return keys, node, True  # a union branch label
            return keys + [str(p) if isinstance(p, str) else f"[{p}]" for p in loc[i:]], node, False
    return keys, node, True


def _dotted(keys: list[str]) -> str:
    return ".".join(keys).replace(".[", "[")


def _strip(ann: Any) -> tuple[Any, list]:
    """(the type under `Annotated[...]`, its constraints)."""
    constraints: list = []
    while get_origin(ann) is Annotated:
        ann, *meta = get_args(ann)
        for m in meta:
            constraints += getattr(m, "metadata", None) or [m]  # Field(gt=0) carries its bounds in .metadata
    return ann, constraints


def _branches(ann: Any) -> tuple:
    """The types a field accepts, each with its own constraints (`Annotated`) where it has some."""
    base, _ = _strip(ann)
    return get_args(base) if get_origin(base) in (Union, types.UnionType) else (ann,)


def _model(ann: Any) -> type[BaseModel] | None:
    ann, _ = _strip(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _items(ann: Any, index: int) -> Any:
    """The element type at `index` of a tuple or list annotation (also inside Optional), or None."""
    for branch in _branches(ann):
        branch, _ = _strip(branch)
        if get_origin(branch) is list:
            return get_args(branch)[0]
        if get_origin(branch) is tuple:
            args = get_args(branch)
            if len(args) == 2 and args[1] is Ellipsis:
                return args[0]
            return args[index] if index < len(args) else None
    return None


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at a location of the schema (for 'did you mean' hints)."""
    _, node, _ = _walk(root, loc)
    model = _model(node)
    return list(model.model_fields) if model is not None else []


def _accepts(ann: Any) -> str | None:
    """What a field accepts, in words: `choose heun, euler or ddim`, `expected an integer ≥ 1 or all`."""
    choices, kinds = _alternatives(ann)
    if kinds is None:
        return None
    return f"expected {_either(kinds + choices)}" if kinds else f"choose {_either(choices)}"


def _alternatives(ann: Any) -> tuple[list[str], list[str] | None]:
    """(the literal values a field accepts, descriptions of the other types it accepts; None for a type that has
    no description here)."""
    choices: list[str] = []
    kinds: list[str] | None = []
    for branch in _branches(ann):
        branch, constraints = _strip(branch)
        if get_origin(branch) is Literal:
            choices += [str(v) for v in get_args(branch)]
        elif branch is bool:
            choices += ["true", "false"]
        elif branch is type(None):
            choices.append("null")
        elif kinds is not None:
            described = _describe(branch, constraints)
            kinds = None if described is None else [*kinds, described]
    return choices, kinds


def _noun(ann: Any) -> str | None:
    """A field's accepted values as a noun phrase (`one of fid, is or kid`, `a number > 0`)."""
    choices, kinds = _alternatives(ann)
    if kinds is None:
        return None
    if not kinds:
        return f"one of {_either(choices)}" if len(choices) > 1 else choices[0]
    return _either(kinds + choices)


def _describe(ann: Any, constraints: list) -> str | None:
    limits = [(attr, getattr(c, attr)) for c in constraints for attr, _ in _BOUNDS if hasattr(c, attr)]
    if ann is int:  # an integer > 0 is one ≥ 1
        limits = [{"gt": ("ge", v + 1), "lt": ("le", v - 1)}.get(attr, (attr, v)) for attr, v in limits]
    bounds = "".join(f" {dict(_BOUNDS)[attr]} {v:g}" for attr, v in limits[:1])
    bounds += "".join(f" and {dict(_BOUNDS)[attr]} {v:g}" for attr, v in limits[1:])
    if ann is int:
        return f"an integer{bounds}"
    if ann is float:
        return f"a number{bounds}"
    if ann is str:
        return "text"
    if get_origin(ann) is dict:
        return "a mapping (key: value)"
    if get_origin(ann) in (tuple, list):
        args = get_args(ann)
        variadic = get_origin(ann) is list or (len(args) == 2 and args[1] is Ellipsis)
        items = {_noun(a) for a in args[:1] if variadic} or {_noun(a) for a in args}
        each = f", each {items.pop()}" if len(items) == 1 and None not in items else ""
        return f"a list{each}" if variadic else f"a list of {len(args)} items{each}"
    return None


def _from_context(e: dict) -> str:
    """What the error's own context says (where the schema could not be followed)."""
    ctx = e.get("ctx") or {}
    if "expected" in ctx:
        return f"choose {_unquoted(ctx['expected'])}"
    for attr, sign in _BOUNDS:
        if attr in ctx:
            return f"expected a value {sign} {ctx[attr]}"
    return e["msg"]


def _unquoted(text: str) -> str:
    return text.replace("'", "")


def _either(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
