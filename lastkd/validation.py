"""One way to report a pydantic ValidationError: a list of (field, message) problems.

Settings, training configs (YAML and HTTP), request bodies and job configs all validate with
pydantic; they all report through :func:`problems` so a user reads the same words whether the
mistake came through an environment variable, a file or an API call.

:class:`StrictModel` is the one base of every job-config model (training config, data, distillation):
unknown keys are refused, numbers are taken as numbers (an integer field takes an integer, not
``true`` or ``"2"``; a float field takes an int or a float, not a boolean or a string) and NaN or
infinity in any float field is "not a finite number". One base, so a field added later gets the
same rule without anyone remembering it.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_CONFIG_BYTES",
    "JobConfig",
    "Problem",
    "StrictModel",
    "config_problems",
    "problems",
    "read_config_file",
    "summary",
]

MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: Path | str, error: type[Exception]) -> Any:
    """The parsed YAML (or JSON) of a job-config file, or ``error`` saying why it cannot be read:
    missing, empty, larger than :data:`MAX_CONFIG_BYTES`, not UTF-8, not YAML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: config file not found")
    size = path.stat().st_size
    if size == 0:
        raise error(f"{path}: config file is empty")
    if size > MAX_CONFIG_BYTES:
        raise error(f"{path}: config file is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: config file is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


@dataclass(frozen=True)
class Problem:
    """One invalid field: its dotted location and what is wrong (with the offending value)."""

    field: str
    msg: str

    def as_dict(self) -> dict[str, str]:
        """JSON form (API error details)."""
        return {"field": self.field, "msg": self.msg}


def _message(err: Any) -> str:
    msg = str(err.get("msg", "invalid"))
    # pydantic prefixes messages of our own validators; the prefix says nothing to a user.
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = err.get("input")
    if err.get("type") == "missing" or isinstance(value, (dict, list)) or "input" not in err:
        return msg
    return f"{msg} (got {value!r:.80})"


def problems(exc: ValidationError, *, prefix: str = "", root: str = "config") -> list[Problem]:
    """The problems of ``exc``, each with its dotted field name (``root`` for the object itself).

    ``prefix`` is put before every field name (``data.`` when a sub-object was validated alone).
    """
    found = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "__root__")
        found.append(Problem(prefix + loc if loc else (prefix.rstrip(".") or root), _message(err)))
    return found


def config_problems(exc: ValidationError, source: str, what: str) -> str:
    """A job config's problems, one per line: ``source: invalid <what>:`` then ``field: message``."""
    return "\n".join([f"{source}: invalid {what}:"] + [f"  {p.field}: {p.msg}" for p in problems(exc)])


def summary(found: list[Problem]) -> str:
    """All problems on one line: ``a.b: msg; c: msg``."""
    return "; ".join(f"{p.field}: {p.msg}" for p in found) or "invalid input"


def _kind(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else "text" if isinstance(value, str) else f"a {type(value).__name__}"


def _number_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is not a number of the kind ``annotation`` asks for (None when it is, or
    when ``annotation`` is not numeric: pydantic validates everything else)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _number_problem(get_args(annotation)[0], value)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if value is None or len(members) != 1:
            return None
        return _number_problem(members[0], value)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        args = get_args(annotation)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if origin is list:
            item_types = [args[0]] * len(value) if args else []
        for i, (item_type, item) in enumerate(zip(item_types, value)):
            problem = _number_problem(item_type, item)
            if problem:
                return f"item {i} ({item!r}) {problem}"
        return None
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, not {_kind(value)}"
    if annotation is float and isinstance(value, (bool, str)):
        return f"must be a number, not {_kind(value)}"
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        # said here, before pydantic's range check can answer "should be less than ..." for NaN
        return "must be a finite number"
    return None


class StrictModel(BaseModel):
    """Base of the job-config models: no unknown keys, frozen, numbers strict and finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode turns true into 1 and "2" into 2; a job config that says so is a mistake.
        field = cls.model_fields.get(info.field_name or "")
        problem = _number_problem(field.annotation, value) if field is not None else None
        if problem:
            raise PydanticCustomError("strict_number", problem)
        return value


class JobConfig(StrictModel):
    """A job's config (training, fine-tuning): read from a mapping or a YAML/JSON file, refused
    with every bad field named. Subclasses name their error class and what they are."""

    config_error: ClassVar[type[ValueError]] = ValueError
    config_kind: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> Self:
        """Validate a plain mapping; raises ``config_error`` naming every bad field."""
        if not isinstance(raw, dict):
            raise cls.config_error(f"{source}: expected a mapping of config fields, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise cls.config_error(config_problems(exc, source, cls.config_kind)) from None

    @classmethod
    def from_yaml(cls, path: Path | str) -> Self:
        """Read and validate a YAML (or JSON) config file."""
        return cls.from_dict(read_config_file(path, cls.config_error), source=str(path))
