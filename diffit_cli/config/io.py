"""Loading presets by name or path, `--set` overrides and typed values (applied before validation, so a typo is
a validation error that names the key), YAML dump, differences, and readable validation errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from diffit_cli.config.explain import explain, yaml_problem
from diffit_cli.config.schema import Preset
from diffit_cli.config.sections import SampleConfig
from diffit_cli.errors import DiffitError


class PresetError(DiffitError):
    """An unknown preset, a malformed override or a value the schema rejects."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 loader that also reads `1e-3` (no dot) as a float, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def preset_dir() -> Path:
    """The shipped presets: inside the installed package (wheel) or at the repository root (editable)."""
    here = Path(__file__).resolve().parent.parent
    return here / "presets" if (here / "presets").is_dir() else here.parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def parse_overrides(overrides: list[str] | None) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings → (key path, YAML scalar) pairs."""
    parsed = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            raise PresetError(f"malformed --set {item!r}: write it as section.key=value, e.g. --set train.lr=2e-4")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except yaml.YAMLError as e:
            raise PresetError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
        parsed.append(([k.strip() for k in keys], value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Return a copy of the raw preset dict with `--set` overrides applied (before validation)."""
    out = copy.deepcopy(raw)
    for keys, value in parse_overrides(overrides):
        node = out
        for depth, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k, {}), dict):
                raise PresetError(f"--set {'.'.join(keys)}: {'.'.join(keys[: depth + 1])} is a value, not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def check_sample_values(values: dict[str, Any], flags: dict[str, str] | None = None) -> None:
    """Validate typed `sample` values (the `diffit sample` flags) on their own, before any checkpoint is read: a bad
    value is one line naming its flag (`flags`: dotted key → flag), the value and the valid ones. Checks that need
    the model (guidance channels against its channels) come with the preset."""
    try:
        SampleConfig.model_validate(set_values({}, values))
    except ValidationError as e:
        raise PresetError("; ".join(explain(e, SampleConfig, flags))) from None


def set_values(raw: dict, values: dict[str, Any] | None) -> dict:
    """A copy of the raw preset dict with typed values set by dotted key (CLI flags; validated afterwards)."""
    out = copy.deepcopy(raw)
    for key, value in (values or {}).items():
        if value is None:
            continue
        *path, last = key.split(".")
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def read_preset_file(name_or_path: str | Path) -> tuple[dict, str]:
    """Resolve a bare preset name or a path and return (raw dict, where it came from)."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = preset_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise PresetError(
                f"unknown preset {str(name_or_path)!r}; available: {', '.join(available_presets())} "
                "(or pass the path of a .yaml file)"
            )
    if not path.is_file():
        raise PresetError(f"preset file {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise PresetError(f"preset file {yaml_problem(e, str(path))}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"preset file {str(path)!r} must hold a mapping of sections (model, diffusion, ...)")
    return raw, str(path)


def validate_preset(raw: dict, source: str = "preset") -> Preset:
    try:
        return Preset.model_validate(raw)
    except ValidationError as e:
        raise PresetError(_invalid(e, source)) from None


def load_preset(name_or_path: str | Path, overrides: list[str] | None = None) -> Preset:
    """Load a shipped preset by name (`ffhq64`) or a YAML file, apply `a.b=value` overrides, validate."""
    raw, source = read_preset_file(name_or_path)
    return validate_preset(apply_overrides(raw, overrides), source)


def preset_to_dict(preset: Preset) -> dict:
    return preset.model_dump(mode="json")


def dump_preset(preset: Preset) -> str:
    """YAML text that `load_preset` reads back to an equal preset."""
    return yaml.safe_dump(preset_to_dict(preset), sort_keys=False, allow_unicode=True)


def preset_from_yaml(text: str, source: str = "preset") -> Preset:
    raw = yaml.load(text, Loader=_Loader)
    if not isinstance(raw, dict):
        raise PresetError(f"{source}: not a preset mapping")
    return validate_preset(raw, source)


def diff_presets(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two preset dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_presets(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _invalid(err: ValidationError, source: str) -> str:
    """One line for one bad value (the usual case), else one line per value under a heading."""
    lines = explain(err)
    if len(lines) == 1:
        return f"invalid preset ({source}): {lines[0]}"
    return f"invalid preset ({source}):\n  " + "\n  ".join(lines)
