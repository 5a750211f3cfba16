"""Strict typed configs: unknown keys are errors, and a validation failure is one readable line.

Every config in lkspec (draft architectures, training runs, evaluation) derives from `StrictModel`
and is parsed through `parse`, so a typo in a YAML file or a flag never silently becomes a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lkspec.errors import LkspecError

M = TypeVar("M", bound=BaseModel)


CLI_KEY = "cli"


def flag(*decls: str) -> dict[str, Any]:
    """`Field(..., **flag("--name", "-n"))`: expose this field on the command line (see lkspec.cli.schema).

    No names: the flag is `--field-name`; booleans become `--x/--no-x` pairs unless a pair is given.
    """
    return {"json_schema_extra": {CLI_KEY: list(decls)}}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys valid where `loc` points (loc[:-1] walks nested models), or None if that is not a model."""
    model: Any = cls
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field is not None else None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return None


def describe_errors(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(cls, tuple(err["loc"])) if cls is not None else None
            parts.append(f"unknown key {loc!r}" + (f" (valid keys there: {', '.join(valid)})" if valid else ""))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse(cls: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate `data` as `cls`; raise one `LkspecError` line naming every bad key and, for an unknown one,
    the keys valid at its level."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise LkspecError(f"invalid {source}: {describe_errors(exc, cls)}") from None


# ------------------------------------------------------------------------------------------------
# layering: base < YAML file < dotted overrides, for every config (training runs, pipelines)
# ------------------------------------------------------------------------------------------------
def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"] = value for key "a.b", creating the intermediate mappings."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise LkspecError(f"cannot set {key!r}: {p!r} is not a section; check the key")
        node = nxt
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise LkspecError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-3), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # a plain string; pydantic converts numeric strings such as 1e-3 where a number is due
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LkspecError(f"config file {p} does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise LkspecError(f"config file {p} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise LkspecError(f"config file {p} must be a mapping of keys to values, not {type(data).__name__}")
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (empty mappings stay as values)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def layered(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None) -> dict[str, Any]:
    """base < YAML file < dotted overrides, merged key by key into a new dict (the inputs are not touched)."""
    data: dict[str, Any] = {}
    layers = [flatten(base or {}), flatten(read_yaml(path)) if path is not None else {}, overrides or {}]
    for layer in layers:
        for k, v in layer.items():
            set_dotted(data, k, v)
    return data


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for every dotted key that differs (keys, or sections, in `ignore` may change)."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore or k.split(".")[0] in ignore:
            continue
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out
