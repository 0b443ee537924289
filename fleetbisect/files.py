"""Files that a crash must never leave half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .masking import mask


def write_atomic(path: Path, text: str) -> Path:
    """Write-then-rename, fsync'd: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(mask(text))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def write_json_atomic(path: Path, data: dict) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")
