"""Everything fleetbisect writes goes through here or masking.open_masked: masked, and the
files a crash must never leave half-written are replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .masking import mask, mask_json, open_masked


def _replace(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def write_atomic(path: Path, text: str) -> Path:
    """Write-then-rename, fsync'd and masked: a crash leaves the old file or the new one."""
    return _replace(path, mask(text))


def write_json_atomic(path: Path, data: dict) -> Path:
    """As write_atomic; the strings are masked before encoding, so the file stays JSON."""
    return _replace(path, json.dumps(mask_json(data), indent=2) + "\n")


def write_text_masked(path: Path, text: str | bytes) -> Path:
    """An evidence file (commands.txt, dmesg.log, a reproducer's log), masked."""
    with open_masked(path, "w") as f:
        f.write(text)
    return path
