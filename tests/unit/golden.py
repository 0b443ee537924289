"""Golden files for generated text (QEMU arguments, libvirt XML): the test compares what the
code produces with tests/golden/NAME byte for byte. A deliberate change regenerates them:

    FLEETBISECT_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit -k golden

and the diff of tests/golden/ is then reviewed like code.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
REGEN = "FLEETBISECT_REGEN_GOLDEN"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get(REGEN):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with {REGEN}=1 to write it"
    assert text == path.read_text(), f"{name} differs from the golden file (regenerate with {REGEN}=1 if meant)"
