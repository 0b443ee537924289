"""YAML in, pydantic models out, and every problem named by file, line and field.

A wrong inventory or playbook must be fixable at 2 a.m. from the message alone:

    inventory/lab.yaml:10 hosts.prime-radiant.target.guest.port: Input should be a valid integer

so the loader keeps the line of every mapping key and sequence item while parsing (yamlsafe.py,
which also bounds what a hostile file can cost), and maps pydantic's error locations back to
them. Values with units (`30s`, `5m`, `8M`) are parsed by the `Seconds` and `Bytes` types here,
the one place that knows those spellings; their JSON schema says the same.
"""

from __future__ import annotations

import hashlib
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError, WithJsonSchema
from pydantic import StrictBool  # noqa: F401 - the models' bool: `1` is not true

from ..errors import ConfigError
from .yamlsafe import Lines, Loc, Problem, dotted, read_yaml, sort_problems  # noqa: F401 - the loader's API

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def Int(ge: int, le: int, default: Any = ..., **kw: Any) -> Any:  # noqa: N802 - reads like a type
    """A whole number in [ge, le]; `true` is not 1 and `2.0` is not 2 (pydantic's lax mode says
    they are). Use as `port: int = Int(1, 65535)`."""
    return Field(default, ge=ge, le=le, strict=True, **kw)


# --- values with units ------------------------------------------------------------------------

MAX_SECONDS = 7 * 24 * 3600
MAX_BYTES = 1 << 40
_NUM = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"\s*(?=\d)(?:({_NUM})h)?(?:({_NUM})m)?(?:({_NUM})s)?\s*")
# a fraction only with a unit (`1.5M`): `1.5` bytes is no size, and the schema says so too
_SIZE = re.compile(r"\s*(\d+(?:\.\d+(?=\s*[kmgtKMGT]))?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_HELP = "a duration such as 30s, 5m, 1h or 1m30s, more than 0 and at most 7 days (168h)"
_SIZE_HELP = "a size in whole bytes such as 4096, 64K, 8M or 1G, from 1 byte to 1T"


def parse_seconds(value: Any) -> float:
    """`90`, `90s`, `1.5m`, `2h`, `1m30s` → seconds (a number is seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = Fraction(value) if math.isfinite(value) else None
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)) and any(m.groups()):
        h, mi, s = (Fraction(g) if g else Fraction(0) for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        seconds = None
    if seconds is None or not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"{value!r} is not {_DURATION_HELP}")
    return float(seconds)


def parse_bytes(value: Any) -> int:
    """`1048576`, `64K`, `8M`, `8MiB`, `2G` → bytes (binary units, whole bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = Fraction(value)
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        size = Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        size = None
    if size is None or size.denominator != 1 or not 0 < size <= MAX_BYTES:
        raise ValueError(f"{value!r} is not {_SIZE_HELP}")
    return int(size)


Seconds = Annotated[
    float,
    BeforeValidator(parse_seconds),
    WithJsonSchema({
        "description": "seconds, or " + _DURATION_HELP,
        "anyOf": [
            {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
            {"type": "string", "pattern": "^" + _DURATION.pattern + "$"},
        ],
    }),
]
Bytes = Annotated[
    int,
    BeforeValidator(parse_bytes),
    WithJsonSchema({
        "description": "bytes, or " + _SIZE_HELP,
        "anyOf": [
            {"type": "integer", "minimum": 1, "maximum": MAX_BYTES},
            {"type": "string", "pattern": "^" + _SIZE.pattern + "$"},
        ],
    }),
]


# --- tagged unions --------------------------------------------------------------------------


def _tag(kind: Any) -> str:
    # pydantic puts the tag into error locations; this spelling cannot be mistaken for a key
    # the member has (the `command` reproducer has a `command` field).
    return f"kind={kind}"


def by_kind(*members: type[BaseModel]) -> Any:
    """A union of models chosen by their `kind` field; an unknown kind lists the valid ones."""
    kinds = {m.model_fields["kind"].annotation.__args__[0]: m for m in members}
    valid = ", ".join(kinds)
    return Annotated[
        Union[tuple(Annotated[m, Tag(_tag(k))] for k, m in kinds.items())],
        Discriminator(
            lambda v: _tag(k) if isinstance(k := (v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)), str)
            and k in kinds else None,  # a dict when validating, a model when serializing
            custom_error_type="unknown_kind",
            custom_error_message=f"needs a `kind`, one of: {valid}",
        ),
    ]


# --- pydantic's errors as FILE:LINE field.path: message -----------------------------------------


def problems_from(error: ValidationError, path: Path, lines: Lines, prefix: Loc = (), data: Any = None) -> list[str]:
    out = []
    for err in error.errors():
        loc = (*prefix, *(p for p in err["loc"] if p != "[key]" and not (isinstance(p, str) and p.startswith("function-"))))
        loc = _clean(loc, data)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (a typo?)"
        elif err["type"] == "unknown_kind" and isinstance(_node(data, loc), dict) and "kind" in _node(data, loc):
            loc = (*loc, "kind")
            msg = f"{_node(data, loc)!r}: {msg}"
        out.append(Problem(path, lines.line(loc) or 1, loc, msg))
    return out


def _clean(loc: Loc, data: Any) -> Loc:
    """The location as the file has it: without the tag pydantic adds for a tagged union
    (`kind=scp-stress`), and without the index of a single item the model wraps into a list.
    A missing required field is kept (its line is its parent's)."""
    kept: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part == _tag(node.get("kind")) and part not in node:
            continue
        if isinstance(part, int) and isinstance(node, dict) and part not in node:
            continue  # `reproducer: {...}` is validated as `reproducer: [{...}]`
        kept.append(part)
        node = _step(node, part)
    return tuple(kept)


def _step(node: Any, part: Any) -> Any:
    try:
        return node[part]
    except (KeyError, IndexError, TypeError):
        return None


def _node(data: Any, loc: Loc) -> Any:
    for part in loc:
        data = _step(data, part)
    return data


def validate(model: type[M], data: Any, path: Path, lines: Lines, prefix: Loc = ()) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problems_from(e, path, lines, prefix, _root(data, prefix)))


def _root(data: Any, prefix: Loc) -> Any:
    """The document as the file has it, for a model validated at `prefix` inside it."""
    for part in reversed(prefix):
        data = {part: data}
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
