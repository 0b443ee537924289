"""The one rich Console, and the run's log.

On a terminal, messages are coloured; elsewhere (nohup, CI) they are plain timestamped lines.
Everything also goes to the `fleetbisect` logger, which a run directs to a debug-level file.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
import time
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.markup import escape

log = logging.getLogger("fleetbisect")


class UI:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.plain = not self.console.is_terminal

    def _emit(self, style: str, text: str) -> None:
        if self.quiet:
            return
        if self.plain:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.console.print(f"{stamp} {text}", markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print(f"[{style}]{escape(text)}[/]" if style else escape(text), soft_wrap=True)

    def info(self, text: str) -> None:
        log.info(text)
        self._emit("", text)

    def step(self, text: str) -> None:
        log.info(text)
        self._emit("bold", text)

    def good(self, text: str) -> None:
        log.info(text)
        self._emit("green", text)

    def warn(self, text: str) -> None:
        log.warning(text)
        self._emit("yellow", text)

    def error(self, text: str) -> None:
        log.error(text)
        self._emit("bold red", text)

    def detail(self, text: str) -> None:
        log.debug(text)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Debug-level log of everything into the run directory, for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fleetbisect")
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
