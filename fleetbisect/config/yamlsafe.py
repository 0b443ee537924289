"""YAML from a file nobody vouches for: bounded, with the line of every key kept.

A configuration file may be hostile or simply broken, and either way the answer is one line
naming file and line, fast, never a traceback or an exhausted machine:

- size: a file larger than MAX_BYTES is refused before it is parsed (and never read whole, so
  `--playbook /dev/zero` is an error too);
- bytes: the text must be UTF-8; a bad byte is named by its line;
- depth: collections nested deeper than MAX_DEPTH are refused while composing (PyYAML's
  composer recurses: a few thousand `[` end in RecursionError);
- aliases: an alias shares its node, and building Python values copies it, so a 632-byte
  "billion laughs" grows to gigabytes. Values built through aliases are counted and refused
  past MAX_ALIASED, and a recursive alias is refused outright.

Every problem is a `Problem`: a str `FILE:LINE field.path: message` that also carries its parts
(for `--json`), with control characters escaped so that no input can forge an output line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

Loc = tuple[Any, ...]

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_ALIASED = 10_000
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"


def printable(text: Any) -> str:
    """`text` with every control character escaped (\\n, \\x1b, U+2028 ...): one output line."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if ch == "\\" or ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


class Problem(str):
    """One problem in a configuration file, printed as `FILE:LINE field.path: message`."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __new__(cls, file: Any, line: int | None, loc: Loc | None, message: str) -> "Problem":
        file, message = printable(file), printable(message)
        field = printable(dotted(loc)) if loc is not None else None
        where = f"{file}:{line}" if line else file
        self = super().__new__(cls, f"{where} {field}: {message}" if field else f"{where}: {message}")
        self.file, self.line, self.field, self.message = file, line, field, message
        return self

    def sort_key(self) -> tuple[str, int]:
        return (self.file, self.line or 0)

    def as_event(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message}


def sort_problems(problems: list[str]) -> list[str]:
    """By file and line; plain strings (no location) keep their place at the front."""
    return sorted(problems, key=lambda p: p.sort_key() if isinstance(p, Problem) else ("", 0))


class Lines:
    """Line (1-based) of every key and item, by its path from the document root."""

    def __init__(self) -> None:
        self.at: dict[Loc, int] = {}

    def line(self, loc: Loc) -> int | None:
        loc = tuple(loc)
        while loc not in self.at and loc:
            loc = loc[:-1]
        return self.at.get(loc)


class Bad(Exception):
    """A problem found while building values; read_yaml adds the file."""

    def __init__(self, line: int, loc: Loc | None, message: str):
        self.line, self.loc, self.message = line, loc, message
        super().__init__(message)


class _TooMany(Exception):
    """The alias budget is spent; turned into a Bad where the alias is used."""


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_DEPTH."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        # Where each alias of a list item is written (the node it returns is the anchor's).
        self.alias_lines: dict[tuple[int, int], int] = {}

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if isinstance(index, int) and self.check_event(yaml.AliasEvent):
            self.alias_lines[(id(parent), index)] = self.peek_event().start_mark.line + 1
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Builder:
    """Python values from composed nodes, keeping lines and counting what aliases cost."""

    def __init__(self, loader: _Loader, lines: Lines) -> None:
        self.loader = loader
        self.lines = lines
        self.built: set[int] = set()  # collection nodes built once: seeing one again is an alias
        self.open: set[int] = set()  # collection nodes being built: seeing one is recursion
        self.aliased = 0  # values built through aliases

    def build(self, node: yaml.Node, loc: Loc, line: int, via_alias: bool = False) -> Any:
        self.lines.at.setdefault(loc, line)
        if isinstance(node, yaml.ScalarNode):
            self._count(via_alias, line, loc)
            return self._scalar(node, loc)
        key = id(node)
        if key in self.open:
            raise Bad(line, loc, "an alias refers to a collection that contains it (recursive alias)")
        if len(self.open) >= MAX_DEPTH:
            raise Bad(line, loc, f"nested deeper than {MAX_DEPTH} levels (through aliases)")
        alias_root = not via_alias and key in self.built
        via_alias = via_alias or alias_root
        self._count(via_alias, line, loc)
        self.open.add(key)
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc, via_alias)
            if node.tag not in (_SEQ, _MAP):
                raise Bad(line, loc, f"the tag {node.tag} is not allowed here")
            return [self.build(item, (*loc, i), self.loader.alias_lines.get((key, i), item.start_mark.line + 1),
                               via_alias) for i, item in enumerate(node.value)]
        except _TooMany:
            if alias_root:  # named where the alias that crossed the budget is used
                raise Bad(line, loc, f"aliases expand to more than {MAX_ALIASED} values (an alias bomb?)")
            raise
        finally:
            self.open.discard(key)
            self.built.add(key)

    def _count(self, via_alias: bool, line: int, loc: Loc) -> None:
        if via_alias:
            self.aliased += 1
            if self.aliased > MAX_ALIASED:
                raise _TooMany()

    def _mapping(self, node: yaml.MappingNode, loc: Loc, via_alias: bool) -> dict[Any, Any]:
        if node.tag not in (_SEQ, _MAP):
            raise Bad(node.start_mark.line + 1, loc, f"the tag {node.tag} is not allowed here")
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise Bad(key_line, loc, "a key must be a plain value, not a list or a mapping")
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys of its own win
                merged = {**self._merge(value_node, loc, key_line, via_alias), **merged}
                continue
            key = self._scalar(key_node, loc)
            if isinstance(key, (float, bytes)) or key is None:
                raise Bad(key_line, loc, f"{key!r} cannot be a key: use a name")
            if key in out:
                raise Bad(key_line, (*loc, key), f"duplicate key {key!r}")
            self.lines.at[(*loc, key)] = key_line
            out[key] = self.build(value_node, (*loc, key), key_line, via_alias)
        for key, value in merged.items():
            out.setdefault(key, value)
        return out

    def _merge(self, node: yaml.Node, loc: Loc, line: int, via_alias: bool) -> dict[Any, Any]:
        """The mappings of a merge key; the first of a list wins, as YAML's merge says."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        merged: dict[Any, Any] = {}
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise Bad(line, loc, "`<<` merges a mapping or a list of mappings")
            value = self.build(source, (*loc, "<<"), line, via_alias)
            for key in value:
                self.lines.at.setdefault((*loc, key), line)
            merged.update(value)
        return merged

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as e:  # `2001-13-45` is a bad date, `!!int x`
            raise Bad(node.start_mark.line + 1, loc, f"{node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}: {e}")
        if isinstance(value, bytes):  # pydantic would take `!!binary` bytes as a string
            raise Bad(node.start_mark.line + 1, loc, "binary values (!!binary) are not allowed")
        return value


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise Bad(line, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})")
    return text.removeprefix("\ufeff")


def read_yaml(path: Path) -> tuple[Any, Lines]:
    """Parse one YAML document, keeping lines; any problem is a ConfigError naming file:line."""
    from ..errors import ConfigError

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError([Problem(path, None, None, f"cannot read: {e.strerror or e}")])
    lines = Lines()
    loader = None
    try:
        if len(raw) > MAX_BYTES:
            raise Bad(1, None, f"larger than {MAX_BYTES >> 20} MiB: not a configuration file")
        text = _decode(path, raw)
        loader = _Loader(text)
        node = loader.get_single_node()
        data = _Builder(loader, lines).build(node, (), node.start_mark.line + 1) if node is not None else None
    except Bad as e:
        raise ConfigError([Problem(path, e.line, e.loc, e.message)])
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = f"invalid YAML: {e.problem or e}"
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            message += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError([Problem(path, mark.line + 1 if mark else None, None, message)])
    except yaml.reader.ReaderError as e:  # a control character YAML does not allow
        line = text[: e.position].count("\n") + 1
        char = chr(e.character) if isinstance(e.character, int) else e.character
        raise ConfigError([Problem(path, line, None, f"invalid YAML: the character {printable(char)} is not allowed")])
    except yaml.YAMLError as e:
        raise ConfigError([Problem(path, None, None, f"invalid YAML: {e}")])
    except RecursionError:  # not expected past the bounds above; still never a traceback
        raise ConfigError([Problem(path, None, None, "invalid YAML: nested too deeply")])
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines
