"""YAML in, pydantic models out, and every problem named by file, line and field.

A wrong inventory or playbook must be fixable at 2 a.m. from the message alone:

    inventory/lab.yaml:10 hosts.prime-radiant.target.guest.port: Input should be a valid integer

so the loader keeps the line of every mapping key and sequence item while parsing, and maps
pydantic's error locations back to them. Values with units (`30s`, `5m`, `8M`) are parsed by
the `Seconds` and `Bytes` types here, the one place that knows those spellings.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from ..errors import ConfigError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[Any, ...]


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- values with units ------------------------------------------------------------------------

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_seconds(value: Any) -> float:
    """`90`, `90s`, `1.5m`, `2h`, `1m30s` → seconds (a number is seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        m = _DURATION.fullmatch(value.strip())
        if not m or not any(m.groups()):
            raise ValueError(f"{value!r} is not a duration: use e.g. 30s, 5m, 1h or 1m30s")
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def parse_bytes(value: Any) -> int:
    """`1048576`, `64K`, `8M`, `8MiB`, `2G` → bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64K, 8M or 1G")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value, re.IGNORECASE)
        if not m:
            raise ValueError(f"{value!r} is not a size: use e.g. 64K, 8M or 1G")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ValueError("expected a size such as 64K, 8M or 1G")
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


Seconds = Annotated[float, BeforeValidator(parse_seconds)]
Bytes = Annotated[int, BeforeValidator(parse_bytes)]


# --- YAML with line numbers ---------------------------------------------------------------------


class _Lines:
    """Line (1-based) of every key and item, by its path from the document root."""

    def __init__(self) -> None:
        self.at: dict[Loc, int] = {}

    def line(self, loc: Loc) -> int | None:
        loc = tuple(loc)
        while loc not in self.at and loc:
            loc = loc[:-1]
        return self.at.get(loc)


def _construct(node: yaml.Node, loc: Loc, lines: _Lines, loader: yaml.SafeLoader) -> Any:
    lines.at.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, (dict, list)):
                raise yaml.MarkedYAMLError(problem="a key must be a plain value", problem_mark=key_node.start_mark)
            if key in out:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            lines.at[(*loc, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*loc, key), lines, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*loc, i), lines, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def read_yaml(path: Path) -> tuple[Any, _Lines]:
    """Parse one YAML document, keeping lines; a syntax error is a ConfigError with file:line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"])
    lines = _Lines()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = _construct(node, (), lines, loader) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML: {e.problem or e}"])
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: invalid YAML: {e}"])
    finally:
        loader.dispose()
    return data, lines


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def problems_from(error: ValidationError, path: Path, lines: _Lines, prefix: Loc = (), data: Any = None) -> list[str]:
    """pydantic's errors as `FILE:LINE field.path: message` lines."""
    out = []
    for err in error.errors():
        # pydantic puts the tag of a tagged union into the location ("qemu"); it is not a key.
        loc = (*prefix, *(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        loc = _clean(loc, lines, data)
        line = lines.line(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (a typo?)"
        out.append(f"{path}:{line or 1} {dotted(loc)}: {msg}")
    return out


def _clean(loc: Loc, lines: _Lines, data: Any) -> Loc:
    """Drop the parts of a location that are not keys in the file: pydantic puts the tag of a
    tagged union there (`reproducer.scp-stress.size`). A missing required field is kept."""
    kept: list[Any] = []
    for i, part in enumerate(loc):
        here = (*kept, part)
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if here not in lines.at:
            node = _node(data, kept)
            if isinstance(part, int) and not isinstance(node, list):
                continue  # a single item the model wraps into a list
            if nxt is not None and ((*kept, nxt) in lines.at
                                    or (isinstance(node, dict) and node.get("kind") == part)):
                continue
        kept.append(part)
    return tuple(kept)


def _node(data: Any, loc: list[Any]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def validate(model: type[M], data: Any, path: Path, lines: _Lines, prefix: Loc = ()) -> M:
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
