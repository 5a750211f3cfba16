"""Strict typed configs: unknown keys are errors, and a validation failure is one readable line.

Every config in lkspec (draft architectures, training runs, evaluation) derives from `StrictModel`
and is parsed through `parse`, so a typo in a YAML file or a flag never silently becomes a default.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from lkspec.errors import LkspecError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def describe_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse(cls: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate `data` as `cls`; raise one `LkspecError` line naming every bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(sorted(cls.model_fields))
        raise LkspecError(f"invalid {source}: {describe_errors(exc)} (valid keys: {fields})") from None
