"""Secrets never reach a log, a report or the terminal.

fleetbisect itself holds no secrets (keys are files or the ssh-agent), but a build environment
or a hook may: `GITHUB_TOKEN`, a chat webhook's key, a signing password. Every value of an
environment variable whose name says it is secret (and of the playbook's `build.env`) is
replaced by `***` in whatever fleetbisect writes: run.log, the journal, reports, build and hook
logs, terminal lines.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW(?:OR)?D|API_?KEY|CREDENTIAL|PRIVATE|WEBHOOK|AUTH", re.IGNORECASE)
MIN_LENGTH = 6  # shorter values are too likely to be ordinary words
MASK = "***"

_values: set[str] = set()


def secret_values(env: Mapping[str, str]) -> set[str]:
    return {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_LENGTH}


def register(env: Mapping[str, str] | None = None) -> None:
    """Add the secret values of `env` (default: this process's environment) to the mask."""
    for v in secret_values(os.environ if env is None else env):
        _values.add(v)
        _values.add(json.dumps(v)[1:-1])  # as it appears inside JSON text


def mask(text: str) -> str:
    for v in sorted(_values, key=len, reverse=True):
        if v in text:
            text = text.replace(v, MASK)
    return text


def mask_file(path: Path) -> None:
    """Rewrite a finished log with its secrets masked (no-op when it holds none)."""
    if not _values:
        return
    try:
        text = path.read_bytes().decode(errors="surrogateescape")
    except OSError:
        return
    masked = mask(text)
    if masked != text:
        path.write_bytes(masked.encode(errors="surrogateescape"))
