"""Command-line options generated from the config schema, so a flag's name, help and default live in one place.

A config field opts into the command line with `Field(..., **lkspec.config.flag())` (the flag is `--field-name`) or
`**flag("--loss")` / `**flag("--num-heads", "-k")` for another name; booleans become `--x/--no-x`
pairs (or the pair given). Its help is the field's description and the default shown is the field's
default. Every generated option defaults to "unset" (None), so only the flags a user types override the
YAML file or a resumed run's saved config; list fields take repeated flags or comma-separated values.
A flag name that appears in several models (e.g. `--seed` for the prompt shuffle and for sampling)
becomes one option that sets every field carrying it.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lkspec.config import CLI_KEY
from lkspec.errors import LkspecError

OVERRIDES = "overrides"  # the keyword a generated command passes its {dotted key: value} mapping as


@dataclass
class Option:
    keys: list[str]  # dotted config keys this option sets
    decls: list[str]  # e.g. ["--num-heads", "-k"] or ["--tie-weights/--no-tie-weights"]
    help: str
    kind: type  # bool, int, float, str
    is_list: bool
    default: str | None  # shown in --help

    @property
    def param(self) -> str:
        return "opt_" + self.decls[0].split("/")[0].lstrip("-").replace("-", "_")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of a field annotation such as `int | None` or `list[float]`."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _unwrap(args[0])
    if get_origin(annotation) is list:
        return _unwrap(get_args(annotation)[0])[0], True
    if get_origin(annotation) is Literal:
        return type(get_args(annotation)[0]), False
    return annotation, False


def _default_text(field: Any) -> str | None:
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None or value is PydanticUndefined:
        return None
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def schema_options(model: type[BaseModel], prefix: str = "") -> list[Option]:
    """Every field of `model` (recursively through nested models) that carries `flag(...)` metadata."""
    out: list[Option] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        kind, is_list = _unwrap(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out.extend(schema_options(kind, key + "."))
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if CLI_KEY not in extra:
            continue
        decls = list(extra[CLI_KEY]) or [f"--{name.replace('_', '-')}"]  # type: ignore[arg-type]
        if kind is bool and "/" not in decls[0]:
            decls[0] = f"{decls[0]}/--no-{decls[0].removeprefix('--')}"
        out.append(Option([key], decls, field.description or "", kind, is_list, _default_text(field)))
    return out


def merged(*groups: list[Option]) -> list[Option]:
    """Options of several models (each group's keys already prefixed); equal flag names become one option."""
    by_flag: dict[str, Option] = {}
    for opt in (o for g in groups for o in g):
        first = opt.decls[0]
        if first in by_flag:
            by_flag[first].keys.extend(opt.keys)
        else:
            by_flag[first] = Option(list(opt.keys), list(opt.decls), opt.help, opt.kind, opt.is_list, opt.default)
    return list(by_flag.values())


def prefixed(options: list[Option], prefix: str) -> list[Option]:
    return [Option([prefix + k for k in o.keys], o.decls, o.help, o.kind, o.is_list, o.default) for o in options]


def _parameter(opt: Option) -> inspect.Parameter:
    kind: Any = list[str] if opt.is_list else (opt.kind if opt.kind in (bool, int, float) else str)
    help_text = opt.help + (" Repeat the flag or separate values by commas." if opt.is_list else "")
    info = typer.Option(*opt.decls, help=help_text, show_default=opt.default if opt.default is not None else False)
    return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, info])


def _convert(opt: Option, text: str) -> Any:
    """One list element as the field's scalar type; a bad one is an error that names the flag."""
    if opt.kind not in (int, float):
        return text
    try:
        return opt.kind(text)
    except ValueError:
        raise LkspecError(f"{opt.decls[0]} takes {opt.kind.__name__} values (e.g. {opt.decls[0]} 0,1), got "
                          f"{text!r}") from None


def overrides_from(options: list[Option], values: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} for every option the user typed (comma-separated lists split)."""
    out: dict[str, Any] = {}
    for opt in options:
        value = values.get(opt.param)
        if value is None:
            continue
        if opt.is_list:
            value = [_convert(opt, v.strip()) for item in value for v in str(item).split(",") if v.strip()]
        for key in opt.keys:
            out[key] = value
    return out


def command(fn: Callable[..., Any], options: list[Option]) -> Callable[..., Any]:
    """`fn` with the schema options appended to its signature; `fn` receives them as `overrides=`."""
    fixed = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != OVERRIDES]

    def wrapper(**kwargs: Any) -> Any:
        own = {p.name: kwargs.pop(p.name) for p in fixed if p.name in kwargs}
        return fn(**own, **{OVERRIDES: overrides_from(options, kwargs)})

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed] + [_parameter(o) for o in options]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper
