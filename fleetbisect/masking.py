"""Secrets never reach a log, a report, the journal or the terminal.

fleetbisect itself holds no secrets (keys are files or the ssh-agent), but a build environment
or a hook may: `GITHUB_TOKEN`, `BMC_PASS`, a signing PIN. Their *values* are replaced by `***`
in everything fleetbisect writes, and a stream (a build's output) is masked before it touches
the disk, so a controller killed mid-build leaves nothing in clear text. What is masked:

- every environment variable whose name says it is secret: PASS, PWD, PIN, TOKEN, KEY, SECRET,
  CREDENTIAL, AUTH, PRIVATE or WEBHOOK anywhere in the name (`BMC_PASS`, `DB_PWD`,
  `SSH_PASSPHRASE`, `KBUILD_SIGN_PIN`, `APIKEY`), except names that only look secret and hold
  values found everywhere: `PWD`/`OLDPWD` (the working directory: masking it would hide every
  path, and the journal could no longer be resumed), `GIT_AUTHOR_*` (the culprit's author),
  `KEYBOARD*`/`KEYMAP`;
- every value of the playbook's `build.env` (the user declared it), except the kbuild variables
  that name a toolchain, an architecture or a directory (`ARCH`, `CC`, `O`, ... below), whose
  values are all over a build log and never secret;
- in both cases only values of at least MIN_LENGTH characters that are not a trivial word
  (`true`, `none`, ...): a shorter value would mask ordinary text everywhere.

Overlapping secrets are masked as one: every byte covered by any secret becomes part of a `***`.
A path that exists is not masked (it says where a secret is, not what it is). In text (the
journal, reports, terminal lines) a short hex-digit secret (a PIN) inside a longer hex word is
left alone: that is a commit id or a number, and masking it would corrupt the commit ids the
journal resumes from and the culprit line. Logs are streamed and masked without that exception.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

SECRET_NAME = re.compile(
    r"PASS|PWD|PIN|TOKEN|KEY(?!BOARD|MAP)|SECRET|CREDENTIAL|AUTH(?!OR)|PRIVATE|WEBHOOK", re.IGNORECASE
)
NOT_SECRET_NAME = re.compile(r"(?:OLD)?PWD", re.IGNORECASE)  # matched against the whole name
# build.env variables whose values are a toolchain, an architecture or a path: never secret,
# and masking them would make every build log unreadable.
PUBLIC_BUILD_VARS = frozenset({
    "ARCH", "SUBARCH", "SRCARCH", "CROSS_COMPILE", "CC", "HOSTCC", "CXX", "LD", "AR", "LLVM",
    "LLVM_IAS", "O", "KBUILD_OUTPUT", "INSTALL_PATH", "INSTALL_MOD_PATH", "CCACHE_DIR", "PATH",
})
TRIVIAL = frozenset({"true", "false", "null", "none", "auto", "never", "always", "default"})
MIN_LENGTH = 4
MASK = "***"
HOLD_LIMIT = 1 << 16  # bytes a stream masker may hold back at most (but for one secret)

_values: set[str] = set()


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not NOT_SECRET_NAME.fullmatch(name)


def _maskable(value: str) -> bool:
    if len(value) < MIN_LENGTH or value.lower() in TRIVIAL:
        return False
    # a path that exists is where a secret is, not the secret; masking it would hide the
    # repository or run directory paths the journal needs to resume
    return not (value.startswith("/") and os.path.exists(value))


def secret_values(env: Mapping[str, str]) -> set[str]:
    """The values of `env` whose names look secret."""
    return {v for k, v in env.items() if isinstance(v, str) and is_secret_name(k) and _maskable(v)}


def build_env_values(env: Mapping[str, str]) -> set[str]:
    """Every value the playbook's build.env declares, except the public kbuild variables."""
    return {v for k, v in env.items() if isinstance(v, str) and k not in PUBLIC_BUILD_VARS and _maskable(v)}


def register(env: Mapping[str, str] | None = None) -> None:
    """Add the secret values of `env` (default: this process's environment) to the mask."""
    _add(secret_values(os.environ if env is None else env))


def register_build_env(env: Mapping[str, str]) -> None:
    _add(build_env_values(env))


def _add(values: Iterable[str]) -> None:
    for v in values:
        # as written, and as it appears inside JSON text and HTML (report.html escapes it)
        _values.update({v, json.dumps(v)[1:-1], html.escape(v, quote=False), html.escape(v)})


# --- masking ----------------------------------------------------------------------------------


_HEX = frozenset("0123456789abcdefABCDEF")
SHORT = 12  # a hex secret shorter than this may well occur inside a commit id by chance


def _inside_id(buf: str, s: int, e: int) -> bool:
    """Is buf[s:e] part of a longer hex word (a commit id, a number)? Then it is not the
    secret, and masking it would corrupt the commit ids of the journal and the culprit line."""
    return (s > 0 and buf[s - 1] in _HEX) or (e < len(buf) and buf[e] in _HEX)


def _runs(buf, needles, ids: bool = False) -> list[list[int]]:
    """Merged [start, end) spans of `buf` (str or bytes) covered by any needle, in order.
    With `ids`, a short hex needle inside a longer hex word is left alone."""
    spans = []
    for n in needles:
        hexy = ids and len(n) < SHORT and set(n) <= _HEX
        i = buf.find(n)
        while i >= 0:
            if not (hexy and _inside_id(buf, i, i + len(n))):
                spans.append((i, i + len(n)))
            i = buf.find(n, i + 1)
    spans.sort()
    runs: list[list[int]] = []
    for s, e in spans:
        if runs and s < runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], e)
        else:
            runs.append([s, e])
    return runs


def _replace(buf, runs, mask):
    out, at = [], 0
    for s, e in runs:
        out += [buf[at:s], mask]
        at = e
    out.append(buf[at:])
    return buf[:0].join(out)


def mask(text: str) -> str:
    if not _values:
        return text
    return _replace(text, _runs(text, _values, ids=True), MASK)


def mask_json(data: Any) -> Any:
    """`data` with every string value in it masked: masking the JSON *text* instead could break
    its syntax. Keys are fleetbisect's own names (a secret equal to "host" must not hide one)."""
    if isinstance(data, str):
        return mask(data)
    if isinstance(data, dict):
        return {k: mask_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [mask_json(v) for v in data]
    if data is None or isinstance(data, (bool, int, float)):
        return data
    return mask(str(data))  # a Path, an enum: written as its text, so masked as text


def _encode(text: str) -> bytes:
    return text.encode(errors="surrogateescape")


class StreamMasker:
    """Masks a byte stream chunk by chunk. An end of the stream that may be the beginning of a
    secret is held back until the next chunk (or the end), so a secret split across two reads
    is still caught, and everything else is written at once (a live log stays live)."""

    def __init__(self, values: Iterable[str] | None = None):
        self.needles = sorted({_encode(v) for v in (_values if values is None else values) if v}, key=len)
        self.tail = b""

    def feed(self, data: bytes) -> bytes:
        """What of the stream so far can be written now, masked."""
        if not self.needles:
            return data
        buf = self.tail + data
        runs = _runs(buf, self.needles)
        cut = min(_partial(buf, n) for n in self.needles)
        for s, e in runs:  # never cut through a secret: hold it back whole
            if s < cut < e:
                # (chains of overlapping secrets, "aaaa" in "aaaaaaaa...", could be held back
                # for ever: past HOLD_LIMIT they are written masked, which may show a suffix)
                cut = s if s > 0 or len(buf) < HOLD_LIMIT else e
                break
        self.tail = buf[cut:]
        return _replace(buf[:cut], [[s, min(e, cut)] for s, e in runs if s < cut], _encode(MASK))

    def end(self) -> bytes:
        rest, self.tail = self.tail, b""
        return _replace(rest, _runs(rest, self.needles), _encode(MASK)) if self.needles else rest


def _partial(buf: bytes, needle: bytes) -> int:
    """Where the end of `buf` that is a proper beginning of `needle` starts (len(buf): none)."""
    i = buf.find(needle[:1], max(0, len(buf) - len(needle) + 1))
    while i >= 0:
        if needle.startswith(buf[i:]):
            return i
        i = buf.find(needle[:1], i + 1)
    return len(buf)


class MaskedFile:
    """A file that only ever receives masked bytes: str or bytes in, masked as they stream.
    `flush()` writes all that can be written; `close()` the held-back end too."""

    def __init__(self, path: Path, mode: str = "w"):
        if mode.rstrip("b") not in ("w", "a"):
            raise ValueError(f"open_masked: mode {mode!r} (use w or a)")
        self.name = str(path)
        self._f = open(path, mode.rstrip("b") + "b")
        self._masker = StreamMasker()

    def write(self, data: str | bytes) -> int:
        raw = _encode(data) if isinstance(data, str) else bytes(data)
        self._f.write(self._masker.feed(raw))
        return len(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.write(self._masker.end())
            finally:
                self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __enter__(self) -> "MaskedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_masked(path: Path, mode: str = "w") -> MaskedFile:
    """The one way fleetbisect writes a log or an evidence file."""
    return MaskedFile(path, mode)


def mask_file(path: Path) -> None:
    """Mask a file written by someone else (a console log fetched from the host) in place."""
    if not _values or not path.is_file():
        return
    tmp = path.with_name(path.name + ".masking")
    try:
        with open(path, "rb") as src, open_masked(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
