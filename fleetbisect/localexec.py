"""Local commands with a deadline: the whole process group goes when the deadline passes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import BinaryIO, Mapping

from .deadline import Deadline
from .masking import mask_file


def run_logged(
    argv: list[str], cwd: Path | None, env: Mapping[str, str], log: BinaryIO, deadline: Deadline
) -> int | None:
    """Run argv with its output into `log`; kill its process group at the deadline (and on
    Ctrl-C). Returns the exit status, or None when the deadline passed."""
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        return proc.wait(timeout=deadline.remaining())
    except subprocess.TimeoutExpired:
        _killpg(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _killpg(proc, signal.SIGKILL)
            proc.wait()
        return None
    finally:
        if proc.poll() is None:  # Ctrl-C or another exception while waiting
            _killpg(proc, signal.SIGKILL)
            proc.wait()
        if getattr(log, "name", None):
            log.flush()
            mask_file(Path(log.name))


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
